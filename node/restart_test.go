package node

import (
	"context"
	"crypto/rand"
	"fmt"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/worker"
)

// TestRestartOnNewPortReachesWorkers: a kernel restarted from its data
// directory on a new port reaches its Workers again by itself (pull-only):
// the registry, contracts and Worker addresses come back from the store, and
// every Worker answers a fresh ping without re-registration.
func TestRestartOnNewPortReachesWorkers(t *testing.T) {
	topic := randomTopic(t)
	cfg := testConfig(t, topic, nil)
	n, err := New(context.Background(), cfg)
	require.NoError(t, err)

	const fleet = 3
	var ws []*worker.Worker
	for i := range fleet {
		k, _, err := crypto.GenerateEd25519Key(rand.Reader)
		require.NoError(t, err)
		ws = append(ws, startWorker(t, fmt.Sprintf("r%d", i), k, n.ID(), topic, n.Addrs()[:1]))
	}
	t.Cleanup(func() {
		for _, w := range ws {
			_ = w.Close()
		}
	})
	require.Eventually(t, func() bool { return n.Registry().Counts()[envelope.WorkerReady] == fleet }, 20*time.Second, 10*time.Millisecond)
	oldAddrs := n.Addrs()
	require.NoError(t, n.Close())

	restart := time.Now()
	n2, err := New(context.Background(), cfg) // same data dir, listen port 0: a new port
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, n2.Close()) })
	require.NotEqual(t, oldAddrs, n2.Addrs())
	// Reloaded READY straight from the store: no re-registration churn.
	require.Equal(t, fleet, n2.Registry().Counts()[envelope.WorkerReady])

	require.Eventually(t, func() bool {
		for _, w := range n2.Registry().List() {
			if w.HealthState != envelope.HealthHealthy || w.LastSeen < restart.UnixMilli() {
				return false
			}
		}
		return true
	}, 20*time.Second, 10*time.Millisecond, "workers not reached after restart: %+v\njobs: %+v\nhealth r0: %+v\nrpc: %+v\nconns: %d",
		n2.Registry().List(), n2.sched.Stats(), n2.health.State("r0"), n2.client.Stats(), len(n2.Host().Network().Conns()))
}
