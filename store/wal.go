package store

import (
	"bytes"
	"context"
	"fmt"
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

// WALStats counts the committer's work since Open/New. Only committed writes are counted.
type WALStats struct {
	Appends uint64 // ops (puts and deletes) committed
	Syncs   uint64 // batch commits, each one fsync on LevelDB
	Batches uint64 // caller requests (Append, Delete, Apply, Store.Put, Store.Delete) those commits carried
}

// WAL is the command write-ahead log: a current-state table in NSWAL keyed by commandId. A command transition
// is persisted here before it takes effect, so every transition waits for an fsync. Group commit makes that
// affordable: all writes are handed to one committer goroutine, which writes every request already waiting
// as one batch and commits it once, so one fsync serves the whole group.
//
// A write method returns nil only once its ops are durable. If the caller's ctx ends first, it returns
// ctx.Err() but its ops may still be committed: treat that as "outcome unknown" and re-read. After Close every
// method returns ErrClosed.
type WAL struct {
	root   ds.Batching
	reqs   chan *request // bounded: a full queue blocks writers
	maxOps int

	// ctx is cancelled by Close: the committer then commits what is queued and exits. Batches are written
	// under writeCtx, which is never cancelled, so Close never aborts a commit half way.
	ctx      context.Context
	cancel   context.CancelFunc
	writeCtx context.Context
	stopped  chan struct{} // closed when the committer has exited; Close and waiters wait on it

	group []*request // committer-only scratch, reused between batches

	appends, syncs, batches atomic.Uint64
}

// request is one caller's ops; they are always written in the same batch.
type request struct {
	ops  []batchOp
	done chan error // buffered, so the committer never blocks on a caller that has gone
}

type batchOp struct {
	key    ds.Key
	value  []byte
	delete bool
}

func newWAL(root ds.Batching, cfg config) *WAL {
	ctx, cancel := context.WithCancel(context.Background())
	w := &WAL{
		root:     root,
		reqs:     make(chan *request, cfg.queueLen),
		maxOps:   cfg.maxBatchOps,
		ctx:      ctx,
		cancel:   cancel,
		writeCtx: context.WithoutCancel(ctx),
		stopped:  make(chan struct{}),
	}
	go w.run()
	return w
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
		// The value is copied: a caller whose ctx ends returns before the committer has read the request,
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

// Stats returns the committer's counters; Appends/Syncs is the number of ops that shared one fsync.
func (w *WAL) Stats() WALStats {
	return WALStats{Appends: w.appends.Load(), Syncs: w.syncs.Load(), Batches: w.batches.Load()}
}

func (w *WAL) isClosed() bool { return w.ctx.Err() != nil }

// close stops accepting requests and waits until the committer has committed everything queued and exited.
func (w *WAL) close() {
	w.cancel()
	<-w.stopped
}

// submit hands ops to the committer and waits for the commit of the batch that carries them.
func (w *WAL) submit(ctx context.Context, ops []batchOp) error {
	if w.isClosed() {
		return ErrClosed
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	r := &request{ops: ops, done: make(chan error, 1)}
	select {
	case w.reqs <- r:
	case <-ctx.Done():
		return ctx.Err()
	case <-w.ctx.Done():
		return ErrClosed
	}
	select {
	case err := <-r.done:
		return err
	case <-ctx.Done():
		// Prefer the real outcome when the commit finished at the same moment.
		select {
		case err := <-r.done:
			return err
		default:
			return ctx.Err()
		}
	case <-w.stopped:
		// The request went into the queue after the committer's last drain (a send racing Close), so it was
		// never written; unless it was, in which case done already holds the result.
		select {
		case err := <-r.done:
			return err
		default:
			return ErrClosed
		}
	}
}

// run is the committer: the only goroutine that writes batches.
func (w *WAL) run() {
	defer close(w.stopped)
	for {
		select {
		case r := <-w.reqs:
			w.commit(r)
		case <-w.ctx.Done():
			// Commit what was queued before Close, so no accepted request is left without an answer.
			for {
				select {
				case r := <-w.reqs:
					w.commit(r)
				default:
					return
				}
			}
		}
	}
}

// commit writes first and every request already waiting (up to maxOps ops) as one batch, commits it once and
// answers every request in it with the outcome. It never waits for more requests to arrive: while one batch
// is being synced the next group queues up by itself, so grouping grows with load and costs no latency when
// idle.
func (w *WAL) commit(first *request) {
	group := append(w.group[:0], first)
	n := len(first.ops)
fill:
	for n < w.maxOps {
		select {
		case r := <-w.reqs:
			group = append(group, r)
			n += len(r.ops)
		default:
			break fill
		}
	}

	err := w.write(group)
	if err == nil {
		w.appends.Add(uint64(n))
		w.syncs.Add(1)
		w.batches.Add(uint64(len(group)))
	}
	for i, r := range group {
		r.done <- err
		group[i] = nil // drop the reference so answered requests can be collected
	}
	w.group = group[:0]
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
