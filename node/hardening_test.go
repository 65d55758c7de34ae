package node

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/modules/commands"
	"github.com/orknode/ork/modules/dispatcher"
	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/protocols/rpc"
)

// newHardKernel is newMockKernel with mut applied to the kernel's config.
func newHardKernel(t *testing.T, mut func(*Config)) *mockKernel {
	t.Helper()
	return newMockKernel(t, mockOpts{config: mut})
}

// hangTelemetry makes the Worker's telemetry block until the returned
// function is called (also at cleanup).
func (hk *mockKernel) hangTelemetry() (release func()) {
	g := make(chan struct{})
	hk.telemGateMu.Lock()
	hk.telemGate = g
	hk.telemGateMu.Unlock()
	var once sync.Once
	release = func() {
		once.Do(func() {
			hk.telemGateMu.Lock()
			hk.telemGate = nil
			hk.telemGateMu.Unlock()
			close(g)
		})
	}
	hk.t.Cleanup(release)
	return release
}

// killWorker stops the Worker (its host stays up and linked, serving
// nothing; its open streams are reset) and waits until the kernel no longer
// routes to it.
func (hk *mockKernel) killWorker() {
	hk.t.Helper()
	require.NoError(hk.t, hk.w.Close())
	// Close removes the Worker's handlers but not the streams they serve:
	// drop the connection so that pings open new streams, and fail.
	require.NoError(hk.t, hk.mn.DisconnectPeers(hk.n.ID(), hk.wh.ID()))
	require.Eventually(hk.t, func() bool { return !hk.n.reg.Routable("w1") }, 10*time.Second, 10*time.Millisecond,
		"w1 still routable: %+v", hk.n.reg.List())
}

// serveFake replaces the Worker host's handler of proto with handlers, and
// counts the streams it serves.
func serveFake(t *testing.T, h host.Host, proto protocol.ID, handlers map[string]rpc.Handler) *atomic.Int64 {
	t.Helper()
	var streams atomic.Int64
	s := rpc.NewServer(rpc.ServerOptions{Sender: "test:fake-worker"}, handlers)
	h.SetStreamHandler(proto, func(st network.Stream) {
		streams.Add(1)
		s.HandleStream(st)
	})
	return &streams
}

// --- B4: a default deadline for commands ---------------------------------

func TestPlanRecordsDefaultDeadline(t *testing.T) {
	now := time.UnixMilli(1_700_000_000_000)
	plan := func(timeoutMs int64) dispatcher.Plan {
		return dispatcher.Plan{
			Scope:     envelope.ScopeDevice,
			TimeoutMs: timeoutMs,
			Children:  []dispatcher.Child{{DeviceID: "d1", WorkerID: "w1", Command: "c"}},
		}
	}
	recs, err := planRecords(plan(0), "caller", now, 10*time.Minute)
	require.NoError(t, err)
	require.Equal(t, now.Add(10*time.Minute).UnixMilli(), recs[0].Deadline, "no timeoutMs: the default deadline")

	recs, err = planRecords(plan(5_000), "caller", now, 10*time.Minute)
	require.NoError(t, err)
	require.Equal(t, now.Add(5*time.Second).UnixMilli(), recs[0].Deadline, "the caller's timeoutMs wins")

	recs, err = planRecords(plan(0), "caller", now, 0)
	require.NoError(t, err)
	require.Zero(t, recs[0].Deadline, "defaultDeadlineMs 0: no deadline")
}

// TestMocknetQueuedCommandExpiresAtDefaultDeadline: a command accepted for a
// device whose Worker is not routable (stopped: SICK, then DEAD) fails
// ERR_COMMAND_EXPIRED at commands.defaultDeadlineMs instead of staying
// QUEUED forever; a caller's own timeoutMs still wins.
func TestMocknetQueuedCommandExpiresAtDefaultDeadline(t *testing.T) {
	hk := newHardKernel(t, func(c *Config) { c.Commands.DefaultDeadlineMs = 400 })
	hk.killWorker()

	long := hk.submit(RoleOperate, "w1-d2", envelope.CommandRequest{Command: "setPowerLimit", Params: watts(2), TimeoutMs: 60_000})
	acc := hk.submit(RoleOperate, "w1-d1", envelope.CommandRequest{Command: "setPowerLimit", Params: watts(1)})
	require.Equal(t, envelope.StateQueued, acc.Status)

	st := hk.wait(acc.CommandID)
	require.Equal(t, envelope.StateFailed, st.Status, "%+v", st)
	require.Contains(t, st.Error, envelope.CodeCommandExpired)
	require.Zero(t, st.Attempts, "never sent")

	// The one with its own 60 s timeoutMs is still waiting for its Worker.
	require.Equal(t, envelope.StateQueued, hk.status(long.CommandID).Status)
	var c envelope.CommandCancelled
	require.NoError(t, hk.call(RoleOperate, protocols.KernelCommand, envelope.ActionCommandCancel, "",
		envelope.CommandRef{CommandID: long.CommandID}, &c))
	require.True(t, c.Cancelled)
}

func TestConfigDefaultDeadlineAndDiscoveryIntervals(t *testing.T) {
	cfg := DefaultConfig()
	require.Equal(t, int64(600_000), cfg.Commands.DefaultDeadlineMs)

	// init writes it.
	cfg = cfgtValid(t)
	cfg.DataDir = t.TempDir()
	require.NoError(t, cfg.Save())
	b, err := os.ReadFile(filepath.Join(cfg.DataDir, ConfigFile))
	require.NoError(t, err)
	require.Contains(t, string(b), `"defaultDeadlineMs": 600000`)

	// 0 is honoured (no default deadline); negative is refused.
	cfg = cfgtValid(t)
	cfg.Commands.DefaultDeadlineMs = 0
	require.NoError(t, cfg.Validate())
	cfg.Commands.DefaultDeadlineMs = -1
	require.ErrorContains(t, cfg.Validate(), "config commands.defaultDeadlineMs:")

	// Discovery intervals have no "0 disables": 0 is refused, not replaced.
	for _, tc := range []struct {
		field string
		mut   func(*Config)
	}{
		{"discovery.lookupIntervalMs", func(c *Config) { c.Discovery.LookupIntervalMs = 0 }},
		{"discovery.localScanMs", func(c *Config) { c.Discovery.LocalScanMs = 0 }},
	} {
		cfg := cfgtValid(t)
		tc.mut(&cfg)
		err := cfg.Validate()
		require.ErrorContains(t, err, "config "+tc.field+": must be positive")
	}
}

// --- B6: an error answer to command.status is not a result ---------------

// TestMocknetStatusErrorIsNotFinal: a command whose outcome is unknown (the
// Worker never answered command.request) is resolved by command.status; error
// answers to it (ERR_INTERNAL, ERR_UNKNOWN_ACTION) are asked again, not taken
// as the command's FAILED result.
func TestMocknetStatusErrorIsNotFinal(t *testing.T) {
	hk := newHardKernel(t, func(c *Config) { c.Commands.TimeoutMs = 800 })
	stop := make(chan struct{})
	t.Cleanup(func() { close(stop) })
	var asked atomic.Int64
	serveFake(t, hk.wh, protocols.WorkerCommand, map[string]rpc.Handler{
		envelope.ActionCommandRequest: func(ctx context.Context, _ peer.ID, _ *envelope.Envelope) (any, error) {
			select { // never answers in time: outcome unknown
			case <-stop:
			case <-ctx.Done():
			}
			return nil, envelope.Errf(envelope.CodeInternal, "late")
		},
		envelope.ActionCommandStatus: func(_ context.Context, _ peer.ID, req *envelope.Envelope) (any, error) {
			var ref envelope.CommandRef
			if err := req.DecodePayload(&ref); err != nil {
				return nil, err
			}
			switch asked.Add(1) {
			case 1:
				return nil, envelope.Errf(envelope.CodeInternal, "journal busy")
			case 2:
				return nil, envelope.Errf(envelope.CodeUnknownAction, "%s", envelope.ActionCommandStatus)
			}
			return envelope.CommandResult{CommandID: ref.CommandID, Status: envelope.StateSuccess, Result: json.RawMessage(`{"ok":true}`)}, nil
		},
	})

	acc := hk.submit(RoleOperate, "w1-d1", envelope.CommandRequest{Command: "setPowerLimit", Params: watts(1)})
	st := hk.wait(acc.CommandID)
	require.Equal(t, envelope.StateSuccess, st.Status, "%+v", st)
	require.JSONEq(t, `{"ok":true}`, string(st.Result))
	require.GreaterOrEqual(t, asked.Load(), int64(3))
}

func TestCommandSenderStatusErrorReturnsError(t *testing.T) {
	hk := newHardKernel(t, nil)
	serveFake(t, hk.wh, protocols.WorkerCommand, map[string]rpc.Handler{
		envelope.ActionCommandRequest: func(context.Context, peer.ID, *envelope.Envelope) (any, error) {
			return nil, envelope.Errf(envelope.CodeUnknownCommand, "nope")
		},
		envelope.ActionCommandStatus: func(context.Context, peer.ID, *envelope.Envelope) (any, error) {
			return nil, envelope.Errf(envelope.CodeInternal, "transient")
		},
	})
	s := commandSender{hk.n}
	rec := commands.Record{CommandID: "c1", DeviceID: "w1-d1", WorkerID: "w1", Command: "setPowerLimit"}
	ctx := context.Background()

	reply, err := s.Status(ctx, rec)
	require.Error(t, err, "reply %+v", reply)
	require.Equal(t, envelope.CodeInternal, envelope.CodeOf(err))
	require.False(t, notDelivered(err), "the Worker answered: not a resend")

	// A refused command.request is still the Worker's final word.
	reply, err = s.Send(ctx, rec)
	require.NoError(t, err)
	require.Equal(t, envelope.StateFailed, reply.Status)
	require.Contains(t, reply.Error, envelope.CodeUnknownCommand)

	require.True(t, hk.n.health.State("w1").LastFailure.IsZero(), "answers are not health failures: %+v", hk.n.health.State("w1"))
}

// --- B7: timeoutMs reaches the Worker; a slow command is not a sick Worker

func TestAttemptTiming(t *testing.T) {
	now := time.UnixMilli(1_700_000_000_000)
	budget, wt, ok := attemptTiming(30*time.Second, 0, now)
	require.True(t, ok)
	require.Equal(t, 30*time.Second, budget)
	require.Equal(t, 28*time.Second, wt)

	// The command's deadline is nearer: it bounds the attempt.
	budget, wt, ok = attemptTiming(30*time.Second, now.Add(3*time.Second).UnixMilli(), now)
	require.True(t, ok)
	require.Equal(t, 3*time.Second, budget)
	require.Equal(t, 2700*time.Millisecond, wt)

	// Small budgets keep half for the Worker at least.
	budget, wt, ok = attemptTiming(300*time.Millisecond, 0, now)
	require.True(t, ok)
	require.Equal(t, 300*time.Millisecond, budget)
	require.Equal(t, 150*time.Millisecond, wt)

	_, _, ok = attemptTiming(30*time.Second, now.Add(-time.Second).UnixMilli(), now)
	require.False(t, ok, "deadline passed")
}

// TestMocknetSlowCommandTimesOutOnWorker: the Worker is told the attempt's
// timeoutMs, so a command running longer ends FAILED ERR_COMMAND_EXPIRED by
// the Worker's own answer; and the delivered-but-slow command does not count
// against the Worker's health.
func TestMocknetSlowCommandTimesOutOnWorker(t *testing.T) {
	hk := newHardKernel(t, func(c *Config) { c.Commands.TimeoutMs = 1500 })
	hk.block()
	t.Cleanup(hk.unblock)

	acc := hk.submit(RoleOperate, "w1-d1", envelope.CommandRequest{Command: "setPowerLimit", Params: watts(1)})
	st := hk.wait(acc.CommandID)
	require.Equal(t, envelope.StateFailed, st.Status, "%+v", st)
	require.Contains(t, st.Error, envelope.CodeCommandExpired)
	require.Equal(t, 1, st.Attempts)

	h := hk.n.health.State("w1")
	require.True(t, h.LastFailure.IsZero(), "a slow command is not a health failure: %+v", h)
	require.True(t, hk.n.reg.Routable("w1"))
}

// TestCommandSenderTimeoutIsNotHealthFailure: a delivered command.request
// with no answer within the attempt is an unknown outcome, not a Worker
// failure, and the wait is bounded by commands.timeoutMs.
func TestCommandSenderTimeoutIsNotHealthFailure(t *testing.T) {
	hk := newHardKernel(t, func(c *Config) { c.Commands.TimeoutMs = 500 })
	stop := make(chan struct{})
	t.Cleanup(func() { close(stop) })
	var got atomic.Int64
	serveFake(t, hk.wh, protocols.WorkerCommand, map[string]rpc.Handler{
		envelope.ActionCommandRequest: func(ctx context.Context, _ peer.ID, req *envelope.Envelope) (any, error) {
			var wc workerCommand
			_ = req.DecodePayload(&wc)
			got.Store(wc.TimeoutMs)
			select {
			case <-stop:
			case <-ctx.Done():
			}
			return nil, envelope.Errf(envelope.CodeInternal, "late")
		},
	})
	s := commandSender{hk.n}
	rec := commands.Record{CommandID: "c1", DeviceID: "w1-d1", WorkerID: "w1", Command: "setPowerLimit"}

	start := time.Now()
	_, err := s.Send(context.Background(), rec)
	require.Error(t, err)
	require.False(t, notDelivered(err), "%v", err)
	require.Less(t, time.Since(start), 5*time.Second, "bounded by commands.timeoutMs, not the rpc CallTimeout")
	require.Positive(t, got.Load())
	require.Less(t, got.Load(), int64(500), "the Worker is told a little less than the kernel waits")
	require.True(t, hk.n.health.State("w1").LastFailure.IsZero(), "%+v", hk.n.health.State("w1"))

}

// --- B5: telemetry ------------------------------------------------------

func TestPullTimeout(t *testing.T) {
	for _, tc := range []struct {
		cadenceMs int64
		want      time.Duration
	}{
		{10_000, 5 * time.Second},
		{4_000, 2 * time.Second},
		{2_000, time.Second},
		{500, time.Second},
		{0, 5 * time.Second}, // scheduled pull disabled: caller pulls still bounded
	} {
		n := &Node{cfg: DefaultConfig()}
		n.cfg.Cadences.TelemetryPullMs = tc.cadenceMs
		require.Equal(t, tc.want, puller{n}.pullTimeout(), "cadence %d ms", tc.cadenceMs)
	}
}

// TestMocknetHungWorkerTelemetryIsBounded: a Worker whose telemetry hangs
// costs a scheduled tick (and a caller's live pull) one pull timeout, not the
// rpc client's 30 s.
func TestMocknetHungWorkerTelemetryIsBounded(t *testing.T) {
	hk := newHardKernel(t, func(c *Config) { c.Cadences.TelemetryPullMs = 2_000 }) // pull timeout 1 s
	hk.hangTelemetry()

	start := time.Now()
	hk.n.pullTelemetry(context.Background())
	require.Less(t, time.Since(start), 4*time.Second, "one tick waited for a hung Worker")

	start = time.Now()
	_, err := puller{hk.n}.PullWorker(context.Background(), "w1")
	require.Error(t, err)
	require.Less(t, time.Since(start), 4*time.Second)
}

// TestMocknetTelemetryNotRoutable: for a Worker that is not routable the
// last snapshots are served whatever their age and whatever maxAgeMs says,
// the Worker is never dialled, and with no snapshot the answer is
// ERR_WORKER_NOT_ROUTABLE; a fleet pull leaves that Worker out.
func TestMocknetTelemetryNotRoutable(t *testing.T) {
	hk := newHardKernel(t, func(c *Config) { c.Cadences.TelemetryPullMs = 0 })
	var before envelope.DeviceTelemetry
	require.NoError(t, hk.call(RoleRead, protocols.KernelTelemetry, envelope.ActionTelemetryPull, "",
		envelope.TelemetryPull{DeviceID: "w1-d1", MaxAgeMs: i64(0)}, &before))
	require.NotEmpty(t, before.Metrics)

	hk.killWorker()
	dials := serveFake(t, hk.wh, protocols.WorkerTelemetry, map[string]rpc.Handler{
		envelope.ActionTelemetryPull: func(context.Context, peer.ID, *envelope.Envelope) (any, error) {
			return nil, envelope.Errf(envelope.CodeInternal, "should not be called")
		},
	})

	var dev envelope.DeviceTelemetry
	require.NoError(t, hk.call(RoleRead, protocols.KernelTelemetry, envelope.ActionTelemetryPull, "",
		envelope.TelemetryPull{DeviceID: "w1-d1", MaxAgeMs: i64(0)}, &dev))
	require.Equal(t, "w1-d1", dev.DeviceID)
	require.JSONEq(t, string(before.Metrics), string(dev.Metrics), "the last snapshot")
	require.Equal(t, before.Timestamp, dev.Timestamp)

	var b envelope.TelemetryBatch
	require.NoError(t, hk.call(RoleRead, protocols.KernelTelemetry, envelope.ActionTelemetryPull, "",
		envelope.TelemetryPull{WorkerID: "w1", MaxAgeMs: i64(0)}, &b))
	require.ElementsMatch(t, []string{"w1-d1", "w1-d2"}, telemetryIDs(b.Devices))

	// The fleet view lists routable Workers only.
	var fleet envelope.TelemetryBatch
	require.NoError(t, hk.call(RoleRead, protocols.KernelTelemetry, envelope.ActionTelemetryPull, "",
		envelope.TelemetryPull{MaxAgeMs: i64(0)}, &fleet))
	require.Empty(t, fleet.Devices)

	// A non-metrics query cannot be served from snapshots.
	err := hk.call(RoleRead, protocols.KernelTelemetry, envelope.ActionTelemetryPull, "",
		envelope.TelemetryPull{DeviceID: "w1-d1", Query: map[string]any{"type": "pools"}}, nil)
	require.Equal(t, envelope.CodeWorkerNotRoutable, envelope.CodeOf(err), "%v", err)

	// No snapshot left: ERR_WORKER_NOT_ROUTABLE, still without dialling.
	hk.n.telem.Forget("w1")
	err = hk.call(RoleRead, protocols.KernelTelemetry, envelope.ActionTelemetryPull, "",
		envelope.TelemetryPull{DeviceID: "w1-d1"}, nil)
	require.Equal(t, envelope.CodeWorkerNotRoutable, envelope.CodeOf(err), "%v", err)
	err = hk.call(RoleRead, protocols.KernelTelemetry, envelope.ActionTelemetryPull, "",
		envelope.TelemetryPull{WorkerID: "w1"}, nil)
	require.Equal(t, envelope.CodeWorkerNotRoutable, envelope.CodeOf(err), "%v", err)

	require.Zero(t, dials.Load(), "a Worker that is not routable was dialled")
}

// TestMocknetWorkerScopeQueryGoesToDevices: a worker-scope telemetry.pull
// with a non-metrics query is passed to each device live (here the Worker
// knows no such query type, and says so per device) instead of being
// silently answered with metrics.
func TestMocknetWorkerScopeQueryGoesToDevices(t *testing.T) {
	hk := newHardKernel(t, nil)
	var b envelope.TelemetryBatch
	require.NoError(t, hk.call(RoleRead, protocols.KernelTelemetry, envelope.ActionTelemetryPull, "",
		envelope.TelemetryPull{WorkerID: "w1", Query: map[string]any{"type": "bogus"}}, &b))
	require.Equal(t, "w1", b.WorkerID)
	require.ElementsMatch(t, []string{"w1-d1", "w1-d2"}, telemetryIDs(b.Devices))
	for _, d := range b.Devices {
		require.Contains(t, d.Error, envelope.CodeUnknownQueryType, "%+v", d)
		require.Empty(t, d.Metrics)
	}
}

// --- R5: state.pull is checked and bounded ------------------------------

func TestMocknetStatePullBounded(t *testing.T) {
	hk := newHardKernel(t, nil)
	release := make(chan struct{})
	var releaseOnce sync.Once
	unblock := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(unblock)
	var inFlight, peak atomic.Int64
	serveFake(t, hk.wh, protocols.WorkerState, map[string]rpc.Handler{
		envelope.ActionStatePull: func(ctx context.Context, _ peer.ID, _ *envelope.Envelope) (any, error) {
			n := inFlight.Add(1)
			defer inFlight.Add(-1)
			for {
				p := peak.Load()
				if n <= p || peak.CompareAndSwap(p, n) {
					break
				}
			}
			select {
			case <-release:
			case <-ctx.Done():
			}
			return map[string]any{"ok": true}, nil
		},
	})
	req := func() *envelope.Envelope {
		e, err := envelope.NewRequest(envelope.ActionStatePull, "test", envelope.StatePull{DeviceID: "w1-d1"})
		require.NoError(t, err)
		e.DeviceID = "w1-d1"
		return e
	}

	var wg sync.WaitGroup
	errs := make(chan error, maxStatePulls)
	for range maxStatePulls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := hk.n.handleStatePull(ctx, "", req())
			errs <- err
		}()
	}
	require.Eventually(t, func() bool { return inFlight.Load() == maxStatePulls }, 10*time.Second, 5*time.Millisecond)

	// One more: no slot within its context.
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	_, err := hk.n.handleStatePull(ctx, "", req())
	cancel()
	require.Equal(t, envelope.CodeBusy, envelope.CodeOf(err), "%v", err)

	unblock()
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	require.LessOrEqual(t, peak.Load(), int64(maxStatePulls))

	// A Worker that is not routable is not dialled.
	hk.killWorker()
	_, err = hk.n.handleStatePull(context.Background(), "", req())
	require.Equal(t, envelope.CodeWorkerNotRoutable, envelope.CodeOf(err), "%v", err)
}
