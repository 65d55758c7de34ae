package registry

import (
	"context"
	"fmt"
	"github.com/orknode/ork/modules/internal/memkv"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/protocols/envelope"
)

// checkInvariants asserts the structural invariants of the maps.
func checkInvariants(t *testing.T, r *Registry) {
	t.Helper()
	r.mu.RLock()
	defer r.mu.RUnlock()
	for id, d := range r.devices {
		w := r.byWorker[d.workerID]
		require.NotNil(t, w, "device %s owned by unknown %s", id, d.workerID)
		require.NotEqual(t, Terminated, w.state, "device %s owned by terminated %s", id, d.workerID)
		require.True(t, slices.ContainsFunc(w.devices, func(x envelope.DeviceInfo) bool { return x.DeviceID == id }),
			"device %s not in %s's list", id, d.workerID)
	}
	for peer, w := range r.byPeer {
		require.Equal(t, peer, w.peerID)
		require.Contains(t, States, w.state)
		require.NotEqual(t, Unregistered, w.state)
		require.Equal(t, w.state == Ready, w.contract != nil, "%s: READY ⇔ contract", peer)
		if w.workerID != "" {
			require.Same(t, w, r.byWorker[w.workerID])
		} else {
			require.Equal(t, Discovered, w.state)
		}
	}
	for id, w := range r.byWorker {
		require.Equal(t, id, w.workerID)
		require.Same(t, w, r.byPeer[w.peerID])
		for _, d := range w.devices {
			require.Equal(t, id, r.devices[d.DeviceID].workerID, "%s lists %s it does not own", id, d.DeviceID)
		}
	}
}

// TestRandomEvents feeds random event sequences over a few peers, workerIds and devices, and checks the
// invariants and the legality of every change after each event. Even seeds run on a perfect disk and then
// check that a fresh Registry loaded from what was persisted matches memory (READY Workers READY, the other
// identified ones DISCOVERED, same device owners); odd seeds make the disk fail now and then, where a failed
// step may leave disk and memory apart (the KV has no transactions), so only the invariants are checked.
func TestRandomEvents(t *testing.T) {
	ctx := context.Background()
	peers := []string{"p0", "p1", "p2", "p3"}
	workers := []string{"w0", "w1", "w2"}
	for seed := range uint64(60) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 7))
			faulty := seed%2 == 1
			f := newFixture(t)
			for range 300 {
				peer := peers[rng.IntN(len(peers))]
				switch rng.IntN(6) {
				case 0:
					_, _ = f.r.Discovered(peer)
				case 1:
					var devs []envelope.DeviceInfo
					for d := range 6 {
						if rng.IntN(3) == 0 {
							devs = append(devs, devInRack(fmt.Sprintf("d%d", d), fmt.Sprintf("r%d", d%2)))
						}
					}
					_, _ = f.r.IdentitySaved(ctx, peer, identity(workers[rng.IntN(len(workers))], devs...))
				case 2:
					c := validContract()
					if rng.IntN(5) == 0 {
						c = nil
					}
					_, _ = f.r.Ready(ctx, peer, c)
				case 3:
					_, _ = f.r.Failed(ctx, peer, "x")
				case 4:
					_, _ = f.r.Terminate(ctx, workers[rng.IntN(len(workers))])
				case 5:
					f.kv.SetFail(nil)
					if faulty && rng.IntN(2) == 0 {
						f.kv.SetFail(memkv.Always(errDisk))
					}
				}
				checkInvariants(t, f.r)
				for _, c := range f.takeChanges() {
					require.True(t, CanTransition(c.From, c.To), "%+v", c)
				}
			}
			f.kv.SetFail(nil)

			r2 := New(Options{KV: f.kv})
			_, err := r2.Load(ctx)
			if faulty {
				checkInvariants(t, r2)
				return
			}
			require.NoError(t, err)
			checkInvariants(t, r2)
			for _, v := range f.r.List() {
				got, ok := r2.Worker(v.WorkerID)
				switch {
				case v.WorkerID == "":
					_, ok := r2.ByPeer(v.PeerID)
					require.False(t, ok, "%+v should not be persisted", v)
				case v.State == Terminated:
					require.False(t, ok, "%+v should not be persisted", v)
				case v.State == Ready:
					require.True(t, ok)
					require.Equal(t, Ready, got.State)
					require.Equal(t, v.PeerID, got.PeerID)
					require.Equal(t, f.r.DevicesOf(v.WorkerID), got.Devices)
				default:
					require.True(t, ok, "%+v", v)
					require.Equal(t, Discovered, got.State)
					require.Equal(t, v.PeerID, got.PeerID)
				}
			}
			require.Equal(t, f.r.Devices(), r2.Devices())
		})
	}
}
