package node

import (
	"context"
	"crypto/rand"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/stretchr/testify/require"
)

// TestTerminateIsIdempotent: terminating a Worker twice, or one never seen,
// answers TERMINATED both times (the second used to be ERR_INTERNAL).
func TestTerminateIsIdempotent(t *testing.T) {
	n, c, topic := kernelWithClient(t, RoleAdmin)
	key, _, _ := crypto.GenerateEd25519Key(rand.Reader)
	w := startWorker(t, "t1", key, n.ID(), topic, n.Addrs()[:1])
	t.Cleanup(func() { _ = w.Close() })
	require.Eventually(t, func() bool { return n.reg.Routable("t1") }, 10*time.Second, 10*time.Millisecond)
	ctx := context.Background()
	require.NoError(t, c.Terminate(ctx, "t1"))
	require.NoError(t, c.Terminate(ctx, "t1"))
	require.NoError(t, c.Terminate(ctx, "never-seen"))
}
