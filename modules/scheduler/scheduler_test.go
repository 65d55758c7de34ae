package scheduler

import (
	"context"
	"io"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// recorder collects the virtual times at which a job ran, relative to t0.
type recorder struct {
	mu  sync.Mutex
	t0  time.Time
	at  []time.Duration
	run func(ctx context.Context) // optional body
}

func newRecorder() *recorder { return &recorder{t0: time.Now()} }

func (r *recorder) fn(ctx context.Context) {
	r.mu.Lock()
	r.at = append(r.at, time.Since(r.t0))
	body := r.run
	r.mu.Unlock()
	if body != nil {
		body(ctx)
	}
}

func (r *recorder) times() []time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]time.Duration(nil), r.at...)
}

func closeOnCleanup(t *testing.T, s *Scheduler) {
	t.Cleanup(func() { require.NoError(t, s.Close()) })
}

func TestCadence(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := New(Options{Jitter: -1, Logger: quiet})
		closeOnCleanup(t, s)
		r := newRecorder()
		require.NoError(t, s.Add("telemetry", 10*time.Second, r.fn))
		s.Start(t.Context())
		s.Start(t.Context()) // idempotent: no second timer

		time.Sleep(35 * time.Second)
		synctest.Wait()
		require.Equal(t, []time.Duration{10 * time.Second, 20 * time.Second, 30 * time.Second}, r.times(),
			"first tick one interval after start, then a fixed cadence")
		st := s.Stats()["telemetry"]
		require.Equal(t, int64(3), st.Runs)
		require.Zero(t, st.Overruns)
		require.Equal(t, 10*time.Second, st.Every)
		require.Equal(t, r.t0.Add(30*time.Second), st.LastStart)
	})
}

// TestCadenceIgnoresRunTime: a run that takes part of the interval does not shift the next tick.
func TestCadenceIgnoresRunTime(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := New(Options{Jitter: -1, Logger: quiet})
		closeOnCleanup(t, s)
		r := newRecorder()
		r.run = func(context.Context) { time.Sleep(3 * time.Second) }
		require.NoError(t, s.Add("ping", 5*time.Second, r.fn))
		s.Start(t.Context())
		time.Sleep(21 * time.Second)
		synctest.Wait()
		require.Equal(t, []time.Duration{5 * time.Second, 10 * time.Second, 15 * time.Second, 20 * time.Second}, r.times())
		require.Equal(t, 3*time.Second, s.Stats()["ping"].LastDuration)
	})
}

func TestJitterBounds(t *testing.T) {
	for _, tc := range []struct {
		name   string
		jitter float64
		lo     time.Duration
	}{
		{"default 0.1", 0, 9 * time.Second},
		{"0.5", 0.5, 5 * time.Second},
		{"above 1 is 1", 7, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				s := New(Options{Jitter: tc.jitter, Rand: rand.New(rand.NewPCG(1, 2)), Logger: quiet})
				closeOnCleanup(t, s)
				const n = 40
				recs := make([]*recorder, n)
				for i := range recs {
					recs[i] = newRecorder()
					require.NoError(t, s.Add(string(rune('A'+i)), 10*time.Second, recs[i].fn))
				}
				s.Start(t.Context())
				time.Sleep(10*time.Second + 10*time.Second)
				synctest.Wait()
				distinct := map[time.Duration]bool{}
				for _, r := range recs {
					at := r.times()
					require.Len(t, at, 2, "one jittered first tick, then one interval later")
					require.Greater(t, at[0], tc.lo)
					require.LessOrEqual(t, at[0], 10*time.Second)
					require.Equal(t, at[0]+10*time.Second, at[1])
					distinct[at[0]] = true
				}
				require.Greater(t, len(distinct), n/2, "first ticks are spread, not in lockstep")
			})
		})
	}
}

// TestJitterSeeded: the same seed gives the same schedule.
func TestJitterSeeded(t *testing.T) {
	firsts := func() []time.Duration {
		var out []time.Duration
		synctest.Test(t, func(t *testing.T) {
			s := New(Options{Rand: rand.New(rand.NewPCG(42, 42)), Logger: quiet})
			recs := []*recorder{newRecorder(), newRecorder(), newRecorder()}
			for i, r := range recs {
				require.NoError(t, s.Add([]string{"a", "b", "c"}[i], time.Minute, r.fn))
			}
			s.Start(t.Context())
			time.Sleep(time.Minute)
			synctest.Wait()
			require.NoError(t, s.Close())
			for _, r := range recs {
				out = append(out, r.times()[0])
			}
		})
		return out
	}
	require.Equal(t, firsts(), firsts())
}

func TestNonOverlapCountsOverruns(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := New(Options{Jitter: -1, Logger: quiet})
		closeOnCleanup(t, s)
		var running, maxRunning atomic.Int32
		r := newRecorder()
		r.run = func(ctx context.Context) {
			maxRunning.Store(max(maxRunning.Load(), running.Add(1)))
			defer running.Add(-1)
			time.Sleep(25 * time.Second)
		}
		require.NoError(t, s.Add("slow", 10*time.Second, r.fn))
		s.Start(t.Context())

		// Ticks at 10 (run 10–35), 20 and 30 (dropped), 40 (run 40–65), 50 and 60 (dropped).
		time.Sleep(36 * time.Second)
		synctest.Wait()
		st := s.Stats()["slow"]
		require.Equal(t, int64(1), st.Runs)
		require.Equal(t, int64(2), st.Overruns)
		require.False(t, st.Running)
		require.Equal(t, 25*time.Second, st.LastDuration)

		time.Sleep(30 * time.Second) // t = 66
		synctest.Wait()
		st = s.Stats()["slow"]
		require.Equal(t, int64(2), st.Runs)
		require.Equal(t, int64(4), st.Overruns)
		require.Equal(t, []time.Duration{10 * time.Second, 40 * time.Second}, r.times())
		require.Equal(t, int32(1), maxRunning.Load())
	})
}

func TestTrigger(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := New(Options{Jitter: -1, Logger: quiet})
		closeOnCleanup(t, s)
		r := newRecorder()
		release := make(chan struct{})
		r.run = func(ctx context.Context) {
			select {
			case <-release:
			case <-ctx.Done():
			}
		}
		require.NoError(t, s.Add("health", 5*time.Second, r.fn))

		// Before Start: runs at once.
		require.NoError(t, s.Trigger("health"))
		synctest.Wait()
		require.Equal(t, []time.Duration{0}, r.times())
		require.True(t, s.Stats()["health"].Running)

		// While it runs: dropped, and not an overrun (overruns count ticks).
		require.ErrorIs(t, s.Trigger("health"), ErrJobRunning)
		require.Zero(t, s.Stats()["health"].Overruns)
		release <- struct{}{}
		synctest.Wait()
		require.Equal(t, int64(1), s.Stats()["health"].Runs)

		// The cadence is unaffected by a trigger.
		s.Start(t.Context())
		time.Sleep(2 * time.Second)
		require.NoError(t, s.Trigger("health")) // t = 2
		synctest.Wait()
		release <- struct{}{}
		time.Sleep(3 * time.Second) // t = 5: first tick
		synctest.Wait()
		release <- struct{}{}
		synctest.Wait()
		require.Equal(t, []time.Duration{0, 2 * time.Second, 5 * time.Second}, r.times())

		require.ErrorIs(t, s.Trigger("nope"), ErrUnknownJob)
		require.NoError(t, s.Close())
		require.ErrorIs(t, s.Trigger("health"), ErrClosed)
	})
}

func TestPoolBound(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := New(Options{MaxConcurrent: 2, Jitter: -1, Logger: quiet})
		closeOnCleanup(t, s)
		var running, maxRunning, runs atomic.Int32
		body := func(ctx context.Context) {
			maxRunning.Store(max(maxRunning.Load(), running.Add(1)))
			defer running.Add(-1)
			runs.Add(1)
			time.Sleep(4 * time.Second)
		}
		for _, n := range []string{"a", "b", "c", "d", "e"} {
			require.NoError(t, s.Add(n, 10*time.Second, body))
		}
		s.Start(t.Context())
		time.Sleep(10*time.Second + time.Millisecond)
		synctest.Wait()
		require.Equal(t, int32(2), running.Load(), "two of five run, three wait for a slot")
		waiting := 0
		for _, st := range s.Stats() {
			if st.Running && st.Runs == 0 {
				waiting++
			}
		}
		require.Equal(t, 5, waiting, "waiting for a slot counts as running")

		time.Sleep(8 * time.Second) // t ≈ 18: a,b then c,d done; e running
		synctest.Wait()
		require.Equal(t, int32(5), runs.Load())
		require.Equal(t, int32(2), maxRunning.Load())
	})
}

func TestPanicRecovered(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := New(Options{Jitter: -1, Logger: quiet})
		closeOnCleanup(t, s)
		var calls atomic.Int32
		require.NoError(t, s.Add("bad", 10*time.Second, func(context.Context) {
			calls.Add(1)
			panic("job exploded")
		}))
		good := newRecorder()
		require.NoError(t, s.Add("good", 10*time.Second, good.fn))
		s.Start(t.Context())
		time.Sleep(25 * time.Second)
		synctest.Wait()
		st := s.Stats()["bad"]
		require.Equal(t, int32(2), calls.Load(), "the job keeps its cadence after a panic")
		require.Equal(t, int64(2), st.Runs)
		require.Equal(t, int64(2), st.Panics)
		require.False(t, st.Running)
		require.Len(t, good.times(), 2)
		require.NoError(t, s.Trigger("bad"))
		synctest.Wait()
		require.Equal(t, int64(3), s.Stats()["bad"].Panics)
	})
}

func TestCloseWaitsAndCancels(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := New(Options{Jitter: -1, Logger: quiet})
		var finished atomic.Bool
		require.NoError(t, s.Add("long", 10*time.Second, func(ctx context.Context) {
			<-ctx.Done()
			time.Sleep(time.Second) // cleanup after cancellation
			finished.Store(true)
		}))
		waiter := newRecorder()
		require.NoError(t, s.Add("waiter", 10*time.Second, waiter.fn))
		s.Start(t.Context())
		time.Sleep(15 * time.Second)
		synctest.Wait()
		require.True(t, s.Stats()["long"].Running)

		start := time.Now()
		require.NoError(t, s.Close())
		require.True(t, finished.Load(), "Close waits for the running job")
		require.Equal(t, time.Second, time.Since(start))
		require.NoError(t, s.Close(), "idempotent")

		// Nothing ticks any more, nothing can be added or triggered.
		time.Sleep(time.Minute)
		require.Len(t, waiter.times(), 1)
		require.ErrorIs(t, s.Add("late", time.Second, func(context.Context) {}), ErrClosed)
		require.ErrorIs(t, s.Trigger("waiter"), ErrClosed)
		s.Start(t.Context()) // no-op after Close
		// synctest.Test itself fails if a goroutine of the bubble is left behind; TestMain runs goleak.
	})
}

// TestCloseWhileWaitingForSlot: a run still waiting for a pool slot is abandoned by Close.
func TestCloseWhileWaitingForSlot(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := New(Options{MaxConcurrent: 1, Jitter: -1, Logger: quiet})
		block := func(ctx context.Context) { <-ctx.Done() }
		require.NoError(t, s.Add("a", time.Second, block))
		require.NoError(t, s.Add("b", time.Second, block))
		require.NoError(t, s.Trigger("a"))
		require.NoError(t, s.Trigger("b"))
		synctest.Wait()
		require.NoError(t, s.Close())
		st := s.Stats()
		require.Equal(t, int64(1), st["a"].Runs+st["b"].Runs)
		require.False(t, st["a"].Running || st["b"].Running)
	})
}

func TestStartContextStops(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := New(Options{Jitter: -1, Logger: quiet})
		closeOnCleanup(t, s)
		var cancelled atomic.Bool
		r := newRecorder()
		r.run = func(ctx context.Context) { <-ctx.Done(); cancelled.Store(true) }
		require.NoError(t, s.Add("job", 10*time.Second, r.fn))
		ctx, cancel := context.WithCancel(t.Context())
		s.Start(ctx)
		time.Sleep(11 * time.Second)
		cancel()
		synctest.Wait()
		require.True(t, cancelled.Load())
		time.Sleep(time.Minute)
		require.Len(t, r.times(), 1)
		require.ErrorIs(t, s.Trigger("job"), ErrClosed)
	})
}

func TestAddAfterStart(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := New(Options{Jitter: -1, Logger: quiet})
		closeOnCleanup(t, s)
		s.Start(t.Context())
		time.Sleep(3 * time.Second)
		r := newRecorder()
		require.NoError(t, s.Add("late", 10*time.Second, r.fn))
		time.Sleep(21 * time.Second)
		synctest.Wait()
		require.Equal(t, []time.Duration{10 * time.Second, 20 * time.Second}, r.times())
	})
}

func TestAddValidates(t *testing.T) {
	s := New(Options{})
	defer s.Close()
	noop := func(context.Context) {}
	require.NoError(t, s.Add("a", time.Second, noop))
	require.ErrorIs(t, s.Add("a", time.Second, noop), ErrDuplicateJob)
	require.ErrorIs(t, s.Add("b", 0, noop), ErrInvalidJob)
	require.ErrorIs(t, s.Add("b", -time.Second, noop), ErrInvalidJob)
	require.ErrorIs(t, s.Add("b", time.Second, nil), ErrInvalidJob)
	require.Len(t, s.Stats(), 1)
	require.Equal(t, DefaultMaxConcurrent, cap(s.slots))
	require.Equal(t, DefaultJitter, s.jitter)
}
