package dispatcher

import (
	"github.com/orknode/ork/protocols/envelope"
)

// decodeRequest decodes and validates a command.request payload: DecodePayload (a payload that is not an
// object, or a mistyped field, fails with the MDK code of the first rule it breaks — see
// CommandRequest.UnmarshalJSON), then CommandRequest.Validate, then timeoutMs >= 0.
func decodeRequest(e *envelope.Envelope) (*envelope.CommandRequest, error) {
	var c envelope.CommandRequest
	if err := e.DecodePayload(&c); err != nil {
		return nil, err
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if c.WaitMs < 0 {
		return nil, envelope.Errf(envelope.CodePayloadNotObject, "waitMs must be >= 0")
	}
	if c.TimeoutMs < 0 {
		return nil, envelope.Errf(envelope.CodePayloadNotObject, "timeoutMs must be >= 0")
	}
	return &c, nil
}
