package commands

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/orknode/ork/protocols/envelope"
)

// Command states, re-exported from envelope.
const (
	Queued     = envelope.StateQueued
	Dispatched = envelope.StateDispatched
	Executing  = envelope.StateExecuting
	Success    = envelope.StateSuccess
	Failed     = envelope.StateFailed
	Timeout    = envelope.StateTimeout
	Cancelled  = envelope.StateCancelled
)

// States lists every command state in lifecycle order.
var States = []string{Queued, Dispatched, Executing, Success, Failed, Timeout, Cancelled}

// transitions is the command lifecycle table (DESIGN §6), consulted by every state change:
//
//	QUEUED     → DISPATCHED                  a device slot and a send slot were taken
//	QUEUED     → CANCELLED                   Cancel
//	QUEUED     → FAILED                      deadline passed while queued (ERR_COMMAND_EXPIRED), or the
//	                                         resend budget ran out (ERR_MAX_RETRIES_EXHAUSTED)
//	DISPATCHED → EXECUTING                   the request is going out
//	DISPATCHED → QUEUED                      recovery: a dispatch that provably never left
//	DISPATCHED → FAILED                      never delivered and no budget left
//	EXECUTING  → SUCCESS | FAILED            the Worker answered (send or command.status)
//	EXECUTING  → TIMEOUT                     outcome unknown and the Worker could not be asked in time
//	                                         (ERR_COMMAND_OUTCOME_UNKNOWN)
//	EXECUTING  → QUEUED                      the Worker provably never saw it (not delivered, or command.status
//	                                         answered UNKNOWN) and budget is left: resend
//
// SUCCESS, FAILED, TIMEOUT and CANCELLED are terminal: no exits. TIMEOUT is final here (unlike MDK, where it
// was "semi-terminal"): nothing whose outcome is unknown is ever resent.
var transitions = map[string][]string{
	Queued:     {Dispatched, Cancelled, Failed},
	Dispatched: {Executing, Queued, Failed},
	Executing:  {Success, Failed, Timeout, Queued},
	Success:    nil,
	Failed:     nil,
	Timeout:    nil,
	Cancelled:  nil,
}

// ErrIllegalTransition is matched by every *TransitionError.
var ErrIllegalTransition = errors.New("ork/commands: illegal transition")

// TransitionError is a state change the table does not allow (or a state it does not know).
type TransitionError struct {
	ID       string // command id, when known
	From, To string
}

func (e *TransitionError) Error() string {
	if e.ID != "" {
		return fmt.Sprintf("ork/commands: command %s: illegal transition %s → %s", e.ID, e.From, e.To)
	}
	return fmt.Sprintf("ork/commands: illegal transition %s → %s", e.From, e.To)
}

func (e *TransitionError) Unwrap() error { return ErrIllegalTransition }

// Transition returns nil if the table allows from → to, else a *TransitionError.
func Transition(from, to string) error {
	for _, s := range transitions[from] {
		if s == to {
			return nil
		}
	}
	return &TransitionError{From: from, To: to}
}

func isTerminal(s string) bool {
	return s == Success || s == Failed || s == Timeout || s == Cancelled
}

// step moves rec to state to, stamping UpdatedAt, if the table allows it.
func step(rec *Record, to string, now int64) error {
	if err := Transition(rec.State, to); err != nil {
		err.(*TransitionError).ID = rec.CommandID
		return err
	}
	rec.State = to
	rec.UpdatedAt = now
	return nil
}

// steps applies several transitions in order (logical steps folded into one write).
func steps(rec *Record, now int64, to ...string) error {
	for _, s := range to {
		if err := step(rec, s, now); err != nil {
			return err
		}
	}
	return nil
}

// fail moves rec to FAILED (or another terminal state) with an MDK error string.
func fail(rec *Record, state, code, detail string, now int64) error {
	if err := step(rec, state, now); err != nil {
		return err
	}
	if detail != "" {
		rec.Error = code + ": " + detail
	} else {
		rec.Error = code
	}
	return nil
}

func pastDeadline(rec *Record, now int64) bool { return rec.Deadline != 0 && now >= rec.Deadline }

// action is what the runner does after a pure decision.
type action int

const (
	actFinish      action = iota // the record is terminal: Finish it
	actRequeue                   // the record is QUEUED again (budget spent): back to the head of its queue
	actRetryStatus               // outcome still unknown: ask command.status again after a backoff
)

func (a action) String() string {
	switch a {
	case actFinish:
		return "finish"
	case actRequeue:
		return "requeue"
	case actRetryStatus:
		return "retry-status"
	}
	return fmt.Sprintf("action(%d)", int(a))
}

// dispatchRecord is the DISPATCHED write: taken from QUEUED, one more attempt, Delivered set before the send
// (see Record.Delivered).
func dispatchRecord(rec Record, workerID string, now int64) (Record, error) {
	if err := step(&rec, Dispatched, now); err != nil {
		return rec, err
	}
	rec.Attempts++
	rec.Delivered = true
	rec.Error = ""
	if workerID != "" {
		rec.WorkerID = workerID
	}
	return rec, nil
}

// onReply settles a Worker's command.result (or a final command.status): SUCCESS is SUCCESS, anything else is
// FAILED. Worker failures are never retried.
func onReply(rec Record, r Reply, now int64) (Record, error) {
	if r.Status == Success {
		if err := step(&rec, Success, now); err != nil {
			return rec, err
		}
		rec.Result, rec.Error = r.Result, ""
		if len(rec.Result) == 0 {
			rec.Result = json.RawMessage(`{}`)
		}
		return rec, nil
	}
	if err := step(&rec, Failed, now); err != nil {
		return rec, err
	}
	rec.Result, rec.Error = r.Result, r.Error
	if rec.Error == "" {
		rec.Error = envelope.CodeCommandFailed
	}
	return rec, nil
}

// resend decides what a command that the Worker provably never saw becomes: QUEUED with one retry spent, or
// FAILED when the deadline has passed (ERR_COMMAND_EXPIRED) or the budget is gone (ERR_MAX_RETRIES_EXHAUSTED).
func resend(rec Record, why string, now int64) (Record, action, error) {
	switch {
	case pastDeadline(&rec, now):
		return rec, actFinish, fail(&rec, Failed, envelope.CodeCommandExpired, why, now)
	case rec.Retries <= 0:
		err := fail(&rec, Failed, envelope.CodeMaxRetriesExhausted, fmt.Sprintf("%s after %d attempts", why, rec.Attempts), now)
		return rec, actFinish, err
	}
	if err := step(&rec, Queued, now); err != nil {
		return rec, actRequeue, err
	}
	rec.Retries--
	return rec, actRequeue, nil
}

// onNotDelivered settles a Send error that provably never reached the Worker.
func onNotDelivered(rec Record, now int64) (Record, action, error) {
	return resend(rec, "not delivered", now)
}

// onStatus settles the Worker's answer to command.status while the outcome was unknown. resolveBy is when the
// Manager stops asking.
func onStatus(rec Record, r Reply, resolveBy time.Time, now int64) (Record, action, error) {
	switch r.Status {
	case Success, Failed:
		rec, err := onReply(rec, r, now)
		return rec, actFinish, err
	case envelope.StatusUnknown:
		return resend(rec, "worker never saw it", now)
	}
	// Anything else (the Worker is still running it, or answered nonsense): still unknown.
	return onStatusError(rec, resolveBy, now)
}

// onStatusError settles a failed command.status question: ask again later, or, once resolveBy has passed,
// TIMEOUT with ERR_COMMAND_OUTCOME_UNKNOWN.
func onStatusError(rec Record, resolveBy time.Time, now int64) (Record, action, error) {
	if now < resolveBy.UnixMilli() {
		return rec, actRetryStatus, nil
	}
	err := fail(&rec, Timeout, envelope.CodeCommandOutcomeUnknown, fmt.Sprintf("no answer from worker %s", rec.WorkerID), now)
	return rec, actFinish, err
}

// expireRecord fails a command whose deadline passed while it was queued.
func expireRecord(rec Record, now int64) (Record, error) {
	return rec, fail(&rec, Failed, envelope.CodeCommandExpired, "", now)
}

// cancelRecord cancels a queued command.
func cancelRecord(rec Record, now int64) (Record, error) {
	return rec, fail(&rec, Cancelled, envelope.CodeCancelled, "", now)
}

// timeoutRecord ends a command whose outcome stayed unknown until resolveBy.
func timeoutRecord(rec Record, now int64) (Record, error) {
	return rec, fail(&rec, Timeout, envelope.CodeCommandOutcomeUnknown, fmt.Sprintf("no answer from worker %s", rec.WorkerID), now)
}

// recovery is what Recover does with one swept record.
type recovery int

const (
	recQueue   recovery = iota // back into its device queue, in creation order
	recUnknown                 // delivered: outcome unknown, ask the Worker before anything else
	recParent                  // fan-out parent: wait for its children
	recFinish                  // terminal record left in the WAL: move it to the results
)

// recoverRecord decides the fate of a swept WAL record and returns it in its in-memory state.
func recoverRecord(rec Record, now int64) (Record, recovery, error) {
	switch {
	case rec.Terminal():
		return rec, recFinish, nil
	case rec.IsParent():
		return rec, recParent, nil
	case rec.State == Queued:
		return rec, recQueue, nil
	case !rec.Delivered:
		// A dispatch that provably never left: queue it again. Not a retry: nothing was sent.
		return rec, recQueue, step(&rec, Queued, now)
	case rec.State == Dispatched:
		return rec, recUnknown, step(&rec, Executing, now)
	}
	return rec, recUnknown, nil // EXECUTING, delivered
}

// childSummary is a fan-out parent's tally of its finished children.
type childSummary struct {
	Total     int `json:"total"`
	Success   int `json:"success"`
	Failed    int `json:"failed"`
	Timeout   int `json:"timeout"`
	Cancelled int `json:"cancelled"`
}

func (s *childSummary) add(state string) {
	switch state {
	case Success:
		s.Success++
	case Timeout:
		s.Timeout++
	case Cancelled:
		s.Cancelled++
	default:
		s.Failed++
	}
}

func (s *childSummary) done() int { return s.Success + s.Failed + s.Timeout + s.Cancelled }

// parentOutcome ends a fan-out parent once every child is terminal: SUCCESS if all succeeded, else FAILED with
// an error that counts the others. Result carries the tally either way.
func parentOutcome(rec Record, s childSummary, now int64) (Record, error) {
	res, _ := json.Marshal(s)
	if s.Success == s.Total {
		if err := step(&rec, Success, now); err != nil {
			return rec, err
		}
		rec.Result, rec.Error = res, ""
		return rec, nil
	}
	detail := fmt.Sprintf("%d of %d children did not succeed (failed %d, timeout %d, cancelled %d)",
		s.Total-s.Success, s.Total, s.Failed, s.Timeout, s.Cancelled)
	if err := fail(&rec, Failed, envelope.CodeCommandFailed, detail, now); err != nil {
		return rec, err
	}
	rec.Result = res
	return rec, nil
}

// backoff is the delay before attempt n (n ≥ 1) of a retried step: base·2^(n-1), capped at max, with "equal
// jitter" (half fixed, half random) so a fleet of retries does not synchronise. jitter(k) returns a value in
// [0, k); nil uses math/rand/v2.
func backoff(n int, base, max time.Duration, jitter func(int64) int64) time.Duration {
	if n < 1 {
		n = 1
	}
	d := base
	for i := 1; i < n && d < max; i++ {
		d *= 2
	}
	if d > max {
		d = max
	}
	half := int64(d / 2)
	if half <= 0 {
		return d
	}
	if jitter == nil {
		jitter = rand.Int64N
	}
	return time.Duration(half + jitter(half+1))
}
