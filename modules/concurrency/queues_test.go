package concurrency

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/protocols/envelope"
)

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

// op is one step of a table row: it runs against q and asserts its own outcome.
type op func(t *testing.T, q *Queues)

func push(dev, id string, deadline time.Time) op {
	return func(t *testing.T, q *Queues) {
		t.Helper()
		require.NoError(t, q.Push(dev, id, deadline), "push %s/%s", dev, id)
	}
}

func pushFull(dev, id string) op {
	return func(t *testing.T, q *Queues) {
		t.Helper()
		err := q.Push(dev, id, time.Time{})
		require.Error(t, err)
		assert.ErrorIs(t, err, ErrQueueFull)
		assert.Equal(t, envelope.CodeQueueFull, envelope.CodeOf(err))
		var we *envelope.Error
		require.ErrorAs(t, err, &we)
		assert.Contains(t, we.Message, dev)
		var qe *QueueFullError
		require.ErrorAs(t, err, &qe)
		assert.Equal(t, dev, qe.DeviceID)
	}
}

func next(dev string, now time.Time, routable bool, wantID string, wantExpired []string, wantOK bool) op {
	return func(t *testing.T, q *Queues) {
		t.Helper()
		id, exp, ok := q.Next(dev, now, routable)
		assert.Equal(t, wantOK, ok, "Next(%s) ok", dev)
		assert.Equal(t, wantID, id, "Next(%s) id", dev)
		assert.Equal(t, wantExpired, exp, "Next(%s) expired", dev)
	}
}

func done(dev, id string) op {
	return func(t *testing.T, q *Queues) { q.Done(dev, id) }
}

func remove(dev, id string, want bool) op {
	return func(t *testing.T, q *Queues) {
		t.Helper()
		assert.Equal(t, want, q.Remove(dev, id), "Remove(%s, %s)", dev, id)
	}
}

func acquire(dev, id string, want bool) op {
	return func(t *testing.T, q *Queues) {
		t.Helper()
		assert.Equal(t, want, q.Acquire(dev, id), "Acquire(%s, %s)", dev, id)
	}
}

func requeue(dev, id string) op {
	return func(t *testing.T, q *Queues) { q.Requeue(dev, id, time.Time{}) }
}

func appendEntry(dev, id string) op {
	return func(t *testing.T, q *Queues) { q.Append(dev, id, time.Time{}) }
}

func depth(dev string, want int) op {
	return func(t *testing.T, q *Queues) {
		t.Helper()
		assert.Equal(t, want, q.Depth(dev), "Depth(%s)", dev)
	}
}

func inflight(dev, want string) op {
	return func(t *testing.T, q *Queues) {
		t.Helper()
		id, ok := q.InFlight(dev)
		assert.Equal(t, want != "", ok, "InFlight(%s) ok", dev)
		assert.Equal(t, want, id, "InFlight(%s)", dev)
	}
}

func devices(want ...string) op {
	return func(t *testing.T, q *Queues) {
		t.Helper()
		if want == nil {
			want = []string{}
		}
		assert.Equal(t, want, q.Devices())
	}
}

func length(want int) op {
	return func(t *testing.T, q *Queues) {
		t.Helper()
		assert.Equal(t, want, q.Len())
	}
}

func TestQueues(t *testing.T) {
	none := time.Time{}
	later := t0.Add(time.Minute)
	tests := []struct {
		name     string
		maxDepth int
		ops      []op
	}{
		{"empty device has nothing", 4, []op{
			next("d", t0, true, "", nil, false), depth("d", 0), inflight("d", ""), devices(), length(0),
		}},
		{"FIFO order", 4, []op{
			push("d", "a", none), push("d", "b", none), push("d", "c", none),
			depth("d", 3), length(3),
			next("d", t0, true, "a", nil, true), done("d", "a"),
			next("d", t0, true, "b", nil, true), done("d", "b"),
			next("d", t0, true, "c", nil, true), done("d", "c"),
			next("d", t0, true, "", nil, false), length(0),
		}},
		{"one in flight per device", 4, []op{
			push("d", "a", none), push("d", "b", none),
			next("d", t0, true, "a", nil, true), inflight("d", "a"),
			next("d", t0, true, "", nil, false), depth("d", 1),
			done("d", "a"), inflight("d", ""),
			next("d", t0, true, "b", nil, true),
		}},
		{"devices are independent", 4, []op{
			push("d1", "a", none), push("d2", "b", none),
			next("d1", t0, true, "a", nil, true),
			next("d2", t0, true, "b", nil, true),
			inflight("d1", "a"), inflight("d2", "b"),
		}},
		{"not routable keeps the queue", 4, []op{
			push("d", "a", none),
			next("d", t0, false, "", nil, false), depth("d", 1), inflight("d", ""),
			next("d", t0, true, "a", nil, true),
		}},
		{"depth limit", 2, []op{
			push("d", "a", none), push("d", "b", none), pushFull("d", "c"),
			depth("d", 2), length(2), push("other", "x", none),
		}},
		{"in flight does not count against depth", 2, []op{
			push("d", "a", none), next("d", t0, true, "a", nil, true),
			push("d", "b", none), push("d", "c", none), pushFull("d", "e"),
			done("d", "a"), next("d", t0, true, "b", nil, true), push("d", "e", none),
		}},
		{"default depth", 0, []op{func(t *testing.T, q *Queues) {
			assert.Equal(t, DefaultMaxDepth, q.MaxDepth())
			for i := range DefaultMaxDepth {
				require.NoError(t, q.Push("d", fmt.Sprint(i), time.Time{}))
			}
			assert.ErrorIs(t, q.Push("d", "over", time.Time{}), ErrQueueFull)
		}}},
		{"expired head entries are skipped and returned", 4, []op{
			push("d", "a", t0), push("d", "b", t0.Add(-time.Second)), push("d", "c", later), push("d", "e", none),
			next("d", t0, true, "c", []string{"a", "b"}, true), depth("d", 1), length(1),
		}},
		{"expiry only at the head: a live head protects later entries until it is popped", 4, []op{
			push("d", "a", none), push("d", "b", t0),
			next("d", t0, true, "a", nil, true), done("d", "a"),
			next("d", t0, true, "", []string{"b"}, false), depth("d", 0),
		}},
		{"expired entries are returned even when busy or not routable", 4, []op{
			push("d", "a", none), next("d", t0, true, "a", nil, true),
			push("d", "b", t0), push("d", "c", none),
			next("d", t0, true, "", []string{"b"}, false), depth("d", 1),
			done("d", "a"), push("d", "e", t0),
			next("d", t0, false, "", nil, false), // c is live at the head: e waits behind it
			next("d", t0, true, "c", nil, true), done("d", "c"),
			next("d", t0, false, "", []string{"e"}, false), length(0),
		}},
		{"deadline in the future is dispatched", 4, []op{
			push("d", "a", later), next("d", t0, true, "a", nil, true),
		}},
		{"Done of the wrong id is a no-op", 4, []op{
			push("d", "a", none), push("d", "b", none),
			next("d", t0, true, "a", nil, true),
			done("d", "b"), done("d", "zzz"), done("other", "a"),
			inflight("d", "a"), next("d", t0, true, "", nil, false),
			done("d", "a"), inflight("d", ""),
		}},
		{"Done on an idle device is a no-op", 4, []op{
			done("d", "a"), inflight("d", ""), push("d", "a", none), done("d", "a"), depth("d", 1),
		}},
		{"Remove a queued entry", 4, []op{
			push("d", "a", none), push("d", "b", none), push("d", "c", none),
			remove("d", "b", true), remove("d", "b", false), depth("d", 2), length(2),
			next("d", t0, true, "a", nil, true), done("d", "a"),
			next("d", t0, true, "c", nil, true),
		}},
		{"Remove cannot take the entry in flight", 4, []op{
			push("d", "a", none), next("d", t0, true, "a", nil, true),
			remove("d", "a", false), inflight("d", "a"), remove("nodev", "a", false),
		}},
		{"Acquire an idle device", 4, []op{
			acquire("d", "a", true), inflight("d", "a"), acquire("d", "b", false),
			push("d", "c", none), next("d", t0, true, "", nil, false),
			done("d", "a"), next("d", t0, true, "c", nil, true),
		}},
		{"Acquire refuses when something is queued (FIFO)", 4, []op{
			push("d", "a", none), acquire("d", "b", false), inflight("d", ""),
		}},
		{"Requeue puts the entry in flight back at the head and frees the device", 4, []op{
			push("d", "a", none), push("d", "b", none),
			next("d", t0, true, "a", nil, true), requeue("d", "a"),
			inflight("d", ""), depth("d", 2),
			next("d", t0, true, "a", nil, true),
		}},
		{"Requeue and Append ignore the depth limit", 1, []op{
			push("d", "a", none), next("d", t0, true, "a", nil, true),
			push("d", "b", none), pushFull("d", "c"),
			requeue("d", "a"), appendEntry("d", "c"), depth("d", 3), length(3),
			next("d", t0, true, "a", nil, true), done("d", "a"),
			next("d", t0, true, "b", nil, true), done("d", "b"),
			next("d", t0, true, "c", nil, true),
		}},
		{"Devices lists devices with queued work, sorted", 4, []op{
			push("z", "1", none), push("a", "2", none), push("m", "3", none),
			devices("a", "m", "z"),
			next("m", t0, true, "3", nil, true), devices("a", "z"),
			done("m", "3"), devices("a", "z"), length(2),
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			q := New(tt.maxDepth)
			for _, o := range tt.ops {
				o(t, q)
			}
		})
	}
}

// TestQueuesForgetsIdleDevices checks that a device with nothing queued and nothing in flight leaves no state.
func TestQueuesForgetsIdleDevices(t *testing.T) {
	q := New(4)
	for i := range 100 {
		dev := fmt.Sprint("d", i)
		require.NoError(t, q.Push(dev, "a", time.Time{}))
		id, _, ok := q.Next(dev, t0, true)
		require.True(t, ok)
		q.Done(dev, id)
		require.True(t, q.Acquire(dev, "b"))
		q.Done(dev, "b")
	}
	require.NoError(t, q.Push("x", "1", t0))
	_, exp, _ := q.Next("x", t0, false)
	assert.Equal(t, []string{"1"}, exp)
	assert.Empty(t, q.devs)
}

// TestQueuesLongFIFO pushes and pops many entries through one busy device so the head compaction is exercised.
func TestQueuesLongFIFO(t *testing.T) {
	q := New(5000)
	want := 0
	for i := range 5000 {
		require.NoError(t, q.Push("d", fmt.Sprint(i), time.Time{}))
		if i%3 == 2 { // drain more slowly than we fill, then catch up below
			id, _, ok := q.Next("d", t0, true)
			require.True(t, ok)
			require.Equal(t, fmt.Sprint(want), id)
			want++
			q.Done("d", id)
		}
	}
	for {
		id, _, ok := q.Next("d", t0, true)
		if !ok {
			break
		}
		require.Equal(t, fmt.Sprint(want), id)
		want++
		q.Done("d", id)
	}
	assert.Equal(t, 5000, want)
	assert.Zero(t, q.Len())
}

// TestQueuesConcurrent runs pushers and consumers on shared devices under -race and checks the one-in-flight
// rule holds throughout.
func TestQueuesConcurrent(t *testing.T) {
	q := New(10000)
	const devs, perDev = 8, 500
	var mu sync.Mutex
	active := map[string]string{}
	var wg sync.WaitGroup
	for d := range devs {
		dev := fmt.Sprint("d", d)
		wg.Go(func() {
			for i := range perDev {
				if err := q.Push(dev, fmt.Sprint(dev, "/", i), time.Time{}); err != nil {
					t.Error(err)
				}
			}
		})
	}
	got := make([]int, devs)
	for c := range 4 {
		wg.Go(func() {
			for round := 0; round < devs*perDev*4; round++ {
				d := (round + c) % devs
				dev := fmt.Sprint("d", d)
				id, _, ok := q.Next(dev, t0, true)
				if !ok {
					continue
				}
				mu.Lock()
				if prev, busy := active[dev]; busy {
					t.Errorf("device %s: %s dispatched while %s in flight", dev, id, prev)
				}
				active[dev] = id
				got[d]++
				delete(active, dev)
				mu.Unlock()
				q.Done(dev, id)
			}
		})
	}
	wg.Wait()
	total := 0
	for _, n := range got {
		total += n
	}
	assert.Equal(t, devs*perDev, total+q.Len())
}

func TestQueueFullErrorUnwrap(t *testing.T) {
	err := fmt.Errorf("submit: %w", &QueueFullError{DeviceID: "dev-1", Depth: 3})
	assert.ErrorIs(t, err, ErrQueueFull)
	assert.Equal(t, envelope.CodeQueueFull, envelope.CodeOf(err))
	var we *envelope.Error
	require.ErrorAs(t, err, &we)
	assert.Equal(t, "ERR_QUEUE_FULL: device dev-1 already holds 3 queued commands", we.Message)
	assert.False(t, errors.Is(err, errors.New("ork/concurrency: queue full")), "identity, not text")
}
