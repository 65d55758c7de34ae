// Package store is the ORK node's persistence: one LevelDB (through go-datastore) split into namespaces, and a
// write-ahead log whose writes are group-committed so that many concurrent callers share one fsync.
//
// Every write made through Store or WAL (Put, Delete, Append, Apply) goes through the WAL's group commit and
// is durable when it returns nil. Reads go straight to the datastore. Components that need a plain ds.Batching
// (the DHT) get one from Namespace; their writes bypass the group commit.
package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"

	ds "github.com/ipfs/go-datastore"
	"github.com/ipfs/go-datastore/namespace"
	dsq "github.com/ipfs/go-datastore/query"
	leveldb "github.com/ipfs/go-ds-leveldb"
)

// Namespaces (go-datastore key prefixes) inside the one LevelDB. Keeping every record in one database lets a
// single atomic batch span namespaces (a command's terminal transition writes NSResults and deletes from NSWAL).
const (
	NSRegistry = "/reg"    // worker registry records
	NSCaps     = "/cap"    // worker contracts
	NSWAL      = "/wal"    // command write-ahead log (current-state table keyed by commandId)
	NSResults  = "/cmdres" // retained terminal command results
	NSHealth   = "/health" // worker health
	NSMeta     = "/meta"   // misc (schema version, ...)
	NSDHT      = "/dht"    // kad-dht provider/value records
)

var (
	// ErrNotFound is returned (wrapped, with the key) by Get when the key has no record. It replaces
	// ds.ErrNotFound so callers need not import go-datastore; compare with errors.Is.
	ErrNotFound = errors.New("ork/store: not found")
	// ErrClosed is returned by every Store and WAL method once Close has been called.
	ErrClosed = errors.New("ork/store: closed")
	// ErrInvalidKey is returned (wrapped, with the key) for an empty namespace or a key that go-datastore would
	// silently rewrite (empty, "a//b", "a/", "a/../b"); rejecting those keeps List and Sweep returning exactly
	// the keys that were written.
	ErrInvalidKey = errors.New("ork/store: invalid key")
)

// Store is the node's database: a ds.Batching root, its namespaces and the WAL that performs every write.
// It is safe for concurrent use.
type Store struct {
	root  ds.Batching
	wal   *WAL
	owned io.Closer // the datastore Open made; nil when the caller of New owns it

	closeOnce sync.Once
	closeErr  error
}

// Option configures New and Open.
type Option func(*config) error

type config struct {
	maxBatchOps int
	queueLen    int
}

func defaults() config {
	return config{maxBatchOps: 4096, queueLen: 1024}
}

// MaxBatchOps caps how many ops a commit gathers into one batch before it commits (default 4096). A
// single Apply larger than the cap still goes in one batch, alone: its atomicity matters more than the cap.
func MaxBatchOps(n int) Option {
	return func(c *config) error {
		if n < 1 {
			return fmt.Errorf("ork/store: option MaxBatchOps: must be >= 1, got %d", n)
		}
		c.maxBatchOps = n
		return nil
	}
}

// QueueLen bounds the number of write requests waiting for a commit (default 1024). When the queue is
// full, writers block (until their ctx ends), so a write flood costs bounded memory.
func QueueLen(n int) Option {
	return func(c *config) error {
		if n < 1 {
			return fmt.Errorf("ork/store: option QueueLen: must be >= 1, got %d", n)
		}
		c.queueLen = n
		return nil
	}
}

// Open opens (creating it with mode 0700 if needed) the LevelDB at path, or an in-memory LevelDB when path
// is "". The Store owns that database and closes it on Close. On error nothing is left open.
func Open(path string, opts ...Option) (_ *Store, err error) {
	if path != "" {
		// The directory holds the WAL and the registry: nobody else on the host needs to read it.
		if err := os.MkdirAll(path, 0o700); err != nil {
			return nil, fmt.Errorf("ork/store: open %s: %w", path, err)
		}
	}
	// A 1 MiB write buffer (LevelDB's default is 4 MiB, allocated up front):
	// the kernel's records are small and the WAL is compacted as it goes.
	d, err := leveldb.NewDatastore(path, &leveldb.Options{WriteBuffer: 1 << 20})
	if err != nil {
		return nil, fmt.Errorf("ork/store: open %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, d.Close())
		}
	}()
	s, err := New(d, opts...)
	if err != nil {
		return nil, err
	}
	s.owned = d
	return s, nil
}

// New wraps any ds.Batching (tests use go-datastore's failstore or a map). The caller keeps ownership of d:
// Close stops the WAL but does not close d. Durability is as good as d's Batch.Commit followed by Sync;
// go-ds-leveldb commits batches with Sync:true.
//
// New starts no goroutine: writers commit in their own goroutines (see WAL), so nothing is left running.
func New(d ds.Batching, opts ...Option) (*Store, error) {
	if d == nil {
		return nil, errors.New("ork/store: New: nil datastore")
	}
	cfg := defaults()
	for _, o := range opts {
		if err := o(&cfg); err != nil {
			return nil, err
		}
	}
	return &Store{root: d, wal: newWAL(d, cfg)}, nil
}

// Namespace returns the root datastore seen through the ns prefix, for components that need a ds.Batching
// (kad-dht takes Namespace(NSDHT)). Its writes bypass the WAL's group commit and are not refused after Close.
func (s *Store) Namespace(ns string) ds.Batching {
	return namespace.Wrap(s.root, ds.NewKey(ns))
}

// Datastore returns the root datastore, unprefixed (for tests and tools).
func (s *Store) Datastore() ds.Batching { return s.root }

// WAL returns the store's write-ahead log.
func (s *Store) WAL() *WAL { return s.wal }

// Close stops accepting writes, waits until every write already accepted (in flight or queued) has been committed
// (so no acknowledged write is lost), then closes the datastore if Open made it. Close is idempotent: later
// and concurrent calls wait for the first one and return its result.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.wal.close()
		if s.owned != nil {
			s.closeErr = s.owned.Close()
		}
	})
	return s.closeErr
}

// Put stores value under ns/key. It is durable when it returns nil (it shares the WAL's group commit).
func (s *Store) Put(ctx context.Context, ns, key string, value []byte) error {
	k, err := storeKey(ns, key)
	if err != nil {
		return err
	}
	return s.wal.submit(ctx, []batchOp{{key: k, value: bytes.Clone(value)}})
}

// Get returns the value stored under ns/key, or an error wrapping ErrNotFound.
func (s *Store) Get(ctx context.Context, ns, key string) ([]byte, error) {
	k, err := storeKey(ns, key)
	if err != nil {
		return nil, err
	}
	return s.wal.get(ctx, k)
}

// Delete removes ns/key, durably when it returns nil. Deleting a missing key is not an error, so a retried
// delete is harmless.
func (s *Store) Delete(ctx context.Context, ns, key string) error {
	k, err := storeKey(ns, key)
	if err != nil {
		return err
	}
	return s.wal.submit(ctx, []batchOp{{key: k, delete: true}})
}

// List calls fn for every record in ns, in key (byte) order, with the key relative to ns and without a leading
// "/". An error from fn stops the walk and is returned as is. The walk reads a LevelDB snapshot, so fn may
// write to the store.
func (s *Store) List(ctx context.Context, ns string, fn func(key string, value []byte) error) error {
	if !validNS(ns) {
		return fmt.Errorf("%w: namespace %q", ErrInvalidKey, ns)
	}
	return s.wal.list(ctx, ns, fn)
}

// storeKey builds the datastore key for ns/key. The Store helpers have no default namespace: an empty ns is
// a caller bug, not a request for NSWAL.
func storeKey(ns, key string) (ds.Key, error) {
	if !validNS(ns) {
		return ds.Key{}, fmt.Errorf("%w: namespace %q", ErrInvalidKey, ns)
	}
	// A leading "/" is optional: "x" and "/x" name the same record.
	k := strings.TrimPrefix(key, "/")
	if k == "" || ds.NewKey(k).String() != "/"+k {
		return ds.Key{}, fmt.Errorf("%w: %q in namespace %s", ErrInvalidKey, key, ns)
	}
	return ds.RawKey(ns + "/" + k), nil
}

// validNS reports whether ns is a clean, non-root key such as "/wal".
func validNS(ns string) bool {
	return ns != "" && ns != "/" && ds.NewKey(ns).String() == ns
}

// get reads one record; reads do not go through the group commit.
func (w *WAL) get(ctx context.Context, k ds.Key) ([]byte, error) {
	if w.isClosed() {
		return nil, ErrClosed
	}
	v, err := w.root.Get(ctx, k)
	switch {
	case err == nil:
		return v, nil
	case errors.Is(err, ds.ErrNotFound):
		return nil, fmt.Errorf("%w: %s", ErrNotFound, k)
	case w.isClosed(): // Close raced with us and closed the database under the read.
		return nil, ErrClosed
	default:
		return nil, fmt.Errorf("ork/store: get %s: %w", k, err)
	}
}

// list walks ns in key order; see Store.List.
func (w *WAL) list(ctx context.Context, ns string, fn func(key string, value []byte) error) error {
	if w.isClosed() {
		return ErrClosed
	}
	res, err := w.root.Query(ctx, dsq.Query{Prefix: ns, Orders: []dsq.Order{dsq.OrderByKey{}}})
	if err != nil {
		return w.readErr(ns, err)
	}
	defer res.Close()
	prefix := ns + "/"
	for {
		r, ok := res.NextSync()
		if !ok {
			// A LevelDB iterator closed under us just stops, without an error: report the walk as cut short.
			if w.isClosed() {
				return ErrClosed
			}
			return nil
		}
		if r.Error != nil {
			return w.readErr(ns, r.Error)
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := fn(strings.TrimPrefix(r.Key, prefix), r.Value); err != nil {
			return err
		}
	}
}

func (w *WAL) readErr(ns string, err error) error {
	if w.isClosed() {
		return ErrClosed
	}
	return fmt.Errorf("ork/store: list %s: %w", ns, err)
}
