package commands

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/modules/concurrency"
	"github.com/orknode/ork/protocols/envelope"
)

// Every scenario runs in a synctest bubble: time is virtual and only advances when every goroutine of the
// bubble is blocked, so backoffs and deadlines are exact and no test sleeps for real.

var ctx = context.Background()

func ms(t time.Time) int64 { return t.UnixMilli() }

func TestSuccess(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		r := h.submit1(t, dev("d1"))
		id := r.CommandID
		assert.Len(t, id, 36, "UUID v4")
		assert.Equal(t, Dispatched, r.State, "idle device, routable Worker: admitted as DISPATCHED in one write")
		assert.True(t, r.Delivered)
		assert.Equal(t, envelope.ScopeDevice, r.Scope)
		assert.JSONEq(t, `{}`, string(r.Params))

		got := h.wait(t, id)
		assert.Equal(t, Success, got.State)
		assert.JSONEq(t, `{"ok":true}`, string(got.Result))
		assert.Equal(t, 1, got.Attempts)
		assert.Equal(t, 3, got.Retries)
		assert.Equal(t, []walOp{{"put", id, Dispatched}, {"finish", id, Success}}, h.wal.opsFor(id),
			"two durable writes per command")
		assert.Zero(t, h.wal.walLen(), "terminal: WAL record deleted")
		assert.Equal(t, 1, h.sender.sendCount(id))

		done := h.doneCalls()
		require.Len(t, done, 1)
		assert.Equal(t, Success, done[0].State)

		st, err := h.m.Status(ctx, id)
		require.NoError(t, err)
		assert.Equal(t, Success, st.Status)
		assert.Equal(t, "d1", st.DeviceID)

		s := h.m.Stats()
		assert.Equal(t, map[string]int{Success: 1}, s.Finished)
		assert.Empty(t, s.States)
		assert.Zero(t, s.InFlight)
		assert.Zero(t, s.Queued)
	})
}

func TestQueuedThenPumped(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		h.fleet.set("w1", false)
		a := h.submit1(t, dev("d1"))
		b := h.submit1(t, dev("d1"))
		c := h.submit1(t, Record{DeviceID: "d9", WorkerID: "w2", Command: "x"})
		assert.Equal(t, Queued, a.State)
		synctest.Wait()
		assert.Equal(t, 3, h.m.Stats().Queued)
		assert.Equal(t, map[string]int{Queued: 3}, h.m.Stats().States)

		h.fleet.set("w1", true)
		h.m.Pump("w2") // not routable, and not the Worker of d1
		synctest.Wait()
		assert.Zero(t, h.sender.sendCount(a.CommandID))

		h.m.Pump("w1")
		h.wait(t, a.CommandID)
		h.wait(t, b.CommandID)
		assert.Equal(t, []string{a.CommandID, b.CommandID}, h.sender.sendOrder(), "FIFO per device")
		assert.Equal(t, []walOp{{"put", a.CommandID, Queued}, {"put", a.CommandID, Dispatched}, {"finish", a.CommandID, Success}},
			h.wal.opsFor(a.CommandID))
		cur, err := h.m.Get(ctx, c.CommandID)
		require.NoError(t, err)
		assert.Equal(t, Queued, cur.State, "w2 is still not routable")

		h.fleet.set("w2", true)
		h.m.PumpAll()
		h.wait(t, c.CommandID)
	})
}

func TestOneInFlightPerDevice(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		h.sender.send = func(ctx context.Context, rec Record, n int) (Reply, error) {
			time.Sleep(time.Second) // the device takes a second per command
			return Reply{Status: Success}, nil
		}
		start := time.Now()
		var ids []string
		for range 3 {
			ids = append(ids, h.submit1(t, dev("d1")).CommandID)
		}
		other := h.submit1(t, dev("d2")).CommandID
		for _, id := range ids {
			h.wait(t, id)
		}
		h.wait(t, other)
		assert.Equal(t, 3*time.Second, time.Since(start), "d1's commands ran one after the other")
		assert.False(t, h.sender.overlap, "never two sends on one device")
		assert.Equal(t, ids, filter(h.sender.sendOrder(), ids))
	})
}

func filter(order, keep []string) []string {
	var out []string
	for _, id := range order {
		for _, k := range keep {
			if id == k {
				out = append(out, id)
			}
		}
	}
	return out
}

func TestWorkerFailureNotRetried(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		h.sender.send = func(context.Context, Record, int) (Reply, error) {
			return Reply{Status: Failed, Error: "ERR_DEVICE_UNAVAILABLE: powered off", Result: json.RawMessage(`{"why":1}`)}, nil
		}
		id := h.submit1(t, dev("d1")).CommandID
		got := h.wait(t, id)
		assert.Equal(t, Failed, got.State)
		assert.Equal(t, "ERR_DEVICE_UNAVAILABLE: powered off", got.Error)
		assert.JSONEq(t, `{"why":1}`, string(got.Result))
		assert.Equal(t, 1, h.sender.sendCount(id))
		assert.Equal(t, 3, got.Retries, "no retry spent")
		assert.Equal(t, []walOp{{"put", id, Dispatched}, {"finish", id, Failed}}, h.wal.opsFor(id))
	})
}

func TestNotDeliveredRetriedWithBackoffThenExhausted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *Options) {
			o.MaxRetries = Retries(2)
			o.RetryBackoff = time.Second
			o.MaxBackoff = 10 * time.Second
		})
		defer h.m.Close()
		h.sender.send = func(ctx context.Context, rec Record, n int) (Reply, error) {
			if rec.CommandID == "first" {
				return Reply{}, errNoStream
			}
			return Reply{Status: Success}, nil
		}
		start := time.Now()
		r := dev("d1")
		r.CommandID = "first"
		h.submit1(t, r)
		// A command queued behind it must not overtake it while it waits out its backoff.
		time.Sleep(500 * time.Millisecond)
		second := h.submit1(t, dev("d1")).CommandID

		got := h.wait(t, "first")
		assert.Equal(t, Failed, got.State)
		assert.Equal(t, "ERR_MAX_RETRIES_EXHAUSTED: not delivered after 3 attempts", got.Error)
		assert.Equal(t, envelope.CodeMaxRetriesExhausted, envelope.ParseError(got.Error).Code)
		assert.Equal(t, 0, got.Retries)
		assert.Equal(t, 3, got.Attempts, "1 + MaxRetries sends")
		times := h.sender.sendTimes("first")
		require.Len(t, times, 3)
		assert.Equal(t, []time.Duration{0, time.Second, 3 * time.Second},
			[]time.Duration{times[0].Sub(start), times[1].Sub(start), times[2].Sub(start)}, "exponential backoff")
		assert.Equal(t, []walOp{
			{"put", "first", Dispatched}, {"put", "first", Queued},
			{"put", "first", Dispatched}, {"put", "first", Queued},
			{"put", "first", Dispatched}, {"finish", "first", Failed},
		}, h.wal.opsFor("first"))

		h.wait(t, second)
		st := h.sender.sendTimes(second)
		require.Len(t, st, 1)
		assert.False(t, st[0].Before(times[2]), "FIFO kept through the backoff")
	})
}

func TestNotDeliveredThenDelivered(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		h.sender.send = func(ctx context.Context, rec Record, n int) (Reply, error) {
			if n == 1 {
				return Reply{}, errNoStream
			}
			return Reply{Status: Success}, nil
		}
		id := h.submit1(t, dev("d1")).CommandID
		got := h.wait(t, id)
		assert.Equal(t, Success, got.State)
		assert.Equal(t, 2, got.Attempts)
		assert.Equal(t, 2, got.Retries)
	})
}

func TestNotDeliveredNoRetries(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *Options) { o.MaxRetries = Retries(0) })
		defer h.m.Close()
		h.sender.send = func(context.Context, Record, int) (Reply, error) { return Reply{}, errNoStream }
		id := h.submit1(t, dev("d1")).CommandID
		got := h.wait(t, id)
		assert.Equal(t, Failed, got.State)
		assert.Equal(t, 1, h.sender.sendCount(id), "MaxRetries 0 honoured")
	})
}

func TestNotDeliveredWorkerGoesAway(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		h.sender.send = func(ctx context.Context, rec Record, n int) (Reply, error) {
			if n == 1 {
				h.fleet.set("w1", false) // the Worker is found unreachable
				return Reply{}, errNoStream
			}
			return Reply{Status: Success}, nil
		}
		id := h.submit1(t, dev("d1")).CommandID
		time.Sleep(time.Hour)
		got, err := h.m.Get(ctx, id)
		require.NoError(t, err)
		assert.Equal(t, Queued, got.State, "after its backoff it waits in its queue for a routable Worker")
		assert.Equal(t, 1, h.sender.sendCount(id))
		h.fleet.set("w1", true)
		h.m.Pump("w1")
		assert.Equal(t, Success, h.wait(t, id).State)
	})
}

func TestOutcomeUnknownStatusSuccessNoResend(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		h.sender.send = func(context.Context, Record, int) (Reply, error) { return Reply{}, errNoReply }
		h.sender.status = func(context.Context, Record, int) (Reply, error) {
			return Reply{Status: Success, Result: json.RawMessage(`{"from":"status"}`)}, nil
		}
		id := h.submit1(t, dev("d1")).CommandID
		got := h.wait(t, id)
		assert.Equal(t, Success, got.State)
		assert.JSONEq(t, `{"from":"status"}`, string(got.Result))
		assert.Equal(t, 1, h.sender.sendCount(id), "never resent")
		assert.Equal(t, 1, h.sender.statusCount(id))
		assert.Equal(t, 3, got.Retries)
	})
}

func TestOutcomeUnknownStatusFailed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		h.sender.send = func(context.Context, Record, int) (Reply, error) { return Reply{}, errNoReply }
		h.sender.status = func(context.Context, Record, int) (Reply, error) {
			return Reply{Status: Failed, Error: "ERR_X"}, nil
		}
		id := h.submit1(t, dev("d1")).CommandID
		got := h.wait(t, id)
		assert.Equal(t, Failed, got.State)
		assert.Equal(t, "ERR_X", got.Error)
		assert.Equal(t, 1, h.sender.sendCount(id))
	})
}

func TestOutcomeUnknownStatusUnknownResendOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		h.sender.send = func(ctx context.Context, rec Record, n int) (Reply, error) {
			if n == 1 {
				return Reply{}, errNoReply
			}
			return Reply{Status: Success}, nil
		}
		h.sender.status = func(context.Context, Record, int) (Reply, error) {
			return Reply{Status: envelope.StatusUnknown}, nil
		}
		id := h.submit1(t, dev("d1")).CommandID
		got := h.wait(t, id)
		assert.Equal(t, Success, got.State)
		assert.Equal(t, 2, h.sender.sendCount(id), "resent exactly once")
		assert.Equal(t, 1, h.sender.statusCount(id))
		assert.Equal(t, 2, got.Retries, "the resend spent one retry")
		assert.Equal(t, 2, got.Attempts)
		assert.Equal(t, []walOp{
			{"put", id, Dispatched}, {"put", id, Queued}, {"put", id, Dispatched}, {"finish", id, Success},
		}, h.wal.opsFor(id))
	})
}

func TestOutcomeUnknownStatusFailingUntilDeadline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *Options) { o.CommandTimeout = 5 * time.Second })
		defer h.m.Close()
		causes := make(chan error, 1)
		h.sender.send = func(ctx context.Context, rec Record, n int) (Reply, error) {
			if rec.Command != "hang" {
				return Reply{Status: Success}, nil
			}
			<-ctx.Done() // the Worker never answers: the attempt times out
			causes <- context.Cause(ctx)
			return Reply{}, errNoReply
		}
		h.sender.status = func(context.Context, Record, int) (Reply, error) { return Reply{}, errors.New("unreachable") }
		start := time.Now()
		r := dev("d1")
		r.Command = "hang"
		r.Deadline = ms(start.Add(time.Minute))
		id := h.submit1(t, r).CommandID
		queued := h.submit1(t, dev("d1")).CommandID

		time.Sleep(30 * time.Second)
		cur, err := h.m.Get(ctx, id)
		require.NoError(t, err)
		assert.Equal(t, Executing, cur.State, "kept while the Worker is asked again")
		assert.Equal(t, 1, h.m.Stats().Unknown)
		assert.Zero(t, h.sender.sendCount(queued), "the device is held meanwhile")

		got := h.wait(t, id)
		assert.Equal(t, time.Minute, time.Since(start), "TIMEOUT at the command's deadline")
		assert.ErrorIs(t, <-causes, ErrAttemptTimeout)
		assert.Equal(t, Timeout, got.State)
		assert.Equal(t, envelope.CodeCommandOutcomeUnknown, envelope.ParseError(got.Error).Code)
		assert.Equal(t, 1, h.sender.sendCount(id), "never resent")
		assert.Greater(t, h.sender.statusCount(id), 3, "asked again with backoff")
		h.wait(t, queued)
	})
}

func TestOutcomeUnknownWithoutDeadlineUsesOutcomeTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *Options) { o.OutcomeTimeout = 2 * time.Minute })
		defer h.m.Close()
		h.sender.send = func(context.Context, Record, int) (Reply, error) { return Reply{}, errNoReply }
		h.sender.status = func(context.Context, Record, int) (Reply, error) { return Reply{}, errors.New("unreachable") }
		start := time.Now()
		id := h.submit1(t, dev("d1")).CommandID
		got := h.wait(t, id)
		assert.Equal(t, Timeout, got.State)
		assert.Equal(t, 2*time.Minute, time.Since(start))
	})
}

func TestOutcomeUnknownStillRunningThenAnswer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		h.sender.send = func(context.Context, Record, int) (Reply, error) { return Reply{}, errNoReply }
		h.sender.status = func(ctx context.Context, rec Record, n int) (Reply, error) {
			if n < 3 {
				return Reply{Status: Executing}, nil // still running on the Worker
			}
			return Reply{Status: Success}, nil
		}
		id := h.submit1(t, dev("d1")).CommandID
		got := h.wait(t, id)
		assert.Equal(t, Success, got.State)
		assert.Equal(t, 3, h.sender.statusCount(id))
		assert.Equal(t, 1, h.sender.sendCount(id))
	})
}

func TestOutcomeUnknownWaitsForRoutableWorker(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		h.sender.send = func(context.Context, Record, int) (Reply, error) {
			h.fleet.set("w1", false)
			return Reply{}, errNoReply
		}
		h.sender.status = func(ctx context.Context, rec Record, n int) (Reply, error) {
			if n == 1 {
				return Reply{}, errors.New("unreachable")
			}
			return Reply{Status: Success}, nil
		}
		id := h.submit1(t, dev("d1")).CommandID
		time.Sleep(time.Minute)
		assert.Equal(t, 1, h.sender.statusCount(id), "not asked while the Worker is not routable")
		h.fleet.set("w1", true)
		h.m.Pump("w1")
		assert.Equal(t, Success, h.wait(t, id).State)
		assert.Equal(t, 2, h.sender.statusCount(id))
	})
}

func TestCancelQueued(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		h.fleet.set("w1", false)
		a := h.submit1(t, dev("d1")).CommandID
		b := h.submit1(t, dev("d1")).CommandID

		ok, err := h.m.Cancel(ctx, a)
		require.NoError(t, err)
		assert.True(t, ok)
		st, err := h.m.Status(ctx, a)
		require.NoError(t, err)
		assert.Equal(t, Cancelled, st.Status)
		assert.Equal(t, envelope.CodeCancelled, st.Error)
		assert.Equal(t, []walOp{{"put", a, Queued}, {"finish", a, Cancelled}}, h.wal.opsFor(a))
		assert.Equal(t, 1, h.m.Stats().Queued)
		require.Len(t, h.doneCalls(), 1)

		ok, err = h.m.Cancel(ctx, a)
		assert.NoError(t, err)
		assert.False(t, ok, "already terminal")
		_, err = h.m.Cancel(ctx, "nope")
		assert.Equal(t, envelope.CodeCommandNotFound, envelope.CodeOf(err))
		_, err = h.m.Cancel(ctx, "")
		assert.Equal(t, envelope.CodeCommandIDRequired, envelope.CodeOf(err))

		h.fleet.set("w1", true)
		h.m.Pump("w1")
		h.wait(t, b)
		assert.Zero(t, h.sender.sendCount(a), "a cancelled command is never sent")
	})
}

func TestCancelDuringResendBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *Options) { o.RetryBackoff = time.Minute; o.MaxBackoff = time.Hour })
		defer h.m.Close()
		h.sender.send = func(ctx context.Context, rec Record, n int) (Reply, error) {
			if rec.Command == "flaky" {
				return Reply{}, errNoStream
			}
			return Reply{Status: Success}, nil
		}
		r := dev("d1")
		r.Command = "flaky"
		a := h.submit1(t, r).CommandID
		b := h.submit1(t, dev("d1")).CommandID
		synctest.Wait()
		cur, _ := h.m.Get(ctx, a)
		assert.Equal(t, Queued, cur.State)
		ok, err := h.m.Cancel(ctx, a)
		require.NoError(t, err)
		assert.True(t, ok, "QUEUED while it waits out its backoff: cancellable")
		start := time.Now()
		h.wait(t, b)
		assert.Zero(t, time.Since(start), "the device was released at once")
		time.Sleep(time.Hour)
		assert.Equal(t, 1, h.sender.sendCount(a))
	})
}

func TestCancelInFlightRefused(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		release := make(chan struct{})
		h.sender.send = func(context.Context, Record, int) (Reply, error) {
			<-release
			return Reply{Status: Success}, nil
		}
		id := h.submit1(t, dev("d1")).CommandID
		synctest.Wait()
		cur, _ := h.m.Get(ctx, id)
		assert.Equal(t, Executing, cur.State)
		ok, err := h.m.Cancel(ctx, id)
		assert.NoError(t, err)
		assert.False(t, ok)
		close(release)
		assert.Equal(t, Success, h.wait(t, id).State)
	})
}

func TestQueueFull(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *Options) { o.QueueDepth = 2 })
		defer h.m.Close()
		h.fleet.set("w1", false)
		h.submit1(t, dev("d1"))
		h.submit1(t, dev("d1"))
		writes := h.wal.opCount()

		_, err := h.m.Submit(ctx, dev("d1"))
		require.Error(t, err)
		assert.ErrorIs(t, err, concurrency.ErrQueueFull)
		assert.Equal(t, envelope.CodeQueueFull, envelope.CodeOf(err))
		assert.Equal(t, writes, h.wal.opCount(), "nothing written")

		// All or nothing: d3 has room but d1 does not.
		_, err = h.m.Submit(ctx, dev("d3"), dev("d1"))
		assert.ErrorIs(t, err, concurrency.ErrQueueFull)
		_, err = h.m.Submit(ctx, dev("d4"), dev("d4"), dev("d4"))
		assert.ErrorIs(t, err, concurrency.ErrQueueFull)
		assert.Equal(t, writes, h.wal.opCount(), "nothing written")
		assert.Equal(t, 2, h.m.Stats().Queued)
		_, err = h.m.Submit(ctx, dev("d4"), dev("d4"))
		assert.NoError(t, err)
	})
}

func TestQueueFullCountsOnlyQueued(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *Options) { o.QueueDepth = 1 })
		defer h.m.Close()
		release := make(chan struct{})
		h.sender.send = func(context.Context, Record, int) (Reply, error) {
			<-release
			return Reply{Status: Success}, nil
		}
		a := h.submit1(t, dev("d1")) // in flight
		b := h.submit1(t, dev("d1")) // queued
		assert.Equal(t, Dispatched, a.State)
		assert.Equal(t, Queued, b.State)
		_, err := h.m.Submit(ctx, dev("d1"))
		assert.ErrorIs(t, err, concurrency.ErrQueueFull)
		close(release)
		h.wait(t, b.CommandID)
	})
}

func TestExpiredWhileQueued(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		h.fleet.set("w1", false)
		start := time.Now()
		r := dev("d1")
		r.Deadline = ms(start.Add(5 * time.Second))
		id := h.submit1(t, r).CommandID
		got := h.wait(t, id)
		assert.Equal(t, 5*time.Second, time.Since(start))
		assert.Equal(t, Failed, got.State)
		assert.Equal(t, envelope.CodeCommandExpired, got.Error)
		assert.Zero(t, h.sender.sendCount(id))
		assert.Equal(t, []walOp{{"put", id, Queued}, {"finish", id, Failed}}, h.wal.opsFor(id))
		assert.Zero(t, h.m.Stats().Queued)
	})
}

func TestExpiredBehindBusyDevice(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		h.sender.send = func(context.Context, Record, int) (Reply, error) {
			time.Sleep(10 * time.Second)
			return Reply{Status: Success}, nil
		}
		start := time.Now()
		slow := h.submit1(t, dev("d1")).CommandID
		r := dev("d1")
		r.Deadline = ms(start.Add(5 * time.Second))
		late := h.submit1(t, r).CommandID
		lateRec := h.wait(t, late)
		assert.Equal(t, 5*time.Second, time.Since(start))
		assert.Equal(t, Failed, lateRec.State)
		assert.Equal(t, envelope.CodeCommandExpired, lateRec.Error)
		assert.Equal(t, Success, h.wait(t, slow).State)
		assert.Zero(t, h.sender.sendCount(late))
	})
}

func TestDeadlineNotReachedIsDispatched(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		r := dev("d1")
		r.Deadline = ms(time.Now().Add(time.Hour))
		id := h.submit1(t, r).CommandID
		assert.Equal(t, Success, h.wait(t, id).State)
		time.Sleep(2 * time.Hour) // the deadline timer fires on a finished command: nothing happens
		st, err := h.m.Status(ctx, id)
		require.NoError(t, err)
		assert.Equal(t, Success, st.Status)
	})
}

func TestIdempotencyKey(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *Options) { o.ResultTTL = time.Hour })
		defer h.m.Close()
		release := make(chan struct{})
		h.sender.send = func(context.Context, Record, int) (Reply, error) {
			<-release
			return Reply{Status: Success}, nil
		}
		r := dev("d1")
		r.IdempotencyKey = "k1"
		first := h.submit1(t, r)
		synctest.Wait()
		writes := h.wal.opCount()
		again := h.submit1(t, r)
		assert.Equal(t, first.CommandID, again.CommandID)
		assert.Equal(t, Executing, again.State, "the existing command, as it is now")
		assert.Equal(t, writes, h.wal.opCount(), "nothing new written")
		id, ok := h.m.LookupKey("k1")
		assert.True(t, ok)
		assert.Equal(t, first.CommandID, id)

		close(release)
		h.wait(t, first.CommandID)
		after := h.submit1(t, r)
		assert.Equal(t, first.CommandID, after.CommandID, "a finished command still deduplicates")
		assert.Equal(t, Success, after.State)

		time.Sleep(time.Hour)
		fresh := h.submit1(t, r)
		assert.NotEqual(t, first.CommandID, fresh.CommandID, "after ResultTTL the key is free")
		h.wait(t, fresh.CommandID)
		assert.Equal(t, 1, h.sender.sendCount(first.CommandID))
	})
}

func TestIdempotencyKeyConcurrentSubmits(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		gate := make(chan struct{})
		h.wal.putHook = func(string) { <-gate }
		r := dev("d1")
		r.IdempotencyKey = "k"
		var wg sync.WaitGroup
		ids := make([]string, 2)
		for i := range 2 {
			wg.Go(func() {
				out, err := h.m.Submit(ctx, r)
				if assert.NoError(t, err) {
					ids[i] = out[0].CommandID
				}
			})
		}
		synctest.Wait()
		close(gate)
		wg.Wait()
		assert.Equal(t, ids[0], ids[1])
		h.wait(t, ids[0])
		assert.Len(t, h.wal.opsFor(ids[0]), 2, "admitted once")

		// A waiter whose ctx ends gives up.
		gate2 := make(chan struct{})
		h.wal.putHook = func(string) { <-gate2 }
		r.IdempotencyKey = "k2"
		go h.m.Submit(ctx, r)
		synctest.Wait()
		c2, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		_, err := h.m.Submit(c2, r)
		assert.ErrorIs(t, err, context.DeadlineExceeded)
		close(gate2)
	})
}

func TestIdempotencyKeyFailedAdmissionFreesKey(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		boom := errors.New("disk full")
		h.wal.putErr = func(string, Record) error { return boom }
		r := dev("d1")
		r.IdempotencyKey = "k"
		_, err := h.m.Submit(ctx, r)
		assert.ErrorIs(t, err, boom)
		_, ok := h.m.LookupKey("k")
		assert.False(t, ok)
		h.wal.mu.Lock()
		h.wal.putErr = nil
		h.wal.mu.Unlock()
		out := h.submit1(t, r)
		assert.Equal(t, Success, h.wait(t, out.CommandID).State)
	})
}

func TestFanOut(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		h.sender.send = func(ctx context.Context, rec Record, n int) (Reply, error) {
			time.Sleep(time.Second)
			if rec.DeviceID == "d2" {
				return Reply{Status: Failed, Error: "ERR_X"}, nil
			}
			return Reply{Status: Success}, nil
		}
		parent := Record{Scope: envelope.ScopeWorker, WorkerID: "w1", Command: "reboot", IdempotencyKey: "fan"}
		out, err := h.m.Submit(ctx, parent, dev("d1"), dev("d2"), dev("d3"))
		require.NoError(t, err)
		require.Len(t, out, 4)
		p := out[0]
		assert.Equal(t, Executing, p.State, "a parent is never dispatched itself")
		require.Len(t, p.Children, 3)
		for i, c := range out[1:] {
			assert.Equal(t, p.CommandID, c.ParentID)
			assert.Equal(t, p.Children[i], c.CommandID)
			assert.Equal(t, envelope.ScopeDevice, c.Scope)
		}

		time.Sleep(500 * time.Millisecond)
		st, err := h.m.Status(ctx, p.CommandID)
		require.NoError(t, err)
		assert.Equal(t, Executing, st.Status)
		assert.Equal(t, p.Children, st.Children)

		dup, err := h.m.Submit(ctx, parent, dev("d1"), dev("d2"), dev("d3"))
		require.NoError(t, err)
		require.Len(t, dup, 4, "the key returns the parent and its children")
		assert.Equal(t, p.CommandID, dup[0].CommandID)

		got := h.wait(t, p.CommandID)
		assert.EqualValues(t, 1000, got.UpdatedAt-got.CreatedAt, "children ran in parallel, on their own devices")
		assert.Equal(t, Failed, got.State)
		assert.Equal(t, "ERR_COMMAND_FAILED: 1 of 3 children did not succeed (failed 1, timeout 0, cancelled 0)", got.Error)
		assert.JSONEq(t, `{"total":3,"success":2,"failed":1,"timeout":0,"cancelled":0}`, string(got.Result))
		for _, c := range p.Children {
			cr, err := h.m.Get(ctx, c)
			require.NoError(t, err)
			assert.True(t, cr.Terminal())
		}
		done := h.doneCalls()
		require.Len(t, done, 4)
		assert.Equal(t, p.CommandID, done[3].CommandID, "the parent ends after its children")
		assert.Equal(t, 3, h.sender.sendCount(p.Children[0])+h.sender.sendCount(p.Children[1])+h.sender.sendCount(p.Children[2]))
		assert.Zero(t, h.sender.sendCount(p.CommandID))
		assert.Zero(t, h.wal.walLen())
	})
}

func TestFanOutAllSucceed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		parent := Record{Scope: envelope.ScopeRack, Rack: "r1", Command: "setLed"}
		out, err := h.m.Submit(ctx, parent, dev("d1"), dev("d1"), dev("d2"))
		require.NoError(t, err)
		got := h.wait(t, out[0].CommandID)
		assert.Equal(t, Success, got.State)
		assert.Equal(t, envelope.ScopeRack, got.Scope)
		assert.JSONEq(t, `{"total":3,"success":3,"failed":0,"timeout":0,"cancelled":0}`, string(got.Result))
	})
}

func TestFanOutCancel(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		h.fleet.set("w1", false)
		out, err := h.m.Submit(ctx, Record{Scope: envelope.ScopeWorker, WorkerID: "w1", Command: "x"}, dev("d1"), dev("d2"))
		require.NoError(t, err)
		ok, err := h.m.Cancel(ctx, out[0].CommandID)
		require.NoError(t, err)
		assert.True(t, ok)
		got := h.wait(t, out[0].CommandID)
		assert.Equal(t, Failed, got.State)
		assert.Equal(t, "ERR_COMMAND_FAILED: 2 of 2 children did not succeed (failed 0, timeout 0, cancelled 2)", got.Error)
	})
}

func TestSubmitInvalid(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		withKey := dev("d2")
		withKey.IdempotencyKey = "k"
		orphan := dev("d1")
		orphan.ParentID = "p"
		neg := dev("d1")
		neg.Deadline = -1
		dupA, dupB := dev("d1"), dev("d2")
		dupA.CommandID, dupB.CommandID = "same", "same"
		for name, recs := range map[string][]Record{
			"nothing":             nil,
			"no command":          {{DeviceID: "d1"}},
			"parent alone":        {{Command: "x", Scope: envelope.ScopeWorker}},
			"child without dev":   {{Command: "x"}, {Command: "y"}},
			"key on a child":      {{Command: "x"}, withKey},
			"parent not in batch": {orphan},
			"negative deadline":   {neg},
			"duplicate ids":       {dupA, dupB},
		} {
			_, err := h.m.Submit(ctx, recs...)
			assert.ErrorIs(t, err, ErrInvalid, name)
		}
		r := dev("d1")
		r.CommandID = "taken"
		h.fleet.set("w1", false)
		h.submit1(t, r)
		_, err := h.m.Submit(ctx, r)
		assert.ErrorIs(t, err, ErrInvalid, "id in use by a queued command")
		h.fleet.set("w1", true)
		h.m.PumpAll()
		h.wait(t, "taken")
		_, err = h.m.Submit(ctx, r)
		assert.ErrorIs(t, err, ErrInvalid, "id in use by a retained result")
		assert.Zero(t, h.wal.opCount()-len(h.wal.opsFor("taken")))
	})
}

func TestWaitWakes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		release := make(chan struct{})
		h.sender.send = func(context.Context, Record, int) (Reply, error) {
			<-release
			return Reply{Status: Success}, nil
		}
		id := h.submit1(t, dev("d1")).CommandID
		var got envelope.CommandStatus
		returned := false
		var wg sync.WaitGroup
		for range 3 {
			wg.Go(func() {
				st, err := h.m.Wait(ctx, id)
				assert.NoError(t, err)
				assert.Equal(t, Success, st.Status)
			})
		}
		go func() {
			got, _ = h.m.Wait(ctx, id)
			returned = true
		}()
		synctest.Wait()
		assert.False(t, returned, "Wait blocks while the command runs")
		close(release)
		wg.Wait()
		synctest.Wait()
		assert.True(t, returned)
		assert.Equal(t, Success, got.Status)

		st, err := h.m.Wait(ctx, id)
		require.NoError(t, err)
		assert.Equal(t, Success, st.Status, "terminal: returns at once")
		_, err = h.m.Wait(ctx, "nope")
		assert.Equal(t, envelope.CodeCommandNotFound, envelope.CodeOf(err))
	})
}

func TestWaitContextEndsReturnsCurrentStatus(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		h.fleet.set("w1", false)
		id := h.submit1(t, dev("d1")).CommandID
		c, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		start := time.Now()
		st, err := h.m.Wait(c, id)
		require.NoError(t, err, "a Wait that runs out is not an error")
		assert.Equal(t, Queued, st.Status)
		assert.Equal(t, 3*time.Second, time.Since(start))
	})
}

func TestWaitWokenByClose(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		h.fleet.set("w1", false)
		id := h.submit1(t, dev("d1")).CommandID
		done := make(chan envelope.CommandStatus)
		go func() {
			st, _ := h.m.Wait(ctx, id)
			done <- st
		}()
		synctest.Wait()
		require.NoError(t, h.m.Close())
		assert.Equal(t, Queued, (<-done).Status)
	})
}

func TestResultsReadableThenExpire(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *Options) { o.ResultTTL = time.Hour })
		defer h.m.Close()
		id := h.submit1(t, dev("d1")).CommandID
		h.wait(t, id)
		time.Sleep(59 * time.Minute)
		st, err := h.m.Status(ctx, id)
		require.NoError(t, err, "finished commands stay readable (MDK §11.3 row 1)")
		assert.Equal(t, Success, st.Status)

		time.Sleep(time.Minute)
		_, err = h.m.Status(ctx, id)
		assert.Equal(t, envelope.CodeCommandNotFound, envelope.CodeOf(err), "hidden at ResultTTL even before compaction")
		n, err := h.m.Compact(ctx)
		require.NoError(t, err)
		assert.Equal(t, 0, n, "exactly TTL old: not yet older than the cut-off")
		time.Sleep(time.Millisecond)
		n, err = h.m.Compact(ctx)
		require.NoError(t, err)
		assert.Equal(t, 1, n)
		_, err = h.m.Status(ctx, "")
		assert.Equal(t, envelope.CodeCommandIDRequired, envelope.CodeOf(err))
	})
}

func TestWALPutFailure(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		boom := errors.New("disk on fire")
		h.wal.putErr = func(string, Record) error { return boom }
		for _, routable := range []bool{true, false} {
			h.fleet.set("w1", routable)
			r := dev("d1")
			r.CommandID = "c-fail"
			_, err := h.m.Submit(ctx, r)
			require.Error(t, err)
			assert.ErrorIs(t, err, boom)
			_, err = h.m.Status(ctx, "c-fail")
			assert.Equal(t, envelope.CodeCommandNotFound, envelope.CodeOf(err), "nothing admitted")
			s := h.m.Stats()
			assert.Zero(t, s.Queued)
			assert.Empty(t, s.States)
			assert.Zero(t, s.InFlight)
		}
		assert.Zero(t, h.sender.sendCount("c-fail"))

		h.wal.mu.Lock()
		h.wal.putErr = nil
		h.wal.mu.Unlock()
		h.fleet.set("w1", true)
		r := dev("d1")
		r.CommandID = "c-fail"
		out := h.submit1(t, r)
		assert.Equal(t, Dispatched, out.State, "the device was not left held")
		assert.Equal(t, Success, h.wait(t, "c-fail").State)
	})
}

func TestWALPutFailurePartialFanOut(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		boom := errors.New("boom")
		h.wal.putErr = func(id string, r Record) error {
			if r.DeviceID == "d2" {
				return boom
			}
			return nil
		}
		_, err := h.m.Submit(ctx, Record{Scope: envelope.ScopeWorker, WorkerID: "w1", Command: "x"}, dev("d1"), dev("d2"))
		assert.ErrorIs(t, err, boom)
		assert.Zero(t, h.wal.walLen(), "records that were written are withdrawn")
		h.wal.mu.Lock()
		for _, b := range h.wal.results {
			var r Record
			require.NoError(t, json.Unmarshal(b, &r))
			assert.Equal(t, Failed, r.State)
			assert.True(t, strings.HasPrefix(r.Error, envelope.CodeInternal+": not admitted"), r.Error)
		}
		assert.Len(t, h.wal.results, 2)
		h.wal.mu.Unlock()
		synctest.Wait()
		assert.Empty(t, h.sender.sendOrder(), "nothing was sent")
		assert.Empty(t, h.m.Stats().States)
	})
}

func TestWALDispatchPutFailureRetried(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *Options) { o.RetryBackoff = time.Second })
		defer h.m.Close()
		h.fleet.set("w1", false)
		id := h.submit1(t, dev("d1")).CommandID
		fails := 2
		h.wal.mu.Lock()
		h.wal.putErr = func(string, Record) error {
			if fails > 0 {
				fails--
				return errors.New("transient")
			}
			return nil
		}
		h.wal.mu.Unlock()
		h.fleet.set("w1", true)
		start := time.Now()
		h.m.Pump("w1")
		got := h.wait(t, id)
		assert.Equal(t, Success, got.State)
		assert.Equal(t, 3*time.Second, time.Since(start), "1 s then 2 s of backoff")
		assert.Equal(t, 3, got.Retries, "a kernel-side write failure spends no retry")
	})
}

func TestWALFinishFailureRetried(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *Options) { o.RetryBackoff = time.Second })
		defer h.m.Close()
		fails := 3
		h.wal.finishErr = func(string, Record) error {
			if fails > 0 {
				fails--
				return errors.New("transient")
			}
			return nil
		}
		id := h.submit1(t, dev("d1")).CommandID
		synctest.Wait()
		cur, _ := h.m.Get(ctx, id)
		assert.Equal(t, Executing, cur.State, "not terminal until durable")
		assert.Empty(t, h.doneCalls())
		got := h.wait(t, id)
		assert.Equal(t, Success, got.State)
		assert.Len(t, h.doneCalls(), 1)
	})
}

func TestCancelFinishFailureRestores(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		h.fleet.set("w1", false)
		id := h.submit1(t, dev("d1")).CommandID
		boom := errors.New("boom")
		h.wal.mu.Lock()
		h.wal.finishErr = func(string, Record) error { return boom }
		h.wal.mu.Unlock()
		ok, err := h.m.Cancel(ctx, id)
		assert.False(t, ok)
		assert.ErrorIs(t, err, boom)
		assert.Equal(t, 1, h.m.Stats().Queued, "back in its queue")
		h.wal.mu.Lock()
		h.wal.finishErr = nil
		h.wal.mu.Unlock()
		h.fleet.set("w1", true)
		h.m.Pump("w1")
		assert.Equal(t, Success, h.wait(t, id).State)
	})
}

func TestConcurrencyCap(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *Options) { o.Concurrency = 2 })
		defer h.m.Close()
		h.sender.send = func(context.Context, Record, int) (Reply, error) {
			time.Sleep(time.Second)
			return Reply{Status: Success}, nil
		}
		start := time.Now()
		var ids []string
		for _, d := range []string{"d1", "d2", "d3", "d4", "d5"} {
			ids = append(ids, h.submit1(t, dev(d)).CommandID)
		}
		synctest.Wait()
		s := h.m.Stats()
		assert.Equal(t, 2, s.InFlight)
		assert.Equal(t, 3, s.Queued)
		for _, id := range ids {
			h.wait(t, id)
		}
		assert.Equal(t, 2, h.sender.maxActive)
		assert.Equal(t, 3*time.Second, time.Since(start), "5 commands, 2 at a time")
	})
}

func TestOwnerRouting(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *Options) {
			o.Owner = func(dev string) (string, bool) {
				if dev == "gone" {
					return "", false
				}
				return "w1", true
			}
		})
		defer h.m.Close()
		r := dev("d1")
		r.WorkerID = "stale"
		got := h.wait(t, h.submit1(t, r).CommandID)
		assert.Equal(t, "w1", got.WorkerID, "routed to the current owner")
		gone := h.submit1(t, dev("gone"))
		assert.Equal(t, Queued, gone.State, "no owner: waits")
	})
}

func TestDrain(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		defer h.m.Close()
		release := make(chan struct{})
		h.sender.send = func(context.Context, Record, int) (Reply, error) {
			<-release
			return Reply{Status: Success}, nil
		}
		a := h.submit1(t, dev("d1")).CommandID
		synctest.Wait()
		c, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		assert.ErrorIs(t, h.m.Drain(c), context.DeadlineExceeded)
		assert.True(t, h.m.Stats().Draining)

		b := h.submit1(t, dev("d2"))
		assert.Equal(t, Queued, b.State, "draining: admitted, not dispatched")
		done := make(chan error)
		go func() { done <- h.m.Drain(ctx) }()
		synctest.Wait()
		close(release)
		assert.NoError(t, <-done)
		st, _ := h.m.Status(ctx, a)
		assert.Equal(t, Success, st.Status, "in-flight sends finish")
		h.m.PumpAll()
		synctest.Wait()
		rec, ok := h.wal.walRecord(t, b.CommandID)
		require.True(t, ok)
		assert.Equal(t, Queued, rec.State, "left in the WAL for the next start")
		assert.Zero(t, h.sender.sendCount(b.CommandID))
		assert.NoError(t, h.m.Drain(ctx), "nothing in flight: returns at once")
	})
}

func TestCloseAbortsAndKeepsWAL(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		h.sender.send = func(ctx context.Context, _ Record, _ int) (Reply, error) {
			<-ctx.Done()
			return Reply{}, ctx.Err()
		}
		id := h.submit1(t, dev("d1")).CommandID
		synctest.Wait()
		require.NoError(t, h.m.Close())
		require.NoError(t, h.m.Close(), "idempotent")
		rec, ok := h.wal.walRecord(t, id)
		require.True(t, ok)
		assert.Equal(t, Dispatched, rec.State)
		assert.True(t, rec.Delivered, "recovery will ask the Worker")
		_, err := h.m.Submit(ctx, dev("d2"))
		assert.ErrorIs(t, err, ErrClosed)
		_, err = h.m.Recover(ctx)
		assert.ErrorIs(t, err, ErrClosed)
	})
}

func TestCloseStopsTimers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		h.fleet.set("w1", false)
		r := dev("d1")
		r.Deadline = ms(time.Now().Add(time.Hour))
		h.submit1(t, r)
		h.sender.send = func(context.Context, Record, int) (Reply, error) { return Reply{}, errNoStream }
		h.fleet.set("w1", true)
		h.submit1(t, dev("d2")) // not delivered: parked behind a backoff timer
		synctest.Wait()
		require.NoError(t, h.m.Close())
		time.Sleep(2 * time.Hour)
		assert.Equal(t, 1, h.sender.sendCount(h.sender.sendOrder()[0]), "no timer acted after Close")
		assert.Equal(t, 2, h.wal.walLen())
	})
}

func TestExpiredDuringResendBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *Options) { o.RetryBackoff = time.Minute; o.MaxBackoff = time.Hour })
		defer h.m.Close()
		h.sender.send = func(context.Context, Record, int) (Reply, error) { return Reply{}, errNoStream }
		start := time.Now()
		r := dev("d1")
		r.Deadline = ms(start.Add(10 * time.Second))
		id := h.submit1(t, r).CommandID
		got := h.wait(t, id)
		assert.Equal(t, 10*time.Second, time.Since(start))
		assert.Equal(t, Failed, got.State)
		assert.Equal(t, envelope.CodeCommandExpired, got.Error)
		assert.Equal(t, 1, h.sender.sendCount(id))
	})
}

func TestDrainLeavesUnknownOutcomeToRecovery(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		release := make(chan struct{})
		h.sender.send = func(context.Context, Record, int) (Reply, error) {
			<-release
			return Reply{}, errNoReply
		}
		id := h.submit1(t, dev("d1")).CommandID
		synctest.Wait()
		done := make(chan error)
		go func() { done <- h.m.Drain(ctx) }()
		synctest.Wait()
		close(release)
		require.NoError(t, <-done)
		assert.Zero(t, h.sender.statusCount(id), "no new network call while draining")
		require.NoError(t, h.m.Close())
		rec, ok := h.wal.walRecord(t, id)
		require.True(t, ok)
		assert.Equal(t, Dispatched, rec.State)
		assert.True(t, rec.Delivered)
	})
}
