package envelope

import "encoding/json"

// MaxTargets bounds the targets of one command (MDK MAX_TARGETS), checked
// before anything is written.
const MaxTargets = 1024

// Command scopes.
const (
	ScopeDevice = "device"
	ScopeWorker = "worker"
	ScopeRack   = "rack"
)

// Command states (DESIGN §6). REJECTED is never a state, only an answer.
const (
	StateQueued     = "QUEUED"
	StateDispatched = "DISPATCHED"
	StateExecuting  = "EXECUTING"
	StateSuccess    = "SUCCESS"
	StateFailed     = "FAILED"
	StateTimeout    = "TIMEOUT"
	StateCancelled  = "CANCELLED"
	StatusRejected  = "REJECTED"
)

// IsTerminalState reports whether a command state is final.
func IsTerminalState(s string) bool {
	return s == StateSuccess || s == StateFailed || s == StateTimeout || s == StateCancelled
}

// Worker lifecycle states (registry, MDK-REFERENCE §3.1).
const (
	WorkerUnregistered  = "UNREGISTERED"
	WorkerDiscovered    = "DISCOVERED"
	WorkerIdentitySaved = "IDENTITY_SAVED"
	WorkerReady         = "READY"
	WorkerTerminated    = "TERMINATED"
)

// Health states (DESIGN §8).
const (
	HealthUnknown = "UNKNOWN"
	HealthHealthy = "HEALTHY"
	HealthSick    = "SICK"
	HealthDead    = "DEAD"
)

// DeviceInfo is one device in an identity response.
type DeviceInfo struct {
	DeviceID string `json:"deviceId"`
	Rack     string `json:"rack,omitempty"`
	Model    string `json:"model,omitempty"`
}

// IdentityResponse answers identity.request.
type IdentityResponse struct {
	WorkerID     string       `json:"workerId"`
	Devices      []DeviceInfo `json:"devices"`
	DeviceFamily string       `json:"deviceFamily,omitempty"`
}

// Validate applies the identity.response payload rules (MDK-REFERENCE §4.8).
func (r *IdentityResponse) Validate() error {
	if r.WorkerID == "" {
		return Err(CodePayloadWorkerIDRequired)
	}
	if r.Devices == nil {
		return Err(CodePayloadDevicesRequired)
	}
	for i, d := range r.Devices {
		if d.DeviceID == "" {
			return Errf(CodePayloadDeviceInvalid, "at index %d", i)
		}
	}
	return nil
}

// CapabilityResponse answers capability.request.
type CapabilityResponse struct {
	Contract *Contract `json:"contract"`
}

// TelemetryPull asks for telemetry. An empty DeviceID on a Worker means every
// device of the Worker in one answer.
type TelemetryPull struct {
	DeviceID string         `json:"deviceId,omitempty"`
	WorkerID string         `json:"workerId,omitempty"` // caller → kernel: a whole Worker
	Query    map[string]any `json:"query,omitempty"`
	MaxAgeMs *int64         `json:"maxAgeMs,omitempty"` // caller → kernel: accept a snapshot this old
}

// DeviceTelemetry is one device's entry in a batched telemetry answer.
type DeviceTelemetry struct {
	DeviceID string `json:"deviceId"`
	// Metrics is the metrics object, kept encoded: the kernel stores and
	// forwards it without building maps (a thousand Workers' worth each tick).
	Metrics   json.RawMessage `json:"metrics,omitempty"`
	Error     string          `json:"error,omitempty"`
	Timestamp int64           `json:"timestamp,omitempty"`
}

// TelemetryBatch is a Worker's answer to telemetry.pull without a deviceId.
type TelemetryBatch struct {
	WorkerID  string            `json:"workerId,omitempty"`
	Devices   []DeviceTelemetry `json:"devices"`
	Timestamp int64             `json:"timestamp"`
}

// StatePull asks for the device list and online state.
type StatePull struct {
	DeviceID string `json:"deviceId,omitempty"`
}

// DeviceState is one device's state in a state.response.
type DeviceState struct {
	Status string `json:"status"`
}

// StateResponse answers state.pull.
type StateResponse struct {
	State       map[string]DeviceState `json:"state"`
	DeviceCount int                    `json:"deviceCount"`
	WorkerID    string                 `json:"workerId"`
}

// CommandRequest is command.request, both caller → kernel and kernel → Worker
// (the kernel adds CommandID).
type CommandRequest struct {
	CommandID      string         `json:"commandId,omitempty"`
	Command        string         `json:"command"`
	Params         map[string]any `json:"params,omitempty"`
	Scope          string         `json:"scope,omitempty"`
	WorkerID       string         `json:"workerId,omitempty"`
	Rack           string         `json:"rack,omitempty"`
	Targets        []string       `json:"targets,omitempty"`
	IdempotencyKey string         `json:"idempotencyKey,omitempty"`
	TimeoutMs      int64          `json:"timeoutMs,omitempty"` // per-command deadline (ERR_COMMAND_EXPIRED)
	// WaitMs (caller → kernel) makes the request a long-poll: the answer
	// comes when the command ends, or after WaitMs with its state then — one
	// round trip for "send and learn the outcome" (ORK addition).
	WaitMs      int64  `json:"waitMs,omitempty"`
	ParentID    string `json:"parentId,omitempty"`
	RequesterID string `json:"requesterId,omitempty"`
}

// Validate applies the command.request payload rules (MDK-REFERENCE §4.8),
// which the original never ran on the live path; ORK does.
func (c *CommandRequest) Validate() error {
	if c.Command == "" {
		return Err(CodePayloadCommandRequired)
	}
	switch c.Scope {
	case "", ScopeDevice:
	case ScopeWorker:
		if c.WorkerID == "" {
			return Err(CodePayloadWorkerIDRequired)
		}
	case ScopeRack:
		if c.Rack == "" && c.WorkerID == "" {
			return Err(CodeRackRequired)
		}
	default:
		return Errf(CodePayloadScopeInvalid, "%s", c.Scope)
	}
	if len(c.Targets) > MaxTargets {
		return Errf(CodePayloadTargetsTooMany, "%d > %d", len(c.Targets), MaxTargets)
	}
	for i, t := range c.Targets {
		if t == "" {
			return Errf(CodePayloadTargetInvalid, "at index %d", i)
		}
	}
	return nil
}

// CommandResult is a Worker's command.result, and its command.status answer
// (Status "UNKNOWN" when the Worker never saw the command).
type CommandResult struct {
	CommandID string          `json:"commandId"`
	Status    string          `json:"status"`
	Result    json.RawMessage `json:"result,omitempty"`
	Error     string          `json:"error,omitempty"`
}

// StatusUnknown is a Worker's answer to command.status for a command it never saw.
const StatusUnknown = "UNKNOWN"

// CommandRef names a command: command.status, command.cancel; command.wait
// adds TimeoutMs.
type CommandRef struct {
	CommandID      string `json:"commandId,omitempty"`
	IdempotencyKey string `json:"idempotencyKey,omitempty"`
	TimeoutMs      int64  `json:"timeoutMs,omitempty"`
}

// CommandAccepted answers command.request: the state the command was in
// when the answer left (QUEUED or DISPATCHED; with waitMs, possibly final,
// with its result or error).
type CommandAccepted struct {
	CommandID string          `json:"commandId,omitempty"`
	Status    string          `json:"status"`
	Children  []string        `json:"children,omitempty"`
	Result    json.RawMessage `json:"result,omitempty"`
	Error     string          `json:"error,omitempty"` // MDK: the REJECTED reason; or the command's error
}

// CommandStatus answers command.status and command.wait.
type CommandStatus struct {
	CommandID string          `json:"commandId"`
	Status    string          `json:"status"`
	Command   string          `json:"command"`
	DeviceID  string          `json:"deviceId,omitempty"`
	WorkerID  string          `json:"workerId,omitempty"`
	Scope     string          `json:"scope"`
	ParentID  string          `json:"parentId,omitempty"`
	Children  []string        `json:"children,omitempty"`
	Retries   int             `json:"retries"`
	Attempts  int             `json:"attempts"`
	Result    json.RawMessage `json:"result,omitempty"`
	Error     string          `json:"error,omitempty"`
	CreatedAt int64           `json:"createdAt"`
	UpdatedAt int64           `json:"updatedAt"`
}

// CommandCancelled answers command.cancel.
type CommandCancelled struct {
	CommandID string `json:"commandId"`
	Cancelled bool   `json:"cancelled"`
}

// HealthPong answers health.ping.
type HealthPong struct {
	Status   string  `json:"status"`
	UptimeMs int64   `json:"uptime"`
	Load     float64 `json:"load"`
}

// WorkerInfo is one row of worker.list.
type WorkerInfo struct {
	WorkerID     string   `json:"workerId"`
	PeerID       string   `json:"peerId"`
	DeviceIDs    []string `json:"deviceIds"`
	State        string   `json:"state"`
	HealthState  string   `json:"healthState"`
	DeviceFamily string   `json:"deviceFamily,omitempty"`
	Racks        []string `json:"racks,omitempty"`
	Conflicts    []string `json:"conflicts,omitempty"`
	Addrs        []string `json:"addrs,omitempty"`
	RegisteredAt int64    `json:"registeredAt,omitempty"`
	LastSeen     int64    `json:"lastSeen,omitempty"`
	Error        string   `json:"error,omitempty"` // last registration error
}

// WorkerList answers worker.list.
type WorkerList struct {
	Workers []WorkerInfo `json:"workers"`
}

// DeviceRow is one row of device.list.
type DeviceRow struct {
	DeviceID string `json:"deviceId"`
	WorkerID string `json:"workerId"`
	Rack     string `json:"rack,omitempty"`
	Model    string `json:"model,omitempty"`
	Routable bool   `json:"routable"`
}

// DeviceList answers device.list.
type DeviceList struct {
	Devices []DeviceRow `json:"devices"`
}

// WorkerRef names a Worker (worker.terminate).
type WorkerRef struct {
	WorkerID string `json:"workerId"`
}

// KernelStatus answers kernel.status.
type KernelStatus struct {
	PeerID    string         `json:"peerId"`
	Version   string         `json:"version"`
	Addrs     []string       `json:"addrs"`
	Topic     string         `json:"topic,omitempty"`
	UptimeMs  int64          `json:"uptimeMs"`
	Workers   map[string]int `json:"workers"` // by lifecycle state
	Health    map[string]int `json:"health"`  // by health state
	Devices   int            `json:"devices"`
	Commands  map[string]int `json:"commands,omitempty"`
	Discovery []string       `json:"discovery"`
}

// UnmarshalJSON decodes an identity.response payload. A field of the wrong
// JSON type fails with the MDK code of the first rule it breaks (§4.8), not a
// generic decoding error.
func (r *IdentityResponse) UnmarshalJSON(b []byte) error {
	type plain IdentityResponse
	err := json.Unmarshal(b, (*plain)(r))
	if _, ok := err.(*json.UnmarshalTypeError); ok {
		if e := shapeError(b, identityResponseShape); e != nil {
			return e
		}
	}
	return err
}

// UnmarshalJSON decodes a command.request payload. A field of the wrong JSON
// type fails with the MDK code of the first rule it breaks (§4.8, in MDK
// order: command, scope, workerId, targets), not a generic decoding error.
func (c *CommandRequest) UnmarshalJSON(b []byte) error {
	type plain CommandRequest
	err := json.Unmarshal(b, (*plain)(c))
	if _, ok := err.(*json.UnmarshalTypeError); ok {
		if e := shapeError(b, commandRequestShape); e != nil {
			return e
		}
	}
	return err
}

// shapeError runs a §4.8 rule set over the generic JSON form of a payload.
func shapeError(b []byte, rules func(map[string]any) error) error {
	var m map[string]any
	if json.Unmarshal(b, &m) != nil || m == nil {
		return Err(CodePayloadNotObject)
	}
	return rules(m)
}

func identityResponseShape(m map[string]any) error {
	if s, _ := m["workerId"].(string); s == "" {
		return Err(CodePayloadWorkerIDRequired)
	}
	devices, ok := m["devices"].([]any)
	if !ok {
		return Err(CodePayloadDevicesRequired)
	}
	for i, d := range devices {
		dm, _ := d.(map[string]any)
		if id, _ := dm["deviceId"].(string); id == "" {
			return Errf(CodePayloadDeviceInvalid, "at index %d", i)
		}
	}
	return nil
}

func commandRequestShape(m map[string]any) error {
	if s, _ := m["command"].(string); s == "" {
		return Err(CodePayloadCommandRequired)
	}
	workerID, _ := m["workerId"].(string)
	if v := m["scope"]; v != nil {
		s, _ := v.(string)
		switch s {
		case "", ScopeDevice:
			if _, isString := v.(string); !isString {
				return Errf(CodePayloadScopeInvalid, "%v", v)
			}
		case ScopeWorker:
			if workerID == "" {
				return Err(CodePayloadWorkerIDRequired)
			}
		case ScopeRack:
			if rack, _ := m["rack"].(string); rack == "" && workerID == "" {
				return Err(CodeRackRequired)
			}
		default:
			return Errf(CodePayloadScopeInvalid, "%s", s)
		}
	}
	if v := m["workerId"]; v != nil {
		if _, ok := v.(string); !ok {
			return Err(CodePayloadWorkerIDInvalid)
		}
	}
	if v := m["targets"]; v != nil {
		targets, ok := v.([]any)
		if !ok {
			return Err(CodePayloadTargetsInvalid)
		}
		if len(targets) > MaxTargets {
			return Errf(CodePayloadTargetsTooMany, "%d > %d", len(targets), MaxTargets)
		}
		for i, t := range targets {
			if s, _ := t.(string); s == "" {
				return Errf(CodePayloadTargetInvalid, "at index %d", i)
			}
		}
	}
	return nil
}
