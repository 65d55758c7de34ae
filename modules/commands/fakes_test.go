package commands

import (
	"context"
	"encoding/json"
	"errors"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// walOp is one write the fake WAL saw.
type walOp struct {
	Op    string // put | finish
	ID    string
	State string
}

// fakeWAL is an in-memory WAL with failure injection and a log of writes.
type fakeWAL struct {
	mu      sync.Mutex
	wal     map[string][]byte
	results map[string][]byte
	ops     []walOp
	log     bool // record ops (off in benchmarks)

	putErr    func(id string, rec Record) error // nil: no failure
	finishErr func(id string, rec Record) error
	sweepErr  error
	putHook   func(id string) // called before a Put is applied, without the lock (may block)
}

func newFakeWAL() *fakeWAL {
	return &fakeWAL{wal: map[string][]byte{}, results: map[string][]byte{}, log: true}
}

func (w *fakeWAL) Put(ctx context.Context, id string, b []byte) error {
	if w.putHook != nil {
		w.putHook(id)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	var rec Record
	if w.log || w.putErr != nil {
		if err := json.Unmarshal(b, &rec); err != nil {
			return err
		}
	}
	if w.putErr != nil {
		if err := w.putErr(id, rec); err != nil {
			return err
		}
	}
	w.wal[id] = slices.Clone(b)
	if w.log {
		w.ops = append(w.ops, walOp{"put", id, rec.State})
	}
	return nil
}

func (w *fakeWAL) Finish(ctx context.Context, id string, b []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	var rec Record
	if w.log || w.finishErr != nil {
		if err := json.Unmarshal(b, &rec); err != nil {
			return err
		}
	}
	if w.finishErr != nil {
		if err := w.finishErr(id, rec); err != nil {
			return err
		}
	}
	w.results[id] = slices.Clone(b)
	delete(w.wal, id)
	if w.log {
		w.ops = append(w.ops, walOp{"finish", id, rec.State})
	}
	return nil
}

func (w *fakeWAL) Sweep(ctx context.Context, fn func(string, []byte) error) error {
	w.mu.Lock()
	if w.sweepErr != nil {
		w.mu.Unlock()
		return w.sweepErr
	}
	m := maps.Clone(w.wal)
	w.mu.Unlock()
	for _, id := range slices.Sorted(maps.Keys(m)) {
		if err := fn(id, m[id]); err != nil {
			return err
		}
	}
	return nil
}

func (w *fakeWAL) Result(ctx context.Context, id string) ([]byte, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	b, ok := w.results[id]
	if !ok {
		return nil, ErrNotFound
	}
	return slices.Clone(b), nil
}

func (w *fakeWAL) ExpireResults(ctx context.Context, olderThan time.Time) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for id, b := range w.results {
		var r Record
		_ = json.Unmarshal(b, &r)
		if time.UnixMilli(r.UpdatedAt).Before(olderThan) {
			delete(w.results, id)
			n++
		}
	}
	return n, nil
}

// set stores rec in the WAL directly (recovery fixtures).
func (w *fakeWAL) set(t *testing.T, rec Record) {
	t.Helper()
	b, err := json.Marshal(rec)
	require.NoError(t, err)
	w.mu.Lock()
	w.wal[rec.CommandID] = b
	w.mu.Unlock()
}

func (w *fakeWAL) setResult(t *testing.T, rec Record) {
	t.Helper()
	b, err := json.Marshal(rec)
	require.NoError(t, err)
	w.mu.Lock()
	w.results[rec.CommandID] = b
	w.mu.Unlock()
}

func (w *fakeWAL) walLen() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.wal)
}

func (w *fakeWAL) walRecord(t *testing.T, id string) (Record, bool) {
	t.Helper()
	w.mu.Lock()
	b, ok := w.wal[id]
	w.mu.Unlock()
	if !ok {
		return Record{}, false
	}
	var r Record
	require.NoError(t, json.Unmarshal(b, &r))
	return r, true
}

func (w *fakeWAL) opsFor(id string) []walOp {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []walOp
	for _, o := range w.ops {
		if o.ID == id {
			out = append(out, o)
		}
	}
	return out
}

func (w *fakeWAL) opCount() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.ops)
}

// sweepingWAL also lists its retained results (ResultSweeper).
type sweepingWAL struct{ *fakeWAL }

func (w sweepingWAL) SweepResults(ctx context.Context, fn func(string, []byte) error) error {
	w.mu.Lock()
	m := maps.Clone(w.results)
	w.mu.Unlock()
	for id, b := range m {
		if err := fn(id, b); err != nil {
			return err
		}
	}
	return nil
}

var (
	errNoStream = errors.New("fake: no stream could be opened") // not delivered
	errNoReply  = errors.New("fake: request written, no reply") // outcome unknown
)

func notDelivered(err error) bool { return errors.Is(err, errNoStream) }

// fakeSender answers Send and Status through programmable functions and counts calls.
type fakeSender struct {
	mu        sync.Mutex
	sends     map[string][]time.Time // id → send times
	statuses  map[string][]time.Time
	active    map[string]int // device → sends in progress
	total     int            // sends in progress, all devices
	maxActive int            // high-water mark of total
	overlap   bool           // two sends on one device at once (must never happen)
	order     []string       // command ids in send order

	send   func(ctx context.Context, rec Record, n int) (Reply, error) // n: 1-based call number for rec
	status func(ctx context.Context, rec Record, n int) (Reply, error)
}

func newFakeSender() *fakeSender {
	return &fakeSender{sends: map[string][]time.Time{}, statuses: map[string][]time.Time{}, active: map[string]int{}}
}

func (s *fakeSender) Send(ctx context.Context, rec Record) (Reply, error) {
	s.mu.Lock()
	s.sends[rec.CommandID] = append(s.sends[rec.CommandID], time.Now())
	s.order = append(s.order, rec.CommandID)
	n := len(s.sends[rec.CommandID])
	s.active[rec.DeviceID]++
	if s.active[rec.DeviceID] > 1 {
		s.overlap = true
	}
	s.total++
	s.maxActive = max(s.maxActive, s.total)
	f := s.send
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.active[rec.DeviceID]--
		s.total--
		s.mu.Unlock()
	}()
	if f == nil {
		return Reply{Status: Success, Result: json.RawMessage(`{"ok":true}`)}, nil
	}
	return f(ctx, rec, n)
}

func (s *fakeSender) Status(ctx context.Context, rec Record) (Reply, error) {
	s.mu.Lock()
	s.statuses[rec.CommandID] = append(s.statuses[rec.CommandID], time.Now())
	n := len(s.statuses[rec.CommandID])
	f := s.status
	s.mu.Unlock()
	if f == nil {
		return Reply{}, errNoReply
	}
	return f(ctx, rec, n)
}

func (s *fakeSender) sendCount(id string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sends[id])
}

func (s *fakeSender) sendTimes(id string) []time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.sends[id])
}

func (s *fakeSender) sendOrder() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.order)
}

func (s *fakeSender) statusCount(id string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.statuses[id])
}

// fleet is the routing fake: which Workers are routable.
type fleet struct {
	mu       sync.Mutex
	routable map[string]bool
}

func newFleet(routable ...string) *fleet {
	f := &fleet{routable: map[string]bool{}}
	for _, w := range routable {
		f.routable[w] = true
	}
	return f
}

func (f *fleet) set(w string, ok bool) {
	f.mu.Lock()
	f.routable[w] = ok
	f.mu.Unlock()
}

func (f *fleet) Routable(w string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.routable[w]
}

// harness bundles a Manager and its fakes.
type harness struct {
	m      *Manager
	wal    *fakeWAL
	sender *fakeSender
	fleet  *fleet
	doneMu sync.Mutex
	done   []Record // OnDone calls
}

// newHarness builds a Manager over fakes: Worker "w1" routable, MaxRetries 3, jitter off (backoff at its
// maximum, so timings are exact). mod adjusts the options.
func newHarness(t *testing.T, mod func(*Options)) *harness {
	t.Helper()
	h := &harness{wal: newFakeWAL(), sender: newFakeSender(), fleet: newFleet("w1")}
	o := Options{
		WAL:          h.wal,
		Sender:       h.sender,
		NotDelivered: notDelivered,
		Routable:     h.fleet.Routable,
		OnDone: func(r Record) {
			h.doneMu.Lock()
			h.done = append(h.done, r)
			h.doneMu.Unlock()
		},
		jitter: func(n int64) int64 { return n - 1 },
	}
	if mod != nil {
		mod(&o)
	}
	m, err := New(o)
	require.NoError(t, err)
	h.m = m
	return h
}

func (h *harness) doneCalls() []Record {
	h.doneMu.Lock()
	defer h.doneMu.Unlock()
	return slices.Clone(h.done)
}

// dev builds a device command for Worker w1.
func dev(device string) Record {
	return Record{DeviceID: device, WorkerID: "w1", Command: "reboot", RequesterID: "caller-1"}
}

// submit1 submits one record and returns it as admitted.
func (h *harness) submit1(t *testing.T, r Record) Record {
	t.Helper()
	out, err := h.m.Submit(context.Background(), r)
	require.NoError(t, err)
	require.Len(t, out, 1)
	return out[0]
}

// wait waits for id to be terminal (the bubble's clock runs while everything is blocked).
func (h *harness) wait(t *testing.T, id string) Record {
	t.Helper()
	st, err := h.m.Wait(context.Background(), id)
	require.NoError(t, err)
	rec, err := h.m.Get(context.Background(), id)
	require.NoError(t, err)
	require.Equal(t, st.Status, rec.State)
	require.True(t, rec.Terminal(), "%s is %s", id, rec.State)
	return rec
}
