// Package sim simulates a fleet of ORK Workers that own bitcoin miners: a
// device model with realistic, seeded telemetry and commands that take time,
// a miner contract, fault injection (latency, failures, hangs, crashes,
// flapping) and the fleet runner used by ork-worker-sim and by tests.
package sim

import (
	"context"
	"fmt"
	"hash/fnv"
	"math"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"github.com/orknode/ork/protocols/envelope"
)

// Miner statuses (the "status" telemetry channel).
const (
	StatusOnline    = "online"
	StatusRebooting = "rebooting"
	StatusOffline   = "offline"
)

// Power modes of setPowerMode.
const (
	ModeLow    = "low"
	ModeNormal = "normal"
	ModeHigh   = "high"
)

// Power-limit bounds of setPowerLimit (also published in the contract).
const (
	MinPowerLimitW = 1000
	MaxPowerLimitW = 5000
)

// Nominal durations at time scale 1.
const (
	RebootDuration    = 5 * time.Second
	PowerModeDuration = time.Second
	PowerLimitDelay   = 500 * time.Millisecond
	PoolsDuration     = 300 * time.Millisecond
	LedDuration       = 50 * time.Millisecond
	// ThermalTau is the time constant of the chip and board temperatures.
	ThermalTau = 90 * time.Second
)

// ModelSpec is a miner model at normal power mode.
type ModelSpec struct {
	Name        string
	HashrateTHs float64
	PowerW      float64
}

// Models are the simulated miner models, picked per device by the seed.
var Models = []ModelSpec{
	{"S19j Pro", 104, 3068},
	{"M50S", 126, 3276},
	{"S19 XP", 141, 3010},
	{"M60S", 186, 3344},
	{"S21", 200, 3500},
}

// modeFactors scale hashrate and power per power mode.
var modeFactors = map[string]struct{ hash, power float64 }{
	ModeLow:    {0.75, 0.68},
	ModeNormal: {1, 1},
	ModeHigh:   {1.12, 1.22},
}

// Pool is one mining pool of setPools.
type Pool struct {
	URL      string `json:"url"`
	User     string `json:"user,omitempty"`
	Password string `json:"password,omitempty"`
}

// MinerConfig describes one simulated miner.
type MinerConfig struct {
	DeviceID string
	Rack     string
	Model    ModelSpec
	Seed     uint64
	AmbientC float64 // default 25
	// TimeScale multiplies every model duration (reboot, command run time,
	// thermal inertia): 0.01 makes a 5 s reboot take 50 ms. Default 1.
	TimeScale float64
	// Now is the clock the values follow; default time.Now.
	Now  func() time.Time
	Pool Pool // the initial pool
}

// Miner is one simulated miner. Safe for concurrent use.
type Miner struct {
	cfg MinerConfig

	mu          sync.Mutex
	rng         *rand.Rand
	mode        string
	powerLimit  float64 // 0: none
	led         bool
	pools       []Pool
	status      string
	bootedAt    time.Time
	rebootUntil time.Time
	chipC       float64
	boardC      float64
	last        time.Time
}

// NewMiner makes a miner, booted at the clock's now and already warm.
func NewMiner(cfg MinerConfig) *Miner {
	if cfg.AmbientC == 0 {
		cfg.AmbientC = 25
	}
	if cfg.TimeScale <= 0 {
		cfg.TimeScale = 1
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Model.Name == "" {
		cfg.Model = Models[0]
	}
	h := fnv.New64a()
	h.Write([]byte(cfg.DeviceID))
	now := cfg.Now()
	m := &Miner{
		cfg:      cfg,
		rng:      rand.New(rand.NewPCG(cfg.Seed, h.Sum64())),
		mode:     ModeNormal,
		status:   StatusOnline,
		bootedAt: now,
		last:     now,
	}
	if cfg.Pool.URL != "" {
		m.pools = []Pool{cfg.Pool}
	}
	m.chipC, m.boardC = m.targetTemps(m.power())
	return m
}

// DeviceID is the miner's device id.
func (m *Miner) DeviceID() string { return m.cfg.DeviceID }

// Model is the miner's model.
func (m *Miner) Model() ModelSpec { return m.cfg.Model }

// Rack is the miner's rack label.
func (m *Miner) Rack() string { return m.cfg.Rack }

func (m *Miner) scaled(d time.Duration) time.Duration {
	return time.Duration(float64(d) * m.cfg.TimeScale)
}

// power is the draw without noise, in W, after mode and limit.
func (m *Miner) power() float64 {
	switch m.status {
	case StatusOffline:
		return 0
	case StatusRebooting:
		return 150 // control board and fans
	}
	p := m.cfg.Model.PowerW * modeFactors[m.mode].power
	if m.powerLimit > 0 && p > m.powerLimit {
		p = m.powerLimit
	}
	return p
}

// hashrate without noise, in TH/s: proportional to power within a mode.
func (m *Miner) hashrate() float64 {
	if m.status != StatusOnline {
		return 0
	}
	f := modeFactors[m.mode]
	uncapped := m.cfg.Model.PowerW * f.power
	return m.cfg.Model.HashrateTHs * f.hash * m.power() / uncapped
}

func (m *Miner) targetTemps(power float64) (chip, board float64) {
	frac := power / m.cfg.Model.PowerW
	return m.cfg.AmbientC + 45*frac, m.cfg.AmbientC + 33*frac
}

// advance moves the state to now: a finished reboot comes back online,
// temperatures approach their targets with thermal inertia.
func (m *Miner) advance(now time.Time) {
	if m.status == StatusRebooting && !now.Before(m.rebootUntil) {
		// Temperatures cooled until the reboot ended, then heat again.
		m.advanceTemps(m.rebootUntil)
		m.status = StatusOnline
		m.bootedAt = m.rebootUntil
	}
	m.advanceTemps(now)
}

func (m *Miner) advanceTemps(now time.Time) {
	dt := now.Sub(m.last)
	if dt <= 0 {
		return
	}
	m.last = now
	k := 1 - math.Exp(-float64(dt)/float64(m.scaled(ThermalTau)))
	chip, board := m.targetTemps(m.power())
	m.chipC += (chip - m.chipC) * k
	m.boardC += (board - m.boardC) * k
}

func (m *Miner) noise(rel float64) float64 { return 1 + m.rng.NormFloat64()*rel }

// Status is the miner's status now.
func (m *Miner) Status() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.advance(m.cfg.Now())
	return m.status
}

// Metrics reads every telemetry channel of the contract.
func (m *Miner) Metrics() map[string]any {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.cfg.Now()
	m.advance(now)
	hash := m.hashrate()
	if hash > 0 {
		hash *= m.noise(0.015)
	}
	power := m.power()
	if power > 0 {
		power *= m.noise(0.004)
	}
	chip := m.chipC + m.rng.NormFloat64()*0.3
	board := m.boardC + m.rng.NormFloat64()*0.3
	fan := 0.0
	switch m.status {
	case StatusRebooting:
		fan = 6000 // fans at full speed while the control board boots
	case StatusOnline:
		fan = min(max(2200+(m.chipC-45)*130, 1800), 6600) * m.noise(0.01)
	}
	uptime := 0.0
	if m.status == StatusOnline {
		uptime = math.Floor(now.Sub(m.bootedAt).Seconds())
	}
	pool := ""
	if len(m.pools) > 0 {
		pool = m.pools[0].URL
	}
	return map[string]any{
		"hashrate":   round(hash, 2),
		"power":      math.Round(power),
		"chipTemp":   round(chip, 1),
		"boardTemp":  round(board, 1),
		"fanRpm":     math.Round(fan),
		"status":     m.status,
		"uptime":     uptime,
		"poolUrl":    pool,
		"powerMode":  m.mode,
		"powerLimit": m.powerLimit,
		"led":        m.led,
	}
}

func round(v float64, places int) float64 {
	p := math.Pow(10, float64(places))
	return math.Round(v*p) / p
}

// SetOffline powers the miner off (true) or on again (false).
func (m *Miner) SetOffline(off bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.cfg.Now()
	m.advance(now)
	switch {
	case off:
		m.status = StatusOffline
	case m.status == StatusOffline:
		m.status = StatusOnline
		m.bootedAt = now
	}
}

// ready fails unless the miner can take a command now.
func (m *Miner) readyLocked() error {
	m.advance(m.cfg.Now())
	if m.status != StatusOnline {
		return envelope.Errf(envelope.CodeDeviceUnavailable, "%s (%s)", m.cfg.DeviceID, m.status)
	}
	return nil
}

// run waits the command's duration (its physical effect), then applies it
// under the lock if the miner can still take it.
func (m *Miner) run(ctx context.Context, d time.Duration, apply func() (map[string]any, error)) (map[string]any, error) {
	m.mu.Lock()
	err := m.readyLocked()
	m.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if err := sleep(ctx, m.scaled(d)); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.readyLocked(); err != nil {
		return nil, err
	}
	return apply()
}

// Reboot takes the miner offline for the reboot duration; it returns once
// the miner is back (or ctx ends: the miner comes back regardless).
func (m *Miner) Reboot(ctx context.Context) (map[string]any, error) {
	m.mu.Lock()
	if err := m.readyLocked(); err != nil {
		m.mu.Unlock()
		return nil, err
	}
	now := m.cfg.Now()
	d := m.scaled(RebootDuration)
	m.status = StatusRebooting
	m.rebootUntil = now.Add(d)
	m.mu.Unlock()
	if err := sleep(ctx, d); err != nil {
		return nil, err
	}
	return map[string]any{"rebooted": true, "downMs": d.Milliseconds()}, nil
}

// SetPowerMode moves hashrate and power to the mode's level.
func (m *Miner) SetPowerMode(ctx context.Context, mode string) (map[string]any, error) {
	if _, ok := modeFactors[mode]; !ok {
		return nil, envelope.Errf(envelope.CodeParamEnum, "mode must be one of [low normal high]")
	}
	return m.run(ctx, PowerModeDuration, func() (map[string]any, error) {
		prev := m.mode
		m.mode = mode
		return map[string]any{"mode": mode, "previous": prev,
			"expectedHashrate": round(m.hashrate(), 2), "expectedPower": math.Round(m.power())}, nil
	})
}

// SetPowerLimit caps the power draw (hashrate follows); limits enforced.
func (m *Miner) SetPowerLimit(ctx context.Context, watts float64) (map[string]any, error) {
	if math.IsNaN(watts) || watts < MinPowerLimitW || watts > MaxPowerLimitW {
		return nil, envelope.Errf(envelope.CodeParamRange, "watts must be within [%d, %d]", MinPowerLimitW, MaxPowerLimitW)
	}
	return m.run(ctx, PowerLimitDelay, func() (map[string]any, error) {
		m.powerLimit = watts
		return map[string]any{"powerLimit": watts, "expectedPower": math.Round(m.power())}, nil
	})
}

// SetLed turns the locate LED on or off.
func (m *Miner) SetLed(ctx context.Context, on bool) (map[string]any, error) {
	return m.run(ctx, LedDuration, func() (map[string]any, error) {
		m.led = on
		return map[string]any{"led": on}, nil
	})
}

// SetPools replaces the pool list (first = active).
func (m *Miner) SetPools(ctx context.Context, pools []Pool) (map[string]any, error) {
	if len(pools) == 0 || len(pools) > 3 {
		return nil, envelope.Errf(envelope.CodeParamRange, "pools: 1 to 3 pools")
	}
	for i, p := range pools {
		if !strings.Contains(p.URL, "://") {
			return nil, envelope.Errf(envelope.CodeParamType, "pools[%d].url %q is not a URL", i, p.URL)
		}
	}
	return m.run(ctx, PoolsDuration, func() (map[string]any, error) {
		m.pools = append([]Pool(nil), pools...)
		return map[string]any{"pools": len(pools), "active": pools[0].URL}, nil
	})
}

// Pools returns the pool list.
func (m *Miner) Pools() []Pool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]Pool(nil), m.pools...)
}

// ParsePools reads setPools' pools parameter: one pool {url, user?,
// password?} or {list: [pool, ...]} (the contract's param types have no
// array, so a list comes wrapped in an object).
func ParsePools(v any) ([]Pool, error) {
	obj, ok := v.(map[string]any)
	if !ok {
		return nil, envelope.Errf(envelope.CodeParamType, "pools must be object")
	}
	if list, ok := obj["list"].([]any); ok {
		out := make([]Pool, 0, len(list))
		for i, item := range list {
			p, err := parsePool(item)
			if err != nil {
				return nil, envelope.Errf(envelope.CodeParamType, "pools.list[%d]: %v", i, err)
			}
			out = append(out, p)
		}
		return out, nil
	}
	p, err := parsePool(obj)
	if err != nil {
		return nil, envelope.Errf(envelope.CodeParamType, "pools: %v", err)
	}
	return []Pool{p}, nil
}

func parsePool(v any) (Pool, error) {
	obj, ok := v.(map[string]any)
	if !ok {
		return Pool{}, fmt.Errorf("a pool is an object {url, user?, password?}")
	}
	url, _ := obj["url"].(string)
	if url == "" {
		return Pool{}, fmt.Errorf("url is required")
	}
	user, _ := obj["user"].(string)
	pass, _ := obj["password"].(string)
	return Pool{URL: url, User: user, Password: pass}, nil
}

// minSleep: a scaled duration shorter than this is not waited for. Timers
// cannot honour a few microseconds (a 5 µs timer fires after 50 µs or more),
// and benchmarks scale command times down to measure the kernel, not timers.
const minSleep = 50 * time.Microsecond

// sleep waits d, or returns ctx's error if it ends first.
func sleep(ctx context.Context, d time.Duration) error {
	if d < minSleep {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
