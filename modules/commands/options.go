package commands

import (
	"fmt"
	"log/slog"
	"time"
)

// Defaults.
const (
	DefaultMaxRetries     = 3
	DefaultCommandTimeout = 30 * time.Second
	DefaultQueueDepth     = 64
	DefaultResultTTL      = 24 * time.Hour
	DefaultConcurrency    = 256
	DefaultRetryBackoff   = 500 * time.Millisecond
	DefaultMaxBackoff     = 30 * time.Second
	// DefaultOutcomeTimeout bounds how long the Worker is asked about a command whose outcome is unknown when
	// the command has no deadline of its own. It matches the Worker SDK's dedup-cache horizon (≥ 10 min): past
	// it, a Worker's answer could no longer be trusted anyway.
	DefaultOutcomeTimeout = 10 * time.Minute
)

// Options configure a Manager. WAL and Sender are required. For every number and duration below, zero means
// the default, except MaxRetries (nil means the default; a pointer to 0 means no resend at all). Negative values
// are rejected.
type Options struct {
	WAL    WAL
	Sender Sender

	// NotDelivered classifies Sender errors: true when the request provably never left (no stream could be
	// opened, the Worker refused it before reading), false when its outcome is unknown (written, no reply).
	// Only the former are resent blindly. nil treats every error as outcome unknown, the safe side.
	NotDelivered func(error) bool
	// Routable reports whether a Worker may be sent commands now. nil: always.
	Routable func(workerID string) bool
	// Owner returns the Worker that owns a device now. nil: the WorkerID in the command's record.
	//
	// Routable and Owner are called without the Manager's lock held, from any goroutine; they must be cheap and
	// must not block.
	Owner func(deviceID string) (workerID string, ok bool)

	// Now is the clock (default time.Now). AfterFunc runs f after d and returns a stop function with
	// time.Timer.Stop's meaning (default: time.AfterFunc). Every delay the Manager takes goes through it.
	Now       func() time.Time
	AfterFunc func(d time.Duration, f func()) (stop func() bool)

	MaxRetries     *int          // resend budget per command (default 3; 0 honoured)
	CommandTimeout time.Duration // per attempt, for Send and for Status (default 30 s)
	QueueDepth     int           // queued commands per device (default 64)
	ResultTTL      time.Duration // how long finished commands stay readable (default 24 h)
	Concurrency    int           // Send and Status calls in flight at once, all Workers together (default 256)
	RetryBackoff   time.Duration // first backoff of a resend or of a repeated Status question (default 500 ms)
	MaxBackoff     time.Duration // backoff cap (default 30 s)
	OutcomeTimeout time.Duration // see DefaultOutcomeTimeout

	// OnDone is called once per command that reaches a terminal state, after its result is durable and before
	// waiters are woken, from a Manager goroutine, without the lock held. It must not block for long.
	OnDone func(Record)
	// Logger receives WAL and transition errors (default: discard).
	Logger *slog.Logger

	// jitter overrides backoff's random source (tests).
	jitter func(int64) int64
}

// Retries returns a pointer to n, for Options.MaxRetries.
func Retries(n int) *int { return &n }

// withDefaults validates o and fills in the defaults, naming the first offending option.
func (o Options) withDefaults() (Options, error) {
	if o.WAL == nil {
		return o, fmt.Errorf("ork/commands: Options.WAL is required")
	}
	if o.Sender == nil {
		return o, fmt.Errorf("ork/commands: Options.Sender is required")
	}
	if o.MaxRetries == nil {
		o.MaxRetries = Retries(DefaultMaxRetries)
	} else if *o.MaxRetries < 0 {
		return o, fmt.Errorf("ork/commands: Options.MaxRetries %d is negative", *o.MaxRetries)
	} else {
		o.MaxRetries = Retries(*o.MaxRetries) // our own copy
	}
	durs := []struct {
		name string
		v    *time.Duration
		def  time.Duration
	}{
		{"CommandTimeout", &o.CommandTimeout, DefaultCommandTimeout},
		{"ResultTTL", &o.ResultTTL, DefaultResultTTL},
		{"RetryBackoff", &o.RetryBackoff, DefaultRetryBackoff},
		{"MaxBackoff", &o.MaxBackoff, DefaultMaxBackoff},
		{"OutcomeTimeout", &o.OutcomeTimeout, DefaultOutcomeTimeout},
	}
	for _, d := range durs {
		switch {
		case *d.v < 0:
			return o, fmt.Errorf("ork/commands: Options.%s %v is negative", d.name, *d.v)
		case *d.v == 0:
			*d.v = d.def
		}
	}
	ints := []struct {
		name string
		v    *int
		def  int
	}{
		{"QueueDepth", &o.QueueDepth, DefaultQueueDepth},
		{"Concurrency", &o.Concurrency, DefaultConcurrency},
	}
	for _, n := range ints {
		switch {
		case *n.v < 0:
			return o, fmt.Errorf("ork/commands: Options.%s %d is negative", n.name, *n.v)
		case *n.v == 0:
			*n.v = n.def
		}
	}
	if o.MaxBackoff < o.RetryBackoff {
		return o, fmt.Errorf("ork/commands: Options.MaxBackoff %v is below RetryBackoff %v", o.MaxBackoff, o.RetryBackoff)
	}
	if o.NotDelivered == nil {
		o.NotDelivered = func(error) bool { return false }
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.AfterFunc == nil {
		o.AfterFunc = func(d time.Duration, f func()) func() bool { return time.AfterFunc(d, f).Stop }
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o, nil
}
