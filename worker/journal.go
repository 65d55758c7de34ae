package worker

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
)

// CodeWorkerRestarted is the error code of a command whose handler was running
// when the Worker process stopped (crash, kill, power loss): the journal in
// Config.StateDir shows it started and never finished, so its outcome is
// unknown. command.status and a resent command.request answer it FAILED with
// this code instead of UNKNOWN, so the kernel ends the command rather than
// running a physical command a second time.
const CodeWorkerRestarted = "ERR_WORKER_RESTARTED"

// JournalFile is the name of the result journal inside Config.StateDir.
const JournalFile = "results.log"

const (
	journalStarted = "started"
	journalDone    = "done"
	// maxJournalRecord bounds one journal line (a result never exceeds a
	// command reply frame). A longer line is skipped on replay; a done
	// record that would be longer is written without its result.
	maxJournalRecord = 2*protocols.MaxFrameSize + 4096
	// defaultJournalCompactBytes: at run time the journal is rewritten with
	// the live entries only once this many bytes were appended since the
	// last rewrite.
	defaultJournalCompactBytes = 16 << 20
)

// journalRecord is one line of the journal (JSON). A "started" record is
// written and synced before a handler runs; a "done" record after it returns.
type journalRecord struct {
	Type      string          `json:"type"`
	CommandID string          `json:"commandId"`
	Command   string          `json:"command,omitempty"`
	DeviceID  string          `json:"deviceId,omitempty"`
	Status    string          `json:"status,omitempty"`
	Result    json.RawMessage `json:"result,omitempty"`
	Error     string          `json:"error,omitempty"`
	At        time.Time       `json:"at"`
}

func (r *journalRecord) valid() bool {
	if r.CommandID == "" || r.At.IsZero() {
		return false
	}
	switch r.Type {
	case journalStarted:
		return true
	case journalDone:
		return r.Status == envelope.StateSuccess || r.Status == envelope.StateFailed
	}
	return false
}

// journal is the append-only file behind a durable ResultCache.
//
// Lock order: syncMu → mu → ResultCache.mu. Appends hold mu only; a sync holds
// syncMu and takes mu briefly; a compaction holds both, so no append can slip
// between the snapshot of the cache and the swap of the file.
type journal struct {
	dir, path string
	log       *slog.Logger
	compactAt int64

	mu      sync.Mutex
	f       *os.File // open for append; nil once closed
	size    int64    // bytes in f
	base    int64    // size right after the last compaction
	written uint64   // records appended so far
	broken  bool     // a write failed: rewrite the file before the next append
	closed  bool

	syncMu sync.Mutex
	synced uint64 // records known to be on disk
}

var errJournalClosed = errors.New("result journal closed")

// openJournal replays <dir>/results.log into c (which must be new and
// empty), rewrites the file with the live entries only and keeps it open for
// appends. Finished results come back within the TTL; a command that started
// and never finished comes back FAILED with ERR_WORKER_RESTARTED.
func (c *ResultCache) openJournal(dir string, log *slog.Logger) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	j := &journal{dir: dir, path: filepath.Join(dir, JournalFile), log: log, compactAt: defaultJournalCompactBytes}
	recs, err := j.read()
	if err != nil {
		return err
	}
	c.replay(recs, log)
	c.j = j
	if err := c.compactJournal(); err != nil {
		c.j = nil
		return err
	}
	return nil
}

// read returns the valid records of the journal file in file order. Corrupt,
// oversized and truncated lines are skipped with a log line.
func (j *journal) read() ([]journalRecord, error) {
	f, err := os.Open(j.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var recs []journalRecord
	br := bufio.NewReaderSize(f, 64<<10)
	for line := 1; ; line++ {
		b, complete, err := readLine(br, maxJournalRecord)
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("%s: line %d: %w", j.path, line, err)
		}
		if b == nil && !complete && errors.Is(err, io.EOF) {
			return recs, nil
		}
		b = bytes.TrimSpace(b)
		switch {
		case len(b) > maxJournalRecord:
			j.log.Warn("result journal: line too long, skipped", "file", j.path, "line", line)
		case len(b) == 0:
		default:
			var r journalRecord
			if uErr := json.Unmarshal(b, &r); uErr != nil || !r.valid() {
				what := "corrupt line, skipped"
				if !complete {
					what = "truncated last line, skipped"
				}
				j.log.Warn("result journal: "+what, "file", j.path, "line", line, "err", uErr)
				break
			}
			recs = append(recs, r)
		}
		if errors.Is(err, io.EOF) {
			return recs, nil
		}
	}
}

// readLine reads up to and including the next '\n'. It returns at most
// limit+1 bytes of the line (the rest is read and dropped, so the caller sees
// an over-long line as longer than limit) and whether the line ended with a
// newline. At the end of the file it returns io.EOF with the unterminated
// tail, or nil and io.EOF when nothing is left.
func readLine(br *bufio.Reader, limit int) (line []byte, complete bool, err error) {
	for {
		chunk, err := br.ReadSlice('\n')
		if len(line) <= limit {
			keep := min(len(chunk), limit+1-len(line))
			line = append(line, chunk[:keep]...)
		}
		switch {
		case err == nil:
			return line, true, nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		default:
			if len(line) == 0 {
				line = nil
			}
			return line, false, err
		}
	}
}

// replay loads the records into the (empty) cache.
func (c *ResultCache) replay(recs []journalRecord, log *slog.Logger) {
	type state struct {
		started, done *journalRecord
	}
	byID := map[string]*state{}
	for i := range recs {
		r := &recs[i]
		s := byID[r.CommandID]
		if s == nil {
			s = &state{}
			byID[r.CommandID] = s
		}
		if r.Type == journalStarted {
			s.started, s.done = r, nil // a later run of an id whose old result expired
		} else {
			s.done = r
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	var entries []*cacheEntry
	interrupted := 0
	for id, s := range byID {
		e := &cacheEntry{id: id, done: make(chan struct{}), journaled: true}
		close(e.done)
		switch {
		case s.done != nil:
			if now.Sub(s.done.At) >= c.ttl {
				continue
			}
			e.res = envelope.CommandResult{CommandID: id, Status: s.done.Status, Result: s.done.Result, Error: s.done.Error}
			e.finishedAt = s.done.At
		default:
			if now.Sub(s.started.At) >= c.ttl {
				continue
			}
			e.res = restartedResult(id, s.started.Command)
			e.finishedAt = now
			interrupted++
			log.Warn("command was running when the worker stopped; answering FAILED "+CodeWorkerRestarted,
				"cmd", id, "command", s.started.Command, "device", s.started.DeviceID, "startedAt", s.started.At)
		}
		entries = append(entries, e)
	}
	slices.SortStableFunc(entries, func(a, b *cacheEntry) int {
		if d := a.finishedAt.Compare(b.finishedAt); d != 0 {
			return d
		}
		return cmpString(a.id, b.id)
	})
	for _, e := range entries {
		c.entries[e.id] = e
		e.elem = c.finished.PushBack(e)
	}
	c.pruneLocked()
	log.Info("result journal replayed", "records", len(recs), "results", len(c.entries), "interrupted", interrupted)
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func restartedResult(id, command string) envelope.CommandResult {
	if command == "" {
		command = "the command"
	}
	return envelope.CommandResult{CommandID: id, Status: envelope.StateFailed,
		Error: envelope.Errf(CodeWorkerRestarted, "%s was running when the worker stopped; its outcome is unknown", command).Message}
}

// journalStart writes e's "started" record and waits until it is on disk.
// The handler must not run if it fails. A no-op without a journal.
func (c *ResultCache) journalStart(e *cacheEntry, command, deviceID string) error {
	j := c.j
	if j == nil {
		return nil
	}
	if j.isBroken() {
		if err := c.compactJournal(); err != nil {
			return err
		}
	}
	at := c.now()
	j.mu.Lock()
	seq, err := j.appendLocked(&journalRecord{Type: journalStarted, CommandID: e.id, Command: command, DeviceID: deviceID, At: at})
	if err == nil {
		c.mu.Lock()
		e.journaled, e.command, e.deviceID, e.startedAt = true, command, deviceID, at
		c.mu.Unlock()
	}
	j.mu.Unlock()
	if err != nil {
		return err
	}
	return j.syncTo(seq)
}

// journalDone writes e's "done" record (res) and waits until it is on disk,
// before the result is published; it compacts the journal once it has grown
// past the threshold. Failures are logged: the handler has run, the result
// is still answered from memory.
func (c *ResultCache) journalDone(e *cacheEntry, res envelope.CommandResult) {
	j := c.j
	if j == nil || !e.journaled {
		return
	}
	rec := &journalRecord{Type: journalDone, CommandID: e.id, Status: res.Status, Result: res.Result, Error: res.Error, At: c.now()}
	j.mu.Lock()
	seq, err := j.appendLocked(rec)
	if err == nil {
		c.mu.Lock()
		e.pending = &res
		c.mu.Unlock()
	}
	compact := j.size-j.base > j.compactAt
	j.mu.Unlock()
	if err == nil {
		err = j.syncTo(seq)
	}
	if err != nil {
		j.log.Error("result journal: done record not written", "cmd", e.id, "err", err)
	}
	if compact {
		if err := c.compactJournal(); err != nil {
			j.log.Error("result journal: compaction", "err", err)
		}
	}
}

// appendLocked writes one record (j.mu held) and returns its sequence number.
func (j *journal) appendLocked(r *journalRecord) (uint64, error) {
	if j.f == nil {
		return 0, errJournalClosed
	}
	b, err := marshalRecord(r)
	if err != nil {
		return 0, err
	}
	n, err := j.f.Write(b)
	j.size += int64(n)
	if err != nil {
		j.broken = true // a torn line: the next append rewrites the file first
		return 0, fmt.Errorf("result journal: %w", err)
	}
	j.written++
	return j.written, nil
}

// marshalRecord is r as one JSON line; a done record too long for replay
// loses its result (its status and error stay).
func marshalRecord(r *journalRecord) ([]byte, error) {
	b, err := json.Marshal(r)
	if err != nil {
		return nil, err
	}
	if len(b) >= maxJournalRecord && r.Type == journalDone {
		short := *r
		short.Result = nil
		if short.Error == "" {
			short.Error = "result too large for the result journal"
		}
		if b, err = json.Marshal(&short); err != nil {
			return nil, err
		}
	}
	if len(b) >= maxJournalRecord {
		return nil, fmt.Errorf("result journal: record of %s is %d bytes", r.CommandID, len(b))
	}
	return append(b, '\n'), nil
}

func (j *journal) isBroken() bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.broken
}

// syncTo returns once record seq is on disk. Concurrent callers share one
// fsync: whoever syncs covers every record written before it started.
func (j *journal) syncTo(seq uint64) error {
	j.syncMu.Lock()
	defer j.syncMu.Unlock()
	if j.synced >= seq {
		return nil
	}
	j.mu.Lock()
	f, target := j.f, j.written
	j.mu.Unlock()
	if f == nil {
		return errJournalClosed
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("result journal: sync: %w", err)
	}
	j.synced = target
	return nil
}

// compactJournal rewrites the journal with the cache's live journaled
// entries only (atomically: a synced temp file renamed over the old one) and
// reopens it for appends.
func (c *ResultCache) compactJournal() error {
	j := c.j
	j.syncMu.Lock()
	defer j.syncMu.Unlock()
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.closed {
		return errJournalClosed
	}

	var recs []journalRecord
	c.mu.Lock()
	c.pruneLocked()
	now := c.now()
	for f := c.finished.Front(); f != nil; f = f.Next() {
		if e := f.Value.(*cacheEntry); e.journaled {
			recs = append(recs, doneRecord(e.id, e.res, e.finishedAt))
		}
	}
	for _, e := range c.entries {
		switch {
		case !e.journaled || e.elem != nil: // not journaled, or finished (above)
		case e.pending != nil:
			recs = append(recs, doneRecord(e.id, *e.pending, now))
		default:
			recs = append(recs, journalRecord{Type: journalStarted, CommandID: e.id, Command: e.command, DeviceID: e.deviceID, At: e.startedAt})
		}
	}
	c.mu.Unlock()

	size, err := j.rewrite(recs)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(j.path, os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		j.broken = true
		return fmt.Errorf("result journal: reopen: %w", err)
	}
	if j.f != nil {
		_ = j.f.Close()
	}
	j.f, j.size, j.base, j.broken = f, size, size, false
	j.synced = j.written // everything written so far is in the synced new file
	return nil
}

func doneRecord(id string, res envelope.CommandResult, at time.Time) journalRecord {
	return journalRecord{Type: journalDone, CommandID: id, Status: res.Status, Result: res.Result, Error: res.Error, At: at}
}

// rewrite writes recs to a temp file, syncs it and renames it over the
// journal; it returns the new size.
func (j *journal) rewrite(recs []journalRecord) (int64, error) {
	tmp := j.path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return 0, fmt.Errorf("result journal: %w", err)
	}
	fail := func(err error) (int64, error) {
		_ = f.Close()
		_ = os.Remove(tmp)
		return 0, fmt.Errorf("result journal: compact: %w", err)
	}
	bw := bufio.NewWriterSize(f, 64<<10)
	var size int64
	for i := range recs {
		b, err := marshalRecord(&recs[i])
		if err != nil {
			j.log.Warn("result journal: record dropped on compaction", "cmd", recs[i].CommandID, "err", err)
			continue
		}
		n, err := bw.Write(b)
		size += int64(n)
		if err != nil {
			return fail(err)
		}
	}
	if err := bw.Flush(); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		_ = os.Remove(tmp)
		return 0, fmt.Errorf("result journal: compact: %w", err)
	}
	if err := os.Rename(tmp, j.path); err != nil {
		_ = os.Remove(tmp)
		return 0, fmt.Errorf("result journal: compact: %w", err)
	}
	if d, err := os.Open(j.dir); err == nil {
		if err := d.Sync(); err != nil {
			j.log.Debug("result journal: directory sync", "err", err)
		}
		_ = d.Close()
	}
	return size, nil
}

// closeJournal syncs and closes the journal; later appends fail (a command
// is then not run). A no-op without a journal.
func (c *ResultCache) closeJournal() error {
	j := c.j
	if j == nil {
		return nil
	}
	j.syncMu.Lock()
	defer j.syncMu.Unlock()
	j.mu.Lock()
	defer j.mu.Unlock()
	j.closed = true
	if j.f == nil {
		return nil
	}
	err := j.f.Sync()
	if cErr := j.f.Close(); err == nil {
		err = cErr
	}
	j.f = nil
	if err != nil {
		return fmt.Errorf("result journal: close: %w", err)
	}
	return nil
}
