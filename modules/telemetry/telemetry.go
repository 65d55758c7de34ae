// Package telemetry is the Telemetry Collector (DESIGN §8, MDK-REFERENCE §2.5, §7, §12 item 8): it pulls
// telemetry from Workers — one batched telemetry.pull per Worker, with a global bound on pulls in flight —
// and keeps the latest snapshot of every device, so that caller floods are served from the cache and never
// reach the devices. Concurrent live requests for the same Worker share one pull.
//
// The Collector owns no goroutine: Tick and Fleet run their pulls on goroutines they wait for, and a live
// pull runs on the goroutine of the caller that started it. Its memory is bounded by the number of devices
// the registry knows: a refresh replaces a Worker's snapshots with those of its current devices and Forget
// drops them all.
package telemetry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/orknode/ork/protocols/envelope"
	"golang.org/x/sync/errgroup"
)

// Defaults.
const (
	// DefaultMaxConcurrent is the default bound on live pulls (PullWorker and PullDevice) in flight.
	DefaultMaxConcurrent = 64
	// DefaultMaxAge is the default age under which a snapshot answers a metrics query: the scheduler's
	// telemetry cadence, so that a fleet refreshed by Tick is always served from the cache.
	DefaultMaxAge = 10 * time.Second
	// UseDefaultMaxAge, passed as a maxAge, selects Options.DefaultMaxAge (a caller that sent no maxAgeMs).
	UseDefaultMaxAge time.Duration = -1
)

// ErrPullAborted is the error of a live pull whose Puller call panicked; the panic itself propagates to the
// caller that ran the pull, the others sharing the pull get this error.
var ErrPullAborted = errors.New("ork/telemetry: pull aborted")

// Puller reaches Workers; the node implements it over /ork/worker/telemetry. Both methods must honour ctx.
type Puller interface {
	// PullWorker asks one Worker for all its devices in one batched call (telemetry.pull without deviceId).
	PullWorker(ctx context.Context, workerID string) (envelope.TelemetryBatch, error)
	// PullDevice asks one device with an explicit query (type other than metrics) and returns the Worker's
	// telemetry.response payload.
	PullDevice(ctx context.Context, workerID, deviceID string, query map[string]any) (json.RawMessage, error)
}

// Options configures a Collector.
type Options struct {
	// Puller reaches the Workers. Required.
	Puller Puller
	// Owner resolves a device to its Worker (the registry). Required.
	Owner func(deviceID string) (workerID string, ok bool)
	// DevicesOf lists a Worker's devices (the registry). Required. A refresh keeps snapshots for exactly
	// these devices.
	DevicesOf func(workerID string) []string
	// Workers lists the Workers whose devices Fleet reports (the registry's READY Workers). Required.
	Workers func() []string
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// MaxConcurrent bounds live pulls in flight across Tick, Device, Worker and Fleet; beyond it callers
	// wait, each bounded by its ctx. 0 means DefaultMaxConcurrent.
	MaxConcurrent int
	// DefaultMaxAge is the age selected by UseDefaultMaxAge. 0 means DefaultMaxAge.
	DefaultMaxAge time.Duration
}

// Snapshot is the latest telemetry of one device. Its maps and Raw are shared: treat them as read-only.
type Snapshot struct {
	DeviceID string
	WorkerID string
	// Metrics is the device's metrics object (one entry per telemetry channel), still encoded; nil when
	// Error is set.
	Metrics json.RawMessage
	// Error is the device-level error the Worker reported (e.g. "ERR_DEVICE_UNAVAILABLE: <id>"), or
	// ERR_DEVICE_UNAVAILABLE when the Worker's batch left the device out. Like MDK, a device error is
	// data inside the answer, not a failure of the pull.
	Error string
	// At is when the kernel received the data (Options.Now).
	At time.Time
	// Raw is the device's telemetry.response payload, already encoded — {"deviceId", "metrics" | "error",
	// "timestamp"} (envelope.DeviceTelemetry) — so the node can answer without re-marshalling. For a
	// non-metrics query it is the Worker's payload verbatim and Metrics is nil.
	Raw json.RawMessage
}

// Age is how old the snapshot is at now.
func (s Snapshot) Age(now time.Time) time.Duration { return now.Sub(s.At) }

// TickReport is the outcome of one scheduled pull.
type TickReport struct {
	// Pulled is the number of Workers pulled successfully; Devices the number of snapshots they refreshed.
	Pulled, Devices int
	// Failed holds the error of every Worker whose pull failed (feed it to health). Their last snapshots
	// are kept, ageing.
	Failed map[string]error
	// Duration is the wall time of the tick (Options.Now).
	Duration time.Duration
}

// FleetView is the answer to a fleet-wide pull.
type FleetView struct {
	// Snapshots holds every device of every Worker, Worker by Worker in Workers() order, each Worker's
	// devices in DevicesOf order.
	Snapshots []Snapshot
	// Live is the number of Workers pulled live for this call (their snapshots were older than maxAge).
	Live int
	// Failed holds the Workers whose live pull failed; their last snapshots, if any, are in Snapshots,
	// older than maxAge (see Snapshot.At).
	Failed map[string]error
}

// Collector serves telemetry pulls from a per-device snapshot cache. It is safe for concurrent use.
type Collector struct {
	puller    Puller
	owner     func(string) (string, bool)
	devicesOf func(string) []string
	workers   func() []string
	now       func() time.Time
	maxAge    time.Duration
	maxConc   int
	slots     chan struct{} // one token per live pull in flight

	snaps sync.Map // deviceID → *Snapshot (immutable once stored)

	mu       sync.Mutex
	byWorker map[string][]string // deviceIDs stored for each Worker
	flights  map[string]*flight  // live PullWorker in progress, by Worker
}

// flight is one PullWorker shared by every caller that wants that Worker refreshed meanwhile.
type flight struct {
	done chan struct{} // closed when the fields below are final
	// snaps are the snapshots the pull stored, by deviceID.
	snaps map[string]*Snapshot
	err   error
	// abandoned: the pull failed because the ctx of the caller running it ended; the others retry.
	abandoned bool
}

// New returns a Collector. It starts nothing.
func New(opts Options) (*Collector, error) {
	switch {
	case opts.Puller == nil:
		return nil, errors.New("ork/telemetry: option Puller: required")
	case opts.Owner == nil:
		return nil, errors.New("ork/telemetry: option Owner: required")
	case opts.DevicesOf == nil:
		return nil, errors.New("ork/telemetry: option DevicesOf: required")
	case opts.Workers == nil:
		return nil, errors.New("ork/telemetry: option Workers: required")
	case opts.MaxConcurrent < 0:
		return nil, fmt.Errorf("ork/telemetry: option MaxConcurrent: must be >= 0, got %d", opts.MaxConcurrent)
	case opts.DefaultMaxAge < 0:
		return nil, fmt.Errorf("ork/telemetry: option DefaultMaxAge: must be >= 0, got %v", opts.DefaultMaxAge)
	}
	c := &Collector{
		puller:    opts.Puller,
		owner:     opts.Owner,
		devicesOf: opts.DevicesOf,
		workers:   opts.Workers,
		now:       opts.Now,
		maxAge:    opts.DefaultMaxAge,
		maxConc:   opts.MaxConcurrent,
		byWorker:  make(map[string][]string),
		flights:   make(map[string]*flight),
	}
	if c.now == nil {
		c.now = time.Now
	}
	if c.maxAge == 0 {
		c.maxAge = DefaultMaxAge
	}
	if c.maxConc == 0 {
		c.maxConc = DefaultMaxConcurrent
	}
	c.slots = make(chan struct{}, c.maxConc)
	return c, nil
}

// Device returns the telemetry of one device. A metrics query (query nil, or its "type" absent, "" or
// "metrics") is answered from the snapshot when it is at most maxAge old (cached = true); otherwise — or
// with maxAge 0 — by a live pull of the owning Worker, which refreshes every device of that Worker and is
// shared with concurrent requests for it. UseDefaultMaxAge selects Options.DefaultMaxAge. Any other query
// goes live to the device (PullDevice) and is not cached.
//
// An unknown device is ERR_DEVICE_NOT_FOUND: <id>. A failed live pull returns the Puller's error, wrapped;
// a device-level error reported by the Worker is not a Go error but Snapshot.Error.
func (c *Collector) Device(ctx context.Context, deviceID string, maxAge time.Duration, query map[string]any) (Snapshot, bool, error) {
	w, ok := c.owner(deviceID)
	if !ok {
		return Snapshot{}, false, envelope.Errf(envelope.CodeDeviceNotFound, "%s", deviceID)
	}
	if !isMetrics(query) {
		return c.pullDevice(ctx, w, deviceID, query)
	}
	if maxAge < 0 {
		maxAge = c.maxAge
	}
	if maxAge > 0 {
		if s := c.cached(deviceID, w); s != nil && c.now().Sub(s.At) <= maxAge {
			return *s, true, nil
		}
	}
	snaps, err := c.refresh(ctx, w)
	if err != nil {
		return Snapshot{}, false, err
	}
	s, ok := snaps[deviceID]
	if !ok { // the registry no longer lists it under that Worker
		return Snapshot{}, false, envelope.Errf(envelope.CodeDeviceNotFound, "%s", deviceID)
	}
	return *s, false, nil
}

// Worker returns the telemetry of every device of a Worker, in DevicesOf order: from the snapshots when all
// are at most maxAge old (cached = true), else from one live pull of the Worker. It does not check that the
// Worker exists (the node does, from its registry); a Worker with no devices yields none.
func (c *Collector) Worker(ctx context.Context, workerID string, maxAge time.Duration) ([]Snapshot, bool, error) {
	devs := c.devicesOf(workerID)
	if len(devs) == 0 {
		return nil, true, nil
	}
	if maxAge < 0 {
		maxAge = c.maxAge
	}
	if out, ok := c.fresh(workerID, devs, maxAge, c.now()); ok {
		return out, true, nil
	}
	snaps, err := c.refresh(ctx, workerID)
	if err != nil {
		return nil, false, err
	}
	return ordered(snaps, devs), false, nil
}

// Fleet returns the telemetry of every device of every Worker listed by Options.Workers: from the snapshots
// for each Worker whose snapshots are all at most maxAge old, by a live pull for the others — never more than
// MaxConcurrent pulls in flight, whatever the fleet size. A Worker whose live pull fails is listed in
// FleetView.Failed and contributes its last snapshots.
func (c *Collector) Fleet(ctx context.Context, maxAge time.Duration) FleetView {
	if maxAge < 0 {
		maxAge = c.maxAge
	}
	workers := c.workers()
	per := make([][]Snapshot, len(workers))
	devs := make([][]string, len(workers))
	var stale []int
	now := c.now()
	for i, w := range workers {
		devs[i] = c.devicesOf(w)
		if out, ok := c.fresh(w, devs[i], maxAge, now); ok {
			per[i] = out
		} else {
			stale = append(stale, i)
		}
	}
	v := FleetView{Live: len(stale)}
	var (
		g  errgroup.Group
		mu sync.Mutex
	)
	g.SetLimit(c.maxConc)
	for _, i := range stale {
		g.Go(func() error {
			snaps, err := c.refresh(ctx, workers[i])
			if err != nil {
				per[i] = c.last(workers[i], devs[i])
				mu.Lock()
				if v.Failed == nil {
					v.Failed = make(map[string]error)
				}
				v.Failed[workers[i]] = err
				mu.Unlock()
				return nil
			}
			per[i] = ordered(snaps, devs[i])
			return nil
		})
	}
	_ = g.Wait()
	n := 0
	for _, p := range per {
		n += len(p)
	}
	v.Snapshots = make([]Snapshot, 0, n)
	for _, p := range per {
		v.Snapshots = append(v.Snapshots, p...)
	}
	return v
}

// Tick is the scheduled pull: one batched PullWorker per Worker (duplicates pulled once), at most
// MaxConcurrent in flight, each refreshing every device of its Worker. A Worker being pulled live already
// shares that pull. Failures are reported per Worker so the node can feed health.
func (c *Collector) Tick(ctx context.Context, workerIDs []string) TickReport {
	start := c.now()
	var (
		g   errgroup.Group
		mu  sync.Mutex
		rep TickReport
	)
	g.SetLimit(c.maxConc)
	seen := make(map[string]struct{}, len(workerIDs))
	for _, w := range workerIDs {
		if _, dup := seen[w]; dup {
			continue
		}
		seen[w] = struct{}{}
		g.Go(func() error {
			snaps, err := c.refresh(ctx, w)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if rep.Failed == nil {
					rep.Failed = make(map[string]error)
				}
				rep.Failed[w] = err
				return nil
			}
			rep.Pulled++
			rep.Devices += len(snaps)
			return nil
		})
	}
	_ = g.Wait()
	rep.Duration = c.now().Sub(start)
	return rep
}

// Forget drops every snapshot of a Worker; call it when the Worker is terminated, after the registry has
// dropped its devices (so that a pull still in flight stores nothing).
func (c *Collector) Forget(workerID string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dropLocked(workerID, c.byWorker[workerID], nil)
	delete(c.byWorker, workerID)
}

// Len is the number of snapshots held (for a gauge; it walks the cache).
func (c *Collector) Len() int {
	n := 0
	c.snaps.Range(func(_, _ any) bool { n++; return true })
	return n
}

// cached returns the snapshot of a device if it belongs to workerID.
func (c *Collector) cached(deviceID, workerID string) *Snapshot {
	v, ok := c.snaps.Load(deviceID)
	if !ok {
		return nil
	}
	s := v.(*Snapshot)
	if s.WorkerID != workerID { // ownership moved: that snapshot is someone else's
		return nil
	}
	return s
}

// fresh returns the snapshots of devs if every one is at most maxAge old.
func (c *Collector) fresh(workerID string, devs []string, maxAge time.Duration, now time.Time) ([]Snapshot, bool) {
	if maxAge <= 0 {
		return nil, len(devs) == 0
	}
	out := make([]Snapshot, 0, len(devs))
	for _, id := range devs {
		s := c.cached(id, workerID)
		if s == nil || now.Sub(s.At) > maxAge {
			return nil, false
		}
		out = append(out, *s)
	}
	return out, true
}

// last returns whatever snapshots of devs are held, however old.
func (c *Collector) last(workerID string, devs []string) []Snapshot {
	var out []Snapshot
	for _, id := range devs {
		if s := c.cached(id, workerID); s != nil {
			out = append(out, *s)
		}
	}
	return out
}

func ordered(snaps map[string]*Snapshot, devs []string) []Snapshot {
	out := make([]Snapshot, 0, len(devs))
	for _, id := range devs {
		if s, ok := snaps[id]; ok {
			out = append(out, *s)
		}
	}
	return out
}

func isMetrics(query map[string]any) bool {
	t, ok := query["type"]
	if !ok {
		return true
	}
	s, ok := t.(string)
	return ok && (s == "" || s == "metrics")
}

// refresh pulls a Worker live, sharing the pull with every concurrent caller for that Worker, and returns
// the snapshots it stored. If the caller running the shared pull gives up (its ctx ends), the others do not
// inherit its cancellation: one of them runs the pull again.
func (c *Collector) refresh(ctx context.Context, workerID string) (map[string]*Snapshot, error) {
	for {
		c.mu.Lock()
		f, ok := c.flights[workerID]
		if !ok {
			f = &flight{done: make(chan struct{})}
			c.flights[workerID] = f
			c.mu.Unlock()
			c.lead(ctx, workerID, f)
			return f.snaps, f.err
		}
		c.mu.Unlock()
		select {
		case <-f.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if f.abandoned && ctx.Err() == nil {
			continue
		}
		return f.snaps, f.err
	}
}

// lead runs the shared pull f on the caller's goroutine.
func (c *Collector) lead(ctx context.Context, workerID string, f *flight) {
	f.err = ErrPullAborted // unless the pull returns
	defer func() {
		c.mu.Lock()
		delete(c.flights, workerID)
		c.mu.Unlock()
		close(f.done)
	}()
	if err := c.acquire(ctx); err != nil {
		f.err, f.abandoned = err, true
		return
	}
	batch, err := func() (envelope.TelemetryBatch, error) {
		defer c.release()
		return c.puller.PullWorker(ctx, workerID)
	}()
	if err != nil {
		f.err = fmt.Errorf("ork/telemetry: pull worker %s: %w", workerID, err)
		f.abandoned = ctx.Err() != nil
		return
	}
	f.snaps, f.err = c.store(workerID, batch), nil
}

func (c *Collector) acquire(ctx context.Context) error {
	select {
	case c.slots <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (c *Collector) release() { <-c.slots }

func (c *Collector) pullDevice(ctx context.Context, workerID, deviceID string, query map[string]any) (Snapshot, bool, error) {
	if err := c.acquire(ctx); err != nil {
		return Snapshot{}, false, err
	}
	defer c.release()
	raw, err := c.puller.PullDevice(ctx, workerID, deviceID, query)
	if err != nil {
		return Snapshot{}, false, fmt.Errorf("ork/telemetry: pull device %s: %w", deviceID, err)
	}
	return Snapshot{DeviceID: deviceID, WorkerID: workerID, At: c.now(), Raw: raw}, false, nil
}

// store turns a Worker's batch into snapshots of its current devices, replaces the Worker's snapshots with
// them, and returns them by deviceID. Devices the batch leaves out get ERR_DEVICE_UNAVAILABLE; entries for
// devices the registry does not list under this Worker are ignored.
func (c *Collector) store(workerID string, b envelope.TelemetryBatch) map[string]*Snapshot {
	devs := slices.Clone(c.devicesOf(workerID))
	at := c.now()
	byID := make(map[string]*envelope.DeviceTelemetry, len(b.Devices))
	for i := range b.Devices {
		byID[b.Devices[i].DeviceID] = &b.Devices[i]
	}
	out := make(map[string]*Snapshot, len(devs))
	for _, id := range devs {
		s := &Snapshot{DeviceID: id, WorkerID: workerID, At: at}
		enc := envelope.DeviceTelemetry{DeviceID: id}
		if dt, ok := byID[id]; ok {
			s.Metrics, s.Error = dt.Metrics, dt.Error
			enc.Metrics, enc.Error, enc.Timestamp = dt.Metrics, dt.Error, dt.Timestamp
		} else {
			s.Error = envelope.Errf(envelope.CodeDeviceUnavailable, "%s", id).Message
			enc.Error = s.Error
		}
		if enc.Timestamp == 0 {
			enc.Timestamp = b.Timestamp
		}
		if enc.Timestamp == 0 {
			enc.Timestamp = at.UnixMilli()
		}
		raw, err := json.Marshal(enc)
		if err != nil { // metrics that do not encode (not from a decoded frame)
			s.Metrics = nil
			s.Error = envelope.Errf(envelope.CodeInternal, "telemetry of %s does not encode: %v", id, err).Message
			enc.Metrics, enc.Error = nil, s.Error
			raw, _ = json.Marshal(enc)
		}
		s.Raw = raw
		out[id] = s
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	c.dropLocked(workerID, c.byWorker[workerID], out)
	for id, s := range out {
		c.snaps.Store(id, s)
	}
	if len(devs) == 0 {
		delete(c.byWorker, workerID)
	} else {
		c.byWorker[workerID] = devs
	}
	return out
}

// dropLocked deletes the snapshots of ids that belong to workerID, except those in keep.
func (c *Collector) dropLocked(workerID string, ids []string, keep map[string]*Snapshot) {
	for _, id := range ids {
		if _, ok := keep[id]; ok {
			continue
		}
		if v, ok := c.snaps.Load(id); ok && v.(*Snapshot).WorkerID == workerID {
			c.snaps.CompareAndDelete(id, v)
		}
	}
}
