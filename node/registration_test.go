package node

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/internal/testutil"
	"github.com/orknode/ork/modules/health"
	"github.com/orknode/ork/modules/registry"
	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/store"
	"github.com/orknode/ork/worker"
)

// addWorker starts one more Worker on the kernel's mocknet, with its own host,
// that bootstraps through the kernel (so the kernel learns it by identify).
// trusted nil means the kernel.
func (m *mockKernel) addWorker(id string, devices []worker.Device, trusted []peer.ID) (host.Host, *worker.Worker) {
	m.t.Helper()
	h, err := m.mn.GenPeer()
	require.NoError(m.t, err)
	require.NoError(m.t, m.mn.LinkAll())
	if trusted == nil {
		trusted = []peer.ID{m.n.ID()}
	}
	cfg := testutil.WorkerConfig(id, m.n.ID(), nil, []peer.AddrInfo{{ID: m.n.ID(), Addrs: m.n.Host().Addrs()}})
	cfg.ListenAddrs, cfg.LoopbackOnly, cfg.Host = nil, false, h
	cfg.TrustedKernels = trusted
	if devices != nil {
		cfg.Devices = devices
	}
	w, err := worker.New(context.Background(), cfg)
	require.NoError(m.t, err)
	m.t.Cleanup(func() { _ = w.Close() })
	return h, w
}

// countingPeer is a mocknet peer serving /ork/worker/ping and identity by
// counting the requests and holding them until release is closed (then
// resetting them: every call fails); inFlight and maxIn count pings.
type countingPeer struct {
	h        host.Host
	release  chan struct{}
	once     sync.Once
	inFlight atomic.Int64
	maxIn    atomic.Int64
	calls    sync.Map // protocol.ID → *atomic.Int64
}

func (m *mockKernel) addCountingPeer() *countingPeer {
	m.t.Helper()
	h, err := m.mn.GenPeer()
	require.NoError(m.t, err)
	require.NoError(m.t, m.mn.LinkAll())
	c := &countingPeer{h: h, release: make(chan struct{})}
	m.t.Cleanup(c.open)
	for _, proto := range []protocol.ID{protocols.WorkerPing, protocols.WorkerIdentity} {
		h.SetStreamHandler(proto, func(s network.Stream) {
			n, _ := c.calls.LoadOrStore(proto, new(atomic.Int64))
			n.(*atomic.Int64).Add(1)
			if proto != protocols.WorkerPing {
				// The kernel also registers it (identify lists worker
				// protocols): hold those too, uncounted.
				<-c.release
				_ = s.Reset()
				return
			}
			in := c.inFlight.Add(1)
			for {
				mx := c.maxIn.Load()
				if in <= mx || c.maxIn.CompareAndSwap(mx, in) {
					break
				}
			}
			<-c.release
			c.inFlight.Add(-1)
			_ = s.Reset()
		})
	}
	return c
}

// open lets every held and later request go (reset).
func (c *countingPeer) open() { c.once.Do(func() { close(c.release) }) }

func (c *countingPeer) count(proto protocol.ID) int64 {
	if n, ok := c.calls.Load(proto); ok {
		return n.(*atomic.Int64).Load()
	}
	return 0
}

func (c *countingPeer) reset() {
	c.calls.Range(func(_, v any) bool { v.(*atomic.Int64).Store(0); return true })
}

func (m *mockKernel) regEntry(p peer.ID) bool {
	m.n.regs.mu.Lock()
	defer m.n.regs.mu.Unlock()
	_, ok := m.n.regs.peers[p]
	return ok
}

func (m *mockKernel) savedAddrs(p peer.ID) bool {
	_, err := m.n.store.Get(context.Background(), store.NSMeta, addrKeyPrefix+p.String())
	return err == nil
}

// TestMocknetDeviceConflictStillReady (B2): a Worker that declares a device
// another Worker owns still becomes READY with the rest; the device stays
// with its owner, the conflict shows in worker.list, and the identity refresh
// does not re-register it while its answer is unchanged.
func TestMocknetDeviceConflictStillReady(t *testing.T) {
	m := newMockKernel(t, mockOpts{})
	m.addWorker("w2", []worker.Device{{DeviceID: "w2-d1", Rack: "r2"}, {DeviceID: "w1-d1", Rack: "r2"}}, nil)

	require.Eventually(t, func() bool { return m.n.reg.Routable("w2") }, 10*time.Second, 5*time.Millisecond,
		"w2 not READY: %+v", m.n.reg.List())
	w, p, ok := m.n.reg.ResolveDevice("w1-d1")
	require.True(t, ok)
	assert.Equal(t, "w1", w, "the owner keeps its device")
	assert.Equal(t, m.wh.ID().String(), p)
	v, _ := m.n.reg.Worker("w2")
	assert.Equal(t, []string{"w1-d1 owned by w1"}, v.Conflicts)
	assert.Equal(t, []envelope.DeviceInfo{{DeviceID: "w2-d1", Rack: "r2"}}, v.Devices)
	var list envelope.WorkerList
	require.NoError(t, m.call(RoleRead, protocols.KernelRegistry, envelope.ActionWorkerList, "", nil, &list))
	var row *envelope.WorkerInfo
	for i := range list.Workers {
		if list.Workers[i].WorkerID == "w2" {
			row = &list.Workers[i]
		}
	}
	require.NotNil(t, row)
	assert.Equal(t, []string{"w1-d1 owned by w1"}, row.Conflicts)

	// The refresh asks again and gets the same answer: no churn.
	m.n.refreshIdentities(context.Background())
	after, _ := m.n.reg.Worker("w2")
	assert.Equal(t, envelope.WorkerReady, after.State)
	assert.Equal(t, v.RegisteredAt, after.RegisteredAt, "re-registered by the identity refresh")
}

// TestMocknetWorkerIDNotStolen (B1): a peer answering the workerId of a live
// Worker is refused (ERR_WORKER_ID_TAKEN) and retried; it takes the workerId
// only once the real Worker's peer is DEAD (a Worker restarted with a new
// key).
func TestMocknetWorkerIDNotStolen(t *testing.T) {
	m := newMockKernel(t, mockOpts{})
	ih, _ := m.addWorker("w1", []worker.Device{{DeviceID: "w1-d1"}, {DeviceID: "evil-1"}}, nil)

	require.Eventually(t, func() bool {
		v, ok := m.n.reg.ByPeer(ih.ID().String())
		return ok && strings.Contains(v.LastError, registry.CodeWorkerIDTaken)
	}, 10*time.Second, 5*time.Millisecond, "impostor not refused: %+v", m.n.reg.List())
	v, ok := m.n.reg.Worker("w1")
	require.True(t, ok)
	assert.Equal(t, m.wh.ID().String(), v.PeerID, "w1 stays with its peer")
	assert.True(t, m.n.reg.Routable("w1"))
	_, _, taken := m.n.reg.ResolveDevice("evil-1")
	assert.False(t, taken)
	// Refused after answering identity: retried, not given up.
	time.Sleep(300 * time.Millisecond)
	assert.True(t, m.regEntry(ih.ID()))
	v, _ = m.n.reg.Worker("w1")
	assert.Equal(t, m.wh.ID().String(), v.PeerID)

	// The real Worker goes away: DEAD after three failed pings, and then the
	// new key gets the workerId at its next retry.
	require.NoError(t, m.w.Close())
	// (Worker.Close on a host it was given keeps serving streams already
	// open, so cut the link too.)
	require.NoError(t, m.mn.UnlinkPeers(m.n.ID(), m.wh.ID()))
	require.NoError(t, m.mn.DisconnectPeers(m.n.ID(), m.wh.ID()))
	require.Eventually(t, func() bool {
		v, ok := m.n.reg.Worker("w1")
		return ok && v.PeerID == ih.ID().String() && v.State == envelope.WorkerReady
	}, 20*time.Second, 10*time.Millisecond, "re-keyed w1 not admitted: %+v", m.n.reg.List())
}

// TestMocknetNonWorkersForgotten (B8): peers that are not Workers of this
// kernel — one that does not trust it (resets its streams), one that does not
// speak the protocol, one that cannot be reached — are given up, leave
// worker.list and the registrar, and have no addresses kept.
func TestMocknetNonWorkersForgotten(t *testing.T) {
	m := newMockKernel(t, mockOpts{})
	other, err := m.mn.GenPeer() // a kernel the first Worker trusts instead
	require.NoError(t, err)
	untrusting, _ := m.addWorker("w9", nil, []peer.ID{other.ID()})
	plain, err := m.mn.GenPeer()
	require.NoError(t, err)
	require.NoError(t, m.mn.LinkAll())
	m.n.Host().Peerstore().AddAddrs(plain.ID(), plain.Addrs(), time.Hour)
	unreachable, err := m.mn.GenPeer()
	require.NoError(t, err)
	// unreachable: created after LinkAll, so not linked to the kernel.

	for _, p := range []peer.ID{untrusting.ID(), plain.ID(), unreachable.ID()} {
		m.n.regs.offer(p, "test")
		require.Eventually(t, func() bool {
			_, inReg := m.n.reg.ByPeer(p.String())
			return !inReg && !m.regEntry(p)
		}, 15*time.Second, 5*time.Millisecond, "%s kept: %+v", p, m.n.reg.List())
		assert.False(t, m.savedAddrs(p), "addresses kept for %s", p)
	}
	assert.Len(t, m.n.reg.List(), 1, "%+v", m.n.reg.List())
	// The real Worker's addresses are kept.
	assert.True(t, m.savedAddrs(m.wh.ID()))

	// Discovered again: a fresh attempt.
	m.n.regs.offer(plain.ID(), "test")
	assert.True(t, m.regEntry(plain.ID()))
}

// TestRegistrarPeersCapped (B8): the registrar's table is bounded.
func TestRegistrarPeersCapped(t *testing.T) {
	m := newMockKernel(t, mockOpts{})
	var ids []peer.ID
	for range 3 {
		h, err := m.mn.GenPeer() // not linked: registration keeps failing
		require.NoError(t, err)
		ids = append(ids, h.ID())
	}
	m.n.regs.mu.Lock()
	m.n.regs.maxPeers = len(m.n.regs.peers) + 2
	m.n.regs.mu.Unlock()
	for _, p := range ids {
		m.n.regs.offer(p, "test")
	}
	assert.True(t, m.regEntry(ids[0]))
	assert.True(t, m.regEntry(ids[1]))
	assert.False(t, m.regEntry(ids[2]), "offer beyond the cap kept")
	// A READY Worker holds no entry: the table is for peers in progress.
	assert.False(t, m.regEntry(m.wh.ID()))
}

// TestPingSoonBounded (R1): immediate pings share maxPingsInFlight slots; the
// rest are skipped, not queued as goroutines.
func TestPingSoonBounded(t *testing.T) {
	m := newMockKernel(t, mockOpts{})
	c := m.addCountingPeer()
	const storm = 3 * maxPingsInFlight
	for i := range storm {
		m.n.pingSoon("storm-"+string(rune('a'+i/26))+string(rune('a'+i%26)), c.h.ID())
	}
	require.Eventually(t, func() bool { return c.inFlight.Load() >= maxPingsInFlight }, 10*time.Second, 5*time.Millisecond)
	time.Sleep(200 * time.Millisecond)
	assert.LessOrEqual(t, c.maxIn.Load(), int64(maxPingsInFlight))
	c.open()
}

// TestPingSoonAfterClose: nothing starts once the node is closed.
func TestPingSoonAfterClose(t *testing.T) {
	m := newMockKernel(t, mockOpts{})
	require.NoError(t, m.n.Close())
	m.n.pingSoon("w1", m.wh.ID())
	_, busy := m.n.pinging.Load("w1")
	assert.False(t, busy, "a ping started after Close")
	m.n.regs.offer(m.wh.ID(), "test") // must not panic or start anything
	m.n.disc.learn(peer.AddrInfo{ID: m.wh.ID()}, "test")
}

// TestDeadWorkersSpaced (R4): a DEAD Worker is pinged only every
// deadPingInterval, and the identity refresh skips non-routable Workers.
func TestDeadWorkersSpaced(t *testing.T) {
	m := newMockKernel(t, mockOpts{})
	c := m.addCountingPeer()
	c.open() // answer nothing: reset at once
	ctx := context.Background()
	ps := c.h.ID().String()
	_, err := m.n.reg.Discovered(ps)
	require.NoError(t, err)
	_, err = m.n.reg.IdentitySaved(ctx, ps, envelope.IdentityResponse{WorkerID: "ghost", Devices: []envelope.DeviceInfo{{DeviceID: "g-1"}}})
	require.NoError(t, err)
	_, err = m.n.reg.Ready(ctx, ps, testutil.Contract())
	require.NoError(t, err)
	require.Eventually(t, func() bool { return m.n.health.State("ghost").State == envelope.HealthDead },
		10*time.Second, 5*time.Millisecond)
	time.Sleep(300 * time.Millisecond) // pings already started end
	c.reset()

	m.n.pingAll(ctx)
	m.n.refreshIdentities(ctx)
	time.Sleep(500 * time.Millisecond) // a few scheduled ticks too
	assert.Zero(t, c.count(protocols.WorkerPing), "DEAD worker pinged again at once")
	assert.Zero(t, c.count(protocols.WorkerIdentity), "identity refresh of a DEAD worker")
	assert.True(t, m.n.reg.Routable("w1"))
}

func TestDuePing(t *testing.T) {
	started := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	now := started.Add(time.Hour)
	for _, tc := range []struct {
		st   health.Status
		want bool
	}{
		{health.Status{State: envelope.HealthHealthy, LastFailure: now}, true},
		{health.Status{State: envelope.HealthSick, LastFailure: now}, true},
		{health.Status{State: envelope.HealthUnknown}, true},
		{health.Status{State: envelope.HealthDead, LastFailure: now.Add(-time.Second)}, false},
		{health.Status{State: envelope.HealthDead, LastFailure: now.Add(-deadPingInterval)}, true},
		{health.Status{State: envelope.HealthDead, LastFailure: started.Add(-time.Second)}, true}, // before this start
	} {
		assert.Equal(t, tc.want, duePing(tc.st, now, started), "%+v", tc.st)
	}
}

// TestNotOurWorker: which failures prove a peer is no Worker of ours.
func TestNotOurWorker(t *testing.T) {
	assert.True(t, notOurWorker(network.ErrReset))
	assert.True(t, notOurWorker(&network.StreamError{Remote: true, ErrorCode: network.StreamNoError}))
	assert.True(t, notOurWorker(&network.StreamError{Remote: true, ErrorCode: network.StreamProtocolNegotiationFailed}))
	assert.False(t, notOurWorker(&network.StreamError{Remote: true, ErrorCode: network.StreamResourceLimitExceeded}))
	assert.False(t, notOurWorker(&network.StreamError{Remote: false}))
	assert.False(t, notOurWorker(context.DeadlineExceeded))
	assert.False(t, notOurWorker(errJoin(context.Canceled, network.ErrReset)))
}

type joined struct{ errs []error }

func (j joined) Error() string   { return "joined" }
func (j joined) Unwrap() []error { return j.errs }

func errJoin(errs ...error) error { return joined{errs} }
