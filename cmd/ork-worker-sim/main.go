// Command ork-worker-sim runs a simulated fleet: N Workers × M miners in one
// process, each Worker its own libp2p host with a persistent key, with
// optional fault injection. See `ork-worker-sim -h`.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"github.com/libp2p/go-libp2p/core/pnet"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/orknode/ork/internal/p2p"
	"github.com/orknode/ork/internal/sim"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// options are the parsed flags.
type options struct {
	fleet    sim.FleetConfig
	execLog  string
	logLevel slog.Level
	warnings []string
}

// listFlag collects repeatable, comma-separated values.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var pskFile string
	fs := flag.NewFlagSet("ork-worker-sim", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		o                       options
		bootstrap, trust        listFlag
		join, topic, keys       string
		listen, latency, level  string
		workers, devices, racks int
		parallel                int
		seed                    uint64
		errorRate, hangRate     float64
		timeScale               float64
		crashEvery, cmdTimeout  time.Duration
		flap                    bool
		addrDir, stateDir       string
		namePrefix              string
	)
	fs.IntVar(&workers, "workers", 10, "number of Workers (each its own libp2p host)")
	fs.IntVar(&devices, "devices", 5, "miners per Worker")
	fs.StringVar(&join, "join", "", "a node's data directory: its api file gives bootstrap address, topic and the kernel to trust")
	fs.Var(&bootstrap, "bootstrap", "bootstrap multiaddr with /p2p/<peer ID> (repeatable, comma-separated)")
	fs.StringVar(&topic, "topic", "", "discovery topic, 64 hex characters (DHT advertising; needs --bootstrap)")
	fs.Var(&trust, "trust", "kernel peer ID the Workers answer (repeatable, comma-separated)")
	fs.StringVar(&keys, "keys", "", "keep each Worker's key as DIR/<workerId>.key (default <join>/sim-keys with --join, else ephemeral)")
	fs.StringVar(&stateDir, "state-dir", "", "keep each Worker's commandId → result journal in `DIR`/<workerId>/, so a killed and restarted\n"+
		"simulator answers a command that was running when it died FAILED (ERR_WORKER_RESTARTED) instead of running it again\n"+
		"(default: results in memory, lost when the process exits)")
	fs.StringVar(&namePrefix, "name-prefix", sim.DefaultNamePrefix, "Worker IDs are `PREFIX`-0001, PREFIX-0002, ... (devices PREFIX-0001-d01, ...); give two\n"+
		"simulators joining the same node different prefixes (letters, digits, '.', '_', '-')")
	fs.StringVar(&listen, "listen", "127.0.0.1", "IP address the Workers listen on (TCP and QUIC, ephemeral ports)")
	fs.IntVar(&racks, "racks", 1, "rack labels rack-01..rack-K, Workers spread over them")
	fs.Uint64Var(&seed, "seed", 1, "seed of every random value (models, noise, faults)")
	fs.StringVar(&latency, "latency", "", "added to every answer: 5ms, or a range 2ms-20ms")
	fs.Float64Var(&errorRate, "error-rate", 0, "probability that a command fails (0..1)")
	fs.Float64Var(&hangRate, "hang-rate", 0, "probability that a command never answers until its deadline (0..1)")
	fs.DurationVar(&crashEvery, "crash-every", 0, "each Worker crashes and restarts with the same key about this often (0: never)")
	fs.BoolVar(&flap, "flap", false, "Workers leave and come back (same key) on a random cadence")
	fs.Float64Var(&timeScale, "time-scale", 1, "multiplies the model's durations (reboot, commands, thermal inertia, flap cadence); 0.01 = 100× faster")
	fs.StringVar(&addrDir, "addr-dir", "", "local-directory advertising: write DIR/<workerId>.addr")
	fs.StringVar(&pskFile, "psk", "", "the site's private-network key `FILE` (libp2p swarm.key), when the node uses one")
	fs.StringVar(&o.execLog, "exec-log", "", "on exit, write {commandId: executions} as JSON to FILE")
	fs.IntVar(&parallel, "parallel", sim.DefaultStartParallelism, "Workers started at once")
	fs.DurationVar(&cmdTimeout, "command-timeout", 0, "bound on one command run (0: the SDK's 60 s); hung commands end here")
	fs.StringVar(&level, "log-level", "info", "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if err := o.logLevel.UnmarshalText([]byte(level)); err != nil {
		return o, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	switch {
	case workers < 1 || workers > 100_000:
		return o, fmt.Errorf("--workers %d: want 1..100000", workers)
	case devices < 1 || devices > 10_000:
		return o, fmt.Errorf("--devices %d: want 1..10000", devices)
	case racks < 1:
		return o, fmt.Errorf("--racks %d: want ≥ 1", racks)
	case parallel < 1:
		return o, fmt.Errorf("--parallel %d: want ≥ 1", parallel)
	case !(timeScale > 0) || timeScale > 1000:
		return o, fmt.Errorf("--time-scale %v: want > 0 and ≤ 1000", timeScale)
	case cmdTimeout < 0:
		return o, fmt.Errorf("--command-timeout %v: want ≥ 0", cmdTimeout)
	case !(errorRate >= 0 && errorRate <= 1):
		return o, fmt.Errorf("--error-rate %v: want 0..1", errorRate)
	case !(hangRate >= 0 && hangRate <= 1):
		return o, fmt.Errorf("--hang-rate %v: want 0..1", hangRate)
	case errorRate+hangRate > 1:
		return o, fmt.Errorf("--error-rate + --hang-rate = %v: want at most 1", errorRate+hangRate)
	case crashEvery < 0:
		return o, fmt.Errorf("--crash-every %v: want ≥ 0 (0: never)", crashEvery)
	case !sim.ValidNamePrefix(namePrefix):
		return o, fmt.Errorf("--name-prefix %q: want 1..64 letters, digits, '.', '_' or '-'", namePrefix)
	}
	lat, err := sim.ParseLatency(latency)
	if err != nil {
		return o, fmt.Errorf("--latency: %v", err)
	}
	faults := sim.Faults{Latency: lat, ErrorRate: errorRate, HangRate: hangRate, CrashEvery: crashEvery, Flap: flap}
	if err := faults.Validate(); err != nil {
		return o, fmt.Errorf("fault flags: %v", err)
	}

	cfg := sim.FleetConfig{
		Workers: workers, Devices: devices, Racks: racks, Seed: seed, TimeScale: timeScale, Faults: faults,
		KeysDir: keys, AddrDir: addrDir, StartParallelism: parallel, CommandTimeout: cmdTimeout,
		StateDir: stateDir, NamePrefix: namePrefix,
	}
	ip := net.ParseIP(listen)
	if ip == nil {
		return o, fmt.Errorf("--listen %q: want an IP address", listen)
	}
	if ip4 := ip.To4(); ip4 != nil {
		cfg.ListenAddrs = []string{"/ip4/" + ip4.String() + "/tcp/0", "/ip4/" + ip4.String() + "/udp/0/quic-v1"}
	} else {
		cfg.ListenAddrs = []string{"/ip6/" + ip.String() + "/tcp/0", "/ip6/" + ip.String() + "/udp/0/quic-v1"}
	}
	cfg.LoopbackOnly = ip.IsLoopback()
	if pskFile != "" {
		f, err := os.Open(pskFile)
		if err != nil {
			return o, fmt.Errorf("--psk: %v", err)
		}
		psk, err := pnet.DecodeV1PSK(f)
		f.Close()
		if err != nil {
			return o, fmt.Errorf("--psk %s: %v", pskFile, err)
		}
		cfg.PSK = psk
	}

	if join != "" {
		if len(bootstrap) > 0 || topic != "" {
			return o, errors.New("--join reads bootstrap and topic from the node: drop --bootstrap and --topic")
		}
		j, err := sim.ReadJoin(join)
		if err != nil {
			return o, fmt.Errorf("--join: %v", err)
		}
		cfg.Bootstrap, cfg.Topic, cfg.TrustedKernels = j.Bootstrap, j.Topic, []peer.ID{j.Kernel}
		if cfg.KeysDir == "" {
			cfg.KeysDir = filepath.Join(join, "sim-keys")
		}
	} else {
		if len(trust) == 0 {
			return o, errors.New("--trust PEERID is required (or --join DIR)")
		}
		if len(bootstrap) == 0 && addrDir == "" {
			return o, errors.New("give --join DIR, --bootstrap MADDR or --addr-dir DIR, so a kernel can find the Workers")
		}
		if cfg.Bootstrap, err = p2p.ParseAddrInfos(bootstrap); err != nil {
			return o, fmt.Errorf("--bootstrap: %v", err)
		}
		if topic != "" {
			if len(bootstrap) == 0 {
				return o, errors.New("--topic needs --bootstrap (the DHT needs a peer)")
			}
			if cfg.Topic, err = p2p.ParseTopic(topic); err != nil {
				return o, fmt.Errorf("--topic: %v", err)
			}
		}
	}
	for _, s := range trust {
		id, err := peer.Decode(s)
		if err != nil {
			return o, fmt.Errorf("--trust %q: %v", s, err)
		}
		cfg.TrustedKernels = append(cfg.TrustedKernels, id)
	}
	if cfg.KeysDir == "" {
		o.warnings = append(o.warnings, "no --keys DIR: Worker keys are ephemeral, peer IDs change on the next run")
	}
	o.fleet = cfg
	return o, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "ork-worker-sim: %v\n", err)
		return 2
	}
	slog.SetDefault(slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: o.logLevel})))
	for _, w := range o.warnings {
		slog.Warn(w)
	}
	if err := serve(ctx, o, stdout); err != nil {
		fmt.Fprintf(stderr, "ork-worker-sim: %v\n", err)
		return 1
	}
	return 0
}

// serve runs the fleet until ctx ends, printing the execution summary on
// SIGUSR1 and on exit.
func serve(ctx context.Context, o options, stdout io.Writer) (err error) {
	start := time.Now()
	f, err := sim.StartFleet(ctx, o.fleet)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%d workers × %d devices up in %.1f s\n", o.fleet.Workers, o.fleet.Devices, time.Since(start).Seconds())

	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	defer signal.Stop(usr1)
	for done := false; !done; {
		select {
		case <-ctx.Done():
			done = true
		case <-usr1:
			fmt.Fprintln(stdout, f.Summary())
		}
	}
	err = f.Close()
	sum := f.Summary()
	fmt.Fprintf(stdout, "stopped after %d restarts; %s\n", f.Restarts(), sum)
	if o.execLog != "" {
		err = errors.Join(err, writeJSON(o.execLog, f.Executions()))
	}
	return err
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("--exec-log: %w", err)
	}
	return os.Rename(tmp, path)
}
