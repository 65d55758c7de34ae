//go:build interop

package interop

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/internal/p2p"
	"github.com/orknode/ork/internal/testutil"
	"github.com/orknode/ork/node"
	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/worker"
)

const (
	workerID = "js-w"
	deviceID = workerID + "-d1" // testutil.WorkerConfig's first device
	clientJS = "js/client.mjs"
)

// kernel is a running in-process kernel with one READY Worker and an
// allowlisted client key file (what `ork-node init` writes as DATA/client.key).
type kernel struct {
	n        *node.Node
	tcpAddr  string // the kernel's /ip4/127.0.0.1/tcp/…/p2p/… address
	keyFile  string
	clientID peer.ID
}

func startKernel(t *testing.T) kernel {
	t.Helper()
	topic := make([]byte, 32)
	_, err := rand.Read(topic)
	require.NoError(t, err)

	ck, _, err := crypto.GenerateEd25519Key(rand.Reader)
	require.NoError(t, err)
	cid, err := peer.IDFromPrivateKey(ck)
	require.NoError(t, err)
	keyFile := filepath.Join(t.TempDir(), "client.key")
	require.NoError(t, p2p.WriteKey(keyFile, ck)) // crypto.MarshalPrivateKey, as `ork-node init`

	cfg := node.DefaultConfig()
	cfg.DataDir = t.TempDir()
	// TCP and QUIC, as the default config: the JS client must pick TCP.
	cfg.Listen = []string{"/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"}
	cfg.LoopbackOnly = true
	cfg.Topic = hex.EncodeToString(topic)
	cfg.Discovery.LookupIntervalMs = 200
	cfg.Cadences.HealthPingMs = 200
	cfg.Cadences.HealthTimeoutMs = 1000
	cfg.Registration.BackoffMinMs = 50
	cfg.Registration.BackoffMaxMs = 500
	cfg.Callers = []node.Caller{{PeerID: cid.String(), Role: node.RoleOperate, Name: "js-client"}}
	n, err := node.New(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, n.Close()) })

	var tcpAddr string
	for _, a := range n.Addrs() {
		if strings.Contains(a, "/tcp/") && !strings.Contains(a, "/ws") {
			tcpAddr = a
		}
	}
	require.NotEmpty(t, tcpAddr, "kernel has no TCP address: %v", n.Addrs())
	require.Contains(t, tcpAddr, "/p2p/"+n.ID().String())

	boot, err := p2p.ParseAddrInfos(n.Addrs())
	require.NoError(t, err)
	w, err := worker.New(context.Background(), testutil.WorkerConfig(workerID, n.ID(), topic, boot))
	require.NoError(t, err)
	t.Cleanup(func() { _ = w.Close() })
	require.Eventually(t, func() bool { return n.Registry().Routable(workerID) }, 20*time.Second, 20*time.Millisecond,
		"the Worker did not become READY")

	return kernel{n: n, tcpAddr: tcpAddr, keyFile: keyFile, clientID: cid}
}

// output is what client.mjs printed.
type output struct {
	PeerID  string
	Replies []reply
	Stderr  string
}

type reply struct {
	Event       string             `json:"event"`
	PeerID      string             `json:"peerId"`
	Protocol    string             `json:"protocol"`
	Action      string             `json:"action"`
	HalfClose   bool               `json:"halfClose"`
	StreamClose string             `json:"streamClose"`
	Envelope    *envelope.Envelope `json:"envelope"`
}

// runClient runs `node js/client.mjs args…` and parses its JSON lines. It
// returns the exit error, nil on exit 0.
func runClient(t *testing.T, args ...string) (output, error) {
	t.Helper()
	if _, err := exec.LookPath("node"); err != nil {
		t.Fatal("node not found: install Node.js >= 20 and npm (apt-get install nodejs npm), then run make interop")
	}
	if _, err := os.Stat("js/node_modules/libp2p"); err != nil {
		t.Fatal("js/node_modules is missing: run `cd interop/js && npm ci` (make interop does)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", append([]string{clientJS}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	t.Logf("node %s: %v in %v\nstdout:\n%sstderr:\n%s", strings.Join(args, " "), err, time.Since(start).Round(time.Millisecond), stdout.String(), stderr.String())
	require.NoError(t, ctx.Err(), "the JS client did not finish within 60 s")

	out := output{Stderr: stderr.String()}
	sc := bufio.NewScanner(&stdout)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var r reply
		require.NoError(t, json.Unmarshal(sc.Bytes(), &r), "client output line %q", sc.Text())
		switch r.Event {
		case "identity":
			out.PeerID = r.PeerID
		case "reply":
			out.Replies = append(out.Replies, r)
		default:
			t.Fatalf("unknown client output %q", sc.Text())
		}
	}
	require.NoError(t, sc.Err())
	return out, err
}

// checkReplies asserts the worker.list and command.request replies.
func checkReplies(t *testing.T, k kernel, out output, halfClose bool) {
	t.Helper()
	require.Equal(t, k.clientID.String(), out.PeerID, "the JS client loaded the Go-written key")
	require.Len(t, out.Replies, 2)

	list := out.Replies[0]
	require.Equal(t, string(protocols.KernelRegistry), list.Protocol)
	require.Equal(t, halfClose, list.HalfClose)
	require.Equal(t, "clean", list.StreamClose, "the node closed the stream cleanly, no reset")
	require.NotNil(t, list.Envelope)
	require.Nil(t, list.Envelope.Error)
	require.Equal(t, envelope.TypeResponse, list.Envelope.Type)
	require.Equal(t, envelope.ProtocolVersion, list.Envelope.Version)
	require.Equal(t, "js-client", list.Envelope.Target)
	var wl envelope.WorkerList
	require.NoError(t, json.Unmarshal(list.Envelope.Payload, &wl))
	require.Len(t, wl.Workers, 1)
	require.Equal(t, workerID, wl.Workers[0].WorkerID)
	require.Equal(t, envelope.WorkerReady, wl.Workers[0].State)
	require.True(t, slices.Contains(wl.Workers[0].DeviceIDs, deviceID), "devices %v", wl.Workers[0].DeviceIDs)

	cmd := out.Replies[1]
	require.Equal(t, string(protocols.KernelCommand), cmd.Protocol)
	require.Equal(t, envelope.ActionCommandRequest, cmd.Action)
	require.Equal(t, "clean", cmd.StreamClose, "the node closed the stream cleanly, no reset")
	require.NotNil(t, cmd.Envelope)
	require.Nil(t, cmd.Envelope.Error)
	require.Equal(t, deviceID, cmd.Envelope.DeviceID)
	var acc envelope.CommandAccepted
	require.NoError(t, json.Unmarshal(cmd.Envelope.Payload, &acc))
	require.Equal(t, envelope.StateSuccess, acc.Status, "command reply %s", cmd.Envelope.Payload)
	require.NotEmpty(t, acc.CommandID)
	require.JSONEq(t, `{"ok":true}`, string(acc.Result))
}

// TestJSClient: one kernel, one Worker; a js-libp2p client (TCP + Noise +
// yamux, nothing else) lists the Workers and sends a command with waitMs.
func TestJSClient(t *testing.T) {
	k := startKernel(t)

	t.Run("request-reply", func(t *testing.T) {
		out, err := runClient(t, "--key", k.keyFile, k.tcpAddr, deviceID)
		require.NoError(t, err, "stderr: %s", out.Stderr)
		checkReplies(t, k, out, false)
	})

	// The caller closes its write side right after the request: the node
	// still answers, then closes the stream (DESIGN §3), not a reset.
	t.Run("half-close", func(t *testing.T) {
		out, err := runClient(t, "--half-close", "--key", k.keyFile, k.tcpAddr, deviceID)
		require.NoError(t, err, "stderr: %s", out.Stderr)
		checkReplies(t, k, out, true)
	})

	// A client the kernel has not allowlisted gets ERR_UNAUTHORIZED as an
	// error envelope, which client.mjs turns into exit 1.
	t.Run("not-allowlisted", func(t *testing.T) {
		out, err := runClient(t, k.tcpAddr, deviceID)
		var exit *exec.ExitError
		require.True(t, errors.As(err, &exit), "want exit 1, got %v", err)
		require.Equal(t, 1, exit.ExitCode())
		require.NotEqual(t, k.clientID.String(), out.PeerID)
		require.Len(t, out.Replies, 1)
		require.NotNil(t, out.Replies[0].Envelope.Error)
		require.Equal(t, envelope.CodeUnauthorized, out.Replies[0].Envelope.Error.Code)
		require.Contains(t, out.Stderr, envelope.CodeUnauthorized)
	})
}
