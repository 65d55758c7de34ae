package node

import (
	"context"
	"crypto/rand"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/protocols"
)

// TestAllowWorkers: with discovery.allowWorkers set, only the listed Workers
// register; another Worker that finds the kernel the same way is ignored.
func TestAllowWorkers(t *testing.T) {
	good, _, _ := crypto.GenerateEd25519Key(rand.Reader)
	goodID, _ := peer.IDFromPrivateKey(good)
	other, _, _ := crypto.GenerateEd25519Key(rand.Reader)

	topic := randomTopic(t)
	cfg := testConfig(t, topic, nil)
	cfg.Discovery.AllowWorkers = []string{goodID.String()}
	n, err := New(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, n.Close()) })

	wo := startWorker(t, "intruder", other, n.ID(), topic, n.Addrs()[:1])
	t.Cleanup(func() { _ = wo.Close() })
	wg := startWorker(t, "listed", good, n.ID(), topic, n.Addrs()[:1])
	t.Cleanup(func() { _ = wg.Close() })

	// The kernel identified the intruder as a Worker (the event that
	// registers Workers) before the listed one became READY.
	require.Eventually(t, func() bool {
		ps, _ := n.Host().Peerstore().SupportsProtocols(wo.ID(), protocols.WorkerIdentity)
		return len(ps) > 0
	}, 10*time.Second, 10*time.Millisecond)
	require.Eventually(t, func() bool { return n.reg.Routable("listed") }, 10*time.Second, 10*time.Millisecond)
	_, ok := n.reg.Worker("intruder")
	require.False(t, ok)
	_, known := n.reg.ByPeer(wo.ID().String())
	require.False(t, known, "an unlisted peer leaves no registry entry")

	bad := cfg
	bad.Discovery.AllowWorkers = []string{"not-a-peer"}
	require.ErrorContains(t, bad.Validate(), "discovery.allowWorkers[0]")
}
