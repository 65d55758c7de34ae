package node

import (
	"context"
	"fmt"

	"github.com/libp2p/go-libp2p/core/peer"
	"golang.org/x/sync/errgroup"

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

// maxPingsInFlight bounds one health tick's concurrency.
const maxPingsInFlight = 64

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

// pingAll pings every READY Worker, at most maxPingsInFlight at a time.
func (n *Node) pingAll(ctx context.Context) {
	var g errgroup.Group
	g.SetLimit(maxPingsInFlight)
	for _, w := range n.reg.ReadyWorkers() {
		p, err := peer.Decode(w.PeerID)
		if err != nil {
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
// just turned SICK or reconnected), at most one such ping per Worker at once.
func (n *Node) pingSoon(workerID string, p peer.ID) {
	if _, busy := n.pinging.LoadOrStore(workerID, struct{}{}); busy {
		return
	}
	n.wg.Go(func() {
		defer n.pinging.Delete(workerID)
		n.pingWorker(n.ctx, workerID, p)
	})
}

// refreshIdentities asks every READY Worker for its device list again, so
// devices added or removed at runtime are picked up (the original's state.pull
// job, renamed for what it does).
func (n *Node) refreshIdentities(ctx context.Context) {
	var g errgroup.Group
	g.SetLimit(maxPingsInFlight)
	for _, w := range n.reg.ReadyWorkers() {
		p, err := peer.Decode(w.PeerID)
		if err != nil {
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
			if sameDevices(w.Devices, id.Devices) && id.WorkerID == w.WorkerID {
				return nil // nothing changed: stay READY, no churn
			}
			// Devices changed: register again (identity → capabilities → READY).
			log.Info("worker devices changed, re-registering", "worker", w.WorkerID, "devices", len(id.Devices))
			if _, err := n.reg.Failed(n.ctx, p.String(), "devices changed"); err != nil {
				log.Debug("identity refresh", "worker", w.WorkerID, "err", err)
			}
			n.regs.offer(p, "identity-refresh")
			return nil
		})
	}
	_ = g.Wait()
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
