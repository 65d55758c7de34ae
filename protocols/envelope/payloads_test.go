package envelope

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func targets(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("miner-%04d", i)
	}
	return out
}

func TestIdentityResponseValidate(t *testing.T) {
	tests := []struct {
		name string
		r    IdentityResponse
		code string
		msg  string
	}{
		{"ok", IdentityResponse{WorkerID: "w1", Devices: []DeviceInfo{{DeviceID: "m1", Rack: "r1"}}}, "", ""},
		{"no devices is a valid empty list", IdentityResponse{WorkerID: "w1", Devices: []DeviceInfo{}}, "", ""},
		{"workerId missing", IdentityResponse{Devices: []DeviceInfo{}}, CodePayloadWorkerIDRequired, ""},
		{"workerId first", IdentityResponse{}, CodePayloadWorkerIDRequired, ""},
		{"devices missing", IdentityResponse{WorkerID: "w1"}, CodePayloadDevicesRequired, ""},
		{"device without id", IdentityResponse{WorkerID: "w1", Devices: []DeviceInfo{{DeviceID: "m1"}, {Model: "S19"}}},
			CodePayloadDeviceInvalid, "ERR_PAYLOAD_DEVICE_INVALID: at index 1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.r.Validate()
			if tt.code == "" {
				require.NoError(t, err)
				return
			}
			require.Equal(t, tt.code, CodeOf(err))
			if tt.msg != "" {
				require.EqualError(t, err, tt.msg)
			}
		})
	}
}

func TestCommandRequestValidate(t *testing.T) {
	tests := []struct {
		name string
		c    CommandRequest
		code string
		msg  string
	}{
		{"device scope implied", CommandRequest{Command: "reboot"}, "", ""},
		{"device scope", CommandRequest{Command: "reboot", Scope: ScopeDevice}, "", ""},
		{"worker scope", CommandRequest{Command: "reboot", Scope: ScopeWorker, WorkerID: "w1"}, "", ""},
		{"rack scope by label", CommandRequest{Command: "reboot", Scope: ScopeRack, Rack: "r7"}, "", ""},
		{"rack scope by worker (MDK form)", CommandRequest{Command: "reboot", Scope: ScopeRack, WorkerID: "w1"}, "", ""},
		{"command missing", CommandRequest{Scope: "galaxy", Targets: []string{""}}, CodePayloadCommandRequired, ""},
		{"scope invalid", CommandRequest{Command: "reboot", Scope: "galaxy"}, CodePayloadScopeInvalid, "ERR_PAYLOAD_SCOPE_INVALID: galaxy"},
		{"scope upper case", CommandRequest{Command: "reboot", Scope: "DEVICE"}, CodePayloadScopeInvalid, ""},
		{"scope invalid before targets", CommandRequest{Command: "reboot", Scope: "x", Targets: targets(2000)}, CodePayloadScopeInvalid, ""},
		{"worker scope needs workerId", CommandRequest{Command: "reboot", Scope: ScopeWorker}, CodePayloadWorkerIDRequired, ""},
		{"worker scope needs workerId, not a rack", CommandRequest{Command: "reboot", Scope: ScopeWorker, Rack: "r1"}, CodePayloadWorkerIDRequired, ""},
		{"rack scope needs a rack", CommandRequest{Command: "reboot", Scope: ScopeRack}, CodeRackRequired, ""},
		{"MAX_TARGETS targets", CommandRequest{Command: "reboot", Scope: ScopeWorker, WorkerID: "w1", Targets: targets(MaxTargets)}, "", ""},
		{"MAX_TARGETS+1 targets", CommandRequest{Command: "reboot", Scope: ScopeWorker, WorkerID: "w1", Targets: targets(MaxTargets + 1)},
			CodePayloadTargetsTooMany, "ERR_PAYLOAD_TARGETS_TOO_MANY: 1025 > 1024"},
		{"too many before an empty target", CommandRequest{Command: "reboot", Targets: append([]string{""}, targets(MaxTargets)...)}, CodePayloadTargetsTooMany, ""},
		{"empty target", CommandRequest{Command: "reboot", Targets: []string{"m1", "m2", ""}}, CodePayloadTargetInvalid, "ERR_PAYLOAD_TARGET_INVALID: at index 2"},
	}
	require.Equal(t, 1024, MaxTargets)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.c.Validate()
			if tt.code == "" {
				require.NoError(t, err)
				return
			}
			require.Equal(t, tt.code, CodeOf(err), "%v", err)
			if tt.msg != "" {
				require.EqualError(t, err, tt.msg)
			}
		})
	}
}

// A payload field of the wrong JSON type gets the MDK code of the first rule
// it breaks, in MDK order, on the live path (DecodePayload), not a generic
// decoding error.
func TestCommandRequestMistypedJSON(t *testing.T) {
	tests := []struct {
		payload string
		code    string
		msg     string
	}{
		{`{"command":7}`, CodePayloadCommandRequired, ""},
		{`{"command":7,"targets":"x","scope":9}`, CodePayloadCommandRequired, ""},
		{`{"targets":5,"command":""}`, CodePayloadCommandRequired, ""},
		{`{"command":"reboot","scope":9}`, CodePayloadScopeInvalid, ""},
		{`{"command":"reboot","scope":true,"targets":5}`, CodePayloadScopeInvalid, ""},
		{`{"command":"reboot","scope":"worker","workerId":5}`, CodePayloadWorkerIDRequired, ""},
		{`{"command":"reboot","workerId":5}`, CodePayloadWorkerIDInvalid, ""},
		{`{"command":"reboot","workerId":5,"targets":5}`, CodePayloadWorkerIDInvalid, ""},
		{`{"command":"reboot","targets":"m1"}`, CodePayloadTargetsInvalid, ""},
		{`{"command":"reboot","targets":{"0":"m1"}}`, CodePayloadTargetsInvalid, ""},
		{`{"command":"reboot","targets":["m1",5]}`, CodePayloadTargetInvalid, "ERR_PAYLOAD_TARGET_INVALID: at index 1"},
		{`{"command":"reboot","targets":[` + strings.Repeat(`1,`, MaxTargets) + `1]}`, CodePayloadTargetsTooMany, ""},
		{`{"command":"reboot","params":[1,2]}`, CodePayloadNotObject, ""},
		{`{"command":"reboot","timeoutMs":"soon"}`, CodePayloadNotObject, ""},
	}
	for _, tt := range tests {
		t.Run(tt.payload[:min(len(tt.payload), 60)], func(t *testing.T) {
			var c CommandRequest
			err := (&Envelope{Payload: json.RawMessage(tt.payload)}).DecodePayload(&c)
			require.Equal(t, tt.code, CodeOf(err), "%v", err)
			if tt.msg != "" {
				require.EqualError(t, err, tt.msg)
			}
		})
	}

	// Well-typed payloads decode as usual; Validate does the value rules.
	var c CommandRequest
	require.NoError(t, (&Envelope{Payload: json.RawMessage(`{"command":"setPowerMode","params":{"mode":"eco"},"scope":"worker","workerId":"w1","targets":["m1"]}`)}).DecodePayload(&c))
	require.Equal(t, CommandRequest{Command: "setPowerMode", Params: map[string]any{"mode": "eco"}, Scope: ScopeWorker, WorkerID: "w1", Targets: []string{"m1"}}, c)
	require.NoError(t, c.Validate())
}

func TestIdentityResponseMistypedJSON(t *testing.T) {
	for payload, code := range map[string]string{
		`{"workerId":1,"devices":[]}`:                                    CodePayloadWorkerIDRequired,
		`{"workerId":1,"devices":5}`:                                     CodePayloadWorkerIDRequired,
		`{"workerId":"w1","devices":{}}`:                                 CodePayloadDevicesRequired,
		`{"workerId":"w1","devices":[{"deviceId":"m1"},{"deviceId":2}]}`: CodePayloadDeviceInvalid,
		`{"workerId":"w1","devices":[{"deviceId":"m1"},"m2"]}`:           CodePayloadDeviceInvalid,
		`{"workerId":"w1","devices":[],"deviceFamily":3}`:                CodePayloadNotObject,
	} {
		var r IdentityResponse
		err := (&Envelope{Payload: json.RawMessage(payload)}).DecodePayload(&r)
		require.Equal(t, code, CodeOf(err), "%s: %v", payload, err)
	}
	var r IdentityResponse
	require.NoError(t, (&Envelope{Payload: json.RawMessage(`{"workerId":"w1","devices":[{"deviceId":"m1","rack":"r1"}],"deviceFamily":"miner"}`)}).DecodePayload(&r))
	require.NoError(t, r.Validate())
	require.Equal(t, IdentityResponse{WorkerID: "w1", Devices: []DeviceInfo{{DeviceID: "m1", Rack: "r1"}}, DeviceFamily: "miner"}, r)
}
