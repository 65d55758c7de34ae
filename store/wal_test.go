package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"

	ds "github.com/ipfs/go-datastore"
	dssync "github.com/ipfs/go-datastore/sync"
	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"
)

func TestWALConcurrentAppends(t *testing.T) {
	tests := []struct {
		name string
		path func(t *testing.T) string
	}{
		{"disk", func(t *testing.T) string { return t.TempDir() }},
		{"memory", func(*testing.T) string { return "" }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			const writers, each = 64, 200
			s := openStore(t, tc.path(t))
			ctx, w := t.Context(), s.WAL()

			var g errgroup.Group
			for wr := range writers {
				g.Go(func() error {
					for i := range each {
						k := fmt.Sprintf("w%02d-%03d", wr, i)
						if err := w.Append(ctx, k, []byte("v-"+k)); err != nil {
							return fmt.Errorf("append %s: %w", k, err)
						}
					}
					return nil
				})
			}
			require.NoError(t, g.Wait())

			got := sweep(t, w)
			require.Len(t, got, writers*each)
			for _, r := range got {
				require.Equal(t, "v-"+r.key, r.value)
			}
			st := w.Stats()
			t.Logf("%+v: %.1f appends per sync", st, float64(st.Appends)/float64(st.Syncs))
			require.Equal(t, uint64(writers*each), st.Appends)
			require.Equal(t, uint64(writers*each), st.Batches)
			require.Less(t, st.Syncs, st.Appends, "no two appends shared a commit")
		})
	}
}

// TestWALDurability closes the store while writers are still appending: every append that returned nil must
// be there after a reopen, and every other one must have been told ErrClosed.
func TestWALDurability(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	require.NoError(t, err)
	ctx, w := t.Context(), s.WAL()

	// A command that finished before the close: its result moved out of the WAL.
	require.NoError(t, w.Append(ctx, "done", []byte("EXECUTING")))
	require.NoError(t, w.Apply(ctx, Op{NS: NSResults, Key: "done", Value: []byte("SUCCESS")}, Op{Key: "done", Delete: true}))
	require.NoError(t, s.Put(ctx, NSRegistry, "w1", []byte("READY")))

	const writers, closeAfter = 8, 500
	var (
		acks   atomic.Int64
		enough = make(chan struct{})
		acked  = make([][]string, writers)
		g      errgroup.Group
	)
	for wr := range writers {
		g.Go(func() error {
			for i := 0; ; i++ {
				k := fmt.Sprintf("w%d-%06d", wr, i)
				err := w.Append(ctx, k, []byte("v-"+k))
				if errors.Is(err, ErrClosed) {
					return nil
				}
				if err != nil {
					return err
				}
				acked[wr] = append(acked[wr], k)
				if acks.Add(1) == closeAfter {
					close(enough)
				}
			}
		})
	}
	<-enough
	require.NoError(t, s.Close())
	require.NoError(t, g.Wait())

	s = openStore(t, dir)
	got := map[string]string{}
	for _, r := range sweep(t, s.WAL()) {
		got[r.key] = r.value
	}
	var n int
	for _, keys := range acked {
		for _, k := range keys {
			require.Equal(t, "v-"+k, got[k], "acknowledged append %s lost", k)
			n++
		}
	}
	require.GreaterOrEqual(t, n, closeAfter)
	require.NotContains(t, got, "done")
	v, err := s.Get(ctx, NSResults, "done")
	require.NoError(t, err)
	require.Equal(t, "SUCCESS", string(v))
	v, err = s.Get(ctx, NSRegistry, "w1")
	require.NoError(t, err)
	require.Equal(t, "READY", string(v))
}

// gatedDS is an in-memory datastore whose batch commits block until release lets them through (a send lets
// one commit through, close lets all), fail (writing nothing) when the batch holds a key named "fail-*", and
// record the number of ops of each commit: tests can hold a leader mid-commit and see how requests were grouped.
type gatedDS struct {
	ds.Batching
	release chan struct{}

	mu      sync.Mutex
	commits []int
}

func newGatedDS() *gatedDS {
	return &gatedDS{Batching: dssync.MutexWrap(ds.NewMapDatastore()), release: make(chan struct{})}
}

func (g *gatedDS) Batch(ctx context.Context) (ds.Batch, error) {
	b, err := g.Batching.Batch(ctx)
	return &gatedBatch{Batch: b, g: g}, err
}

func (g *gatedDS) commitSizes() []int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]int(nil), g.commits...)
}

type gatedBatch struct {
	ds.Batch
	g    *gatedDS
	ops  int
	fail bool
}

func (b *gatedBatch) Put(ctx context.Context, k ds.Key, v []byte) error {
	b.ops++
	b.fail = b.fail || strings.HasPrefix(k.BaseNamespace(), "fail-")
	return b.Batch.Put(ctx, k, v)
}

func (b *gatedBatch) Delete(ctx context.Context, k ds.Key) error {
	b.ops++
	return b.Batch.Delete(ctx, k)
}

func (b *gatedBatch) Commit(ctx context.Context) error {
	<-b.g.release
	b.g.mu.Lock()
	b.g.commits = append(b.g.commits, b.ops)
	b.g.mu.Unlock()
	if b.fail {
		return errInjected
	}
	return b.Batch.Commit(ctx)
}

// async runs f in a goroutine and returns where its result will arrive.
func async(f func() error) <-chan error {
	c := make(chan error, 1)
	go func() { c <- f() }()
	return c
}

func has(t *testing.T, d ds.Datastore, key string) bool {
	t.Helper()
	ok, err := d.Has(context.Background(), ds.NewKey(key))
	require.NoError(t, err)
	return ok
}

// TestWALGroupCommit holds the first writer, which leads, in its commit while requests queue up, then checks
// that the next leader committed them together, up to MaxBatchOps, without ever splitting an Apply.
func TestWALGroupCommit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGatedDS()
		s, err := New(g, MaxBatchOps(4))
		require.NoError(t, err)
		ctx, w := t.Context(), s.WAL()

		results := []<-chan error{async(func() error { return w.Append(ctx, "c0", nil) })}
		synctest.Wait() // c0's caller leads and is blocked committing c0
		queue := []func() error{
			func() error { return w.Append(ctx, "c1", nil) },
			func() error { return w.Append(ctx, "c2", nil) },
			func() error { return w.Apply(ctx, Op{Key: "c3"}, Op{Key: "c4"}, Op{Key: "c5"}) },
			func() error { return w.Delete(ctx, "c0") },
		}
		for _, f := range queue {
			results = append(results, async(f))
			synctest.Wait() // fixes the queue order
		}
		close(g.release)
		for _, r := range results {
			require.NoError(t, <-r)
		}
		require.NoError(t, s.Close())

		// c1 and c2 (2 ops), then the Apply although it takes the batch to 5 > 4, then the Delete alone.
		require.Equal(t, []int{1, 5, 1}, g.commitSizes())
		require.Equal(t, WALStats{Appends: 7, Syncs: 3, Batches: 5}, w.Stats())
		require.False(t, has(t, g, "/wal/c0"))
		require.True(t, has(t, g, "/wal/c5"))
	})
}

// TestWALCallerCtxEnds: a queued caller that stops waiting gets ctx.Err() at once. If no commit had taken
// its request yet the request is withdrawn; if a commit had, its op is still committed. A leader sees its own
// commit through and returns its outcome.
func TestWALCallerCtxEnds(t *testing.T) {
	t.Run("queued", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			g := newGatedDS()
			s, err := New(g)
			require.NoError(t, err)
			w := s.WAL()
			ctx, cancel := context.WithCancel(t.Context())

			r1 := async(func() error { return w.Append(t.Context(), "c1", nil) })
			synctest.Wait() // c1's caller leads, blocked committing c1
			r2 := async(func() error { return w.Append(ctx, "c2", []byte("x")) })
			synctest.Wait()
			r3 := async(func() error { return w.Append(t.Context(), "c3", nil) })
			synctest.Wait() // c2 and c3 are queued
			cancel()
			require.ErrorIs(t, <-r2, context.Canceled)

			close(g.release)
			require.NoError(t, <-r1)
			require.NoError(t, <-r3)
			require.NoError(t, s.Close())
			require.False(t, has(t, g, "/wal/c2"), "a withdrawn request was committed")
			require.Equal(t, []int{1, 1}, g.commitSizes())
			require.Equal(t, WALStats{Appends: 2, Syncs: 2, Batches: 2}, w.Stats())
		})
	})
	t.Run("in a batch", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			g := newGatedDS()
			s, err := New(g)
			require.NoError(t, err)
			w := s.WAL()
			ctx, cancel := context.WithCancel(t.Context())

			r1 := async(func() error { return w.Append(t.Context(), "c1", nil) })
			synctest.Wait() // c1's caller leads, blocked committing c1
			r2 := async(func() error { return w.Append(t.Context(), "c2", nil) })
			synctest.Wait()
			r3 := async(func() error { return w.Append(ctx, "c3", []byte("x")) })
			synctest.Wait() // c2 and c3 are queued
			g.release <- struct{}{}
			require.NoError(t, <-r1)
			synctest.Wait() // c2's caller leads, blocked committing c2 and c3
			cancel()
			require.ErrorIs(t, <-r3, context.Canceled)

			close(g.release)
			require.NoError(t, <-r2)
			require.NoError(t, s.Close())
			require.True(t, has(t, g, "/wal/c3"), "the op was committed after its caller left")
			require.Equal(t, []int{1, 2}, g.commitSizes())
		})
	})
	t.Run("leader", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			g := newGatedDS()
			s, err := New(g)
			require.NoError(t, err)
			ctx, cancel := context.WithCancel(t.Context())

			r1 := async(func() error { return s.WAL().Append(ctx, "c1", []byte("x")) })
			synctest.Wait() // c1's caller leads, blocked committing c1
			cancel()
			synctest.Wait()
			select {
			case err := <-r1:
				t.Fatalf("a leader left its commit: %v", err)
			default:
			}

			close(g.release)
			require.NoError(t, <-r1, "the leader returns its commit's outcome")
			require.NoError(t, s.Close())
			require.True(t, has(t, g, "/wal/c1"))
		})
	})
}

// TestWALCtxChurn has writers give up at random points (queued, named leader, in a batch) while others keep
// writing, then closes: nothing may hang, every write that returned nil must be there and every withdrawn one
// must not count in the stats.
func TestWALCtxChurn(t *testing.T) {
	s := openStore(t, "", QueueLen(8), MaxBatchOps(16))
	w := s.WAL()
	const writers, each = 16, 100
	var (
		g     errgroup.Group
		acked = make([][]string, writers)
	)
	for wr := range writers {
		g.Go(func() error {
			for i := range each {
				k := fmt.Sprintf("w%02d-%03d", wr, i)
				ctx, cancel := context.WithCancel(t.Context())
				if i%3 == 0 {
					go cancel() // races with the write: it may land at any point of it
				}
				err := w.Append(ctx, k, []byte("v-"+k))
				cancel()
				switch {
				case err == nil:
					acked[wr] = append(acked[wr], k)
				case !errors.Is(err, context.Canceled):
					return fmt.Errorf("append %s: %w", k, err)
				}
			}
			return nil
		})
	}
	require.NoError(t, g.Wait())
	got := map[string]string{}
	for _, r := range sweep(t, w) {
		got[r.key] = r.value
	}
	var n int
	for _, keys := range acked {
		for _, k := range keys {
			require.Equal(t, "v-"+k, got[k], "acknowledged append %s lost", k)
			n++
		}
	}
	st := w.Stats()
	require.Equal(t, uint64(len(got)), st.Appends, "every committed op is counted, and only those")
	require.Equal(t, st.Appends, st.Batches)
	require.GreaterOrEqual(t, len(got), n)
	require.GreaterOrEqual(t, n, writers*each/2)
}

// TestWALFullQueue: with the queue full a writer blocks, and leaves when its ctx ends without its op being
// written.
func TestWALFullQueue(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGatedDS()
		s, err := New(g, QueueLen(1))
		require.NoError(t, err)
		ctx, w := t.Context(), s.WAL()

		r1 := async(func() error { return w.Append(ctx, "c1", nil) })
		synctest.Wait() // c1 is being committed
		r2 := async(func() error { return w.Append(ctx, "c2", nil) })
		synctest.Wait() // c2 fills the queue
		ctx3, cancel3 := context.WithCancel(ctx)
		r3 := async(func() error { return w.Append(ctx3, "c3", nil) })
		synctest.Wait()
		select {
		case err := <-r3:
			t.Fatalf("a writer got past a full queue: %v", err)
		default:
		}
		cancel3()
		require.ErrorIs(t, <-r3, context.Canceled)

		close(g.release)
		require.NoError(t, <-r1)
		require.NoError(t, <-r2)
		require.NoError(t, s.Close())
		require.False(t, has(t, g, "/wal/c3"))
		require.Equal(t, []int{1, 1}, g.commitSizes())
	})
}

// TestWALCloseFullQueue: a writer blocked on a full queue is refused with ErrClosed by Close, while the request
// already queued is still committed.
func TestWALCloseFullQueue(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGatedDS()
		s, err := New(g, QueueLen(1))
		require.NoError(t, err)
		ctx, w := t.Context(), s.WAL()

		r1 := async(func() error { return w.Append(ctx, "c1", nil) })
		synctest.Wait() // c1 is being committed
		r2 := async(func() error { return w.Append(ctx, "c2", nil) })
		synctest.Wait() // c2 fills the queue
		r3 := async(func() error { return w.Append(ctx, "c3", nil) })
		synctest.Wait() // c3 waits for room
		closed := async(s.Close)
		require.ErrorIs(t, <-r3, ErrClosed)

		close(g.release)
		require.NoError(t, <-r1)
		require.NoError(t, <-r2)
		require.NoError(t, <-closed)
		require.True(t, has(t, g, "/wal/c2"))
		require.False(t, has(t, g, "/wal/c3"))
	})
}

// TestWALCloseDrains: Close refuses new writes at once but waits for the batch in flight and for everything
// already queued, so no accepted write is lost.
func TestWALCloseDrains(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGatedDS()
		s, err := New(g)
		require.NoError(t, err)
		ctx, w := t.Context(), s.WAL()

		r1 := async(func() error { return w.Append(ctx, "c1", nil) })
		synctest.Wait() // c1 is being committed
		r2 := async(func() error { return w.Append(ctx, "c2", nil) })
		synctest.Wait() // c2 is queued
		closed := async(s.Close)
		synctest.Wait() // Close is waiting for the commits

		require.ErrorIs(t, w.Append(ctx, "c3", nil), ErrClosed)
		select {
		case <-closed:
			t.Fatal("Close returned while a batch was in flight")
		default:
		}

		close(g.release)
		require.NoError(t, <-r1)
		require.NoError(t, <-r2)
		require.NoError(t, <-closed)
		require.True(t, has(t, g, "/wal/c2"))
		require.False(t, has(t, g, "/wal/c3"))
	})
}

// TestWALCommitErrorReachesWholeGroup: a failed commit fails every request of its batch (a batch is all or
// nothing, so the innocent request grouped with the bad one is not written either), and the WAL keeps going.
func TestWALCommitErrorReachesWholeGroup(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGatedDS()
		s, err := New(g)
		require.NoError(t, err)
		ctx, w := t.Context(), s.WAL()

		r0 := async(func() error { return w.Append(ctx, "c0", nil) })
		synctest.Wait() // c0 is being committed
		r1 := async(func() error { return w.Append(ctx, "c1", nil) })
		synctest.Wait()
		r2 := async(func() error { return w.Append(ctx, "fail-c2", nil) })
		synctest.Wait()
		close(g.release)
		require.NoError(t, <-r0)
		require.ErrorIs(t, <-r1, errInjected)
		require.ErrorIs(t, <-r2, errInjected)

		require.NoError(t, w.Append(ctx, "c3", nil))
		require.NoError(t, s.Close())
		require.Equal(t, []int{1, 2, 1}, g.commitSizes())
		require.Equal(t, WALStats{Appends: 2, Syncs: 2, Batches: 2}, w.Stats())
		require.False(t, has(t, g, "/wal/c1"))
		require.True(t, has(t, g, "/wal/c3"))
	})
}
