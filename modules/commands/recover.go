package commands

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"
)

// RecoveryReport counts what Recover found and did.
type RecoveryReport struct {
	Records  int            // WAL records swept (decodable)
	ByState  map[string]int // swept records by persisted state
	Requeued int            // back in their device queues, in creation order: QUEUED, or dispatched but never delivered
	Unknown  int            // delivered, outcome unknown: their Worker is asked (command.status) before any resend
	Parents  int            // fan-out parents waiting for their children
	Finished int            // finished during recovery: parents whose children had all finished, terminal leftovers
	Keys     int            // idempotency keys indexed
	Skipped  []string       // ids of records that could not be decoded or placed; left in the WAL untouched
}

// Recover loads the WAL on start (DESIGN §7 step 2) and puts every unfinished command back in motion; nothing
// is left stranded:
//   - QUEUED stays queued: re-pushed into its device queue in creation order (depth limits do not apply: an
//     accepted command is never dropped), with its deadline.
//   - DISPATCHED or EXECUTING not delivered: QUEUED again (no retry spent: nothing was sent).
//   - DISPATCHED or EXECUTING delivered: the outcome is unknown. The command takes its device back and its
//     Worker is asked (command.status) as soon as it is routable (on the normal pump path), before anything is
//     resent; the question is repeated with backoff until the command's deadline (or OutcomeTimeout; a command
//     whose deadline passed during the downtime gets one CommandTimeout of grace), then it is TIMEOUT.
//   - a fan-out parent waits for its children; one whose children have all finished is finished now.
//
// Recover then pumps every device. Commands already in memory are skipped, so calling it twice is harmless; run
// it before Submit. It returns the WAL's error if the sweep fails.
func (m *Manager) Recover(ctx context.Context) (RecoveryReport, error) {
	rep := RecoveryReport{ByState: make(map[string]int)}
	var recs []Record
	inWAL := make(map[string]bool)
	err := m.o.WAL.Sweep(ctx, func(id string, b []byte) error {
		rec, err := decode(id, b)
		if err != nil {
			m.log.Error("recover: undecodable WAL record left in place", "cmd", id, "err", err)
			rep.Skipped = append(rep.Skipped, id)
			return nil
		}
		rep.Records++
		rep.ByState[rec.State]++
		recs = append(recs, rec)
		inWAL[rec.CommandID] = true
		return nil
	})
	if err != nil {
		return rep, fmt.Errorf("ork/commands: recover: sweep: %w", err)
	}
	slices.SortFunc(recs, func(a, b Record) int {
		return cmp.Or(cmp.Compare(a.CreatedAt, b.CreatedAt), cmp.Compare(a.CommandID, b.CommandID))
	})

	// Children of recovered parents that finished before the crash: their results.
	finished := make(map[string]string)
	for _, r := range recs {
		if !r.IsParent() || r.Terminal() {
			continue
		}
		for _, ch := range r.Children {
			if inWAL[ch] {
				continue
			}
			b, err := m.o.WAL.Result(ctx, ch)
			switch {
			case errors.Is(err, ErrNotFound):
				finished[ch] = Failed // lost (never admitted, or its result is gone): not a success
			case err != nil:
				return rep, fmt.Errorf("ork/commands: recover: result of child %s: %w", ch, err)
			default:
				res, derr := decode(ch, b)
				if derr != nil {
					finished[ch] = Failed
				} else {
					finished[ch] = res.State
				}
			}
		}
	}

	// Idempotency keys of retained results, if the WAL can list them.
	now := m.o.Now()
	keys := make(map[string]*idemEntry)
	if rs, ok := m.o.WAL.(ResultSweeper); ok {
		err := rs.SweepResults(ctx, func(id string, b []byte) error {
			res, err := decode(id, b)
			if err != nil || res.IdempotencyKey == "" {
				return nil
			}
			exp := time.UnixMilli(res.UpdatedAt).Add(m.o.ResultTTL)
			if now.Before(exp) {
				keys[res.IdempotencyKey] = &idemEntry{id: res.CommandID, expires: exp}
			}
			return nil
		})
		if err != nil {
			return rep, fmt.Errorf("ork/commands: recover: sweep results: %w", err)
		}
	}

	type end struct {
		c   *cmd
		rec Record
	}
	var ends []end
	nowMs := now.UnixMilli()
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return rep, ErrClosed
	}
	// Pass 0 places what holds a device or none (unknown outcomes take their device before anything queued for
	// it is appended); pass 1 fills the queues in creation order.
	for pass := range 2 {
		for _, r0 := range recs {
			if _, known := m.cmds[r0.CommandID]; known {
				continue
			}
			rec, what, err := recoverRecord(r0, nowMs)
			if err != nil {
				if pass == 0 {
					m.log.Error("recover: record left in place", "cmd", r0.CommandID, "err", err)
					rep.Skipped = append(rep.Skipped, r0.CommandID)
				}
				continue
			}
			if (what == recQueue) != (pass == 1) {
				continue
			}
			c := &cmd{rec: rec}
			m.cmds[rec.CommandID] = c
			if !rec.Terminal() {
				m.byState[rec.State]++
			}
			if k := rec.IdempotencyKey; k != "" && !rec.Terminal() {
				m.idem[k] = &idemEntry{id: rec.CommandID}
			}
			if m.o.Owner == nil && rec.DeviceID != "" {
				m.devWorker[rec.DeviceID] = rec.WorkerID
			}
			switch what {
			case recFinish:
				c.phase = phRunning
				ends = append(ends, end{c, rec})
				rep.Finished++
			case recParent:
				rep.Parents++
				c.phase = phParent
				c.children = &childSummary{Total: len(rec.Children)}
				for _, ch := range rec.Children {
					if inWAL[ch] {
						c.pending++
					} else {
						c.children.add(finished[ch])
					}
				}
				if c.pending == 0 {
					next, err := parentOutcome(rec, *c.children, nowMs)
					if err != nil {
						m.log.Error("recover: parent", "cmd", rec.CommandID, "err", err)
						break
					}
					c.phase = phRunning
					ends = append(ends, end{c, next})
					rep.Finished++
				}
			case recUnknown:
				rep.Unknown++
				if !m.q.Acquire(rec.DeviceID, rec.CommandID) {
					// Two commands in flight on one device cannot happen; if the WAL says so, resolve both.
					m.log.Error("recover: device already held", "cmd", rec.CommandID, "device", rec.DeviceID)
				}
				m.enterUnknownLocked(c)
				c.resolveBy = m.resolveBy(&rec, now, true)
				m.armLocked(c, c.resolveBy)
			case recQueue:
				rep.Requeued++
				c.phase = phQueued
				m.q.Append(rec.DeviceID, rec.CommandID, deadlineOf(&rec))
				if rec.Deadline != 0 {
					m.armLocked(c, time.UnixMilli(rec.Deadline))
				}
			}
		}
	}
	for k, e := range keys {
		if _, ok := m.idem[k]; !ok {
			m.idem[k] = e
		}
	}
	rep.Keys = len(m.idem)
	m.mu.Unlock()

	for _, e := range ends {
		m.finish(e.c, e.rec, false)
	}
	m.PumpAll()
	return rep, nil
}
