package node

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/client"
	"github.com/orknode/ork/internal/p2p"
	"github.com/orknode/ork/internal/testutil"
	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/worker"
)

// TestPrivateNetworkSite: a kernel with a private-network key registers a
// Worker that has the key; a caller without the key cannot even connect.
func TestPrivateNetworkSite(t *testing.T) {
	psk := make([]byte, 32)
	_, _ = rand.Read(psk)
	topic := randomTopic(t)
	ck, _, _ := crypto.GenerateEd25519Key(rand.Reader)
	cid, _ := peer.IDFromPrivateKey(ck)
	cfg := testConfig(t, topic, nil)
	cfg.Callers = []Caller{{PeerID: cid.String(), Role: RoleRead}}
	cfg.PrivateNetworkKeyFile = "swarm.key"
	require.NoError(t, os.WriteFile(filepath.Join(cfg.DataDir, "swarm.key"),
		[]byte("/key/swarm/psk/1.0.0/\n/base16/\n"+hex.EncodeToString(psk)+"\n"), 0o600))
	n, err := New(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, n.Close()) })

	wk, _, _ := crypto.GenerateEd25519Key(rand.Reader)
	boot, err := p2p.ParseAddrInfos(n.Addrs()[:1])
	require.NoError(t, err)
	w, err := worker.New(context.Background(), worker.Config{
		WorkerID: "psk-w", Contract: testutil.Contract(), Key: wk, LoopbackOnly: true, PSK: psk,
		ListenAddrs: []string{"/ip4/127.0.0.1/tcp/0"}, TrustedKernels: []peer.ID{n.ID()}, Bootstrap: boot,
		Devices: []worker.Device{{DeviceID: "psk-d"}},
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = w.Close() })
	require.Eventually(t, func() bool { return n.reg.Routable("psk-w") }, 10*time.Second, 10*time.Millisecond)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, client.Options{Key: ck, Kernel: n.Addrs()[:1], PSK: psk})
	require.NoError(t, err)
	defer c.Close()
	ws, err := c.ListWorkers(ctx)
	require.NoError(t, err)
	require.Len(t, ws, 1)
	require.Equal(t, envelope.WorkerReady, ws[0].State)

	_, err = client.Dial(ctx, client.Options{Key: ck, Kernel: n.Addrs()[:1]})
	require.Error(t, err, "no key, no connection")
}
