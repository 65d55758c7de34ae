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
	"github.com/libp2p/go-libp2p/core/protocol"
	msmux "github.com/multiformats/go-multistream"

	"github.com/orknode/ork/modules/registry"
	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
)

const (
	// maxUnidentifiedFailures is how many consecutive registration attempts a
	// peer that never answered identity gets before the registrar gives up on
	// it: it forgets the peer and drops its never-identified registry entry,
	// so it leaves worker.list. It comes back only when discovered again
	// (identify, topic, static...), with a fresh count. A candidate for the
	// config (registration.maxAttempts) later.
	maxUnidentifiedFailures = 6
	// maxRegistrarPeers bounds the registrar's table (peers being registered
	// or waiting out a backoff): offers of new peers beyond it are dropped
	// until entries leave (READY, given up); discovery offers them again.
	maxRegistrarPeers = 10_000
)

// registrar runs the registration pipeline of DESIGN §4: discovered peer →
// identity → capabilities → READY, deduplicated by peer ID, bounded in
// concurrency (a reconnect storm of a thousand Workers is absorbed), retried
// with backoff on failure so no Worker is ever stuck half-way.
type registrar struct {
	n   *Node
	sem chan struct{}
	// pingSem bounds the immediate pings of pingSoon (node-wide, like
	// maxPingsInFlight for one health tick).
	pingSem  chan struct{}
	maxPeers int // maxRegistrarPeers; a field so tests can lower it
	// allowed, when not nil, is the closed set of Worker peer IDs
	// (discovery.allowWorkers).
	allowed map[peer.ID]bool

	mu     sync.Mutex
	peers  map[peer.ID]*regEntry
	closed bool
	wg     sync.WaitGroup
}

type regEntry struct {
	inFlight bool
	attempts int
	// unidentified counts consecutive failed attempts that got no identity
	// answer; one that got an answer (even a refused one) resets it.
	unidentified int
	nextAt       time.Time
	timer        *time.Timer
}

func newRegistrar(n *Node) *registrar {
	r := &registrar{
		n:        n,
		sem:      make(chan struct{}, n.cfg.Registration.MaxConcurrent),
		pingSem:  make(chan struct{}, maxPingsInFlight),
		maxPeers: maxRegistrarPeers,
		peers:    map[peer.ID]*regEntry{},
	}
	if len(n.cfg.Discovery.AllowWorkers) > 0 {
		r.allowed = map[peer.ID]bool{}
		for _, s := range n.cfg.Discovery.AllowWorkers {
			if p, err := peer.Decode(s); err == nil { // validated
				r.allowed[p] = true
			}
		}
	}
	return r
}

// startPing runs ping on the node's WaitGroup if a ping slot is free, and
// reports whether it did. Nothing starts once the node is shutting down (the
// check is under mu, which close takes before the node waits on its
// WaitGroup, so no goroutine is added to it after that).
func (r *registrar) startPing(ping func()) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed || r.n.ctx.Err() != nil {
		return false
	}
	select {
	case r.pingSem <- struct{}{}:
	default:
		return false // busy: the next health tick pings it
	}
	r.n.wg.Go(func() {
		defer func() { <-r.pingSem }()
		ping()
	})
	return true
}

// offer asks for p to be registered unless it already is, is being
// registered, or is waiting out a backoff (its retry timer will come back).
func (r *registrar) offer(p peer.ID, source string) {
	if p == r.n.host.ID() || r.n.ctx.Err() != nil {
		return // shutting down: nothing new starts
	}
	if r.allowed != nil && !r.allowed[p] {
		return // a closed site: only the listed Workers register
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
		if len(r.peers) >= r.maxPeers {
			log.Debug("registration table full, offer dropped", "peer", p, "source", source, "entries", len(r.peers))
			return
		}
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
	answered, err := r.register(ctx, p)
	<-r.sem

	// e is this goroutine's while inFlight: no other run starts for p.
	if err != nil && ctx.Err() == nil {
		if !answered {
			// A known Worker (it has answered a workerId before) that cannot
			// be reached fails its health like a failed ping: it goes DEAD in
			// time, which also lets a Worker restarted with a new key take
			// its workerId back (the registry refuses that while it lives).
			if w, ok := r.n.reg.ByPeer(p.String()); ok && w.WorkerID != "" && w.State != envelope.WorkerReady {
				r.n.health.Failure(r.n.ctx, w.WorkerID, err.Error())
			}
		}
		if answered {
			e.unidentified = 0
		} else if e.unidentified++; notOurWorker(err) || e.unidentified >= maxUnidentifiedFailures {
			if r.giveUp(ctx, p, e, err) {
				return
			}
		}
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	e.inFlight = false
	if err == nil {
		// READY: offer short-circuits from now on, so the entry can go (the
		// table holds only peers in progress); a later failure makes a new one.
		r.drop(p, e)
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

// drop removes p's entry if it is still e. Call with mu held.
func (r *registrar) drop(p peer.ID, e *regEntry) {
	if e.timer != nil {
		e.timer.Stop()
	}
	if r.peers[p] == e {
		delete(r.peers, p)
	}
}

// giveUp forgets a peer that never answered identity: its registrar entry,
// its registry entry (refused, and false returned, if it has answered a
// workerId some time: a known Worker is retried for as long as it takes) and
// any addresses saved for it. Call without mu: Forget may deliver registry
// changes whose handler calls the registrar.
func (r *registrar) giveUp(ctx context.Context, p peer.ID, e *regEntry, cause error) bool {
	if _, err := r.n.reg.Forget(p.String()); err != nil && !errors.Is(err, registry.ErrUnknownWorker) {
		return false
	}
	r.mu.Lock()
	e.inFlight = false
	r.drop(p, e)
	r.mu.Unlock()
	r.n.forgetAddrs(context.WithoutCancel(ctx), p)
	log.Debug("registration given up: not a worker for this kernel", "peer", p, "attempts", e.unidentified, "err", cause)
	return true
}

// notOurWorker reports a failure that proves the peer is no Worker of this
// kernel: it does not speak the protocol, or it reset the stream on us (a
// Worker resets the streams of kernels it does not trust). A reset caused by
// our own deadline or cancellation, or by the peer's resource limits (busy),
// proves nothing.
func notOurWorker(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return false
	}
	if errors.Is(err, msmux.ErrNotSupported[protocol.ID]{}) {
		return true
	}
	var se *network.StreamError
	if errors.As(err, &se) {
		return se.Remote && (se.ErrorCode == network.StreamNoError || se.ErrorCode == network.StreamProtocolNegotiationFailed)
	}
	return errors.Is(err, network.ErrReset) // transports without error codes (mocknet)
}

// register runs the pipeline once for p. answered reports whether p answered
// identity (a refused answer included).
func (r *registrar) register(ctx context.Context, p peer.ID) (answered bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, ms(r.n.cfg.Registration.TimeoutMs))
	defer cancel()
	reg := r.n.reg
	if _, err := reg.Discovered(p.String()); err != nil {
		return false, err
	}
	defer func() {
		if err != nil {
			_, _ = reg.Failed(context.WithoutCancel(ctx), p.String(), err.Error())
		}
	}()
	if r.n.host.Network().Connectedness(p) != network.Connected {
		if err := r.n.connect(ctx, p); err != nil {
			return false, err
		}
	}
	var id envelope.IdentityResponse
	if err := r.n.callWorker(ctx, p, protocols.WorkerIdentity, envelope.ActionIdentityRequest, "", nil, &id); err != nil {
		return false, fmt.Errorf("identity: %w", err)
	}
	if _, err := reg.IdentitySaved(ctx, p.String(), id); err != nil {
		if !errors.Is(err, registry.ErrDeviceConflict) {
			// A refused answer (ERR_WORKER_ID_TAKEN, invalid) is a failed
			// step like any other: retried with backoff.
			return true, fmt.Errorf("identity: %w", err)
		}
		// Conflicting devices stay with their owner; the rest are mapped and
		// the conflict shows in worker.list.
		log.Warn("device ownership conflict", "worker", id.WorkerID, "peer", p, "err", err)
	}
	// Keep its addresses once it has proved to be a Worker (an accepted
	// identity), before it can be READY: a kernel that crashes right after
	// will still reach it on restart. Peers that never answer are not kept.
	r.n.saveAddrs(ctx, p)
	var caps envelope.CapabilityResponse
	if err := r.n.callWorker(ctx, p, protocols.WorkerCapabilities, envelope.ActionCapabilityRequest, "", nil, &caps); err != nil {
		return true, fmt.Errorf("capabilities: %w", err)
	}
	if _, err := reg.Ready(ctx, p.String(), caps.Contract); err != nil {
		return true, fmt.Errorf("contract: %w", err)
	}
	// Two answered calls prove the Worker alive: HEALTHY now, and keep its
	// connection out of the connection manager's trimming.
	r.n.health.Success(ctx, id.WorkerID)
	r.n.host.ConnManager().Protect(p, "ork-worker")
	log.Info("worker ready", "worker", id.WorkerID, "peer", p, "devices", len(id.Devices))
	return true, nil
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
