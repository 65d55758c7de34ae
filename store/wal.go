package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"

	ds "github.com/ipfs/go-datastore"
)

// Op is one write of an atomic Apply.
type Op struct {
	NS     string // namespace, default NSWAL when empty
	Key    string
	Value  []byte
	Delete bool
}

// WALStats counts the group commit's work since Open/New. Only committed writes are counted.
type WALStats struct {
	Appends uint64 // ops (puts and deletes) committed
	Syncs   uint64 // batch commits, each one fsync on LevelDB
	Batches uint64 // caller requests (Append, Delete, Apply, Store.Put, Store.Delete) those commits carried
}

// WAL is the command write-ahead log: a current-state table in NSWAL keyed by commandId. A command transition
// is persisted here before it takes effect, so every transition waits for an fsync. Group commit makes that
// affordable: one fsync serves every request that was waiting when its batch was built.
//
// The commit is leader-based and needs no goroutine of its own. A writer that finds no commit in progress
// becomes the leader and commits its own request in its own goroutine, so an idle WAL costs one fsync and no
// goroutine hand-off. Writers arriving while a commit is in progress queue up; when the leader is done it
// makes the first of them the next leader, which commits everything queued (up to MaxBatchOps ops) as one
// batch. Grouping thus grows with load exactly as a dedicated committer's would.
//
// A write method returns nil only once its ops are durable. If the caller's ctx ends while its request is
// queued, it returns ctx.Err(): if no commit had taken the request yet it is withdrawn and not written;
// if it was already in a batch being committed it may still be committed, so treat ctx.Err() as "outcome
// unknown" and re-read. A leader does not abandon its own commit (one batch, one fsync) when its ctx ends: it
// returns that commit's outcome. After Close every method returns ErrClosed.
type WAL struct {
	root     ds.Batching
	maxOps   int
	slots    chan struct{} // one token per queued request: a full queue blocks writers
	writeCtx context.Context

	// ctx is cancelled by Close (under mu): writers are refused from then on, while the leaders go on
	// committing what was queued. Batches are written under writeCtx, which is never cancelled, so Close never
	// aborts a commit half way.
	ctx    context.Context
	cancel context.CancelFunc

	// mu guards the leader's turn. committing is true while a leader commits or has been named and is about to;
	// it is always true while queue is non-empty, so a queued request always has a leader coming for it.
	mu         sync.Mutex
	committing bool
	queue      []*request    // requests waiting for a leader, in arrival order; each holds a token of slots
	idle       chan struct{} // made by Close while committing, closed when committing ends

	appends, syncs, batches atomic.Uint64
}

// request is one caller's ops; they are always written in the same batch.
type request struct {
	ops  []batchOp
	done chan error // buffered: the batch outcome, or errLead; a sender never blocks on a caller that has gone

	state reqState // guarded by WAL.mu
}

type reqState uint8

const (
	stateQueued reqState = iota // in WAL.queue, waiting
	stateLead                   // named next leader (errLead is in done), still in WAL.queue
	stateTaken                  // in a batch being committed; done will get its outcome
)

// errLead, received on a request's done, names its caller the next leader. It never reaches a caller.
var errLead = errors.New("ork/store: internal: lead the next commit")

// errLeaderPanicked answers the followers of a leader whose commit panicked.
var errLeaderPanicked = errors.New("ork/store: wal commit panicked")

type batchOp struct {
	key    ds.Key
	value  []byte
	delete bool
}

func newWAL(root ds.Batching, cfg config) *WAL {
	ctx, cancel := context.WithCancel(context.Background())
	return &WAL{
		root:     root,
		maxOps:   cfg.maxBatchOps,
		slots:    make(chan struct{}, cfg.queueLen),
		writeCtx: context.WithoutCancel(ctx),
		ctx:      ctx,
		cancel:   cancel,
	}
}

// Append puts value under key in NSWAL; the record is durable when Append returns nil.
func (w *WAL) Append(ctx context.Context, key string, value []byte) error {
	return w.Apply(ctx, Op{Key: key, Value: value})
}

// Delete removes key from NSWAL, durably when it returns nil. Deleting a missing key is not an error.
func (w *WAL) Delete(ctx context.Context, key string) error {
	return w.Apply(ctx, Op{Key: key, Delete: true})
}

// Apply writes all ops atomically, in one batch, durable when it returns nil; if it fails none of them is
// written. Ops apply in order, so a later op on the same key wins. A command's terminal transition is one
// Apply: put NSResults/<id> and delete NSWAL/<id>.
func (w *WAL) Apply(ctx context.Context, ops ...Op) error {
	bops := make([]batchOp, len(ops))
	for i, op := range ops {
		ns := op.NS
		if ns == "" {
			ns = NSWAL
		}
		k, err := storeKey(ns, op.Key)
		if err != nil {
			return err
		}
		// The value is copied: a caller whose ctx ends returns before a leader has written the request,
		// and must then be free to reuse its slice.
		bops[i] = batchOp{key: k, value: bytes.Clone(op.Value), delete: op.Delete}
	}
	if len(bops) == 0 {
		if w.isClosed() {
			return ErrClosed
		}
		return nil
	}
	return w.submit(ctx, bops)
}

// Get returns the NSWAL record for key, or an error wrapping ErrNotFound.
func (w *WAL) Get(ctx context.Context, key string) ([]byte, error) {
	k, err := storeKey(NSWAL, key)
	if err != nil {
		return nil, err
	}
	return w.get(ctx, k)
}

// Sweep calls fn for every NSWAL record in key order (recovery walks it on start). An error from fn stops the
// sweep and is returned as is.
func (w *WAL) Sweep(ctx context.Context, fn func(key string, value []byte) error) error {
	return w.list(ctx, NSWAL, fn)
}

// Stats returns the commit counters; Appends/Syncs is the number of ops that shared one fsync.
func (w *WAL) Stats() WALStats {
	return WALStats{Appends: w.appends.Load(), Syncs: w.syncs.Load(), Batches: w.batches.Load()}
}

func (w *WAL) isClosed() bool { return w.ctx.Err() != nil }

// close stops accepting requests and waits until the leaders have committed everything queued, including the
// batch in flight.
func (w *WAL) close() {
	w.mu.Lock()
	w.cancel()
	if !w.committing {
		w.mu.Unlock()
		return
	}
	if w.idle == nil {
		w.idle = make(chan struct{})
	}
	idle := w.idle
	w.mu.Unlock()
	<-idle
}

// submit commits ops, leading the commit itself when none is in progress, and returns once the batch that
// carries them is committed.
func (w *WAL) submit(ctx context.Context, ops []batchOp) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	w.mu.Lock()
	if w.isClosed() {
		w.mu.Unlock()
		return ErrClosed
	}
	if !w.committing {
		// Fast path: nobody is committing, so the queue is empty; commit alone, here and now.
		w.committing = true
		w.mu.Unlock()
		return w.leadAlone(&request{ops: ops, state: stateTaken})
	}
	w.mu.Unlock()

	// A commit is in progress: queue behind it, once the queue has room.
	select {
	case w.slots <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-w.ctx.Done():
		return ErrClosed
	}
	r := &request{ops: ops, done: make(chan error, 1)}
	w.mu.Lock()
	if w.isClosed() {
		w.mu.Unlock()
		<-w.slots
		return ErrClosed
	}
	if !w.committing { // the commit ended while we waited for room
		w.committing = true
		w.mu.Unlock()
		<-w.slots
		r.state = stateTaken
		return w.leadAlone(r)
	}
	r.state = stateQueued
	w.queue = append(w.queue, r)
	w.mu.Unlock()

	select {
	case err := <-r.done:
		if err == errLead {
			return w.lead(w.take())
		}
		return err
	case <-ctx.Done():
		return w.abandon(r, ctx.Err())
	}
}

// abandon is called by a queued caller whose ctx has ended. It withdraws r if no commit has taken it yet,
// passing leadership on if r had just been named leader; if r is already in a batch, that commit goes on.
func (w *WAL) abandon(r *request, ctxErr error) error {
	w.mu.Lock()
	switch r.state {
	case stateQueued:
		w.remove(r)
	case stateLead:
		<-r.done // errLead, sent under mu
		w.remove(r)
		w.handOff()
	case stateTaken:
		w.mu.Unlock()
		// Prefer the real outcome when the commit finished at the same moment.
		select {
		case err := <-r.done:
			return err
		default:
			return ctxErr
		}
	}
	w.mu.Unlock()
	return ctxErr
}

// remove takes r, which is queued, out of the queue and frees its slot. Called with mu held.
func (w *WAL) remove(r *request) {
	i := slices.Index(w.queue, r)
	w.queue = slices.Delete(w.queue, i, i+1)
	<-w.slots
}

// take is called by a newly named leader: it moves the head of the queue (the leader's own request first,
// then every one behind it while the batch has fewer than maxOps ops) into a group for one batch.
func (w *WAL) take() []*request {
	w.mu.Lock()
	defer w.mu.Unlock()
	n, k := 0, 0
	for k < len(w.queue) && (k == 0 || n < w.maxOps) {
		w.queue[k].state = stateTaken
		n += len(w.queue[k].ops)
		k++
	}
	group := slices.Clone(w.queue[:k])
	rest := copy(w.queue, w.queue[k:])
	clear(w.queue[rest:])
	w.queue = w.queue[:rest]
	for range k {
		<-w.slots
	}
	return group
}

// handOff ends the current leader's turn: it names the first queued request the next leader, or, with the
// queue empty, marks the WAL idle. Called with mu held.
func (w *WAL) handOff() {
	if len(w.queue) > 0 {
		next := w.queue[0]
		next.state = stateLead
		next.done <- errLead
		return
	}
	w.committing = false
	if w.idle != nil {
		close(w.idle)
		w.idle = nil
	}
}

// lead commits group (whose first request is the leader's own) as one batch, ends the leader's turn, answers
// every other request of the group and returns the batch's outcome. The turn is handed on before the answers
// go out, so the next batch starts syncing as soon as possible, and even if the write panics, so a panic
// cannot wedge the WAL. A leader never waits for more requests to arrive: while one batch is being synced the
// next group queues up by itself, so grouping grows with load and costs no latency when idle.
func (w *WAL) lead(group []*request) (err error) {
	err = errLeaderPanicked
	defer func() {
		w.mu.Lock()
		w.handOff()
		w.mu.Unlock()
		for _, r := range group[1:] { // the leader's own request gets err as lead's result
			r.done <- err
		}
	}()
	err = w.write(group)
	if err == nil {
		n := 0
		for _, r := range group {
			n += len(r.ops)
		}
		w.appends.Add(uint64(n))
		w.syncs.Add(1)
		w.batches.Add(uint64(len(group)))
	}
	return err
}

// leadAlone commits r, a request no one else knows of, as a batch of its own.
func (w *WAL) leadAlone(r *request) error {
	one := [1]*request{r}
	return w.lead(one[:])
}

// write builds and commits one batch. Any error fails the whole group: a batch is all or nothing.
func (w *WAL) write(group []*request) error {
	ctx := w.writeCtx
	b, err := w.root.Batch(ctx)
	if err != nil {
		return fmt.Errorf("ork/store: wal batch: %w", err)
	}
	for _, r := range group {
		for _, op := range r.ops {
			if op.delete {
				err = b.Delete(ctx, op.key)
			} else {
				err = b.Put(ctx, op.key, op.value)
			}
			if err != nil {
				// The batch is dropped uncommitted, so none of its ops is visible.
				return fmt.Errorf("ork/store: wal batch %s: %w", op.key, err)
			}
		}
	}
	if err := b.Commit(ctx); err != nil {
		return fmt.Errorf("ork/store: wal commit: %w", err)
	}
	// ds.Batch does not promise durability; Sync does. go-ds-leveldb already committed with Sync:true and its
	// Sync is a no-op, but a wrapped or other datastore may buffer. If Sync fails the ops may be visible yet
	// not durable; callers get the error, an outcome unknown like a ctx error.
	if err := w.root.Sync(ctx, ds.RawKey("/")); err != nil {
		return fmt.Errorf("ork/store: wal sync: %w", err)
	}
	return nil
}
