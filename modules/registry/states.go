package registry

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/orknode/ork/protocols/envelope"
)

// Lifecycle states (MDK-REFERENCE §3.1), re-exported so callers of this package need not import envelope for
// them.
const (
	Unregistered  = envelope.WorkerUnregistered  // not known at all (never materialised as an entry)
	Discovered    = envelope.WorkerDiscovered    // peer ID known; registration not done (or failed, to be retried)
	IdentitySaved = envelope.WorkerIdentitySaved // identity answered, devices mapped; contract not yet accepted
	Ready         = envelope.WorkerReady         // contract accepted: routable as far as the registry is concerned
	Terminated    = envelope.WorkerTerminated    // evicted by an operator; kept in memory only
)

// States lists every lifecycle state, in lifecycle order.
var States = []string{Unregistered, Discovered, IdentitySaved, Ready, Terminated}

// transitions is the lifecycle table, consulted by every state change. It is the MDK table (§3.1) plus:
//   - READY → IDENTITY_SAVED: a READY Worker answered identity again (re-identify);
//   - DISCOVERED/IDENTITY_SAVED/READY → DISCOVERED: a registration step failed and will be retried, so no
//     Worker is ever stuck half-way (MDK bug §11.3 #7);
//   - TERMINATED → DISCOVERED: a terminated Worker discovered again may re-register (MDK bug §11.3 #8).
//
// DISCOVERED → IDENTITY_SAVED (first registration and rediscovery after a restart) is in the MDK table already.
// Nothing leads back to UNREGISTERED: a known peer is never forgotten by a transition. (Forget, outside the
// table, drops a peer that never answered identity: it was never a Worker.)
var transitions = map[string][]string{
	Unregistered:  {Discovered},
	Discovered:    {Discovered, IdentitySaved, Terminated},
	IdentitySaved: {Discovered, Ready, Terminated},
	Ready:         {Discovered, IdentitySaved, Terminated},
	Terminated:    {Discovered},
}

// CanTransition reports whether the lifecycle table allows from → to.
func CanTransition(from, to string) bool {
	return slices.Contains(transitions[from], to)
}

var (
	// ErrIllegalTransition is wrapped by every *TransitionError: the event asked for a state change the
	// lifecycle table does not allow (e.g. Ready for a Worker that never answered identity). Nothing changed.
	ErrIllegalTransition = errors.New("ork/registry: illegal transition")
	// ErrDeviceConflict is wrapped by *ConflictError: a Worker declared devices that another Worker owns. The
	// registration went ahead without those devices.
	ErrDeviceConflict = errors.New("ork/registry: device owned by another worker")
	// ErrUnknownWorker is returned (wrapped, with the id) when Terminate names a workerId, or Failed a peer ID,
	// that the registry does not know. It maps to ERR_WORKER_NOT_FOUND on the wire.
	ErrUnknownWorker = errors.New("ork/registry: unknown worker")
	// ErrInvalidIdentity is returned (wrapping the envelope validation error) when an identity answer fails
	// validation; the Worker went back to DISCOVERED.
	ErrInvalidIdentity = errors.New("ork/registry: invalid identity")
	// ErrInvalidContract is returned (wrapping the envelope validation error) when a contract fails
	// validation; the Worker went back to DISCOVERED.
	ErrInvalidContract = errors.New("ork/registry: invalid contract")
	// ErrEmptyPeerID is returned when an event names no peer ID.
	ErrEmptyPeerID = errors.New("ork/registry: empty peer id")
	// ErrPersist is wrapped (with the KV error) when a record could not be written or deleted.
	ErrPersist = errors.New("ork/registry: persist")
	// ErrCorruptRecord is wrapped by every *CorruptRecordError that Load reports.
	ErrCorruptRecord = errors.New("ork/registry: corrupt record")
	// ErrWorkerIDTaken is wrapped by every *WorkerIDTakenError: a peer answered identity with a workerId that
	// is bound to another peer, which keeps it.
	ErrWorkerIDTaken = errors.New("ork/registry: workerId bound to another peer")
)

// CodeWorkerIDTaken is the wire code of a *WorkerIDTakenError (envelope.CodeOf finds it).
const CodeWorkerIDTaken = "ERR_WORKER_ID_TAKEN"

// TransitionError is a state change the lifecycle table (or the event's own rule) refused. It wraps
// ErrIllegalTransition.
type TransitionError struct {
	Event    string // the Registry method: "IdentitySaved", "Ready", "Failed", "Terminate"
	PeerID   string
	WorkerID string
	From, To string
	Reason   string // set when the pair is in the table but this event may not take it
}

func (e *TransitionError) Error() string {
	who := e.PeerID
	if e.WorkerID != "" {
		who = e.WorkerID + " (" + e.PeerID + ")"
	}
	s := fmt.Sprintf("%v: %s: %s %s → %s", ErrIllegalTransition, e.Event, who, e.From, e.To)
	if e.Reason != "" {
		s += ": " + e.Reason
	}
	return s
}

func (e *TransitionError) Unwrap() error { return ErrIllegalTransition }

// ConflictError lists the devices a Worker declared that other Workers own. It wraps ErrDeviceConflict.
type ConflictError struct {
	WorkerID string
	Devices  []string          // conflicting device ids, in declaration order
	Owners   map[string]string // deviceId → the owning workerId
}

func (e *ConflictError) Error() string {
	parts := make([]string, len(e.Devices))
	for i, d := range e.Devices {
		parts[i] = conflictText(d, e.Owners[d])
	}
	return fmt.Sprintf("%v: %s: %s", ErrDeviceConflict, e.WorkerID, strings.Join(parts, ", "))
}

func (e *ConflictError) Unwrap() error { return ErrDeviceConflict }

func conflictText(deviceID, owner string) string { return deviceID + " owned by " + owner }

// WorkerIDTakenError refuses an identity answer whose workerId is bound to another peer (Owner) that is
// neither TERMINATED nor DEAD: a peer ID is a public key, so a second key claiming the workerId is not the
// Worker until its old peer is gone. It wraps ErrWorkerIDTaken and an *envelope.Error with CodeWorkerIDTaken.
type WorkerIDTakenError struct {
	WorkerID string
	PeerID   string // the peer that claimed WorkerID
	Owner    string // the peer WorkerID is bound to
}

func (e *WorkerIDTakenError) Error() string {
	return CodeWorkerIDTaken + ": " + e.WorkerID + " belongs to " + e.Owner
}

func (e *WorkerIDTakenError) Unwrap() []error {
	return []error{ErrWorkerIDTaken, &envelope.Error{Code: CodeWorkerIDTaken, Message: e.Error()}}
}

// CorruptRecordError is a persisted record Load could not use. It wraps ErrCorruptRecord and the cause.
type CorruptRecordError struct {
	NS, Key string
	Err     error
}

func (e *CorruptRecordError) Error() string {
	return fmt.Sprintf("%v: %s/%s: %v", ErrCorruptRecord, e.NS, e.Key, e.Err)
}

func (e *CorruptRecordError) Unwrap() []error { return []error{ErrCorruptRecord, e.Err} }
