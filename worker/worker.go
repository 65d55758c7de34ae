// Package worker is the Go worker SDK: a Worker is a libp2p host that serves
// the /ork/worker/* protocols to its trusted kernels only, advertises itself
// (private DHT, a local address directory, or mDNS) so a kernel finds it, and
// calls the program's handlers for commands and telemetry.
//
// A resent command (same commandId) never runs its handler twice: results are
// kept by commandId for at least 10 minutes, a duplicate of a running command
// waits for the first run, and command.status answers from the same cache.
// With Config.StateDir the cache is journaled to disk, so this holds across a
// process crash too: a command that was running when the process died answers
// FAILED with ERR_WORKER_RESTARTED rather than running again.
//
//	w, err := worker.New(ctx, worker.Config{WorkerID: "pm-01", Contract: c, Devices: devs,
//		KeyFile: "pm-01.key", TrustedKernels: []peer.ID{kernel}, Topic: topic, Bootstrap: peers,
//		Commands:  map[string]worker.CommandHandler{"setLed": setLed},
//		Telemetry: readMetrics})
//	defer w.Close()
//	w.HandleCommand("reboot", reboot) // handlers may also be added later
//
// See worker/example for a complete program.
package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/orknode/ork/internal/logging"
	"github.com/orknode/ork/internal/p2p"
	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/protocols/rpc"
)

var defaultLog = logging.Logger("ork/worker")

// Errors of the Worker API.
var (
	// ErrUnknownCommand: HandleCommand named a command the contract does not declare.
	ErrUnknownCommand = errors.New("ork/worker: command not declared in the contract")
	// ErrUnknownDevice: SetOnline named a device the Worker does not own.
	ErrUnknownDevice = errors.New("ork/worker: unknown device")
	// ErrClosed: the Worker was closed.
	ErrClosed = errors.New("ork/worker: closed")
)

// CommandHandler runs one command on one device. params are normalised and
// validated against the contract before it is called. The result (nil means
// {}) must marshal to JSON; an error fails the command with its message. ctx
// ends at the command's deadline or when the Worker closes: a handler must
// return then, or Close waits for it.
type CommandHandler func(ctx context.Context, deviceID string, params map[string]any) (result any, err error)

// TelemetryHandler reads one device's metrics, keyed by telemetry channel name.
type TelemetryHandler func(ctx context.Context, deviceID string) (map[string]any, error)

// QueryHandler answers a telemetry.pull whose query type it was registered
// for. deviceID may be empty (a Worker-level query); query is the request's
// query object. The result's fields are merged into the reply payload.
type QueryHandler func(ctx context.Context, deviceID string, query map[string]any) (map[string]any, error)

// Worker serves the /ork/worker/* protocols. Create it with New; Close it.
type Worker struct {
	cfg      Config
	contract *envelope.Contract
	log      *slog.Logger
	h        host.Host
	ownHost  bool
	dht      *dht.IpfsDHT
	topic    cid.Cid
	results  *ResultCache
	trusted  map[peer.ID]struct{}
	boot     map[peer.ID]peer.AddrInfo
	started  time.Time
	inflight atomic.Int64

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	runMu  sync.Mutex // guards closing and wg.Add
	closed bool

	mu        sync.RWMutex
	devices   []Device
	commands  map[string]CommandHandler
	telemetry TelemetryHandler
	queries   map[string]QueryHandler

	notifiee    *network.NotifyBundle
	reconnect   chan struct{} // a bootstrap peer disconnected
	provideNow  chan struct{} // a bootstrap peer (re)connected
	provided    atomic.Int64  // successful Provide calls
	mdns        io.Closer
	addrSub     event.Subscription
	addrFile    string
	lastAddrs   []string
	handlersSet bool
	servers     []*rpc.Server // closed with the Worker: open streams stop answering
	ownJournal  bool          // results is Config.StateDir's durable cache; Close closes it

	closeOnce sync.Once
	closeErr  error
}

// New validates cfg, starts the host (unless cfg.Host is given), serves the
// Worker protocols and starts advertising. On error nothing is left running.
// ctx bounds the start only; the Worker runs until Close.
func New(ctx context.Context, cfg Config) (_ *Worker, err error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	contract, err := cloneContract(cfg.Contract)
	if err != nil {
		return nil, fieldErr("Contract", "%v", err)
	}
	results := cfg.Results
	if results == nil {
		results = newResultCache(cfg.DedupTTL, cfg.DedupMaxEntries, time.Now)
	}
	logger := cfg.Logger
	if logger == nil {
		logger = defaultLog
	}
	w := &Worker{
		cfg:        cfg,
		contract:   contract,
		log:        logger.With("worker", cfg.WorkerID),
		results:    results,
		trusted:    make(map[peer.ID]struct{}, len(cfg.TrustedKernels)),
		boot:       make(map[peer.ID]peer.AddrInfo, len(cfg.Bootstrap)),
		started:    time.Now(),
		devices:    slices.Clone(cfg.Devices),
		commands:   maps.Clone(cfg.Commands),
		telemetry:  cfg.Telemetry,
		queries:    maps.Clone(cfg.Queries),
		reconnect:  make(chan struct{}, 1),
		provideNow: make(chan struct{}, 1),
	}
	if w.commands == nil {
		w.commands = map[string]CommandHandler{}
	}
	if w.queries == nil {
		w.queries = map[string]QueryHandler{}
	}
	for _, k := range cfg.TrustedKernels {
		w.trusted[k] = struct{}{}
	}
	for _, b := range cfg.Bootstrap {
		w.boot[b.ID] = b
	}
	w.ctx, w.cancel = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			err = errors.Join(err, w.Close())
		}
	}()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if cfg.StateDir != "" {
		if err := w.results.openJournal(cfg.StateDir, w.log); err != nil {
			return nil, fieldErr("StateDir", "%v", err)
		}
		w.ownJournal = true
	}

	if cfg.Host != nil {
		w.h = cfg.Host
	} else {
		key, err := loadKey(cfg)
		if err != nil {
			return nil, err
		}
		w.h, err = p2p.NewHost(p2p.HostConfig{
			Key:          key,
			ListenAddrs:  cfg.ListenAddrs,
			LoopbackOnly: cfg.LoopbackOnly,
			PSK:          cfg.PSK,
			StreamLimits: p2p.DefaultStreamLimits(),
			UserAgent:    "ork-worker/0.1",
		})
		if err != nil {
			return nil, fmt.Errorf("ork/worker: host: %w", err)
		}
		w.ownHost = true
	}
	for p := range w.trusted {
		w.h.ConnManager().Protect(p, "ork-kernel")
	}
	for p := range w.boot {
		w.h.ConnManager().Protect(p, "ork-bootstrap")
	}

	// Serve first, advertise after (MDK-REFERENCE §6.2): a kernel that finds
	// the Worker must be answered at once.
	w.serve()

	if cfg.Topic != nil {
		w.topic, err = p2p.TopicCID(cfg.Topic)
		if err != nil {
			return nil, fieldErr("Topic", "%v", err)
		}
		w.dht, err = p2p.NewDHT(w.h, p2p.DHTConfig{Server: false, Bootstrap: cfg.Bootstrap})
		if err != nil {
			return nil, fmt.Errorf("ork/worker: dht: %w", err)
		}
	}
	if len(w.boot) > 0 {
		w.notifiee = &network.NotifyBundle{DisconnectedF: w.disconnected}
		w.h.Network().Notify(w.notifiee)
		w.wg.Go(w.keepConnected)
	}
	if w.dht != nil {
		w.wg.Go(w.provideLoop)
	}
	if cfg.AddrDir != "" {
		if err := w.startAddrFile(); err != nil {
			return nil, err
		}
	}
	if cfg.MDNS {
		if err := w.startMDNS(); err != nil {
			return nil, err
		}
	}
	w.log.Info("worker up", "peer", w.h.ID(), "devices", len(cfg.Devices),
		"dht", cfg.Topic != nil, "addrDir", cfg.AddrDir, "mdns", cfg.MDNS)
	return w, nil
}

func loadKey(cfg Config) (crypto.PrivKey, error) {
	switch {
	case cfg.Key != nil:
		return cfg.Key, nil
	case cfg.KeyFile != "":
		k, err := p2p.LoadOrCreateKey(cfg.KeyFile)
		if err != nil {
			return nil, fieldErr("KeyFile", "%v", err)
		}
		return k, nil
	}
	k, _, err := crypto.GenerateEd25519Key(nil)
	return k, err
}

func cloneContract(c *envelope.Contract) (*envelope.Contract, error) {
	b, err := json.Marshal(c)
	if err != nil {
		return nil, err
	}
	var out envelope.Contract
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Close stops serving and advertising, waits for running command handlers
// (their contexts are cancelled), removes the address file and closes the
// host if the Worker made it. Idempotent.
func (w *Worker) Close() error {
	w.closeOnce.Do(func() {
		w.runMu.Lock()
		w.closed = true
		w.runMu.Unlock()
		if w.h != nil && w.handlersSet {
			for _, p := range protocols.WorkerProtocols {
				w.h.RemoveStreamHandler(p)
			}
			for _, srv := range w.servers {
				srv.Close()
			}
		}
		w.cancel()
		var errs []error
		if w.notifiee != nil {
			w.h.Network().StopNotify(w.notifiee)
		}
		if w.mdns != nil {
			errs = append(errs, w.mdns.Close())
		}
		if w.addrSub != nil {
			errs = append(errs, w.addrSub.Close())
		}
		w.wg.Wait()
		if w.ownJournal {
			errs = append(errs, w.results.closeJournal())
		}
		if w.dht != nil {
			errs = append(errs, w.dht.Close())
		}
		if w.addrFile != "" {
			if err := os.Remove(w.addrFile); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, err)
			}
		}
		if w.ownHost && w.h != nil {
			errs = append(errs, w.h.Close())
		}
		w.closeErr = errors.Join(errs...)
	})
	return w.closeErr
}

// goOwned runs fn in a goroutine Close waits for; false if already closing.
func (w *Worker) goOwned(fn func()) bool {
	w.runMu.Lock()
	defer w.runMu.Unlock()
	if w.closed {
		return false
	}
	w.wg.Go(fn)
	return true
}

// ID is the Worker's peer ID.
func (w *Worker) ID() peer.ID { return w.h.ID() }

// WorkerID is the Worker's name on the wire.
func (w *Worker) WorkerID() string { return w.cfg.WorkerID }

// Host is the Worker's libp2p host.
func (w *Worker) Host() host.Host { return w.h }

// Addrs are the Worker's addresses with the /p2p/<peer ID> suffix.
func (w *Worker) Addrs() []string { return p2p.FullAddrs(w.h) }

// Results is the Worker's commandId → result cache (pass it as
// Config.Results to a Worker restarted in the same process to keep it; a
// Worker with a StateDir keeps it on disk instead).
func (w *Worker) Results() *ResultCache { return w.results }

// Executions returns how many times a handler ran per commandId.
func (w *Worker) Executions() map[string]int { return w.results.Executions() }

// Provided counts the successful DHT Provide calls of the topic (tests and
// status output).
func (w *Worker) Provided() int64 { return w.provided.Load() }

// Contract returns a copy of the published contract.
func (w *Worker) Contract() *envelope.Contract {
	c, _ := cloneContract(w.contract)
	return c
}

// HandleCommand registers the handler of a command the contract declares
// (ErrUnknownCommand otherwise), replacing any earlier one. A declared command
// without a handler fails with ERR_UNKNOWN_COMMAND. The Worker answers from
// New on: handlers that must be there for the very first request go in
// Config.Commands.
func (w *Worker) HandleCommand(name string, fn CommandHandler) error {
	if fn == nil {
		return fmt.Errorf("ork/worker: nil handler for command %q", name)
	}
	if _, ok := w.contract.Command(name); !ok {
		return fmt.Errorf("%w: %q", ErrUnknownCommand, name)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.commands[name] = fn
	return nil
}

// HandleTelemetry registers the metrics reader (query type "metrics", the
// default, and single-channel queries named after a telemetry channel).
func (w *Worker) HandleTelemetry(fn TelemetryHandler) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.telemetry = fn
}

// HandleQuery registers the handler of another telemetry query type (e.g.
// "logs", "config"). "metrics" is reserved for HandleTelemetry.
func (w *Worker) HandleQuery(typ string, fn QueryHandler) error {
	if typ == "" || typ == queryMetrics {
		return fmt.Errorf("ork/worker: query type %q is reserved", typ)
	}
	if fn == nil {
		return fmt.Errorf("ork/worker: nil handler for query %q", typ)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.queries[typ] = fn
	return nil
}

// Devices returns the Worker's devices.
func (w *Worker) Devices() []Device {
	w.mu.RLock()
	defer w.mu.RUnlock()
	return slices.Clone(w.devices)
}

// SetOnline marks a device online or offline (ErrUnknownDevice if it is not
// one of the Worker's).
func (w *Worker) SetOnline(deviceID string, online bool) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	i := slices.IndexFunc(w.devices, func(d Device) bool { return d.DeviceID == deviceID })
	if i < 0 {
		return fmt.Errorf("%w: %q", ErrUnknownDevice, deviceID)
	}
	w.devices[i].Offline = !online
	return nil
}

// SetDevices replaces the device list (devices added or removed at run time;
// the kernel sees the change at its next identity refresh).
func (w *Worker) SetDevices(devs []Device) error {
	if err := validateDevices(devs, "devices"); err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.devices = slices.Clone(devs)
	return nil
}

func (w *Worker) device(id string) (Device, bool) {
	w.mu.RLock()
	defer w.mu.RUnlock()
	for _, d := range w.devices {
		if d.DeviceID == id {
			return d, true
		}
	}
	return Device{}, false
}

func (w *Worker) isTrusted(p peer.ID) bool {
	_, ok := w.trusted[p]
	return ok
}

// startAddrFile writes the address file and keeps it current.
func (w *Worker) startAddrFile() error {
	w.addrFile = filepath.Join(w.cfg.AddrDir, w.cfg.WorkerID+p2p.AddrFileExt)
	if err := w.writeAddrFile(); err != nil {
		w.addrFile = "" // nothing to remove
		return fieldErr("AddrDir", "%v", err)
	}
	sub, err := w.h.EventBus().Subscribe(new(event.EvtLocalAddressesUpdated))
	if err != nil {
		return fmt.Errorf("ork/worker: address events: %w", err)
	}
	w.addrSub = sub
	w.wg.Go(func() {
		for {
			select {
			case <-w.ctx.Done():
				return
			case _, ok := <-sub.Out():
				if !ok {
					return
				}
				if err := w.writeAddrFile(); err != nil {
					w.log.Warn("address file", "err", err)
				}
			}
		}
	})
	return nil
}

func (w *Worker) writeAddrFile() error {
	addrs := p2p.FullAddrs(w.h)
	if slices.Equal(addrs, w.lastAddrs) {
		return nil
	}
	if err := p2p.WriteAddrFile(w.cfg.AddrDir, w.cfg.WorkerID, addrs); err != nil {
		return err
	}
	w.lastAddrs = addrs
	return nil
}
