// Package dispatcher is admission control for commands (MDK-REFERENCE §2.3, §3.4; DESIGN §6): it validates a
// command.request, resolves its scope to the devices it targets, and checks the command and its params against
// each target Worker's contract. It is pure and stateless: Admit reads the Directory and returns a Plan or the
// first failure as an *envelope.Error carrying the MDK string; nothing is written, so a rejected command leaves
// no trace. The node turns an admitted Plan into command records (a parent with children for worker and rack
// scope), all of it checked before anything is written.
package dispatcher

import (
	"fmt"

	"github.com/orknode/ork/protocols/envelope"
)

// DeviceRef names a device and the Worker that owns it.
type DeviceRef struct {
	DeviceID string
	WorkerID string
}

// Directory is what admission needs from the registry and health modules; the node implements it. Every
// method must be safe for concurrent use and cheap (Admit calls them on the request path).
type Directory interface {
	// ResolveDevice returns the Worker that owns deviceID.
	ResolveDevice(deviceID string) (workerID string, ok bool)
	// WorkerExists reports whether workerID is a known (not terminated) Worker.
	WorkerExists(workerID string) bool
	// DevicesOf lists the devices of a Worker, in a stable order.
	DevicesOf(workerID string) []string
	// DevicesInRack lists every device whose rack label is rack, across Workers, in a stable order.
	DevicesInRack(rack string) []DeviceRef
	// ContractOf returns a Worker's contract; nil when unknown (then any command passes, as in MDK).
	// Admit treats the contract as read-only.
	ContractOf(workerID string) *envelope.Contract
	// Routable reports whether commands can be sent to the Worker now (READY and not SICK/DEAD). Admit
	// consults it only when Options.RejectUnroutable is set.
	Routable(workerID string) bool
}

// Options configures a Dispatcher.
type Options struct {
	// Directory resolves devices, Workers, racks and contracts. Required.
	Directory Directory
	// RejectUnroutable restores the MDK rule: a command whose target Worker is not routable is rejected
	// with ERR_WORKER_NOT_ROUTABLE. By default (false) it is admitted and waits in its device queue until
	// the Worker becomes routable again, bounded by the command's deadline (DESIGN §6, §8).
	RejectUnroutable bool
}

// Dispatcher admits commands. It holds no state of its own and is safe for concurrent use.
type Dispatcher struct {
	dir              Directory
	rejectUnroutable bool
}

// New returns a Dispatcher. It panics if opts.Directory is nil (a wiring bug, not a runtime condition).
func New(opts Options) *Dispatcher {
	if opts.Directory == nil {
		panic("ork/dispatcher: Options.Directory is nil")
	}
	return &Dispatcher{dir: opts.Directory, rejectUnroutable: opts.RejectUnroutable}
}

// Child is one command to one device (or, as Plan.Parent, the command the caller asked for).
type Child struct {
	DeviceID string
	WorkerID string
	Command  string
	// Params are normalised (positional forms mapped onto declared names) and validated against the
	// owning Worker's contract. Children of the same Worker share one map: treat it as read-only.
	Params map[string]any
}

// Plan is an admitted command: what the node records and queues.
type Plan struct {
	// Parent is the caller's command for worker and rack scope (DeviceID empty; WorkerID the payload's
	// workerId, if any; Params as the caller sent them); nil for device scope. The node records it with the
	// children's ids and gives each child its parentId.
	Parent *Child
	// Children are the per-device commands, in the Directory's order, each device once; exactly one for
	// device scope; never more than envelope.MaxTargets.
	Children []Child
	// Scope is the normalised scope: envelope.ScopeDevice, ScopeWorker or ScopeRack.
	Scope string
	// Rack is the rack label of a rack-scope command (empty when the rack was named by workerId only).
	Rack string
	// IdempotencyKey, TimeoutMs: from the payload, unchecked beyond TimeoutMs >= 0.
	IdempotencyKey string
	TimeoutMs      int64
	// WaitMs is the caller's long-poll (answer when the command ends), >= 0.
	WaitMs int64
	// Requester is the envelope sender, as in MDK (the payload's requesterId is ignored). The node may
	// replace it with the authenticated peer ID.
	Requester string
}

// Admit checks a command.request envelope and returns its Plan, or the first failure as an *envelope.Error.
// The envelope's structure is assumed to have been validated by the wire layer. Order:
//
//  1. payload decode: not an object → ERR_PAYLOAD_NOT_OBJECT (a mistyped command, scope, workerId or
//     targets gets the code its MDK validator names; any other mistyped field, params included,
//     ERR_PAYLOAD_NOT_OBJECT);
//  2. CommandRequest.Validate (command, scope enum — an unknown scope is rejected —, workerId for worker
//     scope, rack or workerId for rack scope, MAX_TARGETS, non-empty targets), then timeoutMs >= 0;
//  3. target resolution (device: envelope deviceId; worker: all its devices or the given targets; rack: all
//     devices with the rack label, or the devices of workerId) and the fan-out bound;
//  4. per target Worker: it exists, optionally it is routable, the command is in its contract, params
//     normalised then validated (required, type, enum, min, max).
func (d *Dispatcher) Admit(req *envelope.Envelope) (Plan, error) {
	if req == nil {
		return Plan{}, envelope.Err(envelope.CodeEnvelopeNotObject)
	}
	c, err := decodeRequest(req)
	if err != nil {
		return Plan{}, err
	}
	return d.admit(req.DeviceID, req.Sender, c)
}

func (d *Dispatcher) admit(deviceID, sender string, c *envelope.CommandRequest) (Plan, error) {
	refs, err := d.resolve(deviceID, c)
	if err != nil {
		return Plan{}, err
	}
	scope := c.Scope
	if scope == "" {
		scope = envelope.ScopeDevice
	}
	// A rack named by label may span Workers whose contracts differ: say which one refused.
	multiWorker := scope == envelope.ScopeRack && c.Rack != ""

	children := make([]Child, len(refs))
	var checked map[string]map[string]any // params per Worker already checked
	if len(refs) > 1 {
		checked = make(map[string]map[string]any)
	}
	for i, r := range refs {
		params, ok := checked[r.WorkerID]
		if !ok {
			if params, err = d.checkWorker(r.WorkerID, c.Command, c.Params, multiWorker); err != nil {
				return Plan{}, err
			}
			if checked != nil {
				checked[r.WorkerID] = params
			}
		}
		children[i] = Child{DeviceID: r.DeviceID, WorkerID: r.WorkerID, Command: c.Command, Params: params}
	}

	p := Plan{
		Children:       children,
		Scope:          scope,
		IdempotencyKey: c.IdempotencyKey,
		TimeoutMs:      c.TimeoutMs,
		WaitMs:         c.WaitMs,
		Requester:      sender,
	}
	if scope != envelope.ScopeDevice {
		p.Parent = &Child{WorkerID: c.WorkerID, Command: c.Command, Params: c.Params}
		if scope == envelope.ScopeRack {
			p.Rack = c.Rack
		}
	}
	return p, nil
}

// resolve turns the scope into the target devices.
func (d *Dispatcher) resolve(deviceID string, c *envelope.CommandRequest) ([]DeviceRef, error) {
	switch c.Scope {
	case "", envelope.ScopeDevice:
		if len(c.Targets) > 0 {
			return nil, envelope.Errf(envelope.CodePayloadTargetsInvalid, "targets need scope worker or rack")
		}
		if deviceID == "" {
			return nil, envelope.Err(envelope.CodeDeviceIDRequired)
		}
		w, ok := d.dir.ResolveDevice(deviceID)
		if !ok {
			return nil, envelope.Errf(envelope.CodeDeviceNotFound, "%s", deviceID)
		}
		if !d.dir.WorkerExists(w) {
			return nil, envelope.Errf(envelope.CodeWorkerNotFound, "%s", w)
		}
		return []DeviceRef{{DeviceID: deviceID, WorkerID: w}}, nil

	case envelope.ScopeWorker:
		return d.workerDevices(c.WorkerID, c.Targets)

	case envelope.ScopeRack:
		if c.Rack == "" {
			// MDK clients name a rack by its Worker (a Worker historically is a rack).
			if c.WorkerID == "" {
				return nil, envelope.Err(envelope.CodeRackRequired)
			}
			return d.workerDevices(c.WorkerID, c.Targets)
		}
		refs := d.dir.DevicesInRack(c.Rack)
		label := "rack " + c.Rack
		if c.WorkerID != "" {
			// Both given: the devices of that rack on that Worker.
			if !d.dir.WorkerExists(c.WorkerID) {
				return nil, envelope.Errf(envelope.CodeWorkerNotFound, "%s", c.WorkerID)
			}
			kept := refs[:0:0]
			for _, r := range refs {
				if r.WorkerID == c.WorkerID {
					kept = append(kept, r)
				}
			}
			refs = kept
			label += " on worker " + c.WorkerID
		}
		return pick(refs, c.Targets, label)
	}
	// Unreachable after Validate; kept so that an unknown scope can never fall through to device.
	return nil, envelope.Errf(envelope.CodePayloadScopeInvalid, "%s", c.Scope)
}

func (d *Dispatcher) workerDevices(workerID string, targets []string) ([]DeviceRef, error) {
	if workerID == "" {
		return nil, envelope.Err(envelope.CodeWorkerIDRequired)
	}
	if !d.dir.WorkerExists(workerID) {
		return nil, envelope.Errf(envelope.CodeWorkerNotFound, "%s", workerID)
	}
	devs := d.dir.DevicesOf(workerID)
	refs := make([]DeviceRef, len(devs))
	for i, id := range devs {
		refs[i] = DeviceRef{DeviceID: id, WorkerID: workerID}
	}
	return pick(refs, targets, "worker "+workerID)
}

// pick returns every candidate, or, when targets are given, the candidates they name (each once, in the
// targets' order; a target that is not a candidate is ERR_DEVICE_NOT_FOUND: <id>).
func pick(candidates []DeviceRef, targets []string, label string) ([]DeviceRef, error) {
	if len(targets) == 0 {
		if len(candidates) == 0 {
			return nil, envelope.Errf(envelope.CodeDeviceNotFound, "%s", label)
		}
		if len(candidates) > envelope.MaxTargets {
			return nil, envelope.Errf(envelope.CodePayloadTargetsTooMany, "%s has %d devices > %d",
				label, len(candidates), envelope.MaxTargets)
		}
		return candidates, nil
	}
	index := make(map[string]DeviceRef, len(candidates))
	for _, r := range candidates {
		index[r.DeviceID] = r
	}
	out := make([]DeviceRef, 0, len(targets))
	seen := make(map[string]struct{}, len(targets))
	for _, t := range targets {
		if _, dup := seen[t]; dup {
			continue
		}
		seen[t] = struct{}{}
		r, ok := index[t]
		if !ok {
			return nil, envelope.Errf(envelope.CodeDeviceNotFound, "%s", t)
		}
		out = append(out, r)
	}
	return out, nil
}

// checkWorker applies the per-Worker rules and returns the params to send to that Worker. With name set, a
// contract refusal says which Worker refused.
func (d *Dispatcher) checkWorker(workerID, command string, params map[string]any, name bool) (map[string]any, error) {
	if !d.dir.WorkerExists(workerID) {
		return nil, envelope.Errf(envelope.CodeWorkerNotFound, "%s", workerID)
	}
	if d.rejectUnroutable && !d.dir.Routable(workerID) {
		return nil, envelope.Errf(envelope.CodeWorkerNotRoutable, "%s", workerID)
	}
	params, err := checkContract(d.dir.ContractOf(workerID), command, params)
	if err != nil && name {
		err = withWorker(err, workerID)
	}
	return params, err
}

// checkContract checks a command against a contract (MDK-REFERENCE §2.3 step 5, with required, enum,
// boolean and object enforced). A nil contract, or one that declares no command list, lets any command pass.
func checkContract(ct *envelope.Contract, command string, params map[string]any) (map[string]any, error) {
	if ct == nil || ct.Capabilities.Commands == nil {
		return params, nil
	}
	spec, ok := ct.Command(command)
	if !ok {
		return nil, envelope.Errf(envelope.CodeCommandNotInCapabilities, "%s", command)
	}
	params = spec.NormalizeParams(params)
	if err := spec.ValidateParams(params); err != nil {
		return nil, err
	}
	return params, nil
}

// withWorker appends the refusing Worker to an MDK error string (the prefix, which callers match, is kept).
func withWorker(err error, workerID string) error {
	e, ok := err.(*envelope.Error)
	if !ok {
		return fmt.Errorf("%w (worker %s)", err, workerID)
	}
	return &envelope.Error{Code: e.Code, Message: e.Error() + " (worker " + workerID + ")"}
}
