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
	"unicode/utf8"
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
		var ee *Error
		if errors.As(err, &ee) {
			return ee // a payload type's own MDK code (see CommandRequest.UnmarshalJSON)
		}
		return Errf(CodePayloadNotObject, "%v", err)
	}
	return nil
}

// Marshal encodes the envelope as JSON: the same fields and meaning as
// json.Marshal(e), written directly. The payload is written verbatim after a
// validity check (json.Marshal would also compact and re-escape it), so a
// decoded envelope marshals back to the bytes it came from when those were
// compact.
func Marshal(e *Envelope) ([]byte, error) {
	n := 128 + len(e.ID) + len(e.Version) + len(e.Type) + len(e.Action) + len(e.Sender) +
		len(e.Target) + len(e.DeviceID) + len(e.Payload) + len(e.ReplyTo)
	if e.Error != nil {
		n += 32 + len(e.Error.Code) + len(e.Error.Message)
	}
	return appendMarshal(make([]byte, 0, n), e)
}

// appendMarshal appends the JSON encoding of e to dst (see Marshal).
func appendMarshal(dst []byte, e *Envelope) ([]byte, error) {
	if len(e.Payload) > 0 && !json.Valid(e.Payload) {
		return nil, errors.New("ork/envelope: payload is not valid JSON")
	}
	b := append(dst, `{"id":`...)
	b = appendString(b, e.ID)
	b = append(b, `,"version":`...)
	b = appendString(b, e.Version)
	b = append(b, `,"type":`...)
	b = appendString(b, e.Type)
	b = append(b, `,"action":`...)
	b = appendString(b, e.Action)
	b = append(b, `,"sender":`...)
	b = appendString(b, e.Sender)
	if e.Target != "" {
		b = append(b, `,"target":`...)
		b = appendString(b, e.Target)
	}
	if e.DeviceID != "" {
		b = append(b, `,"deviceId":`...)
		b = appendString(b, e.DeviceID)
	}
	b = append(b, `,"timestamp":`...)
	b = strconv.AppendInt(b, e.Timestamp, 10)
	if len(e.Payload) > 0 {
		b = append(b, `,"payload":`...)
		b = append(b, e.Payload...)
	}
	if e.ReplyTo != "" {
		b = append(b, `,"replyTo":`...)
		b = appendString(b, e.ReplyTo)
	}
	if e.Error != nil {
		b = append(b, `,"error":{"code":`...)
		b = appendString(b, e.Error.Code)
		if e.Error.Message != "" {
			b = append(b, `,"message":`...)
			b = appendString(b, e.Error.Message)
		}
		b = append(b, '}')
	}
	return append(b, '}'), nil
}

const hexDigits = "0123456789abcdef"

// appendString appends s as a JSON string. Invalid UTF-8 becomes U+FFFD, as
// with encoding/json; <, > and & are left alone (no HTML on this wire).
func appendString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i++
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

// Decode parses and validates one envelope. The error, always an *Error, is
// the first failure in the MDK validation order (MDK-REFERENCE §4.2); a body
// that is not JSON at all gets ERR_ENVELOPE_MALFORMED.
//
// Field names match exactly, as JSON.parse does in the JS implementations:
// {"ID": …} is not an id. A field of the wrong JSON type reads as absent (so
// an id that is a number is ERR_ENVELOPE_ID_MISSING), and a timestamp is any
// non-zero number (MDK: truthy).
func Decode(b []byte) (*Envelope, error) {
	if !json.Valid(b) {
		var v any
		if err := json.Unmarshal(b, &v); err != nil {
			return nil, Errf(CodeEnvelopeMalformed, "%v", err)
		}
		return nil, Err(CodeEnvelopeMalformed)
	}
	var f rawFields
	if !scanObject(b, &f) {
		return nil, Err(CodeEnvelopeNotObject)
	}
	e := &Envelope{
		ID:        rawString(f.id),
		Version:   rawString(f.version),
		Type:      rawString(f.typ),
		Action:    rawString(f.action),
		Sender:    rawString(f.sender),
		Target:    rawString(f.target),
		DeviceID:  rawString(f.deviceID),
		Timestamp: rawTimestamp(f.timestamp),
		ReplyTo:   rawString(f.replyTo),
	}
	if f.payload != nil {
		// Copied: b is usually a pooled frame buffer.
		e.Payload = append(json.RawMessage(nil), f.payload...)
	}
	if err := e.Validate(); err != nil {
		return nil, err
	}
	if f.err != nil && string(f.err) != "null" {
		ee, err := decodeError(f.err)
		if err != nil {
			return nil, err
		}
		e.Error = ee
	}
	return e, nil
}

// decodeError reads the error field: {code, message}, or a bare MDK error
// string.
func decodeError(raw []byte) (*Error, error) {
	switch raw[0] {
	case '{':
		var ee Error
		if err := json.Unmarshal(raw, &ee); err != nil {
			return nil, Errf(CodeEnvelopeMalformed, "error field: %v", err)
		}
		return &ee, nil
	case '"':
		return ParseError(rawString(raw)), nil
	}
	return nil, Errf(CodeEnvelopeMalformed, "error field: not an object or a string")
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

// String is a short form for logs.
func (e *Envelope) String() string {
	return e.Type + " " + e.Action + " id=" + e.ID + " ts=" + strconv.FormatInt(e.Timestamp, 10)
}
