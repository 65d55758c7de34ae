package sim

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"github.com/orknode/ork/worker"
)

// CodeSimFault is the error code of an injected command failure.
const CodeSimFault = "ERR_SIM_FAULT"

// Latency is added to every answer: fixed (Min == Max) or uniform in [Min, Max].
type Latency struct{ Min, Max time.Duration }

// ParseLatency reads "5ms" (fixed) or "2ms-20ms" (a range); "" and "0" mean none.
func ParseLatency(s string) (Latency, error) {
	s = strings.TrimSpace(s)
	if s == "" || s == "0" {
		return Latency{}, nil
	}
	lo, hi, isRange := strings.Cut(s, "-")
	from, err := time.ParseDuration(lo)
	if err != nil {
		return Latency{}, fmt.Errorf("latency %q: %v", s, err)
	}
	to := from
	if isRange {
		if to, err = time.ParseDuration(hi); err != nil {
			return Latency{}, fmt.Errorf("latency %q: %v", s, err)
		}
	}
	l := Latency{from, to}
	return l, l.validate()
}

func (l Latency) validate() error {
	if l.Min < 0 || l.Max < l.Min {
		return fmt.Errorf("latency %v-%v: want 0 ≤ min ≤ max", l.Min, l.Max)
	}
	return nil
}

// String prints the latency as ParseLatency reads it.
func (l Latency) String() string {
	if l.Min == l.Max {
		return l.Min.String()
	}
	return l.Min.String() + "-" + l.Max.String()
}

func (l Latency) draw(r *rand.Rand) time.Duration {
	if l.Max <= l.Min {
		return l.Min
	}
	return l.Min + time.Duration(r.Int64N(int64(l.Max-l.Min)+1))
}

// Faults are the injected faults of a fleet.
type Faults struct {
	Latency Latency
	// ErrorRate is the probability that a command fails (ERR_SIM_FAULT)
	// without touching the device.
	ErrorRate float64
	// HangRate is the probability that a command never answers until its
	// context ends (the Worker's command deadline).
	HangRate float64
	// CrashEvery makes each Worker stop its host and restart it with the
	// same key after a pause, about this often (±50%, starting at a random
	// offset). Zero: never.
	CrashEvery time.Duration
	// CrashPause is how long a crashed Worker stays down; default 2 s × the
	// time scale.
	CrashPause time.Duration
	// Flap makes each Worker leave and come back (same key) on a random
	// cadence: up 20–120 s, down 1–10 s, both × the time scale.
	Flap bool
}

// Validate checks the rates and durations.
func (f Faults) Validate() error {
	var errs []error
	if err := f.Latency.validate(); err != nil {
		errs = append(errs, err)
	}
	if f.ErrorRate < 0 || f.ErrorRate > 1 {
		errs = append(errs, fmt.Errorf("error rate %v: want 0..1", f.ErrorRate))
	}
	if f.HangRate < 0 || f.HangRate > 1 {
		errs = append(errs, fmt.Errorf("hang rate %v: want 0..1", f.HangRate))
	}
	if f.ErrorRate+f.HangRate > 1 {
		errs = append(errs, fmt.Errorf("error rate + hang rate = %v: want at most 1", f.ErrorRate+f.HangRate))
	}
	if f.CrashEvery < 0 {
		errs = append(errs, fmt.Errorf("crash-every %v: want ≥ 0", f.CrashEvery))
	}
	if f.CrashPause < 0 {
		errs = append(errs, fmt.Errorf("crash pause %v: want ≥ 0", f.CrashPause))
	}
	return errors.Join(errs...)
}

// injector draws one Worker's faults from its own seeded source.
type injector struct {
	f   Faults
	mu  sync.Mutex
	rng *rand.Rand
}

func newInjector(f Faults, seed uint64, index int) *injector {
	return &injector{f: f, rng: rand.New(rand.NewPCG(seed^0x5eed_fa17, uint64(index)))}
}

func (in *injector) float() float64 {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.rng.Float64()
}

func (in *injector) between(lo, hi time.Duration) time.Duration {
	in.mu.Lock()
	defer in.mu.Unlock()
	return Latency{lo, hi}.draw(in.rng)
}

// intercept adds the latency to every answer (nil when there is none).
func (in *injector) intercept() func(context.Context, string) error {
	if in.f.Latency.Max <= 0 {
		return nil
	}
	return func(ctx context.Context, _ string) error {
		return sleep(ctx, in.between(in.f.Latency.Min, in.f.Latency.Max))
	}
}

// wrap injects hangs and failures into a command handler.
func (in *injector) wrap(fn worker.CommandHandler) worker.CommandHandler {
	if in.f.ErrorRate == 0 && in.f.HangRate == 0 {
		return fn
	}
	return func(ctx context.Context, dev string, params map[string]any) (any, error) {
		u := in.float()
		switch {
		case u < in.f.HangRate:
			<-ctx.Done()
			return nil, ctx.Err()
		case u < in.f.HangRate+in.f.ErrorRate:
			return nil, fmt.Errorf("%s: injected failure on %s", CodeSimFault, dev)
		}
		return fn(ctx, dev, params)
	}
}
