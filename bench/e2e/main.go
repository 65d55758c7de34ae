// Command e2e is the end-to-end benchmark of ORK node: a real kernel (the
// ork-node daemon, in a child process, with its LevelDB store on disk), a
// simulated fleet (internal/sim: the same Workers and miners as
// ork-worker-sim) and a client (package client) in this process, all on
// 127.0.0.1. It prints one table: command latency, command throughput at
// three concurrencies, the node's CPU per command, telemetry pulls/s cached
// and live, and the floors (a two-hop pooled libp2p exchange, one WAL sync)
// measured in the same run, each next to its target and the original
// JavaScript kernel's figure.
//
//	go run ./bench/e2e [--commands 2000] [--duration 5s] [--cpuprofile FILE]
//	                   [--node-bin PATH] [--node-cpuprofile FILE]
//
// The node's CPU comes from /proc/<pid>/stat of the child (utime+stime), so
// it holds the kernel alone; this process's CPU (getrusage) holds the client
// and the Workers. --node-cpuprofile is for diagnosis: the kernel then runs in
// this process (node.New on the same prepared data directory) under pprof,
// and the CPU split is not available.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"

	"github.com/orknode/ork/client"
	"github.com/orknode/ork/internal/apifile"
	"github.com/orknode/ork/internal/p2p"
	"github.com/orknode/ork/internal/sim"
	"github.com/orknode/ork/internal/testutil/proc"
	"github.com/orknode/ork/node"
	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/protocols/rpc"
	"github.com/orknode/ork/store"
)

// Reference figures of the original JavaScript kernel (same load shape).
const (
	jsP50Ms      = 4.0
	jsCmdsC1     = 202
	jsCmdsC16    = 310
	jsCmdsC64    = 319
	jsCPUPerCmd  = "3–4 ms"
	jsLiveTelC16 = 4925
)

// Targets.
const (
	targetCmdsC64    = 3300
	targetNodeCPUMs  = 0.3
	targetCachedTelC = 30000
	targetLiveTelC   = 10000
)

type options struct {
	commands     int
	warmup       int
	duration     time.Duration
	maxOps       int64
	workers      int
	devices      int
	timeScale    float64
	cpuProfile   string
	nodeBin      string
	nodeProfile  string
	floorSamples int
}

func main() {
	var o options
	flag.IntVar(&o.commands, "commands", 2000, "commands timed for the concurrency-1 latency (after the warm-up)")
	flag.IntVar(&o.warmup, "warmup", 200, "commands sent before any measurement")
	flag.DurationVar(&o.duration, "duration", 5*time.Second, "length of each throughput phase")
	flag.Int64Var(&o.maxOps, "max-ops", 500_000, "bound on the operations of one throughput phase")
	flag.IntVar(&o.workers, "workers", 10, "simulated Workers (each its own libp2p host)")
	flag.IntVar(&o.devices, "devices", 10, "simulated miners per Worker")
	flag.Float64Var(&o.timeScale, "time-scale", 1e-5, "sim model time scale: setPowerLimit's 500 ms physical delay × this (1e-5: 5 µs), so the kernel path is what is measured")
	flag.StringVar(&o.cpuProfile, "cpuprofile", "", "write this process's CPU profile (client + Workers) over the measured phases to FILE")
	flag.StringVar(&o.nodeBin, "node-bin", "", "ork-node binary (default: go build ./cmd/ork-node into a temp dir)")
	flag.StringVar(&o.nodeProfile, "node-cpuprofile", "", "diagnosis: run the kernel in this process and write the CPU profile of the measured phases to FILE")
	flag.IntVar(&o.floorSamples, "floor-samples", 2000, "samples of each floor (two-hop exchange, WAL sync)")
	flag.Parse()
	if o.cpuProfile != "" && o.nodeProfile != "" {
		fmt.Fprintln(os.Stderr, "e2e: --cpuprofile and --node-cpuprofile are exclusive (the latter profiles the whole process)")
		os.Exit(2)
	}
	if o.commands < 1 || o.warmup < 0 || o.duration <= 0 || o.maxOps < 1 || o.workers < 1 || o.devices < 1 || !(o.timeScale > 0) || o.floorSamples < 1 {
		fmt.Fprintln(os.Stderr, "e2e: flag out of range")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, o)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.Exit(1)
	}
}

// results are the figures of one run.
type results struct {
	twoHopFloor, walSync time.Duration // medians
	p50, p99             time.Duration
	cmds                 [3]phase // concurrency 1, 16, 64
	telCached, telLive   phase
	inProcess            bool
}

// phase is one bounded load run.
type phase struct {
	conc        int
	ok, failed  int64
	firstErr    error
	elapsed     time.Duration
	nodeCPU     time.Duration // the child's utime+stime over the phase
	selfCPU     time.Duration // this process's user+sys over the phase
	nodeCPUKnow bool
}

func (p phase) rate() float64 { return float64(p.ok) / p.elapsed.Seconds() }

func (p phase) perOp(cpu time.Duration) float64 {
	if p.ok == 0 {
		return 0
	}
	return float64(cpu) / float64(time.Millisecond) / float64(p.ok)
}

func run(ctx context.Context, o options) (err error) {
	tmp, err := os.MkdirTemp("", "ork-e2e-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	var res results

	// Floors first, on a quiet machine (no kernel or fleet running yet).
	fmt.Fprintln(os.Stderr, "floors: WAL sync, two-hop pooled exchange ...")
	if res.walSync, err = walSyncFloor(ctx, filepath.Join(tmp, "wal"), o.floorSamples); err != nil {
		return fmt.Errorf("WAL floor: %w", err)
	}
	if res.twoHopFloor, err = twoHopFloor(ctx, o.floorSamples); err != nil {
		return fmt.Errorf("two-hop floor: %w", err)
	}

	// The kernel: a data directory made by `ork-node init`, then the daemon
	// as a child process (or node.New in this process for --node-cpuprofile).
	bin := o.nodeBin
	if bin == "" {
		bin = filepath.Join(tmp, "ork-node")
		fmt.Fprintln(os.Stderr, "building ork-node ...")
		if err := proc.Run(ctx, "go", "build", "-o", bin, "./cmd/ork-node"); err != nil {
			return err
		}
	}
	dataDir := filepath.Join(tmp, "node")
	if err := proc.Run(ctx, bin, "init", "--data", dataDir, "--loopback-only", "--listen", "/ip4/127.0.0.1/tcp/0"); err != nil {
		return err
	}
	var nodePID int
	if o.nodeProfile != "" {
		res.inProcess = true
		closeNode, err := startInProcess(ctx, dataDir)
		if err != nil {
			return err
		}
		defer closeNode()
	} else {
		child, err := proc.StartDaemon(ctx, bin, dataDir, filepath.Join(tmp, "node.log"), "--log-level", "warn", "--loopback-only")
		if err != nil {
			return err
		}
		defer child.Stop(syscall.SIGTERM, 10*time.Second)
		nodePID = child.PID()
	}

	// The fleet joins through the api file (bootstrap = the kernel's DHT).
	join, err := sim.ReadJoin(dataDir)
	if err != nil {
		return err
	}
	quiet := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	fleet, err := sim.StartFleet(ctx, sim.FleetConfig{
		Workers: o.workers, Devices: o.devices, Seed: 1, TimeScale: o.timeScale,
		LoopbackOnly: true, TrustedKernels: []peer.ID{join.Kernel}, Bootstrap: join.Bootstrap, Topic: join.Topic,
		Logger: quiet,
	})
	if err != nil {
		return err
	}
	defer fleet.Close()
	api, err := apifile.Read(dataDir)
	if err != nil {
		return err
	}
	cli, err := client.Dial(ctx, client.Options{KeyFile: filepath.Join(dataDir, "client.key"), Kernel: api.Addrs, Sender: "e2e"})
	if err != nil {
		return err
	}
	defer cli.Close()
	if err := waitReady(ctx, cli, o.workers, 60*time.Second); err != nil {
		return err
	}
	var devices []string
	for i := range o.workers {
		for j := range o.devices {
			devices = append(devices, sim.DeviceID(sim.WorkerID(i), j))
		}
	}

	// Profiles cover the measured phases only.
	if prof := o.cpuProfile + o.nodeProfile; prof != "" {
		f, err := os.Create(prof)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}

	send := func(ctx context.Context, i int64) error { return command(ctx, cli, devices[int(i)%len(devices)], i) }

	// 1. Latency at concurrency 1, after a warm-up over every device.
	fmt.Fprintf(os.Stderr, "warm-up: %d commands; latency: %d commands at concurrency 1 ...\n", o.warmup, o.commands)
	for i := range int64(o.warmup) {
		if err := send(ctx, i); err != nil {
			return fmt.Errorf("warm-up: %w", err)
		}
	}
	lat := make([]time.Duration, 0, o.commands)
	latDeadline := time.Now().Add(max(2*time.Minute, 20*o.duration))
	for i := range int64(o.commands) {
		if time.Now().After(latDeadline) {
			break
		}
		t0 := time.Now()
		if err := send(ctx, i); err != nil {
			return fmt.Errorf("latency: %w", err)
		}
		lat = append(lat, time.Since(t0))
	}
	slices.Sort(lat)
	res.p50, res.p99 = pct(lat, 50), pct(lat, 99)

	// 2 and 3. Throughput at 1, 16, 64, with the node's CPU per phase.
	for k, conc := range []int{1, 16, 64} {
		fmt.Fprintf(os.Stderr, "commands at concurrency %d for %v ...\n", conc, o.duration)
		res.cmds[k] = measure(ctx, nodePID, conc, o.duration, o.maxOps, send)
	}

	// 4. Telemetry at 16: warm every device's snapshot, then cached (default
	// max age) and live (maxAgeMs 0: a pull to the Worker each time).
	zero := int64(0)
	for _, d := range devices {
		if _, err := cli.PullTelemetry(ctx, envelope.TelemetryPull{DeviceID: d, MaxAgeMs: &zero}); err != nil {
			return fmt.Errorf("telemetry warm-up %s: %w", d, err)
		}
	}
	pull := func(maxAge *int64) func(context.Context, int64) error {
		return func(ctx context.Context, i int64) error {
			_, err := cli.PullTelemetry(ctx, envelope.TelemetryPull{DeviceID: devices[int(i)%len(devices)], MaxAgeMs: maxAge})
			return err
		}
	}
	fmt.Fprintf(os.Stderr, "telemetry at concurrency 16, cached then live, %v each ...\n", o.duration)
	res.telCached = measure(ctx, nodePID, 16, o.duration, o.maxOps, pull(nil))
	res.telLive = measure(ctx, nodePID, 16, o.duration, o.maxOps, pull(&zero))

	if s := fleet.Summary(); s.MaxExecutions > 1 {
		fmt.Fprintln(os.Stderr, "WARNING:", s)
	}
	printTable(os.Stdout, o, res, len(lat))
	return nil
}

// command sends setPowerLimit to dev and waits for SUCCESS.
func command(ctx context.Context, cli *client.Client, dev string, i int64) error {
	// One exchange: command.request with waitMs answers once the command has
	// ended (the caller learns SUCCESS in the same round trip).
	acc, err := cli.SendAndWait(ctx, dev, envelope.CommandRequest{
		Command: "setPowerLimit",
		Params:  map[string]any{"watts": float64(sim.MinPowerLimitW + i%(sim.MaxPowerLimitW-sim.MinPowerLimitW))},
	}, 20*time.Second)
	if err != nil {
		return err
	}
	if acc.Status != envelope.StateSuccess {
		return fmt.Errorf("command %s ended %s: %s", acc.CommandID, acc.Status, acc.Error)
	}
	return nil
}

// measure runs op from conc goroutines until dur has passed or maxOps were
// started, and reads the CPU of the node (pid, when > 0) and of this process
// around it.
func measure(ctx context.Context, pid, conc int, dur time.Duration, maxOps int64, op func(context.Context, int64) error) phase {
	p := phase{conc: conc}
	var ok, failed, next atomic.Int64
	var errOnce sync.Once
	node0, nerr0 := cpuOf(pid)
	self0 := selfCPU()
	start := time.Now()
	deadline := start.Add(dur)
	var wg sync.WaitGroup
	for range conc {
		wg.Go(func() {
			for ctx.Err() == nil && time.Now().Before(deadline) {
				i := next.Add(1)
				if i > maxOps {
					return
				}
				if err := op(ctx, i); err != nil {
					failed.Add(1)
					errOnce.Do(func() { p.firstErr = err })
					continue
				}
				ok.Add(1)
			}
		})
	}
	wg.Wait()
	p.elapsed = time.Since(start)
	p.selfCPU = selfCPU() - self0
	if node1, nerr1 := cpuOf(pid); nerr0 == nil && nerr1 == nil && pid > 0 {
		p.nodeCPU, p.nodeCPUKnow = node1-node0, true
	}
	p.ok, p.failed = ok.Load(), failed.Load()
	return p
}

// cpuOf is a process's CPU time (none for pid 0: the kernel runs in this
// process in diagnosis mode).
func cpuOf(pid int) (time.Duration, error) {
	if pid <= 0 {
		return 0, errors.New("no pid")
	}
	return proc.CPU(pid)
}

// selfCPU is this process's user+sys CPU.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func pct(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, len(sorted)*p/100)]
}

func median(d []time.Duration) time.Duration {
	slices.Sort(d)
	return pct(d, 50)
}

// walSyncFloor is the median of sequential synced WAL appends of ~300 B on a
// fresh store (one writer: every append is its own fsync).
func walSyncFloor(ctx context.Context, dir string, n int) (time.Duration, error) {
	s, err := store.Open(dir)
	if err != nil {
		return 0, err
	}
	defer s.Close()
	value := bytes.Repeat([]byte("x"), 300)
	d := make([]time.Duration, 0, n)
	for i := range n + 20 {
		t0 := time.Now()
		if err := s.WAL().Append(ctx, fmt.Sprintf("floor-%09d", i), value); err != nil {
			return 0, err
		}
		if i >= 20 { // warm-up
			d = append(d, time.Since(t0))
		}
	}
	return median(d), nil
}

const floorProto protocol.ID = "/ork/bench/floor/1.0.0"

// twoHopFloor is the median of client → relay → worker health.ping
// exchanges, each hop a pooled rpc.Client call over loopback TCP, the
// handlers trivial.
func twoHopFloor(ctx context.Context, n int) (time.Duration, error) {
	var hosts []interface{ Close() error }
	defer func() {
		for _, h := range slices.Backward(hosts) {
			_ = h.Close()
		}
	}()
	newHost := func(listen bool) (host.Host, error) {
		k, _, err := crypto.GenerateEd25519Key(nil)
		if err != nil {
			return nil, err
		}
		cfg := p2p.HostConfig{Key: k, LoopbackOnly: true, ListenAddrs: []string{"/ip4/127.0.0.1/tcp/0"}, NoListen: !listen}
		h, err := p2p.NewHost(cfg)
		if err != nil {
			return nil, err
		}
		hosts = append(hosts, h)
		return h, nil
	}
	wh, err := newHost(true)
	if err != nil {
		return 0, err
	}
	rh, err := newHost(true)
	if err != nil {
		return 0, err
	}
	ch, err := newHost(false)
	if err != nil {
		return 0, err
	}
	worker := rpc.NewServer(rpc.ServerOptions{Sender: "worker"}, map[string]rpc.Handler{
		envelope.ActionHealthPing: func(context.Context, peer.ID, *envelope.Envelope) (any, error) {
			return envelope.HealthPong{Status: "OK", UptimeMs: 1}, nil
		},
	})
	wh.SetStreamHandler(floorProto, worker.HandleStream)
	relayCli := rpc.NewClient(rh, rpc.ClientOptions{Sender: "relay"})
	hosts = append(hosts, relayCli)
	relay := rpc.NewServer(rpc.ServerOptions{Sender: "relay"}, map[string]rpc.Handler{
		envelope.ActionHealthPing: func(ctx context.Context, _ peer.ID, _ *envelope.Envelope) (any, error) {
			var pong envelope.HealthPong
			err := relayCli.Request(ctx, wh.ID(), floorProto, envelope.ActionHealthPing, "", nil, &pong)
			return pong, err
		},
	})
	rh.SetStreamHandler(floorProto, relay.HandleStream)
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := rh.Connect(cctx, peer.AddrInfo{ID: wh.ID(), Addrs: wh.Addrs()}); err != nil {
		return 0, err
	}
	if err := ch.Connect(cctx, peer.AddrInfo{ID: rh.ID(), Addrs: rh.Addrs()}); err != nil {
		return 0, err
	}
	c := rpc.NewClient(ch, rpc.ClientOptions{Sender: "client"})
	hosts = append(hosts, c)
	d := make([]time.Duration, 0, n)
	for i := range n + 50 {
		t0 := time.Now()
		var pong envelope.HealthPong
		if err := c.Request(cctx, rh.ID(), floorProto, envelope.ActionHealthPing, "", nil, &pong); err != nil {
			return 0, err
		}
		if i >= 50 { // warm-up: streams opened and pooled
			d = append(d, time.Since(t0))
		}
	}
	return median(d), nil
}

// startInProcess runs the kernel of dataDir in this process (diagnosis
// only) and writes its api file as the daemon would.
func startInProcess(ctx context.Context, dataDir string) (func(), error) {
	cfg, err := node.LoadConfig(dataDir)
	if err != nil {
		return nil, err
	}
	cfg.LoopbackOnly = true
	// The daemon logs at warn (--log-level warn); so does the kernel here.
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	n, err := node.New(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if err := apifile.Write(dataDir, apifile.API{PeerID: n.ID().String(), Addrs: n.Addrs(), Topic: cfg.Topic, PID: os.Getpid()}); err != nil {
		_ = n.Close()
		return nil, err
	}
	return func() { _ = n.Close() }, nil
}

// waitReady waits until want Workers are READY.
func waitReady(ctx context.Context, cli *client.Client, want int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		ws, err := cli.ListWorkers(ctx)
		ready := 0
		for _, w := range ws {
			if w.State == envelope.WorkerReady {
				ready++
			}
		}
		if err == nil && ready >= want {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of %d Workers READY after %v (last error: %v)", ready, want, timeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// printTable prints every figure next to its target and the JS kernel's.
func printTable(out io.Writer, o options, r results, latN int) {
	ms := func(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond)) }
	us := func(d time.Duration) string { return fmt.Sprintf("%.0f µs", float64(d)/float64(time.Microsecond)) }
	rate := func(p phase) string {
		s := fmt.Sprintf("%.0f /s", p.rate())
		if p.failed > 0 {
			s += fmt.Sprintf(" (%d failed: %v)", p.failed, p.firstErr)
		}
		return s
	}
	verdict := func(ok bool) string {
		if ok {
			return "PASS"
		}
		return "MISS"
	}
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	defer w.Flush()
	fmt.Fprintf(w, "\nORK node end to end: kernel %s, %d Workers × %d sim miners, setPowerLimit (model time ×%g), %v per phase\n",
		map[bool]string{true: "IN-PROCESS (diagnosis)", false: "ork-node daemon (child process)"}[r.inProcess], o.workers, o.devices, o.timeScale, o.duration)
	fmt.Fprintln(w, "figure\tORK (this run)\ttarget\t\tJS kernel")
	fmt.Fprintln(w, "------\t--------------\t------\t\t---------")
	floor := r.twoHopFloor + r.walSync
	fmt.Fprintf(w, "floor: two-hop pooled libp2p exchange (median)\t%s\t\t\t\n", us(r.twoHopFloor))
	fmt.Fprintf(w, "floor: one WAL sync, 300 B append (median)\t%s\t\t\t\n", us(r.walSync))
	fmt.Fprintf(w, "command latency p50, concurrency 1 (n=%d)\t%s\t≤ %s (2 × floors)\t%s\t%.1f ms\n", latN, ms(r.p50), ms(2*floor), verdict(r.p50 <= 2*floor), jsP50Ms)
	fmt.Fprintf(w, "command latency p99, concurrency 1\t%s\t\t\t\n", ms(r.p99))
	js := []int{jsCmdsC1, jsCmdsC16, jsCmdsC64}
	for k, p := range r.cmds {
		target, v := "", ""
		if p.conc == 64 {
			target, v = fmt.Sprintf("≥ %d /s", targetCmdsC64), verdict(p.failed == 0 && p.rate() >= targetCmdsC64)
		}
		fmt.Fprintf(w, "commands/s, concurrency %d\t%s\t%s\t%s\t%d /s\n", p.conc, rate(p), target, v, js[k])
	}
	c64 := r.cmds[2]
	if c64.nodeCPUKnow {
		per := c64.perOp(c64.nodeCPU)
		fmt.Fprintf(w, "node CPU per command, concurrency 64\t%.3f ms\t≤ %.1f ms\t%s\t%s\n", per, targetNodeCPUMs, verdict(per <= targetNodeCPUMs), jsCPUPerCmd)
		fmt.Fprintf(w, "  client + Workers CPU per command (this process)\t%.3f ms\t\t\t\n", c64.perOp(c64.selfCPU))
		for _, p := range r.cmds[:2] {
			fmt.Fprintf(w, "  node CPU per command, concurrency %d\t%.3f ms\t\t\t\n", p.conc, p.perOp(p.nodeCPU))
		}
	} else {
		fmt.Fprintf(w, "node CPU per command, concurrency 64\tn/a (kernel in process)\t≤ %.1f ms\t\t%s\n", targetNodeCPUMs, jsCPUPerCmd)
		fmt.Fprintf(w, "  whole-process CPU per command\t%.3f ms\t\t\t\n", c64.perOp(c64.selfCPU))
	}
	fmt.Fprintf(w, "telemetry pulls/s cached, concurrency 16\t%s\t≥ %d /s\t%s\t\n", rate(r.telCached), targetCachedTelC, verdict(r.telCached.failed == 0 && r.telCached.rate() >= targetCachedTelC))
	fmt.Fprintf(w, "telemetry pulls/s live, concurrency 16\t%s\t≥ %d /s\t%s\t%d /s\n", rate(r.telLive), targetLiveTelC, verdict(r.telLive.failed == 0 && r.telLive.rate() >= targetLiveTelC), jsLiveTelC16)
	if r.telCached.nodeCPUKnow {
		fmt.Fprintf(w, "  node CPU per pull, cached / live\t%.3f / %.3f ms\t\t\t\n", r.telCached.perOp(r.telCached.nodeCPU), r.telLive.perOp(r.telLive.nodeCPU))
	}
}
