// Package commands is the Command State Machine (CSM): it owns every command from admission to a terminal
// state (DESIGN §6, §7), fixing the defects of the original (MDK-REFERENCE §11.3 rows 1, 2, 4, 6; §12 items
// 1–3).
//
// # States
//
//	         Submit
//	           │  (device idle and Worker routable: admitted directly as DISPATCHED, one write)
//	           ▼
//	┌────── QUEUED ◄───────────────────────────┐
//	│          │ device free, Worker routable, │ not delivered (retries left, after a backoff),
//	│          ▼ concurrency slot free         │ or command.status answered UNKNOWN
//	│      DISPATCHED ── request goes out ─► EXECUTING ──► SUCCESS | FAILED (the Worker's answer)
//	│                                            └──────► TIMEOUT (outcome unknown until the deadline)
//	├──► CANCELLED (Cancel)
//	└──► FAILED    (deadline passed while queued: ERR_COMMAND_EXPIRED; budget spent: ERR_MAX_RETRIES_EXHAUSTED)
//
// Transition is the table; every state change goes through it, and an illegal one is an error, never applied.
// SUCCESS, FAILED, TIMEOUT and CANCELLED are terminal.
//
// # Persistence: write, then act
//
// Each command is one WAL record (a current-state table keyed by commandId, JSON Record). A transition is
// written — durably; the node's WAL group-commits concurrent writes into one sync — before its side effect:
//   - admission: one Put, as QUEUED, or directly as DISPATCHED when the command can be sent at once (QUEUED is
//     then a logical step with no write of its own); Submit returns once it is durable;
//   - dispatch: one Put of DISPATCHED with delivered=true before Send. EXECUTING is an in-memory step taken as
//     the request goes out; it is not written separately, because the DISPATCHED record already says what a
//     crash must assume from then on: the request may have reached the Worker;
//   - a resend (QUEUED again, one retry spent): one Put;
//   - terminal: one Finish, which atomically keeps the record as the retained result (readable for
//     ResultTTL, 24 h by default) and deletes the WAL record. Then Options.OnDone, then waiters are woken, then
//     the device is released and its next command dispatched.
//
// So the happy path costs two durable writes per command: admission(+dispatch) and Finish.
//
// # Retries
//
// A Worker's answer is final: SUCCESS is SUCCESS, anything else is FAILED, never retried. A Send error is
// classified by Options.NotDelivered:
//   - not delivered (the request provably never left): QUEUED again with one retry spent, held at the head of
//     its device queue for an exponential backoff with jitter; with no retry left, FAILED
//     ERR_MAX_RETRIES_EXHAUSTED;
//   - outcome unknown (written, no reply): never resent blindly. The Worker is asked (command.status): SUCCESS
//     or FAILED is taken as the outcome; UNKNOWN (it never saw the command) means QUEUED for a resend (one retry
//     spent); no answer means ask again with backoff, holding the device, until the command's deadline (or
//     OutcomeTimeout when it has none), then TIMEOUT with ERR_COMMAND_OUTCOME_UNKNOWN.
//
// MaxRetries bounds resends: a command is sent at most 1+MaxRetries times. The Worker SDK's commandId → result
// cache makes a resend of a command it did see harmless, but the kernel does not rely on it.
//
// # Crash rules (Recover)
//
// After a crash a DISPATCHED or EXECUTING record with delivered=true is outcome-unknown until the Worker says
// otherwise: it is asked before anything is resent. delivered=false means nothing was sent: the command is
// queued again. QUEUED commands are queued again in creation order. Nothing is left stranded: queued commands
// are pumped when their Worker becomes routable (Pump, PumpAll), unknown outcomes end by their deadline.
// Drain and Close write nothing: whatever is in flight when the process stops stays in the WAL as last
// written, and the next Recover applies these rules to it.
//
// # Queues and scopes
//
// Each device has a FIFO (modules/concurrency) with one command in flight at a time and a bounded depth
// (ERR_QUEUE_FULL); a command still queued at its deadline fails with ERR_COMMAND_EXPIRED. A fan-out (worker or
// rack scope) is a parent record with child commands, one per device: the parent is never dispatched, and ends
// when its last child does — SUCCESS if all succeeded, else FAILED with counts.
//
// The Manager calls Workers through Sender, asks Routable/Owner about routing and reads time through
// Options.Now/AfterFunc; it imports no networking and no store. Its goroutines are one per send or Status
// question in flight (bounded by Options.Concurrency) and one per final write of an expired or timed-out
// command; Close stops them all and waits for them. (Submit also writes a fan-out's records from short-lived
// goroutines that end before it returns.)
package commands
