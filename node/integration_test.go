package node

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/internal/p2p"
	"github.com/orknode/ork/internal/testutil"
	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/worker"
)

func randomTopic(t *testing.T) []byte {
	t.Helper()
	b := make([]byte, 32)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return b
}

// testConfig is a loopback-only kernel config with fast cadences.
func testConfig(t *testing.T, topic []byte, bootstrap []string) Config {
	cfg := DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.Listen = []string{"/ip4/127.0.0.1/tcp/0"}
	cfg.LoopbackOnly = true
	cfg.Topic = hex.EncodeToString(topic)
	cfg.Bootstrap = bootstrap
	cfg.Discovery.LookupIntervalMs = 200
	cfg.Cadences.HealthPingMs = 200
	cfg.Cadences.HealthTimeoutMs = 1000
	cfg.Registration.BackoffMinMs = 50
	cfg.Registration.BackoffMaxMs = 500
	return cfg
}

// startBootstrap runs a plain server-mode DHT peer on loopback.
func startBootstrap(t *testing.T) []string {
	t.Helper()
	k, _, err := crypto.GenerateEd25519Key(rand.Reader)
	require.NoError(t, err)
	h, err := p2p.NewHost(p2p.HostConfig{Key: k, ListenAddrs: []string{"/ip4/127.0.0.1/tcp/0"}, LoopbackOnly: true})
	require.NoError(t, err)
	d, err := p2p.NewDHT(h, p2p.DHTConfig{Server: true})
	require.NoError(t, err)
	t.Cleanup(func() { _ = d.Close(); _ = h.Close() })
	return p2p.FullAddrs(h)
}

func startWorker(t *testing.T, id string, key crypto.PrivKey, kernel peer.ID, topic []byte, bootstrap []string) *worker.Worker {
	t.Helper()
	infos, err := p2p.ParseAddrInfos(bootstrap)
	require.NoError(t, err)
	cfg := testutil.WorkerConfig(id, kernel, topic, infos)
	cfg.Key = key
	w, err := worker.New(context.Background(), cfg)
	require.NoError(t, err)
	return w
}

// TestDiscoveryThroughBootstrapAndFindPeer: a kernel, a bootstrap peer and 10
// Workers that know only the bootstrap peer. The kernel finds all 10 through
// the topic; one Worker restarted on a new port with the same key is reached
// again through FindPeer.
func TestDiscoveryThroughBootstrapAndFindPeer(t *testing.T) {
	topic := randomTopic(t)
	boot := startBootstrap(t)
	n, err := New(context.Background(), testConfig(t, topic, boot))
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, n.Close()) })

	const fleet = 10
	keys := make([]crypto.PrivKey, fleet)
	workers := make([]*worker.Worker, fleet)
	for i := range fleet {
		keys[i], _, err = crypto.GenerateEd25519Key(rand.Reader)
		require.NoError(t, err)
		workers[i] = startWorker(t, fmt.Sprintf("w%02d", i), keys[i], n.ID(), topic, boot)
	}
	t.Cleanup(func() {
		for _, w := range workers {
			_ = w.Close()
		}
	})

	readyCount := func() int { return n.Registry().Counts()[envelope.WorkerReady] }
	require.Eventually(t, func() bool { return readyCount() == fleet }, 30*time.Second, 20*time.Millisecond,
		"workers READY: %d", readyCount())
	// None of them ever dialled the kernel: they were found through the topic.
	for _, w := range workers {
		v, ok := n.Registry().ByPeer(w.ID().String())
		require.True(t, ok)
		require.Equal(t, envelope.WorkerReady, v.State)
	}

	// Restart w00 on a new port with the same key, advertising nothing: the
	// only way back to it is its peer ID, through the DHT's FindPeer.
	old := workers[0]
	oldAddrs := old.Host().Addrs()
	require.NoError(t, old.Close())
	workers[0] = startWorker(t, "w00", keys[0], n.ID(), nil, boot)
	require.NotEqual(t, oldAddrs, workers[0].Host().Addrs())
	before := n.FindPeers()

	require.Eventually(t, func() bool {
		for _, c := range n.Host().Network().ConnsToPeer(workers[0].ID()) {
			for _, a := range workers[0].Host().Addrs() {
				if c.RemoteMultiaddr().Equal(a) && n.health.State("w00").State == envelope.HealthHealthy {
					return true
				}
			}
		}
		return false
	}, 30*time.Second, 20*time.Millisecond, "kernel did not reach the restarted worker at its new address")
	require.Greater(t, n.FindPeers(), before, "the new address came from FindPeer")
}
