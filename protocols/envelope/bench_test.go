package envelope

import (
	"encoding/json"
	"testing"
)

// benchRequest is a typical kernel → Worker command.request, about 300 bytes
// on the wire.
func benchRequest(b *testing.B) *Envelope {
	payload, err := json.Marshal(CommandRequest{
		CommandID: "c0a8e1f2-3b4c-4d5e-8f60-718293a4b5c6", Command: "setPowerLimit",
		Params: map[string]any{"watts": 3000, "persist": true}, Scope: ScopeDevice,
	})
	if err != nil {
		b.Fatal(err)
	}
	return &Envelope{
		ID: "3f0c9a52-6e1b-4d7a-8c2e-5b9f1d4a7e60", Version: ProtocolVersion, Type: TypeRequest,
		Action: ActionCommandRequest, Sender: "kernel:kernel:default", DeviceID: "miner-0001",
		Timestamp: 1700000000000, Payload: payload,
	}
}

func BenchmarkEnvelopeEncode(b *testing.B) {
	e := benchRequest(b)
	wire, _ := Marshal(e)
	b.SetBytes(int64(len(wire)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Marshal(e); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkEnvelopeDecode(b *testing.B) {
	wire, err := Marshal(benchRequest(b))
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(wire)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Decode(wire); err != nil {
			b.Fatal(err)
		}
	}
}

// The encoding/json figures for the same envelope, for comparison with the
// direct encoder and decoder above.
func BenchmarkEnvelopeEncodeStdlib(b *testing.B) {
	e := benchRequest(b)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := json.Marshal(e); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkEnvelopeDecodeStdlib(b *testing.B) {
	wire, _ := Marshal(benchRequest(b))
	b.ReportAllocs()
	for b.Loop() {
		var e Envelope
		if err := json.Unmarshal(wire, &e); err != nil {
			b.Fatal(err)
		}
		if err := e.Validate(); err != nil {
			b.Fatal(err)
		}
	}
}
