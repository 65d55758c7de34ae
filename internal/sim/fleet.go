package sim

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"golang.org/x/sync/errgroup"

	"github.com/orknode/ork/internal/logging"
	"github.com/orknode/ork/internal/p2p"
	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/worker"
)

var log = logging.Logger("ork/sim")

// DefaultStartParallelism is how many Workers start at once.
const DefaultStartParallelism = 32

// FleetConfig describes a simulated fleet: Workers × Devices miners.
type FleetConfig struct {
	Workers int // ≥ 1
	Devices int // per Worker, ≥ 1
	Racks   int // rack labels rack-01..rack-K, Workers spread over them; default 1
	Seed    uint64
	// TimeScale multiplies the model's durations (see MinerConfig). Default 1.
	TimeScale float64
	Faults    Faults

	// KeysDir keeps each Worker's key as <KeysDir>/<workerId>.key, so a new
	// run keeps the peer IDs. Empty: keys live in memory for this run only
	// (crash restarts still keep them).
	KeysDir string
	// StateDir, if set, gives each Worker a durable result journal in
	// <StateDir>/<workerId>/ (worker.Config.StateDir), so a killed and
	// restarted simulator never runs a command twice either. Empty: each
	// Worker's result cache lives in memory (kept across crash restarts
	// within the process).
	StateDir string
	// NamePrefix names the Workers <prefix>-0001, <prefix>-0002, ...
	// (default "sim"), so several fleets can join one node side by side.
	NamePrefix   string
	ListenAddrs  []string // default 127.0.0.1 TCP + QUIC
	LoopbackOnly bool
	// PSK is the site's private-network key, if it has one.
	PSK []byte

	TrustedKernels []peer.ID
	Bootstrap      []peer.AddrInfo
	Topic          []byte // 32 bytes: DHT advertising
	AddrDir        string // local-directory advertising

	// CommandTimeout bounds a handler run (hung commands end here); default
	// the worker SDK's.
	CommandTimeout time.Duration
	// StartParallelism bounds concurrent Worker starts; default 32.
	StartParallelism int
	Logger           *slog.Logger // the fleet's own lines
	// WorkerLogger is handed to every Worker; default: the Logger's handler
	// at Warn and above (a thousand "worker up" lines help nobody).
	WorkerLogger *slog.Logger
	// Now is the model clock; default time.Now.
	Now func() time.Time
}

// Fleet runs simulated Workers in one process, each its own libp2p host.
type Fleet struct {
	cfg      FleetConfig
	contract *envelope.Contract
	log      *slog.Logger
	workers  []*simWorker
	miners   map[string]*Miner

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	execMu sync.Mutex
	execs  map[string]int

	closeOnce sync.Once
	closeErr  error
}

type simWorker struct {
	f       *Fleet
	index   int
	id      string
	key     crypto.PrivKey
	miners  map[string]*Miner
	devices []worker.Device
	results *worker.ResultCache
	faults  *injector

	restartMu sync.Mutex // one crash or flap at a time
	mu        sync.Mutex
	w         *worker.Worker // nil while down
	restarts  int
}

// DefaultNamePrefix is the Worker name prefix when FleetConfig.NamePrefix is
// empty.
const DefaultNamePrefix = "sim"

// WorkerID names the i-th Worker (0-based) of a fleet with the default
// prefix: sim-0001, sim-0002, ...
func WorkerID(i int) string { return PrefixedWorkerID(DefaultNamePrefix, i) }

// PrefixedWorkerID names the i-th Worker (0-based) of a fleet with the given
// NamePrefix: <prefix>-0001, <prefix>-0002, ...
func PrefixedWorkerID(prefix string, i int) string { return fmt.Sprintf("%s-%04d", prefix, i+1) }

// ValidNamePrefix reports whether p can prefix Worker IDs: 1..64 letters,
// digits, '.', '_' and '-' (what a worker ID allows).
func ValidNamePrefix(p string) bool {
	if p == "" || len(p) > 64 || p == "." || p == ".." {
		return false
	}
	for _, r := range p {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '_', r == '-':
		default:
			return false
		}
	}
	return true
}

// DeviceID names the j-th device (0-based) of a Worker: sim-0001-d01, ...
func DeviceID(workerID string, j int) string { return fmt.Sprintf("%s-d%02d", workerID, j+1) }

// RackLabel names the k-th rack (0-based): rack-01, ...
func RackLabel(k int) string { return fmt.Sprintf("rack-%02d", k+1) }

func (cfg *FleetConfig) validate() error {
	var errs []error
	if cfg.Workers < 1 {
		errs = append(errs, fmt.Errorf("workers: %d, want ≥ 1", cfg.Workers))
	}
	if cfg.Devices < 1 {
		errs = append(errs, fmt.Errorf("devices: %d, want ≥ 1", cfg.Devices))
	}
	if cfg.Racks == 0 {
		cfg.Racks = 1
	}
	if cfg.NamePrefix == "" {
		cfg.NamePrefix = DefaultNamePrefix
	}
	if !ValidNamePrefix(cfg.NamePrefix) {
		errs = append(errs, fmt.Errorf("name prefix %q: use 1..64 letters, digits, '.', '_' and '-'", cfg.NamePrefix))
	}
	if cfg.Racks < 0 {
		errs = append(errs, fmt.Errorf("racks: %d, want ≥ 1", cfg.Racks))
	}
	if cfg.TimeScale == 0 {
		cfg.TimeScale = 1
	}
	if cfg.TimeScale < 0 {
		errs = append(errs, fmt.Errorf("time scale %v: want > 0", cfg.TimeScale))
	}
	if err := cfg.Faults.Validate(); err != nil {
		errs = append(errs, err)
	}
	if cfg.Faults.CrashPause == 0 {
		cfg.Faults.CrashPause = time.Duration(float64(2*time.Second) * cfg.TimeScale)
	}
	if len(cfg.TrustedKernels) == 0 {
		errs = append(errs, errors.New("trusted kernels: at least one peer ID is required"))
	}
	if cfg.StartParallelism <= 0 {
		cfg.StartParallelism = DefaultStartParallelism
	}
	if cfg.Logger == nil {
		cfg.Logger = log
	}
	if cfg.WorkerLogger == nil {
		cfg.WorkerLogger = slog.New(MinLevel(cfg.Logger.Handler(), slog.LevelWarn))
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return errors.Join(errs...)
}

// StartFleet builds the miners and starts every Worker, StartParallelism at
// a time, then the crash and flap loops. On error nothing is left running.
func StartFleet(ctx context.Context, cfg FleetConfig) (_ *Fleet, err error) {
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("ork/sim: %w", err)
	}
	f := &Fleet{
		cfg:      cfg,
		contract: Contract(cfg.TimeScale),
		log:      cfg.Logger,
		miners:   make(map[string]*Miner, cfg.Workers*cfg.Devices),
		execs:    map[string]int{},
	}
	f.ctx, f.cancel = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			err = errors.Join(err, f.Close())
		}
	}()
	for i := range cfg.Workers {
		s, err := f.newSimWorker(i)
		if err != nil {
			return nil, err
		}
		f.workers = append(f.workers, s)
	}

	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(cfg.StartParallelism)
	for _, s := range f.workers {
		g.Go(func() error { return s.start(gctx) })
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	for _, s := range f.workers {
		if cfg.Faults.CrashEvery > 0 {
			f.wg.Go(s.crashLoop)
		}
		if cfg.Faults.Flap {
			f.wg.Go(s.flapLoop)
		}
	}
	return f, nil
}

func (f *Fleet) newSimWorker(i int) (*simWorker, error) {
	cfg := f.cfg
	id := PrefixedWorkerID(cfg.NamePrefix, i)
	s := &simWorker{f: f, index: i, id: id, miners: map[string]*Miner{}, faults: newInjector(cfg.Faults, cfg.Seed, i)}
	var err error
	if cfg.KeysDir != "" {
		s.key, err = p2p.LoadOrCreateKey(filepath.Join(cfg.KeysDir, id+".key"))
	} else {
		s.key, _, err = crypto.GenerateEd25519Key(nil)
	}
	if err != nil {
		return nil, fmt.Errorf("ork/sim: key of %s: %w", id, err)
	}
	if cfg.StateDir == "" { // else the Worker's journal keeps the results
		s.results, err = worker.NewResultCache(0, 0)
		if err != nil {
			return nil, err
		}
	}
	rack := RackLabel(i % cfg.Racks)
	pick := rand.New(rand.NewPCG(cfg.Seed, uint64(i)))
	for j := range cfg.Devices {
		dev := DeviceID(id, j)
		m := NewMiner(MinerConfig{
			DeviceID:  dev,
			Rack:      rack,
			Model:     Models[pick.IntN(len(Models))],
			Seed:      cfg.Seed,
			AmbientC:  22 + pick.Float64()*8,
			TimeScale: cfg.TimeScale,
			Now:       cfg.Now,
			Pool:      Pool{URL: "stratum+tcp://pool.ork-sim.invalid:3333", User: "ork-sim." + dev},
		})
		s.miners[dev] = m
		f.miners[dev] = m
		s.devices = append(s.devices, worker.Device{DeviceID: dev, Rack: rack, Model: m.Model().Name})
	}
	return s, nil
}

// start makes the Worker (same key, same result cache or journal, handlers
// in place before it answers anything).
func (s *simWorker) start(ctx context.Context) error {
	cfg := s.f.cfg
	commands := map[string]worker.CommandHandler{
		"reboot": s.onMiner(func(ctx context.Context, m *Miner, _ map[string]any) (map[string]any, error) {
			return m.Reboot(ctx)
		}),
		"setPowerMode": s.onMiner(func(ctx context.Context, m *Miner, p map[string]any) (map[string]any, error) {
			mode, _ := p["mode"].(string)
			return m.SetPowerMode(ctx, mode)
		}),
		"setLed": s.onMiner(func(ctx context.Context, m *Miner, p map[string]any) (map[string]any, error) {
			on, _ := p["on"].(bool)
			return m.SetLed(ctx, on)
		}),
		"setPowerLimit": s.onMiner(func(ctx context.Context, m *Miner, p map[string]any) (map[string]any, error) {
			watts, _ := p["watts"].(float64)
			return m.SetPowerLimit(ctx, watts)
		}),
		"setPools": s.onMiner(func(ctx context.Context, m *Miner, p map[string]any) (map[string]any, error) {
			pools, err := ParsePools(p["pools"])
			if err != nil {
				return nil, err
			}
			return m.SetPools(ctx, pools)
		}),
	}
	for name, h := range commands {
		commands[name] = s.faults.wrap(h)
	}
	wc := worker.Config{
		WorkerID: s.id,
		Contract: s.f.contract,
		Devices:  s.devices,
		Commands: commands,
		Telemetry: func(_ context.Context, dev string) (map[string]any, error) {
			m := s.miners[dev]
			if m == nil {
				return nil, envelope.Errf(envelope.CodeDeviceNotFound, "%s", dev)
			}
			if m.Status() == StatusOffline {
				return nil, envelope.Errf(envelope.CodeDeviceUnavailable, "%s", dev)
			}
			return m.Metrics(), nil
		},
		Key:            s.key,
		ListenAddrs:    cfg.ListenAddrs,
		LoopbackOnly:   cfg.LoopbackOnly,
		PSK:            cfg.PSK,
		TrustedKernels: cfg.TrustedKernels,
		Topic:          cfg.Topic,
		Bootstrap:      cfg.Bootstrap,
		AddrDir:        cfg.AddrDir,
		Results:        s.results,
		StateDir:       s.stateDir(),
		CommandTimeout: cfg.CommandTimeout,
		OnExecute:      s.f.countExec,
		Logger:         cfg.WorkerLogger,
	}
	if in := s.faults.intercept(); in != nil {
		wc.Intercept = func(ctx context.Context, _ peer.ID, action string) error { return in(ctx, action) }
	}
	w, err := worker.New(ctx, wc)
	if err != nil {
		return fmt.Errorf("ork/sim: start %s: %w", s.id, err)
	}
	s.mu.Lock()
	old := s.w
	s.w = w
	s.mu.Unlock()
	if old != nil { // never: starts are serialised; closing it keeps nothing running
		return old.Close()
	}
	return nil
}

// stateDir is the Worker's journal directory, or "" (in-memory results).
func (s *simWorker) stateDir() string {
	if s.f.cfg.StateDir == "" {
		return ""
	}
	return filepath.Join(s.f.cfg.StateDir, s.id)
}

func (s *simWorker) onMiner(fn func(context.Context, *Miner, map[string]any) (map[string]any, error)) worker.CommandHandler {
	return func(ctx context.Context, dev string, params map[string]any) (any, error) {
		m := s.miners[dev]
		if m == nil {
			return nil, envelope.Errf(envelope.CodeDeviceNotFound, "%s", dev)
		}
		return fn(ctx, m, params)
	}
}

// stop closes the Worker (a crash: the host goes away).
func (s *simWorker) stop() error {
	s.mu.Lock()
	w := s.w
	s.w = nil
	s.mu.Unlock()
	if w == nil {
		return nil
	}
	return w.Close()
}

// restart stops the Worker, waits pause, and starts it again with the same
// key and result cache.
func (s *simWorker) restart(ctx context.Context, pause time.Duration) error {
	s.restartMu.Lock()
	defer s.restartMu.Unlock()
	if err := s.stop(); err != nil {
		s.f.log.Warn("stop", "worker", s.id, "err", err)
	}
	if err := sleep(ctx, pause); err != nil {
		return err
	}
	if err := s.start(ctx); err != nil {
		return err
	}
	s.mu.Lock()
	s.restarts++
	s.mu.Unlock()
	return nil
}

func (s *simWorker) crashLoop() {
	every := s.f.cfg.Faults.CrashEvery
	for {
		if sleep(s.f.ctx, s.faults.between(every/2, every*3/2)) != nil {
			return
		}
		s.f.log.Debug("crash", "worker", s.id)
		if err := s.restart(s.f.ctx, s.f.cfg.Faults.CrashPause); err != nil {
			if s.f.ctx.Err() == nil {
				s.f.log.Warn("restart after crash failed", "worker", s.id, "err", err)
			}
			return
		}
	}
}

func (s *simWorker) flapLoop() {
	scale := func(d time.Duration) time.Duration { return time.Duration(float64(d) * s.f.cfg.TimeScale) }
	for {
		if sleep(s.f.ctx, s.faults.between(scale(20*time.Second), scale(120*time.Second))) != nil {
			return
		}
		down := s.faults.between(scale(time.Second), scale(10*time.Second))
		s.f.log.Debug("flap", "worker", s.id, "down", down)
		if err := s.restart(s.f.ctx, down); err != nil {
			if s.f.ctx.Err() == nil {
				s.f.log.Warn("restart after flap failed", "worker", s.id, "err", err)
			}
			return
		}
	}
}

func (f *Fleet) countExec(commandID, _, _ string) {
	f.execMu.Lock()
	defer f.execMu.Unlock()
	f.execs[commandID]++
}

// Restart crashes Worker i and brings it back after pause (same key, same
// result cache).
func (f *Fleet) Restart(ctx context.Context, i int, pause time.Duration) error {
	if i < 0 || i >= len(f.workers) {
		return fmt.Errorf("ork/sim: no worker %d", i)
	}
	return f.workers[i].restart(ctx, pause)
}

// Worker returns the running Worker i (nil while it is down).
func (f *Fleet) Worker(i int) *worker.Worker {
	s := f.workers[i]
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w
}

// PeerIDs are the Workers' peer IDs, in Worker order.
func (f *Fleet) PeerIDs() []peer.ID {
	out := make([]peer.ID, len(f.workers))
	for i, s := range f.workers {
		out[i], _ = peer.IDFromPrivateKey(s.key)
	}
	return out
}

// Miner returns the simulated miner with this device id.
func (f *Fleet) Miner(deviceID string) *Miner { return f.miners[deviceID] }

// Restarts counts the crash and flap restarts so far.
func (f *Fleet) Restarts() int {
	n := 0
	for _, s := range f.workers {
		s.mu.Lock()
		n += s.restarts
		s.mu.Unlock()
	}
	return n
}

// Executions returns how many times a handler ran per commandId, over every
// Worker and restart.
func (f *Fleet) Executions() map[string]int {
	f.execMu.Lock()
	defer f.execMu.Unlock()
	return maps.Clone(f.execs)
}

// ExecSummary is the "no command ran twice" check.
type ExecSummary struct {
	Commands      int            // distinct commandIds executed
	Executions    int            // handler runs
	MaxExecutions int            // of any one commandId
	Duplicates    map[string]int // commandIds run more than once
}

// Summary summarises Executions.
func (f *Fleet) Summary() ExecSummary {
	ex := f.Executions()
	s := ExecSummary{Commands: len(ex), Duplicates: map[string]int{}}
	for id, n := range ex {
		s.Executions += n
		s.MaxExecutions = max(s.MaxExecutions, n)
		if n > 1 {
			s.Duplicates[id] = n
		}
	}
	return s
}

// String prints the summary on one line, then one line per duplicate.
func (s ExecSummary) String() string {
	out := fmt.Sprintf("commands: %d distinct ids, %d executions, max %d per id, %d ids executed more than once",
		s.Commands, s.Executions, s.MaxExecutions, len(s.Duplicates))
	for _, id := range slices.Sorted(maps.Keys(s.Duplicates)) {
		out += fmt.Sprintf("\n  DUPLICATE %s ran %d times", id, s.Duplicates[id])
	}
	return out
}

// Close stops the fault loops and every Worker. Idempotent.
func (f *Fleet) Close() error {
	f.closeOnce.Do(func() {
		f.cancel()
		f.wg.Wait()
		var mu sync.Mutex
		var errs []error
		var wg sync.WaitGroup
		sem := make(chan struct{}, f.cfg.StartParallelism)
		for _, s := range f.workers {
			sem <- struct{}{}
			wg.Go(func() {
				defer func() { <-sem }()
				if err := s.stop(); err != nil {
					mu.Lock()
					errs = append(errs, fmt.Errorf("%s: %w", s.id, err))
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		f.closeErr = errors.Join(errs...)
	})
	return f.closeErr
}
