package sim

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/protocols/rpc"
	"github.com/orknode/ork/worker"
)

// TestFleetNamePrefixAndStateDir: Workers are named after NamePrefix, and
// with a StateDir a whole new fleet (a new process) on the same directories
// answers a resend from the journal without running the command again.
func TestFleetNamePrefixAndStateDir(t *testing.T) {
	kh := kernelHost(t)
	dir := t.TempDir()
	addrDir := filepath.Join(dir, "addrs")
	ctx := context.Background()
	cfg := FleetConfig{
		Workers: 1, Devices: 1, Seed: 3, TimeScale: 0.001, NamePrefix: "east",
		KeysDir: filepath.Join(dir, "keys"), StateDir: filepath.Join(dir, "state"), LoopbackOnly: true,
		TrustedKernels: []peer.ID{kh.ID()}, AddrDir: addrDir,
	}
	f, err := StartFleet(ctx, cfg)
	require.NoError(t, err)
	defer f.Close()
	require.Equal(t, "east-0001", f.Worker(0).WorkerID())
	connectDir(t, kh, addrDir, 1)

	c := rpc.NewClient(kh, rpc.ClientOptions{Sender: "kernel"})
	defer c.Close()
	send := func(p peer.ID) envelope.CommandResult {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		var res envelope.CommandResult
		require.NoError(t, c.Request(cctx, p, protocols.WorkerCommand, envelope.ActionCommandRequest, "east-0001-d01",
			envelope.CommandRequest{CommandID: "east-cmd-1", Command: "setLed", Params: map[string]any{"on": true}}, &res))
		return res
	}
	id := f.PeerIDs()[0]
	res := send(id)
	require.Equal(t, envelope.StateSuccess, res.Status, res.Error)
	require.NoError(t, f.Close())
	_, err = os.Stat(filepath.Join(dir, "state", "east-0001", worker.JournalFile))
	require.NoError(t, err)

	c.DropPeer(id)
	f2, err := StartFleet(ctx, cfg)
	require.NoError(t, err)
	defer f2.Close()
	require.Equal(t, []peer.ID{id}, f2.PeerIDs())
	connectDir(t, kh, addrDir, 1)
	require.Equal(t, res, send(id))
	require.Empty(t, f2.Executions(), "the resend ran nothing")
	require.NoError(t, f2.Close())

	cfg.NamePrefix = "no spaces"
	_, err = StartFleet(ctx, cfg)
	require.ErrorContains(t, err, "name prefix")
}
