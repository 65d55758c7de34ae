package registry

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/protocols/envelope"
)

// register takes a peer from nothing to READY.
func register(t *testing.T, r *Registry, peerID string, id envelope.IdentityResponse) {
	t.Helper()
	ctx := context.Background()
	_, err := r.Discovered(peerID)
	require.NoError(t, err)
	_, err = r.IdentitySaved(ctx, peerID, id)
	require.NoError(t, err)
	_, err = r.Ready(ctx, peerID, validContract())
	require.NoError(t, err)
}

func owner(r *Registry, deviceID string) string {
	w, _, ok := r.ResolveDevice(deviceID)
	if !ok {
		return ""
	}
	return w
}

func TestDeviceConflict(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	register(t, f.r, "peer-b", identity("worker-b", dev("dev-7")))
	f.takeChanges()

	_, err := f.r.Discovered("peer-a")
	require.NoError(t, err)
	f.takeChanges()
	c, err := f.r.IdentitySaved(ctx, "peer-a", identity("worker-a", dev("dev-6"), dev("dev-7"), dev("dev-8")))

	// The registration goes ahead without the conflicting device, and says so.
	var ce *ConflictError
	require.ErrorAs(t, err, &ce)
	require.ErrorIs(t, err, ErrDeviceConflict)
	assert.Equal(t, &ConflictError{WorkerID: "worker-a", Devices: []string{"dev-7"}, Owners: map[string]string{"dev-7": "worker-b"}}, ce)
	assert.EqualError(t, err, "ork/registry: device owned by another worker: worker-a: dev-7 owned by worker-b")
	assert.Equal(t, IdentitySaved, c.To)
	assert.Equal(t, []string{"dev-7 owned by worker-b"}, c.Conflicts)
	assert.Equal(t, []Change{c}, f.takeChanges())

	assert.Equal(t, "worker-a", owner(f.r, "dev-6"))
	assert.Equal(t, "worker-b", owner(f.r, "dev-7"), "the owner keeps its device")
	assert.Equal(t, "worker-a", owner(f.r, "dev-8"))
	assert.Equal(t, []envelope.DeviceInfo{dev("dev-6"), dev("dev-8")}, f.r.DevicesOf("worker-a"))
	v, _ := f.r.Worker("worker-a")
	assert.Equal(t, []string{"dev-7 owned by worker-b"}, v.Conflicts)
	for _, info := range f.r.List() {
		if info.WorkerID == "worker-a" {
			assert.Equal(t, []string{"dev-7 owned by worker-b"}, info.Conflicts)
			assert.Equal(t, []string{"dev-6", "dev-8"}, info.DeviceIDs)
		}
	}
	// The conflict survives in the persisted record.
	raw, ok := f.kv.Get(NSRegistry, "worker-a")
	require.True(t, ok)
	var rec record
	require.NoError(t, json.Unmarshal(raw, &rec))
	assert.Equal(t, []string{"dev-7 owned by worker-b"}, rec.Conflicts)

	// The contract is accepted as usual: a conflict does not block READY.
	_, err = f.r.Ready(ctx, "peer-a", validContract())
	require.NoError(t, err)

	// Once the owner is gone, the newcomer claims the device at its next identity answer.
	_, err = f.r.Terminate(ctx, "worker-b")
	require.NoError(t, err)
	c, err = f.r.IdentitySaved(ctx, "peer-a", identity("worker-a", dev("dev-6"), dev("dev-7"), dev("dev-8")))
	require.NoError(t, err)
	assert.Empty(t, c.Conflicts)
	assert.Equal(t, "worker-a", owner(f.r, "dev-7"))
	v, _ = f.r.Worker("worker-a")
	assert.Empty(t, v.Conflicts)
}

// TestReidentifyUnmapsDroppedDevices is MDK bug #10: devices a Worker stops declaring are unmapped, and a
// device it never owned (a conflict) is never unmapped from its real owner.
func TestReidentifyUnmapsDroppedDevices(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	register(t, f.r, "peer-b", identity("worker-b", dev("dev-7")))
	f.reach(t, Discovered)
	_, err := f.r.IdentitySaved(ctx, peer1, identity(worker1, dev("dev-1"), dev("dev-2"), dev("dev-7")))
	require.ErrorIs(t, err, ErrDeviceConflict)
	_, err = f.r.Ready(ctx, peer1, validContract())
	require.NoError(t, err)
	assert.Equal(t, "worker-b", owner(f.r, "dev-7"))
	f.takeChanges()

	c, err := f.r.IdentitySaved(ctx, peer1, identity(worker1, dev("dev-2"), dev("dev-3")))
	require.NoError(t, err)
	assert.Equal(t, Change{PeerID: peer1, WorkerID: worker1, From: Ready, To: IdentitySaved}, c)

	assert.Equal(t, "", owner(f.r, "dev-1"), "dropped device unmapped")
	assert.Equal(t, worker1, owner(f.r, "dev-2"))
	assert.Equal(t, worker1, owner(f.r, "dev-3"), "new device mapped")
	assert.Equal(t, "worker-b", owner(f.r, "dev-7"), "another Worker's device untouched")
	assert.Equal(t, []envelope.DeviceInfo{dev("dev-2"), dev("dev-3")}, f.r.DevicesOf(worker1))
	assert.Nil(t, f.r.Contract(worker1), "re-identify drops the contract until capabilities are pulled again")
	_, ok := f.kv.Get(NSContracts, worker1)
	assert.False(t, ok, "and its persisted copy")

	// A declaration that lists a device twice maps it once.
	_, err = f.r.Ready(ctx, peer1, validContract())
	require.NoError(t, err)
	_, err = f.r.IdentitySaved(ctx, peer1, identity(worker1, dev("dev-2"), dev("dev-2")))
	require.NoError(t, err)
	assert.Equal(t, []envelope.DeviceInfo{dev("dev-2")}, f.r.DevicesOf(worker1))
	assert.Equal(t, "", owner(f.r, "dev-3"))
}

func TestTerminateThenReregister(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	f.reach(t, Ready)
	f.r.SetHealth(worker1, envelope.HealthHealthy)

	c, err := f.r.Terminate(ctx, worker1)
	require.NoError(t, err)
	assert.Equal(t, Change{PeerID: peer1, WorkerID: worker1, From: Ready, To: Terminated}, c)
	assert.Equal(t, "", owner(f.r, "dev-1"))
	assert.Empty(t, f.r.Devices())
	assert.Empty(t, f.kv.Keys(NSRegistry))
	assert.Empty(t, f.kv.Keys(NSContracts))
	v, ok := f.r.Worker(worker1)
	require.True(t, ok, "kept in memory")
	assert.Equal(t, Terminated, v.State)
	assert.Equal(t, envelope.HealthUnknown, v.Health)
	assert.Empty(t, f.r.PeerIDs(), "a terminated peer is not one to keep dialling")

	// Discovered again: the whole pipeline runs and succeeds (MDK bug #8 was the dedup set refusing this).
	c, err = f.r.Discovered(peer1)
	require.NoError(t, err)
	assert.Equal(t, Change{PeerID: peer1, From: Terminated, To: Discovered}, c)
	_, ok = f.r.Worker(worker1)
	assert.False(t, ok, "a new registration, not yet identified")
	register(t, f.r, peer1, identity(worker1, dev("dev-1")))
	assert.Equal(t, Ready, f.state(peer1))
	assert.Equal(t, worker1, owner(f.r, "dev-1"))
	assert.Equal(t, []string{worker1}, f.kv.Keys(NSRegistry))
	assert.Equal(t, []string{worker1}, f.kv.Keys(NSContracts))
}

func TestTerminateUnknownAndRepeat(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	_, err := f.r.Terminate(ctx, "ghost")
	require.ErrorIs(t, err, ErrUnknownWorker)
	f.reach(t, Terminated)
	_, err = f.r.Terminate(ctx, worker1)
	require.ErrorIs(t, err, ErrIllegalTransition)
}

// TestNewPeerSameWorker: a Worker that restarts with a new key keeps its workerId and devices once its old
// peer is DEAD; the old peer's entry is replaced, not reported as a conflict. (This test used to take over
// from a SICK owner: any peer could then steal a live Worker's identity by answering its workerId, so a
// takeover now needs the old peer DEAD or TERMINATED — see TestNewPeerCannotTakeLiveWorkerID.)
func TestNewPeerSameWorker(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	f.reach(t, Ready)
	f.r.SetHealth(worker1, envelope.HealthDead)

	_, err := f.r.Discovered("peer-2")
	require.NoError(t, err)
	c, err := f.r.IdentitySaved(ctx, "peer-2", identity(worker1, devInRack("dev-1", "rack-a"), dev("dev-4")))
	require.NoError(t, err)
	assert.Equal(t, Change{PeerID: "peer-2", WorkerID: worker1, From: Discovered, To: IdentitySaved, ReplacedPeer: peer1}, c)
	assert.Equal(t, []Change{{PeerID: "peer-2", From: Unregistered, To: Discovered}, c}, f.takeChanges())

	_, ok := f.r.ByPeer(peer1)
	assert.False(t, ok, "old peer forgotten")
	w, p, ok := f.r.ResolveDevice("dev-1")
	require.True(t, ok)
	assert.Equal(t, [2]string{worker1, "peer-2"}, [2]string{w, p})
	assert.Equal(t, "", owner(f.r, "dev-2"), "dropped by the new declaration")
	v, _ := f.r.Worker(worker1)
	assert.Equal(t, envelope.HealthDead, v.Health, "health follows the workerId")
	assert.Equal(t, []string{"peer-2"}, f.r.PeerIDs())

	raw, ok := f.kv.Get(NSRegistry, worker1)
	require.True(t, ok)
	var rec record
	require.NoError(t, json.Unmarshal(raw, &rec))
	assert.Equal(t, "peer-2", rec.PeerID)
}

// TestPeerChangesWorkerID: a peer that answers a different workerId releases the old one.
func TestPeerChangesWorkerID(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	f.reach(t, Ready)

	c, err := f.r.IdentitySaved(ctx, peer1, identity("worker-9", dev("dev-1"), dev("dev-9")))
	require.NoError(t, err, "its own old devices are no conflict")
	assert.Equal(t, Change{PeerID: peer1, WorkerID: "worker-9", From: Ready, To: IdentitySaved, ReleasedWorker: worker1}, c)
	_, ok := f.r.Worker(worker1)
	assert.False(t, ok)
	assert.Equal(t, "worker-9", owner(f.r, "dev-1"))
	assert.Equal(t, "", owner(f.r, "dev-2"))
	assert.Equal(t, []string{"worker-9"}, f.kv.Keys(NSRegistry))
	assert.Empty(t, f.kv.Keys(NSContracts))
}

func TestReadyInvalidContractKeepsDevicesAndRetries(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	f.reach(t, IdentitySaved)
	bad := validContract()
	bad.Metadata.Provider = ""

	c, err := f.r.Ready(ctx, peer1, bad)
	require.ErrorIs(t, err, ErrInvalidContract)
	assert.Equal(t, envelope.CodePayloadContractRequired, envelope.CodeOf(err), "the wire code is still reachable")
	assert.Equal(t, Discovered, c.To)
	v, ok := f.r.Worker(worker1)
	require.True(t, ok, "not deleted (the original deleted it)")
	assert.Equal(t, Discovered, v.State)
	assert.Contains(t, v.LastError, "metadata.provider is required")
	assert.Equal(t, worker1, owner(f.r, "dev-1"), "keeps its devices while it retries")
	assert.Empty(t, f.kv.Keys(NSContracts))

	// The node retries: identity, then a good contract.
	_, err = f.r.IdentitySaved(ctx, peer1, identity(worker1, dev("dev-1")))
	require.NoError(t, err)
	_, err = f.r.Ready(ctx, peer1, validContract())
	require.NoError(t, err)
	v, _ = f.r.Worker(worker1)
	assert.Equal(t, Ready, v.State)
	assert.Empty(t, v.LastError)
}

func TestFailedFromReadyDeletesContract(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	f.reach(t, Ready)
	c, err := f.r.Failed(ctx, peer1, "")
	require.NoError(t, err)
	assert.Equal(t, Change{PeerID: peer1, WorkerID: worker1, From: Ready, To: Discovered, Error: "registration step failed"}, c)
	assert.Empty(t, f.kv.Keys(NSContracts))
	assert.Equal(t, []string{worker1}, f.kv.Keys(NSRegistry), "the record keeps the device claims")
	assert.Nil(t, f.r.Contract(worker1))
}

func TestPersistFailures(t *testing.T) {
	ctx := context.Background()

	t.Run("identity record", func(t *testing.T) {
		f := newFixture(t)
		f.reach(t, Discovered)
		f.kv.SetFail(func(op, ns, key string) error { return errDisk })
		c, err := f.r.IdentitySaved(ctx, peer1, identity(worker1, dev("dev-1")))
		require.ErrorIs(t, err, ErrPersist)
		require.ErrorIs(t, err, errDisk)
		assert.Equal(t, Change{PeerID: peer1, From: Discovered, To: Discovered, Error: err.Error()}, c)
		assert.Equal(t, "", owner(f.r, "dev-1"), "nothing of the failed step applied")
		v, _ := f.r.ByPeer(peer1)
		assert.Equal(t, err.Error(), v.LastError)

		f.kv.SetFail(nil)
		_, err = f.r.IdentitySaved(ctx, peer1, identity(worker1, dev("dev-1")))
		require.NoError(t, err, "the retry succeeds")
	})

	t.Run("contract", func(t *testing.T) {
		f := newFixture(t)
		f.reach(t, IdentitySaved)
		f.kv.SetFail(func(op, ns, key string) error { return errDisk })
		c, err := f.r.Ready(ctx, peer1, validContract())
		require.ErrorIs(t, err, ErrPersist)
		assert.Equal(t, Discovered, c.To, "never stuck in IDENTITY_SAVED")
		assert.Nil(t, f.r.Contract(worker1))
	})

	t.Run("terminate", func(t *testing.T) {
		f := newFixture(t)
		f.reach(t, Ready)
		f.kv.SetFail(func(op, ns, key string) error {
			if ns == NSContracts {
				return errDisk
			}
			return nil
		})
		c, err := f.r.Terminate(ctx, worker1)
		require.ErrorIs(t, err, ErrPersist)
		assert.Equal(t, Change{PeerID: peer1, WorkerID: worker1, From: Ready, To: Ready}, c)
		assert.Equal(t, Ready, f.state(peer1), "nothing changes; the operator retries")
		assert.Equal(t, worker1, owner(f.r, "dev-1"))
		assert.Empty(t, f.takeChanges())

		f.kv.SetFail(nil)
		_, err = f.r.Terminate(ctx, worker1)
		require.NoError(t, err)
		assert.Equal(t, Terminated, f.state(peer1))
	})

	t.Run("failed from READY", func(t *testing.T) {
		f := newFixture(t)
		f.reach(t, Ready)
		f.kv.SetFail(func(op, ns, key string) error { return errDisk })
		c, err := f.r.Failed(ctx, peer1, "boom")
		require.ErrorIs(t, err, ErrPersist)
		assert.Equal(t, Discovered, c.To, "DISCOVERED all the same")
	})
}

func TestQueries(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	register(t, f.r, "peer-b", identity("worker-b", devInRack("b-1", "rack-1"), devInRack("b-2", "rack-2")))
	f.advance(time.Minute)
	register(t, f.r, "peer-a", identity("worker-a", devInRack("a-1", "rack-1"), dev("a-2")))
	_, err := f.r.Discovered("peer-c") // never answers
	require.NoError(t, err)
	_, err = f.r.Discovered("peer-d")
	require.NoError(t, err)
	_, err = f.r.IdentitySaved(ctx, "peer-d", identity("worker-d", dev("d-1")))
	require.NoError(t, err)

	assert.Equal(t, map[string]int{Discovered: 1, IdentitySaved: 1, Ready: 2, Terminated: 0}, f.r.Counts())
	assert.Equal(t, []string{"peer-a", "peer-b", "peer-c", "peer-d"}, f.r.PeerIDs())

	ready := f.r.ReadyWorkers()
	require.Len(t, ready, 2)
	assert.Equal(t, "worker-a", ready[0].WorkerID)
	assert.Equal(t, "worker-b", ready[1].WorkerID)
	assert.Equal(t, validContract(), ready[0].Contract)

	assert.Equal(t, []DeviceRef{{"a-1", "worker-a"}, {"b-1", "worker-b"}}, f.r.DevicesInRack("rack-1"))
	assert.Nil(t, f.r.DevicesInRack(""))
	assert.Nil(t, f.r.DevicesInRack("rack-9"))

	assert.Equal(t, validContract(), f.r.ContractForDevice("a-1"))
	assert.Nil(t, f.r.ContractForDevice("d-1"), "owner not READY")
	assert.Nil(t, f.r.ContractForDevice("nope"))
	assert.Nil(t, f.r.Contract("worker-d"))
	assert.Nil(t, f.r.DevicesOf("nope"))

	// Health feeds routability; UNKNOWN is routable.
	assert.True(t, f.r.Routable("worker-a"))
	f.r.SetHealth("worker-a", envelope.HealthSick)
	f.r.SetHealth("nope", envelope.HealthDead) // ignored
	assert.False(t, f.r.Routable("worker-a"))
	assert.False(t, f.r.Routable("worker-d"), "not READY")
	assert.False(t, f.r.Routable("nope"))

	rows := f.r.Devices()
	assert.Equal(t, []envelope.DeviceRow{
		{DeviceID: "a-1", WorkerID: "worker-a", Rack: "rack-1", Model: "M56S", Routable: false},
		{DeviceID: "a-2", WorkerID: "worker-a"},
		{DeviceID: "b-1", WorkerID: "worker-b", Rack: "rack-1", Model: "M56S", Routable: true},
		{DeviceID: "b-2", WorkerID: "worker-b", Rack: "rack-2", Model: "M56S", Routable: true},
		{DeviceID: "d-1", WorkerID: "worker-d"},
	}, rows)

	f.r.Touch("peer-b", t0.Add(time.Hour))
	f.r.Touch("peer-b", t0) // never backwards
	f.r.Touch("nope", t0)

	list := f.r.List()
	require.Len(t, list, 4)
	assert.Equal(t, "", list[0].WorkerID, "peer-c has not answered identity")
	assert.Equal(t, "peer-c", list[0].PeerID)
	assert.Equal(t, []string{}, list[0].DeviceIDs, "[] on the wire, not null")
	assert.Equal(t, envelope.WorkerInfo{
		WorkerID: "worker-a", PeerID: "peer-a", DeviceIDs: []string{"a-1", "a-2"}, State: Ready,
		HealthState: envelope.HealthSick, DeviceFamily: "miner", Racks: []string{"rack-1"},
		RegisteredAt: t0.Add(time.Minute).UnixMilli(), LastSeen: t0.Add(time.Minute).UnixMilli(),
	}, list[1])
	assert.Equal(t, "worker-b", list[2].WorkerID)
	assert.Equal(t, []string{"rack-1", "rack-2"}, list[2].Racks)
	assert.Equal(t, t0.UnixMilli(), list[2].RegisteredAt)
	assert.Equal(t, t0.Add(time.Hour).UnixMilli(), list[2].LastSeen)
	assert.Equal(t, envelope.HealthUnknown, list[2].HealthState)

	// Views are copies.
	v, _ := f.r.Worker("worker-a")
	v.Devices[0].DeviceID = "mutated"
	assert.Equal(t, "a-1", f.r.DevicesOf("worker-a")[0].DeviceID)
}

// TestOnChange: changes arrive in order, once each, with no lock held (the callback may call the Registry,
// including events, whose changes are delivered after the current one).
func TestOnChange(t *testing.T) {
	ctx := context.Background()
	var (
		r   *Registry
		got []string
	)
	r = New(Options{OnChange: func(c Change) {
		got = append(got, fmt.Sprintf("%s %s→%s", c.PeerID, c.From, c.To))
		_, _ = r.Worker(c.WorkerID) // reads work
		if c.To == Ready {
			_, err := r.Failed(ctx, c.PeerID, "re-entrant") // so do events
			assert.NoError(t, err)
		}
	}})
	register(t, r, peer1, identity(worker1, dev("dev-1")))
	_, _ = r.Discovered(peer1)                  // no change: no call
	_, _ = r.Ready(ctx, peer1, validContract()) // refused: no call
	assert.Equal(t, []string{
		"peer-1 UNREGISTERED→DISCOVERED",
		"peer-1 DISCOVERED→IDENTITY_SAVED",
		"peer-1 IDENTITY_SAVED→READY",
		"peer-1 READY→DISCOVERED",
	}, got)
}

// TestOnChangePanicDoesNotWedge: a panicking callback does not stop later deliveries.
func TestOnChangePanicDoesNotWedge(t *testing.T) {
	calls := 0
	r := New(Options{OnChange: func(c Change) {
		calls++
		if calls == 1 {
			panic("boom")
		}
	}})
	require.Panics(t, func() { _, _ = r.Discovered("p1") })
	_, err := r.Discovered("p2")
	require.NoError(t, err)
	assert.Equal(t, 2, calls)
}

func TestNilKVAndClock(t *testing.T) {
	r := New(Options{})
	register(t, r, peer1, identity(worker1, dev("dev-1")))
	n, err := r.Load(context.Background())
	assert.Zero(t, n)
	assert.NoError(t, err)
	v, _ := r.Worker(worker1)
	assert.True(t, v.RegisteredAt.IsZero())
	assert.Zero(t, r.List()[0].RegisteredAt)
}

// TestConcurrentUse is for the race detector: events and queries from many goroutines.
func TestConcurrentUse(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 50 {
				peer := fmt.Sprintf("peer-%d", (g+i)%5)
				wid := fmt.Sprintf("worker-%d", (g+i)%5)
				_, _ = f.r.Discovered(peer)
				_, _ = f.r.IdentitySaved(ctx, peer, identity(wid, dev(fmt.Sprintf("dev-%d", i%7))))
				_, _ = f.r.Ready(ctx, peer, validContract())
				f.r.Touch(peer, t0.Add(time.Duration(i)*time.Second))
				f.r.SetHealth(wid, envelope.HealthHealthy)
				_ = f.r.List()
				_ = f.r.Devices()
				_, _, _ = f.r.ResolveDevice("dev-1")
				_ = f.r.ReadyWorkers()
				if i%10 == 0 {
					_, _ = f.r.Terminate(ctx, wid)
				}
				if i%7 == 0 {
					_, _ = f.r.Failed(ctx, peer, "flaky")
				}
			}
		})
	}
	wg.Wait()
	checkInvariants(t, f.r)
	for _, c := range f.takeChanges() {
		assert.True(t, CanTransition(c.From, c.To), "%+v", c)
	}
}
