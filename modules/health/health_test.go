package health

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/orknode/ork/modules/internal/memkv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var t0 = time.Date(2026, 7, 1, 12, 0, 0, 0, time.UTC)

// memKV is the shared in-memory KV that counts writes and can be made to fail.
type memKV = memkv.KV

func newMemKV() *memKV { return memkv.New() }

var errDisk = errors.New("disk on fire")

// fixture is a Monitor over a memKV with a fake clock and an OnChange recorder.
type fixture struct {
	m  *Monitor
	kv *memKV

	mu      sync.Mutex
	now     time.Time
	changes [][2]string
}

func newFixture(t *testing.T, threshold int) *fixture {
	t.Helper()
	f := &fixture{kv: newMemKV(), now: t0}
	m, err := New(Options{
		FailureThreshold: threshold,
		KV:               f.kv,
		Now:              func() time.Time { f.mu.Lock(); defer f.mu.Unlock(); return f.now },
		OnChange: func(workerID, from, to string) {
			f.mu.Lock()
			defer f.mu.Unlock()
			f.changes = append(f.changes, [2]string{from, to})
		},
	})
	require.NoError(t, err)
	f.m = m
	return f
}

func (f *fixture) tick() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.now = f.now.Add(time.Second)
}

func (f *fixture) takeChanges() [][2]string {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.changes
	f.changes = nil
	return c
}

const w1 = "worker-1"

func (f *fixture) ok(t *testing.T) (string, string) {
	t.Helper()
	f.tick()
	from, to, err := f.m.Success(context.Background(), w1)
	require.NoError(t, err)
	return from, to
}

func (f *fixture) fail(t *testing.T) (string, string) {
	t.Helper()
	f.tick()
	from, to, err := f.m.Failure(context.Background(), w1, "ping timeout")
	require.NoError(t, err)
	return from, to
}

func TestTransitionTable(t *testing.T) {
	legal := map[[2]string]bool{
		{Unknown, Healthy}: true,
		{Unknown, Sick}:    true,
		{Healthy, Sick}:    true,
		{Sick, Healthy}:    true,
		{Sick, Sick}:       true, // another failure below the threshold
		{Sick, Dead}:       true,
		{Dead, Healthy}:    true, // reconnect
		{Dead, Dead}:       true, // another failure
	}
	for _, from := range States {
		for _, to := range States {
			assert.Equal(t, legal[[2]string{from, to}], CanTransition(from, to), "%s → %s", from, to)
		}
	}
}

// TestTransitions has a row for every from × to pair. A legal row drives the outcome that takes it and checks
// the result, the OnChange steps and the write; an illegal row drives the outcome closest to it (if any) and
// checks the Monitor takes another, legal, way.
func TestTransitions(t *testing.T) {
	const (
		none = iota
		success
		failure
	)
	rows := []struct {
		from, to  string
		threshold int
		prep      int // failures after reaching from (SICK one step short of DEAD)
		event     int
		want      string      // resulting state
		steps     [][2]string // OnChange calls
		writes    bool
	}{
		// Legal.
		{from: Unknown, to: Healthy, event: success, want: Healthy, steps: [][2]string{{Unknown, Healthy}}, writes: true},
		{from: Unknown, to: Sick, event: failure, want: Sick, steps: [][2]string{{Unknown, Sick}}, writes: true},
		{from: Healthy, to: Sick, event: failure, want: Sick, steps: [][2]string{{Healthy, Sick}}, writes: true},
		{from: Sick, to: Healthy, event: success, want: Healthy, steps: [][2]string{{Sick, Healthy}}, writes: true},
		{from: Sick, to: Sick, event: failure, want: Sick, writes: true}, // counter 1 → 2, no OnChange
		{from: Sick, to: Dead, prep: 1, event: failure, want: Dead, steps: [][2]string{{Sick, Dead}}, writes: true},
		{from: Dead, to: Healthy, event: success, want: Healthy, steps: [][2]string{{Dead, Healthy}}, writes: true},
		{from: Dead, to: Dead, event: failure, want: Dead}, // counter only: no OnChange, no write
		// Illegal.
		{from: Unknown, to: Unknown},
		{from: Unknown, to: Dead, threshold: 1, event: failure, want: Dead,
			steps: [][2]string{{Unknown, Sick}, {Sick, Dead}}, writes: true}, // by way of SICK
		{from: Healthy, to: Unknown},
		{from: Healthy, to: Healthy, event: success, want: Healthy}, // nothing changes, nothing written
		{from: Healthy, to: Dead, threshold: 1, event: failure, want: Dead,
			steps: [][2]string{{Healthy, Sick}, {Sick, Dead}}, writes: true},
		{from: Sick, to: Unknown},
		{from: Dead, to: Unknown},
		{from: Dead, to: Sick, event: failure, want: Dead}, // a DEAD Worker stays DEAD until a success
	}
	covered := map[[2]string]bool{}
	for _, row := range rows {
		covered[[2]string{row.from, row.to}] = true
		t.Run(row.from+"→"+row.to, func(t *testing.T) {
			legal := CanTransition(row.from, row.to)
			if row.event == none {
				require.False(t, legal)
				return // only Forget returns a Worker to UNKNOWN, and it is not a transition
			}
			threshold := cmpOr(row.threshold, DefaultFailureThreshold)
			f := newFixture(t, threshold)
			switch row.from {
			case Healthy:
				f.ok(t)
			case Sick:
				f.fail(t)
			case Dead:
				for range threshold {
					f.fail(t)
				}
			}
			for range row.prep {
				f.fail(t)
			}
			require.Equal(t, row.from, f.m.State(w1).State)
			f.takeChanges()
			writes := f.kv.Writes()

			var from, to string
			if row.event == success {
				from, to = f.ok(t)
			} else {
				from, to = f.fail(t)
			}
			assert.Equal(t, row.from, from)
			assert.Equal(t, row.want, to)
			assert.Equal(t, row.want, f.m.State(w1).State)
			steps := f.takeChanges()
			assert.Equal(t, row.steps, steps)
			for _, s := range steps {
				assert.True(t, CanTransition(s[0], s[1]), "OnChange step %v is not in the table", s)
			}
			if !legal {
				assert.NotContains(t, steps, [2]string{row.from, row.to})
			}
			assert.Equal(t, row.writes, f.kv.Writes() > writes, "written")
		})
	}
	for _, from := range States {
		for _, to := range States {
			assert.True(t, covered[[2]string{from, to}], "no row for %s → %s", from, to)
		}
	}
}

func cmpOr(a, b int) int {
	if a != 0 {
		return a
	}
	return b
}

func TestThresholdThree(t *testing.T) {
	f := newFixture(t, 3)
	assert.Equal(t, Status{State: Unknown}, f.m.State(w1))

	from, to := f.ok(t)
	assert.Equal(t, [2]string{Unknown, Healthy}, [2]string{from, to})
	assert.False(t, NeedsImmediatePing(from, to))

	from, to = f.fail(t)
	assert.Equal(t, [2]string{Healthy, Sick}, [2]string{from, to})
	assert.True(t, NeedsImmediatePing(from, to), "re-ping at once on turning SICK")
	assert.Equal(t, 1, f.m.State(w1).ConsecutiveFailures)

	from, to = f.fail(t)
	assert.Equal(t, [2]string{Sick, Sick}, [2]string{from, to})
	assert.False(t, NeedsImmediatePing(from, to), "not again: the normal cadence")
	assert.Equal(t, 2, f.m.State(w1).ConsecutiveFailures)

	from, to = f.fail(t)
	assert.Equal(t, [2]string{Sick, Dead}, [2]string{from, to})
	assert.False(t, NeedsImmediatePing(from, to))
	st := f.m.State(w1)
	assert.Equal(t, Status{
		State: Dead, ConsecutiveFailures: 3, LastChange: t0.Add(4 * time.Second),
		LastSuccess: t0.Add(time.Second), LastFailure: t0.Add(4 * time.Second), LastError: "ping timeout",
	}, st)

	from, to = f.fail(t)
	assert.Equal(t, [2]string{Dead, Dead}, [2]string{from, to})
	assert.Equal(t, 4, f.m.State(w1).ConsecutiveFailures)

	from, to = f.ok(t)
	assert.Equal(t, [2]string{Dead, Healthy}, [2]string{from, to})
	st = f.m.State(w1)
	assert.Zero(t, st.ConsecutiveFailures)
	assert.Equal(t, t0.Add(6*time.Second), st.LastChange)
	assert.Equal(t, "ping timeout", st.LastError, "kept for diagnosis")

	// A success in between resets the count: SICK, HEALTHY, SICK is never DEAD.
	f.fail(t)
	f.fail(t)
	f.ok(t)
	f.fail(t)
	f.fail(t)
	assert.Equal(t, Sick, f.m.State(w1).State)

	assert.Equal(t, [][2]string{
		{Unknown, Healthy}, {Healthy, Sick}, {Sick, Dead}, {Dead, Healthy},
		{Healthy, Sick}, {Sick, Healthy}, {Healthy, Sick},
	}, f.takeChanges())
}

func TestThresholdOne(t *testing.T) {
	f := newFixture(t, 1)
	from, to := f.fail(t)
	assert.Equal(t, [2]string{Unknown, Dead}, [2]string{from, to}, "the first failure is fatal")
	assert.False(t, NeedsImmediatePing(from, to))
	assert.Equal(t, [][2]string{{Unknown, Sick}, {Sick, Dead}}, f.takeChanges(), "by way of SICK")
	from, to = f.fail(t)
	assert.Equal(t, [2]string{Dead, Dead}, [2]string{from, to})
	f.ok(t)
	from, to = f.fail(t)
	assert.Equal(t, [2]string{Healthy, Dead}, [2]string{from, to})
	assert.Equal(t, [][2]string{{Dead, Healthy}, {Healthy, Sick}, {Sick, Dead}}, f.takeChanges())
}

func TestNewRejectsBadThreshold(t *testing.T) {
	for _, n := range []int{0, -1} {
		m, err := New(Options{FailureThreshold: n})
		require.ErrorIs(t, err, ErrInvalidThreshold)
		assert.Nil(t, m)
	}
	m, err := New(Options{FailureThreshold: DefaultFailureThreshold})
	require.NoError(t, err)
	assert.NotNil(t, m)
}

func TestRoutableAndImmediatePing(t *testing.T) {
	assert.True(t, Routable(Unknown))
	assert.True(t, Routable(Healthy))
	assert.False(t, Routable(Sick))
	assert.False(t, Routable(Dead))
	for _, from := range States {
		for _, to := range States {
			assert.Equal(t, to == Sick && from != Sick, NeedsImmediatePing(from, to), "%s → %s", from, to)
		}
	}
}

// TestPersistence: health survives a restart, and pings that change nothing write nothing.
func TestPersistence(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, 3)
	f.ok(t)
	assert.Equal(t, 1, f.kv.Writes())
	for range 10 {
		f.ok(t)
	}
	assert.Equal(t, 1, f.kv.Writes(), "successes on a HEALTHY Worker write nothing")

	_, _, err := f.m.Failure(ctx, "worker-2", "refused")
	require.NoError(t, err)
	_, _, err = f.m.Failure(ctx, "worker-2", "refused again")
	require.NoError(t, err)
	assert.Equal(t, 3, f.kv.Writes(), "SICK → SICK writes the count")
	for range 3 {
		_, _, err = f.m.Failure(ctx, "worker-3", "down")
		require.NoError(t, err)
	}
	w := f.kv.Writes()
	_, _, err = f.m.Failure(ctx, "worker-3", "down")
	require.NoError(t, err)
	assert.Equal(t, w, f.kv.Writes(), "DEAD → DEAD writes nothing")

	var changes int
	m2, err := New(Options{FailureThreshold: 3, KV: f.kv, OnChange: func(string, string, string) { changes++ }})
	require.NoError(t, err)
	n, err := m2.Load(ctx)
	require.NoError(t, err)
	assert.Equal(t, 3, n)
	assert.Zero(t, changes)

	st := m2.State(w1)
	assert.Equal(t, Healthy, st.State)
	assert.Equal(t, t0.Add(time.Second), st.LastChange.UTC())
	assert.Equal(t, t0.Add(time.Second), st.LastSuccess.UTC(), "as of the last write")
	st2 := m2.State("worker-2")
	assert.Equal(t, Sick, st2.State)
	assert.Equal(t, 2, st2.ConsecutiveFailures)
	assert.Equal(t, "refused again", st2.LastError)
	assert.Equal(t, Dead, m2.State("worker-3").State)
	assert.Equal(t, map[string]int{Unknown: 0, Healthy: 1, Sick: 1, Dead: 1}, m2.Counts())

	// The reloaded counter carries on: one more failure makes worker-2 DEAD.
	_, to, err := m2.Failure(ctx, "worker-2", "x")
	require.NoError(t, err)
	assert.Equal(t, Dead, to)

	// Forget drops it in memory and on disk.
	require.NoError(t, m2.Forget(ctx, "worker-2"))
	assert.Equal(t, Status{State: Unknown}, m2.State("worker-2"))
	m3, _ := New(Options{FailureThreshold: 3, KV: f.kv})
	n, err = m3.Load(ctx)
	require.NoError(t, err)
	assert.Equal(t, 2, n)
	assert.Equal(t, Unknown, m3.State("worker-2").State)
	require.ErrorIs(t, m3.Forget(ctx, ""), ErrEmptyWorkerID)
}

func TestLoadSkipsCorruptRecords(t *testing.T) {
	ctx := context.Background()
	kv := newMemKV()
	put := func(key string, v any) {
		data, ok := v.([]byte)
		if !ok {
			data, _ = json.Marshal(v)
		}
		require.NoError(t, kv.Put(ctx, NS, key, data))
	}
	put("good", record{WorkerID: "good", State: Sick, ConsecutiveFailures: 1})
	put("a%2Fb", record{WorkerID: "a/b", State: Healthy})
	put("garbage", []byte("{"))
	put("no-id", record{State: Healthy})
	put("wrong-key", record{WorkerID: "other", State: Healthy})
	put("bad-state", record{WorkerID: "bad-state", State: "ZOMBIE"})
	put("negative", record{WorkerID: "negative", State: Sick, ConsecutiveFailures: -1})

	m, _ := New(Options{FailureThreshold: 3, KV: kv})
	var n int
	var err error
	require.NotPanics(t, func() { n, err = m.Load(ctx) })
	assert.Equal(t, 2, n)
	require.ErrorIs(t, err, ErrCorruptRecord)
	var joined interface{ Unwrap() []error }
	require.ErrorAs(t, err, &joined)
	var keys []string
	for _, e := range joined.Unwrap() {
		var ce *CorruptRecordError
		require.ErrorAs(t, e, &ce)
		keys = append(keys, ce.Key)
	}
	assert.Equal(t, []string{"bad-state", "garbage", "negative", "no-id", "wrong-key"}, keys)
	assert.Equal(t, Sick, m.State("good").State)
	assert.Equal(t, Healthy, m.State("a/b").State)
}

func TestLoadKeepsMemoryAndReportsListErrors(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, 3)
	f.fail(t)
	n, err := f.m.Load(ctx)
	require.NoError(t, err)
	assert.Zero(t, n, "already in memory")

	m, _ := New(Options{FailureThreshold: 3, KV: failingList{newMemKV()}})
	_, err = m.Load(ctx)
	require.ErrorIs(t, err, ErrPersist)

	m, _ = New(Options{FailureThreshold: 3})
	n, err = m.Load(ctx)
	assert.Zero(t, n)
	assert.NoError(t, err)
}

type failingList struct{ *memKV }

func (failingList) List(context.Context, string, func(string, []byte) error) error { return errDisk }

// TestPersistFailure: memory moves on (routing must see SICK now); the error is reported.
func TestPersistFailure(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, 3)
	f.kv.SetFail(memkv.Always(errDisk))
	from, to, err := f.m.Failure(ctx, w1, "x")
	require.ErrorIs(t, err, ErrPersist)
	require.ErrorIs(t, err, errDisk)
	assert.Equal(t, [2]string{Unknown, Sick}, [2]string{from, to})
	assert.Equal(t, Sick, f.m.State(w1).State)
	assert.Equal(t, [][2]string{{Unknown, Sick}}, f.takeChanges())

	f.kv.SetFail(nil)
	_, _, err = f.m.Success(ctx, w1)
	require.NoError(t, err)
	m2, _ := New(Options{FailureThreshold: 3, KV: f.kv})
	_, err = m2.Load(ctx)
	require.NoError(t, err)
	assert.Equal(t, Healthy, m2.State(w1).State)
}

func TestEmptyWorkerID(t *testing.T) {
	f := newFixture(t, 3)
	_, _, err := f.m.Success(context.Background(), "")
	require.ErrorIs(t, err, ErrEmptyWorkerID)
	_, _, err = f.m.Failure(context.Background(), "", "x")
	require.ErrorIs(t, err, ErrEmptyWorkerID)
	assert.Equal(t, map[string]int{Unknown: 0, Healthy: 0, Sick: 0, Dead: 0}, f.m.Counts())
}

// TestOnChangeReentrant: the callback runs with no lock held and may report outcomes itself, like a node
// that re-pings at once on SICK and gets an answer synchronously.
func TestOnChangeReentrant(t *testing.T) {
	ctx := context.Background()
	var (
		m   *Monitor
		got []string
	)
	m, err := New(Options{FailureThreshold: 3, OnChange: func(id, from, to string) {
		got = append(got, fmt.Sprintf("%s %s→%s", id, from, to))
		_ = m.State(id)
		if NeedsImmediatePing(from, to) {
			_, _, err := m.Success(ctx, id) // the immediate re-ping answered
			assert.NoError(t, err)
		}
	}})
	require.NoError(t, err)
	_, _, err = m.Success(ctx, "w")
	require.NoError(t, err)
	_, _, err = m.Failure(ctx, "w", "lost ping")
	require.NoError(t, err)
	assert.Equal(t, []string{"w UNKNOWN→HEALTHY", "w HEALTHY→SICK", "w SICK→HEALTHY"}, got)
	assert.Equal(t, Healthy, m.State("w").State)
}

// TestConcurrentOutcomes is for the race detector, and checks the last write matches memory.
func TestConcurrentOutcomes(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, 2)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 200 {
				id := fmt.Sprintf("w%d", i%4)
				if (g+i)%3 == 0 {
					_, _, _ = f.m.Success(ctx, id)
				} else {
					_, _, _ = f.m.Failure(ctx, id, "x")
				}
				_ = f.m.State(id)
				_ = f.m.Counts()
			}
		})
	}
	wg.Wait()
	for _, s := range f.takeChanges() {
		assert.True(t, CanTransition(s[0], s[1]), "%v", s)
	}
	m2, _ := New(Options{FailureThreshold: 2, KV: f.kv})
	_, err := m2.Load(ctx)
	require.NoError(t, err)
	for i := range 4 {
		id := fmt.Sprintf("w%d", i)
		assert.Equal(t, f.m.State(id).State, m2.State(id).State, id)
	}
}

// TestTableEnforced: a state the table does not know (which Load refuses to restore) cannot move.
func TestTableEnforced(t *testing.T) {
	f := newFixture(t, 3)
	f.m.workers[w1] = &Status{State: "ZOMBIE"}
	from, to, err := f.m.Success(context.Background(), w1)
	require.ErrorIs(t, err, ErrIllegalTransition)
	assert.EqualError(t, err, "ork/health: illegal transition: worker-1: ZOMBIE → HEALTHY")
	assert.Equal(t, [2]string{"ZOMBIE", "ZOMBIE"}, [2]string{from, to})
	assert.Equal(t, "ZOMBIE", f.m.State(w1).State)
	assert.Empty(t, f.takeChanges())
	assert.Zero(t, f.kv.Writes())
}
