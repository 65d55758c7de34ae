package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/orknode/ork/modules/commands"
	"github.com/orknode/ork/modules/dispatcher"
	"github.com/orknode/ork/modules/registry"
	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/protocols/rpc"
	"github.com/orknode/ork/store"
)

// maxWait caps one command.wait long-poll; callers loop for longer waits.
const maxWait = 60 * time.Second

// walAdapter gives the command state machine its WAL over the store's
// group-committed one: current records in /wal, retained results in /cmdres.
type walAdapter struct{ s *store.Store }

func (a walAdapter) Put(ctx context.Context, id string, rec []byte) error {
	return a.s.WAL().Append(ctx, id, rec)
}

func (a walAdapter) Finish(ctx context.Context, id string, rec []byte) error {
	return a.s.WAL().Apply(ctx,
		store.Op{NS: store.NSResults, Key: id, Value: rec},
		store.Op{NS: store.NSWAL, Key: id, Delete: true})
}

func (a walAdapter) Sweep(ctx context.Context, fn func(id string, rec []byte) error) error {
	return a.s.WAL().Sweep(ctx, fn)
}

func (a walAdapter) SweepResults(ctx context.Context, fn func(id string, rec []byte) error) error {
	return a.s.List(ctx, store.NSResults, fn)
}

func (a walAdapter) Result(ctx context.Context, id string) ([]byte, error) {
	b, err := a.s.Get(ctx, store.NSResults, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil, commands.ErrNotFound
	}
	return b, err
}

// ExpireResults deletes retained results last updated before olderThan, in
// batches of one WAL commit each.
func (a walAdapter) ExpireResults(ctx context.Context, olderThan time.Time) (int, error) {
	cut := olderThan.UnixMilli()
	var ops []store.Op
	err := a.s.List(ctx, store.NSResults, func(id string, rec []byte) error {
		var r struct {
			UpdatedAt int64 `json:"updatedAt"`
		}
		if json.Unmarshal(rec, &r) != nil || r.UpdatedAt < cut {
			ops = append(ops, store.Op{NS: store.NSResults, Key: id, Delete: true})
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	for i := 0; i < len(ops); i += 1024 {
		if err := a.s.WAL().Apply(ctx, ops[i:min(i+1024, len(ops))]...); err != nil {
			return i, err
		}
	}
	return len(ops), nil
}

// errNoRoute: the command's Worker has no known peer; nothing was sent.
var errNoRoute = errors.New("ork/node: worker has no peer")

// workerCommand is command.request as sent to a Worker, with the params passed
// through as the caller's raw JSON.
type workerCommand struct {
	CommandID string          `json:"commandId"`
	Command   string          `json:"command"`
	Params    json.RawMessage `json:"params,omitempty"`
	Scope     string          `json:"scope"`
	WorkerID  string          `json:"workerId,omitempty"`
	TimeoutMs int64           `json:"timeoutMs,omitempty"`
}

// commandSender delivers commands to Workers for the state machine.
type commandSender struct{ n *Node }

func (s commandSender) peerOf(workerID string) (peer.ID, error) {
	w, ok := s.n.reg.Worker(workerID)
	if !ok || w.PeerID == "" {
		return "", errNoRoute
	}
	return peer.Decode(w.PeerID)
}

// attemptTiming splits one Send's time: budget is how long the kernel waits
// for the Worker's answer (the attempt timeout, commands.timeoutMs, or what
// is left of the command's deadline, whichever is smaller); workerTimeout,
// sent as timeoutMs, is a little less, so that the Worker's own FAILED
// ERR_COMMAND_EXPIRED answer arrives before the kernel stops waiting. ok is
// false when the command's deadline has already passed.
func attemptTiming(attempt time.Duration, deadline int64, now time.Time) (budget, workerTimeout time.Duration, ok bool) {
	budget = attempt
	if deadline != 0 {
		left := time.UnixMilli(deadline).Sub(now)
		if left <= 0 {
			return 0, 0, false
		}
		budget = min(budget, left)
	}
	grace := min(max(budget/10, 200*time.Millisecond), 2*time.Second, budget/2)
	workerTimeout = max(budget-grace, time.Millisecond)
	return budget, workerTimeout, true
}

func (s commandSender) Send(ctx context.Context, rec commands.Record) (commands.Reply, error) {
	p, err := s.peerOf(rec.WorkerID)
	if err != nil {
		return commands.Reply{}, err
	}
	budget, workerTimeout, ok := attemptTiming(ms(s.n.cfg.Commands.TimeoutMs), rec.Deadline, time.Now())
	if !ok {
		// Nothing sent: the command's deadline passed before it could go.
		return commands.Reply{Status: envelope.StateFailed,
			Error: envelope.Errf(envelope.CodeCommandExpired, "deadline passed before dispatch").Message}, nil
	}
	req := workerCommand{CommandID: rec.CommandID, Command: rec.Command, Params: rec.Params, Scope: envelope.ScopeDevice,
		WorkerID: rec.WorkerID, TimeoutMs: max(workerTimeout.Milliseconds(), 1)}
	// The state machine's attempt context has no deadline (it is cancelled by
	// a timer); without one the stream would fall back on the rpc client's
	// CallTimeout, whatever commands.timeoutMs says.
	cctx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()
	return s.ask(ctx, cctx, p, rec, envelope.ActionCommandRequest, req)
}

func (s commandSender) Status(ctx context.Context, rec commands.Record) (commands.Reply, error) {
	p, err := s.peerOf(rec.WorkerID)
	if err != nil {
		return commands.Reply{}, err
	}
	cctx, cancel := context.WithTimeout(ctx, ms(s.n.cfg.Commands.TimeoutMs))
	defer cancel()
	return s.ask(ctx, cctx, p, rec, envelope.ActionCommandStatus, envelope.CommandRef{CommandID: rec.CommandID})
}

// ask makes one call on cctx (derived from the state machine's attempt
// context actx) and turns the outcome into a Reply or an error for the state
// machine.
func (s commandSender) ask(actx, cctx context.Context, p peer.ID, rec commands.Record, action string, payload any) (commands.Reply, error) {
	var res envelope.CommandResult
	err := s.n.callWorker(cctx, p, protocols.WorkerCommand, action, rec.DeviceID, payload, &res)
	if err == nil {
		return commands.Reply{Status: res.Status, Result: res.Result, Error: res.Error}, nil
	}
	var e *envelope.Error
	if errors.As(err, &e) {
		if e.Code == envelope.CodeBusy {
			return commands.Reply{}, fmt.Errorf("%w: %v", rpc.ErrNotDelivered, e)
		}
		if action == envelope.ActionCommandStatus {
			// An error answer to command.status (ERR_INTERNAL, or
			// ERR_UNKNOWN_ACTION from a Worker that does not implement it) says
			// nothing about the command, which may well have succeeded: the
			// state machine asks again later, until the command's deadline.
			return commands.Reply{}, fmt.Errorf("worker %s answered command.status with an error: %w", rec.WorkerID, e)
		}
		// The Worker answered command.request, refusing: that is its final word.
		return commands.Reply{Status: envelope.StateFailed, Error: e.Error()}, nil
	}
	if cause := context.Cause(actx); cause != nil && !errors.Is(err, cause) {
		err = fmt.Errorf("%w (%v)", err, cause)
	}
	// Only a Worker that could not be reached counts against its health. A
	// request that was delivered and then ran out of time (a slow command, or
	// the attempt timeout, commands.ErrAttemptTimeout) says nothing about the
	// Worker; nor does a call cut short because the node is stopping.
	if rpc.IsNotDelivered(err) && s.n.ctx.Err() == nil && !errors.Is(context.Cause(actx), context.Canceled) {
		s.n.health.Failure(s.n.ctx, rec.WorkerID, err.Error())
	}
	return commands.Reply{}, err
}

func notDelivered(err error) bool {
	return rpc.IsNotDelivered(err) || errors.Is(err, errNoRoute)
}

// directory gives the dispatcher its view of the registry.
type directory struct{ reg *registry.Registry }

func (d directory) ResolveDevice(id string) (string, bool) {
	w, _, ok := d.reg.ResolveDevice(id)
	return w, ok
}
func (d directory) WorkerExists(id string) bool {
	w, ok := d.reg.Worker(id)
	return ok && w.State != envelope.WorkerTerminated
}
func (d directory) DevicesOf(id string) []string { return deviceIDs(d.reg.DevicesOf(id)) }
func (d directory) DevicesInRack(rack string) []dispatcher.DeviceRef {
	refs := d.reg.DevicesInRack(rack)
	out := make([]dispatcher.DeviceRef, len(refs))
	for i, r := range refs {
		out[i] = dispatcher.DeviceRef{DeviceID: r.DeviceID, WorkerID: r.WorkerID}
	}
	return out
}
func (d directory) ContractOf(id string) *envelope.Contract { return d.reg.Contract(id) }
func (d directory) Routable(id string) bool                 { return d.reg.Routable(id) }

func deviceIDs(ds []envelope.DeviceInfo) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = d.DeviceID
	}
	return out
}

// planRecords turns an admitted plan into state-machine records: one device
// command, or a fan-out parent followed by its children. Their deadline is
// the caller's timeoutMs, else defaultDeadline (commands.defaultDeadlineMs;
// 0: none), so that a command queued for a Worker that never becomes
// routable again ends ERR_COMMAND_EXPIRED instead of waiting forever.
func planRecords(plan dispatcher.Plan, requester string, now time.Time, defaultDeadline time.Duration) ([]commands.Record, error) {
	var deadline int64
	if plan.TimeoutMs > 0 {
		deadline = now.Add(time.Duration(plan.TimeoutMs) * time.Millisecond).UnixMilli()
	} else if defaultDeadline > 0 {
		deadline = now.Add(defaultDeadline).UnixMilli()
	}
	recs := make([]commands.Record, 0, len(plan.Children)+1)
	if plan.Parent != nil {
		params, err := json.Marshal(plan.Parent.Params)
		if err != nil {
			return nil, err
		}
		recs = append(recs, commands.Record{
			Scope: plan.Scope, WorkerID: plan.Parent.WorkerID, Rack: plan.Rack, Command: plan.Parent.Command,
			Params: params, RequesterID: requester, IdempotencyKey: plan.IdempotencyKey, Deadline: deadline,
		})
	}
	for i, c := range plan.Children {
		params, err := json.Marshal(c.Params)
		if err != nil {
			return nil, err
		}
		r := commands.Record{
			Scope: envelope.ScopeDevice, DeviceID: c.DeviceID, WorkerID: c.WorkerID, Command: c.Command,
			Params: params, RequesterID: requester, Deadline: deadline,
		}
		if plan.Parent == nil && i == 0 {
			r.IdempotencyKey = plan.IdempotencyKey
		}
		recs = append(recs, r)
	}
	return recs, nil
}

func (n *Node) handleCommandRequest(ctx context.Context, remote peer.ID, req *envelope.Envelope) (any, error) {
	plan, err := n.dispatch.Admit(req)
	if err != nil {
		return nil, err
	}
	recs, err := planRecords(plan, remote.String(), time.Now(), ms(n.cfg.Commands.DefaultDeadlineMs))
	if err != nil {
		return nil, envelope.Errf(envelope.CodeInternal, "%v", err)
	}
	admitted, err := n.cmds.Submit(ctx, recs...)
	if err != nil {
		var e *envelope.Error
		if errors.As(err, &e) {
			return nil, e
		}
		return nil, envelope.Errf(envelope.CodeInternal, "%v", err)
	}
	first := admitted[0]
	acc := envelope.CommandAccepted{CommandID: first.CommandID, Status: first.State, Children: first.Children}
	if plan.WaitMs > 0 {
		wait := min(time.Duration(plan.WaitMs)*time.Millisecond, maxWait)
		// Long-poll: answer when the command ends (or the wait runs out).
		wctx, cancel := context.WithTimeout(ctx, wait)
		defer cancel()
		if st, err := n.cmds.Wait(wctx, first.CommandID); err == nil {
			acc.Status, acc.Result, acc.Error = st.Status, st.Result, st.Error
		}
	}
	return acc, nil
}

func (n *Node) commandRef(ctx context.Context, req *envelope.Envelope) (envelope.CommandRef, error) {
	var ref envelope.CommandRef
	if err := req.DecodePayload(&ref); err != nil {
		return ref, err
	}
	if ref.CommandID == "" && ref.IdempotencyKey != "" {
		id, ok := n.cmds.LookupKey(ref.IdempotencyKey)
		if !ok {
			return ref, envelope.Errf(envelope.CodeCommandNotFound, "idempotencyKey %s", ref.IdempotencyKey)
		}
		ref.CommandID = id
	}
	if ref.CommandID == "" {
		return ref, envelope.Err(envelope.CodeCommandIDRequired)
	}
	return ref, nil
}

func (n *Node) handleCommandStatus(ctx context.Context, _ peer.ID, req *envelope.Envelope) (any, error) {
	ref, err := n.commandRef(ctx, req)
	if err != nil {
		return nil, err
	}
	return n.cmds.Status(ctx, ref.CommandID)
}

func (n *Node) handleCommandWait(ctx context.Context, _ peer.ID, req *envelope.Envelope) (any, error) {
	ref, err := n.commandRef(ctx, req)
	if err != nil {
		return nil, err
	}
	wait := time.Duration(ref.TimeoutMs) * time.Millisecond
	if wait <= 0 || wait > maxWait {
		wait = maxWait
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	return n.cmds.Wait(wctx, ref.CommandID)
}

func (n *Node) handleCommandCancel(ctx context.Context, _ peer.ID, req *envelope.Envelope) (any, error) {
	ref, err := n.commandRef(ctx, req)
	if err != nil {
		return nil, err
	}
	ok, err := n.cmds.Cancel(ctx, ref.CommandID)
	if err != nil {
		return nil, err
	}
	return envelope.CommandCancelled{CommandID: ref.CommandID, Cancelled: ok}, nil
}
