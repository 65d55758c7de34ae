package commands

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/orknode/ork/modules/concurrency"
	"github.com/orknode/ork/protocols/envelope"
)

// phase is where a command is in the runner's hands; the persisted state alone does not say whether it is in
// its queue, waiting out a backoff or being sent.
type phase uint8

const (
	phAdmitting phase = iota // Submit is writing its admission record
	phQueued                 // QUEUED, in its device queue
	phParked                 // QUEUED, holds its device until a backoff timer puts it back at the queue head
	phRunning                // a Manager goroutine owns it: DISPATCHED write + send, Status question, or final write
	phUnknown                // EXECUTING, outcome unknown, holds its device: waits to ask its Worker (timer or routable)
	phParent                 // fan-out parent waiting for its children
	phDone                   // terminal and durable
)

// cmd is a command the Manager holds in memory: everything non-terminal, plus commands being finished.
type cmd struct {
	rec   Record
	phase phase
	done  chan struct{} // made by the first waiter, closed when terminal

	park      func() bool // stops the backoff timer (phParked, phUnknown)
	dl        func() bool // stops the deadline timer
	gen       uint64      // bumped to invalidate a backoff timer that may already have fired
	failures  int         // backoffs taken so far (the backoff exponent)
	resolveBy time.Time   // phUnknown: when to give up asking (TIMEOUT)

	pending  int           // parent: children not yet terminal
	children *childSummary // parent: tally of terminal children
}

type idemEntry struct {
	id        string
	expires   time.Time     // zero while the command is unfinished
	admitting chan struct{} // closed when the Submit that created the entry has finished writing
}

type route struct {
	worker   string
	routable bool
}

// Manager is the command state machine: it admits commands, keeps one in flight per device, persists every
// transition before its side effect, retries only what provably never reached a Worker, resolves unknown
// outcomes by asking the Worker, and keeps results readable for ResultTTL. All methods are safe for concurrent
// use. See the package documentation for the rules.
type Manager struct {
	o   Options
	q   *concurrency.Queues
	log *slog.Logger

	ctx       context.Context // cancelled by Close: aborts sends and WAL writes
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	closeOnce sync.Once

	mu         sync.Mutex
	cmds       map[string]*cmd
	idem       map[string]*idemEntry
	reserved   map[string]int      // device → queue places held by Submits that are still writing
	devWorker  map[string]string   // device → Worker of its latest record (routing when Options.Owner is nil)
	unknown    map[string][]string // device → ids in phUnknown
	starved    []string            // devices that could dispatch but found every concurrency slot taken
	starvedSet map[string]struct{}
	running    int // goroutines holding a concurrency slot (sends and Status questions)
	active     int // every goroutine the Manager started and that has not returned
	byState    map[string]int
	finished   map[string]int
	draining   bool
	closed     bool
	drained    chan struct{} // closed when active drops to 0 while someone drains
	closing    chan struct{} // closed by Close: wakes waiters
}

// New returns a Manager. It validates opts (naming the first bad option) and starts nothing: no goroutine runs
// until commands are submitted or recovered, so an error leaves nothing to clean up. Call Recover before
// Submit on start, then PumpAll once Workers may be routable.
func New(opts Options) (*Manager, error) {
	o, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Manager{
		o:          o,
		q:          concurrency.New(o.QueueDepth),
		log:        o.Logger.With("module", "ork/commands"),
		ctx:        ctx,
		cancel:     cancel,
		cmds:       make(map[string]*cmd),
		idem:       make(map[string]*idemEntry),
		reserved:   make(map[string]int),
		devWorker:  make(map[string]string),
		unknown:    make(map[string][]string),
		starvedSet: make(map[string]struct{}),
		byState:    make(map[string]int),
		finished:   make(map[string]int),
		closing:    make(chan struct{}),
	}, nil
}

// admission kinds of a submitted record.
type kind uint8

const (
	kindQueued kind = iota // into its device queue
	kindFast               // its device is idle and routable: admitted directly as DISPATCHED
	kindParent             // fan-out parent: admitted as EXECUTING, never dispatched
)

// Submit admits commands and returns them as admitted (ids assigned, state QUEUED or DISPATCHED).
//
// recs is either independent device commands, or a fan-out: recs[0] is the parent (no DeviceID; its scope is
// worker or rack) and every other record is one of its children (ParentID and the parent's Children are set
// here). Missing ids are assigned (UUID v4). State, Retries, Attempts, timestamps, Result and Error are set by
// Submit; Deadline (ms epoch) is kept.
//
// If recs[0].IdempotencyKey names a command admitted before and still known (unfinished, or finished less than
// ResultTTL ago), nothing is admitted and that command (with its children) is returned instead.
//
// Admission is all or nothing: every device queue is checked first (a *concurrency.QueueFullError, errors.Is
// concurrency.ErrQueueFull, when one would overflow), then every record is written to the WAL; Submit returns
// once they are all durable. A failed write fails the whole Submit and nothing is queued (records already
// written are finished as FAILED ERR_INTERNAL, best effort). The WAL writes are not bound to ctx, so a caller
// that gives up cannot leave an admission half-known; ctx bounds only the wait for a concurrent Submit with the
// same idempotency key.
//
// A command whose device is idle and whose Worker is routable is written directly as DISPATCHED in its
// admission write (QUEUED is then a logical step with no write of its own) and sent at once.
func (m *Manager) Submit(ctx context.Context, recs ...Record) ([]Record, error) {
	now := m.o.Now()
	given := make([]bool, len(recs))
	for i := range recs {
		given[i] = recs[i].CommandID != ""
	}
	recs, err := m.prepare(recs, now.UnixMilli())
	if err != nil {
		return nil, err
	}
	for i := range recs {
		if in := recs[i].CommandID; given[i] {
			// A caller-chosen id must not overwrite a retained result.
			switch _, err := m.o.WAL.Result(ctx, in); {
			case err == nil:
				return nil, fmt.Errorf("%w: command id %s is in use", ErrInvalid, in)
			case !errors.Is(err, ErrNotFound):
				return nil, fmt.Errorf("ork/commands: submit: %w", err)
			}
		}
	}
	routes := make([]route, len(recs))
	for i := range recs {
		if !recs[i].IsParent() {
			routes[i] = m.route(recs[i].DeviceID, recs[i].WorkerID)
		}
	}

	key := recs[0].IdempotencyKey
	for {
		m.mu.Lock()
		if m.closed {
			m.mu.Unlock()
			return nil, ErrClosed
		}
		e := m.idem[key]
		if key == "" || e == nil {
			break // with the lock held
		}
		if !e.expires.IsZero() && !now.Before(e.expires) {
			delete(m.idem, key)
			break
		}
		if ch := e.admitting; ch != nil {
			m.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		id := e.id
		m.mu.Unlock()
		out, err := m.records(ctx, id)
		if err == nil {
			return out, nil
		}
		if envelope.CodeOf(err) != envelope.CodeCommandNotFound {
			return nil, err
		}
		// Its result expired or was compacted: the key is free again.
		m.mu.Lock()
		if m.idem[key] == e {
			delete(m.idem, key)
		}
		m.mu.Unlock()
	}

	// Plan and reserve under the lock; write without it; then admit.
	kinds, err := m.planLocked(recs, routes)
	if err != nil {
		m.mu.Unlock()
		return nil, err
	}
	cmds := make([]*cmd, len(recs))
	for i := range recs {
		r := &recs[i]
		switch kinds[i] {
		case kindFast:
			m.q.Acquire(r.DeviceID, r.CommandID) // cannot fail: planLocked saw the device idle under the lock
			m.running++
		case kindQueued:
			m.reserved[r.DeviceID]++
		}
		cmds[i] = &cmd{rec: *r, phase: phAdmitting}
		m.cmds[r.CommandID] = cmds[i]
	}
	var admitted chan struct{}
	if key != "" {
		admitted = make(chan struct{})
		m.idem[key] = &idemEntry{id: recs[0].CommandID, admitting: admitted}
	}
	m.mu.Unlock()

	errs := m.putAll(recs)
	werr := errors.Join(errs...)

	m.mu.Lock()
	if key != "" {
		if werr != nil {
			delete(m.idem, key)
		} else {
			m.idem[key].admitting = nil
		}
		close(admitted)
	}
	var kick []string
	if werr != nil {
		for i := range recs {
			r := &recs[i]
			delete(m.cmds, r.CommandID)
			switch kinds[i] {
			case kindFast:
				m.q.Done(r.DeviceID, r.CommandID)
				kick = append(kick, r.DeviceID)
				kick = append(kick, m.releaseLocked()...)
			case kindQueued:
				m.unreserveLocked(r.DeviceID)
			}
		}
		m.mu.Unlock()
		m.compensate(recs, errs, werr)
		m.kick(kick...)
		return nil, fmt.Errorf("ork/commands: submit: %w", werr)
	}
	for i := range recs {
		c, r := cmds[i], &recs[i]
		m.byState[r.State]++
		switch kinds[i] {
		case kindParent:
			c.phase = phParent
			c.pending = len(r.Children)
			c.children = &childSummary{Total: len(r.Children)}
			continue
		case kindFast:
			c.phase = phRunning
			rec := *r // the caller owns recs once Submit returns
			m.spawnLocked(func() { m.run(c, rec, true) })
		case kindQueued:
			m.unreserveLocked(r.DeviceID)
			m.q.Append(r.DeviceID, r.CommandID, deadlineOf(r))
			c.phase = phQueued
			kick = append(kick, r.DeviceID)
		}
		if m.o.Owner == nil {
			m.devWorker[r.DeviceID] = r.WorkerID
		}
		if r.Deadline != 0 {
			m.armLocked(c, time.UnixMilli(r.Deadline))
		}
	}
	m.mu.Unlock()
	m.kick(kick...)
	return recs, nil
}

// prepare validates and normalises submitted records (on a copy).
func (m *Manager) prepare(in []Record, now int64) ([]Record, error) {
	if len(in) == 0 {
		return nil, fmt.Errorf("%w: nothing to submit", ErrInvalid)
	}
	recs := slices.Clone(in)
	fanout := recs[0].DeviceID == ""
	if fanout && len(recs) < 2 {
		return nil, fmt.Errorf("%w: a command without deviceId is a fan-out parent and needs children", ErrInvalid)
	}
	var seen map[string]struct{}
	if len(recs) > 1 {
		seen = make(map[string]struct{}, len(recs))
	}
	for i := range recs {
		r := &recs[i]
		switch {
		case r.Command == "":
			return nil, fmt.Errorf("%w: record %d has no command", ErrInvalid, i)
		case i > 0 && r.DeviceID == "":
			return nil, fmt.Errorf("%w: record %d has no deviceId", ErrInvalid, i)
		case i > 0 && r.IdempotencyKey != "":
			return nil, fmt.Errorf("%w: record %d: only the first record may carry an idempotency key", ErrInvalid, i)
		case !fanout && r.ParentID != "":
			return nil, fmt.Errorf("%w: record %d names parent %s, which is not in this submit", ErrInvalid, i, r.ParentID)
		case r.Deadline < 0:
			return nil, fmt.Errorf("%w: record %d has a negative deadline", ErrInvalid, i)
		}
		if r.CommandID == "" {
			r.CommandID = envelope.NewID()
		}
		if seen != nil {
			if _, dup := seen[r.CommandID]; dup {
				return nil, fmt.Errorf("%w: command id %s appears twice", ErrInvalid, r.CommandID)
			}
			seen[r.CommandID] = struct{}{}
		}
		switch {
		case fanout && i == 0:
			if r.Scope == "" || r.Scope == envelope.ScopeDevice {
				r.Scope = envelope.ScopeWorker
			}
		case r.Scope == "":
			r.Scope = envelope.ScopeDevice
		}
		if fanout && i > 0 {
			r.ParentID = recs[0].CommandID
		}
		r.State = Queued
		r.Retries = *m.o.MaxRetries
		r.Attempts = 0
		r.Delivered = false
		r.Result, r.Error = nil, ""
		r.CreatedAt, r.UpdatedAt = now, now
		r.Children = nil
		if len(r.Params) == 0 {
			r.Params = json.RawMessage(`{}`)
		}
	}
	if fanout {
		p := &recs[0]
		p.Children = make([]string, 0, len(recs)-1)
		for _, r := range recs[1:] {
			p.Children = append(p.Children, r.CommandID)
		}
		if err := steps(p, now, Dispatched, Executing); err != nil {
			return nil, err
		}
	}
	return recs, nil
}

// planLocked decides how each record is admitted and checks that every queue has room, before anything is
// reserved or written. Fast records are rewritten as DISPATCHED.
func (m *Manager) planLocked(recs []Record, routes []route) ([]kind, error) {
	kinds := make([]kind, len(recs))
	var queued map[string]int // device → records of this submit that will queue
	var fast map[string]bool
	if len(recs) > 1 {
		queued = make(map[string]int)
		fast = make(map[string]bool)
	}
	running := m.running
	now := recs[0].CreatedAt
	for i := range recs {
		r := &recs[i]
		if _, dup := m.cmds[r.CommandID]; dup {
			return nil, fmt.Errorf("%w: command id %s is in use", ErrInvalid, r.CommandID)
		}
		if r.IsParent() {
			kinds[i] = kindParent
			continue
		}
		dev := r.DeviceID
		if !m.draining && routes[i].routable && running < m.o.Concurrency && !fast[dev] && queued[dev] == 0 && m.idleLocked(dev) {
			if fast != nil {
				fast[dev] = true
			}
			running++
			kinds[i] = kindFast
			continue
		}
		if queued == nil {
			queued = map[string]int{dev: 1}
		} else {
			queued[dev]++
		}
		kinds[i] = kindQueued
	}
	max := m.q.MaxDepth()
	for dev, n := range queued {
		if m.q.Depth(dev)+m.reserved[dev]+n > max {
			return nil, fmt.Errorf("ork/commands: submit: %w", &concurrency.QueueFullError{DeviceID: dev, Depth: max})
		}
	}
	for i := range recs {
		if kinds[i] != kindFast {
			continue
		}
		d, err := dispatchRecord(recs[i], routes[i].worker, now)
		if err != nil {
			return nil, err
		}
		recs[i] = d
	}
	return kinds, nil
}

// idleLocked: nothing in flight, queued, or about to be queued on dev.
func (m *Manager) idleLocked(dev string) bool {
	if m.reserved[dev] > 0 || m.q.Depth(dev) > 0 {
		return false
	}
	_, busy := m.q.InFlight(dev)
	return !busy
}

func (m *Manager) unreserveLocked(dev string) {
	if m.reserved[dev]--; m.reserved[dev] <= 0 {
		delete(m.reserved, dev)
	}
}

// putAll writes every admission record, concurrently when there are several so the WAL's group commit can
// carry them in one sync.
func (m *Manager) putAll(recs []Record) []error {
	errs := make([]error, len(recs))
	put := func(i int) {
		b, err := encode(&recs[i])
		if err == nil {
			err = m.o.WAL.Put(m.ctx, recs[i].CommandID, b)
		}
		if err != nil {
			errs[i] = fmt.Errorf("wal put %s: %w", recs[i].CommandID, err)
		}
	}
	if len(recs) == 1 {
		put(0)
		return errs
	}
	sem := make(chan struct{}, 64)
	var wg sync.WaitGroup
	for i := range recs {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			put(i)
		})
	}
	wg.Wait()
	return errs
}

// compensate finishes, as FAILED, the records of a failed Submit that did reach the WAL, so a restart does not
// run commands whose Submit reported an error. Best effort: if this write fails too, recovery will run them.
func (m *Manager) compensate(recs []Record, errs []error, cause error) {
	now := m.o.Now().UnixMilli()
	for i := range recs {
		if errs[i] != nil {
			continue
		}
		r := recs[i]
		if err := fail(&r, Failed, envelope.CodeInternal, "not admitted: "+cause.Error(), now); err != nil {
			continue
		}
		b, err := encode(&r)
		if err == nil {
			err = m.o.WAL.Finish(m.ctx, r.CommandID, b)
		}
		if err != nil {
			m.log.Error("cannot withdraw a command whose submit failed; it will run after a restart",
				"cmd", r.CommandID, "err", err)
		}
	}
}

// records returns id's record and, for a fan-out parent, its children's.
func (m *Manager) records(ctx context.Context, id string) ([]Record, error) {
	rec, err := m.Get(ctx, id)
	if err != nil {
		return nil, err
	}
	out := []Record{rec}
	for _, ch := range rec.Children {
		r, err := m.Get(ctx, ch)
		if err != nil {
			continue
		}
		out = append(out, r)
	}
	return out, nil
}

// LookupKey returns the command an idempotency key names, if it is still known.
func (m *Manager) LookupKey(key string) (string, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.idem[key]
	if key == "" || e == nil || (!e.expires.IsZero() && !m.o.Now().Before(e.expires)) {
		return "", false
	}
	return e.id, true
}

// Cancel cancels a QUEUED command (in its queue, or waiting out a resend backoff): it becomes CANCELLED with
// ERR_CANCELLED, durably, and leaves its queue. Anything else (dispatched, executing, finished) is refused with
// (false, nil). Cancelling a fan-out parent cancels each of its children that is still QUEUED and reports
// whether any was. An unknown id is a *envelope.Error with CodeCommandNotFound.
func (m *Manager) Cancel(ctx context.Context, id string) (bool, error) {
	if id == "" {
		return false, envelope.Err(envelope.CodeCommandIDRequired)
	}
	now := m.o.Now().UnixMilli()
	m.mu.Lock()
	c := m.cmds[id]
	if c == nil {
		m.mu.Unlock()
		if _, err := m.Get(ctx, id); err != nil {
			return false, err
		}
		return false, nil
	}
	targets := []*cmd{c}
	if c.phase == phParent {
		targets = targets[:0]
		for _, ch := range c.rec.Children {
			if cc := m.cmds[ch]; cc != nil {
				targets = append(targets, cc)
			}
		}
	}
	type taken struct {
		c    *cmd
		next Record
		was  phase
	}
	var took []taken
	for _, t := range targets {
		if t.phase != phQueued && t.phase != phParked {
			continue
		}
		next, err := cancelRecord(t.rec, now)
		if err != nil {
			m.log.Error("cancel", "cmd", t.rec.CommandID, "err", err)
			continue
		}
		if t.phase == phQueued && !m.q.Remove(t.rec.DeviceID, t.rec.CommandID) {
			continue
		}
		was := t.phase
		m.stopParkLocked(t)
		t.phase = phRunning
		took = append(took, taken{t, next, was})
	}
	m.mu.Unlock()

	n := 0
	var errs []error
	for _, t := range took {
		b, err := encode(&t.next)
		if err == nil {
			err = m.o.WAL.Finish(m.ctx, t.next.CommandID, b)
		}
		if err == nil {
			m.complete(t.c, t.next, false)
			n++
			continue
		}
		errs = append(errs, fmt.Errorf("ork/commands: cancel %s: %w", t.next.CommandID, err))
		// Not cancelled after all: back to the head of its queue (a queued command loses its place only in
		// this failure case).
		m.mu.Lock()
		t.c.phase = phParked
		m.unparkLocked(t.c)
		m.mu.Unlock()
		m.kick(t.c.rec.DeviceID)
	}
	return n > 0, errors.Join(errs...)
}

// Get returns the current record of id: from memory (every unfinished command is there once Recover has run),
// else its retained result while younger than ResultTTL. An unknown id is a *envelope.Error with
// CodeCommandNotFound.
func (m *Manager) Get(ctx context.Context, id string) (Record, error) {
	if id == "" {
		return Record{}, envelope.Err(envelope.CodeCommandIDRequired)
	}
	m.mu.Lock()
	if c := m.cmds[id]; c != nil {
		r := c.rec
		m.mu.Unlock()
		return r, nil
	}
	m.mu.Unlock()
	return m.result(ctx, id)
}

// result reads a retained result, hiding it once ResultTTL has passed even if compaction has not run yet.
func (m *Manager) result(ctx context.Context, id string) (Record, error) {
	b, err := m.o.WAL.Result(ctx, id)
	if errors.Is(err, ErrNotFound) {
		return Record{}, notFound(id)
	}
	if err != nil {
		return Record{}, fmt.Errorf("ork/commands: result %s: %w", id, err)
	}
	rec, err := decode(id, b)
	if err != nil {
		return Record{}, fmt.Errorf("ork/commands: result %s: %w", id, err)
	}
	if !m.o.Now().Before(time.UnixMilli(rec.UpdatedAt).Add(m.o.ResultTTL)) {
		return Record{}, notFound(id)
	}
	return rec, nil
}

// Status answers command.status: see Get.
func (m *Manager) Status(ctx context.Context, id string) (envelope.CommandStatus, error) {
	rec, err := m.Get(ctx, id)
	if err != nil {
		return envelope.CommandStatus{}, err
	}
	return rec.CommandStatus(), nil
}

// Wait answers command.wait: it returns at once if id is terminal, else blocks until it is, ctx ends or the
// Manager closes, and then returns the status as it is (ctx ending is not an error). It starts no goroutine.
func (m *Manager) Wait(ctx context.Context, id string) (envelope.CommandStatus, error) {
	m.mu.Lock()
	c := m.cmds[id]
	if c == nil {
		m.mu.Unlock()
		return m.Status(context.WithoutCancel(ctx), id)
	}
	if c.done == nil {
		c.done = make(chan struct{})
	}
	ch := c.done
	m.mu.Unlock()
	select {
	case <-ch:
	case <-ctx.Done():
	case <-m.closing:
	}
	m.mu.Lock()
	rec := c.rec
	m.mu.Unlock()
	return rec.CommandStatus(), nil
}

// Pump dispatches the queued commands of workerID's devices, and asks it about commands whose outcome is
// unknown. The node calls it when the Worker becomes routable (registration READY, health back to HEALTHY).
func (m *Manager) Pump(workerID string) {
	m.pump(func(w string) bool { return w == workerID })
}

// PumpAll pumps every device with queued work (after Recover, and as a periodic safety net).
func (m *Manager) PumpAll() { m.pump(nil) }

func (m *Manager) pump(match func(string) bool) {
	devs := m.q.Devices()
	m.mu.Lock()
	for dev := range m.unknown {
		devs = append(devs, dev)
	}
	m.mu.Unlock()
	slices.Sort(devs)
	devs = slices.Compact(devs)
	m.kickWhere(devs, match)
}

// Stats is a snapshot of the Manager's counters.
type Stats struct {
	States   map[string]int // unfinished commands in memory, by state (fan-out parents included)
	Finished map[string]int // commands that reached each terminal state since New
	InFlight int            // Send and Status calls running now
	Queued   int            // commands waiting in device queues
	Unknown  int            // commands whose outcome is unknown, waiting to ask their Worker
	Draining bool
}

// Stats returns the current counters.
func (m *Manager) Stats() Stats {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := Stats{
		States:   make(map[string]int, len(m.byState)),
		Finished: make(map[string]int, len(m.finished)),
		InFlight: m.running,
		Queued:   m.q.Len(),
		Draining: m.draining,
	}
	for k, v := range m.byState {
		if v != 0 {
			s.States[k] = v
		}
	}
	for k, v := range m.finished {
		s.Finished[k] = v
	}
	for _, ids := range m.unknown {
		s.Unknown += len(ids)
	}
	return s
}

// Compact deletes retained results older than ResultTTL (the scheduler's compaction job) and forgets the
// idempotency keys that pointed at them.
func (m *Manager) Compact(ctx context.Context) (int, error) {
	now := m.o.Now()
	n, err := m.o.WAL.ExpireResults(ctx, now.Add(-m.o.ResultTTL))
	m.mu.Lock()
	for k, e := range m.idem {
		if !e.expires.IsZero() && !now.Before(e.expires) {
			delete(m.idem, k)
		}
	}
	m.mu.Unlock()
	if err != nil {
		return n, fmt.Errorf("ork/commands: compact: %w", err)
	}
	return n, nil
}

// Drain prepares a graceful stop: no new send or Status question starts from now on (Submit still admits and
// queues), and Drain waits, bounded by ctx, for those in progress to finish. It returns ctx.Err() if some were
// still running; whatever they had not settled stays in the WAL as it is, and the next Recover resolves it.
func (m *Manager) Drain(ctx context.Context) error {
	m.mu.Lock()
	m.draining = true
	if m.active == 0 {
		m.mu.Unlock()
		return nil
	}
	if m.drained == nil {
		m.drained = make(chan struct{})
	}
	ch := m.drained
	m.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close stops every timer, aborts sends and WAL writes in progress (their commands stay in the WAL as last
// written; Recover resolves them), wakes waiters and waits for the Manager's goroutines to return. It is
// idempotent and always returns nil.
func (m *Manager) Close() error {
	m.closeOnce.Do(func() {
		m.mu.Lock()
		m.closed = true
		for _, c := range m.cmds {
			m.stopParkLocked(c)
			if c.dl != nil {
				c.dl()
				c.dl = nil
			}
		}
		close(m.closing)
		m.mu.Unlock()
		m.cancel()
		m.wg.Wait()
	})
	return nil
}

func deadlineOf(r *Record) time.Time {
	if r.Deadline == 0 {
		return time.Time{}
	}
	return time.UnixMilli(r.Deadline)
}
