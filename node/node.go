// Package node wires the ORK kernel: it owns the libp2p host, the private
// DHT, discovery, the LevelDB store, the kernel modules and the protocol
// handlers that connect them, and it runs recovery in DESIGN §7's order.
package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/pnet"

	"github.com/orknode/ork/internal/logging"
	"github.com/orknode/ork/internal/p2p"
	"github.com/orknode/ork/modules/commands"
	"github.com/orknode/ork/modules/dispatcher"
	"github.com/orknode/ork/modules/health"
	"github.com/orknode/ork/modules/registry"
	"github.com/orknode/ork/modules/scheduler"
	"github.com/orknode/ork/modules/telemetry"
	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/protocols/rpc"
	"github.com/orknode/ork/store"
)

var log = logging.Logger("ork/node")

// Sender is the kernel's sender name in every envelope it originates (MDK).
const Sender = "kernel:kernel:default"

// Version of this build.
const Version = "0.1.0"

// newHost makes the node's libp2p host. Tests in this package replace it to
// run the kernel on a mocknet host; production always uses p2p.NewHost.
var newHost = p2p.NewHost

// Node is a running ORK kernel.
type Node struct {
	cfg     Config
	started time.Time

	store  *store.Store
	host   host.Host
	dht    *dht.IpfsDHT
	client *rpc.Client

	reg      *registry.Registry
	health   *health.Monitor
	cmds     *commands.Manager
	dispatch *dispatcher.Dispatcher
	telem    *telemetry.Collector
	sched    *scheduler.Scheduler
	disc     *discovery
	regs     *registrar
	allow    allowlist

	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	goMu    sync.Mutex
	closing bool

	pinging    sync.Map // workerID → in-flight immediate ping
	findPeers  atomic.Int64
	finder     *finder       // bounds FindPeer lookups
	statePulls chan struct{} // bounds live state.pull calls

	closeOnce sync.Once
	closeErr  error
}

// New starts a node from cfg: it opens the store, reloads the registry and
// health (recovery steps 1–2), starts the host, the DHT and the protocol
// handlers, pings every known Worker at once (step 3) and starts discovery
// (step 4). On error it leaves nothing running.
func New(ctx context.Context, cfg Config) (n *Node, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	n = &Node{cfg: cfg, started: time.Now(), finder: newFinder(), statePulls: make(chan struct{}, maxStatePulls)}
	n.ctx, n.cancel = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			err = errors.Join(err, n.Close())
			n = nil
		}
	}()

	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return n, err
	}
	key, err := p2p.LoadOrCreateKey(cfg.path(cfg.KeyFile))
	if err != nil {
		return n, err
	}
	if n.store, err = store.Open(cfg.path("store")); err != nil {
		return n, fmt.Errorf("open store: %w", err)
	}

	// Recovery 1: the registry and health as they were.
	n.reg = registry.New(registry.Options{KV: n.store, Now: time.Now, OnChange: n.onRegistryChange})
	if _, err := n.reg.Load(ctx); err != nil {
		log.Warn("registry reload skipped records", "err", err)
	}
	n.health, err = health.New(health.Options{
		FailureThreshold: cfg.Health.FailureThreshold, KV: n.store, Now: time.Now, OnChange: n.onHealthChange,
	})
	if err != nil {
		return n, err
	}
	if _, err := n.health.Load(ctx); err != nil {
		log.Warn("health reload skipped records", "err", err)
	}
	for _, w := range n.reg.List() {
		n.reg.SetHealth(w.WorkerID, n.health.State(w.WorkerID).State)
	}

	var psk pnet.PSK
	if cfg.PrivateNetworkKeyFile != "" {
		if psk, err = loadPSK(cfg.path(cfg.PrivateNetworkKeyFile)); err != nil {
			return n, err
		}
	}
	n.host, err = newHost(p2p.HostConfig{
		Key:                key,
		ListenAddrs:        cfg.Listen,
		AnnounceAddrs:      cfg.Announce,
		LoopbackOnly:       cfg.LoopbackOnly,
		PSK:                psk,
		ConnLow:            cfg.Limits.ConnLow,
		ConnHigh:           cfg.Limits.ConnHigh,
		MaxInboundConns:    cfg.Limits.MaxInboundConns,
		StreamLimits:       p2p.DefaultStreamLimits(),
		EnableAutoNAT:      cfg.WAN.AutoNAT,
		EnableHolePunching: cfg.WAN.HolePunching,
		UserAgent:          "ork-node/" + Version,
	})
	if err != nil {
		return n, fmt.Errorf("libp2p host: %w", err)
	}
	// Up to 32 idle streams per Worker and protocol: one in flight per device,
	// so a Worker with many devices keeps reusing streams under load.
	n.loadAddrs(ctx)
	n.client = rpc.NewClient(n.host, rpc.ClientOptions{Sender: Sender, MaxIdlePerPeer: 32})

	bootstrap, _ := p2p.ParseAddrInfos(cfg.Bootstrap) // validated
	n.dht, err = p2p.NewDHT(n.host, p2p.DHTConfig{
		Server:    true,
		Bootstrap: bootstrap,
		Datastore: n.store.Namespace(store.NSDHT),
	})
	if err != nil {
		return n, fmt.Errorf("dht: %w", err)
	}

	// Recovery 2: the command WAL. Nothing stays stranded: queued commands
	// wait for their Worker to be routable, unknown outcomes are asked.
	if n.cmds, err = commands.New(commands.Options{
		WAL:            walAdapter{n.store},
		Sender:         commandSender{n},
		NotDelivered:   notDelivered,
		Routable:       n.reg.Routable,
		Owner:          func(id string) (string, bool) { w, _, ok := n.reg.ResolveDevice(id); return w, ok },
		MaxRetries:     commands.Retries(cfg.Commands.MaxRetries),
		CommandTimeout: ms(cfg.Commands.TimeoutMs),
		QueueDepth:     cfg.Commands.QueueDepth,
		ResultTTL:      ms(cfg.Commands.ResultTTLMs),
		Concurrency:    cfg.Commands.MaxInFlight,
		Logger:         logging.Logger("ork/commands"),
	}); err != nil {
		return n, err
	}
	rep, err := n.cmds.Recover(ctx)
	if err != nil {
		return n, fmt.Errorf("command recovery: %w", err)
	}
	log.Info("recovered", "workers", len(n.reg.PeerIDs()), "commands", rep)
	n.dispatch = dispatcher.New(dispatcher.Options{Directory: directory{n.reg}})
	if n.telem, err = n.newCollector(); err != nil {
		return n, err
	}

	n.regs = newRegistrar(n)
	n.serveKernelProtocols()

	n.sched = scheduler.New(scheduler.Options{MaxConcurrent: 8})
	if err := n.addJobs(); err != nil {
		return n, err
	}

	n.disc, err = newDiscovery(n, bootstrap)
	if err != nil {
		return n, err
	}

	// Recovery 3: ping every known Worker at once, then 4: discovery.
	n.sched.Start(n.ctx)
	n.sched.Trigger(jobHealth)
	n.disc.start()
	return n, nil
}

// ID is the node's peer ID.
func (n *Node) ID() peer.ID { return n.host.ID() }

// Host is the node's libp2p host.
func (n *Node) Host() host.Host { return n.host }

// Addrs are the node's dialable multiaddrs with /p2p suffix.
func (n *Node) Addrs() []string { return p2p.FullAddrs(n.host) }

// Registry exposes the worker registry (read-only use by tools and tests).
func (n *Node) Registry() *registry.Registry { return n.reg }

// Config returns the running configuration.
func (n *Node) Config() Config { return n.cfg }

// FindPeers counts DHT FindPeer lookups made to reach moved Workers.
func (n *Node) FindPeers() int64 { return n.findPeers.Load() }

// Close stops everything in reverse order. Idempotent.
func (n *Node) Close() error {
	n.closeOnce.Do(func() {
		// Callers first: a request arriving during shutdown is refused at the
		// stream, not half-served by closing modules.
		if n.host != nil {
			for _, p := range protocols.KernelProtocols {
				n.host.RemoveStreamHandler(p)
			}
		}
		n.cancel()
		n.goMu.Lock()
		n.closing = true
		n.goMu.Unlock()
		var errs []error
		if n.disc != nil {
			n.disc.close()
		}
		if n.sched != nil {
			n.sched.Close()
		}
		if n.regs != nil {
			n.regs.close()
		}
		if n.cmds != nil {
			dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_ = n.cmds.Drain(dctx)
			cancel()
			errs = append(errs, n.cmds.Close())
		}
		n.wg.Wait()
		if n.client != nil {
			errs = append(errs, n.client.Close())
		}
		if n.dht != nil {
			errs = append(errs, n.dht.Close())
		}
		if n.host != nil {
			errs = append(errs, n.host.Close())
		}
		if n.store != nil {
			errs = append(errs, n.store.Close())
		}
		n.closeErr = errors.Join(errs...)
	})
	return n.closeErr
}

// goOwned runs fn in a goroutine that Close waits for, unless the node is
// closing (a WaitGroup must not grow while Close waits on it).
func (n *Node) goOwned(fn func()) bool {
	n.goMu.Lock()
	defer n.goMu.Unlock()
	if n.closing {
		return false
	}
	n.wg.Go(fn)
	return true
}

func loadPSK(path string) (pnet.PSK, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("private network key: %w", err)
	}
	defer f.Close()
	psk, err := pnet.DecodeV1PSK(f)
	if err != nil {
		return nil, fmt.Errorf("private network key %s: %w", path, err)
	}
	return psk, nil
}

func (n *Node) onRegistryChange(c registry.Change) {
	log.Debug("worker state", "worker", c.WorkerID, "peer", c.PeerID, "from", c.From, "to", c.To)
	if c.To == envelope.WorkerReady && n.cmds != nil {
		n.cmds.Pump(c.WorkerID) // queued commands go as soon as their Worker is routable
	}
	if c.To == envelope.WorkerTerminated && n.telem != nil {
		n.telem.Forget(c.WorkerID)
	}
	if c.ReleasedWorker != "" && n.health != nil {
		_ = n.health.Forget(n.ctx, c.ReleasedWorker)
	}
	if c.ReplacedPeer != "" {
		// The Worker came back under a new key: let go of the old peer.
		if old, err := peer.Decode(c.ReplacedPeer); err == nil {
			n.host.ConnManager().Unprotect(old, "ork-worker")
			n.client.DropPeer(old)
			n.forgetAddrs(n.ctx, old)
			if n.regs != nil {
				n.regs.forget(old)
			}
		}
	}
}

func (n *Node) onHealthChange(workerID, from, to string) {
	n.reg.SetHealth(workerID, to)
	if from == to {
		return
	}
	log.Info("worker health", "worker", workerID, "from", from, "to", to)
	if to == envelope.HealthHealthy && n.cmds != nil {
		n.cmds.Pump(workerID)
	}
	// A Worker that just turned SICK is re-pinged at once (DESIGN §8).
	if to == envelope.HealthSick {
		if w, ok := n.reg.Worker(workerID); ok {
			if p, err := peer.Decode(w.PeerID); err == nil {
				n.pingSoon(workerID, p)
			}
		}
	}
}

func (n *Node) now() time.Time { return time.Now() }
