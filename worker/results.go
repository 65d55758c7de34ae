package worker

import (
	"container/list"
	"context"
	"fmt"
	"maps"
	"sync"
	"time"

	"github.com/orknode/ork/protocols/envelope"
)

// StatusRunning is command.status's answer for a command whose handler is
// still running (and command.request's, for a duplicate whose wait for the
// first run was cut short).
const StatusRunning = "RUNNING"

// ResultCache maps commandId → result, so a command resent with the same
// commandId never runs its handler twice: a duplicate of a finished command
// gets the stored result, a duplicate of a running one waits for it. Finished
// entries are kept for the TTL (counted from when they finished) and the
// oldest go first when the cache is full; running entries are never evicted.
// It also counts handler runs per commandId. Safe for concurrent use.
//
// A Worker with Config.StateDir makes its cache durable: every handler run is
// journaled (a synced "started" record before the handler, a "done" record
// after it) and the journal is replayed when the Worker starts again, so a
// resend after a process crash still never runs the handler twice.
type ResultCache struct {
	ttl time.Duration
	max int
	now func() time.Time

	mu       sync.Mutex
	entries  map[string]*cacheEntry
	finished *list.List // of *cacheEntry, oldest first
	execs    map[string]int
	execFIFO []string // ids in execs, oldest first, from execHead
	execHead int

	j *journal // nil: in memory only (Config.StateDir empty)
}

type cacheEntry struct {
	id         string
	done       chan struct{} // closed when res is set
	res        envelope.CommandResult
	finishedAt time.Time
	elem       *list.Element // in finished, once done

	// Journal state, guarded by mu (and the journal's mu when written): the
	// "started" record is on disk; pending is the result whose "done" record
	// is written but not yet published by finish.
	journaled bool
	command   string
	deviceID  string
	startedAt time.Time
	pending   *envelope.CommandResult
}

// NewResultCache makes a cache keeping finished results for ttl (zero means
// MinDedupTTL; shorter is refused) and at most maxEntries of them (zero means
// DefaultDedupMaxEntries).
func NewResultCache(ttl time.Duration, maxEntries int) (*ResultCache, error) {
	switch {
	case ttl == 0:
		ttl = MinDedupTTL
	case ttl < MinDedupTTL:
		return nil, fmt.Errorf("%w: result cache TTL %v is under %v", ErrInvalidConfig, ttl, MinDedupTTL)
	}
	switch {
	case maxEntries == 0:
		maxEntries = DefaultDedupMaxEntries
	case maxEntries < 0:
		return nil, fmt.Errorf("%w: result cache size %d", ErrInvalidConfig, maxEntries)
	}
	return newResultCache(ttl, maxEntries, time.Now), nil
}

func newResultCache(ttl time.Duration, maxEntries int, now func() time.Time) *ResultCache {
	return &ResultCache{
		ttl: ttl, max: maxEntries, now: now,
		entries:  map[string]*cacheEntry{},
		finished: list.New(),
		execs:    map[string]int{},
	}
}

// begin returns the entry of id and whether the caller created it (and must
// finish it). An existing entry is either running or finished.
func (c *ResultCache) begin(id string) (*cacheEntry, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pruneLocked()
	if e, ok := c.entries[id]; ok {
		return e, false
	}
	e := &cacheEntry{id: id, done: make(chan struct{})}
	c.entries[id] = e
	return e, true
}

// finish stores the result of a running entry and wakes its waiters.
func (c *ResultCache) finish(e *cacheEntry, res envelope.CommandResult) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e.res = res
	e.finishedAt = c.now()
	e.elem = c.finished.PushBack(e)
	close(e.done)
	c.pruneLocked()
}

// wait returns the entry's result, or false if ctx ends first.
func (e *cacheEntry) wait(ctx context.Context) (envelope.CommandResult, bool) {
	select {
	case <-e.done:
		return e.res, true
	case <-ctx.Done():
		return envelope.CommandResult{}, false
	}
}

// Lookup answers command.status: the stored result, status RUNNING while the
// handler runs, or status UNKNOWN for a commandId never seen (or forgotten).
func (c *ResultCache) Lookup(id string) envelope.CommandResult {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pruneLocked()
	e, ok := c.entries[id]
	if !ok {
		return envelope.CommandResult{CommandID: id, Status: envelope.StatusUnknown}
	}
	select {
	case <-e.done:
		return e.res
	default:
		return envelope.CommandResult{CommandID: id, Status: StatusRunning}
	}
}

// Len is the number of entries, running and finished.
func (c *ResultCache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}

// pruneLocked drops expired finished entries and, over the size bound, the
// oldest finished ones.
func (c *ResultCache) pruneLocked() {
	now := c.now()
	for f := c.finished.Front(); f != nil; f = c.finished.Front() {
		e := f.Value.(*cacheEntry)
		if len(c.entries) <= c.max && now.Sub(e.finishedAt) < c.ttl {
			return
		}
		c.finished.Remove(f)
		delete(c.entries, e.id)
	}
}

// countExec records one handler run of id and returns the runs so far.
func (c *ResultCache) countExec(id string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n, seen := c.execs[id]
	c.execs[id] = n + 1
	if !seen {
		c.execFIFO = append(c.execFIFO, id)
		for len(c.execs) > c.max {
			delete(c.execs, c.execFIFO[c.execHead])
			c.execFIFO[c.execHead] = ""
			c.execHead++
		}
		if c.execHead > len(c.execFIFO)/2 && c.execHead > 1024 {
			c.execFIFO = append([]string(nil), c.execFIFO[c.execHead:]...)
			c.execHead = 0
		}
	}
	return n + 1
}

// Executions returns how many times the handler ran per commandId (for the
// most recent ids, up to the cache size). Every count is 1 unless something
// ran a command twice.
func (c *ResultCache) Executions() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.execs)
}

// abort drops a running entry whose handler never started (the Worker was
// closing), so a resend after a restart runs it. Waiters get a failure.
func (c *ResultCache) abort(e *cacheEntry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e.res = envelope.CommandResult{CommandID: e.id, Status: envelope.StateFailed,
		Error: envelope.Errf(envelope.CodeInternal, "worker shutting down; command not run").Message}
	close(e.done)
	if c.entries[e.id] == e {
		delete(c.entries, e.id)
	}
}
