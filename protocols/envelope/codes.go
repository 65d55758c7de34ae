package envelope

import (
	"errors"
	"fmt"
	"strings"
)

// Error codes. MDK strings are kept verbatim (callers match them by prefix);
// the ORK additions follow the same ERR_UPPER_SNAKE style.
const (
	// Envelope structure (MDK-REFERENCE §4.2), in validation order.
	CodeEnvelopeNotObject        = "ERR_ENVELOPE_NOT_OBJECT"
	CodeEnvelopeIDMissing        = "ERR_ENVELOPE_ID_MISSING"
	CodeEnvelopeVersionMissing   = "ERR_ENVELOPE_VERSION_MISSING"
	CodeEnvelopeTypeInvalid      = "ERR_ENVELOPE_TYPE_INVALID"
	CodeEnvelopeActionInvalid    = "ERR_ENVELOPE_ACTION_INVALID"
	CodeEnvelopeActionUnknown    = "ERR_ENVELOPE_ACTION_UNKNOWN"
	CodeEnvelopeSenderInvalid    = "ERR_ENVELOPE_SENDER_INVALID"
	CodeEnvelopeTimestampInvalid = "ERR_ENVELOPE_TIMESTAMP_INVALID"
	CodeEnvelopePayloadInvalid   = "ERR_ENVELOPE_PAYLOAD_INVALID"
	// ORK: a version whose major is not 0.
	CodeEnvelopeVersionUnsupported = "ERR_ENVELOPE_VERSION_UNSUPPORTED"
	// ORK: the frame was not JSON at all, or exceeded the size limit.
	CodeEnvelopeMalformed = "ERR_ENVELOPE_MALFORMED"
	CodeFrameTooLarge     = "ERR_FRAME_TOO_LARGE"

	// Payload validators (MDK-REFERENCE §4.8).
	CodePayloadNotObject         = "ERR_PAYLOAD_NOT_OBJECT"
	CodePayloadWorkerIDRequired  = "ERR_PAYLOAD_WORKER_ID_REQUIRED"
	CodePayloadDevicesRequired   = "ERR_PAYLOAD_DEVICES_REQUIRED"
	CodePayloadDeviceInvalid     = "ERR_PAYLOAD_DEVICE_INVALID"
	CodePayloadContractRequired  = "ERR_PAYLOAD_CONTRACT_REQUIRED"
	CodePayloadCommandRequired   = "ERR_PAYLOAD_COMMAND_REQUIRED"
	CodePayloadScopeInvalid      = "ERR_PAYLOAD_SCOPE_INVALID"
	CodePayloadWorkerIDInvalid   = "ERR_PAYLOAD_WORKER_ID_INVALID"
	CodePayloadTargetsInvalid    = "ERR_PAYLOAD_TARGETS_INVALID"
	CodePayloadTargetsTooMany    = "ERR_PAYLOAD_TARGETS_TOO_MANY"
	CodePayloadTargetInvalid     = "ERR_PAYLOAD_TARGET_INVALID"
	CodePayloadCommandIDRequired = "ERR_PAYLOAD_COMMAND_ID_REQUIRED"
	CodePayloadStatusRequired    = "ERR_PAYLOAD_STATUS_REQUIRED"
	CodePayloadStatusInvalid     = "ERR_PAYLOAD_STATUS_INVALID"
	CodePayloadCancelledRequired = "ERR_PAYLOAD_CANCELLED_REQUIRED"
	CodePayloadStateRequired     = "ERR_PAYLOAD_STATE_REQUIRED"

	// Router and dispatcher.
	CodeUnknownAction            = "ERR_UNKNOWN_ACTION"
	CodeCommandRequired          = "ERR_COMMAND_REQUIRED"
	CodeWorkerIDRequired         = "ERR_WORKER_ID_REQUIRED"
	CodeWorkerNotFound           = "ERR_WORKER_NOT_FOUND"
	CodeDeviceIDRequired         = "ERR_DEVICE_ID_REQUIRED"
	CodeDeviceNotFound           = "ERR_DEVICE_NOT_FOUND"
	CodeWorkerNotRoutable        = "ERR_WORKER_NOT_ROUTABLE"
	CodeCommandNotInCapabilities = "ERR_COMMAND_NOT_IN_CAPABILITIES"
	CodeParamType                = "ERR_PARAM_TYPE"
	CodeParamRange               = "ERR_PARAM_RANGE"
	CodeParamRequired            = "ERR_PARAM_REQUIRED" // ORK: contract `required` enforced
	CodeParamEnum                = "ERR_PARAM_ENUM"     // ORK: contract `enum` enforced
	CodeCommandIDRequired        = "ERR_COMMAND_ID_REQUIRED"
	CodeCommandNotFound          = "ERR_COMMAND_NOT_FOUND"
	CodeRackRequired             = "ERR_RACK_REQUIRED" // ORK: rack scope names a rack label

	// Command state machine.
	CodeCommandFailed         = "ERR_COMMAND_FAILED"
	CodeMaxRetriesExhausted   = "ERR_MAX_RETRIES_EXHAUSTED"
	CodeRecoveryExhausted     = "ERR_RECOVERY_EXHAUSTED"
	CodeCancelled             = "ERR_CANCELLED"
	CodeKernelShutdown        = "ERR_KERNEL_SHUTDOWN"
	CodeQueueFull             = "ERR_QUEUE_FULL"      // ORK: concurrency manager
	CodeCommandExpired        = "ERR_COMMAND_EXPIRED" // ORK: per-command deadline
	CodeCommandOutcomeUnknown = "ERR_COMMAND_OUTCOME_UNKNOWN"

	// Channel / transport.
	CodeChannelNotConnected = "ERR_CHANNEL_NOT_CONNECTED"
	CodeChannelTimeout      = "ERR_CHANNEL_TIMEOUT"

	// Worker runtime.
	CodeDeviceUnavailable = "ERR_DEVICE_UNAVAILABLE"
	CodeUnknownQueryType  = "ERR_UNKNOWN_QUERY_TYPE"
	CodeUnknownCommand    = "ERR_UNKNOWN_COMMAND"

	// ORK additions for admission and load.
	CodeUnauthorized = "ERR_UNAUTHORIZED" // peer not on the allowlist
	CodeForbidden    = "ERR_FORBIDDEN"    // role too low for the action
	CodeBusy         = "ERR_BUSY"         // resource limit reached; try later
	CodeInternal     = "ERR_INTERNAL"
)

// Error is the structured error carried in a response envelope. Code is the bare
// MDK code (ERR_X); Message is the full MDK error string ("ERR_X: detail"), so a
// caller matching MDK strings by prefix can use either.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message,omitempty"`
}

func (e *Error) Error() string {
	if e.Message != "" {
		return e.Message
	}
	return e.Code
}

// Is makes errors.Is(err, &Error{Code: X}) match on the code alone.
func (e *Error) Is(target error) bool {
	var t *Error
	if errors.As(target, &t) {
		return t.Code == e.Code && (t.Message == "" || t.Message == e.Message)
	}
	return false
}

// Errf builds an *Error whose message is "CODE: detail", the MDK style.
func Errf(code, format string, args ...any) *Error {
	return &Error{Code: code, Message: code + ": " + fmt.Sprintf(format, args...)}
}

// Err builds an *Error with no detail.
func Err(code string) *Error { return &Error{Code: code, Message: code} }

// ParseError turns an MDK error string ("ERR_X: detail" or "ERR_X") into an *Error.
func ParseError(s string) *Error {
	code, _, _ := strings.Cut(s, ":")
	return &Error{Code: strings.TrimSpace(code), Message: s}
}

// CodeOf returns the code of err if it is (or wraps) an *Error, else "".
func CodeOf(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return ""
}
