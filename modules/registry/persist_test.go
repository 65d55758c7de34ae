package registry

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/protocols/envelope"
)

// TestLoadRoundTrip: what a kernel persisted comes back after a restart: READY Workers with devices and
// contract, half-registered ones DISCOVERED with their device claims, terminated ones not at all.
func TestLoadRoundTrip(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	register(t, f.r, "peer-a", identity("worker-a", devInRack("a-1", "rack-1"), dev("a-2")))
	register(t, f.r, "peer-t", identity("worker-t", dev("t-1")))
	_, err := f.r.Terminate(ctx, "worker-t")
	require.NoError(t, err)
	_, err = f.r.Discovered("peer-b")
	require.NoError(t, err)
	_, err = f.r.IdentitySaved(ctx, "peer-b", identity("worker-b", dev("b-1"), dev("a-1"))) // a-1: conflict
	require.ErrorIs(t, err, ErrDeviceConflict)
	_, err = f.r.Discovered("peer-x") // no identity: nothing to persist
	require.NoError(t, err)

	var changes []Change
	r2 := New(Options{KV: f.kv, OnChange: func(c Change) { changes = append(changes, c) }})
	n, err := r2.Load(ctx)
	require.NoError(t, err)
	assert.Equal(t, 2, n)
	assert.Empty(t, changes, "Load is not a transition")

	a, ok := r2.Worker("worker-a")
	require.True(t, ok)
	assert.Equal(t, Ready, a.State)
	assert.Equal(t, "peer-a", a.PeerID)
	assert.Equal(t, validContract(), a.Contract)
	assert.Equal(t, []envelope.DeviceInfo{devInRack("a-1", "rack-1"), dev("a-2")}, a.Devices)
	assert.Equal(t, t0, a.RegisteredAt.UTC())
	assert.True(t, r2.Routable("worker-a"), "routable at once (health UNKNOWN)")

	b, ok := r2.Worker("worker-b")
	require.True(t, ok)
	assert.Equal(t, Discovered, b.State)
	assert.Nil(t, b.Contract)
	assert.Equal(t, []envelope.DeviceInfo{dev("b-1")}, b.Devices)
	assert.Equal(t, []string{"a-1 owned by worker-a"}, b.Conflicts)

	_, ok = r2.Worker("worker-t")
	assert.False(t, ok)
	_, ok = r2.ByPeer("peer-x")
	assert.False(t, ok)

	orig, loaded := f.r.Devices(), r2.Devices()
	assert.Equal(t, orig, loaded)
	assert.Equal(t, []DeviceRef{{"a-1", "worker-a"}}, r2.DevicesInRack("rack-1"))

	// The Worker comes back on the network: no churn for the READY one, the DISCOVERED one re-registers.
	c, err := r2.Discovered("peer-a")
	require.NoError(t, err)
	assert.False(t, c.Changed())
	c, err = r2.Discovered("peer-b")
	require.NoError(t, err)
	assert.Equal(t, Change{PeerID: "peer-b", WorkerID: "worker-b", From: Discovered, To: Discovered, Conflicts: b.Conflicts}, c)
	_, err = r2.IdentitySaved(ctx, "peer-b", identity("worker-b", dev("b-1")))
	require.NoError(t, err)
	_, err = r2.Ready(ctx, "peer-b", validContract())
	require.NoError(t, err)

	// Loading again merges nothing new: memory wins.
	n, err = r2.Load(ctx)
	require.NoError(t, err)
	assert.Zero(t, n)
}

func TestLoadSkipsCorruptRecords(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	register(t, f.r, "peer-a", identity("worker-a", dev("a-1")))
	register(t, f.r, "peer-c", identity("worker-c", dev("c-1")))
	kv := f.kv
	kv.Set(NSRegistry, "garbage", []byte("{not json"))
	kv.Set(NSRegistry, "no-peer", []byte(`{"workerId":"no-peer","devices":[]}`))
	kv.Set(NSRegistry, "no-id", []byte(`{"peerId":"p","devices":[]}`))
	kv.Set(NSRegistry, "wrong-key", []byte(`{"workerId":"other","peerId":"p2","devices":[]}`))
	kv.Set(NSRegistry, "bad-device", []byte(`{"workerId":"bad-device","peerId":"p3","devices":[{"deviceId":""}]}`))
	kv.Set(NSRegistry, "z-same-peer", []byte(`{"workerId":"z-same-peer","peerId":"peer-a","devices":[]}`))
	kv.Set(NSContracts, "worker-c", []byte(`{"metadata":{}}`)) // fails Validate
	kv.Set(NSContracts, "orphan", []byte(`{}`))                // no record: ignored

	r2 := New(Options{KV: kv})
	var n int
	var err error
	require.NotPanics(t, func() { n, err = r2.Load(ctx) })
	assert.Equal(t, 2, n, "worker-a and worker-c")
	require.ErrorIs(t, err, ErrCorruptRecord)
	var joined interface{ Unwrap() []error }
	require.ErrorAs(t, err, &joined)
	var keys []string
	for _, e := range joined.Unwrap() {
		var ce *CorruptRecordError
		require.ErrorAs(t, e, &ce)
		keys = append(keys, ce.NS+"/"+ce.Key)
	}
	assert.ElementsMatch(t, []string{
		"/cap/worker-c", "/reg/bad-device", "/reg/garbage", "/reg/no-id", "/reg/no-peer", "/reg/z-same-peer", "/reg/wrong-key",
	}, keys)

	a, _ := r2.Worker("worker-a")
	assert.Equal(t, Ready, a.State)
	c, _ := r2.Worker("worker-c")
	assert.Equal(t, Discovered, c.State, "a Worker with a corrupt contract re-registers")
	assert.Contains(t, c.LastError, "persisted contract unusable")
	assert.Equal(t, "worker-c", owner(r2, "c-1"))
}

func TestLoadListError(t *testing.T) {
	kv := newMemKV()
	r := New(Options{KV: failingList{kv}})
	n, err := r.Load(context.Background())
	assert.Zero(t, n)
	require.ErrorIs(t, err, ErrPersist)
	require.ErrorIs(t, err, errDisk)
}

type failingList struct{ *memKV }

func (failingList) List(context.Context, string, func(string, []byte) error) error { return errDisk }

// TestLoadDeviceClaimedTwice: two records claiming one device (which the registry never writes, but a disk
// can hold) give it to the first in key order.
func TestLoadDeviceClaimedTwice(t *testing.T) {
	kv := newMemKV()
	kv.Set(NSRegistry, "w-1", []byte(`{"workerId":"w-1","peerId":"p-1","devices":[{"deviceId":"d"}]}`))
	kv.Set(NSRegistry, "w-2", []byte(`{"workerId":"w-2","peerId":"p-2","devices":[{"deviceId":"d"},{"deviceId":"e"}]}`))
	r := New(Options{KV: kv})
	n, err := r.Load(context.Background())
	require.NoError(t, err)
	assert.Equal(t, 2, n)
	assert.Equal(t, "w-1", owner(r, "d"))
	v, _ := r.Worker("w-2")
	assert.Equal(t, []string{"d owned by w-1"}, v.Conflicts)
	assert.Equal(t, []envelope.DeviceInfo{dev("e")}, v.Devices)
}
