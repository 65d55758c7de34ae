package node

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
)

// registrar runs the registration pipeline of DESIGN §4: discovered peer →
// identity → capabilities → READY, deduplicated by peer ID, bounded in
// concurrency (a reconnect storm of a thousand Workers is absorbed), retried
// with backoff on failure so no Worker is ever stuck half-way.
type registrar struct {
	n   *Node
	sem chan struct{}

	mu     sync.Mutex
	peers  map[peer.ID]*regEntry
	closed bool
	wg     sync.WaitGroup
}

type regEntry struct {
	inFlight bool
	attempts int
	nextAt   time.Time
	timer    *time.Timer
}

func newRegistrar(n *Node) *registrar {
	return &registrar{
		n:     n,
		sem:   make(chan struct{}, n.cfg.Registration.MaxConcurrent),
		peers: map[peer.ID]*regEntry{},
	}
}

// offer asks for p to be registered unless it already is, is being
// registered, or is waiting out a backoff (its retry timer will come back).
func (r *registrar) offer(p peer.ID, source string) {
	if p == r.n.host.ID() {
		return
	}
	if w, ok := r.n.reg.ByPeer(p.String()); ok && w.State == envelope.WorkerReady {
		// Known and ready: no re-registration churn. If it was unhealthy and
		// is back, ping it now rather than at the next tick.
		if r.n.health.State(w.WorkerID).State != envelope.HealthHealthy {
			r.n.pingSoon(w.WorkerID, p)
		}
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	e := r.peers[p]
	if e == nil {
		e = &regEntry{}
		r.peers[p] = e
	}
	if e.inFlight || time.Now().Before(e.nextAt) {
		return
	}
	e.inFlight = true
	r.wg.Add(1)
	go r.run(p, e, source)
}

func (r *registrar) run(p peer.ID, e *regEntry, source string) {
	defer r.wg.Done()
	ctx := r.n.ctx
	select {
	case r.sem <- struct{}{}:
	case <-ctx.Done():
		return
	}
	err := r.register(ctx, p)
	<-r.sem

	r.mu.Lock()
	defer r.mu.Unlock()
	e.inFlight = false
	if err == nil {
		e.attempts = 0
		e.nextAt = time.Time{}
		return
	}
	if ctx.Err() != nil || r.closed {
		return
	}
	e.attempts++
	backoff := r.backoff(e.attempts)
	e.nextAt = time.Now().Add(backoff)
	log.Debug("registration failed, will retry", "peer", p, "source", source, "attempt", e.attempts, "in", backoff, "err", err)
	if e.timer != nil {
		e.timer.Stop()
	}
	e.timer = time.AfterFunc(backoff, func() { r.offer(p, "retry") })
}

// backoff doubles from the minimum to the maximum, with ±20 % jitter.
func (r *registrar) backoff(attempt int) time.Duration {
	minB, maxB := ms(r.n.cfg.Registration.BackoffMinMs), ms(r.n.cfg.Registration.BackoffMaxMs)
	d := minB
	for i := 1; i < attempt && d < maxB; i++ {
		d *= 2
	}
	d = min(d, maxB)
	return time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
}

func (r *registrar) register(ctx context.Context, p peer.ID) (err error) {
	ctx, cancel := context.WithTimeout(ctx, ms(r.n.cfg.Registration.TimeoutMs))
	defer cancel()
	reg := r.n.reg
	if _, err := reg.Discovered(p.String()); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_, _ = reg.Failed(context.WithoutCancel(ctx), p.String(), err.Error())
		}
	}()
	if r.n.host.Network().Connectedness(p) != network.Connected {
		if err := r.n.connect(ctx, p); err != nil {
			return err
		}
	}
	// Keep its addresses before it can be READY: a kernel that crashes right
	// after will still reach it on restart.
	r.n.saveAddrs(ctx, p)
	var id envelope.IdentityResponse
	if err := r.n.callWorker(ctx, p, protocols.WorkerIdentity, envelope.ActionIdentityRequest, "", nil, &id); err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	if _, err := reg.IdentitySaved(ctx, p.String(), id); err != nil {
		var conflict interface{ Devices() []string }
		if !errors.As(err, &conflict) {
			return fmt.Errorf("identity: %w", err)
		}
		// Conflicting devices stay with their owner; the rest are mapped and
		// the conflict shows in worker.list.
		log.Warn("device ownership conflict", "worker", id.WorkerID, "peer", p, "err", err)
	}
	var caps envelope.CapabilityResponse
	if err := r.n.callWorker(ctx, p, protocols.WorkerCapabilities, envelope.ActionCapabilityRequest, "", nil, &caps); err != nil {
		return fmt.Errorf("capabilities: %w", err)
	}
	if _, err := reg.Ready(ctx, p.String(), caps.Contract); err != nil {
		return fmt.Errorf("contract: %w", err)
	}
	// Two answered calls prove the Worker alive: HEALTHY now, and keep its
	// connection out of the connection manager's trimming.
	r.n.health.Success(ctx, id.WorkerID)
	r.n.host.ConnManager().Protect(p, "ork-worker")
	log.Info("worker ready", "worker", id.WorkerID, "peer", p, "devices", len(id.Devices))
	return nil
}

// forget drops p's backoff state (after terminate) so it can register again.
func (r *registrar) forget(p peer.ID) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if e := r.peers[p]; e != nil && e.timer != nil {
		e.timer.Stop()
	}
	delete(r.peers, p)
}

func (r *registrar) close() {
	r.mu.Lock()
	r.closed = true
	for _, e := range r.peers {
		if e.timer != nil {
			e.timer.Stop()
		}
	}
	r.mu.Unlock()
	r.wg.Wait()
}
