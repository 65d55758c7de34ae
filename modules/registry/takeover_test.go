package registry

import (
	"context"
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/protocols/envelope"
)

// TestNewPeerCannotTakeLiveWorkerID: a workerId stays with its peer. Another peer answering the same workerId
// (anyone can make a key and claim any workerId) is refused with ERR_WORKER_ID_TAKEN while the owner is alive
// — whatever its state or health short of TERMINATED/DEAD — and the owner keeps its entry, devices and record.
func TestNewPeerCannotTakeLiveWorkerID(t *testing.T) {
	for _, tc := range []struct {
		state, health string
	}{
		{Ready, ""}, {Ready, envelope.HealthHealthy}, {Ready, envelope.HealthSick},
		{IdentitySaved, envelope.HealthUnknown}, {Discovered, envelope.HealthSick},
	} {
		t.Run(tc.state+"/"+tc.health, func(t *testing.T) {
			ctx := context.Background()
			f := newFixture(t)
			if tc.state == Discovered {
				f.discoveredWithID(t)
			} else {
				f.reach(t, tc.state)
			}
			if tc.health != "" {
				f.r.SetHealth(worker1, tc.health)
			}
			before, _ := f.r.Worker(worker1)
			rawBefore, _ := f.kv.Get(NSRegistry, worker1)

			_, err := f.r.Discovered("peer-evil")
			require.NoError(t, err)
			f.takeChanges()
			c, err := f.r.IdentitySaved(ctx, "peer-evil", identity(worker1, dev("dev-1"), dev("dev-9")))
			require.ErrorIs(t, err, ErrWorkerIDTaken)
			var te *WorkerIDTakenError
			require.ErrorAs(t, err, &te)
			assert.Equal(t, &WorkerIDTakenError{WorkerID: worker1, PeerID: "peer-evil", Owner: peer1}, te)
			assert.Equal(t, CodeWorkerIDTaken, envelope.CodeOf(err))
			assert.EqualError(t, err, "ERR_WORKER_ID_TAKEN: worker-1 belongs to peer-1")

			// A failed step: the claimant is DISCOVERED with the reason, without a workerId.
			assert.Equal(t, Change{PeerID: "peer-evil", From: Discovered, To: Discovered, Error: err.Error()}, c)
			assert.Equal(t, []Change{c}, f.takeChanges())
			v, ok := f.r.ByPeer("peer-evil")
			require.True(t, ok)
			assert.Empty(t, v.WorkerID)
			assert.Equal(t, err.Error(), v.LastError)

			// The owner is untouched.
			after, ok := f.r.Worker(worker1)
			require.True(t, ok)
			assert.Equal(t, before, after)
			assert.Equal(t, peer1, after.PeerID)
			w, p, ok := f.r.ResolveDevice("dev-1")
			require.True(t, ok)
			assert.Equal(t, [2]string{worker1, peer1}, [2]string{w, p})
			assert.Equal(t, "", owner(f.r, "dev-9"))
			rawAfter, _ := f.kv.Get(NSRegistry, worker1)
			assert.Equal(t, rawBefore, rawAfter)
		})
	}
}

// TestNewPeerTakesTerminatedWorkerID: a terminated Worker's workerId is free for a new peer.
func TestNewPeerTakesTerminatedWorkerID(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	f.reach(t, Terminated)
	_, err := f.r.Discovered("peer-2")
	require.NoError(t, err)
	c, err := f.r.IdentitySaved(ctx, "peer-2", identity(worker1, dev("dev-1")))
	require.NoError(t, err)
	assert.Equal(t, IdentitySaved, c.To)
	assert.Equal(t, peer1, c.ReplacedPeer)
	w, p, ok := f.r.ResolveDevice("dev-1")
	require.True(t, ok)
	assert.Equal(t, [2]string{worker1, "peer-2"}, [2]string{w, p})
}

// TestForget: only a peer that never answered identity can be forgotten; it leaves every listing and comes
// back as a fresh DISCOVERED entry when discovered again.
func TestForget(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	_, err := f.r.Forget("")
	require.ErrorIs(t, err, ErrEmptyPeerID)
	_, err = f.r.Forget("ghost")
	require.ErrorIs(t, err, ErrUnknownWorker)

	_, err = f.r.Discovered("peer-x")
	require.NoError(t, err)
	_, err = f.r.Failed(ctx, "peer-x", "identity: stream reset")
	require.NoError(t, err)
	f.takeChanges()
	c, err := f.r.Forget("peer-x")
	require.NoError(t, err)
	assert.Equal(t, Change{PeerID: "peer-x", From: Discovered, To: Unregistered}, c)
	assert.Equal(t, []Change{c}, f.takeChanges())
	_, ok := f.r.ByPeer("peer-x")
	assert.False(t, ok)
	assert.Empty(t, f.r.List())
	assert.Empty(t, f.r.PeerIDs())
	assert.Equal(t, 0, f.r.Counts()[Discovered])
	c, err = f.r.Discovered("peer-x")
	require.NoError(t, err)
	assert.Equal(t, Change{PeerID: "peer-x", From: Unregistered, To: Discovered}, c)

	// Anything that has answered a workerId stays (only Terminate evicts a Worker).
	for _, st := range []string{IdentitySaved, Ready, Terminated} {
		t.Run(st, func(t *testing.T) {
			f := newFixture(t)
			f.reach(t, st)
			_, err := f.r.Forget(peer1)
			require.ErrorIs(t, err, ErrIllegalTransition)
			assert.Equal(t, st, f.state(peer1))
			assert.Empty(t, f.takeChanges())
		})
	}
	t.Run("discovered with a workerId", func(t *testing.T) {
		f := newFixture(t)
		f.discoveredWithID(t)
		_, err := f.r.Forget(peer1)
		require.ErrorIs(t, err, ErrIllegalTransition)
		v, ok := f.r.Worker(worker1)
		require.True(t, ok)
		assert.Equal(t, peer1, v.PeerID)
	})
}

// TestDeclaredDevices: a Worker's declared devices are the owned ones plus the conflicting ones, in memory
// and after a reload, so the node can tell an unchanged identity answer from a changed one.
func TestDeclaredDevices(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	register(t, f.r, "peer-b", identity("worker-b", dev("dev-7")))
	_, err := f.r.Discovered("peer-a")
	require.NoError(t, err)
	_, err = f.r.IdentitySaved(ctx, "peer-a", identity("worker-a", dev("dev-6"), dev("dev-7"), dev("dev-6")))
	require.ErrorIs(t, err, ErrDeviceConflict)
	_, err = f.r.Ready(ctx, "peer-a", validContract())
	require.NoError(t, err)

	a, _ := f.r.Worker("worker-a")
	assert.Equal(t, []envelope.DeviceInfo{dev("dev-6")}, a.Devices)
	assert.Equal(t, []envelope.DeviceInfo{dev("dev-6"), dev("dev-7")}, a.DeclaredDevices, "deduplicated")
	b, _ := f.r.Worker("worker-b")
	assert.Equal(t, b.Devices, b.DeclaredDevices)

	r2 := New(Options{KV: f.kv})
	_, err = r2.Load(ctx)
	require.NoError(t, err)
	a2, _ := r2.Worker("worker-a")
	assert.Equal(t, a.DeclaredDevices, a2.DeclaredDevices)

	// A record written before declared devices existed: its devices stand in for them.
	raw, ok := f.kv.Get(NSRegistry, "worker-b")
	require.True(t, ok)
	var rec map[string]any
	require.NoError(t, json.Unmarshal(raw, &rec))
	delete(rec, "declared")
	raw, _ = json.Marshal(rec)
	require.NoError(t, f.kv.Put(ctx, NSRegistry, "worker-b", raw))
	r3 := New(Options{KV: f.kv})
	_, err = r3.Load(ctx)
	require.NoError(t, err)
	b3, _ := r3.Worker("worker-b")
	assert.Equal(t, []envelope.DeviceInfo{dev("dev-7")}, b3.DeclaredDevices)

	_, err = f.r.Terminate(ctx, "worker-a")
	require.NoError(t, err)
	v, _ := f.r.ByPeer("peer-a")
	assert.Nil(t, v.DeclaredDevices)
}
