package envelope

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// field is one member of a test envelope, its value as raw JSON.
type field struct{ k, v string }

// validFields is a valid command.request, in wire order.
func validFields() []field {
	return []field{
		{"id", `"9b2f6c1e-2d43-4c1a-9f0e-3b8d7a6c5e41"`},
		{"version", `"0.2.0"`},
		{"type", `"request"`},
		{"action", `"command.request"`},
		{"sender", `"gateway"`},
		{"target", `null`},
		{"deviceId", `"miner-001"`},
		{"timestamp", `1700000000000`},
		{"payload", `{"command":"reboot","params":{}}`},
	}
}

// obj builds a JSON object from fields, applying edits: a field named in
// edits gets the new raw value, or is dropped if the value is "-"; edits for
// fields not present are appended.
func obj(edits ...field) string {
	fs := validFields()
	for _, e := range edits {
		found := false
		for i := range fs {
			if fs[i].k == e.k {
				fs[i].v = e.v
				found = true
			}
		}
		if !found {
			fs = append(fs, e)
		}
	}
	parts := make([]string, 0, len(fs))
	for _, f := range fs {
		if f.v != "-" {
			parts = append(parts, fmt.Sprintf("%q:%s", f.k, f.v))
		}
	}
	return "{" + strings.Join(parts, ",") + "}"
}

func TestDecodeValidationOrder(t *testing.T) {
	tests := []struct {
		name string
		in   string
		code string // "" = valid
	}{
		{"valid", obj(), ""},

		// Not JSON at all.
		{"empty", ``, CodeEnvelopeMalformed},
		{"whitespace only", "  \n\t", CodeEnvelopeMalformed},
		{"truncated", `{"id":"a"`, CodeEnvelopeMalformed},
		{"garbage", `hello`, CodeEnvelopeMalformed},
		{"missing value", `{"id":}`, CodeEnvelopeMalformed},
		{"trailing data", obj() + `{}`, CodeEnvelopeMalformed},
		{"single quotes", `{'id':'a'}`, CodeEnvelopeMalformed},
		{"non-breaking space around", "\u00a0" + obj(), CodeEnvelopeMalformed},

		// 1. whole: a non-array object.
		{"array", `[` + obj() + `]`, CodeEnvelopeNotObject},
		{"empty array", `[]`, CodeEnvelopeNotObject},
		{"string", `"request"`, CodeEnvelopeNotObject},
		{"number", `42`, CodeEnvelopeNotObject},
		{"null", `null`, CodeEnvelopeNotObject},
		{"bool", `true`, CodeEnvelopeNotObject},
		{"empty object", `{}`, CodeEnvelopeIDMissing},
		{"surrounding JSON whitespace ok", " \r\n" + obj() + "\t ", ""},

		// 2. id: non-empty string.
		{"id missing", obj(field{"id", "-"}), CodeEnvelopeIDMissing},
		{"id empty", obj(field{"id", `""`}), CodeEnvelopeIDMissing},
		{"id null", obj(field{"id", `null`}), CodeEnvelopeIDMissing},
		{"id number", obj(field{"id", `5`}), CodeEnvelopeIDMissing},
		{"id object", obj(field{"id", `{"v":"a"}`}), CodeEnvelopeIDMissing},
		{"id number, later fields wrong too", obj(field{"id", `5`}, field{"version", `7`}, field{"type", `"x"`}, field{"timestamp", `"now"`}, field{"payload", `[]`}), CodeEnvelopeIDMissing},
		{"id key in upper case", strings.Replace(obj(), `"id"`, `"ID"`, 1), CodeEnvelopeIDMissing},
		{"sender key with a Unicode fold (U+017F for s)", strings.Replace(obj(), `"sender"`, `"ſender"`, 1), CodeEnvelopeSenderInvalid},
		{"type key in title case", strings.Replace(obj(), `"type"`, `"Type"`, 1), CodeEnvelopeTypeInvalid},
		{"payload key in upper case is not the payload", strings.Replace(obj(field{"payload", `[]`}), `"payload"`, `"PAYLOAD"`, 1), ""},
		{"id key escaped is still id", strings.Replace(obj(), `"id"`, `"\u0069d"`, 1), ""},
		{"duplicate id, last valid", strings.Replace(obj(), `{"id":`, `{"id":5,"id":`, 1), ""},
		{"duplicate id, last invalid", strings.Replace(obj(), `{"id":"9b2f6c1e-2d43-4c1a-9f0e-3b8d7a6c5e41"`, `{"id":"a","id":""`, 1), CodeEnvelopeIDMissing},

		// 3. version: non-empty string (value compared by ORK only after the MDK rules).
		{"version missing", obj(field{"version", "-"}), CodeEnvelopeVersionMissing},
		{"version empty", obj(field{"version", `""`}), CodeEnvelopeVersionMissing},
		{"version number", obj(field{"version", `2`}), CodeEnvelopeVersionMissing},
		{"version missing, type wrong", obj(field{"version", "-"}, field{"type", `"x"`}), CodeEnvelopeVersionMissing},
		{"version 0.1.0 accepted", obj(field{"version", `"0.1.0"`}), ""},
		{"version 0.9 accepted", obj(field{"version", `"0.9"`}), ""},
		{"version 1.0.0 unsupported", obj(field{"version", `"1.0.0"`}), CodeEnvelopeVersionUnsupported},
		{"version junk unsupported", obj(field{"version", `"v0"`}), CodeEnvelopeVersionUnsupported},
		{"version 1.0.0 but sender missing: MDK rule first", obj(field{"version", `"1.0.0"`}, field{"sender", "-"}), CodeEnvelopeSenderInvalid},

		// 4. type: request | response | event.
		{"type missing", obj(field{"type", "-"}), CodeEnvelopeTypeInvalid},
		{"type unknown", obj(field{"type", `"command"`}), CodeEnvelopeTypeInvalid},
		{"type upper case", obj(field{"type", `"REQUEST"`}), CodeEnvelopeTypeInvalid},
		{"type number", obj(field{"type", `1`}), CodeEnvelopeTypeInvalid},
		{"type wrong, action unknown", obj(field{"type", `"x"`}, field{"action", `"nope"`}), CodeEnvelopeTypeInvalid},
		{"type response", obj(field{"type", `"response"`}), ""},
		{"type event", obj(field{"type", `"event"`}), ""},

		// 5. action: non-empty string, then a known one.
		{"action missing", obj(field{"action", "-"}), CodeEnvelopeActionInvalid},
		{"action empty", obj(field{"action", `""`}), CodeEnvelopeActionInvalid},
		{"action number", obj(field{"action", `3`}), CodeEnvelopeActionInvalid},
		{"action unknown", obj(field{"action", `"command.explode"`}), CodeEnvelopeActionUnknown},
		{"action unknown, sender missing", obj(field{"action", `"x"`}, field{"sender", "-"}), CodeEnvelopeActionUnknown},
		{"action ORK addition", obj(field{"action", `"command.wait"`}), ""},

		// 6. sender: non-empty string.
		{"sender missing", obj(field{"sender", "-"}), CodeEnvelopeSenderInvalid},
		{"sender empty", obj(field{"sender", `""`}), CodeEnvelopeSenderInvalid},
		{"sender array", obj(field{"sender", `["g"]`}), CodeEnvelopeSenderInvalid},
		{"sender missing, timestamp missing", obj(field{"sender", "-"}, field{"timestamp", "-"}), CodeEnvelopeSenderInvalid},

		// target and deviceId are not validated.
		{"target number ignored", obj(field{"target", `12`}), ""},
		{"deviceId object ignored", obj(field{"deviceId", `{}`}), ""},

		// 7. timestamp: any truthy number.
		{"timestamp missing", obj(field{"timestamp", "-"}), CodeEnvelopeTimestampInvalid},
		{"timestamp zero", obj(field{"timestamp", `0`}), CodeEnvelopeTimestampInvalid},
		{"timestamp negative zero", obj(field{"timestamp", `-0`}), CodeEnvelopeTimestampInvalid},
		{"timestamp 0.0", obj(field{"timestamp", `0.0`}), CodeEnvelopeTimestampInvalid},
		{"timestamp underflow to zero", obj(field{"timestamp", `1e-400`}), CodeEnvelopeTimestampInvalid},
		{"timestamp false", obj(field{"timestamp", `false`}), CodeEnvelopeTimestampInvalid},
		{"timestamp true", obj(field{"timestamp", `true`}), CodeEnvelopeTimestampInvalid},
		{"timestamp string", obj(field{"timestamp", `"1700000000000"`}), CodeEnvelopeTimestampInvalid},
		{"timestamp null", obj(field{"timestamp", `null`}), CodeEnvelopeTimestampInvalid},
		{"timestamp zero, payload array", obj(field{"timestamp", `0`}, field{"payload", `[]`}), CodeEnvelopeTimestampInvalid},
		{"timestamp 1", obj(field{"timestamp", `1`}), ""},
		{"timestamp negative", obj(field{"timestamp", `-5`}), ""},
		{"timestamp fraction", obj(field{"timestamp", `1.5`}), ""},
		{"timestamp small fraction", obj(field{"timestamp", `0.5`}), ""},
		{"timestamp exponent", obj(field{"timestamp", `1.7e12`}), ""},
		{"timestamp beyond int64", obj(field{"timestamp", `99999999999999999999`}), ""},
		{"timestamp beyond float64 (JS Infinity)", obj(field{"timestamp", `1e400`}), ""},

		// 8. payload: absent, null or a non-array object.
		{"payload missing", obj(field{"payload", "-"}), ""},
		{"payload null", obj(field{"payload", `null`}), ""},
		{"payload empty object", obj(field{"payload", `{}`}), ""},
		{"payload array", obj(field{"payload", `[]`}), CodeEnvelopePayloadInvalid},
		{"payload string", obj(field{"payload", `"{}"`}), CodeEnvelopePayloadInvalid},
		{"payload number", obj(field{"payload", `1`}), CodeEnvelopePayloadInvalid},
		{"payload false", obj(field{"payload", `false`}), CodeEnvelopePayloadInvalid},
		{"payload array, version unsupported", obj(field{"payload", `[]`}, field{"version", `"2.0.0"`}), CodeEnvelopePayloadInvalid},

		// ORK fields.
		{"replyTo number ignored", obj(field{"replyTo", `1`}), ""},
		{"error object", obj(field{"error", `{"code":"ERR_X","message":"ERR_X: y"}`}), ""},
		{"error bare MDK string", obj(field{"error", `"ERR_X: y"`}), ""},
		{"error null", obj(field{"error", `null`}), ""},
		{"error number", obj(field{"error", `1`}), CodeEnvelopeMalformed},
		{"error with a mistyped code", obj(field{"error", `{"code":5}`}), CodeEnvelopeMalformed},
		{"unknown fields ignored", obj(field{"extra", `{"a":[1,2,{"b":"}"}]}`}), ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, err := Decode([]byte(tt.in))
			if tt.code == "" {
				require.NoError(t, err)
				require.NotNil(t, e)
				return
			}
			require.Error(t, err)
			require.Nil(t, e)
			var ee *Error
			require.ErrorAs(t, err, &ee, "Decode errors are *Error")
			require.Equal(t, tt.code, ee.Code, "message: %s", ee.Message)
			require.True(t, strings.HasPrefix(ee.Message, tt.code), "MDK callers match the message by prefix: %q", ee.Message)
		})
	}
}

func TestDecodeValues(t *testing.T) {
	e, err := Decode([]byte(obj(field{"replyTo", `"r-1"`}, field{"error", `"ERR_DEVICE_NOT_FOUND: m7"`})))
	require.NoError(t, err)
	require.Equal(t, &Envelope{
		ID:        "9b2f6c1e-2d43-4c1a-9f0e-3b8d7a6c5e41",
		Version:   "0.2.0",
		Type:      TypeRequest,
		Action:    ActionCommandRequest,
		Sender:    "gateway",
		DeviceID:  "miner-001",
		Timestamp: 1700000000000,
		Payload:   json.RawMessage(`{"command":"reboot","params":{}}`),
		ReplyTo:   "r-1",
		Error:     &Error{Code: CodeDeviceNotFound, Message: "ERR_DEVICE_NOT_FOUND: m7"},
	}, e)

	// Escapes in strings are decoded.
	e, err = Decode([]byte(obj(field{"sender", `"a\"b\\c\u00e9\n"`})))
	require.NoError(t, err)
	require.Equal(t, "a\"b\\cé\n", e.Sender)

	// Invalid UTF-8 becomes U+FFFD, as with encoding/json.
	e, err = Decode([]byte(obj(field{"sender", "\"g\xffw\""})))
	require.NoError(t, err)
	require.Equal(t, "g\ufffdw", e.Sender)

	// The payload is copied out of the (pooled) input buffer.
	in := []byte(obj())
	e, err = Decode(in)
	require.NoError(t, err)
	clear(in)
	require.JSONEq(t, `{"command":"reboot","params":{}}`, string(e.Payload))

	// The error field's code on a MDK-string error.
	e, err = Decode([]byte(obj(field{"error", `"ERR_BUSY"`})))
	require.NoError(t, err)
	require.Equal(t, &Error{Code: CodeBusy, Message: CodeBusy}, e.Error)
}

func TestDecodeTimestamp(t *testing.T) {
	for in, want := range map[string]int64{
		`1`:                    1,
		`-5`:                   -5,
		`1.5`:                  1,
		`0.5`:                  1,
		`-0.5`:                 -1,
		`1.7e12`:               1_700_000_000_000,
		`99999999999999999999`: math.MaxInt64,
		`-1e30`:                math.MinInt64,
		`1e400`:                math.MaxInt64,
		`-1e400`:               math.MinInt64,
	} {
		e, err := Decode([]byte(obj(field{"timestamp", in})))
		require.NoError(t, err, in)
		require.Equal(t, want, e.Timestamp, in)
	}
}

func TestValidate(t *testing.T) {
	ok := func() *Envelope {
		return &Envelope{ID: "i", Version: ProtocolVersion, Type: TypeRequest, Action: ActionHealthPing, Sender: "s", Timestamp: 1}
	}
	require.NoError(t, ok().Validate())
	for _, tc := range []struct {
		mod  func(*Envelope)
		code string
	}{
		{func(e *Envelope) { e.ID = "" }, CodeEnvelopeIDMissing},
		{func(e *Envelope) { e.Version = "" }, CodeEnvelopeVersionMissing},
		{func(e *Envelope) { e.Type = "x" }, CodeEnvelopeTypeInvalid},
		{func(e *Envelope) { e.Action = "" }, CodeEnvelopeActionInvalid},
		{func(e *Envelope) { e.Action = "x" }, CodeEnvelopeActionUnknown},
		{func(e *Envelope) { e.Sender = "" }, CodeEnvelopeSenderInvalid},
		{func(e *Envelope) { e.Timestamp = 0 }, CodeEnvelopeTimestampInvalid},
		{func(e *Envelope) { e.Payload = json.RawMessage(` [1]`) }, CodeEnvelopePayloadInvalid},
		{func(e *Envelope) { e.Version = "3.1.4" }, CodeEnvelopeVersionUnsupported},
	} {
		e := ok()
		tc.mod(e)
		require.Equal(t, tc.code, CodeOf(e.Validate()))
	}
}

func TestNewRequest(t *testing.T) {
	e, err := NewRequest(ActionHealthPing, "kernel", nil)
	require.NoError(t, err)
	require.NoError(t, e.Validate())
	require.Equal(t, TypeRequest, e.Type)
	require.Equal(t, ProtocolVersion, e.Version)
	require.Equal(t, "{}", string(e.Payload))
	require.Regexp(t, `^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`, e.ID)
	require.Positive(t, e.Timestamp)

	e2, err := NewRequest(ActionHealthPing, "kernel", nil)
	require.NoError(t, err)
	require.NotEqual(t, e.ID, e2.ID)

	e, err = NewRequest(ActionCommandRequest, "gateway", CommandRequest{Command: "reboot"})
	require.NoError(t, err)
	require.JSONEq(t, `{"command":"reboot"}`, string(e.Payload))

	e, err = NewRequest(ActionCommandRequest, "gateway", json.RawMessage(`{"command":"x"}`))
	require.NoError(t, err)
	require.Equal(t, `{"command":"x"}`, string(e.Payload))

	e, err = NewRequest(ActionCommandRequest, "gateway", json.RawMessage(nil))
	require.NoError(t, err)
	require.Equal(t, `{}`, string(e.Payload))

	_, err = NewRequest(ActionCommandRequest, "gateway", map[string]any{"c": make(chan int)})
	require.Error(t, err)
}

func TestReply(t *testing.T) {
	req := &Envelope{ID: "req-1", Version: "0.1.0", Type: TypeRequest, Action: ActionCommandRequest,
		Sender: "gateway", Target: "kernel", DeviceID: "miner-7", Timestamp: 5, Payload: json.RawMessage(`{"command":"reboot"}`)}
	r, err := req.Reply("worker-1", CommandResult{CommandID: "c1", Status: StateSuccess}, nil)
	require.NoError(t, err)
	require.NoError(t, r.Validate())
	require.Equal(t, TypeResponse, r.Type)
	require.Equal(t, ActionCommandResult, r.Action, "command.request is answered by command.result")
	require.Equal(t, "worker-1", r.Sender)
	require.Equal(t, "gateway", r.Target, "target is the request's sender")
	require.Equal(t, "miner-7", r.DeviceID, "deviceId is copied")
	require.Equal(t, "req-1", r.ReplyTo)
	require.Equal(t, ProtocolVersion, r.Version)
	require.NotEqual(t, req.ID, r.ID)
	require.NotEmpty(t, r.ID)
	require.Greater(t, r.Timestamp, int64(5))
	require.Nil(t, r.Error)
	require.JSONEq(t, `{"commandId":"c1","status":"SUCCESS"}`, string(r.Payload))

	// Every MDK response action, and actions without one answer with their own name.
	for reqAction, want := range map[string]string{
		ActionIdentityRequest:   ActionIdentityResponse,
		ActionCapabilityRequest: ActionCapabilityResponse,
		ActionTelemetryPull:     ActionTelemetryResponse,
		ActionStatePull:         ActionStateResponse,
		ActionCommandRequest:    ActionCommandResult,
		ActionCommandStatus:     ActionCommandStatusResponse,
		ActionCommandCancel:     ActionCommandCancelResponse,
		ActionHealthPing:        ActionHealthPong,
		ActionWriteCallsRequest: ActionWriteCallsResponse,
		ActionWorkerList:        ActionWorkerList,
		ActionCommandWait:       ActionCommandWait,
		ActionError:             ActionError,
	} {
		req.Action = reqAction
		r, err := req.Reply("k", nil, Errf(CodeBusy, "later"))
		require.NoError(t, err)
		require.Equal(t, want, r.Action)
		require.True(t, KnownAction(r.Action))
		require.Equal(t, "{}", string(r.Payload))
		require.Equal(t, &Error{Code: CodeBusy, Message: "ERR_BUSY: later"}, r.Error)
	}

	_, err = req.Reply("k", func() {}, nil)
	require.Error(t, err)
}

func TestDecodePayload(t *testing.T) {
	var m map[string]any
	for _, p := range []json.RawMessage{nil, json.RawMessage("null")} {
		e := &Envelope{Payload: p}
		require.NoError(t, e.DecodePayload(&m))
		require.Empty(t, m)
	}
	e := &Envelope{Payload: json.RawMessage(`{"command":7}`)}
	var s struct{ Command string }
	err := e.DecodePayload(&s)
	require.Equal(t, CodePayloadNotObject, CodeOf(err))
}

func TestErrors(t *testing.T) {
	e := Errf(CodeParamRange, "%s below min %d", "watts", 5)
	require.Equal(t, "ERR_PARAM_RANGE: watts below min 5", e.Error())
	require.Equal(t, CodeParamRange, e.Code)
	require.Equal(t, "ERR_BUSY", Err(CodeBusy).Error())
	require.Equal(t, "ERR_X", (&Error{Code: "ERR_X"}).Error())

	wrapped := fmt.Errorf("dispatch: %w", e)
	require.Equal(t, CodeParamRange, CodeOf(wrapped))
	require.Empty(t, CodeOf(errors.New("plain")))
	require.Empty(t, CodeOf(nil))
	require.ErrorIs(t, wrapped, &Error{Code: CodeParamRange})
	require.ErrorIs(t, wrapped, &Error{Code: CodeParamRange, Message: "ERR_PARAM_RANGE: watts below min 5"})
	require.NotErrorIs(t, wrapped, &Error{Code: CodeParamRange, Message: "other"})
	require.NotErrorIs(t, wrapped, &Error{Code: CodeParamType})

	for in, want := range map[string]*Error{
		"ERR_DEVICE_NOT_FOUND: m1": {Code: CodeDeviceNotFound, Message: "ERR_DEVICE_NOT_FOUND: m1"},
		"ERR_BUSY":                 {Code: CodeBusy, Message: "ERR_BUSY"},
		" ERR_X :a:b":              {Code: "ERR_X", Message: " ERR_X :a:b"},
	} {
		require.Equal(t, want, ParseError(in), in)
	}
}

func TestActions(t *testing.T) {
	require.True(t, KnownAction(ActionCommandRequest))
	require.True(t, KnownAction("action.push-batch"))
	require.False(t, KnownAction(""))
	require.False(t, KnownAction("Command.Request"))
	require.Equal(t, ActionHealthPong, ResponseAction(ActionHealthPing))
	require.Equal(t, "worker.list", ResponseAction("worker.list"))
	require.True(t, IsTerminalState(StateCancelled))
	require.False(t, IsTerminalState(StateExecuting))
}

func TestMarshal(t *testing.T) {
	e := &Envelope{ID: "i", Version: ProtocolVersion, Type: TypeResponse, Action: ActionHealthPong, Sender: "w",
		Target: "k", DeviceID: "d", Timestamp: -3, Payload: json.RawMessage(`{"status":"OK"}`), ReplyTo: "r",
		Error: &Error{Code: CodeBusy}}
	b, err := Marshal(e)
	require.NoError(t, err)
	require.Equal(t, `{"id":"i","version":"0.2.0","type":"response","action":"health.pong","sender":"w","target":"k","deviceId":"d","timestamp":-3,"payload":{"status":"OK"},"replyTo":"r","error":{"code":"ERR_BUSY"}}`, string(b))

	// The same meaning as encoding/json's output.
	std, err := json.Marshal(e)
	require.NoError(t, err)
	require.JSONEq(t, string(std), string(b))

	// Empty optional fields are left out, as with omitempty.
	b, err = Marshal(&Envelope{ID: "i", Timestamp: 1})
	require.NoError(t, err)
	require.Equal(t, `{"id":"i","version":"","type":"","action":"","sender":"","timestamp":1}`, string(b))

	// Strings are escaped; the result is valid JSON that decodes to the same text.
	weird := "q\"b\\s/\n\r\t\x00\x1f<>&\u2028é\xff🙂"
	b, err = Marshal(&Envelope{ID: weird, Timestamp: 1})
	require.NoError(t, err)
	require.True(t, json.Valid(b), string(b))
	var back struct{ ID string }
	require.NoError(t, json.Unmarshal(b, &back))
	require.Equal(t, strings.ToValidUTF8(weird, "\ufffd"), back.ID)

	// A payload that is not JSON is refused, as json.Marshal would.
	_, err = Marshal(&Envelope{ID: "i", Payload: json.RawMessage(`{"a":`)})
	require.Error(t, err)
}

func TestMarshalDecodeRoundTrip(t *testing.T) {
	in := []byte(obj(field{"target", `"kernel"`}, field{"replyTo", `"r"`}, field{"error", `{"code":"ERR_X","message":"ERR_X: y"}`}))
	e, err := Decode(in)
	require.NoError(t, err)
	out, err := Marshal(e)
	require.NoError(t, err)
	require.Equal(t, string(in), string(out), "a compact envelope in field order marshals back byte for byte")
}
