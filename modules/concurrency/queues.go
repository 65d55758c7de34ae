// Package concurrency is the Concurrency Manager (MDK-REFERENCE §2.15 and §12 item 3, deferred in the original):
// per-device FIFO queues with at most one command in flight per device, a bounded queue depth per device
// (ErrQueueFull) and an optional deadline per entry (an entry whose deadline passed while it was queued is handed
// back as expired instead of being dispatched).
//
// Queues is a pure data structure guarded by a mutex: no goroutines, no clock (callers pass now), no I/O. The
// command state machine (modules/commands) owns the policy: it decides when a device is routable, persists every
// transition and fails expired entries with ERR_COMMAND_EXPIRED.
//
// Vocabulary: an entry is queued while it waits in its device's FIFO; it is in flight from the moment Next (or
// Acquire) hands it out until Done releases the device. The depth of a device counts queued entries only, never
// the one in flight.
package concurrency

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/orknode/ork/protocols/envelope"
)

// DefaultMaxDepth is the per-device queue depth used when New is given a depth below 1.
const DefaultMaxDepth = 64

// ErrQueueFull is matched (errors.Is) by the error Push returns when the device already holds the maximum number
// of queued entries. The error also wraps an *envelope.Error with envelope.CodeQueueFull (found by errors.As or
// envelope.CodeOf), so the node can send it on the wire as is.
var ErrQueueFull = errors.New("ork/concurrency: queue full")

// QueueFullError is the error Push returns when a device queue is full. It unwraps to ErrQueueFull and to an
// *envelope.Error (code ERR_QUEUE_FULL, message naming the device).
type QueueFullError struct {
	DeviceID string
	Depth    int // the limit that was hit
}

func (e *QueueFullError) Error() string {
	return fmt.Sprintf("ork/concurrency: queue full: device %q already holds %d queued commands", e.DeviceID, e.Depth)
}

// Unwrap returns the wire error first (so errors.As finds the detailed one) and the sentinel.
func (e *QueueFullError) Unwrap() []error {
	return []error{
		envelope.Errf(envelope.CodeQueueFull, "device %s already holds %d queued commands", e.DeviceID, e.Depth),
		ErrQueueFull,
	}
}

// entry is one queued command.
type entry struct {
	id       string
	deadline time.Time // zero: none
}

func (e entry) expired(now time.Time) bool {
	return !e.deadline.IsZero() && !now.Before(e.deadline)
}

// device is one device's FIFO and in-flight slot.
type device struct {
	q        []entry // q[head:] is the FIFO, oldest first
	head     int
	inflight string
	busy     bool
}

func (d *device) depth() int { return len(d.q) - d.head }

func (d *device) popHead() entry {
	e := d.q[d.head]
	d.q[d.head] = entry{}
	d.head++
	switch {
	case d.head == len(d.q):
		d.q, d.head = d.q[:0], 0
	case d.head >= 32 && d.head*2 >= len(d.q):
		// Compact so a long-lived busy device does not keep growing its backing array.
		n := copy(d.q, d.q[d.head:])
		clear(d.q[n:])
		d.q, d.head = d.q[:n], 0
	}
	return e
}

func (d *device) pushFront(e entry) {
	if d.head > 0 {
		d.head--
		d.q[d.head] = e
		return
	}
	d.q = slices.Insert(d.q, 0, e)
}

// Queues holds the per-device FIFOs. The zero value is not usable; call New. All methods are safe for
// concurrent use.
type Queues struct {
	mu       sync.Mutex
	maxDepth int
	devs     map[string]*device
	queued   int // sum of depths
}

// New returns empty queues allowing maxDepth queued entries per device (DefaultMaxDepth when maxDepth < 1).
func New(maxDepth int) *Queues {
	if maxDepth < 1 {
		maxDepth = DefaultMaxDepth
	}
	return &Queues{maxDepth: maxDepth, devs: make(map[string]*device)}
}

// MaxDepth returns the per-device limit.
func (q *Queues) MaxDepth() int { return q.maxDepth }

// dev returns the device, creating it when create is set.
func (q *Queues) dev(id string, create bool) *device {
	d := q.devs[id]
	if d == nil && create {
		d = &device{}
		q.devs[id] = d
	}
	return d
}

// gc forgets a device with nothing queued and nothing in flight, so the map does not grow with every device
// ever seen.
func (q *Queues) gc(id string, d *device) {
	if !d.busy && d.depth() == 0 {
		delete(q.devs, id)
	}
}

// Push appends id to deviceID's FIFO. deadline is the time after which the entry must not be dispatched (zero:
// none). It returns a *QueueFullError (errors.Is ErrQueueFull) when the device already holds MaxDepth queued
// entries; the entry in flight does not count. Ids must be unique; Push does not check it.
func (q *Queues) Push(deviceID, id string, deadline time.Time) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	d := q.dev(deviceID, true)
	if d.depth() >= q.maxDepth {
		q.gc(deviceID, d)
		return &QueueFullError{DeviceID: deviceID, Depth: q.maxDepth}
	}
	d.q = append(d.q, entry{id: id, deadline: deadline})
	q.queued++
	return nil
}

// Append is Push without the depth check, for entries whose admission was already checked against Depth and
// MaxDepth (the command state machine reserves room before it persists a command) and for recovery, which must
// never drop a persisted command.
func (q *Queues) Append(deviceID, id string, deadline time.Time) {
	q.mu.Lock()
	defer q.mu.Unlock()
	d := q.dev(deviceID, true)
	d.q = append(d.q, entry{id: id, deadline: deadline})
	q.queued++
}

// Requeue puts id back at the head of deviceID's FIFO, without the depth check (it was admitted already), and
// releases the device if id is the entry in flight. It is how a command that could not be delivered returns to
// its queue without losing its place to commands queued after it.
func (q *Queues) Requeue(deviceID, id string, deadline time.Time) {
	q.mu.Lock()
	defer q.mu.Unlock()
	d := q.dev(deviceID, true)
	if d.busy && d.inflight == id {
		d.busy, d.inflight = false, ""
	}
	d.pushFront(entry{id: id, deadline: deadline})
	q.queued++
}

// Next hands out deviceID's next command. Expired entries at the head of the FIFO (deadline ≤ now) are always
// removed and returned in expired, oldest first, whether or not anything is dispatched. Then, if nothing is in
// flight on the device and routable is true, the head is popped, marked in flight and returned with ok true.
// Otherwise ok is false and the FIFO keeps its order.
func (q *Queues) Next(deviceID string, now time.Time, routable bool) (id string, expired []string, ok bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	d := q.dev(deviceID, false)
	if d == nil {
		return "", nil, false
	}
	for d.depth() > 0 && d.q[d.head].expired(now) {
		expired = append(expired, d.popHead().id)
		q.queued--
	}
	if d.busy || !routable || d.depth() == 0 {
		q.gc(deviceID, d)
		return "", expired, false
	}
	e := d.popHead()
	q.queued--
	d.busy, d.inflight = true, e.id
	return e.id, expired, true
}

// Acquire marks id in flight on deviceID without it ever being queued, if the device is idle: nothing in flight
// and nothing queued (so FIFO order is kept). It reports whether it did. The command state machine uses it to
// dispatch a command in the same write that admits it, and to give a recovered command whose outcome is unknown
// its device back.
func (q *Queues) Acquire(deviceID, id string) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	d := q.dev(deviceID, true)
	if d.busy || d.depth() > 0 {
		return false
	}
	d.busy, d.inflight = true, id
	return true
}

// Done releases deviceID if id is its entry in flight; for any other id (or an idle device) it does nothing.
func (q *Queues) Done(deviceID, id string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	d := q.dev(deviceID, false)
	if d == nil || !d.busy || d.inflight != id {
		return
	}
	d.busy, d.inflight = false, ""
	q.gc(deviceID, d)
}

// Remove takes queued id out of deviceID's FIFO (cancel of a queued command) and reports whether it was there.
// The entry in flight is not queued and cannot be removed.
func (q *Queues) Remove(deviceID, id string) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	d := q.dev(deviceID, false)
	if d == nil {
		return false
	}
	for i := d.head; i < len(d.q); i++ {
		if d.q[i].id == id {
			copy(d.q[i:], d.q[i+1:])
			d.q[len(d.q)-1] = entry{}
			d.q = d.q[:len(d.q)-1]
			q.queued--
			q.gc(deviceID, d)
			return true
		}
	}
	return false
}

// Depth returns the number of entries queued on deviceID (the one in flight excluded).
func (q *Queues) Depth(deviceID string) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	if d := q.dev(deviceID, false); d != nil {
		return d.depth()
	}
	return 0
}

// InFlight returns the id in flight on deviceID, if any.
func (q *Queues) InFlight(deviceID string) (string, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if d := q.dev(deviceID, false); d != nil && d.busy {
		return d.inflight, true
	}
	return "", false
}

// Devices returns, sorted, the devices that have queued entries: the ones to pump when a Worker becomes
// routable.
func (q *Queues) Devices() []string {
	q.mu.Lock()
	defer q.mu.Unlock()
	out := make([]string, 0, len(q.devs))
	for id, d := range q.devs {
		if d.depth() > 0 {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out
}

// Len returns the number of queued entries over all devices (entries in flight excluded).
func (q *Queues) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.queued
}
