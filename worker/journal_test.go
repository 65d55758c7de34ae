package worker

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/protocols/envelope"
)

// journalLines reads the journal in dir as records, requiring every line to
// be one.
func journalLines(t *testing.T, dir string) []journalRecord {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, JournalFile))
	require.NoError(t, err)
	var out []journalRecord
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(nil, maxJournalRecord+1)
	for sc.Scan() {
		var r journalRecord
		require.NoError(t, json.Unmarshal(sc.Bytes(), &r), "line %q", sc.Text())
		require.True(t, r.valid(), "line %q", sc.Text())
		out = append(out, r)
	}
	require.NoError(t, sc.Err())
	return out
}

func TestJournalRoundTrip(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	h := newHarness(t, func(c *Config) { c.StateDir = dir })
	ok := h.command("j-ok", "setSpeed", "fan-1-a", map[string]any{"rpm": 1200})
	require.Equal(t, envelope.StateSuccess, ok.Status)
	failed := h.command("j-fail", "fail", "fan-1-a", nil)
	require.Equal(t, envelope.StateFailed, failed.Status)
	invalid := h.command("j-invalid", "setSpeed", "fan-1-a", map[string]any{"rpm": 99999})
	require.Equal(t, envelope.StateFailed, invalid.Status)
	require.NoError(t, h.w.Close())

	st, err := os.Stat(dir)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o700), st.Mode().Perm())
	st, err = os.Stat(filepath.Join(dir, JournalFile))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), st.Mode().Perm())
	var types []string
	for _, r := range journalLines(t, dir) {
		types = append(types, r.Type+" "+r.CommandID)
	}
	require.Equal(t, []string{"started j-ok", "done j-ok", "started j-fail", "done j-fail"}, types,
		"only handler runs are journaled")

	// A new Worker (a new process) on the same StateDir answers from the journal.
	h2 := newHarness(t, func(c *Config) { c.StateDir = dir })
	require.Equal(t, ok, h2.status("j-ok"))
	require.Equal(t, failed, h2.status("j-fail"))
	require.Equal(t, ok, h2.command("j-ok", "setSpeed", "fan-1-a", map[string]any{"rpm": 3000}))
	require.Equal(t, failed, h2.command("j-fail", "fail", "fan-1-a", nil))
	require.Zero(t, h2.runs.Load(), "a journaled command never runs again")
	require.Empty(t, h2.w.Executions())
	require.Equal(t, envelope.StatusUnknown, h2.status("j-invalid").Status, "validation failures are not journaled")

	// The restart rewrote the journal with the live results only.
	types = types[:0]
	for _, r := range journalLines(t, dir) {
		types = append(types, r.Type+" "+r.CommandID)
	}
	require.ElementsMatch(t, []string{"done j-ok", "done j-fail"}, types)
}

func TestJournalInterruptedCommand(t *testing.T) {
	dir := t.TempDir()
	h := newHarness(t, func(c *Config) { c.StateDir = dir })
	first := make(chan envelope.CommandResult, 1)
	go func() { first <- h.command("boot-1", "slow", "fan-1-a", nil) }()
	require.Equal(t, "fan-1-a", <-h.entered) // the started record is on disk before the handler runs

	// What a SIGKILL now would leave on disk: the journal as it is.
	crashed := t.TempDir()
	b, err := os.ReadFile(filepath.Join(dir, JournalFile))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(crashed, JournalFile), b, 0o600))

	h2 := newHarness(t, func(c *Config) { c.StateDir = crashed })
	want := envelope.CommandResult{CommandID: "boot-1", Status: envelope.StateFailed,
		Error: "ERR_WORKER_RESTARTED: slow was running when the worker stopped; its outcome is unknown"}
	require.Equal(t, want, h2.status("boot-1"))
	require.Equal(t, want, h2.command("boot-1", "slow", "fan-1-a", nil), "a resend returns the failure without running")
	require.Equal(t, CodeWorkerRestarted, envelope.CodeOf(envelope.ParseError(want.Error)))
	require.Zero(t, h2.runs.Load())
	require.Empty(t, h2.w.Executions())
	select {
	case dev := <-h2.entered:
		t.Fatalf("the interrupted command ran again on %s", dev)
	default:
	}
	require.NoError(t, h2.w.Close())

	// It stays FAILED across a further restart (the start-up compaction
	// wrote it as a done record).
	recs := journalLines(t, crashed)
	require.Len(t, recs, 1)
	require.Equal(t, journalDone, recs[0].Type)
	h3 := newHarness(t, func(c *Config) { c.StateDir = crashed })
	require.Equal(t, want, h3.status("boot-1"))

	// The original process finishes normally.
	close(h.release)
	require.Equal(t, envelope.StateSuccess, (<-first).Status)
}

func TestJournalStartedRecordWrittenByHand(t *testing.T) {
	dir := t.TempDir()
	at := time.Now().Add(-time.Minute).UTC().Format(time.RFC3339Nano)
	journal := `{"type":"started","commandId":"c-1","command":"setSpeed","deviceId":"fan-1-a","at":"` + at + `"}` + "\n"
	require.NoError(t, os.WriteFile(filepath.Join(dir, JournalFile), []byte(journal), 0o600))
	h := newHarness(t, func(c *Config) { c.StateDir = dir })
	res := h.command("c-1", "setSpeed", "fan-1-a", map[string]any{"rpm": 10})
	require.Equal(t, envelope.StateFailed, res.Status)
	require.True(t, strings.HasPrefix(res.Error, CodeWorkerRestarted+": setSpeed was running"), res.Error)
	require.Equal(t, res, h.status("c-1"))
	require.Zero(t, h.runs.Load())
}

// testJournalCache opens a durable cache on dir with a settable clock.
func testJournalCache(t *testing.T, dir string, now *time.Time, log *slog.Logger) *ResultCache {
	t.Helper()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := newResultCache(10*time.Minute, 100, func() time.Time { return *now })
	require.NoError(t, c.openJournal(dir, log))
	t.Cleanup(func() { require.NoError(t, c.closeJournal()) })
	return c
}

// runJournaled does what execute does around a handler, for unit tests.
func runJournaled(t *testing.T, c *ResultCache, id, status string) {
	t.Helper()
	e, first := c.begin(id)
	require.True(t, first, id)
	require.NoError(t, c.journalStart(e, "setSpeed", "fan-1-a"))
	res := envelope.CommandResult{CommandID: id, Status: status, Result: json.RawMessage(`{"id":"` + id + `"}`)}
	c.journalDone(e, res)
	c.finish(e, res)
}

func TestJournalCorruptLinesSkipped(t *testing.T) {
	dir := t.TempDir()
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	at := now.Add(-time.Minute).Format(time.RFC3339Nano)
	lines := []string{
		`{"type":"started","commandId":"a","command":"setSpeed","deviceId":"fan-1-a","at":"` + at + `"}`,
		`{"type":"done","commandId":"a","status":"SUCCESS","result":{"rpm":5},"at":"` + at + `"}`,
		`{not json at all`,
		`{"type":"bogus","commandId":"x","at":"` + at + `"}`,
		`{"type":"done","commandId":"y","status":"WHATEVER","at":"` + at + `"}`,
		`{"type":"done","commandId":"","status":"SUCCESS","at":"` + at + `"}`,
		`{"type":"started","commandId":"nt","command":"setSpeed"}`, // no time
		`"` + strings.Repeat("x", maxJournalRecord+100) + `"`,
		``,
		`{"type":"started","commandId":"b","command":"slow","deviceId":"fan-1-a","at":"` + at + `"}`,
		`{"type":"done","commandId":"b","status":"SUC`, // torn tail: no newline
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, JournalFile), []byte(strings.Join(lines, "\n")), 0o600))

	var logBuf safeBuffer
	c := testJournalCache(t, dir, &now, slog.New(slog.NewTextHandler(&logBuf, nil)))
	require.Equal(t, envelope.CommandResult{CommandID: "a", Status: envelope.StateSuccess, Result: json.RawMessage(`{"rpm":5}`)}, c.Lookup("a"))
	b := c.Lookup("b")
	require.Equal(t, envelope.StateFailed, b.Status)
	require.True(t, strings.HasPrefix(b.Error, CodeWorkerRestarted+": slow was running"), b.Error)
	for _, id := range []string{"x", "y", "", "nt"} {
		require.Equal(t, envelope.StatusUnknown, c.Lookup(id).Status, id)
	}
	require.Equal(t, 2, c.Len())
	logs := logBuf.String()
	require.Equal(t, 5, strings.Count(logs, "corrupt line, skipped"), logs)
	require.Equal(t, 1, strings.Count(logs, "line too long, skipped"), logs)
	require.Equal(t, 1, strings.Count(logs, "truncated last line, skipped"), logs)

	// The start-up compaction left a clean journal that appends cleanly.
	require.Len(t, journalLines(t, dir), 2)
	runJournaled(t, c, "c", envelope.StateSuccess)
	require.Len(t, journalLines(t, dir), 4)
}

func TestJournalCompaction(t *testing.T) {
	dir := t.TempDir()
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	c := testJournalCache(t, dir, &now, nil)
	for i := range 5 {
		runJournaled(t, c, fmt.Sprintf("old-%d", i), envelope.StateSuccess)
	}
	now = now.Add(6 * time.Minute)
	for i := range 3 {
		runJournaled(t, c, fmt.Sprintf("new-%d", i), envelope.StateFailed)
	}
	require.Len(t, journalLines(t, dir), 16)
	running, first := c.begin("run-1")
	require.True(t, first)
	require.NoError(t, c.journalStart(running, "slow", "fan-1-a"))
	require.NoError(t, c.closeJournal())

	// On start, past the TTL of the old ones: only live entries are rewritten.
	now = now.Add(5 * time.Minute)
	c2 := testJournalCache(t, dir, &now, nil)
	ids := map[string]string{}
	for _, r := range journalLines(t, dir) {
		ids[r.CommandID] = r.Type + " " + r.Status
	}
	require.Equal(t, map[string]string{"new-0": "done FAILED", "new-1": "done FAILED", "new-2": "done FAILED", "run-1": "done FAILED"}, ids)
	require.Equal(t, envelope.StatusUnknown, c2.Lookup("old-0").Status)
	require.Equal(t, envelope.StateFailed, c2.Lookup("new-0").Status)

	// At run time, past the size threshold: the journal is rewritten with the
	// live entries, the running command's started record included.
	c2.j.compactAt = 1
	now = now.Add(11 * time.Minute) // new-* and run-1 expire
	running, first = c2.begin("run-2")
	require.True(t, first)
	require.NoError(t, c2.journalStart(running, "slow", "fan-1-a"))
	runJournaled(t, c2, "fresh", envelope.StateSuccess)
	ids = map[string]string{}
	for _, r := range journalLines(t, dir) {
		ids[r.CommandID] = r.Type + " " + r.Status
	}
	require.Equal(t, map[string]string{"run-2": "started ", "fresh": "done SUCCESS"}, ids)
	_, err := os.Stat(filepath.Join(dir, JournalFile+".tmp"))
	require.ErrorIs(t, err, os.ErrNotExist)
}

// TestJournalConcurrent runs commands in parallel while the journal compacts
// after every few records (-race), then checks a restart sees every result.
func TestJournalConcurrent(t *testing.T) {
	dir := t.TempDir()
	h := newHarness(t, func(c *Config) { c.StateDir = dir })
	h.w.results.j.mu.Lock()
	h.w.results.j.compactAt = 512
	h.w.results.j.mu.Unlock()
	const n = 40
	var wg sync.WaitGroup
	results := make([]envelope.CommandResult, n)
	for i := range n {
		wg.Go(func() {
			results[i] = h.command(fmt.Sprintf("par-%02d", i), "setSpeed", "fan-1-a", map[string]any{"rpm": i})
		})
	}
	wg.Wait()
	require.EqualValues(t, n, h.runs.Load())
	require.NoError(t, h.w.Close())

	h2 := newHarness(t, func(c *Config) { c.StateDir = dir })
	for i := range n {
		require.Equal(t, results[i], h2.status(fmt.Sprintf("par-%02d", i)))
	}
	require.Len(t, journalLines(t, dir), n)
}

func TestJournalConfig(t *testing.T) {
	kernel, err := peer.IDFromPrivateKey(testKey(t))
	require.NoError(t, err)
	base := func() Config {
		return Config{WorkerID: "fan-1", Contract: fanContract(), TrustedKernels: []peer.ID{kernel}}
	}
	cache, err := NewResultCache(0, 0)
	require.NoError(t, err)
	cfg := base()
	cfg.StateDir, cfg.Results = t.TempDir(), cache
	_, err = New(context.Background(), cfg)
	require.ErrorIs(t, err, ErrInvalidConfig)
	require.Contains(t, err.Error(), "Config.StateDir")

	// A StateDir that is a file cannot hold a journal.
	file := filepath.Join(t.TempDir(), "file")
	require.NoError(t, os.WriteFile(file, nil, 0o600))
	cfg = base()
	cfg.StateDir, cfg.Key = file, testKey(t)
	cfg.ListenAddrs = []string{"/ip4/127.0.0.1/tcp/0"}
	_, err = New(context.Background(), cfg)
	require.ErrorIs(t, err, ErrInvalidConfig)
	require.Contains(t, err.Error(), "Config.StateDir")

	// A closed journal refuses to record a start: the handler must not run.
	now := time.Now()
	c := testJournalCache(t, t.TempDir(), &now, nil)
	require.NoError(t, c.closeJournal())
	e, _ := c.begin("late")
	require.ErrorIs(t, c.journalStart(e, "setSpeed", "fan-1-a"), errJournalClosed)
}

type safeBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *safeBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *safeBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
