// Command example is a complete ORK Worker: a power meter with two devices,
// one command and telemetry, advertised on the kernel's DHT topic.
//
//	go run ./worker/example --kernel /ip4/127.0.0.1/tcp/4001/p2p/12D3Koo... --topic <64 hex>
package main

import (
	"context"
	"encoding/hex"
	"flag"
	"log"
	"math/rand/v2"
	"os/signal"
	"syscall"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/worker"
)

func main() {
	kernel := flag.String("kernel", "", "kernel multiaddr with /p2p/<peer ID>")
	topic := flag.String("topic", "", "discovery topic, 64 hex characters")
	flag.Parse()
	k, err := peer.AddrInfoFromString(*kernel)
	if err != nil {
		log.Fatalf("--kernel: %v", err)
	}
	t, err := hex.DecodeString(*topic)
	if err != nil {
		log.Fatalf("--topic: %v", err)
	}
	maxA := 63.0
	contract := &envelope.Contract{
		Metadata: envelope.Metadata{Provider: "example", DeviceFamily: "powermeter", Brand: "Acme",
			ModelsSupported: []string{"PM-3"}, Overview: "Three-phase power meter with a resettable energy counter."},
		Capabilities: envelope.Capabilities{
			Telemetry: []envelope.TelemetryChannel{
				{Name: "power", Unit: "W", Type: "number", Description: "active power"},
				{Name: "current", Unit: "A", Type: "number", Description: "phase current; 0 means no load"},
			},
			Commands: []envelope.CommandSpec{{Name: "setAlarm", Description: "alarm above this current",
				Params: []envelope.ParamSpec{{Name: "amps", Type: "number", Required: true, Max: &maxA}}}},
			Health: envelope.HealthSpec{SupportedStates: []string{"ok", "fault"}},
			Errors: map[string]string{},
		},
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	w, err := worker.New(ctx, worker.Config{
		WorkerID: "pm-01", Contract: contract, KeyFile: "pm-01.key",
		// The result journal: after a crash, a command that was running is
		// answered FAILED (ERR_WORKER_RESTARTED), never run a second time.
		StateDir:       "pm-01.state",
		Devices:        []worker.Device{{DeviceID: "pm-01-a", Rack: "rack-01"}, {DeviceID: "pm-01-b", Rack: "rack-02"}},
		TrustedKernels: []peer.ID{k.ID}, Bootstrap: []peer.AddrInfo{*k}, Topic: t,
		// Handlers given here answer from the first request on; HandleCommand
		// and HandleTelemetry add or replace them later.
		Commands: map[string]worker.CommandHandler{
			"setAlarm": func(_ context.Context, dev string, p map[string]any) (any, error) {
				log.Printf("%s: alarm at %v A", dev, p["amps"]) // params already checked against the contract
				return map[string]any{"amps": p["amps"]}, nil
			},
		},
		Telemetry: func(context.Context, string) (map[string]any, error) {
			a := 10 + rand.Float64()*5
			return map[string]any{"current": a, "power": a * 230 * 3}, nil
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer w.Close()
	log.Printf("power meter %s up: %v", w.ID(), w.Addrs())
	<-ctx.Done()
}
