package worker

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/internal/p2p"
	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/protocols/rpc"
)

// TestAdvertiseOnLoopback runs a real Worker on 127.0.0.1 against a
// server-mode DHT host standing in for the kernel: the kernel finds the
// Worker's provider record on the topic, reads its address file, calls it;
// the Worker redials when dropped, removes its file on Close and keeps its
// peer ID across a restart.
func TestAdvertiseOnLoopback(t *testing.T) {
	ctx := context.Background()
	kh, err := p2p.NewHost(p2p.HostConfig{Key: testKey(t), LoopbackOnly: true})
	require.NoError(t, err)
	defer kh.Close()
	kd, err := p2p.NewDHT(kh, p2p.DHTConfig{Server: true})
	require.NoError(t, err)
	defer kd.Close()

	dir := t.TempDir()
	topic := p2p.TopicFromName("worker-test")
	cfg := Config{
		WorkerID:       "w-dht",
		Contract:       fanContract(),
		Devices:        []Device{{DeviceID: "w-dht-a"}},
		KeyFile:        filepath.Join(dir, "w-dht.key"),
		LoopbackOnly:   true,
		TrustedKernels: []peer.ID{kh.ID()},
		Topic:          topic,
		Bootstrap:      []peer.AddrInfo{{ID: kh.ID(), Addrs: kh.Addrs()}},
		AddrDir:        filepath.Join(dir, "addrs"),
	}
	w, err := New(ctx, cfg)
	require.NoError(t, err)
	defer w.Close()
	st, err := os.Stat(cfg.KeyFile)
	require.NoError(t, err)
	require.Equal(t, fs.FileMode(0o600), st.Mode().Perm())

	key, err := p2p.TopicCID(topic)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		fctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		for ai := range kd.FindProvidersAsync(fctx, key, 1) {
			if ai.ID == w.ID() {
				return true
			}
		}
		return false
	}, 30*time.Second, 50*time.Millisecond, "the kernel finds the Worker on the topic")
	require.GreaterOrEqual(t, w.Provided(), int64(1))

	infos, err := p2p.ReadAddrDir(cfg.AddrDir)
	require.NoError(t, err)
	require.Len(t, infos, 1)
	require.Equal(t, w.ID(), infos[0].ID)
	require.NotEmpty(t, infos[0].Addrs)

	c := rpc.NewClient(kh, rpc.ClientOptions{Sender: "kernel"})
	defer c.Close()
	var pong envelope.HealthPong
	require.NoError(t, c.Request(ctx, w.ID(), protocols.WorkerPing, envelope.ActionHealthPing, "", nil, &pong))
	require.Equal(t, "OK", pong.Status)

	// Dropped by the kernel, the Worker dials back.
	c.DropPeer(w.ID())
	require.NoError(t, kh.Network().ClosePeer(w.ID()))
	require.Eventually(t, func() bool {
		return kh.Network().Connectedness(w.ID()) == network.Connected
	}, 15*time.Second, 20*time.Millisecond, "the Worker reconnects to its bootstrap peer")

	id := w.ID()
	require.NoError(t, w.Close())
	_, err = os.Stat(filepath.Join(cfg.AddrDir, "w-dht.addr"))
	require.ErrorIs(t, err, fs.ErrNotExist, "Close removes the address file")

	w2, err := New(ctx, cfg)
	require.NoError(t, err)
	defer w2.Close()
	require.Equal(t, id, w2.ID(), "the key file keeps the peer ID")
	require.NoError(t, w2.Close())
}
