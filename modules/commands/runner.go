package commands

import (
	"context"
	"slices"
	"time"
)

// This file is the runner: the goroutines and timers that carry commands through the pure decisions of
// transitions.go. Ownership rule: a command in phRunning belongs to exactly one goroutine, which alone may
// change its record; every other phase is changed only under m.mu. A goroutine that sends or asks holds one of
// the Options.Concurrency slots (m.running) until it hands the command on.

// route resolves where dev's commands go, calling Owner and Routable; never call it with m.mu held.
func (m *Manager) route(dev, fallback string) route {
	w := fallback
	if m.o.Owner != nil {
		o, ok := m.o.Owner(dev)
		if !ok {
			return route{}
		}
		w = o
	}
	if m.o.Routable == nil {
		return route{worker: w, routable: true}
	}
	return route{worker: w, routable: w != "" && m.o.Routable(w)}
}

// kick pumps devs: routes are resolved without the lock, then each device is pumped under it.
func (m *Manager) kick(devs ...string) { m.kickWhere(devs, nil) }

// kickWhere pumps the devices of devs whose owner matches (all when match is nil).
func (m *Manager) kickWhere(devs []string, match func(worker string) bool) {
	if len(devs) == 0 {
		return
	}
	fallback := make([]string, len(devs))
	if m.o.Owner == nil {
		m.mu.Lock()
		for i, d := range devs {
			fallback[i] = m.devWorker[d]
		}
		m.mu.Unlock()
	}
	routes := make([]route, len(devs))
	for i, d := range devs {
		routes[i] = m.route(d, fallback[i])
	}
	m.mu.Lock()
	for i, d := range devs {
		if match == nil || match(routes[i].worker) {
			m.pumpLocked(d, routes[i])
		}
	}
	m.mu.Unlock()
}

// pumpLocked moves dev forward: fails expired queue heads, asks about an unknown outcome if its Worker is
// routable, and dispatches the queue head if the device is free and a concurrency slot is.
func (m *Manager) pumpLocked(dev string, rt route) {
	if m.closed || m.draining {
		return
	}
	now := m.o.Now()
	free := m.running < m.o.Concurrency
	if ids := m.unknown[dev]; len(ids) > 0 && rt.routable {
		for _, id := range slices.Clone(ids) {
			c := m.cmds[id]
			if c == nil || c.phase != phUnknown || c.park != nil {
				continue
			}
			if !free {
				m.starveLocked(dev)
				break
			}
			m.leaveUnknownLocked(c)
			c.phase = phRunning
			m.running++
			free = m.running < m.o.Concurrency
			rec := c.rec
			m.spawnLocked(func() { m.ask(c, rec) })
		}
	}
	id, expired, ok := m.q.Next(dev, now, rt.routable && free)
	for _, e := range expired {
		if c := m.cmds[e]; c != nil && c.phase == phQueued {
			m.endLocked(c, expireRecord, now.UnixMilli())
		}
	}
	if !ok {
		if rt.routable && !free && m.q.Depth(dev) > 0 {
			if _, busy := m.q.InFlight(dev); !busy {
				m.starveLocked(dev)
			}
		}
		return
	}
	c := m.cmds[id]
	if c == nil || c.phase != phQueued {
		m.log.Error("queued id without a queued command", "cmd", id, "device", dev)
		m.q.Done(dev, id)
		return
	}
	rec, err := dispatchRecord(c.rec, rt.worker, now.UnixMilli())
	if err != nil {
		m.log.Error("dispatch", "cmd", id, "err", err)
		m.q.Requeue(dev, id, deadlineOf(&c.rec))
		return
	}
	c.phase = phRunning
	m.running++
	if m.o.Owner == nil && rt.worker != "" {
		m.devWorker[dev] = rt.worker
	}
	m.spawnLocked(func() { m.run(c, rec, false) })
}

func (m *Manager) starveLocked(dev string) {
	if _, ok := m.starvedSet[dev]; ok {
		return
	}
	m.starvedSet[dev] = struct{}{}
	m.starved = append(m.starved, dev)
}

// releaseLocked gives back a concurrency slot and returns the starved devices that may now use the free ones
// (the caller kicks them once the lock is released).
func (m *Manager) releaseLocked() []string {
	m.running--
	n := min(m.o.Concurrency-m.running, len(m.starved))
	if n <= 0 {
		return nil
	}
	out := slices.Clone(m.starved[:n])
	m.starved = slices.Delete(m.starved, 0, n)
	for _, d := range out {
		delete(m.starvedSet, d)
	}
	return out
}

// spawnLocked starts f as a Manager goroutine, unless the Manager is closed.
func (m *Manager) spawnLocked(f func()) {
	if m.closed {
		return
	}
	m.active++
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		defer m.exited()
		f()
	}()
}

func (m *Manager) exited() {
	m.mu.Lock()
	m.active--
	if m.active == 0 && m.drained != nil {
		close(m.drained)
		m.drained = nil
	}
	m.mu.Unlock()
}

// setRecLocked installs rec as c's record and keeps the per-state counters.
func (m *Manager) setRecLocked(c *cmd, rec Record) {
	if old := c.rec.State; old != rec.State {
		m.byState[old]--
		if isTerminal(rec.State) {
			m.finished[rec.State]++
		} else {
			m.byState[rec.State]++
		}
	}
	c.rec = rec
}

// apply installs rec (the command's owner calls it after the write that made rec durable, if any).
func (m *Manager) apply(c *cmd, rec Record) {
	m.mu.Lock()
	m.setRecLocked(c, rec)
	m.mu.Unlock()
}

// run is one dispatch of c: the DISPATCHED write (unless Submit folded it into the admission write), the send,
// and the settlement of what came back. It owns c and a concurrency slot.
func (m *Manager) run(c *cmd, rec Record, written bool) {
	if !written {
		if err := m.put(rec); err != nil {
			if m.ctx.Err() != nil {
				return
			}
			// Still QUEUED in memory (the write may or may not have landed: either is safe). Keep the device and
			// try again after a backoff, first in line.
			m.log.Warn("wal write failed; dispatch postponed", "cmd", rec.CommandID, "err", err)
			m.mu.Lock()
			delay := m.backoffLocked(c)
			m.mu.Unlock()
			m.park(c, c.rec, delay)
			return
		}
	}
	// EXECUTING is an in-memory step: the DISPATCHED record already says delivered, which is how a crash from
	// here on is read (outcome unknown, ask the Worker).
	exec := rec
	if err := step(&exec, Executing, m.o.Now().UnixMilli()); err != nil {
		m.broken(c, err, true)
		return
	}
	m.apply(c, exec)

	ctx, done := m.attempt()
	reply, err := m.o.Sender.Send(ctx, exec)
	done()
	if m.ctx.Err() != nil {
		return // closing: the WAL keeps DISPATCHED/delivered, recovery asks the Worker
	}
	now := m.o.Now().UnixMilli()
	switch {
	case err == nil:
		next, terr := onReply(exec, reply, now)
		if terr != nil {
			m.broken(c, terr, true)
			return
		}
		m.finish(c, next, true)
	case m.o.NotDelivered(err):
		next, act, terr := onNotDelivered(exec, now)
		if terr != nil {
			m.broken(c, terr, true)
			return
		}
		m.log.Debug("not delivered", "cmd", exec.CommandID, "worker", exec.WorkerID, "err", err, "next", act)
		if act == actFinish {
			m.finish(c, next, true)
			return
		}
		m.mu.Lock()
		delay := m.backoffLocked(c)
		m.mu.Unlock()
		m.requeue(c, next, delay)
	default:
		m.log.Debug("outcome unknown", "cmd", exec.CommandID, "worker", exec.WorkerID, "err", err)
		m.resolve(c, exec)
	}
}

// requeue persists c as QUEUED again (a retry spent) and parks it for delay before it returns to the head of
// its queue. The caller owns c and a slot.
func (m *Manager) requeue(c *cmd, next Record, delay time.Duration) {
	if !m.persistRec(c, &next, true, "requeue", m.o.WAL.Put) {
		return
	}
	m.park(c, next, delay)
}

// park makes c QUEUED and holding its device (so nothing queued after it overtakes it) until delay has passed;
// then it goes back to the head of its queue. The caller owns c and a slot, which park releases.
func (m *Manager) park(c *cmd, rec Record, delay time.Duration) {
	m.mu.Lock()
	m.setRecLocked(c, rec)
	c.phase = phParked
	kick := m.releaseLocked()
	if delay <= 0 {
		m.unparkLocked(c)
		kick = append(kick, rec.DeviceID)
	} else if !m.closed {
		gen := c.gen
		c.park = m.o.AfterFunc(delay, func() { m.unpark(c, gen) })
	}
	m.mu.Unlock()
	m.kick(kick...)
}

func (m *Manager) unpark(c *cmd, gen uint64) {
	m.mu.Lock()
	if m.closed || c.gen != gen || c.phase != phParked {
		m.mu.Unlock()
		return
	}
	c.park = nil
	m.unparkLocked(c)
	m.mu.Unlock()
	m.kick(c.rec.DeviceID)
}

func (m *Manager) unparkLocked(c *cmd) {
	c.phase = phQueued
	m.q.Requeue(c.rec.DeviceID, c.rec.CommandID, deadlineOf(&c.rec))
}

// stopParkLocked stops c's backoff timer and invalidates it if it has fired already.
func (m *Manager) stopParkLocked(c *cmd) {
	if c.park != nil {
		c.park()
		c.park = nil
	}
	c.gen++
}

// resolve handles a send whose outcome is unknown: the request was written, no reply came. It is never resent
// blindly: the Worker is asked (command.status), now and then with backoff, until resolveBy. The caller owns c
// and a slot.
func (m *Manager) resolve(c *cmd, rec Record) {
	now := m.o.Now()
	m.mu.Lock()
	c.resolveBy = m.resolveBy(&rec, now, false)
	m.armLocked(c, c.resolveBy)
	m.setRecLocked(c, rec)
	if m.draining {
		// No new network call while draining: leave it to the next start (the WAL says delivered).
		m.enterUnknownLocked(c)
		kick := m.releaseLocked()
		m.mu.Unlock()
		m.kick(kick...)
		return
	}
	m.mu.Unlock()
	m.ask(c, rec)
}

// resolveBy is when Manager stops asking about an unknown outcome: the command's deadline, else OutcomeTimeout
// from now. A command recovered after its deadline passed gets one CommandTimeout of grace, so its Worker is
// asked at least once after a restart.
func (m *Manager) resolveBy(rec *Record, now time.Time, recovered bool) time.Time {
	if rec.Deadline == 0 {
		return now.Add(m.o.OutcomeTimeout)
	}
	d := time.UnixMilli(rec.Deadline)
	if recovered && !d.After(now) {
		return now.Add(m.o.CommandTimeout)
	}
	return d
}

// ask puts command.status to c's Worker and settles the answer. The caller owns c and a slot.
func (m *Manager) ask(c *cmd, rec Record) {
	ctx, done := m.attempt()
	reply, err := m.o.Sender.Status(ctx, rec)
	done()
	if m.ctx.Err() != nil {
		return
	}
	m.mu.Lock()
	resolveBy := c.resolveBy
	m.mu.Unlock()
	now := m.o.Now().UnixMilli()
	var (
		next Record
		act  action
		terr error
	)
	if err != nil {
		m.log.Debug("command.status failed", "cmd", rec.CommandID, "worker", rec.WorkerID, "err", err)
		next, act, terr = onStatusError(rec, resolveBy, now)
	} else {
		next, act, terr = onStatus(rec, reply, resolveBy, now)
	}
	if terr != nil {
		m.broken(c, terr, true)
		return
	}
	switch act {
	case actFinish:
		m.finish(c, next, true)
	case actRequeue:
		m.requeue(c, next, 0) // the Worker answered, so it is reachable: resend at once
	case actRetryStatus:
		m.mu.Lock()
		m.enterUnknownLocked(c)
		if !m.closed {
			delay := m.backoffLocked(c)
			gen := c.gen
			c.park = m.o.AfterFunc(delay, func() { m.retryAsk(c, gen) })
		}
		kick := m.releaseLocked()
		m.mu.Unlock()
		m.kick(kick...)
	}
}

// retryAsk ends a Status backoff: the next pump of the device asks again if the Worker is routable.
func (m *Manager) retryAsk(c *cmd, gen uint64) {
	m.mu.Lock()
	if m.closed || c.gen != gen || c.phase != phUnknown {
		m.mu.Unlock()
		return
	}
	c.park = nil
	m.mu.Unlock()
	m.kick(c.rec.DeviceID)
}

func (m *Manager) enterUnknownLocked(c *cmd) {
	c.phase = phUnknown
	dev := c.rec.DeviceID
	if !slices.Contains(m.unknown[dev], c.rec.CommandID) {
		m.unknown[dev] = append(m.unknown[dev], c.rec.CommandID)
	}
}

func (m *Manager) leaveUnknownLocked(c *cmd) {
	dev := c.rec.DeviceID
	ids := slices.DeleteFunc(m.unknown[dev], func(id string) bool { return id == c.rec.CommandID })
	if len(ids) == 0 {
		delete(m.unknown, dev)
	} else {
		m.unknown[dev] = ids
	}
}

// armLocked (re)arms c's deadline timer for at.
func (m *Manager) armLocked(c *cmd, at time.Time) {
	if c.dl != nil {
		c.dl()
		c.dl = nil
	}
	if m.closed {
		return
	}
	d := max(at.Sub(m.o.Now()), 0)
	c.dl = m.o.AfterFunc(d, func() { m.onDeadline(c) })
}

// onDeadline fires at a command's deadline (or, for an unknown outcome, at resolveBy). Every check is against
// the clock, so a stale timer does no harm.
func (m *Manager) onDeadline(c *cmd) {
	now := m.o.Now()
	nowMs := now.UnixMilli()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return
	}
	switch c.phase {
	case phQueued:
		if pastDeadline(&c.rec, nowMs) && m.q.Remove(c.rec.DeviceID, c.rec.CommandID) {
			m.endLocked(c, expireRecord, nowMs)
		}
	case phParked:
		if pastDeadline(&c.rec, nowMs) {
			m.endLocked(c, expireRecord, nowMs) // it keeps its device until the final write
		}
	case phUnknown:
		if !now.Before(c.resolveBy) {
			m.endLocked(c, timeoutRecord, nowMs)
		}
	}
	// phRunning: its owner checks the clock itself when it settles.
}

// endLocked takes c (queued, parked or unknown) and finishes it with f's record in a new goroutine.
func (m *Manager) endLocked(c *cmd, f func(Record, int64) (Record, error), now int64) {
	next, err := f(c.rec, now)
	if err != nil {
		m.log.Error("end", "cmd", c.rec.CommandID, "err", err)
		return
	}
	m.stopParkLocked(c)
	if c.phase == phUnknown {
		m.leaveUnknownLocked(c)
	}
	c.phase = phRunning
	m.spawnLocked(func() { m.finish(c, next, false) })
}

// finish makes rec (terminal) durable — result retained, WAL record deleted, in one Finish — and completes c.
// slot says whether the caller holds a concurrency slot to give back.
func (m *Manager) finish(c *cmd, rec Record, slot bool) {
	if !m.persistRec(c, &rec, slot, "finish", m.o.WAL.Finish) {
		return
	}
	m.complete(c, rec, slot)
}

// complete runs after a terminal record is durable: OnDone, then waiters, then the device is released and
// pumped; a fan-out parent whose last child this was is finished in turn.
func (m *Manager) complete(c *cmd, rec Record, slot bool) {
	if m.o.OnDone != nil {
		m.o.OnDone(rec)
	}
	id, dev := rec.CommandID, rec.DeviceID
	m.mu.Lock()
	m.setRecLocked(c, rec)
	c.phase = phDone
	m.stopParkLocked(c)
	if c.dl != nil {
		c.dl()
		c.dl = nil
	}
	delete(m.cmds, id)
	if key := rec.IdempotencyKey; key != "" {
		if e := m.idem[key]; e != nil && e.id == id {
			e.expires = time.UnixMilli(rec.UpdatedAt).Add(m.o.ResultTTL)
		}
	}
	if c.done != nil {
		close(c.done)
	}
	var kick []string
	if dev != "" {
		m.q.Done(dev, id)
		kick = append(kick, dev)
	}
	if slot {
		kick = append(kick, m.releaseLocked()...)
	}
	var (
		parent *cmd
		pnext  Record
	)
	if p := m.cmds[rec.ParentID]; rec.ParentID != "" && p != nil && p.phase == phParent {
		p.children.add(rec.State)
		if p.pending--; p.pending <= 0 {
			next, err := parentOutcome(p.rec, *p.children, m.o.Now().UnixMilli())
			if err != nil {
				m.log.Error("parent", "cmd", p.rec.CommandID, "err", err)
			} else {
				p.phase = phRunning
				parent, pnext = p, next
			}
		}
	}
	m.mu.Unlock()
	m.kick(kick...)
	if parent != nil {
		m.finish(parent, pnext, false)
	}
}

// broken handles a transition the table refuses (a bug): the command is left where it is, its device stays
// held, and the next start's Recover takes it from its last durable record.
func (m *Manager) broken(c *cmd, err error, slot bool) {
	m.log.Error("command left in place after an internal error", "cmd", c.rec.CommandID, "err", err)
	if !slot {
		return
	}
	m.mu.Lock()
	kick := m.releaseLocked()
	m.mu.Unlock()
	m.kick(kick...)
}

func (m *Manager) put(rec Record) error {
	b, err := encode(&rec)
	if err != nil {
		return err
	}
	return m.o.WAL.Put(m.ctx, rec.CommandID, b)
}

// persistRec encodes rec and writes it with write (the WAL's Put or Finish)
// until it lands; a record that does not encode breaks c. false: stop here.
func (m *Manager) persistRec(c *cmd, rec *Record, slot bool, what string, write func(ctx context.Context, id string, b []byte) error) bool {
	b, err := encode(rec)
	if err != nil {
		m.broken(c, err, slot)
		return false
	}
	return m.persist(what, rec.CommandID, func(ctx context.Context) error { return write(ctx, rec.CommandID, b) })
}

// persist retries a write that must land (a transition whose side effect has already happened), with
// backoff, until it does or the Manager closes (then it reports false and the WAL keeps the previous record).
func (m *Manager) persist(what, id string, write func(context.Context) error) bool {
	for n := 1; ; n++ {
		err := write(m.ctx)
		if err == nil {
			return true
		}
		if m.ctx.Err() != nil {
			return false
		}
		m.log.Warn("wal write failed; retrying", "op", what, "cmd", id, "attempt", n, "err", err)
		if !m.sleep(backoff(n, m.o.RetryBackoff, m.o.MaxBackoff, m.o.jitter)) {
			return false
		}
	}
}

// sleep waits d on the injected clock, or until Close.
func (m *Manager) sleep(d time.Duration) bool {
	ch := make(chan struct{})
	stop := m.o.AfterFunc(d, func() { close(ch) })
	select {
	case <-ch:
		return true
	case <-m.ctx.Done():
		stop()
		return false
	}
}

// attempt returns the context of one Send or Status call: cancelled by Close, or after CommandTimeout with
// cause ErrAttemptTimeout.
func (m *Manager) attempt() (context.Context, func()) {
	ctx, cancel := context.WithCancelCause(m.ctx)
	stop := m.o.AfterFunc(m.o.CommandTimeout, func() { cancel(ErrAttemptTimeout) })
	return ctx, func() {
		stop()
		cancel(context.Canceled)
	}
}

// backoffLocked returns c's next backoff and counts it.
func (m *Manager) backoffLocked(c *cmd) time.Duration {
	c.failures++
	return backoff(c.failures, m.o.RetryBackoff, m.o.MaxBackoff, m.o.jitter)
}
