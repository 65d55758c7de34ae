package cli

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/orknode/ork/internal/apifile"
	"github.com/orknode/ork/internal/p2p"
	"github.com/orknode/ork/node"
)

// ClientKeyFile is the admin client key `init` makes in the data directory.
const ClientKeyFile = "client.key"

type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error {
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			*l = append(*l, v)
		}
	}
	return nil
}

func runInit(_ context.Context, env *Env, args []string) error {
	var c common
	fs := newFlags("init", env, &c)
	var listen, bootstrap, modes listFlag
	topic := fs.String("topic", "", "discovery topic, 64 hex chars (default: random)")
	loopback := fs.Bool("loopback-only", false, "advertise and dial 127.0.0.1 only (demos, tests)")
	localDir := fs.String("local-dir", "", "directory of Worker address files (local discovery)")
	force := fs.Bool("force", false, "overwrite an existing config.json (its allowlisted callers are kept)")
	resetCallers := fs.Bool("reset-callers", false, "with --force: drop the existing allowlisted callers too")
	fs.Var(&listen, "listen", "listen multiaddrs, comma-separated (default 127.0.0.1:4801 TCP+QUIC)")
	fs.Var(&bootstrap, "bootstrap", "DHT bootstrap multiaddrs with /p2p, comma-separated")
	fs.Var(&modes, "discovery", "discovery modes: dht,static,local,mdns (default dht)")
	if _, err := parse(fs, args); err != nil {
		return err
	}
	cfg := node.DefaultConfig()
	cfg.DataDir = c.data
	if len(listen) > 0 {
		cfg.Listen = listen
	}
	if len(bootstrap) > 0 {
		cfg.Bootstrap = bootstrap
	}
	if len(modes) > 0 {
		cfg.Discovery.Modes = modes
	}
	cfg.LoopbackOnly = *loopback
	cfg.Discovery.LocalDir = *localDir
	cfg.Topic = *topic
	if cfg.Topic == "" {
		var t [32]byte
		_, _ = rand.Read(t[:])
		cfg.Topic = hex.EncodeToString(t[:])
	}
	// --force keeps the old config's callers unless --reset-callers: a
	// re-init must not silently lock every other client out.
	var oldCallers []node.Caller
	if _, err := os.Stat(filepath.Join(c.data, node.ConfigFile)); err == nil {
		if !*force {
			return fmt.Errorf("%s already holds a %s (use --force to overwrite)", c.data, node.ConfigFile)
		}
		if !*resetCallers {
			old, err := node.LoadConfig(c.data)
			if err != nil {
				return fmt.Errorf("reading the existing config to keep its callers: %w (--reset-callers drops them)", err)
			}
			oldCallers = old.Callers
		}
	}
	if err := os.MkdirAll(c.data, 0o700); err != nil {
		return err
	}
	nodeKey, err := p2p.LoadOrCreateKey(filepath.Join(c.data, cfg.KeyFile))
	if err != nil {
		return err
	}
	clientKey, err := p2p.LoadOrCreateKey(filepath.Join(c.data, ClientKeyFile))
	if err != nil {
		return err
	}
	nodeID, _ := peer.IDFromPrivateKey(nodeKey)
	clientID, _ := peer.IDFromPrivateKey(clientKey)
	cfg.Callers = []node.Caller{{PeerID: clientID.String(), Role: node.RoleAdmin, Name: "local-cli"}}
	kept := 0
	for _, cl := range oldCallers {
		if cl.PeerID != clientID.String() { // the admin client is always (re)allowlisted as admin
			cfg.Callers = append(cfg.Callers, cl)
			kept++
		}
	}
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("%w: %v", ErrUsage, err)
	}
	if err := cfg.Save(); err != nil {
		return err
	}
	if c.json {
		return printJSON(env.Stdout, map[string]any{"peerId": nodeID.String(), "clientPeerId": clientID.String(), "data": c.data, "topic": cfg.Topic, "keptCallers": kept})
	}
	fmt.Fprintf(env.Stdout, "initialised %s\n  node peer ID:   %s\n  admin client:   %s (%s, allowlisted)\n  topic:          %s\n",
		c.data, nodeID, clientID, ClientKeyFile, cfg.Topic)
	if kept > 0 {
		fmt.Fprintf(env.Stdout, "  kept %d allowlisted caller(s) from the old config (--reset-callers drops them)\n", kept)
	}
	return nil
}

func runDaemon(ctx context.Context, env *Env, args []string) error {
	var c common
	fs := newFlags("daemon", env, &c)
	var listen, bootstrap listFlag
	httpListen := fs.String("http", "", "loopback HTTP listener for /metrics, /livez, /readyz (e.g. 127.0.0.1:9464)")
	logLevel := fs.String("log-level", "", "debug, info, warn or error (default from config)")
	loopback := fs.Bool("loopback-only", false, "advertise and dial 127.0.0.1 only")
	fs.Var(&listen, "listen", "listen multiaddrs (override config)")
	fs.Var(&bootstrap, "bootstrap", "DHT bootstrap multiaddrs (override config)")
	if _, err := parse(fs, args); err != nil {
		return err
	}
	cfg, err := node.LoadConfig(c.data)
	if err != nil {
		return err
	}
	if err := cfg.ApplyEnv(env.Getenv); err != nil {
		return err
	}
	if len(listen) > 0 {
		cfg.Listen = listen
	}
	if len(bootstrap) > 0 {
		cfg.Bootstrap = bootstrap
	}
	if *httpListen != "" {
		cfg.HTTP.Listen = *httpListen
	}
	if *logLevel != "" {
		cfg.LogLevel = *logLevel
	}
	if *loopback {
		cfg.LoopbackOnly = true
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	setupLogging(env, cfg.LogLevel)
	// The daemon owns its process: apply the memory settings (GOGC and
	// GOMEMLIMIT in the environment still win, as Go users expect).
	if env.Getenv("GOGC") == "" {
		debug.SetGCPercent(cfg.Limits.GCPercent)
	}
	if cfg.Limits.MemoryLimitMB > 0 && env.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(int64(cfg.Limits.MemoryLimitMB) << 20)
	}

	// Signals are caught before the node starts: SIGHUP's default action
	// ends the process, and `allow` may send one as soon as the api file
	// appears (or from an earlier run's file). A reload asked for during
	// startup is applied once the node is up.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	// The first SIGINT/SIGTERM starts a clean shutdown; a second one while
	// the node closes forces the exit.
	term := make(chan os.Signal, 2)
	signal.Notify(term, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(term)
	signalsCaught()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-term:
			cancel()
		case <-ctx.Done():
		}
	}()

	n, err := node.New(ctx, cfg)
	if err != nil {
		return err
	}
	closeHTTP := func() {}
	removeAPI := func() {}
	// shutdown closes everything started below, watching for a second signal.
	shutdown := func(err error) error {
		removeAPI()
		return errors.Join(err, closeNode(env, term, func() error {
			closeHTTP()
			return n.Close()
		}))
	}
	if cfg.HTTP.Listen != "" {
		addr, closeH, err := n.ServeHTTP(cfg.HTTP.Listen)
		if err != nil {
			return shutdown(err)
		}
		closeHTTP = closeH
		fmt.Fprintf(env.Stdout, "http: %s (/metrics /livez /readyz)\n", addr)
	}
	fmt.Fprintf(env.Stdout, "ork-node %s\npeer ID: %s\n", node.Version, n.ID())
	for _, a := range n.Addrs() {
		fmt.Fprintf(env.Stdout, "listening: %s\n", a)
	}
	if err := apifile.Write(c.data, apifile.API{PeerID: n.ID().String(), Addrs: n.Addrs(), Topic: cfg.Topic, PID: os.Getpid()}); err != nil {
		return shutdown(err)
	}
	removeAPI = func() { _ = apifile.Remove(c.data) }
	fmt.Fprintf(env.Stdout, "ready (api file %s)\n", apifile.Path(c.data))

	for {
		select {
		case <-ctx.Done():
			fmt.Fprintln(env.Stdout, "shutting down")
			return shutdown(nil)
		case <-hup:
			if fresh, err := node.LoadConfig(c.data); err != nil {
				slog.Error("reload allowlist", "err", err)
			} else if err := fresh.Validate(); err != nil {
				slog.Error("reload allowlist", "err", err)
			} else {
				n.SetCallers(fresh.Callers)
				slog.Info("allowlist reloaded", "callers", len(fresh.Callers))
			}
		}
	}
}

// signalsCaught runs once the daemon catches its signals, before the node
// starts; tests signal there.
var signalsCaught = func() {}

// forceExit ends the process on a second signal during shutdown; tests
// replace it.
var forceExit = os.Exit

// errForced is what closeNode returns when forceExit returns (in tests).
var errForced = errors.New("forced exit: signalled again while shutting down")

// closeNode runs closeFn (closing the node, which may take seconds while it
// drains commands) and reports its error. A signal on term meanwhile
// forces the exit at once, with exit code 1.
func closeNode(env *Env, term <-chan os.Signal, closeFn func() error) error {
	done := make(chan error, 1)
	go func() { done <- closeFn() }()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("shutdown: %w", err)
		}
		return nil
	case sig := <-term:
		fmt.Fprintf(env.Stderr, "ork-node daemon: %v during shutdown: forced exit\n", sig)
		forceExit(1)
		return errForced
	}
}

func setupLogging(env *Env, level string) {
	var l slog.Level
	_ = l.UnmarshalText([]byte(level))
	slog.SetDefault(slog.New(slog.NewTextHandler(env.Stderr, &slog.HandlerOptions{Level: l})))
}

func runID(_ context.Context, env *Env, args []string) error {
	var c common
	fs := newFlags("id", env, &c)
	if _, err := parse(fs, args); err != nil {
		return err
	}
	cfg, err := node.LoadConfig(c.data)
	if err != nil {
		return err
	}
	b, err := os.ReadFile(filepath.Join(c.data, cfg.KeyFile))
	if err != nil {
		return fmt.Errorf("node key: %w", err)
	}
	k, err := crypto.UnmarshalPrivateKey(b)
	if err != nil {
		return fmt.Errorf("node key: %w", err)
	}
	id, _ := peer.IDFromPrivateKey(k)
	out := map[string]any{"peerId": id.String(), "topic": cfg.Topic, "addrs": []string{}, "running": false}
	if a, err := apifile.Read(c.data); err == nil && a.PeerID == id.String() {
		out["addrs"], out["running"] = a.Addrs, true
	}
	if c.json {
		return printJSON(env.Stdout, out)
	}
	fmt.Fprintf(env.Stdout, "peer ID: %s\ntopic:   %s\n", id, cfg.Topic)
	if out["running"] == true {
		for _, a := range out["addrs"].([]string) {
			fmt.Fprintf(env.Stdout, "address: %s\n", a)
		}
	} else {
		fmt.Fprintln(env.Stdout, "(not running)")
	}
	return nil
}

func runAllow(_ context.Context, env *Env, args []string) error {
	var c common
	fs := newFlags("allow", env, &c)
	role := fs.String("role", node.RoleRead, "read, operate or admin")
	name := fs.String("name", "", "a label for this caller")
	remove := fs.Bool("remove", false, "remove the caller instead")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	cfg, err := node.LoadConfig(c.data)
	if err != nil {
		return err
	}
	if len(pos) == 0 {
		if c.json {
			return printJSON(env.Stdout, cfg.Callers)
		}
		for _, cl := range cfg.Callers {
			fmt.Fprintf(env.Stdout, "%s  %-7s %s\n", cl.PeerID, cl.Role, cl.Name)
		}
		return nil
	}
	if len(pos) != 1 {
		return fmt.Errorf("%w: allow PEER_ID --role ROLE", ErrUsage)
	}
	if _, err := peer.Decode(pos[0]); err != nil {
		return fmt.Errorf("%w: %q is not a peer ID: %v", ErrUsage, pos[0], err)
	}
	kept := cfg.Callers[:0]
	for _, cl := range cfg.Callers {
		if cl.PeerID != pos[0] {
			kept = append(kept, cl)
		}
	}
	if *remove && len(kept) == len(cfg.Callers) {
		return fmt.Errorf("%s is not on the allowlist", pos[0])
	}
	cfg.Callers = kept
	if !*remove {
		cfg.Callers = append(cfg.Callers, node.Caller{PeerID: pos[0], Role: *role, Name: *name})
	}
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("%w: %v", ErrUsage, err)
	}
	if err := cfg.Save(); err != nil {
		return err
	}
	// Tell a running daemon to reload its allowlist — only if the api file's
	// PID really is an ork-node (a stale file's PID may be reused).
	if a, err := apifile.Read(c.data); err == nil && a.PID > 0 {
		if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", a.PID)); err == nil && strings.Contains(filepath.Base(exe), "ork-node") {
			if p, err := os.FindProcess(a.PID); err == nil && p.Signal(syscall.SIGHUP) == nil {
				fmt.Fprintln(env.Stdout, "running node reloaded its allowlist")
			}
		} else {
			fmt.Fprintln(env.Stdout, "restart the node (or send it SIGHUP) to apply")
		}
	}
	if *remove {
		fmt.Fprintf(env.Stdout, "removed %s\n", pos[0])
	} else {
		fmt.Fprintf(env.Stdout, "allowed %s as %s\n", pos[0], *role)
	}
	return nil
}
