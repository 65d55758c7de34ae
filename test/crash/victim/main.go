// Command victim is a one-Worker simulated miner fleet for the crash test
// (test/crash). It runs one Worker with its own ID (--id), the sim contract
// and miner model, a persistent key (--key) and a durable result journal
// (--state-dir, by default <id>.state next to the key file), so the crash
// test can SIGKILL it alone and restart it: the restarted Worker answers the
// commands that were running FAILED with ERR_WORKER_RESTARTED and never runs
// them again. (ork-worker-sim --name-prefix now also avoids Worker ID
// clashes between two simulators.)
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/orknode/ork/internal/p2p"
	"github.com/orknode/ork/internal/sim"
	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/worker"
)

func main() {
	join := flag.String("join", "", "node data dir (api file)")
	id := flag.String("id", "victim-0001", "worker id")
	keyFile := flag.String("key", "", "worker key file (kept across restarts)")
	stateDir := flag.String("state-dir", "", "result journal directory (default <dir of --key>/<id>.state; none without --key)")
	devices := flag.Int("devices", 2, "miners")
	timeScale := flag.Float64("time-scale", 1, "model durations multiplier")
	execLog := flag.String("exec-log", "", "on clean exit, write {commandId: executions}")
	flag.Parse()
	if *stateDir == "" && *keyFile != "" {
		*stateDir = filepath.Join(filepath.Dir(*keyFile), *id+".state")
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *join, *id, *keyFile, *stateDir, *devices, *timeScale, *execLog); err != nil {
		fmt.Fprintln(os.Stderr, "victim:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, join, id, keyFile, stateDir string, devices int, timeScale float64, execLog string) error {
	j, err := sim.ReadJoin(join)
	if err != nil {
		return err
	}
	key, err := p2p.LoadOrCreateKey(keyFile)
	if err != nil {
		return err
	}
	var mu sync.Mutex
	execs := map[string]int{}
	miners := map[string]*sim.Miner{}
	var devs []worker.Device
	for i := range devices {
		dev := fmt.Sprintf("%s-d%02d", id, i+1)
		m := sim.NewMiner(sim.MinerConfig{DeviceID: dev, Rack: "rack-01", Model: sim.Models[0], Seed: 7, TimeScale: timeScale,
			Pool: sim.Pool{URL: "stratum+tcp://pool.ork-sim.invalid:3333", User: "ork-sim." + dev}})
		miners[dev] = m
		devs = append(devs, worker.Device{DeviceID: dev, Rack: "rack-01", Model: m.Model().Name})
	}
	on := func(fn func(context.Context, *sim.Miner, map[string]any) (map[string]any, error)) worker.CommandHandler {
		return func(ctx context.Context, dev string, p map[string]any) (any, error) {
			m := miners[dev]
			if m == nil {
				return nil, envelope.Errf(envelope.CodeDeviceNotFound, "%s", dev)
			}
			return fn(ctx, m, p)
		}
	}
	w, err := worker.New(ctx, worker.Config{
		WorkerID: id,
		Contract: sim.Contract(timeScale),
		Devices:  devs,
		Commands: map[string]worker.CommandHandler{
			"reboot": on(func(ctx context.Context, m *sim.Miner, _ map[string]any) (map[string]any, error) {
				return m.Reboot(ctx)
			}),
			"setPowerLimit": on(func(ctx context.Context, m *sim.Miner, p map[string]any) (map[string]any, error) {
				watts, _ := p["watts"].(float64)
				return m.SetPowerLimit(ctx, watts)
			}),
		},
		Telemetry: func(_ context.Context, dev string) (map[string]any, error) {
			m := miners[dev]
			if m == nil {
				return nil, envelope.Errf(envelope.CodeDeviceNotFound, "%s", dev)
			}
			return m.Metrics(), nil
		},
		Key:            key,
		StateDir:       stateDir,
		ListenAddrs:    []string{"/ip4/127.0.0.1/tcp/0"},
		LoopbackOnly:   true,
		TrustedKernels: []peer.ID{j.Kernel},
		Topic:          j.Topic,
		Bootstrap:      j.Bootstrap,
		OnExecute: func(commandID, _, _ string) {
			mu.Lock()
			execs[commandID]++
			mu.Unlock()
			fmt.Println("execute", commandID)
		},
	})
	if err != nil {
		return err
	}
	fmt.Println("victim up", id)
	<-ctx.Done()
	err = w.Close()
	if execLog != "" {
		mu.Lock()
		b, _ := json.Marshal(execs)
		mu.Unlock()
		err = os.WriteFile(execLog, b, 0o644)
	}
	return err
}
