package worker

import (
	"context"
	"encoding/json"
	"errors"
	"runtime/debug"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"

	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/protocols/rpc"
)

// Device status strings of state.response.
const (
	StatusOnline  = "online"
	StatusOffline = "offline"
)

const (
	queryMetrics = "metrics"
	// batchParallelism bounds the concurrent device reads of a batched
	// telemetry pull.
	batchParallelism = 8
)

// serve installs one rpc.Server per Worker protocol, each admitting the
// trusted kernels only.
func (w *Worker) serve() {
	table := map[protocol.ID]map[string]rpc.Handler{
		protocols.WorkerIdentity:     {envelope.ActionIdentityRequest: w.identity},
		protocols.WorkerCapabilities: {envelope.ActionCapabilityRequest: w.capabilities},
		protocols.WorkerCommand: {
			envelope.ActionCommandRequest: w.commandRequest,
			envelope.ActionCommandStatus:  w.commandStatus,
		},
		protocols.WorkerTelemetry: {envelope.ActionTelemetryPull: w.telemetryPull},
		protocols.WorkerState:     {envelope.ActionStatePull: w.statePull},
		protocols.WorkerPing:      {envelope.ActionHealthPing: w.ping},
	}
	for proto, actions := range table {
		for a, h := range actions {
			actions[a] = w.intercepted(h)
		}
		opts := rpc.ServerOptions{
			Sender:    w.cfg.WorkerID,
			Service:   "ork-worker",
			AllowPeer: w.isTrusted,
		}
		if proto == protocols.WorkerCommand {
			// A command request waits for its handler (or for the first run
			// of a duplicate); a reply after that is still worth sending.
			opts.HandlerTimeout = w.cfg.CommandTimeout + 5*time.Second
		}
		srv := rpc.NewServer(opts, actions)
		w.servers = append(w.servers, srv)
		w.h.SetStreamHandler(proto, srv.HandleStream)
	}
	w.handlersSet = true
}

func (w *Worker) intercepted(h rpc.Handler) rpc.Handler {
	if w.cfg.Intercept == nil {
		return h
	}
	return func(ctx context.Context, remote peer.ID, req *envelope.Envelope) (any, error) {
		if err := w.cfg.Intercept(ctx, remote, req.Action); err != nil {
			return nil, err
		}
		return h(ctx, remote, req)
	}
}

func (w *Worker) identity(context.Context, peer.ID, *envelope.Envelope) (any, error) {
	devs := w.Devices()
	out := envelope.IdentityResponse{
		WorkerID:     w.cfg.WorkerID,
		Devices:      make([]envelope.DeviceInfo, 0, len(devs)),
		DeviceFamily: w.contract.Metadata.DeviceFamily,
	}
	for _, d := range devs {
		out.Devices = append(out.Devices, envelope.DeviceInfo{DeviceID: d.DeviceID, Rack: d.Rack, Model: d.Model})
	}
	return out, nil
}

func (w *Worker) capabilities(context.Context, peer.ID, *envelope.Envelope) (any, error) {
	return envelope.CapabilityResponse{Contract: w.contract}, nil
}

func (w *Worker) statePull(_ context.Context, _ peer.ID, req *envelope.Envelope) (any, error) {
	var p envelope.StatePull
	if err := req.DecodePayload(&p); err != nil {
		return nil, err
	}
	id := req.DeviceID
	if id == "" {
		id = p.DeviceID
	}
	devs := w.Devices()
	out := envelope.StateResponse{State: make(map[string]envelope.DeviceState, len(devs)), DeviceCount: len(devs), WorkerID: w.cfg.WorkerID}
	for _, d := range devs {
		if id != "" && d.DeviceID != id {
			continue
		}
		st := StatusOnline
		if d.Offline {
			st = StatusOffline
		}
		out.State[d.DeviceID] = envelope.DeviceState{Status: st}
	}
	if id != "" && len(out.State) == 0 {
		return nil, envelope.Errf(envelope.CodeDeviceNotFound, "%s", id)
	}
	return out, nil
}

func (w *Worker) ping(context.Context, peer.ID, *envelope.Envelope) (any, error) {
	return envelope.HealthPong{
		Status:   "OK",
		UptimeMs: time.Since(w.started).Milliseconds(),
		Load:     float64(w.inflight.Load()),
	}, nil
}

// commandRequest runs a command once per commandId: a duplicate gets the
// first run's result, waiting for it if it is still running.
func (w *Worker) commandRequest(ctx context.Context, _ peer.ID, req *envelope.Envelope) (any, error) {
	var p envelope.CommandRequest
	if err := req.DecodePayload(&p); err != nil {
		return nil, err
	}
	if p.CommandID == "" {
		return nil, envelope.Err(envelope.CodePayloadCommandIDRequired)
	}
	e, first := w.results.begin(p.CommandID)
	if first {
		if err := w.start(e, req.DeviceID, p); err != nil {
			return nil, err
		}
	}
	res, ok := e.wait(ctx)
	if !ok {
		return envelope.CommandResult{CommandID: p.CommandID, Status: StatusRunning}, nil
	}
	return res, nil
}

// start checks the command (MDK-REFERENCE §4.7 order) and runs its handler in
// a goroutine, or finishes the entry at once with the failure. An error means
// the Worker is closing: the entry is dropped, nothing ran.
func (w *Worker) start(e *cacheEntry, deviceID string, p envelope.CommandRequest) error {
	fail := func(err *envelope.Error) error {
		w.results.finish(e, envelope.CommandResult{CommandID: p.CommandID, Status: envelope.StateFailed, Error: err.Message})
		return nil
	}
	if p.Command == "" {
		return fail(envelope.Err(envelope.CodePayloadCommandRequired))
	}
	if deviceID == "" {
		return fail(envelope.Err(envelope.CodeDeviceIDRequired))
	}
	if err := w.checkDevice(deviceID); err != nil {
		return fail(err)
	}
	spec, declared := w.contract.Command(p.Command)
	w.mu.RLock()
	fn := w.commands[p.Command]
	w.mu.RUnlock()
	if !declared || fn == nil {
		return fail(envelope.Errf(envelope.CodeUnknownCommand, "%s", p.Command))
	}
	params := spec.NormalizeParams(p.Params)
	if params == nil {
		params = map[string]any{}
	}
	if err := spec.ValidateParams(params); err != nil {
		var ee *envelope.Error
		if !errors.As(err, &ee) {
			ee = envelope.Errf(envelope.CodeParamType, "%v", err)
		}
		return fail(ee)
	}
	timeout := w.cfg.CommandTimeout
	if d := time.Duration(p.TimeoutMs) * time.Millisecond; d > 0 && d < timeout {
		timeout = d
	}
	if !w.goOwned(func() { w.execute(e, fn, p.CommandID, p.Command, deviceID, params, timeout) }) {
		w.results.abort(e)
		return envelope.Errf(envelope.CodeInternal, "worker %s is shutting down", w.cfg.WorkerID)
	}
	return nil
}

func (w *Worker) execute(e *cacheEntry, fn CommandHandler, id, command, deviceID string, params map[string]any, timeout time.Duration) {
	ctx, cancel := context.WithTimeout(w.ctx, timeout)
	defer cancel()
	w.inflight.Add(1)
	defer w.inflight.Add(-1)
	// Durable first: a Worker that dies while the handler runs must find the
	// command in its journal and never run it again.
	if err := w.results.journalStart(e, command, deviceID); err != nil {
		w.log.Error("command not run: result journal", "cmd", id, "command", command, "device", deviceID, "err", err)
		w.results.finish(e, envelope.CommandResult{CommandID: id, Status: envelope.StateFailed,
			Error: envelope.Errf(envelope.CodeInternal, "result journal: %v; command not run", err).Message})
		return
	}
	if n := w.results.countExec(id); n > 1 {
		w.log.Error("command ran more than once", "cmd", id, "runs", n)
	}
	if w.cfg.OnExecute != nil {
		w.cfg.OnExecute(id, command, deviceID)
	}
	result, err := callCommand(ctx, fn, deviceID, params)
	res := envelope.CommandResult{CommandID: id, Status: envelope.StateSuccess}
	if err != nil {
		res.Status = envelope.StateFailed
		switch {
		case errors.Is(err, context.DeadlineExceeded) && ctx.Err() != nil:
			res.Error = envelope.Errf(envelope.CodeCommandExpired, "no result within %v", timeout).Message
		case errors.Is(err, context.Canceled) && w.ctx.Err() != nil:
			res.Error = envelope.Errf(envelope.CodeInternal, "worker shut down while the command ran").Message
		default:
			res.Error = errMessage(err)
		}
	} else {
		raw, mErr := marshalResult(result)
		if mErr != nil {
			res.Status = envelope.StateFailed
			res.Error = envelope.Errf(envelope.CodeInternal, "result: %v", mErr).Message
		} else {
			res.Result = raw
		}
	}
	w.log.Debug("command done", "cmd", id, "command", command, "device", deviceID, "status", res.Status, "err", res.Error)
	w.results.journalDone(e, res)
	w.results.finish(e, res)
}

func callCommand(ctx context.Context, fn CommandHandler, deviceID string, params map[string]any) (result any, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = envelope.Errf(envelope.CodeInternal, "handler panic: %v", r)
			defaultLog.Error("command handler panic", "panic", r, "stack", string(debug.Stack()))
		}
	}()
	return fn(ctx, deviceID, params)
}

func marshalResult(v any) (json.RawMessage, error) {
	if v == nil {
		return json.RawMessage("{}"), nil
	}
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	if string(b) == "null" {
		return json.RawMessage("{}"), nil
	}
	return b, nil
}

func errMessage(err error) string {
	var ee *envelope.Error
	if errors.As(err, &ee) {
		return ee.Error()
	}
	return err.Error()
}

func (w *Worker) commandStatus(_ context.Context, _ peer.ID, req *envelope.Envelope) (any, error) {
	var ref envelope.CommandRef
	if err := req.DecodePayload(&ref); err != nil {
		return nil, err
	}
	if ref.CommandID == "" {
		return nil, envelope.Err(envelope.CodePayloadCommandIDRequired)
	}
	return w.results.Lookup(ref.CommandID), nil
}

// checkDevice is nil for a known online device, else the MDK error.
func (w *Worker) checkDevice(id string) *envelope.Error {
	d, ok := w.device(id)
	switch {
	case !ok:
		return envelope.Errf(envelope.CodeDeviceNotFound, "%s", id)
	case d.Offline:
		return envelope.Errf(envelope.CodeDeviceUnavailable, "%s", id)
	}
	return nil
}

// telemetryPull answers MDK-REFERENCE §4.10: metrics of one device, of every
// device in one batch, one channel, or a registered query type. Query errors
// are carried in the payload's error field, as the original did.
func (w *Worker) telemetryPull(ctx context.Context, _ peer.ID, req *envelope.Envelope) (any, error) {
	var p envelope.TelemetryPull
	if err := req.DecodePayload(&p); err != nil {
		return nil, err
	}
	id := req.DeviceID
	if id == "" {
		id = p.DeviceID
	}
	typ := queryMetrics
	if t, ok := p.Query["type"].(string); ok && t != "" {
		typ = t
	}
	now := time.Now().UnixMilli()
	w.mu.RLock()
	tele, query := w.telemetry, w.queries[typ]
	w.mu.RUnlock()

	if typ == queryMetrics {
		if tele == nil {
			return failedQuery(id, envelope.Errf(envelope.CodeUnknownQueryType, "%s", typ), now), nil
		}
		if id == "" {
			return w.batch(ctx, tele, now), nil
		}
		return w.readDevice(ctx, tele, id, now), nil
	}
	if query != nil {
		if id != "" {
			if err := w.checkDevice(id); err != nil {
				return failedQuery(id, err, now), nil
			}
		}
		res, err := callQuery(ctx, query, id, p.Query)
		if err != nil {
			return failedQuery(id, errAsEnvelope(err), now), nil
		}
		out := make(map[string]any, len(res)+2)
		for k, v := range res {
			out[k] = v
		}
		if id != "" {
			out["deviceId"] = id
		}
		out["timestamp"] = now
		return out, nil
	}
	if w.isChannel(typ) && tele != nil {
		if id == "" {
			return failedQuery(id, envelope.Errf(envelope.CodeDeviceIDRequired, "%s", typ), now), nil
		}
		if err := w.checkDevice(id); err != nil {
			return failedQuery(id, err, now), nil
		}
		m, err := callTelemetry(ctx, tele, id)
		if err != nil {
			return failedQuery(id, errAsEnvelope(err), now), nil
		}
		return map[string]any{"deviceId": id, "name": typ, "value": m[typ], "timestamp": now}, nil
	}
	return failedQuery(id, envelope.Errf(envelope.CodeUnknownQueryType, "%s", typ), now), nil
}

func (w *Worker) isChannel(name string) bool {
	for _, t := range w.contract.Capabilities.Telemetry {
		if t.Name == name {
			return true
		}
	}
	return false
}

func failedQuery(id string, err *envelope.Error, now int64) envelope.DeviceTelemetry {
	return envelope.DeviceTelemetry{DeviceID: id, Error: err.Message, Timestamp: now}
}

func errAsEnvelope(err error) *envelope.Error {
	var ee *envelope.Error
	if errors.As(err, &ee) {
		return ee
	}
	return &envelope.Error{Code: envelope.CodeInternal, Message: err.Error()}
}

// readDevice reads one device's metrics; failures land in the error field.
func (w *Worker) readDevice(ctx context.Context, tele TelemetryHandler, id string, now int64) envelope.DeviceTelemetry {
	if err := w.checkDevice(id); err != nil {
		return failedQuery(id, err, now)
	}
	m, err := callTelemetry(ctx, tele, id)
	if err != nil {
		return failedQuery(id, errAsEnvelope(err), now)
	}
	if m == nil {
		m = map[string]any{}
	}
	return envelope.DeviceTelemetry{DeviceID: id, Metrics: encodeMetrics(m), Timestamp: now}
}

// batch reads every device, a few at a time, into one answer.
func (w *Worker) batch(ctx context.Context, tele TelemetryHandler, now int64) envelope.TelemetryBatch {
	devs := w.Devices()
	out := envelope.TelemetryBatch{WorkerID: w.cfg.WorkerID, Devices: make([]envelope.DeviceTelemetry, len(devs)), Timestamp: now}
	sem := make(chan struct{}, batchParallelism)
	var wg sync.WaitGroup
	for i, d := range devs {
		if d.Offline {
			out.Devices[i] = envelope.DeviceTelemetry{DeviceID: d.DeviceID, Error: envelope.Errf(envelope.CodeDeviceUnavailable, "%s", d.DeviceID).Message}
			continue
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			m, err := callTelemetry(ctx, tele, d.DeviceID)
			if err != nil {
				out.Devices[i] = envelope.DeviceTelemetry{DeviceID: d.DeviceID, Error: errAsEnvelope(err).Message}
				return
			}
			if m == nil {
				m = map[string]any{}
			}
			out.Devices[i] = envelope.DeviceTelemetry{DeviceID: d.DeviceID, Metrics: encodeMetrics(m)}
		})
	}
	wg.Wait()
	return out
}

func callTelemetry(ctx context.Context, fn TelemetryHandler, id string) (m map[string]any, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = envelope.Errf(envelope.CodeInternal, "telemetry handler panic: %v", r)
		}
	}()
	return fn(ctx, id)
}

func callQuery(ctx context.Context, fn QueryHandler, id string, q map[string]any) (m map[string]any, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = envelope.Errf(envelope.CodeInternal, "query handler panic: %v", r)
		}
	}()
	return fn(ctx, id, q)
}

// encodeMetrics encodes a metrics map for the wire; values that do not encode
// (a handler bug) become an error entry rather than failing the whole answer.
func encodeMetrics(m map[string]any) json.RawMessage {
	if m == nil {
		return nil
	}
	b, err := json.Marshal(m)
	if err != nil {
		b, _ = json.Marshal(map[string]any{"error": "ERR_METRICS_ENCODE: " + err.Error()})
	}
	return b
}
