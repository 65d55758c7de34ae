package commands

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/orknode/ork/protocols/envelope"
)

// Sentinel errors.
var (
	// ErrNotFound is what a WAL returns from Result when no retained result exists for the id. The node's
	// adapter must map its store's own not-found error to it (errors.Is is used).
	ErrNotFound = errors.New("ork/commands: not found")
	// ErrClosed is returned by Submit (and Recover) after Close.
	ErrClosed = errors.New("ork/commands: manager closed")
	// ErrInvalid is returned by Submit for records it cannot admit: no command, a duplicate id, a fan-out parent
	// without children, an idempotency key on anything but the first record. The node validates payloads before
	// building records, so this is a programming error, not a caller's.
	ErrInvalid = errors.New("ork/commands: invalid record")
	// ErrAttemptTimeout is the cancellation cause (context.Cause) of a Send or Status call that ran longer than
	// Options.CommandTimeout.
	ErrAttemptTimeout = errors.New("ork/commands: attempt timed out")
)

// WAL is the persistence the module needs; the node adapts its LevelDB group-commit WAL to it. Every method
// that writes returns nil only once the write is durable. A write that returns an error may still have landed
// (the store's "outcome unknown"); the state machine is built so that either outcome is safe after a restart.
type WAL interface {
	// Put stores rec as the current record of command id (a current-state table: the latest Put wins).
	Put(ctx context.Context, id string, rec []byte) error
	// Finish atomically keeps rec as the retained result of id and deletes id's WAL record.
	Finish(ctx context.Context, id string, rec []byte) error
	// Sweep calls fn for every WAL record (every non-terminal command), in any order.
	Sweep(ctx context.Context, fn func(id string, rec []byte) error) error
	// Result returns the retained result of id, or an error matching ErrNotFound.
	Result(ctx context.Context, id string) ([]byte, error)
	// ExpireResults deletes retained results last updated before olderThan and returns how many it deleted.
	ExpireResults(ctx context.Context, olderThan time.Time) (int, error)
}

// ResultSweeper is optionally implemented by a WAL that can list its retained results. When it is, Recover
// also rebuilds the idempotency index from them, so an idempotency key keeps deduplicating for ResultTTL across
// restarts; without it a key is deduplicated across a restart only while its command is unfinished. It reads
// every retained result once per start.
type ResultSweeper interface {
	SweepResults(ctx context.Context, fn func(id string, rec []byte) error) error
}

// Sender calls Workers. The node implements it over /ork/worker/command/1.0.0.
type Sender interface {
	// Send delivers one command to the Worker that owns rec.DeviceID (rec.WorkerID is the owner the Manager
	// routed to) and waits for its command.result.
	Send(ctx context.Context, rec Record) (Reply, error)
	// Status asks the Worker what became of rec.CommandID (worker-side command.status): SUCCESS or FAILED with
	// the result, or envelope.StatusUnknown if it never saw the command.
	Status(ctx context.Context, rec Record) (Reply, error)
}

// Reply is a Worker's command.result or command.status answer.
type Reply struct {
	Status string          // envelope.StateSuccess, envelope.StateFailed or envelope.StatusUnknown
	Result json.RawMessage // SUCCESS: the result
	Error  string          // FAILED: the Worker's error string
}

// Record is one command: the value of its WAL record (JSON), of its retained result, and what Sender receives.
type Record struct {
	CommandID      string `json:"commandId"`
	ParentID       string `json:"parentId,omitempty"`
	IdempotencyKey string `json:"idempotencyKey,omitempty"`
	State          string `json:"state"`
	Scope          string `json:"scope"`
	DeviceID       string `json:"deviceId"` // empty only for a fan-out parent
	WorkerID       string `json:"workerId"`
	Rack           string `json:"rack,omitempty"`
	Command        string `json:"command"`
	// Params is the caller's params object, passed through unparsed.
	Params      json.RawMessage `json:"params"`
	RequesterID string          `json:"requesterId"`
	// Retries is the remaining resend budget: a command is sent at most 1+MaxRetries times.
	Retries  int `json:"retries"`
	Attempts int `json:"attempts"` // sends so far
	// Deadline (ms since the epoch, 0 none): a command still queued at its deadline fails ERR_COMMAND_EXPIRED;
	// a command whose outcome is unknown is resolved by then or times out.
	Deadline int64 `json:"deadline"`
	// Delivered: a request for this command may have been written to a Worker. It is persisted as true in the
	// DISPATCHED write, before the send, so a crash between that write and the send is treated as "outcome
	// unknown" (the Worker is asked) rather than as "never sent" (which would allow a resend).
	Delivered bool            `json:"delivered"`
	Result    json.RawMessage `json:"result,omitempty"`
	Error     string          `json:"error,omitempty"`
	CreatedAt int64           `json:"createdAt"`          // ms since the epoch
	UpdatedAt int64           `json:"updatedAt"`          // ms since the epoch, stamped on every change
	Children  []string        `json:"children,omitempty"` // fan-out parent: its child command ids, in order
}

// IsParent reports whether r is a fan-out parent (worker or rack scope): it is never dispatched itself.
func (r *Record) IsParent() bool { return len(r.Children) > 0 }

// Terminal reports whether r is in a final state.
func (r *Record) Terminal() bool { return isTerminal(r.State) }

// CommandStatus renders r as the command.status / command.wait payload.
func (r *Record) CommandStatus() envelope.CommandStatus {
	scope := r.Scope
	if scope == "" {
		scope = envelope.ScopeDevice
	}
	return envelope.CommandStatus{
		CommandID: r.CommandID,
		Status:    r.State,
		Command:   r.Command,
		DeviceID:  r.DeviceID,
		WorkerID:  r.WorkerID,
		Scope:     scope,
		ParentID:  r.ParentID,
		Children:  r.Children,
		Retries:   r.Retries,
		Attempts:  r.Attempts,
		Result:    r.Result,
		Error:     r.Error,
		CreatedAt: r.CreatedAt,
		UpdatedAt: r.UpdatedAt,
	}
}

func encode(r *Record) ([]byte, error) { return json.Marshal(r) }

func decode(id string, b []byte) (Record, error) {
	var r Record
	if err := json.Unmarshal(b, &r); err != nil {
		return Record{}, err
	}
	if r.CommandID == "" {
		r.CommandID = id
	}
	if _, ok := transitions[r.State]; !ok {
		return Record{}, fmt.Errorf("unknown state %q", r.State)
	}
	return r, nil
}

func notFound(id string) error {
	return envelope.Errf(envelope.CodeCommandNotFound, "%s", id)
}
