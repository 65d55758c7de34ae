// Package health tracks the health of each Worker (DESIGN §8, MDK-REFERENCE §3.3): UNKNOWN until the first
// ping or RPC outcome, HEALTHY after any success, SICK after one failure, DEAD after FailureThreshold
// consecutive failures, and back to HEALTHY on the next success from any state.
//
// It is a pure state machine: the node reports outcomes (Success, Failure) and decides when to ping; the
// Monitor has no goroutines, sockets or wall clock (Options.Now is the clock). Every change of state is
// checked against the transition table (CanTransition) and persisted, so health survives a restart; a success
// that changes nothing touches no disk, which keeps pings cheap.
//
// Memory is the truth and is updated first: a Worker turning SICK stops being routable at once, without
// waiting for the disk. Writes follow, serialised, each writing the Worker's state as it is when the write
// runs, so the last write always matches memory even when outcomes for one Worker race.
//
// A Monitor is safe for concurrent use.
package health

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/orknode/ork/modules/internal/kvrec"
	"github.com/orknode/ork/modules/internal/notify"
	"github.com/orknode/ork/protocols/envelope"
)

// Health states, re-exported from envelope.
const (
	Unknown = envelope.HealthUnknown // no outcome yet (or forgotten): routable, as in MDK
	Healthy = envelope.HealthHealthy
	Sick    = envelope.HealthSick // not routable; re-pinged at once
	Dead    = envelope.HealthDead // not routable; still pinged at the normal cadence
)

// States lists every health state.
var States = []string{Unknown, Healthy, Sick, Dead}

// transitions is the declared table (MDK HEALTH_TRANSITIONS) plus the counter self-loops SICK → SICK and
// DEAD → DEAD (another failure). A failure always passes through SICK: with a threshold of 1 a HEALTHY Worker
// goes HEALTHY → SICK → DEAD in one Failure, two legal steps. HEALTHY → HEALTHY is not a transition: a success
// on a HEALTHY Worker changes nothing.
var transitions = map[string][]string{
	Unknown: {Healthy, Sick},
	Healthy: {Sick},
	Sick:    {Healthy, Sick, Dead},
	Dead:    {Healthy, Dead},
}

// CanTransition reports whether the table allows from → to.
func CanTransition(from, to string) bool { return slices.Contains(transitions[from], to) }

// NeedsImmediatePing reports whether the node should ping a Worker again at once, rather than at the next
// tick, after a change from → to: when it has just turned SICK (DESIGN §8), so that a single lost ping is
// confirmed or cleared within one ping timeout. Later failures wait for the normal cadence, so a Worker that
// is down is not hammered.
func NeedsImmediatePing(from, to string) bool { return to == Sick && from != Sick }

// Routable reports whether a health state lets commands through: SICK and DEAD do not; UNKNOWN does (MDK).
func Routable(state string) bool { return state != Sick && state != Dead }

// DefaultFailureThreshold is the number of consecutive failures that make a Worker DEAD (DESIGN §8).
const DefaultFailureThreshold = 3

// NS is the namespace of the persisted health records (store.NSHealth). Keys are path-escaped workerIds.
const NS = "/health"

var (
	// ErrInvalidThreshold is returned by New for a FailureThreshold below 1.
	ErrInvalidThreshold = errors.New("ork/health: failure threshold must be at least 1")
	// ErrIllegalTransition is wrapped by *TransitionError: an outcome would take a state change the table does
	// not allow. It cannot happen with a valid threshold; it guards the rules against regressions.
	ErrIllegalTransition = errors.New("ork/health: illegal transition")
	// ErrEmptyWorkerID is returned when an outcome names no Worker.
	ErrEmptyWorkerID = errors.New("ork/health: empty worker id")
	// ErrPersist is wrapped (with the KV error) when a record could not be written or deleted. Memory is
	// updated all the same; the next change of that Worker writes it again.
	ErrPersist = errors.New("ork/health: persist")
	// ErrCorruptRecord is wrapped by every *CorruptRecordError that Load reports.
	ErrCorruptRecord = errors.New("ork/health: corrupt record")
)

// TransitionError is a refused change; it wraps ErrIllegalTransition.
type TransitionError struct {
	WorkerID string
	From, To string
}

func (e *TransitionError) Error() string {
	return fmt.Sprintf("%v: %s: %s → %s", ErrIllegalTransition, e.WorkerID, e.From, e.To)
}

func (e *TransitionError) Unwrap() error { return ErrIllegalTransition }

// CorruptRecordError is a persisted record Load skipped. It wraps ErrCorruptRecord and the cause.
type CorruptRecordError struct {
	Key string
	Err error
}

func (e *CorruptRecordError) Error() string {
	return fmt.Sprintf("%v: %s/%s: %v", ErrCorruptRecord, NS, e.Key, e.Err)
}

func (e *CorruptRecordError) Unwrap() []error { return []error{ErrCorruptRecord, e.Err} }

// KV is the persistence the Monitor needs; the node passes its store. Put and Delete must be durable when they
// return nil; Delete of a missing key is not an error.
type KV interface {
	Put(ctx context.Context, ns, key string, value []byte) error
	Delete(ctx context.Context, ns, key string) error
	List(ctx context.Context, ns string, fn func(key string, value []byte) error) error
}

// Options configures New.
type Options struct {
	// FailureThreshold is the number of consecutive failures that make a Worker DEAD; at least 1 (the config
	// default is DefaultFailureThreshold). 1 makes the first failure DEAD.
	FailureThreshold int
	// KV persists health in namespace NS. Nil keeps it in memory (tests).
	KV KV
	// Now stamps LastChange, LastSuccess and LastFailure. Nil records zero times.
	Now func() time.Time
	// OnChange is called for every change of state (not for a further failure of a SICK or DEAD Worker),
	// outside any Monitor lock, in the order the changes were made, one step at a time (so HEALTHY → SICK then
	// SICK → DEAD with a threshold of 1). It may run on the goroutine of a later outcome and may call the
	// Monitor.
	OnChange func(workerID, from, to string)
}

// Status is one Worker's health.
type Status struct {
	State               string
	ConsecutiveFailures int
	LastChange          time.Time // when State last changed
	LastSuccess         time.Time
	LastFailure         time.Time
	LastError           string // reason given with the last failure; kept after a success, for diagnosis
}

// Monitor holds the health of every Worker it has heard of. Create it with New.
type Monitor struct {
	threshold int
	kv        KV
	now       func() time.Time
	notify    *notify.Queue[change]

	mu      sync.RWMutex
	workers map[string]*Status

	writeMu sync.Mutex // serialises KV writes; taken before mu, never while holding it
}

// New returns a Monitor, or ErrInvalidThreshold.
func New(opts Options) (*Monitor, error) {
	if opts.FailureThreshold < 1 {
		return nil, fmt.Errorf("%w (got %d)", ErrInvalidThreshold, opts.FailureThreshold)
	}
	now := opts.Now
	if now == nil {
		now = func() time.Time { return time.Time{} }
	}
	return &Monitor{
		threshold: opts.FailureThreshold,
		kv:        opts.KV,
		now:       now,
		notify:    notify.New(onChange(opts.OnChange)),
		workers:   map[string]*Status{},
	}, nil
}

// Success records a successful ping or RPC: the Worker is HEALTHY, its failure count reset. It returns the
// state before and after; a Worker already HEALTHY stays so without any write.
func (m *Monitor) Success(ctx context.Context, workerID string) (from, to string, err error) {
	return m.outcome(ctx, workerID, true, "")
}

// Failure records a failed ping or RPC (reason is kept as LastError): the Worker turns SICK, or DEAD once it
// has failed FailureThreshold times in a row. It returns the state before and after; see NeedsImmediatePing.
func (m *Monitor) Failure(ctx context.Context, workerID, reason string) (from, to string, err error) {
	return m.outcome(ctx, workerID, false, reason)
}

type step struct{ from, to string }

func (m *Monitor) outcome(ctx context.Context, workerID string, ok bool, reason string) (from, to string, err error) {
	if workerID == "" {
		return "", "", ErrEmptyWorkerID
	}
	now := m.now()
	m.mu.Lock()
	st := m.workers[workerID]
	if st == nil {
		st = &Status{State: Unknown}
	}
	next := *st
	var steps []step
	if ok {
		next.LastSuccess = now
		next.ConsecutiveFailures = 0
		if next.State != Healthy {
			steps = append(steps, step{next.State, Healthy})
		}
	} else {
		next.LastFailure, next.LastError = now, reason
		next.ConsecutiveFailures++
		cur := next.State
		if cur != Dead {
			steps = append(steps, step{cur, Sick}) // SICK after one failure...
			cur = Sick
		}
		if next.ConsecutiveFailures >= m.threshold {
			steps = append(steps, step{cur, Dead}) // ...DEAD after threshold of them
		}
	}
	for _, s := range steps {
		if !CanTransition(s.from, s.to) {
			m.mu.Unlock()
			return st.State, st.State, &TransitionError{WorkerID: workerID, From: s.from, To: s.to}
		}
	}
	from = next.State
	if len(steps) > 0 {
		next.State = steps[len(steps)-1].to
	}
	to = next.State
	if to != from {
		next.LastChange = now
	}
	if cur := m.workers[workerID]; cur != nil {
		*cur = next
	} else {
		m.workers[workerID] = &next
	}
	for _, s := range steps { // queued under mu, so in the order the changes were made
		if s.from != s.to {
			m.notify.Push(change{workerID, s.from, s.to})
		}
	}
	m.mu.Unlock()

	// Persist a change of state, and the failure count while it still matters (SICK, on its way to DEAD);
	// successes on HEALTHY Workers and further failures of DEAD ones cost nothing.
	if from != to || to == Sick {
		err = m.sync(ctx, workerID)
	}
	m.notify.Flush()
	return from, to, err
}

// State returns a Worker's health; an unknown Worker is UNKNOWN with zero values.
func (m *Monitor) State(workerID string) Status {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if st := m.workers[workerID]; st != nil {
		return *st
	}
	return Status{State: Unknown}
}

// Forget drops a Worker's health, in memory and on disk (after worker.terminate, or when the registry
// releases a workerId). It is not a transition and calls no OnChange; the Worker is UNKNOWN again.
func (m *Monitor) Forget(ctx context.Context, workerID string) error {
	if workerID == "" {
		return ErrEmptyWorkerID
	}
	m.mu.Lock()
	delete(m.workers, workerID)
	m.mu.Unlock()
	return m.sync(ctx, workerID)
}

// Counts returns the number of Workers per health state (every state present). Workers never heard of are
// not counted as UNKNOWN.
func (m *Monitor) Counts() map[string]int {
	out := map[string]int{Unknown: 0, Healthy: 0, Sick: 0, Dead: 0}
	m.mu.RLock()
	defer m.mu.RUnlock()
	for _, st := range m.workers {
		out[st.State]++
	}
	return out
}

// record is the persisted form of a Status (times in Unix ms, 0 for none).
type record struct {
	WorkerID            string `json:"workerId"`
	State               string `json:"state"`
	ConsecutiveFailures int    `json:"consecutiveFailures"`
	LastChange          int64  `json:"lastChange,omitempty"`
	LastSuccess         int64  `json:"lastSuccess,omitempty"`
	LastFailure         int64  `json:"lastFailure,omitempty"`
	LastError           string `json:"lastError,omitempty"`
}

// sync writes workerID's current memory state to the KV (or deletes it if forgotten). Writes are serialised
// and read memory when they run, so concurrent outcomes for one Worker cannot leave an older state on disk.
func (m *Monitor) sync(ctx context.Context, workerID string) error {
	if m.kv == nil {
		return nil
	}
	m.writeMu.Lock()
	defer m.writeMu.Unlock()
	m.mu.RLock()
	st := m.workers[workerID]
	var rec record
	if st != nil {
		rec = record{
			WorkerID: workerID, State: st.State, ConsecutiveFailures: st.ConsecutiveFailures,
			LastChange: kvrec.UnixMilli(st.LastChange), LastSuccess: kvrec.UnixMilli(st.LastSuccess),
			LastFailure: kvrec.UnixMilli(st.LastFailure), LastError: st.LastError,
		}
	}
	m.mu.RUnlock()
	var err error
	if st == nil {
		err = m.kv.Delete(ctx, NS, kvrec.Key(workerID))
	} else {
		var data []byte
		if data, err = json.Marshal(rec); err == nil {
			err = m.kv.Put(ctx, NS, kvrec.Key(workerID), data)
		}
	}
	if err != nil {
		return fmt.Errorf("%w: %s/%s: %w", ErrPersist, NS, workerID, err)
	}
	return nil
}

// Load restores persisted health; call it once at start, before any outcome. Records that cannot be used are
// skipped, each reported as a *CorruptRecordError in the joined error; Workers already in memory are kept.
// It returns the number of Workers restored and calls no OnChange. A KV listing error aborts it.
func (m *Monitor) Load(ctx context.Context) (int, error) {
	if m.kv == nil {
		return 0, nil
	}
	var errs []error
	loaded := map[string]Status{}
	err := m.kv.List(ctx, NS, func(key string, value []byte) error {
		var rec record
		err := json.Unmarshal(value, &rec)
		switch {
		case err != nil:
		case rec.WorkerID == "":
			err = errors.New("no workerId")
		case kvrec.Key(rec.WorkerID) != key:
			err = fmt.Errorf("workerId %q does not match its key", rec.WorkerID)
		case !slices.Contains(States, rec.State):
			err = fmt.Errorf("unknown state %q", rec.State)
		case rec.ConsecutiveFailures < 0:
			err = fmt.Errorf("negative failure count %d", rec.ConsecutiveFailures)
		}
		if err != nil {
			errs = append(errs, &CorruptRecordError{Key: key, Err: err})
			return nil
		}
		loaded[rec.WorkerID] = Status{
			State: rec.State, ConsecutiveFailures: rec.ConsecutiveFailures, LastChange: kvrec.FromUnixMilli(rec.LastChange),
			LastSuccess: kvrec.FromUnixMilli(rec.LastSuccess), LastFailure: kvrec.FromUnixMilli(rec.LastFailure),
			LastError: rec.LastError,
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("%w: list %s: %w", ErrPersist, NS, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for id, st := range loaded {
		if _, known := m.workers[id]; !known {
			m.workers[id] = &st
			n++
		}
	}
	return n, errors.Join(errs...)
}

type change struct{ workerID, from, to string }

// onChange adapts Options.OnChange to the notify queue (nil: no queue).
func onChange(fn func(workerID, from, to string)) func(change) {
	if fn == nil {
		return nil
	}
	return func(c change) { fn(c.workerID, c.from, c.to) }
}
