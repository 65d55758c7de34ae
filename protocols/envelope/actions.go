package envelope

// Protocol version carried in every envelope. Receivers accept any 0.x version
// (the original kernel never compared it) and reject other majors.
const ProtocolVersion = "0.2.0"

// Message types.
const (
	TypeRequest  = "request"
	TypeResponse = "response"
	TypeEvent    = "event"
)

// Wire action names. The MDK names are kept verbatim; command.wait, device.list
// and kernel.status are ORK node additions.
const (
	ActionIdentityRequest       = "identity.request"
	ActionIdentityResponse      = "identity.response"
	ActionCapabilityRequest     = "capability.request"
	ActionCapabilityResponse    = "capability.response"
	ActionTelemetryPull         = "telemetry.pull"
	ActionTelemetryResponse     = "telemetry.response"
	ActionStatePull             = "state.pull"
	ActionStateResponse         = "state.response"
	ActionCommandRequest        = "command.request"
	ActionCommandResult         = "command.result"
	ActionCommandStatus         = "command.status"
	ActionCommandStatusResponse = "command.status.response"
	ActionCommandCancel         = "command.cancel"
	ActionCommandCancelResponse = "command.cancel.response"
	ActionCommandWait           = "command.wait"
	ActionHealthPing            = "health.ping"
	ActionHealthPong            = "health.pong"
	ActionWorkerList            = "worker.list"
	ActionDeviceList            = "device.list"
	ActionDeviceCapabilities    = "device.capabilities"
	ActionWorkerTerminate       = "worker.terminate"
	ActionKernelStatus          = "kernel.status"
	ActionActionPush            = "action.push"
	ActionActionPushBatch       = "action.push-batch"
	ActionActionGet             = "action.get"
	ActionActionGetBatch        = "action.get-batch"
	ActionActionQuery           = "action.query"
	ActionActionVote            = "action.vote"
	ActionActionCancelBatch     = "action.cancel-batch"
	ActionWriteCallsRequest     = "write.calls.request"
	ActionWriteCallsResponse    = "write.calls.response"
	// ActionError is the action of a reply to a request that could not be
	// parsed, so its own action is unknown (ORK; the original answered a bare
	// {error} object).
	ActionError = "error"
)

var knownActions = map[string]struct{}{}

// responseActions maps a request action to the action of its reply, where the
// MDK protocol defines one; other actions answer with their own name.
var responseActions = map[string]string{
	ActionIdentityRequest:   ActionIdentityResponse,
	ActionCapabilityRequest: ActionCapabilityResponse,
	ActionTelemetryPull:     ActionTelemetryResponse,
	ActionStatePull:         ActionStateResponse,
	ActionCommandRequest:    ActionCommandResult,
	ActionCommandStatus:     ActionCommandStatusResponse,
	ActionCommandCancel:     ActionCommandCancelResponse,
	ActionHealthPing:        ActionHealthPong,
	ActionWriteCallsRequest: ActionWriteCallsResponse,
}

func init() {
	for _, a := range []string{
		ActionIdentityRequest, ActionIdentityResponse, ActionCapabilityRequest, ActionCapabilityResponse,
		ActionTelemetryPull, ActionTelemetryResponse, ActionStatePull, ActionStateResponse,
		ActionCommandRequest, ActionCommandResult, ActionCommandStatus, ActionCommandStatusResponse,
		ActionCommandCancel, ActionCommandCancelResponse, ActionCommandWait,
		ActionHealthPing, ActionHealthPong, ActionWorkerList, ActionDeviceList, ActionDeviceCapabilities,
		ActionWorkerTerminate, ActionKernelStatus,
		ActionActionPush, ActionActionPushBatch, ActionActionGet, ActionActionGetBatch, ActionActionQuery,
		ActionActionVote, ActionActionCancelBatch, ActionWriteCallsRequest, ActionWriteCallsResponse, ActionError,
	} {
		knownActions[a] = struct{}{}
	}
}

// KnownAction reports whether a is one of the wire action names.
func KnownAction(a string) bool { _, ok := knownActions[a]; return ok }

// ResponseAction is the action name of the reply to a request with action a.
func ResponseAction(a string) string {
	if r, ok := responseActions[a]; ok {
		return r
	}
	return a
}
