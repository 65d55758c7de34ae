package cli

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/client"
	"github.com/orknode/ork/internal/apifile"
	"github.com/orknode/ork/internal/p2p"
	"github.com/orknode/ork/internal/testutil"
	"github.com/orknode/ork/node"
	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/worker"
)

// syncBuf is a bytes.Buffer safe for the daemon's logger goroutines.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// testEnv is an Env over buffers and a fixed environment. GOGC is set so an
// in-process daemon leaves the test binary's GC target alone.
func testEnv(vars map[string]string) (*Env, *syncBuf, *syncBuf) {
	stdout, stderr := &syncBuf{}, &syncBuf{}
	all := map[string]string{"GOGC": "100"}
	for k, v := range vars {
		all[k] = v
	}
	return &Env{Stdout: stdout, Stderr: stderr, Getenv: func(k string) string { return all[k] }}, stdout, stderr
}

type result struct {
	code           int
	stdout, stderr string
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}

// run runs one CLI invocation with a bounded context.
func run(t *testing.T, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	env, out, errb := testEnv(nil)
	code := Main(ctx, args, env)
	return result{code, out.String(), errb.String()}
}

// initDir runs `init` for a loopback data directory on an ephemeral port.
func initDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ork")
	r := run(t, "init", "--data", dir, "--listen", "/ip4/127.0.0.1/tcp/0", "--loopback-only")
	require.Equal(t, 0, r.code, "%s", r)
	return dir
}

func peerOfKeyFile(t *testing.T, path string) peer.ID {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	k, err := crypto.UnmarshalPrivateKey(b)
	require.NoError(t, err)
	id, err := peer.IDFromPrivateKey(k)
	require.NoError(t, err)
	return id
}

func newPeerKey(t *testing.T, dir, name string) (string, peer.ID) {
	t.Helper()
	path := filepath.Join(dir, name)
	k, err := p2p.LoadOrCreateKey(path)
	require.NoError(t, err)
	id, err := peer.IDFromPrivateKey(k)
	require.NoError(t, err)
	return path, id
}

func TestInitCreatesDataDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ork")
	r := run(t, "init", "--data", dir, "--listen", "/ip4/127.0.0.1/tcp/0", "--loopback-only")
	require.Equal(t, 0, r.code, "%s", r)
	require.Contains(t, r.stdout, "initialised "+dir)

	for _, f := range []string{node.ConfigFile, "identity.key", ClientKeyFile} {
		st, err := os.Stat(filepath.Join(dir, f))
		require.NoError(t, err, f)
		require.Equal(t, os.FileMode(0o600), st.Mode().Perm(), f)
	}
	st, err := os.Stat(dir)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o700), st.Mode().Perm())

	nodeID := peerOfKeyFile(t, filepath.Join(dir, "identity.key"))
	clientID := peerOfKeyFile(t, filepath.Join(dir, ClientKeyFile))
	require.NotEqual(t, nodeID, clientID)
	require.Contains(t, r.stdout, nodeID.String())
	require.Contains(t, r.stdout, clientID.String())

	cfg, err := node.LoadConfig(dir)
	require.NoError(t, err)
	require.NoError(t, cfg.Validate())
	require.Equal(t, []node.Caller{{PeerID: clientID.String(), Role: node.RoleAdmin, Name: "local-cli"}}, cfg.Callers)
	require.Equal(t, node.RoleAdmin, cfg.RoleOf(clientID))
	require.Equal(t, []string{"/ip4/127.0.0.1/tcp/0"}, cfg.Listen)
	require.True(t, cfg.LoopbackOnly)
	topic, err := p2p.ParseTopic(cfg.Topic)
	require.NoError(t, err, "init makes a random valid topic")
	require.Len(t, topic, 32)

	// A second init refuses to overwrite.
	r = run(t, "init", "--data", dir)
	require.Equal(t, 1, r.code, "%s", r)
	require.Contains(t, r.stderr, "already holds a config.json")
	require.Contains(t, r.stderr, "--force")

	// --force rewrites the config but keeps the node's identity and the
	// callers allowlisted since.
	_, op := newPeerKey(t, t.TempDir(), "op.key")
	r = run(t, "allow", op.String(), "--data", dir, "--role", "operate", "--name", "gw")
	require.Equal(t, 0, r.code, "%s", r)
	fixed := strings.Repeat("ab", 32)
	r = run(t, "init", "--data", dir, "--force", "--topic", fixed, "--json")
	require.Equal(t, 0, r.code, "%s", r)
	var out map[string]any
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &out), r.stdout)
	require.Equal(t, nodeID.String(), out["peerId"])
	require.Equal(t, clientID.String(), out["clientPeerId"])
	require.Equal(t, fixed, out["topic"])
	require.Equal(t, 1.0, out["keptCallers"])
	cfg, err = node.LoadConfig(dir)
	require.NoError(t, err)
	require.Equal(t, fixed, cfg.Topic)
	require.Equal(t, []node.Caller{
		{PeerID: clientID.String(), Role: node.RoleAdmin, Name: "local-cli"},
		{PeerID: op.String(), Role: node.RoleOperate, Name: "gw"},
	}, cfg.Callers)

	r = run(t, "init", "--data", dir, "--force")
	require.Equal(t, 0, r.code, "%s", r)
	require.Contains(t, r.stdout, "kept 1 allowlisted caller(s)")
	require.Contains(t, r.stdout, "--reset-callers")
	cfg, err = node.LoadConfig(dir)
	require.NoError(t, err)
	require.Equal(t, node.RoleOperate, cfg.RoleOf(op))

	// --reset-callers drops them: only the admin client is left.
	r = run(t, "init", "--data", dir, "--force", "--reset-callers")
	require.Equal(t, 0, r.code, "%s", r)
	require.NotContains(t, r.stdout, "kept")
	cfg, err = node.LoadConfig(dir)
	require.NoError(t, err)
	require.Equal(t, []node.Caller{{PeerID: clientID.String(), Role: node.RoleAdmin, Name: "local-cli"}}, cfg.Callers)
}

func TestUsageErrors(t *testing.T) {
	dir := initDir(t)
	cases := []struct {
		name string
		args []string
		code int
		err  string
	}{
		{"no args", nil, 2, "Commands:"},
		{"unknown command", []string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{"bad init flag", []string{"init", "--data", t.TempDir(), "--nope"}, 2, "flag provided but not defined: -nope"},
		{"bad init topic", []string{"init", "--data", t.TempDir(), "--topic", "abc"}, 2, "config topic"},
		{"bad init discovery", []string{"init", "--data", t.TempDir(), "--discovery", "dht,smoke"}, 2, "config discovery.modes[1]"},
		{"bad workers flag", []string{"workers", "--data", dir, "--bogus"}, 2, "-bogus"},
		{"bad duration", []string{"status", "--data", dir, "--timeout", "soon"}, 2, "invalid value"},
		{"bad daemon flag", []string{"daemon", "--data", dir, "--nope"}, 2, "-nope"},
		{"allow non-peer", []string{"allow", "not-a-peer", "--data", dir, "--role", "read"}, 2, `"not-a-peer" is not a peer ID`},
		{"allow two peers", []string{"allow", "a", "b", "--data", dir}, 2, "allow PEER_ID"},
		{"no node running", []string{"workers", "--data", dir}, 1, "no node running"},
		{"no config", []string{"id", "--data", t.TempDir()}, 1, "ork-node init"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := run(t, tc.args...)
			require.Equal(t, tc.code, r.code, "%s", r)
			require.Contains(t, r.stderr, tc.err)
		})
	}
	// Usage for a mistake goes to stderr; stdout stays clean for pipes.
	r := run(t)
	require.Empty(t, r.stdout, "%s", r)
}

func TestHelp(t *testing.T) {
	for _, args := range [][]string{{"help"}, {"-h"}, {"--help"}} {
		r := run(t, args...)
		require.Equal(t, 0, r.code, "%v: %s", args, r)
		require.Contains(t, r.stdout, "Commands:")
		for _, c := range commands() {
			require.Contains(t, r.stdout, "  "+c.name+" ")
		}
	}
	// A command's own -h is not an error either.
	r := run(t, "init", "-h")
	require.Equal(t, 0, r.code, "%s", r)
	require.Contains(t, r.stderr, "-loopback-only")
}

func TestIDAndAllow(t *testing.T) {
	dir := initDir(t)
	nodeID := peerOfKeyFile(t, filepath.Join(dir, "identity.key"))
	cfg, err := node.LoadConfig(dir)
	require.NoError(t, err)

	r := run(t, "id", "--data", dir)
	require.Equal(t, 0, r.code, "%s", r)
	require.Contains(t, r.stdout, "peer ID: "+nodeID.String())
	require.Contains(t, r.stdout, cfg.Topic)
	require.Contains(t, r.stdout, "(not running)")

	r = run(t, "id", "--data", dir, "--json")
	require.Equal(t, 0, r.code, "%s", r)
	var id map[string]any
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &id), r.stdout)
	require.Equal(t, nodeID.String(), id["peerId"])
	require.Equal(t, false, id["running"])

	_, op := newPeerKey(t, t.TempDir(), "op.key")
	r = run(t, "allow", op.String(), "--data", dir, "--role", "operate", "--name", "gateway")
	require.Equal(t, 0, r.code, "%s", r)
	require.Contains(t, r.stdout, "allowed "+op.String()+" as operate")
	cfg, err = node.LoadConfig(dir)
	require.NoError(t, err)
	require.Len(t, cfg.Callers, 2)
	require.Equal(t, node.RoleOperate, cfg.RoleOf(op))
	st, err := os.Stat(filepath.Join(dir, node.ConfigFile))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), st.Mode().Perm(), "allow keeps config.json private")

	// Allowing again replaces the role rather than adding a duplicate.
	r = run(t, "allow", "--data", dir, op.String(), "--role", "read")
	require.Equal(t, 0, r.code, "%s", r)
	cfg, err = node.LoadConfig(dir)
	require.NoError(t, err)
	require.Len(t, cfg.Callers, 2)
	require.Equal(t, node.RoleRead, cfg.RoleOf(op))

	// A bad role is a usage error and changes nothing.
	r = run(t, "allow", op.String(), "--data", dir, "--role", "root")
	require.Equal(t, 2, r.code, "%s", r)
	require.Contains(t, r.stderr, "role")
	cfg, err = node.LoadConfig(dir)
	require.NoError(t, err)
	require.Equal(t, node.RoleRead, cfg.RoleOf(op))

	// Listing.
	r = run(t, "allow", "--data", dir)
	require.Equal(t, 0, r.code, "%s", r)
	require.Contains(t, r.stdout, op.String())
	require.Contains(t, r.stdout, "local-cli")
	r = run(t, "allow", "--data", dir, "--json")
	require.Equal(t, 0, r.code, "%s", r)
	var callers []node.Caller
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &callers), r.stdout)
	require.Len(t, callers, 2)

	// --remove removes it; the admin client stays.
	r = run(t, "allow", op.String(), "--data", dir, "--remove")
	require.Equal(t, 0, r.code, "%s", r)
	require.Contains(t, r.stdout, "removed "+op.String())
	cfg, err = node.LoadConfig(dir)
	require.NoError(t, err)
	require.Len(t, cfg.Callers, 1)
	require.Equal(t, "", cfg.RoleOf(op))
	require.Equal(t, node.RoleAdmin, cfg.Callers[0].Role)

	// Removing a peer that is not on the list says so, and changes nothing.
	before, err := os.ReadFile(filepath.Join(dir, node.ConfigFile))
	require.NoError(t, err)
	r = run(t, "allow", op.String(), "--data", dir, "--remove")
	require.Equal(t, 1, r.code, "%s", r)
	require.Contains(t, r.stderr, op.String()+" is not on the allowlist")
	require.NotContains(t, r.stdout, "removed")
	after, err := os.ReadFile(filepath.Join(dir, node.ConfigFile))
	require.NoError(t, err)
	require.Equal(t, string(before), string(after))
}

// startKernel runs a kernel in-process from an `init`ed data directory and
// writes the api file exactly as `daemon` does.
func startKernel(t *testing.T, dir string) *node.Node {
	t.Helper()
	cfg, err := node.LoadConfig(dir)
	require.NoError(t, err)
	cfg.Listen = []string{"/ip4/127.0.0.1/tcp/0"}
	cfg.LoopbackOnly = true
	cfg.Discovery.LookupIntervalMs = 200
	cfg.Cadences.HealthPingMs = 200
	cfg.Cadences.HealthTimeoutMs = 1000
	cfg.Registration.BackoffMinMs = 50
	cfg.Registration.BackoffMaxMs = 500
	n, err := node.New(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, n.Close()) })
	require.NoError(t, apifile.Write(dir, apifile.API{PeerID: n.ID().String(), Addrs: n.Addrs(), Topic: cfg.Topic, PID: os.Getpid()}))
	t.Cleanup(func() { _ = apifile.Remove(dir) })
	return n
}

func startWorker(t *testing.T, n *node.Node, id string) *worker.Worker {
	t.Helper()
	return startWorkerWith(t, n, id, nil)
}

// startWorkerWith starts a test Worker, its config changed by edit first.
func startWorkerWith(t *testing.T, n *node.Node, id string, edit func(*worker.Config)) *worker.Worker {
	t.Helper()
	topic, err := p2p.ParseTopic(n.Config().Topic)
	require.NoError(t, err)
	infos, err := p2p.ParseAddrInfos(n.Addrs()[:1])
	require.NoError(t, err)
	cfg := testutil.WorkerConfig(id, n.ID(), topic, infos)
	if edit != nil {
		edit(&cfg)
	}
	w, err := worker.New(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = w.Close() })
	require.Eventually(t, func() bool {
		v, ok := n.Registry().Worker(id)
		return ok && v.State == envelope.WorkerReady && n.Registry().Routable(id)
	}, 20*time.Second, 10*time.Millisecond, "worker %s never READY", id)
	return w
}

func TestClientCommandsEndToEnd(t *testing.T) {
	dir := initDir(t)
	n := startKernel(t, dir)
	w := startWorker(t, n, "w1")
	d := "--data=" + dir

	// id now sees the running node.
	r := run(t, "id", d)
	require.Equal(t, 0, r.code, "%s", r)
	require.NotContains(t, r.stdout, "(not running)")
	require.Contains(t, r.stdout, "address: "+n.Addrs()[0])

	// Registry.
	r = run(t, "workers", d)
	require.Equal(t, 0, r.code, "%s", r)
	require.Contains(t, r.stdout, "WORKER")
	require.Regexp(t, `(?m)^w1\s+READY\s+`, r.stdout)
	require.Contains(t, r.stdout, w.ID().String())
	require.Contains(t, r.stdout, "1 workers (READY 1)")

	r = run(t, "workers", d, "--json")
	require.Equal(t, 0, r.code, "%s", r)
	var ws []envelope.WorkerInfo
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &ws), r.stdout)
	require.Len(t, ws, 1)
	require.Equal(t, "w1", ws[0].WorkerID)
	require.Equal(t, envelope.WorkerReady, ws[0].State)
	require.ElementsMatch(t, []string{"w1-d1", "w1-d2"}, ws[0].DeviceIDs)

	r = run(t, "devices", d)
	require.Equal(t, 0, r.code, "%s", r)
	require.Regexp(t, `(?m)^w1-d1\s+w1\s+r1\s+`, r.stdout)
	require.Contains(t, r.stdout, "2 devices")

	r = run(t, "caps", "w1-d1", d)
	require.Equal(t, 0, r.code, "%s", r)
	var caps map[string]any
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &caps), r.stdout)
	require.Contains(t, r.stdout, "setPowerLimit")
	require.Contains(t, caps, "capabilities")

	r = run(t, "caps", d)
	require.Equal(t, 2, r.code, "%s", r)
	r = run(t, "caps", "nope", d)
	require.Equal(t, 1, r.code, "%s", r)
	require.Contains(t, r.stderr, envelope.CodeDeviceNotFound)

	// A command through the WAL, waited for.
	r = run(t, "send", d, "--device", "w1-d1", "setPowerLimit", "watts=3000", "--wait")
	require.Equal(t, 0, r.code, "%s", r)
	require.Contains(t, r.stdout, envelope.StateSuccess)
	cmdID := strings.Fields(r.stdout)[0]
	require.NotEmpty(t, cmdID)

	// Out of the contract's range: refused at admission.
	r = run(t, "send", d, "--device", "w1-d1", "setPowerLimit", "watts=9000")
	require.Equal(t, 1, r.code, "%s", r)
	require.Contains(t, r.stderr, envelope.CodeParamRange)
	r = run(t, "send", d, "--device", "w1-d1", "setPowerLimit", "watts")
	require.Equal(t, 2, r.code, "%s", r)
	require.Contains(t, r.stderr, "not k=v")
	r = run(t, "send", d, "--device", "w1-d1")
	require.Equal(t, 2, r.code, "%s", r)

	// Without --wait: the accepted ID, then status/wait on it.
	r = run(t, "send", d, "--device", "w1-d2", "setPowerLimit", "watts=100", "--json")
	require.Equal(t, 0, r.code, "%s", r)
	var acc envelope.CommandAccepted
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &acc), r.stdout)
	require.NotEmpty(t, acc.CommandID)
	r = run(t, "wait", acc.CommandID, d)
	require.Equal(t, 0, r.code, "%s", r)
	require.Contains(t, r.stdout, acc.CommandID+"  "+envelope.StateSuccess)

	r = run(t, "status", cmdID, d, "--json")
	require.Equal(t, 0, r.code, "%s", r)
	var st envelope.CommandStatus
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &st), r.stdout)
	require.Equal(t, cmdID, st.CommandID)
	require.Equal(t, envelope.StateSuccess, st.Status)
	require.Equal(t, "w1-d1", st.DeviceID)
	require.Equal(t, "setPowerLimit", st.Command)

	r = run(t, "wait", cmdID, d)
	require.Equal(t, 0, r.code, "%s", r)
	require.Contains(t, r.stdout, cmdID)
	require.Contains(t, r.stdout, envelope.StateSuccess)

	// Finished commands cannot be cancelled.
	r = run(t, "cancel", cmdID, d)
	require.Equal(t, 1, r.code, "%s", r)
	require.Contains(t, r.stderr, "not cancelled")
	r = run(t, "cancel", cmdID, d, "--json")
	require.Equal(t, 0, r.code, "%s", r)
	require.Contains(t, r.stdout, `"cancelled": false`)

	// Telemetry.
	r = run(t, "telemetry", d, "--device", "w1-d1")
	require.Equal(t, 0, r.code, "%s", r)
	var tel map[string]any
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &tel), r.stdout)
	require.Equal(t, "w1-d1", tel["deviceId"], r.stdout)
	r = run(t, "telemetry", d, "--device", "w1-d1", "--max-age", "0")
	require.Equal(t, 0, r.code, "%s", r)
	r = run(t, "telemetry", d, "--worker", "w1")
	require.Equal(t, 0, r.code, "%s", r)
	require.True(t, json.Valid([]byte(r.stdout)), r.stdout)
	r = run(t, "telemetry", d)
	require.Equal(t, 2, r.code, "%s", r)
	r = run(t, "telemetry", d, "--device", "w1-d1", "--worker", "w1")
	require.Equal(t, 2, r.code, "%s", r)

	// Kernel summary.
	r = run(t, "status", d)
	require.Equal(t, 0, r.code, "%s", r)
	require.Contains(t, r.stdout, "peer ID:  "+n.ID().String())
	require.Contains(t, r.stdout, "version:  "+node.Version)
	require.Contains(t, r.stdout, "READY 1")
	require.Contains(t, r.stdout, "devices:  2")
	r = run(t, "status", d, "--json")
	require.Equal(t, 0, r.code, "%s", r)
	var ks envelope.KernelStatus
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &ks), r.stdout)
	require.Equal(t, n.ID().String(), ks.PeerID)
	require.GreaterOrEqual(t, ks.Commands[envelope.StateSuccess], 2)

	// --api and --key reach the node without the data directory's files:
	// a read-only caller can list but not command, a stranger nothing.
	keys := t.TempDir()
	readKey, readID := newPeerKey(t, keys, "read.key")
	strangerKey, _ := newPeerKey(t, keys, "stranger.key")
	r = run(t, "allow", readID.String(), d, "--role", "read")
	require.Equal(t, 0, r.code, "%s", r)
	cfg, err := node.LoadConfig(dir)
	require.NoError(t, err)
	n.SetCallers(cfg.Callers) // what the daemon does on SIGHUP
	api := "--api=" + n.Addrs()[0]
	empty := "--data=" + t.TempDir()
	r = run(t, "workers", empty, api, "--key", readKey)
	require.Equal(t, 0, r.code, "%s", r)
	require.Contains(t, r.stdout, "w1")
	r = run(t, "send", empty, api, "--key", readKey, "--device", "w1-d1", "setPowerLimit", "watts=1")
	require.Equal(t, 1, r.code, "%s", r)
	require.Contains(t, r.stderr, envelope.CodeForbidden)
	r = run(t, "workers", empty, api, "--key", strangerKey)
	require.Equal(t, 1, r.code, "%s", r)
	require.Contains(t, r.stderr, envelope.CodeUnauthorized)

	// Admin evicts the Worker.
	r = run(t, "terminate", "w1", d, "--key", readKey, api)
	require.Equal(t, 1, r.code, "%s", r)
	require.Contains(t, r.stderr, envelope.CodeForbidden)
	r = run(t, "terminate", "w1", d)
	require.Equal(t, 0, r.code, "%s", r)
	require.Contains(t, r.stdout, "terminated w1")
	r = run(t, "terminate", d)
	require.Equal(t, 2, r.code, "%s", r)
}

// TestDaemonRunsAndStopsCleanly runs `daemon` in-process, talks to it through
// its api file and checks a clean stop removes that file.
func TestDaemonRunsAndStopsCleanly(t *testing.T) {
	// The daemon installs its own slog handler; put the test's back.
	prev := slog.Default()
	t.Cleanup(func() {
		slog.SetDefault(prev)
		log.SetOutput(os.Stderr)
		log.SetFlags(log.LstdFlags)
	})

	// A SIGHUP as soon as the daemon catches signals — before its node is
	// up — must neither kill it (SIGHUP's default action) nor be lost: the
	// reload runs once the node is ready. The test binary catches SIGHUP
	// too, so a regression fails this test rather than killing the run.
	safety := make(chan os.Signal, 8)
	signal.Notify(safety, syscall.SIGHUP)
	t.Cleanup(func() { signal.Stop(safety) })
	prevHook := signalsCaught
	signalsCaught = func() { _ = syscall.Kill(os.Getpid(), syscall.SIGHUP) }
	t.Cleanup(func() { signalsCaught = prevHook })

	dir := initDir(t)
	nodeID := peerOfKeyFile(t, filepath.Join(dir, "identity.key"))
	env, stdout, stderr := testEnv(map[string]string{"ORK_LOG_LEVEL": "info"})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan int, 1)
	go func() { done <- Main(ctx, []string{"daemon", "--data", dir}, env) }()

	// Bounded poll for the api file; fail at once if the daemon exits.
	deadline := time.After(30 * time.Second)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	var api apifile.API
	for ready := false; !ready; {
		select {
		case code := <-done:
			t.Fatalf("daemon exited early with %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
		case <-deadline:
			t.Fatalf("no api file after 30s\nstdout:\n%s\nstderr:\n%s", stdout, stderr)
		case <-tick.C:
			var err error
			if api, err = apifile.Read(dir); err == nil {
				ready = true
			}
		}
	}
	require.Equal(t, nodeID.String(), api.PeerID)
	require.Equal(t, os.Getpid(), api.PID)
	for _, a := range api.Addrs {
		require.Contains(t, a, "/ip4/127.0.0.1/", "loopback only")
		require.Contains(t, a, "/p2p/"+nodeID.String())
	}
	cfg, err := node.LoadConfig(dir)
	require.NoError(t, err)
	require.Equal(t, cfg.Topic, api.Topic)
	require.Eventually(t, func() bool { return strings.Contains(stderr.String(), "allowlist reloaded") }, 10*time.Second, 10*time.Millisecond,
		"the SIGHUP sent during startup was not acted on\nstderr:\n%s", stderr)

	r := run(t, "workers", "--data", dir)
	require.Equal(t, 0, r.code, "%s", r)
	require.Contains(t, r.stdout, "0 workers")
	r = run(t, "status", "--data", dir)
	require.Equal(t, 0, r.code, "%s", r)
	require.Contains(t, r.stdout, nodeID.String())

	cancel()
	select {
	case code := <-done:
		require.Equal(t, 0, code, "stdout:\n%s\nstderr:\n%s", stdout, stderr)
	case <-time.After(30 * time.Second):
		t.Fatalf("daemon did not stop within 30s\nstdout:\n%s\nstderr:\n%s", stdout, stderr)
	}
	_, err = os.Stat(apifile.Path(dir))
	require.True(t, os.IsNotExist(err), "api file left after a clean stop: %v", err)
	out := stdout.String()
	require.Contains(t, out, "peer ID: "+nodeID.String())
	require.Contains(t, out, "ready (api file "+apifile.Path(dir)+")")
	require.Contains(t, out, "shutting down")

	// The data directory restarts: same identity, and `id` says not running.
	r = run(t, "id", "--data", dir)
	require.Equal(t, 0, r.code, "%s", r)
	require.Contains(t, r.stdout, "(not running)")
}

// TestDaemonEnvOverrides: a bad ORK_* value stops the daemon before it
// starts anything, naming the variable or field.
func TestDaemonEnvOverrides(t *testing.T) {
	dir := initDir(t)
	for _, tc := range []struct {
		vars map[string]string
		want string
	}{
		{map[string]string{"ORK_LOOPBACK_ONLY": "maybe"}, "ORK_LOOPBACK_ONLY"},
		{map[string]string{"ORK_LOG_LEVEL": "chatty"}, "config logLevel"},
		{map[string]string{"ORK_TOPIC": hex.EncodeToString([]byte("short"))}, "config topic"},
	} {
		env, _, stderr := testEnv(tc.vars)
		code := Main(context.Background(), []string{"daemon", "--data", dir}, env)
		require.Equal(t, 1, code, "%v: %s", tc.vars, stderr)
		require.Contains(t, stderr.String(), tc.want)
		_, err := os.Stat(apifile.Path(dir))
		require.True(t, os.IsNotExist(err))
	}
}

// TestUsageCheckedBeforeDial: argument mistakes are exit 2 even with no node
// running (they used to be found only after dialing, so exit 1 "no node").
func TestUsageCheckedBeforeDial(t *testing.T) {
	dir := initDir(t) // no node running
	d := "--data=" + dir
	for _, args := range [][]string{
		{"workers", d, "extra"},
		{"devices", d, "extra"},
		{"caps", d},
		{"caps", d, "a", "b"},
		{"status", d, "a", "b"},
		{"send", d, "--device", "x"},
		{"send", d, "--device", "x", "setPowerLimit", "=3"},
		{"wait", d},
		{"cancel", d},
		{"terminate", d},
		{"telemetry", d},
		{"telemetry", d, "--device", "x", "--worker", "w"},
		{"telemetry", d, "--device", "x", "stray"},
	} {
		r := run(t, args...)
		require.Equal(t, 2, r.code, "%v: %s", args, r)
		require.NotContains(t, r.stderr, "no node running", "%v", args)
	}
	// Well-formed, it gets as far as dialing.
	r := run(t, "caps", d, "x")
	require.Equal(t, 1, r.code, "%s", r)
	require.Contains(t, r.stderr, "no node running")
}

func TestParseParams(t *testing.T) {
	p, err := parseParams([]string{"watts=3000", "on=true", "name=rig-7", "cfg={\"a\":1}", "list=[1,2]", "empty=", "mode=nan", "x=Inf", "y=-infinity", "big=1e999", "eq=a=b"})
	require.NoError(t, err)
	require.Equal(t, map[string]any{
		"watts": 3000.0, "on": true, "name": "rig-7", "cfg": map[string]any{"a": 1.0}, "list": []any{1.0, 2.0},
		"empty": "", "mode": "nan", "x": "Inf", "y": "-infinity", "big": "1e999", "eq": "a=b",
	}, p)
	// Whatever parses must encode: the request goes out as JSON.
	_, err = json.Marshal(p)
	require.NoError(t, err)

	for _, bad := range []string{"watts", "=3"} {
		_, err := parseParams([]string{bad})
		require.ErrorIs(t, err, ErrUsage, bad)
	}
}

// TestDaemonCloseNode: a failing Close is reported (exit 1), and a second
// signal while the node closes forces the exit at once.
func TestDaemonCloseNode(t *testing.T) {
	env, _, stderr := testEnv(nil)
	require.NoError(t, closeNode(env, make(chan os.Signal), func() error { return nil }))

	err := closeNode(env, make(chan os.Signal), func() error { return errors.New("store: disk full") })
	require.ErrorContains(t, err, "shutdown: store: disk full")

	var code atomic.Int32
	code.Store(-1)
	prev := forceExit
	forceExit = func(c int) { code.Store(int32(c)) }
	t.Cleanup(func() { forceExit = prev })
	release := make(chan struct{})
	defer close(release)
	term := make(chan os.Signal, 1)
	term <- os.Interrupt
	start := time.Now()
	err = closeNode(env, term, func() error { <-release; return nil }) // a Close stuck draining
	require.ErrorIs(t, err, errForced)
	require.Equal(t, int32(1), code.Load())
	require.Less(t, time.Since(start), 5*time.Second)
	require.Contains(t, stderr.String(), "forced exit")
}

// TestSendTargetFlags: each scope's target flag is checked before dialing
// (exit 2, naming the flag), not left to a round trip to the kernel.
func TestSendTargetFlags(t *testing.T) {
	dir := initDir(t) // no node running
	d := "--data=" + dir
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"send", d, "setPowerLimit", "watts=1"}, "--device is required"},
		{[]string{"send", d, "--scope", "device", "setPowerLimit"}, "--device is required"},
		{[]string{"send", d, "--scope", "worker", "reboot"}, "--scope worker needs --worker"},
		{[]string{"send", d, "--scope", "worker", "--device", "x", "reboot"}, "--scope worker needs --worker"},
		{[]string{"send", d, "--scope", "rack", "reboot"}, "--scope rack needs --rack"},
		{[]string{"send", d, "--scope", "zone", "--device", "x", "reboot"}, `--scope "zone"`},
	} {
		r := run(t, tc.args...)
		require.Equal(t, 2, r.code, "%v: %s", tc.args, r)
		require.Contains(t, r.stderr, tc.want, "%v", tc.args)
		require.NotContains(t, r.stderr, "no node running", "%v", tc.args)
	}
	// Well-formed, each gets as far as dialing.
	for _, args := range [][]string{
		{"send", d, "--device", "x", "reboot"},
		{"send", d, "--scope", "worker", "--worker", "w1", "reboot"},
		{"send", d, "--scope", "rack", "--rack", "r1", "reboot"},
		{"send", d, "--scope", "rack", "--worker", "w1", "reboot"},
	} {
		r := run(t, args...)
		require.Equal(t, 1, r.code, "%v: %s", args, r)
		require.Contains(t, r.stderr, "no node running", "%v", args)
	}
}

// TestMissingClientKey: a mistyped --key or --data names the missing key
// file instead of making a fresh key the node does not know.
func TestMissingClientKey(t *testing.T) {
	_, nodeID := newPeerKey(t, t.TempDir(), "node.key")
	api := "--api=/ip4/127.0.0.1/tcp/9/p2p/" + nodeID.String() // never dialed
	dir := initDir(t)
	typo := filepath.Join(dir, "clent.key")
	empty := t.TempDir()
	for _, tc := range []struct {
		args []string
		file string
	}{
		{[]string{"workers", "--data", dir, api, "--key", typo}, typo},
		{[]string{"status", "--data", empty, api}, filepath.Join(empty, ClientKeyFile)},
	} {
		r := run(t, tc.args...)
		require.Equal(t, 1, r.code, "%v: %s", tc.args, r)
		require.Contains(t, r.stderr, "key file "+tc.file, "%v", tc.args)
		require.Contains(t, r.stderr, "ork-node init", "%v", tc.args)
		require.NotContains(t, r.stderr, envelope.CodeUnauthorized)
		_, err := os.Stat(tc.file)
		require.True(t, os.IsNotExist(err), "no key made at %s", tc.file)
	}

	// The library: a missing KeyFile wraps fs.ErrNotExist unless CreateKey.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := client.Dial(ctx, client.Options{KeyFile: typo, Kernel: []string{strings.TrimPrefix(api, "--api=")}})
	require.ErrorIs(t, err, fs.ErrNotExist)
	_, err = client.Dial(ctx, client.Options{KeyFile: typo, CreateKey: true, Kernel: []string{"/ip4/127.0.0.1/tcp/9/p2p/" + nodeID.String(), "/ip4/127.0.0.1/tcp/9/p2p/" + peerOfKeyFile(t, filepath.Join(dir, "identity.key")).String()}})
	require.ErrorContains(t, err, "want 1")
	_ = peerOfKeyFile(t, typo) // CreateKey made it
}

// TestWaitTimesOut: a wait that ends before the command does says the
// command is still running (not that it "ended"), however short the wait.
func TestWaitTimesOut(t *testing.T) {
	dir := initDir(t)
	n := startKernel(t, dir)
	released := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(released) }) }
	startWorkerWith(t, n, "w1", func(c *worker.Config) {
		c.Commands["setPowerLimit"] = func(ctx context.Context, _ string, _ map[string]any) (any, error) {
			select {
			case <-released:
			case <-ctx.Done():
			}
			return map[string]any{"ok": true}, nil
		}
	})
	t.Cleanup(release) // runs before the Worker and kernel close
	d := "--data=" + dir

	r := run(t, "send", d, "--device", "w1-d1", "setPowerLimit", "watts=10", "--wait", "--wait-timeout", "300ms")
	require.Equal(t, 1, r.code, "%s", r)
	require.Regexp(t, `command \S+ is still [A-Z]+ after 300ms`, r.stderr)
	require.NotContains(t, r.stderr, "ended")
	id := strings.Fields(r.stdout)[0]

	// A wait shorter than a millisecond used to send TimeoutMs 0 (the
	// kernel's 60 s maximum) and give up after 5 s with a deadline error.
	start := time.Now()
	r = run(t, "wait", id, d, "--wait-timeout", "500us")
	require.Equal(t, 1, r.code, "%s", r)
	require.Less(t, time.Since(start), 4*time.Second, "%s", r)
	require.Contains(t, r.stderr, "command "+id+" is still ")
	require.Contains(t, r.stderr, "after 500µs")
	require.NotContains(t, r.stderr, "deadline")

	release()
	r = run(t, "wait", id, d)
	require.Equal(t, 0, r.code, "%s", r)
	require.Contains(t, r.stdout, id+"  "+envelope.StateSuccess)
}
