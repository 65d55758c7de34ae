// Package testutil holds what in-process tests of a kernel and its Workers
// (node, internal/cli) share: a test contract and the config of a test
// Worker.
package testutil

import (
	"context"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/worker"
)

// Contract is a minimal valid contract for test Workers: a miner with a
// hashrate channel and one command, setPowerLimit (watts ≤ 5000).
func Contract() *envelope.Contract {
	max := 5000.0
	return &envelope.Contract{
		Metadata: envelope.Metadata{Provider: "test", DeviceFamily: "miner", Brand: "test", ModelsSupported: []string{"t1"}, Overview: "a test miner"},
		Capabilities: envelope.Capabilities{
			Telemetry: []envelope.TelemetryChannel{{Name: "hashrate", Type: "number", Unit: "TH/s", Description: "hashrate"}},
			Commands:  []envelope.CommandSpec{{Name: "setPowerLimit", Params: []envelope.ParamSpec{{Name: "watts", Type: "number", Required: true, Max: &max}}}},
			Health:    envelope.HealthSpec{SupportedStates: []string{"ok"}},
			Errors:    map[string]string{},
		},
	}
}

// WorkerConfig is the config of a loopback-only test Worker id that trusts
// kernel and finds it through topic and bootstrap: Contract, two devices
// (id-d1 and id-d2, rack r1), and a setPowerLimit handler answering
// {"ok": true}. Its key is left to worker.New (a new one) unless set.
func WorkerConfig(id string, kernel peer.ID, topic []byte, bootstrap []peer.AddrInfo) worker.Config {
	return worker.Config{
		WorkerID:       id,
		Contract:       Contract(),
		Devices:        []worker.Device{{DeviceID: id + "-d1", Rack: "r1"}, {DeviceID: id + "-d2", Rack: "r1"}},
		ListenAddrs:    []string{"/ip4/127.0.0.1/tcp/0"},
		LoopbackOnly:   true,
		TrustedKernels: []peer.ID{kernel},
		Topic:          topic,
		Bootstrap:      bootstrap,
		Commands: map[string]worker.CommandHandler{
			"setPowerLimit": func(context.Context, string, map[string]any) (any, error) { return map[string]any{"ok": true}, nil },
		},
	}
}
