package telemetry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/orknode/ork/protocols/envelope"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// registry is the fake registry behind Owner, DevicesOf and Workers.
type registry struct {
	mu      sync.Mutex
	devices map[string][]string // worker → devices
}

func newRegistry(fleet map[string][]string) *registry { return &registry{devices: fleet} }

func (r *registry) owner(id string) (string, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for w, devs := range r.devices {
		if slices.Contains(devs, id) {
			return w, true
		}
	}
	return "", false
}

func (r *registry) devicesOf(w string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.devices[w])
}

func (r *registry) workers() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var ws []string
	for w := range r.devices {
		ws = append(ws, w)
	}
	sort.Strings(ws)
	return ws
}

func (r *registry) set(w string, devs ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if devs == nil {
		delete(r.devices, w)
		return
	}
	r.devices[w] = devs
}

// fakePuller answers from the registry: every device gets {"hashrate":100,"pull":<n>} where n counts the
// pulls of its Worker.
type fakePuller struct {
	reg *registry

	mu          sync.Mutex
	calls       map[string]int
	deviceCalls int
	inFlight    int
	maxInFlight int
	gate        chan struct{}    // when set, pulls wait for it to close (or ctx)
	delay       time.Duration    // virtual time a pull takes
	fail        map[string]error // by Worker
	devErr      map[string]string
	omit        map[string]bool
	stranger    bool   // add a device the registry does not list
	panicOn     string // Worker whose pull panics (after the gate)
}

func newPuller(reg *registry) *fakePuller {
	return &fakePuller{reg: reg, calls: map[string]int{}, fail: map[string]error{}, devErr: map[string]string{}, omit: map[string]bool{}}
}

func (p *fakePuller) PullWorker(ctx context.Context, w string) (envelope.TelemetryBatch, error) {
	p.mu.Lock()
	p.calls[w]++
	n := p.calls[w]
	p.inFlight++
	p.maxInFlight = max(p.maxInFlight, p.inFlight)
	gate, delay, err, panicOn := p.gate, p.delay, p.fail[w], p.panicOn
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		p.inFlight--
		p.mu.Unlock()
	}()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return envelope.TelemetryBatch{}, ctx.Err()
		}
	}
	if delay > 0 {
		time.Sleep(delay)
	}
	if w == panicOn {
		panic("puller exploded")
	}
	if err != nil {
		return envelope.TelemetryBatch{}, err
	}
	b := envelope.TelemetryBatch{WorkerID: w, Timestamp: time.Now().UnixMilli()}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, d := range p.reg.devicesOf(w) {
		switch {
		case p.omit[d]:
		case p.devErr[d] != "":
			b.Devices = append(b.Devices, envelope.DeviceTelemetry{DeviceID: d, Error: p.devErr[d]})
		default:
			b.Devices = append(b.Devices, envelope.DeviceTelemetry{DeviceID: d, Metrics: json.RawMessage(fmt.Sprintf(`{"hashrate":100,"pull":%d}`, n))})
		}
	}
	if p.stranger {
		b.Devices = append(b.Devices, envelope.DeviceTelemetry{DeviceID: "stranger", Metrics: json.RawMessage(`{"x":1}`)})
	}
	return b, nil
}

func (p *fakePuller) PullDevice(ctx context.Context, w, d string, q map[string]any) (json.RawMessage, error) {
	p.mu.Lock()
	p.deviceCalls++
	p.mu.Unlock()
	return json.RawMessage(fmt.Sprintf(`{"deviceId":%q,"logs":[],"type":%q}`, d, q["type"])), nil
}

func (p *fakePuller) count(w string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.calls[w]
}

func (p *fakePuller) setGate(g chan struct{}) {
	p.mu.Lock()
	p.gate = g
	p.mu.Unlock()
}

func (p *fakePuller) set(f func(p *fakePuller)) {
	p.mu.Lock()
	f(p)
	p.mu.Unlock()
}

func testFleet() map[string][]string {
	return map[string][]string{"w1": {"d1", "d2"}, "w2": {"d3"}}
}

func newCollector(t testing.TB, reg *registry, p Puller, mod ...func(*Options)) *Collector {
	t.Helper()
	o := Options{Puller: p, Owner: reg.owner, DevicesOf: reg.devicesOf, Workers: reg.workers}
	for _, m := range mod {
		m(&o)
	}
	c, err := New(o)
	require.NoError(t, err)
	return c
}

func pull(s Snapshot) float64 {
	var m map[string]any
	_ = json.Unmarshal(s.Metrics, &m)
	v, _ := m["pull"].(float64)
	return v
}

func TestNewValidates(t *testing.T) {
	reg := newRegistry(testFleet())
	p := newPuller(reg)
	ok := Options{Puller: p, Owner: reg.owner, DevicesOf: reg.devicesOf, Workers: reg.workers}
	for name, mod := range map[string]func(*Options){
		"Puller":        func(o *Options) { o.Puller = nil },
		"Owner":         func(o *Options) { o.Owner = nil },
		"DevicesOf":     func(o *Options) { o.DevicesOf = nil },
		"Workers":       func(o *Options) { o.Workers = nil },
		"MaxConcurrent": func(o *Options) { o.MaxConcurrent = -1 },
		"DefaultMaxAge": func(o *Options) { o.DefaultMaxAge = -time.Second },
	} {
		o := ok
		mod(&o)
		c, err := New(o)
		require.ErrorContains(t, err, "option "+name, name)
		require.Nil(t, c)
	}
	c, err := New(ok)
	require.NoError(t, err)
	require.Equal(t, DefaultMaxConcurrent, cap(c.slots))
	require.Equal(t, DefaultMaxAge, c.maxAge)
}

func TestDeviceCacheByAge(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		reg := newRegistry(testFleet())
		p := newPuller(reg)
		c := newCollector(t, reg, p)

		rep := c.Tick(ctx, []string{"w1", "w2"})
		require.Equal(t, 2, rep.Pulled)
		require.Equal(t, 3, rep.Devices)
		require.Empty(t, rep.Failed)

		s, cached, err := c.Device(ctx, "d1", UseDefaultMaxAge, nil)
		require.NoError(t, err)
		require.True(t, cached)
		require.Equal(t, 1.0, pull(s))
		require.Equal(t, "w1", s.WorkerID)
		require.Equal(t, 1, p.count("w1"))

		time.Sleep(10 * time.Second) // exactly the default max age: still served
		s, cached, err = c.Device(ctx, "d1", UseDefaultMaxAge, map[string]any{"type": "metrics"})
		require.NoError(t, err)
		require.True(t, cached)
		require.Equal(t, 10*time.Second, s.Age(time.Now()))

		time.Sleep(time.Millisecond) // older than 10 s: live pull of the owner
		s, cached, err = c.Device(ctx, "d1", UseDefaultMaxAge, map[string]any{"type": ""})
		require.NoError(t, err)
		require.False(t, cached)
		require.Equal(t, 2.0, pull(s))
		require.Equal(t, 2, p.count("w1"))
		require.Equal(t, 1, p.count("w2"))

		// The live pull refreshed every device of w1.
		s, cached, _ = c.Device(ctx, "d2", 5*time.Second, nil)
		require.True(t, cached)
		require.Equal(t, 2.0, pull(s))

		// A larger maxAge accepts the old w2 snapshot; maxAge 0 forces live.
		_, cached, _ = c.Device(ctx, "d3", time.Minute, nil)
		require.True(t, cached)
		s, cached, _ = c.Device(ctx, "d1", 0, nil)
		require.False(t, cached)
		require.Equal(t, 3.0, pull(s))
	})
}

func TestDefaultMaxAgeOption(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := newRegistry(testFleet())
		p := newPuller(reg)
		c := newCollector(t, reg, p, func(o *Options) { o.DefaultMaxAge = time.Second })
		c.Tick(t.Context(), []string{"w1"})
		time.Sleep(2 * time.Second)
		_, cached, err := c.Device(t.Context(), "d1", UseDefaultMaxAge, nil)
		require.NoError(t, err)
		require.False(t, cached)
	})
}

func TestDeviceUnknown(t *testing.T) {
	reg := newRegistry(testFleet())
	p := newPuller(reg)
	c := newCollector(t, reg, p)
	for _, q := range []map[string]any{nil, {"type": "logs"}} {
		_, _, err := c.Device(t.Context(), "nope", UseDefaultMaxAge, q)
		var e *envelope.Error
		require.ErrorAs(t, err, &e)
		require.Equal(t, "ERR_DEVICE_NOT_FOUND: nope", e.Error())
	}
	require.Zero(t, p.count("w1")+p.count("w2")+p.deviceCalls)
}

func TestDeviceNonMetricsQueryGoesLive(t *testing.T) {
	reg := newRegistry(testFleet())
	p := newPuller(reg)
	c := newCollector(t, reg, p)
	c.Tick(t.Context(), []string{"w1"})
	for i, q := range []map[string]any{{"type": "logs", "limit": 10.0}, {"type": "logs"}, {"type": 5}} {
		s, cached, err := c.Device(t.Context(), "d1", time.Hour, q)
		require.NoError(t, err)
		require.False(t, cached)
		require.Nil(t, s.Metrics)
		require.Equal(t, "w1", s.WorkerID)
		require.Contains(t, string(s.Raw), `"logs":[]`)
		require.Equal(t, i+1, p.deviceCalls)
	}
	require.Equal(t, 1, p.count("w1"))
}

func TestRawIsTheDevicePayload(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := newRegistry(map[string][]string{"w1": {"d1", "d2", "d3"}})
		p := newPuller(reg)
		p.devErr["d2"] = "ERR_DEVICE_UNAVAILABLE: d2"
		p.omit["d3"] = true
		p.stranger = true
		c := newCollector(t, reg, p)
		rep := c.Tick(t.Context(), []string{"w1"})
		require.Equal(t, 3, rep.Devices)
		ts := time.Now().UnixMilli()

		s, _, err := c.Device(t.Context(), "d1", time.Hour, nil)
		require.NoError(t, err)
		require.Empty(t, s.Error)
		require.JSONEq(t, `{"deviceId":"d1","metrics":{"hashrate":100,"pull":1},"timestamp":`+strconv.FormatInt(ts, 10)+`}`, string(s.Raw))

		// A device error is data, not a failure.
		s, cached, err := c.Device(t.Context(), "d2", time.Hour, nil)
		require.NoError(t, err)
		require.True(t, cached)
		require.Nil(t, s.Metrics)
		require.Equal(t, "ERR_DEVICE_UNAVAILABLE: d2", s.Error)
		require.JSONEq(t, `{"deviceId":"d2","error":"ERR_DEVICE_UNAVAILABLE: d2","timestamp":`+strconv.FormatInt(ts, 10)+`}`, string(s.Raw))

		// Left out of the batch: unavailable.
		s, _, err = c.Device(t.Context(), "d3", time.Hour, nil)
		require.NoError(t, err)
		require.Equal(t, "ERR_DEVICE_UNAVAILABLE: d3", s.Error)

		// A device the registry does not list is not cached.
		require.Equal(t, 3, c.Len())
		_, _, err = c.Device(t.Context(), "stranger", time.Hour, nil)
		require.Equal(t, envelope.CodeDeviceNotFound, envelope.CodeOf(err))
	})
}

func TestCoalescing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		reg := newRegistry(testFleet())
		p := newPuller(reg)
		c := newCollector(t, reg, p)
		gate := make(chan struct{})
		p.setGate(gate)

		const n = 50
		var wg sync.WaitGroup
		var live atomic.Int32
		for i := range n {
			wg.Go(func() {
				s, cached, err := c.Device(ctx, []string{"d1", "d2"}[i%2], 0, nil)
				if err == nil && !cached && pull(s) == 1 {
					live.Add(1)
				}
			})
		}
		wg.Go(func() {
			snaps, cached, err := c.Worker(ctx, "w1", 0)
			if err == nil && !cached && len(snaps) == 2 {
				live.Add(1)
			}
		})
		var rep TickReport
		wg.Go(func() { rep = c.Tick(ctx, []string{"w1"}) })
		synctest.Wait() // everyone is waiting on the one pull
		require.Equal(t, 1, p.count("w1"))
		close(gate)
		wg.Wait()
		require.Equal(t, int32(n+1), live.Load())
		require.Equal(t, 1, rep.Pulled)
		require.Equal(t, 1, p.count("w1"))
		require.Zero(t, p.count("w2"))
	})
}

func TestConcurrencyBound(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		fleet := map[string][]string{}
		var ws []string
		for i := range 10 {
			w := fmt.Sprintf("w%d", i)
			fleet[w] = []string{"d" + w}
			ws = append(ws, w)
		}
		fleet["other"] = []string{"dother"}
		reg := newRegistry(fleet)
		p := newPuller(reg)
		c := newCollector(t, reg, p, func(o *Options) { o.MaxConcurrent = 3 })

		gate := make(chan struct{})
		p.setGate(gate)
		var rep TickReport
		done := make(chan struct{})
		go func() { rep = c.Tick(ctx, ws); close(done) }()
		synctest.Wait()
		p.mu.Lock()
		require.Equal(t, 3, p.inFlight)
		p.mu.Unlock()

		// A caller beyond the bound waits for a slot, bounded by its ctx.
		short, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		start := time.Now()
		_, _, err := c.Device(short, "dother", 0, nil)
		require.ErrorIs(t, err, context.DeadlineExceeded)
		require.Equal(t, time.Second, time.Since(start))
		require.Zero(t, p.count("other"))
		_, _, err = c.Device(short, "dother", 0, map[string]any{"type": "logs"})
		require.ErrorIs(t, err, context.DeadlineExceeded)

		close(gate)
		<-done
		require.Equal(t, 10, rep.Pulled)
		require.Equal(t, 3, p.maxInFlight)

		// Fleet with maxAge 0 pulls every Worker live, never more than 3 at once.
		gate = make(chan struct{})
		p.setGate(gate)
		var view FleetView
		done = make(chan struct{})
		go func() { view = c.Fleet(ctx, 0); close(done) }()
		synctest.Wait()
		p.mu.Lock()
		require.Equal(t, 3, p.inFlight)
		p.mu.Unlock()
		close(gate)
		<-done
		require.Equal(t, 11, view.Live)
		require.Len(t, view.Snapshots, 11)
		require.Empty(t, view.Failed)
		require.Equal(t, 3, p.maxInFlight)
	})
}

// TestLeaderGivesUp: the caller running a shared pull leaves (its ctx ends); the one sharing it does not
// inherit that cancellation but runs the pull again.
func TestLeaderGivesUp(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := newRegistry(testFleet())
		p := newPuller(reg)
		c := newCollector(t, reg, p)
		gate := make(chan struct{})
		p.setGate(gate)

		short, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		var leaderErr, followerErr error
		var follower Snapshot
		var wg sync.WaitGroup
		wg.Go(func() { _, _, leaderErr = c.Device(short, "d1", 0, nil) })
		synctest.Wait()
		wg.Go(func() { follower, _, followerErr = c.Device(context.Background(), "d2", 0, nil) })
		synctest.Wait()
		require.Equal(t, 1, p.count("w1"))

		time.Sleep(2 * time.Second)
		synctest.Wait()
		require.ErrorIs(t, leaderErr, context.DeadlineExceeded)
		require.Equal(t, 2, p.count("w1"), "the follower pulls again")
		close(gate)
		wg.Wait()
		require.NoError(t, followerErr)
		require.Equal(t, 2.0, pull(follower))
	})
}

func TestTickReportsFailures(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		reg := newRegistry(testFleet())
		p := newPuller(reg)
		p.delay = 2 * time.Second
		c := newCollector(t, reg, p)
		require.Equal(t, 2, c.Tick(ctx, []string{"w1", "w2"}).Pulled)

		dial := errors.New("dial failed")
		p.set(func(p *fakePuller) { p.fail["w2"] = dial })
		rep := c.Tick(ctx, []string{"w1", "w2", "w1"})
		require.Equal(t, 1, rep.Pulled)
		require.Equal(t, 2, rep.Devices)
		require.Len(t, rep.Failed, 1)
		require.ErrorIs(t, rep.Failed["w2"], dial)
		require.Equal(t, 2*time.Second, rep.Duration, "pulls run concurrently")
		require.Equal(t, 2, p.count("w1"), "duplicates pulled once")

		// The failed Worker keeps its last snapshot, ageing; a live request for it fails.
		time.Sleep(10 * time.Second)
		s, cached, err := c.Device(ctx, "d3", time.Minute, nil)
		require.NoError(t, err)
		require.True(t, cached)
		require.Equal(t, 1.0, pull(s))
		_, _, err = c.Device(ctx, "d3", UseDefaultMaxAge, nil)
		require.ErrorIs(t, err, dial)

		// A Puller's MDK error keeps its code through the wrapping.
		p.set(func(p *fakePuller) { p.fail["w2"] = envelope.Err(envelope.CodeChannelTimeout) })
		_, _, err = c.Device(ctx, "d3", 0, nil)
		require.Equal(t, envelope.CodeChannelTimeout, envelope.CodeOf(err))
	})
}

func TestEvictionAndForget(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		reg := newRegistry(testFleet())
		p := newPuller(reg)
		c := newCollector(t, reg, p)
		c.Tick(ctx, []string{"w1", "w2"})
		require.Equal(t, 3, c.Len())

		// d2 leaves w1: the next refresh of w1 drops its snapshot.
		reg.set("w1", "d1")
		c.Tick(ctx, []string{"w1"})
		require.Equal(t, 2, c.Len())
		_, ok := c.snaps.Load("d2")
		require.False(t, ok)

		// d1 moves to w2: w1's snapshot of it is not served, w2 is pulled.
		reg.set("w1", "dx")
		reg.set("w2", "d3", "d1")
		s, cached, err := c.Device(ctx, "d1", time.Hour, nil)
		require.NoError(t, err)
		require.False(t, cached)
		require.Equal(t, "w2", s.WorkerID)
		c.Tick(ctx, []string{"w1"}) // w1 no longer owns d1: its refresh leaves w2's snapshot alone
		s, cached, _ = c.Device(ctx, "d1", time.Hour, nil)
		require.True(t, cached)
		require.Equal(t, "w2", s.WorkerID)

		c.Forget("w2")
		_, ok = c.snaps.Load("d1")
		require.False(t, ok)
		require.Equal(t, 1, c.Len()) // dx of w1
		c.Forget("w1")
		require.Zero(t, c.Len())
		require.Empty(t, c.byWorker)
	})
}

// TestForgetDuringPull: a pull still in flight when its Worker is terminated stores nothing.
func TestForgetDuringPull(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := newRegistry(testFleet())
		p := newPuller(reg)
		c := newCollector(t, reg, p)
		gate := make(chan struct{})
		p.setGate(gate)
		var err error
		done := make(chan struct{})
		go func() { _, _, err = c.Device(context.Background(), "d3", 0, nil); close(done) }()
		synctest.Wait()
		reg.set("w2") // the registry drops w2, then the node forgets it
		c.Forget("w2")
		close(gate)
		<-done
		require.Equal(t, envelope.CodeDeviceNotFound, envelope.CodeOf(err))
		require.Zero(t, c.Len())
	})
}

func TestWorkerAndFleet(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		reg := newRegistry(testFleet())
		p := newPuller(reg)
		c := newCollector(t, reg, p)

		snaps, cached, err := c.Worker(ctx, "w1", UseDefaultMaxAge)
		require.NoError(t, err)
		require.False(t, cached)
		require.Equal(t, []string{"d1", "d2"}, ids(snaps))
		snaps, cached, err = c.Worker(ctx, "w1", UseDefaultMaxAge)
		require.NoError(t, err)
		require.True(t, cached)
		require.Len(t, snaps, 2)
		require.Equal(t, 1, p.count("w1"))

		snaps, cached, err = c.Worker(ctx, "nobody", 0)
		require.NoError(t, err)
		require.True(t, cached)
		require.Empty(t, snaps)

		// w1 is fresh, w2 was never pulled: only w2 goes live.
		v := c.Fleet(ctx, UseDefaultMaxAge)
		require.Equal(t, 1, v.Live)
		require.Empty(t, v.Failed)
		require.Equal(t, []string{"d1", "d2", "d3"}, ids(v.Snapshots))
		require.Equal(t, 1, p.count("w1"))
		require.Equal(t, 1, p.count("w2"))

		// Both stale, w2 failing: its last snapshot is still reported, with the failure.
		dial := errors.New("dial failed")
		p.set(func(p *fakePuller) { p.fail["w2"] = dial })
		time.Sleep(11 * time.Second)
		v = c.Fleet(ctx, UseDefaultMaxAge)
		require.Equal(t, 2, v.Live)
		require.ErrorIs(t, v.Failed["w2"], dial)
		require.Equal(t, []string{"d1", "d2", "d3"}, ids(v.Snapshots))
		require.Equal(t, 11*time.Second, v.Snapshots[2].Age(time.Now()))
		require.Zero(t, v.Snapshots[0].Age(time.Now()))

		// A failed live Worker pull.
		_, _, err = c.Worker(ctx, "w2", 0)
		require.ErrorIs(t, err, dial)
	})
}

func ids(snaps []Snapshot) []string {
	var out []string
	for _, s := range snaps {
		out = append(out, s.DeviceID)
	}
	return out
}

// TestPanickingPuller: the panic reaches the caller that ran the pull; those sharing it get ErrPullAborted
// and the next pull works.
func TestPanickingPuller(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := newRegistry(testFleet())
		p := newPuller(reg)
		c := newCollector(t, reg, p)
		gate := make(chan struct{})
		p.set(func(p *fakePuller) { p.gate, p.panicOn = gate, "w1" })

		var recovered any
		var followerErr error
		var wg sync.WaitGroup
		wg.Go(func() {
			defer func() { recovered = recover() }()
			_, _, _ = c.Device(context.Background(), "d1", 0, nil)
		})
		synctest.Wait()
		wg.Go(func() { _, _, followerErr = c.Device(context.Background(), "d2", 0, nil) })
		synctest.Wait()
		close(gate)
		wg.Wait()
		require.Equal(t, "puller exploded", recovered)
		require.ErrorIs(t, followerErr, ErrPullAborted)

		p.set(func(p *fakePuller) { p.panicOn = "" })
		_, _, err := c.Device(context.Background(), "d1", 0, nil)
		require.NoError(t, err)
		require.Empty(t, c.flights)
	})
}

// TestCacheHitDoesNotAllocate pins the hot path.
func TestCacheHitDoesNotAllocate(t *testing.T) {
	reg := newRegistry(testFleet())
	p := newPuller(reg)
	c := newCollector(t, reg, p, func(o *Options) {
		o.Owner = func(string) (string, bool) { return "w1", true }
	})
	c.Tick(t.Context(), []string{"w1"})
	ctx := t.Context()
	allocs := testing.AllocsPerRun(1000, func() {
		if _, cached, err := c.Device(ctx, "d1", time.Hour, nil); err != nil || !cached {
			panic("miss")
		}
	})
	require.Zero(t, allocs)
}

// BenchmarkDeviceCached measures a cache hit: 10,000 devices on 100 Workers, every pull served from the
// snapshot, from b.RunParallel's GOMAXPROCS goroutines (run with -cpu 1,2).
func BenchmarkDeviceCached(b *testing.B) {
	fleet := map[string][]string{}
	owners := map[string]string{}
	var all []string
	for w := range 100 {
		wid := fmt.Sprintf("w%03d", w)
		for d := range 100 {
			did := fmt.Sprintf("%s-d%03d", wid, d)
			fleet[wid] = append(fleet[wid], did)
			owners[did] = wid
			all = append(all, did)
		}
	}
	reg := newRegistry(fleet)
	p := newPuller(reg)
	c := newCollector(b, reg, p, func(o *Options) {
		// The node's registry answers from a map under its own lock; a plain map read stands in for it.
		o.Owner = func(id string) (string, bool) { w, ok := owners[id]; return w, ok }
	})
	rep := c.Tick(context.Background(), reg.workers())
	require.Empty(b, rep.Failed)
	require.Equal(b, len(all), rep.Devices)
	ctx := context.Background()
	var seed atomic.Uint32
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := int(seed.Add(7919))
		for pb.Next() {
			i++
			if _, cached, err := c.Device(ctx, all[i%len(all)], UseDefaultMaxAge, nil); err != nil || !cached {
				b.Fatal("miss", err)
			}
		}
	})
}
