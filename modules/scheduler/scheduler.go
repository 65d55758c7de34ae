// Package scheduler is the kernel's metronome (DESIGN §8, MDK-REFERENCE §2.6, §7): named jobs run at a
// fixed cadence, never overlapping themselves, on a worker pool bounded across jobs. Each job's first tick
// is jittered so that nodes started together do not fire in lockstep. A tick that finds the previous run
// of its job unfinished (running, or waiting for a pool slot) is dropped and counted as an overrun; a panic
// in a job is recovered, logged and counted, and never stops the scheduler.
//
// The Scheduler owns its goroutines: one timer loop per job and one goroutine per run, all under a root
// context that Close cancels before waiting for every one of them.
package scheduler

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"runtime/debug"
	"slices"
	"sync"
	"time"
)

// Defaults.
const (
	DefaultMaxConcurrent = 8
	DefaultJitter        = 0.1
)

var (
	// ErrDuplicateJob is returned by Add for a name already added.
	ErrDuplicateJob = errors.New("ork/scheduler: duplicate job")
	// ErrInvalidJob is returned by Add for an interval <= 0 or a nil function.
	ErrInvalidJob = errors.New("ork/scheduler: invalid job")
	// ErrUnknownJob is returned by Trigger for a name never added.
	ErrUnknownJob = errors.New("ork/scheduler: unknown job")
	// ErrJobRunning is returned by Trigger when the job is already running (or waiting for a pool slot):
	// the trigger is dropped, as an overlapping tick would be.
	ErrJobRunning = errors.New("ork/scheduler: job already running")
	// ErrClosed is returned by Add and Trigger after Close, or once the context given to Start has ended.
	ErrClosed = errors.New("ork/scheduler: closed")
)

// Options configures a Scheduler. The zero value is usable.
type Options struct {
	// MaxConcurrent bounds the job runs in progress at once, across all jobs. 0 means DefaultMaxConcurrent.
	MaxConcurrent int
	// Jitter is the fraction of its interval by which a job's first tick is brought forward, at random:
	// the first tick fires in (every·(1−Jitter), every], the next ones every interval after it. 0 means
	// DefaultJitter; a negative value disables jitter; values above 1 are taken as 1.
	Jitter float64
	// Rand draws the jitter; seed it for reproducible schedules. nil means a randomly seeded source. The
	// Scheduler serialises its use.
	Rand *rand.Rand
	// Logger receives recovered panics. nil means slog.Default() at the time of logging.
	Logger *slog.Logger
}

// JobStats describes one job.
type JobStats struct {
	// Every is the job's interval.
	Every time.Duration
	// Runs counts completed runs (panicked ones included); Panics those that panicked.
	Runs, Panics int64
	// Overruns counts ticks dropped because the previous run had not finished.
	Overruns int64
	// Running: a run is in progress or waiting for a pool slot.
	Running bool
	// LastStart is when the last run began (after it got its pool slot); LastDuration how long the last
	// completed run took.
	LastStart    time.Time
	LastDuration time.Duration
}

// Scheduler runs named jobs. It is safe for concurrent use.
type Scheduler struct {
	ctx    context.Context // root: cancelled by Close or by the end of Start's context
	cancel context.CancelFunc
	wg     sync.WaitGroup // timer loops and runs
	slots  chan struct{}  // one token per run in progress
	jitter float64
	log    *slog.Logger

	mu        sync.Mutex
	rnd       *rand.Rand
	jobs      map[string]*job
	started   bool
	closed    bool
	stopStart func() bool // unregisters the AfterFunc on Start's context
}

type job struct {
	name  string
	every time.Duration
	fn    func(context.Context)

	// guarded by Scheduler.mu
	running bool
	stats   JobStats
}

// New returns a Scheduler. Nothing runs until Start (or Trigger).
func New(opts Options) *Scheduler {
	n := opts.MaxConcurrent
	if n <= 0 {
		n = DefaultMaxConcurrent
	}
	j := opts.Jitter
	switch {
	case j == 0:
		j = DefaultJitter
	case j < 0:
		j = 0
	case j > 1:
		j = 1
	}
	r := opts.Rand
	if r == nil {
		r = rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Scheduler{
		ctx:    ctx,
		cancel: cancel,
		slots:  make(chan struct{}, n),
		jitter: j,
		log:    opts.Logger,
		rnd:    r,
		jobs:   make(map[string]*job),
	}
}

// Add registers a job that runs fn every interval. fn gets a context cancelled by Close; it must return
// when that context ends, or Close waits for it. A job added after Start is scheduled at once (with its
// jittered first tick).
func (s *Scheduler) Add(name string, every time.Duration, fn func(ctx context.Context)) error {
	switch {
	case every <= 0:
		return fmt.Errorf("%w: %q: interval %v must be > 0", ErrInvalidJob, name, every)
	case fn == nil:
		return fmt.Errorf("%w: %q: nil function", ErrInvalidJob, name)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.ctx.Err() != nil {
		return ErrClosed
	}
	if _, dup := s.jobs[name]; dup {
		return fmt.Errorf("%w: %q", ErrDuplicateJob, name)
	}
	j := &job{name: name, every: every, fn: fn, stats: JobStats{Every: every}}
	s.jobs[name] = j
	if s.started {
		s.startLocked(j)
	}
	return nil
}

// Start starts every job's timer. Jobs stop when ctx ends or on Close (call Close anyway, to wait for
// them). Later calls, and calls after Close, do nothing. The jobs' context does not carry ctx's values.
func (s *Scheduler) Start(ctx context.Context) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started || s.closed {
		return
	}
	s.started = true
	s.stopStart = context.AfterFunc(ctx, s.cancel)
	names := make([]string, 0, len(s.jobs))
	for n := range s.jobs {
		names = append(names, n)
	}
	slices.Sort(names) // a seeded Rand gives the same schedule every time
	for _, n := range names {
		s.startLocked(s.jobs[n])
	}
}

// Trigger runs a job now, outside its cadence (which is unchanged), e.g. an immediate health ping at start.
// It still never overlaps the job's own run: if one is in progress, the trigger is dropped with
// ErrJobRunning. It works before Start too.
func (s *Scheduler) Trigger(name string) error {
	s.mu.Lock()
	j, ok := s.jobs[name]
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("%w: %q", ErrUnknownJob, name)
	}
	return s.fire(j, false)
}

// Stats returns the statistics of every job, by name.
func (s *Scheduler) Stats() map[string]JobStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]JobStats, len(s.jobs))
	for n, j := range s.jobs {
		st := j.stats
		st.Running = j.running
		out[n] = st
	}
	return out
}

// Close stops every timer, cancels the context of running jobs and waits for them to return. It is
// idempotent; it always returns nil.
func (s *Scheduler) Close() error {
	s.mu.Lock()
	s.closed = true
	stop := s.stopStart
	s.mu.Unlock()
	s.cancel()
	if stop != nil {
		stop()
	}
	s.wg.Wait()
	return nil
}

// startLocked starts the timer loop of one job.
func (s *Scheduler) startLocked(j *job) {
	first := j.every - time.Duration(s.rnd.Float64()*s.jitter*float64(j.every))
	s.wg.Go(func() { s.loop(j, first) })
}

// loop fires the job after first, then every interval: a fixed cadence, whatever the runs take (a
// time.Ticker, and firing never blocks).
func (s *Scheduler) loop(j *job, first time.Duration) {
	t := time.NewTimer(first)
	defer t.Stop()
	select {
	case <-s.ctx.Done():
		return
	case <-t.C:
	}
	_ = s.fire(j, true)
	tk := time.NewTicker(j.every)
	defer tk.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-tk.C:
			_ = s.fire(j, true)
		}
	}
}

// fire starts a run of j unless one is in progress (a tick is then counted as an overrun).
func (s *Scheduler) fire(j *job, tick bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.ctx.Err() != nil {
		return ErrClosed
	}
	if j.running {
		if tick {
			j.stats.Overruns++
		}
		return ErrJobRunning
	}
	j.running = true
	s.wg.Go(func() { s.run(j) }) // under mu, before Close can see closed and Wait
	return nil
}

// run waits for a pool slot, then runs the job once.
func (s *Scheduler) run(j *job) {
	defer func() {
		s.mu.Lock()
		j.running = false
		s.mu.Unlock()
	}()
	select {
	case s.slots <- struct{}{}:
	case <-s.ctx.Done():
		return
	}
	defer func() { <-s.slots }()
	start := time.Now()
	s.mu.Lock()
	j.stats.LastStart = start
	s.mu.Unlock()
	panicked := s.call(j)
	d := time.Since(start)
	s.mu.Lock()
	j.stats.Runs++
	j.stats.LastDuration = d
	if panicked {
		j.stats.Panics++
	}
	s.mu.Unlock()
}

func (s *Scheduler) call(j *job) (panicked bool) {
	defer func() {
		if r := recover(); r != nil {
			panicked = true
			log := s.log
			if log == nil {
				log = slog.Default()
			}
			log.Error("job panicked", "sub", "ork/scheduler", "job", j.name, "panic", r, "stack", string(debug.Stack()))
		}
	}()
	j.fn(s.ctx)
	return false
}
