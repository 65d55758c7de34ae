package node

import (
	"context"
	"fmt"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"golang.org/x/sync/errgroup"

	"github.com/orknode/ork/modules/health"
	"github.com/orknode/ork/modules/registry"
	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
)

// Scheduler job names.
const (
	jobHealth   = "health.ping"
	jobIdentity = "identity.refresh"
	jobTelem    = "telemetry.pull"
	jobCompact  = "compaction"
)

// maxPingsInFlight bounds one health tick's concurrency, and separately the
// immediate pings of pingSoon across the node.
const maxPingsInFlight = 64

// deadPingInterval spaces the pings of a DEAD Worker: each costs a full
// timeout, so pinging a thousand DEAD Workers every tick would stretch every
// health run (and delay the pings of live ones). A DEAD Worker that comes
// back is also noticed at once when it reconnects (discovery).
const deadPingInterval = 30 * time.Second

// duePing reports whether a Worker with health st is pinged at now: always,
// unless it is DEAD and failed less than deadPingInterval ago, since started
// (a failure from before this node started does not count: recovery pings
// every known Worker at once).
func duePing(st health.Status, now, started time.Time) bool {
	return st.State != envelope.HealthDead || st.LastFailure.Before(started) ||
		now.Sub(st.LastFailure) >= deadPingInterval
}

func (n *Node) addJobs() error {
	c := n.cfg.Cadences
	if c.HealthPingMs > 0 {
		if err := n.sched.Add(jobHealth, ms(c.HealthPingMs), n.pingAll); err != nil {
			return err
		}
	}
	if c.TelemetryPullMs > 0 {
		if err := n.sched.Add(jobTelem, ms(c.TelemetryPullMs), n.pullTelemetry); err != nil {
			return err
		}
	}
	if c.CompactionMs > 0 {
		if err := n.sched.Add(jobCompact, ms(c.CompactionMs), func(ctx context.Context) {
			if k, err := n.cmds.Compact(ctx); err != nil {
				log.Warn("compaction", "err", err)
			} else if k > 0 {
				log.Debug("compaction", "expired results", k)
			}
		}); err != nil {
			return err
		}
	}
	if c.IdentityRefreshMs > 0 {
		if err := n.sched.Add(jobIdentity, ms(c.IdentityRefreshMs), n.refreshIdentities); err != nil {
			return err
		}
	}
	return nil
}

// pingAll pings every READY Worker, at most maxPingsInFlight at a time; a
// DEAD one only every deadPingInterval (duePing).
func (n *Node) pingAll(ctx context.Context) {
	var g errgroup.Group
	g.SetLimit(maxPingsInFlight)
	now := n.now()
	for _, w := range n.reg.ReadyWorkers() {
		p, err := peer.Decode(w.PeerID)
		if err != nil || !duePing(n.health.State(w.WorkerID), now, n.started) {
			continue
		}
		g.Go(func() error { n.pingWorker(ctx, w.WorkerID, p); return nil })
	}
	_ = g.Wait()
}

// pingWorker sends one health.ping and feeds the outcome to the monitor.
func (n *Node) pingWorker(ctx context.Context, workerID string, p peer.ID) {
	ctx, cancel := context.WithTimeout(ctx, ms(n.cfg.Cadences.HealthTimeoutMs))
	defer cancel()
	var pong envelope.HealthPong
	err := n.callWorker(ctx, p, protocols.WorkerPing, envelope.ActionHealthPing, "", nil, &pong)
	if err == nil && pong.Status == "" {
		err = fmt.Errorf("health.pong without status")
	}
	if err != nil {
		n.health.Failure(n.ctx, workerID, err.Error())
		return
	}
	n.health.Success(n.ctx, workerID)
	n.reg.Touch(p.String(), n.now())
}

// pingSoon pings one Worker now rather than at the next tick (a Worker that
// just turned SICK or reconnected), at most one such ping per Worker and
// maxPingsInFlight in all at once: a ping that finds no free slot is skipped
// (the next tick pings the Worker), so a reconnect storm or a fleet-wide SICK
// cannot start a thousand pings and dials. A no-op once the node is closing.
func (n *Node) pingSoon(workerID string, p peer.ID) {
	if n.ctx.Err() != nil || n.regs == nil {
		return
	}
	if _, busy := n.pinging.LoadOrStore(workerID, struct{}{}); busy {
		return
	}
	started := n.regs.startPing(func() {
		defer n.pinging.Delete(workerID)
		n.pingWorker(n.ctx, workerID, p)
	})
	if !started {
		n.pinging.Delete(workerID)
	}
}

// refreshIdentities asks every routable READY Worker for its device list
// again, so devices added or removed at runtime are picked up (the original's
// state.pull job, renamed for what it does). SICK and DEAD Workers are left to
// the health pings: asking them would only wait out their timeouts.
func (n *Node) refreshIdentities(ctx context.Context) {
	var g errgroup.Group
	g.SetLimit(maxPingsInFlight)
	for _, w := range n.reg.ReadyWorkers() {
		p, err := peer.Decode(w.PeerID)
		if err != nil || !w.Routable() {
			continue
		}
		g.Go(func() error {
			cctx, cancel := context.WithTimeout(ctx, ms(n.cfg.Registration.TimeoutMs))
			defer cancel()
			var id envelope.IdentityResponse
			if err := n.callWorker(cctx, p, protocols.WorkerIdentity, envelope.ActionIdentityRequest, "", nil, &id); err != nil {
				n.health.Failure(n.ctx, w.WorkerID, err.Error())
				return nil
			}
			reason := "devices changed"
			switch {
			case id.WorkerID != w.WorkerID:
				reason = "workerId changed"
			case !sameDevices(w.DeclaredDevices, dedupDevices(id.Devices)):
			case n.conflictFreed(w):
				// Same answer, but a device it declared and another Worker
				// owned is free now: registering again claims it.
				reason = "conflicting device freed"
			default:
				return nil // nothing changed: stay READY, no churn
			}
			// Register again (identity → capabilities → READY).
			log.Info("worker identity changed, re-registering", "worker", w.WorkerID, "reason", reason, "devices", len(id.Devices))
			if _, err := n.reg.Failed(n.ctx, p.String(), reason); err != nil {
				log.Debug("identity refresh", "worker", w.WorkerID, "err", err)
			}
			n.regs.offer(p, "identity-refresh")
			return nil
		})
	}
	_ = g.Wait()
}

// conflictFreed reports whether a device w declared but does not own (a
// conflict) has no owner any more.
func (n *Node) conflictFreed(w registry.WorkerView) bool {
	if len(w.DeclaredDevices) == len(w.Devices) {
		return false
	}
	owned := make(map[string]bool, len(w.Devices))
	for _, d := range w.Devices {
		owned[d.DeviceID] = true
	}
	for _, d := range w.DeclaredDevices {
		if owned[d.DeviceID] {
			continue
		}
		if _, _, taken := n.reg.ResolveDevice(d.DeviceID); !taken {
			return true
		}
	}
	return false
}

// dedupDevices drops repeated deviceIds (the first declaration wins), as the
// registry does with an identity answer.
func dedupDevices(ds []envelope.DeviceInfo) []envelope.DeviceInfo {
	seen := make(map[string]bool, len(ds))
	out := make([]envelope.DeviceInfo, 0, len(ds))
	for _, d := range ds {
		if !seen[d.DeviceID] {
			seen[d.DeviceID] = true
			out = append(out, d)
		}
	}
	return out
}

// sameDevices reports whether two device lists hold the same devices.
func sameDevices(a, b []envelope.DeviceInfo) bool {
	if len(a) != len(b) {
		return false
	}
	m := make(map[envelope.DeviceInfo]int, len(a))
	for _, d := range a {
		m[d]++
	}
	for _, d := range b {
		if m[d] == 0 {
			return false
		}
		m[d]--
	}
	return true
}
