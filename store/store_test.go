package store

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	ds "github.com/ipfs/go-datastore"
	"github.com/ipfs/go-datastore/failstore"
	dsq "github.com/ipfs/go-datastore/query"
	leveldb "github.com/ipfs/go-ds-leveldb"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

// TestMain fails the package if any test leaves a goroutine behind (LevelDB's compactors, a stuck commit).
// goleveldb v1.0.0's DB.Close does not wait for its mpoolDrain goroutine, which exits up to 1 s later on its
// own; that one is not ours to wait for.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("github.com/syndtr/goleveldb/leveldb.(*DB).mpoolDrain"))
}

// TestConformance runs the one conformance body over every kind of store the node may run on.
func TestConformance(t *testing.T) {
	tests := []struct {
		name string
		mk   func(t *testing.T) *Store
	}{
		{"disk", func(t *testing.T) *Store { return openStore(t, filepath.Join(t.TempDir(), "db")) }},
		{"memory", func(t *testing.T) *Store { return openStore(t, "") }},
		{"failing", newFailingStore},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { runConformance(t, tc.mk) })
	}
}

func openStore(t testing.TB, path string, opts ...Option) *Store {
	t.Helper()
	s, err := Open(path, opts...)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, s.Close()) })
	return s
}

var errInjected = errors.New("injected write failure")

// newFailingStore wraps an in-memory LevelDB in a failstore that fails every write the Store can make, at
// different points: the first op of each batch is accepted and later ones fail (so a multi-op Apply fails
// half built), and every commit, direct put/delete and sync fails. Reads pass, so the test can see what the
// failed writes left behind.
func newFailingStore(t *testing.T) *Store {
	inner, err := leveldb.NewDatastore("", nil)
	require.NoError(t, err)
	var opsInBatch atomic.Int64
	fs := failstore.NewFailstore(inner, func(op string) error {
		switch op {
		case "get", "has", "getsize", "query":
			return nil
		case "batch":
			opsInBatch.Store(0)
			return nil
		case "batch-put", "batch-delete":
			if opsInBatch.Add(1) == 1 {
				return nil
			}
		}
		return errInjected
	})
	s, err := New(fs)
	require.NoError(t, err)
	t.Cleanup(func() {
		require.NoError(t, s.Close())
		require.NoError(t, inner.Close()) // New does not own the datastore it is given
	})
	return s
}

// runConformance is the behaviour every store must have. On a failing store every write must return the
// injected error (not panic, not hang) and leave nothing behind; reads and Close behave as usual.
func runConformance(t *testing.T, mk func(t *testing.T) *Store) {
	tests := []struct {
		name string
		run  func(t *testing.T, s *Store, failing bool)
	}{
		{"append then get", testAppendGet},
		{"not found", testNotFound},
		{"delete", testDelete},
		{"apply terminal transition", testApplyTerminal},
		{"apply is atomic", testApplyAtomic},
		{"sweep order", testSweepOrder},
		{"list", testList},
		{"namespaces are isolated", testNamespaces},
		{"invalid keys", testInvalidKeys},
		{"cancelled ctx", testCancelledCtx},
		{"stats", testStats},
		{"closed", testClosed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := mk(t)
			_, failing := s.Datastore().(*failstore.Failstore)
			tc.run(t, s, failing)
			if failing {
				require.Empty(t, dump(t, s.Datastore()), "a failed write left records behind")
			}
		})
	}
}

// wantWrite checks a write's outcome: nil on a healthy store, the injected error on a failing one.
func wantWrite(t *testing.T, failing bool, err error) {
	t.Helper()
	if failing {
		require.ErrorIs(t, err, errInjected)
		return
	}
	require.NoError(t, err)
}

// dump returns every record of d by full key.
func dump(t *testing.T, d ds.Datastore) map[string]string {
	t.Helper()
	res, err := d.Query(t.Context(), dsq.Query{})
	require.NoError(t, err)
	entries, err := res.Rest()
	require.NoError(t, err)
	out := make(map[string]string, len(entries))
	for _, e := range entries {
		out[e.Key] = string(e.Value)
	}
	return out
}

type record struct{ key, value string }

func sweep(t *testing.T, w *WAL) []record {
	t.Helper()
	var got []record
	require.NoError(t, w.Sweep(t.Context(), func(k string, v []byte) error {
		got = append(got, record{k, string(v)})
		return nil
	}))
	return got
}

func list(t *testing.T, s *Store, ns string) []record {
	t.Helper()
	var got []record
	require.NoError(t, s.List(t.Context(), ns, func(k string, v []byte) error {
		got = append(got, record{k, string(v)})
		return nil
	}))
	return got
}

func testAppendGet(t *testing.T, s *Store, failing bool) {
	ctx, w := t.Context(), s.WAL()
	wantWrite(t, failing, w.Append(ctx, "c1", []byte(`{"state":"QUEUED"}`)))
	wantWrite(t, failing, w.Append(ctx, "c1", []byte(`{"state":"DISPATCHED"}`)))
	v, err := w.Get(ctx, "c1")
	if failing {
		require.ErrorIs(t, err, ErrNotFound)
		return
	}
	require.NoError(t, err)
	require.JSONEq(t, `{"state":"DISPATCHED"}`, string(v))
}

func testNotFound(t *testing.T, s *Store, _ bool) {
	ctx := t.Context()
	_, err := s.WAL().Get(ctx, "nope")
	require.ErrorIs(t, err, ErrNotFound)
	for _, ns := range []string{NSRegistry, NSCaps, NSWAL, NSResults, NSHealth, NSMeta, NSDHT} {
		_, err := s.Get(ctx, ns, "nope")
		require.ErrorIs(t, err, ErrNotFound, ns)
	}
}

func testDelete(t *testing.T, s *Store, failing bool) {
	ctx, w := t.Context(), s.WAL()
	wantWrite(t, failing, w.Append(ctx, "c1", []byte("x")))
	wantWrite(t, failing, w.Delete(ctx, "c1"))
	_, err := w.Get(ctx, "c1")
	require.ErrorIs(t, err, ErrNotFound)

	wantWrite(t, failing, s.Put(ctx, NSHealth, "w1", []byte("HEALTHY")))
	wantWrite(t, failing, s.Delete(ctx, NSHealth, "w1"))
	_, err = s.Get(ctx, NSHealth, "w1")
	require.ErrorIs(t, err, ErrNotFound)

	// Deleting what is not there is not an error: a retried delete must succeed.
	wantWrite(t, failing, w.Delete(ctx, "never"))
	wantWrite(t, failing, s.Delete(ctx, NSRegistry, "never"))
}

func testApplyTerminal(t *testing.T, s *Store, failing bool) {
	ctx, w := t.Context(), s.WAL()
	wantWrite(t, failing, w.Append(ctx, "c1", []byte("EXECUTING")))
	wantWrite(t, failing, w.Apply(ctx,
		Op{NS: NSResults, Key: "c1", Value: []byte("SUCCESS")},
		Op{Key: "c1", Delete: true}, // NS "" is NSWAL
	))
	_, err := w.Get(ctx, "c1")
	require.ErrorIs(t, err, ErrNotFound)
	v, err := s.Get(ctx, NSResults, "c1")
	if failing {
		require.ErrorIs(t, err, ErrNotFound)
		return
	}
	require.NoError(t, err)
	require.Equal(t, "SUCCESS", string(v))
}

func testApplyAtomic(t *testing.T, s *Store, failing bool) {
	ctx, w := t.Context(), s.WAL()
	ops := []Op{
		{Key: "c2", Value: []byte("a")},
		{NS: NSResults, Key: "c2", Value: []byte("b")},
		{NS: NSHealth, Key: "w1", Value: []byte("c")},
		{NS: NSResults, Key: "c2", Value: []byte("b2")}, // later op on the same key wins
	}
	wantWrite(t, failing, w.Apply(ctx, ops...))
	want := map[string]string{"/wal/c2": "a", "/cmdres/c2": "b2", "/health/w1": "c"}
	if failing {
		want = map[string]string{}
	}
	require.Equal(t, want, dump(t, s.Datastore()))

	// One bad key rejects the whole Apply before anything is written.
	err := w.Apply(ctx, Op{Key: "c3", Value: []byte("a")}, Op{NS: NSResults, Key: "a//b"})
	require.ErrorIs(t, err, ErrInvalidKey)
	_, err = w.Get(ctx, "c3")
	require.ErrorIs(t, err, ErrNotFound)

	require.NoError(t, w.Apply(ctx), "an empty Apply is a no-op")
}

func testSweepOrder(t *testing.T, s *Store, failing bool) {
	ctx, w := t.Context(), s.WAL()
	for _, k := range []string{"c3", "c1", "c10", "a", "c2"} {
		wantWrite(t, failing, w.Append(ctx, k, []byte("v"+k)))
	}
	wantWrite(t, failing, s.Put(ctx, NSResults, "b", []byte("not in the WAL")))
	got := sweep(t, w)
	if failing {
		require.Empty(t, got)
		return
	}
	require.Equal(t, []record{{"a", "va"}, {"c1", "vc1"}, {"c10", "vc10"}, {"c2", "vc2"}, {"c3", "vc3"}}, got)

	// An error from fn stops the sweep and comes back unchanged.
	errStop := errors.New("stop")
	var seen []string
	err := w.Sweep(ctx, func(k string, _ []byte) error {
		seen = append(seen, k)
		if len(seen) == 2 {
			return errStop
		}
		return nil
	})
	require.ErrorIs(t, err, errStop)
	require.Equal(t, []string{"a", "c1"}, seen)
}

func testList(t *testing.T, s *Store, failing bool) {
	ctx := t.Context()
	for _, k := range []string{"w2", "w1", "a/b", "/w3"} { // "/w3" is "w3": the leading slash is optional
		wantWrite(t, failing, s.Put(ctx, NSRegistry, k, []byte("r-"+k)))
	}
	got := list(t, s, NSRegistry)
	if failing {
		require.Empty(t, got)
		return
	}
	require.Equal(t, []record{{"a/b", "r-a/b"}, {"w1", "r-w1"}, {"w2", "r-w2"}, {"w3", "r-/w3"}}, got)
	v, err := s.Get(ctx, NSRegistry, "w3")
	require.NoError(t, err)
	require.Equal(t, "r-/w3", string(v))
	require.Empty(t, list(t, s, NSCaps))
}

func testNamespaces(t *testing.T, s *Store, failing bool) {
	ctx := t.Context()
	// "/regx" shares a byte prefix with "/reg" and must still be a different namespace.
	nss := []string{NSRegistry, NSCaps, NSWAL, NSResults, NSHealth, NSMeta, "/regx"}
	for _, ns := range nss {
		wantWrite(t, failing, s.Put(ctx, ns, "k", []byte(ns)))
	}
	if failing {
		for _, ns := range nss {
			require.Empty(t, list(t, s, ns), ns)
		}
		return
	}
	for _, ns := range nss {
		v, err := s.Get(ctx, ns, "k")
		require.NoError(t, err, ns)
		require.Equal(t, ns, string(v))
		require.Equal(t, []record{{"k", ns}}, list(t, s, ns))
	}
	v, err := s.WAL().Get(ctx, "k")
	require.NoError(t, err)
	require.Equal(t, NSWAL, string(v), "the WAL is NSWAL")

	// Namespace gives the same records as a ds.Batching for components such as the DHT.
	v, err = s.Namespace(NSCaps).Get(ctx, ds.NewKey("k"))
	require.NoError(t, err)
	require.Equal(t, NSCaps, string(v))

	require.NoError(t, s.Delete(ctx, NSRegistry, "k"))
	_, err = s.Get(ctx, NSRegistry, "k")
	require.ErrorIs(t, err, ErrNotFound)
	for _, ns := range nss[1:] {
		_, err := s.Get(ctx, ns, "k")
		require.NoError(t, err, "deleting in %s removed %s/k", NSRegistry, ns)
	}
}

func testInvalidKeys(t *testing.T, s *Store, _ bool) {
	ctx, w := t.Context(), s.WAL()
	tests := []struct{ ns, key string }{
		{"", "k"}, {"/", "k"}, {"reg", "k"}, {"/reg/", "k"}, {"/reg//x", "k"},
		{NSRegistry, ""}, {NSRegistry, "/"}, {NSRegistry, "a//b"}, {NSRegistry, "a/"},
		{NSRegistry, "a/../b"}, {NSRegistry, "./a"}, {NSRegistry, "../reg/a"},
	}
	for _, tc := range tests {
		_, err := s.Get(ctx, tc.ns, tc.key)
		require.ErrorIs(t, err, ErrInvalidKey, "Get %q %q", tc.ns, tc.key)
		require.ErrorIs(t, s.Put(ctx, tc.ns, tc.key, nil), ErrInvalidKey, "Put %q %q", tc.ns, tc.key)
		require.ErrorIs(t, s.Delete(ctx, tc.ns, tc.key), ErrInvalidKey, "Delete %q %q", tc.ns, tc.key)
		if tc.ns == NSRegistry {
			require.ErrorIs(t, w.Append(ctx, tc.key, nil), ErrInvalidKey, "Append %q", tc.key)
		} else {
			require.ErrorIs(t, s.List(ctx, tc.ns, nil), ErrInvalidKey, "List %q", tc.ns)
		}
		if tc.ns != "" { // for Apply an empty NS means NSWAL
			require.ErrorIs(t, w.Apply(ctx, Op{NS: tc.ns, Key: tc.key}), ErrInvalidKey, "Apply %q %q", tc.ns, tc.key)
		}
	}
	require.Equal(t, WALStats{}, w.Stats(), "an invalid key reached a commit")
}

func testCancelledCtx(t *testing.T, s *Store, _ bool) {
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	w := s.WAL()
	require.ErrorIs(t, w.Append(ctx, "c1", []byte("x")), context.Canceled)
	require.ErrorIs(t, w.Apply(ctx, Op{Key: "c1"}), context.Canceled)
	require.ErrorIs(t, s.Put(ctx, NSRegistry, "w1", nil), context.Canceled)
	_, err := w.Get(t.Context(), "c1")
	require.ErrorIs(t, err, ErrNotFound, "a write refused for its ctx must not be committed")
}

func testStats(t *testing.T, s *Store, failing bool) {
	ctx, w := t.Context(), s.WAL()
	wantWrite(t, failing, w.Append(ctx, "c1", []byte("x")))
	wantWrite(t, failing, w.Delete(ctx, "c1"))
	wantWrite(t, failing, w.Apply(ctx, Op{Key: "c2"}, Op{NS: NSResults, Key: "c2"}))
	wantWrite(t, failing, s.Put(ctx, NSMeta, "schema", []byte("1")))
	want := WALStats{Appends: 5, Syncs: 4, Batches: 4} // one caller at a time: no grouping
	if failing {
		want = WALStats{} // failed commits are not counted
	}
	require.Equal(t, want, w.Stats())
}

func testClosed(t *testing.T, s *Store, failing bool) {
	ctx, w := t.Context(), s.WAL()
	wantWrite(t, failing, w.Append(ctx, "c1", []byte("x")))
	require.NoError(t, s.Close())
	require.NoError(t, s.Close(), "Close is idempotent")

	tests := []struct {
		name string
		call func() error
	}{
		{"Append", func() error { return w.Append(ctx, "c2", []byte("x")) }},
		{"Delete", func() error { return w.Delete(ctx, "c1") }},
		{"Apply", func() error { return w.Apply(ctx, Op{Key: "c2"}) }},
		{"empty Apply", func() error { return w.Apply(ctx) }},
		{"WAL.Get", func() error { _, err := w.Get(ctx, "c1"); return err }},
		{"Sweep", func() error { return w.Sweep(ctx, func(string, []byte) error { return nil }) }},
		{"Put", func() error { return s.Put(ctx, NSRegistry, "w1", nil) }},
		{"Get", func() error { _, err := s.Get(ctx, NSRegistry, "w1"); return err }},
		{"Delete", func() error { return s.Delete(ctx, NSRegistry, "w1") }},
		{"List", func() error { return s.List(ctx, NSRegistry, func(string, []byte) error { return nil }) }},
	}
	for _, tc := range tests {
		require.ErrorIs(t, tc.call(), ErrClosed, tc.name)
	}
}

func TestNewRejectsBadInput(t *testing.T) {
	tests := []struct {
		name string
		d    ds.Batching
		opts []Option
	}{
		{"nil datastore", nil, nil},
		{"MaxBatchOps 0", ds.NewMapDatastore(), []Option{MaxBatchOps(0)}},
		{"QueueLen 0", ds.NewMapDatastore(), []Option{QueueLen(0)}},
		{"QueueLen -1 after a good option", ds.NewMapDatastore(), []Option{MaxBatchOps(8), QueueLen(-1)}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, err := New(tc.d, tc.opts...)
			require.Error(t, err)
			require.Nil(t, s) // and TestMain's goleak checks that nothing was left running
		})
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	require.NoError(t, os.WriteFile(file, nil, 0o600))
	_, err := Open(file)
	require.Error(t, err, "a file is not a database directory")

	// A second Open of a database that is in use fails on LevelDB's lock and leaves nothing open.
	db := filepath.Join(dir, "db")
	s := openStore(t, db)
	_, err = Open(db)
	require.Error(t, err)
	require.NoError(t, s.WAL().Append(t.Context(), "c1", nil), "the first store is unaffected")

	_, err = Open(filepath.Join(dir, "db2"), QueueLen(0))
	require.Error(t, err, "a bad option closes the database Open made")
	s2 := openStore(t, filepath.Join(dir, "db2")) // it would fail on LevelDB's lock if the first were still open
	require.NoError(t, s2.Close())
}

func TestOpenCreatesPrivateDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "b")
	openStore(t, dir)
	fi, err := os.Stat(dir)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o700), fi.Mode().Perm())
}
