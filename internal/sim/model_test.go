package sim

import (
	"context"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/protocols/envelope"
)

// fakeClock is the model clock of the tests.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock() *fakeClock { return &fakeClock{now: time.Unix(1_700_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// newTestMiner makes an S21 whose command durations are near zero in real
// time; the values follow the fake clock.
func newTestMiner(seed uint64, clk *fakeClock) *Miner {
	return NewMiner(MinerConfig{DeviceID: "m-1", Model: Models[4], Seed: seed, TimeScale: 1e-6, Now: clk.Now,
		Pool: Pool{URL: "stratum+tcp://pool.invalid:3333"}})
}

func TestMinerDeterministicWithSeed(t *testing.T) {
	read := func(seed uint64) []map[string]any {
		clk := newClock()
		m := newTestMiner(seed, clk)
		var out []map[string]any
		for range 5 {
			clk.Add(10 * time.Second)
			out = append(out, m.Metrics())
		}
		return out
	}
	a, b := read(42), read(42)
	require.Equal(t, a, b, "same seed, same clock: same values")
	require.NotEqual(t, a, read(43), "another seed: other noise")

	v := a[0]
	require.InDelta(t, 200, v["hashrate"], 20, "S21 ≈ 200 TH/s")
	require.InDelta(t, 3500, v["power"], 100)
	require.Equal(t, StatusOnline, v["status"])
	require.Equal(t, 10.0, v["uptime"])
	require.Equal(t, "stratum+tcp://pool.invalid:3333", v["poolUrl"])
	require.InDelta(t, 70, v["chipTemp"], 3, "warm at start: ambient 25 + 45")
	require.Greater(t, v["chipTemp"].(float64), v["boardTemp"].(float64))
	require.Greater(t, v["fanRpm"].(float64), 2000.0)
	for _, ch := range Contract(1).Capabilities.Telemetry {
		require.Contains(t, v, ch.Name, "every declared channel is reported")
	}
}

func TestPowerModeMovesHashrateAndPower(t *testing.T) {
	clk := newClock()
	m := newTestMiner(1, clk)
	ctx := context.Background()

	low, err := m.SetPowerMode(ctx, ModeLow)
	require.NoError(t, err)
	require.Equal(t, ModeNormal, low["previous"])
	require.InDelta(t, 150, low["expectedHashrate"], 0.01)
	require.InDelta(t, 2380, low["expectedPower"], 1)
	v := m.Metrics()
	require.InDelta(t, 150, v["hashrate"], 10)
	require.InDelta(t, 2380, v["power"], 50)
	require.Equal(t, ModeLow, v["powerMode"])

	high, err := m.SetPowerMode(ctx, ModeHigh)
	require.NoError(t, err)
	require.InDelta(t, 224, high["expectedHashrate"], 0.01)
	require.InDelta(t, 4270, high["expectedPower"], 1)

	// The chips heat up with inertia: part way after a quarter of the time
	// constant, at the new level after five.
	tau := m.scaled(ThermalTau)
	before := m.Metrics()["chipTemp"].(float64)
	clk.Add(tau / 4)
	mid := m.Metrics()["chipTemp"].(float64)
	clk.Add(5 * tau)
	after := m.Metrics()["chipTemp"].(float64)
	require.Greater(t, mid, before+1)
	require.Less(t, mid, after-4)
	require.InDelta(t, 25+45*1.22, after, 1.5)

	_, err = m.SetPowerMode(ctx, "turbo")
	require.Equal(t, envelope.CodeParamEnum, envelope.CodeOf(err))
}

func TestPowerLimitEnforced(t *testing.T) {
	clk := newClock()
	m := newTestMiner(1, clk)
	ctx := context.Background()
	for _, w := range []float64{999, 5001} {
		_, err := m.SetPowerLimit(ctx, w)
		require.Equal(t, envelope.CodeParamRange, envelope.CodeOf(err), "%v W", w)
	}
	res, err := m.SetPowerLimit(ctx, 1750)
	require.NoError(t, err)
	require.Equal(t, 1750.0, res["expectedPower"])
	v := m.Metrics()
	require.InDelta(t, 1750, v["power"], 30)
	require.InDelta(t, 100, v["hashrate"], 8, "half the power, half the hashrate")
	require.Equal(t, 1750.0, v["powerLimit"])

	// A limit above the draw changes nothing.
	_, err = m.SetPowerLimit(ctx, 5000)
	require.NoError(t, err)
	require.InDelta(t, 3500, m.Metrics()["power"], 60)
}

func TestRebootLedPools(t *testing.T) {
	clk := newClock()
	m := newTestMiner(1, clk)
	ctx := context.Background()
	clk.Add(time.Hour)
	require.Equal(t, 3600.0, m.Metrics()["uptime"])

	res, err := m.Reboot(ctx)
	require.NoError(t, err)
	require.Equal(t, true, res["rebooted"])
	// The fake clock has not moved: the miner is still down.
	v := m.Metrics()
	require.Equal(t, StatusRebooting, v["status"])
	require.Equal(t, 0.0, v["hashrate"])
	require.Equal(t, 0.0, v["uptime"])
	require.Equal(t, 6000.0, v["fanRpm"])
	_, err = m.SetLed(ctx, true)
	require.Equal(t, "ERR_DEVICE_UNAVAILABLE: m-1 (rebooting)", err.Error())
	_, err = m.Reboot(ctx)
	require.Equal(t, envelope.CodeDeviceUnavailable, envelope.CodeOf(err))

	clk.Add(time.Duration(float64(RebootDuration)*1e-6) + 3*time.Second)
	v = m.Metrics()
	require.Equal(t, StatusOnline, v["status"])
	require.Equal(t, 3.0, v["uptime"])
	require.Greater(t, v["hashrate"].(float64), 150.0)

	_, err = m.SetLed(ctx, true)
	require.NoError(t, err)
	require.Equal(t, true, m.Metrics()["led"])

	pools, err := ParsePools(map[string]any{"list": []any{
		map[string]any{"url": "stratum+tcp://a.invalid:3333", "user": "u"},
		map[string]any{"url": "stratum+tcp://b.invalid:3333"},
	}})
	require.NoError(t, err)
	_, err = m.SetPools(ctx, pools)
	require.NoError(t, err)
	require.Equal(t, "stratum+tcp://a.invalid:3333", m.Metrics()["poolUrl"])
	require.Len(t, m.Pools(), 2)
	one, err := ParsePools(map[string]any{"url": "stratum+tcp://c.invalid:1"})
	require.NoError(t, err)
	require.Equal(t, []Pool{{URL: "stratum+tcp://c.invalid:1"}}, one)
	_, err = ParsePools(map[string]any{"user": "x"})
	require.Error(t, err)
	_, err = m.SetPools(ctx, []Pool{{URL: "nope"}})
	require.Error(t, err)

	m.SetOffline(true)
	require.Equal(t, StatusOffline, m.Metrics()["status"])
	require.Equal(t, 0.0, m.Metrics()["power"])
	m.SetOffline(false)
	require.Equal(t, StatusOnline, m.Status())
}

func TestCommandHonoursContext(t *testing.T) {
	m := NewMiner(MinerConfig{DeviceID: "m-2", TimeScale: 100}) // a 100 s power-mode change
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	_, err := m.SetPowerMode(ctx, ModeLow)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Equal(t, ModeNormal, m.Metrics()["powerMode"], "an interrupted command has no effect")
}

func TestContractValid(t *testing.T) {
	for _, scale := range []float64{1, 0.001} {
		c := Contract(scale)
		require.NoError(t, c.Validate())
		require.Equal(t, "miner", c.Metadata.DeviceFamily)
		require.Equal(t, "ork-sim", c.Metadata.Provider)
		for _, name := range []string{"reboot", "setPowerMode", "setLed", "setPowerLimit", "setPools"} {
			spec, ok := c.Command(name)
			require.True(t, ok, name)
			require.Positive(t, spec.DurationMs, name)
		}
		spec, _ := c.Command("setPowerLimit")
		require.Error(t, spec.ValidateParams(map[string]any{"watts": 900.0}))
		require.NoError(t, spec.ValidateParams(map[string]any{"watts": 3000.0}))
		spec, _ = c.Command("setPowerMode")
		require.Error(t, spec.ValidateParams(map[string]any{"mode": "max"}))
	}
	spec, _ := Contract(1).Command("reboot")
	require.Equal(t, RebootDuration.Milliseconds(), spec.DurationMs)
}

func TestParseLatencyAndFaults(t *testing.T) {
	for in, want := range map[string]Latency{
		"":           {},
		"0":          {},
		"5ms":        {5 * time.Millisecond, 5 * time.Millisecond},
		"2ms-20ms":   {2 * time.Millisecond, 20 * time.Millisecond},
		" 1s-1500ms": {time.Second, 1500 * time.Millisecond},
	} {
		got, err := ParseLatency(in)
		require.NoError(t, err, in)
		require.Equal(t, want, got, in)
	}
	for _, bad := range []string{"fast", "20ms-2ms", "-5ms", "5ms-", "5"} {
		_, err := ParseLatency(bad)
		require.Error(t, err, bad)
	}
	require.NoError(t, Faults{ErrorRate: 0.2, HangRate: 0.01}.Validate())
	require.Error(t, Faults{ErrorRate: 1.2}.Validate())
	require.Error(t, Faults{HangRate: -0.1}.Validate())
	require.Error(t, Faults{ErrorRate: 0.7, HangRate: 0.7}.Validate())
	require.Error(t, Faults{CrashEvery: -time.Second}.Validate())

	r := rand.New(rand.NewPCG(1, 2))
	l := Latency{2 * time.Millisecond, 4 * time.Millisecond}
	for range 100 {
		d := l.draw(r)
		require.True(t, d >= l.Min && d <= l.Max, d)
	}
}

func TestInjectedFaults(t *testing.T) {
	ran := 0
	ok := func(context.Context, string, map[string]any) (any, error) { ran++; return "ok", nil }

	fail := newInjector(Faults{ErrorRate: 1}, 1, 0).wrap(ok)
	_, err := fail(context.Background(), "d", nil)
	require.ErrorContains(t, err, "ERR_SIM_FAULT: injected failure on d")

	hang := newInjector(Faults{HangRate: 1}, 1, 0).wrap(ok)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Millisecond)
	defer cancel()
	_, err = hang(ctx, "d", nil)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Zero(t, ran, "a failed or hung command never touches the device")

	none := newInjector(Faults{}, 1, 0)
	require.Nil(t, none.intercept())
	res, err := none.wrap(ok)(context.Background(), "d", nil)
	require.NoError(t, err)
	require.Equal(t, "ok", res)

	// Deterministic with the seed: the same draws for the same Worker.
	a, b := newInjector(Faults{ErrorRate: 0.5}, 7, 3), newInjector(Faults{ErrorRate: 0.5}, 7, 3)
	for range 20 {
		require.Equal(t, a.float(), b.float())
	}
}
