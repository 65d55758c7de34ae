package envelope

import (
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// go test ./protocols/envelope -run TestGolden -update rewrites testdata/.
var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// The golden envelopes: the exact wire bodies (one compact JSON object per
// file) that other implementations (js-libp2p, rust-libp2p clients) can test
// against.
func goldenEnvelopes(t *testing.T) map[string]*Envelope {
	raw := func(v any) json.RawMessage {
		b, err := json.Marshal(v)
		require.NoError(t, err)
		return b
	}
	const reqID = "3f0c9a52-6e1b-4d7a-8c2e-5b9f1d4a7e60"
	return map[string]*Envelope{
		"request.json": {
			ID: reqID, Version: ProtocolVersion, Type: TypeRequest, Action: ActionCommandRequest,
			Sender: "gateway", DeviceID: "miner-001", Timestamp: 1700000000000,
			Payload: raw(CommandRequest{Command: "setPowerLimit", Params: map[string]any{"watts": 3000}, IdempotencyKey: "op-42"}),
		},
		"request-v0.1.0.json": {
			ID: "a1b2c3d4-0000-4000-8000-000000000001", Version: "0.1.0", Type: TypeRequest, Action: ActionWorkerList,
			Sender: "gateway", Timestamp: 1700000000001, Payload: json.RawMessage(`{}`),
		},
		"response.json": {
			ID: "7d1e4b90-2c3a-4f5e-9b8d-1a2c3e4f5a6b", Version: ProtocolVersion, Type: TypeResponse, Action: ActionCommandResult,
			Sender: "worker-rack-a", Target: "kernel", DeviceID: "miner-001", Timestamp: 1700000000250,
			Payload: raw(CommandResult{CommandID: "cmd-9", Status: StateSuccess, Result: json.RawMessage(`{"watts":3000}`)}),
			ReplyTo: reqID,
		},
		"error-response.json": {
			ID: "0e9d8c7b-6a5f-4e3d-8c1b-0a9f8e7d6c5b", Version: ProtocolVersion, Type: TypeResponse, Action: ActionCommandResult,
			Sender: "kernel", Target: "gateway", DeviceID: "miner-404", Timestamp: 1700000000300,
			Payload: json.RawMessage(`{}`), ReplyTo: reqID,
			Error: Errf(CodeDeviceNotFound, "%s", "miner-404"),
		},
		"identity-response.json": {
			ID: "5c4b3a29-1807-4f6e-9d5c-4b3a29180706", Version: ProtocolVersion, Type: TypeResponse, Action: ActionIdentityResponse,
			Sender: "worker-rack-a", Target: "kernel", Timestamp: 1700000000400, ReplyTo: "b6a59483-7261-4504-8f3e-2d1c0b9a8f7e",
			Payload: raw(IdentityResponse{WorkerID: "worker-rack-a", DeviceFamily: "miner", Devices: []DeviceInfo{
				{DeviceID: "miner-001", Rack: "rack-a", Model: "M30S"},
				{DeviceID: "miner-002", Rack: "rack-a", Model: "M50"},
			}}),
		},
	}
}

func TestGoldenEnvelopes(t *testing.T) {
	for name, want := range goldenEnvelopes(t) {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join("testdata", name)
			b, err := Marshal(want)
			require.NoError(t, err)
			b = append(b, '\n')
			if *update {
				require.NoError(t, os.WriteFile(path, b, 0o644))
			}
			file, err := os.ReadFile(path)
			require.NoError(t, err, "run with -update to create it")
			require.Equal(t, string(file), string(b), "encoding changed; run with -update if intended")

			got, err := Decode(file)
			require.NoError(t, err)
			require.Equal(t, want, got)

			// encoding/json reads the same envelope from the wire bytes.
			var std Envelope
			require.NoError(t, json.Unmarshal(file, &std))
			require.Equal(t, want, &std)
		})
	}
}

func TestGoldenPayloads(t *testing.T) {
	read := func(name string) *Envelope {
		b, err := os.ReadFile(filepath.Join("testdata", name))
		require.NoError(t, err)
		e, err := Decode(b)
		require.NoError(t, err)
		return e
	}
	var cmd CommandRequest
	require.NoError(t, read("request.json").DecodePayload(&cmd))
	require.NoError(t, cmd.Validate())
	require.Equal(t, "setPowerLimit", cmd.Command)

	var id IdentityResponse
	require.NoError(t, read("identity-response.json").DecodePayload(&id))
	require.NoError(t, id.Validate())
	require.Len(t, id.Devices, 2)

	var res CommandResult
	require.NoError(t, read("response.json").DecodePayload(&res))
	require.Equal(t, StateSuccess, res.Status)

	e := read("error-response.json")
	require.Equal(t, "ERR_DEVICE_NOT_FOUND: miner-404", e.Error.Error())
	require.ErrorIs(t, e.Error, &Error{Code: CodeDeviceNotFound})
}

func TestGoldenContract(t *testing.T) {
	path := filepath.Join("testdata", "contract.json")
	want := minerContract()
	b, err := json.MarshalIndent(want, "", "  ")
	require.NoError(t, err)
	b = append(b, '\n')
	if *update {
		require.NoError(t, os.WriteFile(path, b, 0o644))
	}
	file, err := os.ReadFile(path)
	require.NoError(t, err, "run with -update to create it")
	require.Equal(t, string(file), string(b), "encoding changed; run with -update if intended")

	var got Contract
	require.NoError(t, json.Unmarshal(file, &got))
	require.NoError(t, got.Validate())
	require.Equal(t, want, &got)
}
