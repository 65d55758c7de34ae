// Package envelope is the ORK wire vocabulary: the MDK envelope with its
// validation order and error strings, the action names, and typed payloads.
// It is the one wire package the kernel modules import, so it depends on the
// standard library only.
package envelope

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"time"
)

// Envelope is one MDK message. Target and DeviceID are null on the wire when
// empty; ReplyTo (the request id) and Error are ORK additions, set on responses.
type Envelope struct {
	ID        string          `json:"id"`
	Version   string          `json:"version"`
	Type      string          `json:"type"`
	Action    string          `json:"action"`
	Sender    string          `json:"sender"`
	Target    string          `json:"target,omitempty"`
	DeviceID  string          `json:"deviceId,omitempty"`
	Timestamp int64           `json:"timestamp"`
	Payload   json.RawMessage `json:"payload,omitempty"`
	ReplyTo   string          `json:"replyTo,omitempty"`
	Error     *Error          `json:"error,omitempty"`
}

// NewID returns a random UUID v4, the MDK id format.
func NewID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	var s [36]byte
	hex.Encode(s[0:8], b[0:4])
	s[8] = '-'
	hex.Encode(s[9:13], b[4:6])
	s[13] = '-'
	hex.Encode(s[14:18], b[6:8])
	s[18] = '-'
	hex.Encode(s[19:23], b[8:10])
	s[23] = '-'
	hex.Encode(s[24:], b[10:])
	return string(s[:])
}

// NewRequest builds a request envelope with a fresh id and timestamp. payload
// may be nil (encoded as {}), a json.RawMessage, or any JSON-marshalable value.
func NewRequest(action, sender string, payload any) (*Envelope, error) {
	raw, err := encodePayload(payload)
	if err != nil {
		return nil, err
	}
	return &Envelope{
		ID:        NewID(),
		Version:   ProtocolVersion,
		Type:      TypeRequest,
		Action:    action,
		Sender:    sender,
		Timestamp: time.Now().UnixMilli(),
		Payload:   raw,
	}, nil
}

// Reply builds the response to req: the MDK response shape (target = the
// request's sender, same deviceId, fresh id and timestamp) plus replyTo.
// A non-nil e is carried as the structured error.
func (req *Envelope) Reply(sender string, payload any, e *Error) (*Envelope, error) {
	raw, err := encodePayload(payload)
	if err != nil {
		return nil, err
	}
	return &Envelope{
		ID:        NewID(),
		Version:   ProtocolVersion,
		Type:      TypeResponse,
		Action:    ResponseAction(req.Action),
		Sender:    sender,
		Target:    req.Sender,
		DeviceID:  req.DeviceID,
		Timestamp: time.Now().UnixMilli(),
		Payload:   raw,
		ReplyTo:   req.ID,
		Error:     e,
	}, nil
}

var emptyObject = json.RawMessage("{}")

func encodePayload(p any) (json.RawMessage, error) {
	switch v := p.(type) {
	case nil:
		return emptyObject, nil
	case json.RawMessage:
		if len(v) == 0 {
			return emptyObject, nil
		}
		return v, nil
	case []byte:
		return json.RawMessage(v), nil
	}
	b, err := json.Marshal(p)
	if err != nil {
		return nil, err
	}
	return b, nil
}

// DecodePayload unmarshals the payload into v. A missing or null payload
// decodes as {}.
func (e *Envelope) DecodePayload(v any) error {
	p := e.Payload
	if len(p) == 0 || string(p) == "null" {
		p = emptyObject
	}
	if err := json.Unmarshal(p, v); err != nil {
		return Errf(CodePayloadNotObject, "%v", err)
	}
	return nil
}

// Marshal encodes the envelope as JSON.
func Marshal(e *Envelope) ([]byte, error) { return json.Marshal(e) }

// Decode parses and validates one envelope. The error, always an *Error, is
// the first failure in the MDK validation order (MDK-REFERENCE §4.2); a body
// that is not JSON at all gets ERR_ENVELOPE_MALFORMED.
func Decode(b []byte) (*Envelope, error) {
	b = bytes.TrimSpace(b)
	if len(b) == 0 {
		return nil, Err(CodeEnvelopeMalformed)
	}
	if b[0] != '{' {
		if json.Valid(b) {
			return nil, Err(CodeEnvelopeNotObject)
		}
		return nil, Err(CodeEnvelopeMalformed)
	}
	var e Envelope
	err := json.Unmarshal(b, &e)
	if err == nil {
		if err := e.Validate(); err != nil {
			return nil, err
		}
		return &e, nil
	}
	var typeErr *json.UnmarshalTypeError
	if !errors.As(err, &typeErr) {
		return nil, Errf(CodeEnvelopeMalformed, "%v", err)
	}
	// A field of the wrong JSON type: find which one comes first in the
	// validation order, field by field.
	return decodeLoose(b)
}

// Validate checks field values in the MDK order; the first failure wins.
func (e *Envelope) Validate() error {
	switch {
	case e.ID == "":
		return Err(CodeEnvelopeIDMissing)
	case e.Version == "":
		return Err(CodeEnvelopeVersionMissing)
	case e.Type != TypeRequest && e.Type != TypeResponse && e.Type != TypeEvent:
		return Err(CodeEnvelopeTypeInvalid)
	case e.Action == "":
		return Err(CodeEnvelopeActionInvalid)
	case !KnownAction(e.Action):
		return Errf(CodeEnvelopeActionUnknown, "%s", e.Action)
	case e.Sender == "":
		return Err(CodeEnvelopeSenderInvalid)
	case e.Timestamp == 0:
		return Err(CodeEnvelopeTimestampInvalid)
	case !payloadIsObject(e.Payload):
		return Err(CodeEnvelopePayloadInvalid)
	case !supportedVersion(e.Version):
		return Errf(CodeEnvelopeVersionUnsupported, "%s", e.Version)
	}
	return nil
}

func payloadIsObject(p json.RawMessage) bool {
	p = bytes.TrimSpace(p)
	return len(p) == 0 || string(p) == "null" || p[0] == '{'
}

// supportedVersion accepts every 0.x version: the original kernel never
// compared versions and its CLI examples still send 0.1.0.
func supportedVersion(v string) bool {
	major, _, _ := strings.Cut(v, ".")
	return major == "0"
}

// decodeLoose is the slow path for envelopes with a mistyped field.
func decodeLoose(b []byte) (*Envelope, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, Errf(CodeEnvelopeMalformed, "%v", err)
	}
	str := func(k string) string {
		var s string
		if raw, ok := m[k]; ok && json.Unmarshal(raw, &s) == nil {
			return s
		}
		return ""
	}
	e := &Envelope{
		ID:       str("id"),
		Version:  str("version"),
		Type:     str("type"),
		Action:   str("action"),
		Sender:   str("sender"),
		Target:   str("target"),
		DeviceID: str("deviceId"),
		ReplyTo:  str("replyTo"),
		Payload:  m["payload"],
	}
	// MDK accepts any truthy number as a timestamp.
	if raw, ok := m["timestamp"]; ok {
		var f float64
		if json.Unmarshal(raw, &f) == nil && f != 0 {
			e.Timestamp = int64(f)
			if e.Timestamp == 0 {
				e.Timestamp = 1
			}
		}
	}
	if err := e.Validate(); err != nil {
		return nil, err
	}
	if raw, ok := m["error"]; ok && string(raw) != "null" {
		var ee Error
		if err := json.Unmarshal(raw, &ee); err != nil {
			// A bare MDK error string is accepted too.
			var s string
			if json.Unmarshal(raw, &s) != nil {
				return nil, Errf(CodeEnvelopeMalformed, "error field: %v", err)
			}
			ee = *ParseError(s)
		}
		e.Error = &ee
	}
	return e, nil
}

// String is a short form for logs.
func (e *Envelope) String() string {
	return e.Type + " " + e.Action + " id=" + e.ID + " ts=" + strconv.FormatInt(e.Timestamp, 10)
}
