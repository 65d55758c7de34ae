package node

import (
	"context"
	"crypto/rand"
	"fmt"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/client"
	"github.com/orknode/ork/protocols/envelope"
)

// kernelWithClient starts a kernel that allowlists one client key with role,
// plus a connected client.
func kernelWithClient(t *testing.T, role string) (*Node, *client.Client, []byte) {
	t.Helper()
	topic := randomTopic(t)
	ck, _, err := crypto.GenerateEd25519Key(rand.Reader)
	require.NoError(t, err)
	cid, _ := peer.IDFromPrivateKey(ck)
	cfg := testConfig(t, topic, nil)
	cfg.Callers = []Caller{{PeerID: cid.String(), Role: role}}
	n, err := New(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, n.Close()) })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, client.Options{Key: ck, Kernel: n.Addrs()[:1]})
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	return n, c, topic
}

func TestCommandEndToEnd(t *testing.T) {
	n, c, topic := kernelWithClient(t, RoleOperate)
	key, _, _ := crypto.GenerateEd25519Key(rand.Reader)
	w := startWorker(t, "w1", key, n.ID(), topic, n.Addrs()[:1])
	t.Cleanup(func() { _ = w.Close() })
	require.Eventually(t, func() bool { return n.reg.Routable("w1") }, 10*time.Second, 10*time.Millisecond)

	ctx := context.Background()
	acc, err := c.SendCommand(ctx, "w1-d1", envelope.CommandRequest{Command: "setPowerLimit", Params: map[string]any{"watts": 3000}})
	require.NoError(t, err)
	require.NotEmpty(t, acc.CommandID)
	st, err := c.WaitCommand(ctx, acc.CommandID, 10*time.Second)
	require.NoError(t, err)
	require.Equal(t, envelope.StateSuccess, st.Status, "%+v", st)

	// Kept and readable after it ended.
	st, err = c.CommandStatus(ctx, acc.CommandID)
	require.NoError(t, err)
	require.Equal(t, envelope.StateSuccess, st.Status)

	// Validation on the live path, with MDK strings.
	_, err = c.SendCommand(ctx, "w1-d1", envelope.CommandRequest{Command: "setPowerLimit", Params: map[string]any{"watts": 9000}})
	require.ErrorContains(t, err, "ERR_PARAM_RANGE: watts above max 5000")
	_, err = c.SendCommand(ctx, "nope", envelope.CommandRequest{Command: "setPowerLimit", Params: map[string]any{"watts": 1}})
	require.ErrorContains(t, err, "ERR_DEVICE_NOT_FOUND")

	// Worker scope fans out to every device.
	acc, err = c.SendCommand(ctx, "", envelope.CommandRequest{Command: "setPowerLimit", Scope: "worker", WorkerID: "w1", Params: map[string]any{"watts": 100}})
	require.NoError(t, err)
	require.Len(t, acc.Children, 2)
	st, err = c.WaitCommand(ctx, acc.CommandID, 10*time.Second)
	require.NoError(t, err)
	require.Equal(t, envelope.StateSuccess, st.Status, "%+v", st)

	// Telemetry through the kernel.
	tel, err := c.PullTelemetry(ctx, envelope.TelemetryPull{DeviceID: "w1-d1"})
	require.NoError(t, err)
	require.Equal(t, "w1-d1", tel["deviceId"], fmt.Sprint(tel))

	// Roles: operate cannot terminate.
	require.ErrorContains(t, c.Terminate(ctx, "w1"), "ERR_FORBIDDEN")
}

// TestSendAndWaitOneRoundTrip: command.request with waitMs answers when the
// command has ended, with its result, in the same exchange.
func TestSendAndWaitOneRoundTrip(t *testing.T) {
	n, c, topic := kernelWithClient(t, RoleOperate)
	key, _, _ := crypto.GenerateEd25519Key(rand.Reader)
	w := startWorker(t, "w1", key, n.ID(), topic, n.Addrs()[:1])
	t.Cleanup(func() { _ = w.Close() })
	require.Eventually(t, func() bool { return n.reg.Routable("w1") }, 10*time.Second, 10*time.Millisecond)

	acc, err := c.SendAndWait(context.Background(), "w1-d1", envelope.CommandRequest{Command: "setPowerLimit", Params: map[string]any{"watts": 100}}, 10*time.Second)
	require.NoError(t, err)
	require.Equal(t, envelope.StateSuccess, acc.Status, "%+v", acc)
	require.JSONEq(t, `{"ok":true}`, string(acc.Result))

	_, err = c.SendCommand(context.Background(), "w1-d1", envelope.CommandRequest{Command: "setPowerLimit", Params: map[string]any{"watts": 100}, WaitMs: -1})
	require.ErrorContains(t, err, "waitMs")
}
