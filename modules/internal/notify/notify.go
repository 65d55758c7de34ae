// Package notify delivers a module's change events to its callback outside
// the module's lock, in the order they happened.
package notify

import "sync"

// Queue delivers pushed values to fn in push order, one goroutine at a time
// and with no lock held, so fn may call back into the module: a value pushed
// during delivery is delivered by the same loop. Push under the module's lock
// (so the queue keeps the order of the changes), Flush after releasing it.
// A Queue with a nil fn does nothing.
type Queue[T any] struct {
	fn         func(T)
	mu         sync.Mutex
	queue      []T
	delivering bool
}

// New returns a Queue delivering to fn (nil: none).
func New[T any](fn func(T)) *Queue[T] { return &Queue[T]{fn: fn} }

// Push queues v.
func (q *Queue[T]) Push(v T) {
	if q.fn == nil {
		return
	}
	q.mu.Lock()
	q.queue = append(q.queue, v)
	q.mu.Unlock()
}

// Flush delivers the queued values, unless another goroutine is delivering
// (it will deliver them).
func (q *Queue[T]) Flush() {
	if q.fn == nil {
		return
	}
	for {
		q.mu.Lock()
		if q.delivering || len(q.queue) == 0 {
			q.mu.Unlock()
			return
		}
		batch := q.queue
		q.queue, q.delivering = nil, true
		q.mu.Unlock()
		q.deliver(batch)
	}
}

func (q *Queue[T]) deliver(batch []T) {
	defer func() { // also when fn panics, so later values are still delivered
		q.mu.Lock()
		q.delivering = false
		q.mu.Unlock()
	}()
	for _, v := range batch {
		q.fn(v)
	}
}
