package node

import (
	"context"
	"crypto/rand"
	"path/filepath"
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

// TestLocalDirectoryDiscovery: a Worker that only writes its address file
// into a shared directory is found by a kernel in local mode.
func TestLocalDirectoryDiscovery(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "workers")
	cfg := testConfig(t, randomTopic(t), nil)
	cfg.Discovery.Modes = []string{ModeLocal}
	cfg.Discovery.LocalDir = dir
	cfg.Discovery.LocalScanMs = 100
	n, err := New(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, n.Close()) })

	wc := testutil.WorkerConfig("loc", n.ID(), nil, nil)
	wc.AddrDir = dir
	w, err := worker.New(context.Background(), wc)
	require.NoError(t, err)
	t.Cleanup(func() { _ = w.Close() })
	require.Eventually(t, func() bool { return n.reg.Routable("loc") }, 10*time.Second, 10*time.Millisecond)
}

// TestWorkerPeersResolvedByFindPeer: discovery by public key without a
// topic: the kernel is told only a Worker's peer ID and reaches it through
// the DHT (the Worker knows only the bootstrap peer and advertises nothing).
func TestWorkerPeersResolvedByFindPeer(t *testing.T) {
	boot := startBootstrap(t)
	wk, _, err := crypto.GenerateEd25519Key(rand.Reader)
	require.NoError(t, err)
	wid, _ := peer.IDFromPrivateKey(wk)

	cfg := testConfig(t, randomTopic(t), boot)
	cfg.Discovery.Modes = []string{ModeStatic} // no topic lookups: FindPeer only
	cfg.Discovery.WorkerPeers = []string{wid.String()}
	n, err := New(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, n.Close()) })

	infos, err := p2p.ParseAddrInfos(boot)
	require.NoError(t, err)
	wc := testutil.WorkerConfig("byid", n.ID(), nil, infos)
	wc.Key = wk
	w, err := worker.New(context.Background(), wc)
	require.NoError(t, err)
	t.Cleanup(func() { _ = w.Close() })

	require.Eventually(t, func() bool { return n.reg.Routable("byid") }, 15*time.Second, 10*time.Millisecond,
		"not found by peer ID: %+v", n.reg.List())
	v, ok := n.reg.ByPeer(wid.String())
	require.True(t, ok)
	require.Equal(t, envelope.WorkerReady, v.State)
	require.Positive(t, n.FindPeers())
}
