package sim

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"path/filepath"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/orknode/ork/internal/apifile"
	"github.com/orknode/ork/internal/p2p"
	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/protocols/rpc"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func kernelHost(t *testing.T) host.Host {
	t.Helper()
	k, _, err := crypto.GenerateEd25519Key(nil)
	require.NoError(t, err)
	h, err := p2p.NewHost(p2p.HostConfig{Key: k, LoopbackOnly: true})
	require.NoError(t, err)
	t.Cleanup(func() { _ = h.Close() })
	return h
}

// connectDir dials every Worker listed in the address directory.
func connectDir(t *testing.T, h host.Host, dir string, want int) {
	t.Helper()
	require.Eventually(t, func() bool {
		infos, _ := p2p.ReadAddrDir(dir)
		if len(infos) < want {
			return false
		}
		for _, ai := range infos {
			h.Peerstore().ClearAddrs(ai.ID)
			if h.Connect(context.Background(), ai) != nil {
				return false
			}
		}
		return true
	}, 10*time.Second, 20*time.Millisecond)
}

// TestFleetOnLoopback runs two simulated Workers on 127.0.0.1, advertised in
// an address directory, and drives them as a kernel would: identity,
// telemetry, a command and its resend, a crash with the same key, the resend
// again — the command ran once.
func TestFleetOnLoopback(t *testing.T) {
	kh := kernelHost(t)
	dir := t.TempDir()
	addrDir := filepath.Join(dir, "addrs")
	ctx := context.Background()
	f, err := StartFleet(ctx, FleetConfig{
		Workers: 2, Devices: 2, Racks: 2, Seed: 7, TimeScale: 0.001,
		KeysDir: filepath.Join(dir, "keys"), LoopbackOnly: true,
		TrustedKernels: []peer.ID{kh.ID()}, AddrDir: addrDir,
		Faults: Faults{Latency: Latency{time.Millisecond, 2 * time.Millisecond}},
	})
	require.NoError(t, err)
	defer f.Close()
	ids := f.PeerIDs()
	require.Len(t, ids, 2)
	connectDir(t, kh, addrDir, 2)

	c := rpc.NewClient(kh, rpc.ClientOptions{Sender: "kernel"})
	defer c.Close()
	call := func(p peer.ID, proto protocol.ID, action, dev string, payload, out any) error {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		return c.Request(cctx, p, proto, action, dev, payload, out)
	}

	var id envelope.IdentityResponse
	require.NoError(t, call(ids[1], protocols.WorkerIdentity, envelope.ActionIdentityRequest, "", nil, &id))
	require.Equal(t, "sim-0002", id.WorkerID)
	require.Equal(t, "miner", id.DeviceFamily)
	require.Len(t, id.Devices, 2)
	require.Equal(t, "sim-0002-d01", id.Devices[0].DeviceID)
	require.Equal(t, "rack-02", id.Devices[0].Rack)
	require.NotEmpty(t, id.Devices[0].Model)

	var batch envelope.TelemetryBatch
	require.NoError(t, call(ids[0], protocols.WorkerTelemetry, envelope.ActionTelemetryPull, "", nil, &batch))
	require.Len(t, batch.Devices, 2)
	for _, d := range batch.Devices {
		require.Empty(t, d.Error)
		var m map[string]any
		require.NoError(t, json.Unmarshal(d.Metrics, &m))
		require.Greater(t, m["hashrate"].(float64), 50.0)
	}

	cmd := envelope.CommandRequest{CommandID: "cmd-1", Command: "setPowerMode", Params: map[string]any{"mode": "low"}}
	var res envelope.CommandResult
	require.NoError(t, call(ids[0], protocols.WorkerCommand, envelope.ActionCommandRequest, "sim-0001-d01", cmd, &res))
	require.Equal(t, envelope.StateSuccess, res.Status, res.Error)
	var body map[string]any
	require.NoError(t, json.Unmarshal(res.Result, &body))
	require.Equal(t, "low", body["mode"])
	require.Equal(t, "low", f.Miner("sim-0001-d01").Metrics()["powerMode"])

	// Contract validation runs in the Worker.
	bad := envelope.CommandRequest{CommandID: "cmd-2", Command: "setPowerLimit", Params: map[string]any{"watts": 100}}
	var badRes envelope.CommandResult
	require.NoError(t, call(ids[0], protocols.WorkerCommand, envelope.ActionCommandRequest, "sim-0001-d01", bad, &badRes))
	require.Equal(t, "ERR_PARAM_RANGE: watts below min 1000", badRes.Error)

	// Crash: same key, same peer ID, and the result cache survives, so a
	// resend after the restart does not run the command again.
	c.DropPeer(ids[0])
	require.NoError(t, f.Restart(ctx, 0, 0))
	require.Equal(t, ids, f.PeerIDs())
	require.Equal(t, ids[0], f.Worker(0).ID())
	require.Equal(t, 1, f.Restarts())
	connectDir(t, kh, addrDir, 2)
	var again envelope.CommandResult
	require.NoError(t, call(ids[0], protocols.WorkerCommand, envelope.ActionCommandRequest, "sim-0001-d01", cmd, &again))
	require.Equal(t, res, again)

	sum := f.Summary()
	require.Equal(t, 1, sum.Commands)
	require.Equal(t, 1, sum.MaxExecutions)
	require.Empty(t, sum.Duplicates)
	require.Equal(t, map[string]int{"cmd-1": 1}, f.Executions())
	require.Contains(t, sum.String(), "max 1 per id, 0 ids executed more than once")

	require.NoError(t, f.Close())
	require.NoError(t, f.Close())

	// A new fleet with the same keys directory has the same peer IDs.
	f2, err := StartFleet(ctx, FleetConfig{Workers: 2, Devices: 1, KeysDir: filepath.Join(dir, "keys"),
		LoopbackOnly: true, TrustedKernels: []peer.ID{kh.ID()}})
	require.NoError(t, err)
	require.Equal(t, ids, f2.PeerIDs())
	require.NoError(t, f2.Close())
}

func TestFleetCrashLoop(t *testing.T) {
	kh := kernelHost(t)
	f, err := StartFleet(context.Background(), FleetConfig{
		Workers: 1, Devices: 1, TimeScale: 0.001, LoopbackOnly: true, TrustedKernels: []peer.ID{kh.ID()},
		Faults: Faults{CrashEvery: 20 * time.Millisecond, Flap: true},
	})
	require.NoError(t, err)
	require.Eventually(t, func() bool { return f.Restarts() >= 3 }, 10*time.Second, 10*time.Millisecond)
	require.NoError(t, f.Close())
}

func TestFleetConfigErrors(t *testing.T) {
	_, err := StartFleet(context.Background(), FleetConfig{Workers: 0, Devices: 0, TimeScale: -1,
		Faults: Faults{ErrorRate: 2}})
	require.Error(t, err)
	for _, want := range []string{"workers", "devices", "time scale", "error rate", "trusted kernels"} {
		require.ErrorContains(t, err, want)
	}
}

func TestReadJoin(t *testing.T) {
	dir := t.TempDir()
	_, err := ReadJoin(dir)
	require.ErrorContains(t, err, "no node running")
	k, _, err := crypto.GenerateEd25519Key(nil)
	require.NoError(t, err)
	pid, err := peer.IDFromPrivateKey(k)
	require.NoError(t, err)
	topic := p2p.TopicFromName("site")
	require.NoError(t, apifile.Write(dir, apifile.API{
		PeerID: pid.String(),
		Addrs:  []string{"/ip4/127.0.0.1/tcp/4001/p2p/" + pid.String()},
		Topic:  hex.EncodeToString(topic),
	}))
	j, err := ReadJoin(dir)
	require.NoError(t, err)
	require.Equal(t, pid, j.Kernel)
	require.Equal(t, topic, j.Topic)
	require.Len(t, j.Bootstrap, 1)
	require.Equal(t, pid, j.Bootstrap[0].ID)
}
