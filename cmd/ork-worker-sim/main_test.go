package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/orknode/ork/internal/apifile"
	"github.com/orknode/ork/internal/p2p"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func testPeer(t *testing.T) peer.ID {
	t.Helper()
	k, _, err := crypto.GenerateEd25519Key(nil)
	require.NoError(t, err)
	id, err := peer.IDFromPrivateKey(k)
	require.NoError(t, err)
	return id
}

func TestFlagErrors(t *testing.T) {
	kernel := testPeer(t).String()
	ok := []string{"--trust", kernel, "--addr-dir", t.TempDir()}
	cases := map[string][]string{
		"--workers 0":                 append([]string{"--workers", "0"}, ok...),
		"--devices -1":                append([]string{"--devices", "-1"}, ok...),
		"--racks 0":                   append([]string{"--racks", "0"}, ok...),
		"--time-scale 0":              append([]string{"--time-scale", "0"}, ok...),
		"--latency":                   append([]string{"--latency", "20ms-2ms"}, ok...),
		"--error-rate":                append([]string{"--error-rate", "1.5"}, ok...),
		"--hang-rate":                 append([]string{"--hang-rate", "-0.1"}, ok...),
		"--crash-every":               append([]string{"--crash-every", "-1s"}, ok...),
		`invalid value "soon"`:        append([]string{"--crash-every", "soon"}, ok...),
		"--listen":                    append([]string{"--listen", "localhost"}, ok...),
		"--log-level":                 append([]string{"--log-level", "loud"}, ok...),
		"--trust PEERID is required":  {"--addr-dir", "x"},
		`--trust "nope"`:              {"--trust", "nope", "--addr-dir", "x"},
		"so a kernel can find":        {"--trust", kernel},
		"--bootstrap":                 {"--trust", kernel, "--bootstrap", "/ip4/127.0.0.1/tcp/1"},
		"--topic needs --bootstrap":   {"--trust", kernel, "--addr-dir", "x", "--topic", strings.Repeat("ab", 32)},
		"--topic":                     {"--trust", kernel, "--bootstrap", "/ip4/127.0.0.1/tcp/1/p2p/" + kernel, "--topic", "abc"},
		"--join: no node running":     {"--join", t.TempDir()},
		"drop --bootstrap":            {"--join", t.TempDir(), "--bootstrap", "/ip4/127.0.0.1/tcp/1/p2p/" + kernel},
		`unexpected argument "extra"`: append(append([]string{}, ok...), "extra"),
		`--name-prefix "a b"`:         append([]string{"--name-prefix", "a b"}, ok...),
		`--name-prefix ""`:            append([]string{"--name-prefix", ""}, ok...),
	}
	for want, args := range cases {
		t.Run(want, func(t *testing.T) {
			var stderr bytes.Buffer
			code := run(context.Background(), args, io.Discard, &stderr)
			require.Equal(t, 2, code, stderr.String())
			require.Contains(t, stderr.String(), want)
		})
	}
	require.Zero(t, run(context.Background(), []string{"-h"}, io.Discard, io.Discard))
}

func TestFlagsFromJoin(t *testing.T) {
	dir := t.TempDir()
	kernel := testPeer(t)
	topic := p2p.TopicFromName("site")
	require.NoError(t, apifile.Write(dir, apifile.API{
		PeerID: kernel.String(), Addrs: []string{"/ip4/127.0.0.1/tcp/4001/p2p/" + kernel.String()}, Topic: hex.EncodeToString(topic),
	}))
	extra := testPeer(t)
	o, err := parseFlags([]string{"--join", dir, "--trust", extra.String(), "--workers", "3", "--latency", "2ms-20ms", "--flap"}, io.Discard)
	require.NoError(t, err)
	c := o.fleet
	require.Equal(t, []peer.ID{kernel, extra}, c.TrustedKernels)
	require.Equal(t, topic, c.Topic)
	require.Equal(t, kernel, c.Bootstrap[0].ID)
	require.Equal(t, filepath.Join(dir, "sim-keys"), c.KeysDir)
	require.True(t, c.LoopbackOnly)
	require.Equal(t, []string{"/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"}, c.ListenAddrs)
	require.Equal(t, 3, c.Workers)
	require.Equal(t, 20*time.Millisecond, c.Faults.Latency.Max)
	require.True(t, c.Faults.Flap)
	require.Empty(t, o.warnings)
	require.Equal(t, "sim", c.NamePrefix)
	require.Empty(t, c.StateDir, "results in memory by default")

	o, err = parseFlags([]string{"--join", dir, "--name-prefix", "east", "--state-dir", filepath.Join(dir, "state")}, io.Discard)
	require.NoError(t, err)
	require.Equal(t, "east", o.fleet.NamePrefix)
	require.Equal(t, filepath.Join(dir, "state"), o.fleet.StateDir)
}

// signalWriter closes up at its first write.
type signalWriter struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	up   chan struct{}
	once sync.Once
}

func (w *signalWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	defer w.once.Do(func() { close(w.up) })
	return w.buf.Write(p)
}

func (w *signalWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

func TestRunUntilCancelled(t *testing.T) {
	dir := t.TempDir()
	execLog := filepath.Join(dir, "exec.json")
	ctx, cancel := context.WithCancel(context.Background())
	out := &signalWriter{up: make(chan struct{})}
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"--workers", "2", "--devices", "2", "--trust", testPeer(t).String(),
			"--addr-dir", filepath.Join(dir, "addrs"), "--keys", filepath.Join(dir, "keys"), "--exec-log", execLog,
			"--log-level", "warn"}, out, io.Discard)
	}()
	select {
	case <-out.up:
	case code := <-done:
		t.Fatalf("exited early with %d: %s", code, out.String())
	}
	require.Contains(t, out.String(), "2 workers × 2 devices up in")
	infos, err := p2p.ReadAddrDir(filepath.Join(dir, "addrs"))
	require.NoError(t, err)
	require.Len(t, infos, 2)
	cancel()
	require.Zero(t, <-done)
	require.Contains(t, out.String(), "0 ids executed more than once")
	b, err := os.ReadFile(execLog)
	require.NoError(t, err)
	var ex map[string]int
	require.NoError(t, json.Unmarshal(b, &ex))
	require.Empty(t, ex)
	keys, err := os.ReadDir(filepath.Join(dir, "keys"))
	require.NoError(t, err)
	require.Len(t, keys, 2)
}
