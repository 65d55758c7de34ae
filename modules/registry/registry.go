// Package registry is the kernel's authoritative map of Workers and their devices: each Worker's lifecycle
// state (MDK-REFERENCE §3.1), the devices it owns, its accepted contract, and the persisted copy of all three
// that lets a restarted kernel route again without re-registering every Worker.
//
// It is a pure state machine: no sockets, no goroutines, no wall clock (Options.Now is the clock). The node
// feeds it events (Discovered, IdentitySaved, Ready, Failed, Terminate) as its registration pipeline runs; every
// event is checked against the lifecycle table (see CanTransition) and is refused with a *TransitionError if
// the table does not allow it.
//
// Events write their records before they take effect (the WAL rule): if a write fails, the registration step
// has failed, the Worker goes back to DISCOVERED with LastError set, and the error is returned so the node can
// retry with backoff (Terminate is the exception: a failed delete changes nothing, and the operator retries).
// Records are written on registration events only, never on Touch or SetHealth, so pings cost no I/O.
//
// A Registry is safe for concurrent use. Events are serialised among themselves (including their I/O); queries
// never wait for I/O.
package registry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/orknode/ork/modules/internal/kvrec"
	"github.com/orknode/ork/modules/internal/notify"
	"github.com/orknode/ork/protocols/envelope"
)

// Namespaces of the persisted records, relative to the node's store (they match store.NSRegistry and
// store.NSCaps). Keys are workerIds, path-escaped (see kvrec.Key); values are JSON.
const (
	NSRegistry  = "/reg" // one record per Worker: peer ID, devices, conflicts, timestamps
	NSContracts = "/cap" // one contract per READY Worker
)

// KV is the persistence the registry needs; the node passes its store. Put and Delete must be durable when
// they return nil; Delete of a missing key is not an error; List walks ns in key order.
type KV interface {
	Put(ctx context.Context, ns, key string, value []byte) error
	Delete(ctx context.Context, ns, key string) error
	List(ctx context.Context, ns string, fn func(key string, value []byte) error) error
}

// Options configures New. Every field may be left zero.
type Options struct {
	// KV persists registry records and contracts. Nil keeps everything in memory (tests).
	KV KV
	// Now stamps registeredAt and lastSeen. Nil records zero times (the node passes its clock).
	Now func() time.Time
	// OnChange is called once for every transition applied, DISCOVERED → DISCOVERED (a failed retry) included,
	// and never for an idempotent or refused event. It is called outside any Registry lock, in the order the
	// transitions were applied; it may run on the goroutine of a later event, after the event that made the
	// change has returned, and it may call the Registry (events included).
	OnChange func(Change)
}

// Change describes what an event did to one Worker entry. An idempotent or refused event returns From == To
// and is not passed to OnChange; the one transition with From == To is DISCOVERED → DISCOVERED by a failed
// step, which sets Error.
type Change struct {
	PeerID   string
	WorkerID string // "" until the peer has answered identity
	From, To string
	// Conflicts lists the devices the Worker declared that other Workers own, as "dev-7 owned by worker-b".
	Conflicts []string
	// ReplacedPeer is the peer ID that served WorkerID before this identity answer came from PeerID (the
	// Worker restarted with a new key): that entry is gone, and the node may drop its connection.
	ReplacedPeer string
	// ReleasedWorker is the workerId PeerID answered before, when it now answers another: that Worker is gone,
	// with its devices and records, and the node may forget its health.
	ReleasedWorker string
	// Error is the reason a Worker went back to DISCOVERED (its LastError).
	Error string
}

// Changed reports whether the Worker's state differs after the event.
func (c Change) Changed() bool { return c.From != c.To }

// worker is one entry. Invariant: devices lists exactly the devices mapped to workerID in Registry.devices,
// and contract != nil exactly when state == Ready.
type worker struct {
	peerID       string
	workerID     string
	state        string
	devices      []envelope.DeviceInfo // owned, in declaration order
	declared     []envelope.DeviceInfo // the last identity answer's devices (owned + conflicting), deduplicated
	conflicts    []string
	family       string // deviceFamily from identity
	contract     *envelope.Contract
	health       string
	registeredAt time.Time
	lastSeen     time.Time
	lastError    string
}

type device struct {
	workerID string
	info     envelope.DeviceInfo
}

// Registry is the Worker and device map. Create it with New.
type Registry struct {
	kv     KV
	now    func() time.Time
	notify *notify.Queue[Change]

	// writeMu serialises events, from reading the state they start from to applying the result, including
	// their KV writes. mu guards the maps and entries; events take it only to read and to apply, so queries
	// never wait for I/O. Lock order: writeMu, then mu.
	writeMu  sync.Mutex
	mu       sync.RWMutex
	byPeer   map[string]*worker
	byWorker map[string]*worker // entries that have answered identity
	devices  map[string]device  // deviceId → owner
}

// New returns an empty Registry; call Load to restore persisted Workers.
func New(opts Options) *Registry {
	now := opts.Now
	if now == nil {
		now = func() time.Time { return time.Time{} }
	}
	return &Registry{
		kv:       opts.KV,
		now:      now,
		notify:   notify.New(opts.OnChange),
		byPeer:   map[string]*worker{},
		byWorker: map[string]*worker{},
		devices:  map[string]device{},
	}
}

func stateOf(w *worker) string {
	if w == nil {
		return Unregistered
	}
	return w.state
}

func (w *worker) ids() (peerID, workerID string) {
	if w == nil {
		return "", ""
	}
	return w.peerID, w.workerID
}

// event runs fn as one serialised event, then delivers the changes it queued (after releasing writeMu).
func (r *Registry) event(fn func() (Change, error)) (Change, error) {
	defer r.notify.Flush()
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	return fn()
}

// lookupPeer returns the entry of peerID (nil if unknown). Outside an event, read the entry's fields under mu
// only: events change them.
func (r *Registry) lookupPeer(peerID string) *worker {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.byPeer[peerID]
}

func (r *Registry) refuse(event string, w *worker, peerID, to, reason string) (Change, error) {
	_, workerID := w.ids()
	from := stateOf(w)
	return Change{PeerID: peerID, WorkerID: workerID, From: from, To: from},
		&TransitionError{Event: event, PeerID: peerID, WorkerID: workerID, From: from, To: to, Reason: reason}
}

// Discovered records that peerID was learned (DHT, identify, mDNS, static config...). An unknown or
// TERMINATED peer becomes DISCOVERED and the node should run its registration pipeline (a TERMINATED entry
// starts afresh: it no longer answers to its old workerId until it has answered identity); for a peer already
// DISCOVERED, IDENTITY_SAVED or READY it changes nothing (a rediscovered READY Worker causes no churn) and
// returns a Change with From == To.
func (r *Registry) Discovered(peerID string) (Change, error) {
	if peerID == "" {
		return Change{}, ErrEmptyPeerID
	}
	r.mu.RLock()
	w := r.byPeer[peerID]
	known := w != nil && w.state != Terminated
	r.mu.RUnlock()
	if known {
		return r.unchanged(w), nil
	}
	return r.event(func() (Change, error) {
		w := r.lookupPeer(peerID)
		from := stateOf(w)
		if from != Unregistered && from != Terminated {
			return r.unchanged(w), nil // registered by a concurrent event since the check above
		}
		r.mu.Lock()
		if w == nil {
			w = &worker{peerID: peerID}
			r.byPeer[peerID] = w
		}
		if w.workerID != "" { // terminated: it re-registers like a new Worker, whatever identity it answers
			delete(r.byWorker, w.workerID)
			w.workerID = ""
		}
		w.state, w.lastError = Discovered, ""
		r.mu.Unlock()
		return r.emit(r.changed(w, from, "")), nil
	})
}

func (r *Registry) unchanged(w *worker) Change {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return Change{PeerID: w.peerID, WorkerID: w.workerID, From: w.state, To: w.state, Conflicts: clone(w.conflicts)}
}

// changed builds the Change of a transition applied to w.
func (r *Registry) changed(w *worker, from, errText string) Change {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return Change{PeerID: w.peerID, WorkerID: w.workerID, From: from, To: w.state, Conflicts: clone(w.conflicts), Error: errText}
}

// emit queues c for OnChange and returns it. Call with writeMu held, so the queue keeps the order in which
// changes were applied.
func (r *Registry) emit(c Change) Change {
	r.notify.Push(c)
	return c
}

// IdentitySaved records peerID's identity answer: DISCOVERED or READY (re-identify) → IDENTITY_SAVED.
//
// Devices: every declared device not owned by another Worker is mapped to id.WorkerID; devices the Worker no
// longer declares are unmapped. A device owned by a different Worker is not taken from it: the registration
// goes ahead without that device, the conflict is recorded on the newcomer (Conflicts, shown in worker.list)
// and returned as a *ConflictError next to a Change that still moved to IDENTITY_SAVED. The newcomer claims the
// device at its next identity answer once the owner has dropped it or been terminated.
//
// A workerId stays bound to the peer that answered it first: another peer claiming it is refused with a
// *WorkerIDTakenError (a failed step: DISCOVERED with LastError, retried by the node) — anyone can make a key
// and answer any workerId, so a claim alone proves nothing. The exception is an owner that is TERMINATED or
// whose health is DEAD: its old peer is gone (the Worker restarted with a new key), so the workerId moves to
// peerID and the old entry is dropped (Change.ReplacedPeer). A peer that answers a new workerId releases its
// old one (Change.ReleasedWorker): devices unmapped, records deleted.
//
// An invalid answer (id.Validate) is a failed step: the Worker goes back to DISCOVERED and the error wraps
// ErrInvalidIdentity.
func (r *Registry) IdentitySaved(ctx context.Context, peerID string, id envelope.IdentityResponse) (Change, error) {
	if peerID == "" {
		return Change{}, ErrEmptyPeerID
	}
	return r.event(func() (Change, error) {
		w := r.lookupPeer(peerID)
		if !CanTransition(stateOf(w), IdentitySaved) {
			return r.refuse("IdentitySaved", w, peerID, IdentitySaved, "")
		}
		if err := id.Validate(); err != nil {
			return r.failWith(ctx, w, fmt.Errorf("%w: %w", ErrInvalidIdentity, err))
		}
		if err := r.checkOwner(w, id.WorkerID); err != nil {
			return r.failWith(ctx, w, err)
		}
		p := r.planIdentity(w, id)
		if err := r.persistIdentity(ctx, p); err != nil {
			return r.failWith(ctx, w, err)
		}
		r.applyIdentity(p)
		c := r.changed(w, p.from, "")
		c.ReplacedPeer, c.ReleasedWorker = p.replacedPeer(), p.released
		r.emit(c)
		if len(p.conflictIDs) > 0 {
			return c, &ConflictError{WorkerID: p.workerID, Devices: p.conflictIDs, Owners: p.owners}
		}
		return c, nil
	})
}

// checkOwner refuses workerID to w when another peer owns it and may still be alive (see IdentitySaved).
func (r *Registry) checkOwner(w *worker, workerID string) error {
	r.mu.RLock()
	defer r.mu.RUnlock()
	o := r.byWorker[workerID]
	if o == nil || o == w || o.state == Terminated || o.health == envelope.HealthDead {
		return nil
	}
	return &WorkerIDTakenError{WorkerID: workerID, PeerID: w.peerID, Owner: o.peerID}
}

// identityPlan is what an identity answer will change, computed before anything is written.
type identityPlan struct {
	w           *worker
	from        string
	workerID    string
	family      string
	mapped      []envelope.DeviceInfo
	declared    []envelope.DeviceInfo
	conflicts   []string
	conflictIDs []string
	owners      map[string]string
	unmap       []string // devices of workerID (or of released) no longer declared
	replaced    *worker  // the entry that served workerID from another peer
	released    string   // the workerId w answered before, if different
	health      string
	now         time.Time
}

func (p *identityPlan) replacedPeer() string {
	if p.replaced == nil {
		return ""
	}
	return p.replaced.peerID
}

func (r *Registry) planIdentity(w *worker, id envelope.IdentityResponse) *identityPlan {
	r.mu.RLock()
	defer r.mu.RUnlock()
	p := &identityPlan{w: w, from: w.state, workerID: id.WorkerID, family: id.DeviceFamily, now: r.now()}
	if w.workerID != "" && w.workerID != id.WorkerID {
		p.released = w.workerID
	}
	if o := r.byWorker[id.WorkerID]; o != nil && o != w {
		p.replaced = o
	}
	switch { // health belongs to the workerId
	case w.workerID == id.WorkerID:
		p.health = w.health
	case p.replaced != nil:
		p.health = p.replaced.health
	}
	// Devices owned by this workerId, or by the workerId this peer is releasing, are free to (re)map.
	free := func(owner string) bool { return owner == p.workerID || (p.released != "" && owner == p.released) }
	declared := make(map[string]bool, len(id.Devices))
	for _, d := range id.Devices {
		if declared[d.DeviceID] {
			continue // declared twice: the first declaration wins
		}
		declared[d.DeviceID] = true
		p.declared = append(p.declared, d)
		if dev, ok := r.devices[d.DeviceID]; ok && !free(dev.workerID) {
			if p.owners == nil {
				p.owners = map[string]string{}
			}
			p.owners[d.DeviceID] = dev.workerID
			p.conflictIDs = append(p.conflictIDs, d.DeviceID)
			p.conflicts = append(p.conflicts, conflictText(d.DeviceID, dev.workerID))
			continue
		}
		p.mapped = append(p.mapped, d)
	}
	owned := w.devices
	if p.replaced != nil {
		owned = append(clone(owned), p.replaced.devices...)
	}
	for _, d := range owned {
		if !declared[d.DeviceID] {
			p.unmap = append(p.unmap, d.DeviceID)
		}
	}
	return p
}

// persistIdentity deletes the records of a released workerId and the contract of this one (the Worker is no
// longer READY, and a restart must not bring it back READY with a stale contract), then writes the record.
func (r *Registry) persistIdentity(ctx context.Context, p *identityPlan) error {
	if p.released != "" {
		if err := r.deleteRecords(ctx, p.released); err != nil {
			return err
		}
	}
	if err := r.kvDelete(ctx, NSContracts, p.workerID); err != nil {
		return err
	}
	rec := record{
		WorkerID: p.workerID, PeerID: p.w.peerID, Devices: p.mapped, Declared: p.declared, DeviceFamily: p.family,
		Conflicts: p.conflicts, RegisteredAt: kvrec.UnixMilli(p.now), LastSeen: kvrec.UnixMilli(p.now),
	}
	return r.kvPut(ctx, NSRegistry, p.workerID, rec)
}

func (r *Registry) applyIdentity(p *identityPlan) {
	r.mu.Lock()
	defer r.mu.Unlock()
	w := p.w
	if p.replaced != nil {
		delete(r.byPeer, p.replaced.peerID)
	}
	if p.released != "" {
		delete(r.byWorker, p.released)
	}
	for _, id := range p.unmap {
		if dev, ok := r.devices[id]; ok && (dev.workerID == p.workerID || dev.workerID == p.released) {
			delete(r.devices, id)
		}
	}
	for _, d := range p.mapped {
		r.devices[d.DeviceID] = device{workerID: p.workerID, info: d}
	}
	w.workerID = p.workerID
	r.byWorker[p.workerID] = w
	w.state = IdentitySaved
	w.devices, w.declared, w.conflicts, w.family, w.contract = p.mapped, p.declared, p.conflicts, p.family, nil
	w.health, w.lastError = p.health, ""
	w.registeredAt, w.lastSeen = p.now, maxTime(w.lastSeen, p.now)
}

// Ready records that peerID's contract was received: IDENTITY_SAVED → READY, and the contract is persisted.
// A contract that fails c.Validate is a failed step: the Worker goes back to DISCOVERED with LastError set
// (the node retries with backoff; the Worker keeps its devices) and the error wraps ErrInvalidContract.
//
// The Registry keeps c and hands it out to readers: do not modify it afterwards.
func (r *Registry) Ready(ctx context.Context, peerID string, c *envelope.Contract) (Change, error) {
	if peerID == "" {
		return Change{}, ErrEmptyPeerID
	}
	return r.event(func() (Change, error) {
		w := r.lookupPeer(peerID)
		if !CanTransition(stateOf(w), Ready) {
			return r.refuse("Ready", w, peerID, Ready, "")
		}
		if err := c.Validate(); err != nil {
			return r.failWith(ctx, w, fmt.Errorf("%w: %w", ErrInvalidContract, err))
		}
		if err := r.kvPut(ctx, NSContracts, w.workerID, c); err != nil {
			return r.failWith(ctx, w, err)
		}
		from := w.state
		now := r.now()
		r.mu.Lock()
		w.state, w.contract, w.lastError = Ready, c, ""
		w.lastSeen = maxTime(w.lastSeen, now)
		r.mu.Unlock()
		return r.emit(r.changed(w, from, "")), nil
	})
}

// Failed records that a registration step for peerID failed (timeout, RPC error, refused answer): the Worker
// goes back to DISCOVERED with LastError = reason, keeping its devices, and the node retries later. A READY
// Worker loses its contract (in memory and on disk). A TERMINATED Worker stays terminated: only Discovered
// revives it.
func (r *Registry) Failed(ctx context.Context, peerID, reason string) (Change, error) {
	if peerID == "" {
		return Change{}, ErrEmptyPeerID
	}
	return r.event(func() (Change, error) {
		w := r.lookupPeer(peerID)
		switch stateOf(w) {
		case Unregistered:
			return Change{PeerID: peerID, From: Unregistered, To: Unregistered},
				fmt.Errorf("%w: peer %s", ErrUnknownWorker, peerID)
		case Terminated:
			return r.refuse("Failed", w, peerID, Discovered, "only a new discovery revives a terminated worker")
		}
		if reason == "" {
			reason = "registration step failed"
		}
		return r.fail(ctx, w, reason)
	})
}

// fail moves w to DISCOVERED with reason as LastError. The error is a failure to delete the persisted
// contract of a READY Worker, after which the Worker is DISCOVERED all the same. Call with writeMu held; w must
// be DISCOVERED, IDENTITY_SAVED or READY.
func (r *Registry) fail(ctx context.Context, w *worker, reason string) (Change, error) {
	from := w.state
	if !CanTransition(from, Discovered) {
		return r.refuse("Failed", w, w.peerID, Discovered, "")
	}
	var perr error
	if from == Ready {
		// The persisted contract mirrors READY; without it a restart brings the Worker back DISCOVERED.
		perr = r.kvDelete(ctx, NSContracts, w.workerID)
	}
	r.mu.Lock()
	w.state, w.contract, w.lastError = Discovered, nil, reason
	r.mu.Unlock()
	return r.emit(r.changed(w, from, reason)), perr
}

// failWith is fail for a step that failed with cause, which it returns (joined with any persistence error).
func (r *Registry) failWith(ctx context.Context, w *worker, cause error) (Change, error) {
	c, perr := r.fail(ctx, w, cause.Error())
	return c, errors.Join(cause, perr)
}

// Terminate evicts workerID: its devices are unmapped, its records and contract deleted, and it stays
// TERMINATED in memory until its peer is discovered again, when it re-registers like a new Worker. If the
// records cannot be deleted nothing changes and the error (wrapping ErrPersist) is returned.
func (r *Registry) Terminate(ctx context.Context, workerID string) (Change, error) {
	return r.event(func() (Change, error) {
		r.mu.RLock()
		w := r.byWorker[workerID]
		r.mu.RUnlock()
		if w == nil {
			return Change{WorkerID: workerID, From: Unregistered, To: Unregistered},
				fmt.Errorf("%w: %s", ErrUnknownWorker, workerID)
		}
		if !CanTransition(w.state, Terminated) {
			return r.refuse("Terminate", w, w.peerID, Terminated, "")
		}
		if err := r.deleteRecords(ctx, workerID); err != nil {
			return r.unchanged(w), err
		}
		from := w.state
		r.mu.Lock()
		for _, d := range w.devices {
			if r.devices[d.DeviceID].workerID == workerID {
				delete(r.devices, d.DeviceID)
			}
		}
		w.state = Terminated
		w.devices, w.declared, w.conflicts, w.contract, w.health, w.lastError = nil, nil, nil, nil, "", ""
		r.mu.Unlock()
		return r.emit(r.changed(w, from, "")), nil
	})
}

// Forget removes the entry of a peer that never answered identity (DISCOVERED, no workerId): the node gives up
// on a peer that does not answer identity, so it leaves worker.list until it is discovered again. Such an entry
// has nothing persisted. Any other entry is refused with a *TransitionError (a peer that has answered a
// workerId is a Worker: only Terminate evicts it), an unknown peer with ErrUnknownWorker. OnChange sees the
// entry go from DISCOVERED to UNREGISTERED.
func (r *Registry) Forget(peerID string) (Change, error) {
	if peerID == "" {
		return Change{}, ErrEmptyPeerID
	}
	return r.event(func() (Change, error) {
		w := r.lookupPeer(peerID)
		if w == nil {
			return Change{PeerID: peerID, From: Unregistered, To: Unregistered},
				fmt.Errorf("%w: peer %s", ErrUnknownWorker, peerID)
		}
		r.mu.Lock()
		if w.state != Discovered || w.workerID != "" {
			r.mu.Unlock()
			return r.refuse("Forget", w, peerID, Unregistered, "only a peer that never answered identity can be forgotten")
		}
		delete(r.byPeer, peerID)
		r.mu.Unlock()
		return r.emit(Change{PeerID: peerID, From: Discovered, To: Unregistered}), nil
	})
}

// SetHealth stores workerID's health state (owned by modules/health) for listing and routability. Unknown
// and TERMINATED Workers are ignored.
func (r *Registry) SetHealth(workerID, state string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if w := r.byWorker[workerID]; w != nil && w.state != Terminated {
		w.health = state
	}
}

// Touch records that peerID was heard from at now (lastSeen never moves backwards). It is memory-only: the
// persisted lastSeen is refreshed by the next registration event.
func (r *Registry) Touch(peerID string, now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if w := r.byPeer[peerID]; w != nil {
		w.lastSeen = maxTime(w.lastSeen, now)
	}
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

func clone[S ~[]E, E any](s S) S {
	if s == nil {
		return nil
	}
	return append(S(nil), s...)
}

// kvPut, kvDelete and deleteRecords are no-ops without a KV.

func (r *Registry) kvPut(ctx context.Context, ns, workerID string, v any) error {
	if r.kv == nil {
		return nil
	}
	data, err := json.Marshal(v)
	if err == nil {
		err = r.kv.Put(ctx, ns, kvrec.Key(workerID), data)
	}
	if err != nil {
		return fmt.Errorf("%w: put %s/%s: %w", ErrPersist, ns, workerID, err)
	}
	return nil
}

func (r *Registry) kvDelete(ctx context.Context, ns, workerID string) error {
	if r.kv == nil {
		return nil
	}
	if err := r.kv.Delete(ctx, ns, kvrec.Key(workerID)); err != nil {
		return fmt.Errorf("%w: delete %s/%s: %w", ErrPersist, ns, workerID, err)
	}
	return nil
}

// deleteRecords deletes the registry record first: a contract without a record is ignored by Load.
func (r *Registry) deleteRecords(ctx context.Context, workerID string) error {
	if err := r.kvDelete(ctx, NSRegistry, workerID); err != nil {
		return err
	}
	return r.kvDelete(ctx, NSContracts, workerID)
}
