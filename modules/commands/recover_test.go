package commands

import (
	"context"
	"errors"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/protocols/envelope"
)

// stored builds a WAL record as an earlier run would have left it.
func stored(id, device, state string, created time.Time, mod ...func(*Record)) Record {
	r := Record{
		CommandID: id, State: state, Scope: envelope.ScopeDevice, DeviceID: device, WorkerID: "w1",
		Command: "reboot", Params: []byte(`{}`), RequesterID: "caller", Retries: 3,
		CreatedAt: created.UnixMilli(), UpdatedAt: created.UnixMilli(),
	}
	if state == Dispatched || state == Executing {
		r.Attempts, r.Delivered = 1, true
	}
	for _, f := range mod {
		f(&r)
	}
	return r
}

func notSent(r *Record) { r.Delivered = false }

func TestRecoverEveryPersistedState(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		t0 := time.Now()
		at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
		w := h.wal
		w.set(t, stored("q2", "d1", Queued, at(-1)))
		w.set(t, stored("q1", "d1", Queued, at(-3)))
		w.set(t, stored("du", "d2", Dispatched, at(-5), notSent))
		w.set(t, stored("eu", "d3", Executing, at(-5), notSent))
		w.set(t, stored("dd", "d4", Dispatched, at(-5)))
		w.set(t, stored("dq", "d4", Queued, at(-9))) // older, but d4's command in flight goes first
		w.set(t, stored("ed", "d5", Executing, at(-5)))
		w.set(t, stored("ex", "d6", Queued, at(-60), func(r *Record) { r.Deadline = at(-1).UnixMilli() }))
		w.set(t, stored("sx", "d8", Success, at(-5)))
		w.set(t, stored("p", "", Executing, at(-10), notSent, func(r *Record) {
			r.Scope, r.Children = envelope.ScopeWorker, []string{"c1", "c2"}
		}))
		w.setResult(t, stored("c1", "d9", Success, at(-10), func(r *Record) { r.ParentID = "p" }))
		w.set(t, stored("c2", "d7", Queued, at(-10), func(r *Record) { r.ParentID = "p" }))
		w.mu.Lock()
		w.wal["bad"] = []byte(`{not json`)
		w.mu.Unlock()

		h.sender.status = func(ctx context.Context, rec Record, n int) (Reply, error) {
			switch rec.CommandID {
			case "dd":
				return Reply{Status: Success, Result: []byte(`{"seen":true}`)}, nil
			case "ed":
				return Reply{Status: envelope.StatusUnknown}, nil
			}
			return Reply{}, errors.New("unexpected status question")
		}
		h.fleet.set("w1", false) // Workers not routable yet at recovery time
		rep, err := h.m.Recover(ctx)
		require.NoError(t, err)
		assert.Equal(t, 11, rep.Records)
		assert.Equal(t, map[string]int{Queued: 5, Dispatched: 2, Executing: 3, Success: 1}, rep.ByState)
		assert.Equal(t, 7, rep.Requeued, "q1 q2 du eu dq ex c2 (ex then expires at once)")
		assert.Equal(t, 2, rep.Unknown)
		assert.Equal(t, 1, rep.Parents)
		assert.Equal(t, 1, rep.Finished)
		assert.Equal(t, []string{"bad"}, rep.Skipped)

		synctest.Wait()
		assert.Empty(t, h.sender.sendOrder(), "nothing sent while no Worker is routable")
		assert.Zero(t, h.sender.statusCount("dd"))
		ex, err := h.m.Get(ctx, "ex")
		require.NoError(t, err)
		assert.Equal(t, Failed, ex.State)
		assert.Equal(t, envelope.CodeCommandExpired, ex.Error)
		sx, err := h.m.Get(ctx, "sx")
		require.NoError(t, err)
		assert.Equal(t, Success, sx.State, "terminal leftover moved to the results")

		h.fleet.set("w1", true)
		h.m.Pump("w1")
		for _, id := range []string{"q1", "q2", "du", "eu", "dd", "dq", "ed", "c2", "p"} {
			r := h.wait(t, id)
			assert.Equal(t, Success, r.State, id)
		}

		dd, _ := h.m.Get(ctx, "dd")
		assert.JSONEq(t, `{"seen":true}`, string(dd.Result), "outcome learnt from the Worker")
		assert.Zero(t, h.sender.sendCount("dd"), "delivered + SUCCESS: never resent")
		assert.Equal(t, 1, h.sender.statusCount("dd"))
		ed, _ := h.m.Get(ctx, "ed")
		assert.Equal(t, 1, h.sender.sendCount("ed"), "the Worker never saw it: resent once")
		assert.Equal(t, 2, ed.Retries)
		du, _ := h.m.Get(ctx, "du")
		assert.Equal(t, 3, du.Retries, "never delivered: no retry spent")
		assert.Equal(t, []string{"q1", "q2"}, filter(h.sender.sendOrder(), []string{"q1", "q2"}), "creation order")
		assert.Equal(t, 1, h.sender.sendCount("dq"))
		p, _ := h.m.Get(ctx, "p")
		assert.JSONEq(t, `{"total":2,"success":2,"failed":0,"timeout":0,"cancelled":0}`, string(p.Result))

		assert.Equal(t, 1, h.wal.walLen(), "only the undecodable record is left")
		assert.False(t, h.sender.overlap)
	})
}

func TestRecoverUnknownWaitsForRoutableWorker(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		h.wal.set(t, stored("a", "d1", Executing, time.Now()))
		h.wal.set(t, stored("b", "d1", Queued, time.Now().Add(time.Second)))
		h.sender.status = func(context.Context, Record, int) (Reply, error) {
			return Reply{Status: Failed, Error: "ERR_DEVICE_UNAVAILABLE"}, nil
		}
		h.fleet.set("w1", false)
		_, err := h.m.Recover(ctx)
		require.NoError(t, err)
		time.Sleep(5 * time.Minute)
		assert.Zero(t, h.sender.statusCount("a"))
		cur, _ := h.m.Get(ctx, "a")
		assert.Equal(t, Executing, cur.State)

		h.fleet.set("w1", true)
		h.m.Pump("w1")
		got := h.wait(t, "a")
		assert.Equal(t, Failed, got.State)
		assert.Equal(t, "ERR_DEVICE_UNAVAILABLE", got.Error)
		assert.Zero(t, h.sender.sendCount("a"))
		assert.Equal(t, Success, h.wait(t, "b").State)
	})
}

func TestRecoverUnknownNeverStranded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *Options) { o.OutcomeTimeout = 10 * time.Minute; o.CommandTimeout = 30 * time.Second })
		defer h.m.Close()
		start := time.Now()
		h.wal.set(t, stored("nodl", "d1", Executing, start))
		h.wal.set(t, stored("past", "d2", Dispatched, start, func(r *Record) { r.Deadline = start.Add(-time.Hour).UnixMilli() }))
		h.wal.set(t, stored("future", "d3", Executing, start, func(r *Record) { r.Deadline = start.Add(time.Minute).UnixMilli() }))
		h.fleet.set("w1", false) // the Worker never comes back
		_, err := h.m.Recover(ctx)
		require.NoError(t, err)

		past := h.wait(t, "past")
		assert.Equal(t, 30*time.Second, time.Since(start), "deadline passed while down: one CommandTimeout of grace")
		assert.Equal(t, Timeout, past.State)
		future := h.wait(t, "future")
		assert.Equal(t, time.Minute, time.Since(start))
		assert.Equal(t, Timeout, future.State)
		nodl := h.wait(t, "nodl")
		assert.Equal(t, 10*time.Minute, time.Since(start))
		assert.Equal(t, Timeout, nodl.State)
		assert.Equal(t, envelope.CodeCommandOutcomeUnknown, envelope.ParseError(nodl.Error).Code)
		assert.Empty(t, h.sender.sendOrder())
	})
}

func TestRecoverParentWhoseChildrenFinished(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		now := time.Now()
		h.wal.set(t, stored("p", "", Executing, now, notSent, func(r *Record) {
			r.Scope, r.Children = envelope.ScopeWorker, []string{"c1", "c2", "lost"}
		}))
		h.wal.setResult(t, stored("c1", "d1", Success, now))
		h.wal.setResult(t, stored("c2", "d2", Cancelled, now))
		rep, err := h.m.Recover(ctx)
		require.NoError(t, err)
		assert.Equal(t, 1, rep.Finished)
		p := h.wait(t, "p")
		assert.Equal(t, Failed, p.State)
		assert.JSONEq(t, `{"total":3,"success":1,"failed":1,"timeout":0,"cancelled":1}`, string(p.Result))
		require.Len(t, h.doneCalls(), 1)
	})
}

func TestRecoverIdempotencyIndex(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		wal := newFakeWAL()
		h := newHarness(t, func(o *Options) { o.WAL = sweepingWAL{wal}; o.ResultTTL = time.Hour })
		h.wal = wal
		defer h.m.Close()
		now := time.Now()
		wal.set(t, stored("open", "d1", Queued, now, func(r *Record) { r.IdempotencyKey = "k-open" }))
		wal.setResult(t, stored("done", "d2", Success, now, func(r *Record) { r.IdempotencyKey = "k-done" }))
		wal.setResult(t, stored("old", "d3", Success, now.Add(-2*time.Hour), func(r *Record) { r.IdempotencyKey = "k-old" }))
		h.fleet.set("w1", false)
		rep, err := h.m.Recover(ctx)
		require.NoError(t, err)
		assert.Equal(t, 2, rep.Keys)

		for key, want := range map[string]string{"k-open": "open", "k-done": "done"} {
			r := dev("d5")
			r.IdempotencyKey = key
			out := h.submit1(t, r)
			assert.Equal(t, want, out.CommandID, key)
		}
		r := dev("d5")
		r.IdempotencyKey = "k-old"
		assert.NotEqual(t, "old", h.submit1(t, r).CommandID, "expired result: the key is free")
	})
}

func TestRecoverSweepErrorAndTwice(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		h.wal.sweepErr = errors.New("io")
		_, err := h.m.Recover(ctx)
		assert.ErrorContains(t, err, "io")

		h.wal.sweepErr = nil
		h.fleet.set("w1", false)
		h.wal.set(t, stored("q", "d1", Queued, time.Now()))
		rep, err := h.m.Recover(ctx)
		require.NoError(t, err)
		assert.Equal(t, 1, rep.Requeued)
		rep, err = h.m.Recover(ctx)
		require.NoError(t, err)
		assert.Zero(t, rep.Requeued, "already in memory: skipped")
		assert.Equal(t, 1, h.m.Stats().Queued)
	})
}

// TestCrashAndRecover runs commands, "crashes" (Close with sends in flight) and recovers into a new Manager
// over the same WAL: every accepted command ends exactly once, and none whose outcome was unknown is resent.
func TestCrashAndRecover(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		hang := make(chan struct{})
		h.sender.send = func(ctx context.Context, rec Record, n int) (Reply, error) {
			select {
			case <-hang:
			case <-ctx.Done():
				return Reply{}, ctx.Err()
			}
			return Reply{Status: Success}, nil
		}
		var ids []string
		for _, d := range []string{"d1", "d1", "d2", "d3"} {
			ids = append(ids, h.submit1(t, dev(d)).CommandID)
		}
		synctest.Wait()
		require.NoError(t, h.m.Close()) // crash: three sends in flight, one queued

		h2 := newHarness(t, func(o *Options) { o.WAL = h.wal })
		h2.wal = h.wal
		defer h2.m.Close()
		h2.sender.status = func(ctx context.Context, rec Record, n int) (Reply, error) {
			return Reply{Status: Success}, nil // the Worker did run them
		}
		rep, err := h2.m.Recover(ctx)
		require.NoError(t, err)
		assert.Equal(t, 3, rep.Unknown)
		assert.Equal(t, 1, rep.Requeued)
		for _, id := range ids {
			assert.Equal(t, Success, h2.wait(t, id).State)
		}
		assert.Equal(t, []string{ids[1]}, h2.sender.sendOrder(), "only the queued one is sent")
		assert.Zero(t, h.wal.walLen())
	})
}
