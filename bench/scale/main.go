// Command scale is the scale run of ORK node: one node and a thousand
// simulated Workers × 10 devices on one machine, on 127.0.0.1. It reports the
// time until every Worker is READY, the node's RSS and CPU after a steady
// period at the default cadences (telemetry 10 s, health 5 s), and the
// reconnect storm: the node is killed with SIGKILL and restarted with every
// Worker still running, and the time until all are HEALTHY again (each with a
// fresh successful contact) is reported.
//
//	go run ./bench/scale [--workers 1000] [--devices 10] [--steady 2m]
//
// The node and the simulator run as separate processes (the deployment
// shape); the figures are the node's alone, read from /proc.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/orknode/ork/client"
	"github.com/orknode/ork/internal/apifile"
	"github.com/orknode/ork/internal/testutil/proc"
	"github.com/orknode/ork/protocols/envelope"
)

type options struct {
	workers, devices int
	steady           time.Duration
	readyTimeout     time.Duration
	keep             bool
}

// Targets of the issue.
const (
	targetReady    = 30 * time.Second
	targetRSS      = 150 << 20
	targetCPU      = 0.25
	targetRecovery = 30 * time.Second
)

func main() {
	var o options
	flag.IntVar(&o.workers, "workers", 1000, "simulated Workers (each its own libp2p host)")
	flag.IntVar(&o.devices, "devices", 10, "miners per Worker")
	flag.DurationVar(&o.steady, "steady", 2*time.Minute, "steady period at the default cadences before RSS and CPU are read")
	flag.DurationVar(&o.readyTimeout, "ready-timeout", 3*time.Minute, "give up waiting for READY/HEALTHY after this")
	flag.BoolVar(&o.keep, "keep", false, "keep the temporary directory (logs)")
	flag.Parse()
	if o.workers < 1 || o.devices < 1 || o.steady < 10*time.Second || o.readyTimeout <= 0 {
		fmt.Fprintln(os.Stderr, "scale: flag out of range (steady ≥ 10s)")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, o)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "scale:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, o options) error {
	dir, err := os.MkdirTemp("", "ork-scale-")
	if err != nil {
		return err
	}
	if o.keep {
		fmt.Println("logs in", dir)
	} else {
		defer os.RemoveAll(dir)
	}
	bin := filepath.Join(dir, "bin")
	fmt.Println("building…")
	if err := proc.Build(ctx, bin); err != nil {
		return err
	}
	nodeBin, simBin := filepath.Join(bin, "ork-node"), filepath.Join(bin, "ork-worker-sim")
	data := filepath.Join(dir, "node")
	// A fixed port: restarted, the node listens where the Workers' bootstrap
	// address points (they also reach it the other way: the node dials them).
	port, err := proc.FreePort()
	if err != nil {
		return err
	}
	listen := fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", port)
	if err := proc.Run(ctx, nodeBin, "init", "--data", data, "--loopback-only", "--listen", listen); err != nil {
		return err
	}
	nodeLog := filepath.Join(dir, "node.log")
	node, err := proc.StartDaemon(ctx, nodeBin, data, nodeLog, "--log-level", "warn")
	if err != nil {
		return err
	}
	defer func() { node.Stop(syscall.SIGTERM, 10*time.Second) }()

	fmt.Printf("starting %d workers × %d devices…\n", o.workers, o.devices)
	simStart := time.Now()
	sim, err := proc.Start(filepath.Join(dir, "sim.log"), simBin,
		"--workers", fmt.Sprint(o.workers), "--devices", fmt.Sprint(o.devices), "--join", data,
		"--keys", filepath.Join(dir, "keys"), "--racks", "10", "--log-level", "warn")
	if err != nil {
		return err
	}
	defer sim.Stop(syscall.SIGINT, 20*time.Second)

	cli, err := dial(ctx, data)
	if err != nil {
		return err
	}
	defer cli.Close()
	readyIn, err := waitFor(ctx, cli, simStart, o.readyTimeout, func(w envelope.WorkerInfo) bool {
		return w.State == envelope.WorkerReady
	}, o.workers, sim)
	if err != nil {
		return err
	}
	fmt.Printf("all %d READY %.1f s after the fleet started\n", o.workers, readyIn.Seconds())

	// Steady state: CPU over the second half of the period, RSS at its end.
	fmt.Printf("steady state for %s…\n", o.steady)
	if !sleep(ctx, o.steady/2) {
		return ctx.Err()
	}
	cpu0, _ := proc.CPU(node.PID())
	t0 := time.Now()
	var peakRSS int64
	for end := t0.Add(o.steady / 2); time.Now().Before(end); {
		if r, err := proc.RSS(node.PID()); err == nil && r > peakRSS {
			peakRSS = r
		}
		if !sleep(ctx, 5*time.Second) {
			return ctx.Err()
		}
	}
	cpu1, _ := proc.CPU(node.PID())
	cpuShare := (cpu1 - cpu0).Seconds() / time.Since(t0).Seconds()
	rss, _ := proc.RSS(node.PID())
	peakRSS = max(peakRSS, rss)
	steadyStats, _ := cli.Status(ctx)

	// Reconnect storm: SIGKILL the node, restart it on the same data dir.
	fmt.Println("SIGKILL the node, restart it with every Worker running…")
	_ = cli.Close()
	node.Kill()
	restart := time.Now()
	node, err = proc.StartDaemon(ctx, nodeBin, data, nodeLog, "--log-level", "warn")
	if err != nil {
		return err
	}
	if cli, err = dial(ctx, data); err != nil {
		return err
	}
	healthyIn, err := waitFor(ctx, cli, restart, o.readyTimeout, func(w envelope.WorkerInfo) bool {
		return w.State == envelope.WorkerReady && w.HealthState == envelope.HealthHealthy && w.LastSeen >= restart.UnixMilli()
	}, o.workers, sim)
	if err != nil {
		return err
	}
	afterRSS, _ := proc.RSS(node.PID())

	tw := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "\nfigure\tORK node\ttarget\t\n")
	row := func(name, got, target string, ok bool) {
		verdict := "PASS"
		if !ok {
			verdict = "MISS"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", name, got, target, verdict)
	}
	row(fmt.Sprintf("%d Workers × %d devices READY after fleet start", o.workers, o.devices), fmt.Sprintf("%.1f s", readyIn.Seconds()), "≤ 30 s", readyIn <= targetReady)
	row(fmt.Sprintf("node RSS after %s steady (peak of samples)", o.steady), fmt.Sprintf("%.0f MB", float64(peakRSS)/(1<<20)), "≤ 150 MB", peakRSS <= targetRSS)
	row("node CPU, steady state (share of one core)", fmt.Sprintf("%.1f %%", cpuShare*100), "≤ 25 %", cpuShare <= targetCPU)
	row("all HEALTHY again after SIGKILL + restart", fmt.Sprintf("%.1f s", healthyIn.Seconds()), "≤ 30 s", healthyIn <= targetRecovery)
	_ = tw.Flush()
	fmt.Printf("node RSS right after the storm: %.0f MB; devices %d; health %v\n",
		float64(afterRSS)/(1<<20), steadyStats.Devices, steadyStats.Health)
	fmt.Println("original JavaScript kernel on this machine: 167–267 s for 50 Workers READY, 131 MiB for 50")
	return nil
}

func dial(ctx context.Context, data string) (*client.Client, error) {
	a, err := apifile.Read(data)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return client.Dial(ctx, client.Options{KeyFile: filepath.Join(data, "client.key"), Kernel: a.Addrs})
}

// waitFor polls worker.list until want Workers satisfy ok, and returns the
// time since start.
func waitFor(ctx context.Context, cli *client.Client, start time.Time, timeout time.Duration, ok func(envelope.WorkerInfo) bool, want int, sim *proc.Child) (time.Duration, error) {
	deadline := time.Now().Add(timeout)
	last := -1
	for {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		ws, err := cli.ListWorkers(cctx)
		cancel()
		n := 0
		if err == nil {
			for _, w := range ws {
				if ok(w) {
					n++
				}
			}
		}
		if n >= want {
			return time.Since(start), nil
		}
		if n != last && n/100 != last/100 {
			fmt.Printf("  %d/%d at %.1f s\n", n, want, time.Since(start).Seconds())
		}
		last = n
		if sim.Exited() {
			return 0, fmt.Errorf("simulator exited")
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("only %d of %d after %s (last error %v)", n, want, timeout, err)
		}
		if !sleep(ctx, 200*time.Millisecond) {
			return 0, ctx.Err()
		}
	}
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
