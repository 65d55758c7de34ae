package registry

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/protocols/envelope"
)

const (
	peer1   = "peer-1"
	worker1 = "worker-1"
)

var t0 = time.Date(2026, 7, 1, 12, 0, 0, 0, time.UTC)

// fixture is a Registry over a memKV with a fake clock and an OnChange recorder.
type fixture struct {
	r   *Registry
	kv  *memKV
	now time.Time

	mu      sync.Mutex
	changes []Change
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{kv: newMemKV(), now: t0}
	f.r = New(Options{
		KV:  f.kv,
		Now: func() time.Time { f.mu.Lock(); defer f.mu.Unlock(); return f.now },
		OnChange: func(c Change) {
			f.mu.Lock()
			defer f.mu.Unlock()
			f.changes = append(f.changes, c)
		},
	})
	return f
}

func (f *fixture) advance(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.now = f.now.Add(d)
}

// takeChanges returns the changes recorded since the last call.
func (f *fixture) takeChanges() []Change {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.changes
	f.changes = nil
	return c
}

func identity(workerID string, devs ...envelope.DeviceInfo) envelope.IdentityResponse {
	if devs == nil {
		devs = []envelope.DeviceInfo{}
	}
	return envelope.IdentityResponse{WorkerID: workerID, Devices: devs, DeviceFamily: "miner"}
}

func dev(id string) envelope.DeviceInfo { return envelope.DeviceInfo{DeviceID: id} }

func devInRack(id, rack string) envelope.DeviceInfo {
	return envelope.DeviceInfo{DeviceID: id, Rack: rack, Model: "M56S"}
}

func validContract() *envelope.Contract {
	return &envelope.Contract{
		Metadata: envelope.Metadata{
			Provider: "acme", DeviceFamily: "miner", Brand: "whatsminer", ModelsSupported: []string{"M56S"},
			Overview: "test miners",
		},
		Capabilities: envelope.Capabilities{
			Telemetry: []envelope.TelemetryChannel{{Name: "hashrate", Type: "number", Description: "TH/s"}},
			Commands:  []envelope.CommandSpec{{Name: "reboot"}},
			Health:    envelope.HealthSpec{SupportedStates: []string{"online", "offline"}},
		},
	}
}

// reach drives peer1/worker1 (devices dev-1 in rack-a and dev-2) to state, and forgets the changes made on
// the way. From DISCOVERED the entry has no workerId; discoveredWithID reaches DISCOVERED with one.
func (f *fixture) reach(t *testing.T, state string) {
	t.Helper()
	ctx := context.Background()
	steps := map[string]int{Unregistered: 0, Discovered: 1, IdentitySaved: 2, Ready: 3, Terminated: 4}[state]
	if steps >= 1 {
		_, err := f.r.Discovered(peer1)
		require.NoError(t, err)
	}
	if steps >= 2 {
		_, err := f.r.IdentitySaved(ctx, peer1, identity(worker1, devInRack("dev-1", "rack-a"), dev("dev-2")))
		require.NoError(t, err)
	}
	if steps >= 3 {
		_, err := f.r.Ready(ctx, peer1, validContract())
		require.NoError(t, err)
	}
	if steps >= 4 {
		_, err := f.r.Terminate(ctx, worker1)
		require.NoError(t, err)
	}
	require.Equal(t, state, f.state(peer1))
	f.takeChanges()
}

func (f *fixture) discoveredWithID(t *testing.T) {
	t.Helper()
	f.reach(t, IdentitySaved)
	_, err := f.r.Failed(context.Background(), peer1, "capabilities timed out")
	require.NoError(t, err)
	require.Equal(t, Discovered, f.state(peer1))
	f.takeChanges()
}

func (f *fixture) state(peerID string) string {
	v, ok := f.r.ByPeer(peerID)
	if !ok {
		return Unregistered
	}
	return v.State
}
