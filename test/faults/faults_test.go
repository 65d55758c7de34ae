// Package faults is a process-level fault-injection test: it builds ork-node
// and ork-worker-sim, runs them on 127.0.0.1 with the simulator's fault flags
// (--error-rate, --flap, --hang-rate), and checks DESIGN §6 and §8: every
// accepted command ends, a Worker's failure is final and never retried, no
// command runs twice, and health only takes the legal transitions
// (UNKNOWN → HEALTHY|SICK, HEALTHY → SICK, SICK → HEALTHY|DEAD, DEAD → HEALTHY),
// with flapping Workers coming back HEALTHY on their own.
package faults

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/client"
	"github.com/orknode/ork/internal/testutil/procs"
	"github.com/orknode/ork/protocols/envelope"
)

func TestMain(m *testing.M) { procs.Main(m) }

// newNode inits a node on a fixed free port and applies edit to its config.json.
func newNode(t *testing.T, edit func(cfg map[string]any)) *procs.Node {
	n := procs.NewNode(t, procs.FixedListen(t))
	if edit != nil {
		path := filepath.Join(n.Data, "config.json")
		b, err := os.ReadFile(path)
		require.NoError(t, err)
		cfg := map[string]any{}
		require.NoError(t, json.Unmarshal(b, &cfg))
		edit(cfg)
		b, err = json.MarshalIndent(cfg, "", "  ")
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(path, b, 0o600))
	}
	return n
}

// fastHealth pings every 200 ms with a 300 ms timeout instead of every 5 s
// with 3 s, so that a Worker down for a few hundred milliseconds is seen SICK,
// and DEAD when it stays down for three pings. (A ping to a Worker whose host
// is gone does not fail fast: the QUIC dial waits for its timeout. With the
// default 3 s timeout, a Worker down for less than that is back before its
// ping fails, and SICK lasts a millisecond: the immediate re-ping succeeds.)
func fastHealth(cfg map[string]any) {
	c := cfg["cadences"].(map[string]any)
	c["healthPingMs"] = 200
	c["healthTimeoutMs"] = 300
}

// ---- load ----

// submit sends total fast commands (setPowerLimit / setLed, alternating) over
// devices at concurrency conc, each with a deadline, and returns the accepted
// ids. A send error or rejection is retried after a short pause (a new
// command, so nothing is counted twice) and counted.
func submit(t *testing.T, c *client.Client, devices []string, total, conc int, deadline, pace time.Duration) (accepted []string, rejects, sendErrs int64) {
	t.Helper()
	var (
		mu           sync.Mutex
		slots, next  atomic.Int64
		nRej, nErr   atomic.Int64
		firstRejects []string
	)
	var wg sync.WaitGroup
	for range conc {
		wg.Go(func() {
			for slots.Add(1) <= int64(total) {
				for tries := 0; ; tries++ {
					i := next.Add(1)
					dev := devices[int(i)%len(devices)]
					req := envelope.CommandRequest{Command: "setPowerLimit", Params: map[string]any{"watts": 1000 + (i*37)%4000}, TimeoutMs: deadline.Milliseconds()}
					if i%2 == 0 {
						req = envelope.CommandRequest{Command: "setLed", Params: map[string]any{"on": i%4 == 0}, TimeoutMs: deadline.Milliseconds()}
					}
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					acc, err := c.SendCommand(ctx, dev, req)
					cancel()
					if err == nil && acc.CommandID != "" && acc.Status != "REJECTED" {
						mu.Lock()
						accepted = append(accepted, acc.CommandID)
						mu.Unlock()
						time.Sleep(pace)
						break
					}
					mu.Lock()
					if err == nil {
						nRej.Add(1)
						if len(firstRejects) < 5 {
							firstRejects = append(firstRejects, fmt.Sprintf("%s %s: %s", dev, acc.Status, acc.Error))
						}
					} else {
						nErr.Add(1)
						if len(firstRejects) < 5 {
							firstRejects = append(firstRejects, fmt.Sprintf("%s: %v", dev, err))
						}
					}
					mu.Unlock()
					if tries > 50 {
						return // give up on this slot; the count check below reports it
					}
					time.Sleep(50 * time.Millisecond)
				}
			}
		})
	}
	wg.Wait()
	for _, r := range firstRejects {
		t.Logf("  refused at submission: %s", r)
	}
	return accepted, nRej.Load(), nErr.Load()
}

// ---- health observation ----

// healthWatch polls worker.list and keeps, per Worker, the sequence of
// distinct health states it was seen in (and the times it was seen).
type healthWatch struct {
	mu    sync.Mutex
	seq   map[string][]string // health states
	full  map[string][]string // lifecycle/health, for the log
	at    map[string][]time.Time
	polls int
	errs  int
	stop  chan struct{}
	done  chan struct{}
}

func watchHealth(c *client.Client, every time.Duration) *healthWatch {
	h := &healthWatch{seq: map[string][]string{}, full: map[string][]string{}, at: map[string][]time.Time{}, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(h.done)
		tk := time.NewTicker(every)
		defer tk.Stop()
		for {
			ws, err := procs.ListWorkers(c)
			now := time.Now()
			h.mu.Lock()
			h.polls++
			if err != nil {
				h.errs++
			}
			for _, w := range ws {
				s := h.seq[w.WorkerID]
				if len(s) == 0 || s[len(s)-1] != w.HealthState {
					h.seq[w.WorkerID] = append(s, w.HealthState)
					h.at[w.WorkerID] = append(h.at[w.WorkerID], now)
				}
				f, sh := h.full[w.WorkerID], w.State+"/"+w.HealthState
				if len(f) == 0 || f[len(f)-1] != sh {
					h.full[w.WorkerID] = append(f, sh)
				}
			}
			h.mu.Unlock()
			select {
			case <-h.stop:
				return
			case <-tk.C:
			}
		}
	}()
	return h
}

func (h *healthWatch) close() {
	select {
	case <-h.stop:
	default:
		close(h.stop)
	}
	<-h.done
}

func (h *healthWatch) snapshot() map[string][]string {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make(map[string][]string, len(h.seq))
	for k, v := range h.seq {
		out[k] = slices.Clone(v)
	}
	return out
}

// observable are the health changes a poller may see (DESIGN §8): the declared
// ones, plus those that skip states a poll can miss — SICK between HEALTHY (or
// UNKNOWN) and DEAD, and SICK (or SICK → DEAD) between HEALTHY and HEALTHY.
// HEALTHY → HEALTHY via a missed SICK never shows. Never DEAD → SICK, never
// back to UNKNOWN.
var observable = map[string][]string{
	envelope.HealthUnknown: {envelope.HealthHealthy, envelope.HealthSick, envelope.HealthDead},
	envelope.HealthHealthy: {envelope.HealthSick, envelope.HealthDead},
	envelope.HealthSick:    {envelope.HealthHealthy, envelope.HealthDead},
	envelope.HealthDead:    {envelope.HealthHealthy},
}

// illegal returns every observed change that no legal path explains.
func illegal(seqs map[string][]string) []string {
	var bad []string
	for w, s := range seqs {
		for i := 1; i < len(s); i++ {
			if !slices.Contains(observable[s[i-1]], s[i]) {
				bad = append(bad, fmt.Sprintf("%s: %s → %s in %v", w, s[i-1], s[i], s))
			}
		}
	}
	sort.Strings(bad)
	return bad
}

// recovered returns the Workers seen leaving HEALTHY and coming back to it.
func recovered(seqs map[string][]string) map[string]int {
	out := map[string]int{}
	for w, s := range seqs {
		left := false
		for i := 1; i < len(s); i++ {
			switch {
			case s[i-1] == envelope.HealthHealthy && s[i] != envelope.HealthHealthy:
				left = true
			case left && s[i] == envelope.HealthHealthy:
				out[w]++
				left = false
			}
		}
	}
	return out
}

func devicesOf(ws []envelope.WorkerInfo) []string {
	var devs []string
	for _, w := range ws {
		devs = append(devs, w.DeviceIDs...)
	}
	sort.Strings(devs)
	return devs
}

func noDuplicates(t *testing.T, execs map[string]int) {
	t.Helper()
	var dups []string
	for id, k := range execs {
		if k > 1 {
			dups = append(dups, fmt.Sprintf("%s×%d", id, k))
		}
	}
	require.Empty(t, dups, "commands executed more than once")
}

// ---- test 1: error rate and flapping Workers ----

const (
	workers    = 10
	devices    = 4
	maxRetries = 3 // the config default: a command is sent at most 1+3 times
)

func TestErrorRateAndFlap(t *testing.T) {
	if testing.Short() {
		t.Skip("fault test: processes and seconds")
	}
	const (
		total     = 300
		conc      = 8
		deadline  = 20 * time.Second
		timeScale = "0.1"                  // flap: up 2–12 s, down 0.1–1 s; setPowerLimit 50 ms, setLed 5 ms
		pace      = 250 * time.Millisecond // per sender: 300 commands over ~10 s, across flaps
	)
	start := time.Now()
	n := newNode(t, fastHealth)
	n.Start()
	cl := n.Dial()

	keys := filepath.Join(n.Dir, "keys")
	execLog := filepath.Join(n.Dir, "exec-flap.json")
	simArgs := []string{"--workers", fmt.Sprint(workers), "--devices", fmt.Sprint(devices), "--join", n.Data,
		"--keys", keys, "--time-scale", timeScale, "--seed", "7"}
	sim := procs.Start(t, n.Dir, "ork-worker-sim", append(slices.Clone(simArgs), "--error-rate", "0.2", "--flap", "--exec-log", execLog)...)
	// Flapping starts 2–12 s after each Worker starts: wait for all of them
	// READY+HEALTHY once (a Worker may already be flapping, hence the margin).
	ws := procs.WaitWorkers(t, cl, 30*time.Second, workers, "")
	devs := devicesOf(ws)
	require.Len(t, devs, workers*devices)
	t.Logf("%d Workers READY+HEALTHY in %.1f s", len(ws), time.Since(start).Seconds())

	hw := watchHealth(cl, 100*time.Millisecond)
	defer hw.close()

	subStart := time.Now()
	accepted, rejects, sendErrs := submit(t, cl, devs, total, conc, deadline, pace)
	t.Logf("%d of %d accepted in %.1f s (%d rejected, %d send errors, retried)", len(accepted), total, time.Since(subStart).Seconds(), rejects, sendErrs)
	require.Len(t, accepted, total, "every submission slot accepted")

	st := procs.WaitTerminal(t, cl, accepted, deadline+20*time.Second)
	t.Logf("all %d accepted commands terminal %.1f s after submission began", len(accepted), time.Since(subStart).Seconds())

	// Keep the load and the flapping going long enough for several flaps
	// per Worker to be seen, whatever the submission took.
	var flapRecovered map[string]int
	procs.Eventually(t, 30*time.Second, "3 Workers leaving HEALTHY and coming back while flapping", func() (bool, string) {
		flapRecovered = recovered(hw.snapshot())
		return len(flapRecovered) >= 3, fmt.Sprintf("recovered: %v", flapRecovered)
	})
	t.Logf("while flapping, Workers seen leaving HEALTHY and coming back on their own: %v", flapRecovered)

	require.True(t, sim.Stop(syscall.SIGINT), "sim did not stop on SIGINT")
	execs := procs.ReadExecLog(t, execLog)

	counts := map[string]int{}
	var simFaults, simFaultResent, other []string
	for _, id := range accepted {
		s := st[id]
		key := s.Status
		isSimFault := strings.Contains(s.Error, "ERR_SIM_FAULT")
		if isSimFault {
			key += "/ERR_SIM_FAULT"
		}
		counts[key]++
		line := fmt.Sprintf("%s %s %s %s err=%q retries=%d attempts=%d execs=%d", id, s.DeviceID, s.Command, s.Status, s.Error, s.Retries, s.Attempts, execs[id])
		switch {
		case isSimFault:
			simFaults = append(simFaults, line)
			// A Worker's failure is final (DESIGN §6): FAILED, run exactly
			// once, never resent. Attempts > 1 is only legal when earlier
			// sends never reached the Worker (a retry spent for each).
			require.Equal(t, "FAILED", s.Status, line)
			require.True(t, strings.HasPrefix(s.Error, "ERR_SIM_FAULT: injected failure on "+s.DeviceID), line)
			require.Equal(t, 1, execs[id], "worker-reported failure executed != 1 times: %s", line)
			require.Equal(t, maxRetries-(s.Attempts-1), s.Retries, "attempts and retries disagree: %s", line)
			if s.Attempts != 1 {
				simFaultResent = append(simFaultResent, line)
			}
		case s.Status == "SUCCESS":
			require.Equal(t, 1, execs[id], "SUCCESS without exactly one execution: %s", line)
		default:
			// A flap stops a Worker's host with a command running: the SDK
			// ends it FAILED (ERR_INTERNAL, shut down while it ran), which the
			// Worker reports when asked; final, run once, never resent.
			require.Equal(t, "FAILED", s.Status, line)
			require.True(t, strings.HasPrefix(s.Error, "ERR_INTERNAL: worker shut down while the command ran"), line)
			require.Equal(t, 1, execs[id], line)
			require.Equal(t, maxRetries-(s.Attempts-1), s.Retries, "attempts and retries disagree: %s", line)
			other = append(other, line)
		}
	}
	t.Logf("outcomes: %v (exec log: %d distinct ids)", counts, len(execs))
	for _, l := range simFaultResent {
		t.Logf("  sim fault after undelivered sends: %s", l)
	}
	for _, l := range other {
		t.Logf("  other: %s", l)
	}
	noDuplicates(t, execs)
	// 20 % of executions fail: expect roughly 60 of 300, with a wide margin.
	require.GreaterOrEqual(t, len(simFaults), total/20, "too few injected failures surfaced")
	require.LessOrEqual(t, len(simFaults), total*2/5, "too many injected failures")
	require.Empty(t, simFaultResent, "worker-reported failures with attempts != 1")

	// The kernel sees the stopped fleet go: HEALTHY → SICK → DEAD.
	stopAt := time.Now()
	procs.Eventually(t, 15*time.Second, "every Worker DEAD after the sim stopped", func() (bool, string) {
		ws, err := procs.ListWorkers(cl)
		if err != nil {
			return false, err.Error()
		}
		dead, states := 0, []string{}
		for _, w := range ws {
			states = append(states, w.WorkerID+":"+w.HealthState)
			if w.HealthState == envelope.HealthDead {
				dead++
			}
		}
		return dead == workers, strings.Join(states, " ")
	})
	t.Logf("sim stopped (SIGINT): all %d Workers DEAD %.1f s later", workers, time.Since(stopAt).Seconds())

	// Flapping never settles, so restart the fleet without --flap (same
	// keys, same peer IDs): every Worker must come back HEALTHY on its own,
	// with no operator action, and take commands again.
	restartAt := time.Now()
	settledLog := filepath.Join(n.Dir, "exec-settled.json")
	sim2 := procs.Start(t, n.Dir, "ork-worker-sim", append(slices.Clone(simArgs), "--exec-log", settledLog)...)
	procs.Eventually(t, 30*time.Second, "every Worker seen HEALTHY again", func() (bool, string) {
		seqs, back := hw.snapshot(), 0
		for _, s := range seqs {
			if s[len(s)-1] == envelope.HealthHealthy {
				back++
			}
		}
		return back == workers, fmt.Sprintf("%d of %d HEALTHY: %v", back, workers, seqs)
	})
	final := procs.WaitWorkers(t, cl, 10*time.Second, workers, "")
	t.Logf("fleet restarted without --flap: all %d Workers READY+HEALTHY %.1f s later", len(final), time.Since(restartAt).Seconds())
	hw.close()
	var again []string
	for _, d := range devs {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		acc, err := cl.SendCommand(ctx, d, envelope.CommandRequest{Command: "setLed", Params: map[string]any{"on": true}, TimeoutMs: deadline.Milliseconds()})
		cancel()
		require.NoError(t, err, d)
		again = append(again, acc.CommandID)
	}
	for id, s := range procs.WaitTerminal(t, cl, again, 20*time.Second) {
		require.Equal(t, "SUCCESS", s.Status, "%s on %s after the restart: %s", id, s.DeviceID, s.Error)
	}

	seqs := hw.snapshot()
	rec := recovered(seqs)
	var ids []string
	for w := range seqs {
		ids = append(ids, w)
	}
	sort.Strings(ids)
	hw.mu.Lock()
	full := hw.full
	hw.mu.Unlock()
	for _, w := range ids {
		s := full[w]
		if len(s) > 12 {
			s = append(append(slices.Clone(s[:6]), "…"), s[len(s)-5:]...)
		}
		t.Logf("  %s (%d health changes, recovered %d×): %s", w, len(seqs[w])-1, rec[w], strings.Join(s, " → "))
	}
	hw.mu.Lock()
	t.Logf("health polls: %d (%d errors)", hw.polls, hw.errs)
	hw.mu.Unlock()
	require.Empty(t, illegal(seqs), "illegal health transitions")
	require.NotEmpty(t, rec, "no flapping Worker seen leaving HEALTHY and coming back")
	require.Len(t, seqs, workers, "Workers seen")
	for _, w := range final {
		require.Equal(t, envelope.HealthHealthy, w.HealthState, w.WorkerID)
	}
	require.True(t, sim2.Stop(syscall.SIGINT))
	settled := procs.ReadExecLog(t, settledLog)
	noDuplicates(t, settled)
	require.Len(t, settled, len(again), "the settled fleet ran exactly the %d new commands", len(again))
	t.Logf("total %.1f s", time.Since(start).Seconds())
}

// ---- test 2: hanging commands ----

// TestHangRate runs --hang-rate 0.1 twice: once with the hang bounded by the
// Worker (its --command-timeout, well inside the kernel's per-attempt
// timeout: the Worker reports FAILED ERR_COMMAND_EXPIRED), once with the
// kernel's per-attempt timeout (commands.timeoutMs) shorter than the Worker's
// bound: the kernel sends its budget with the command (timeoutMs, a little
// under its own wait), so the Worker still ends the hang itself and reports
// it; should no answer come, the outcome is unknown, never resent blindly:
// the kernel asks the Worker (command.status), or ends TIMEOUT at the deadline.
func TestHangRate(t *testing.T) {
	if testing.Short() {
		t.Skip("fault test: processes and seconds")
	}
	t.Run("worker-bound", func(t *testing.T) {
		hang(t, 0, 500*time.Millisecond, 20*time.Second)
	})
	t.Run("kernel-attempt-timeout", func(t *testing.T) {
		hang(t, 500*time.Millisecond, 2*time.Second, 20*time.Second)
	})
}

// hang: attempt is the kernel's commands.timeoutMs (0: the default 30 s),
// simLimit the sim's --command-timeout, deadline each command's TimeoutMs.
func hang(t *testing.T, attempt, simLimit, deadline time.Duration) {
	const (
		total = 120
		conc  = 8
	)
	start := time.Now()
	n := newNode(t, func(cfg map[string]any) {
		if attempt > 0 {
			cfg["commands"].(map[string]any)["timeoutMs"] = attempt.Milliseconds()
		}
	})
	n.Start()
	cl := n.Dial()
	execLog := filepath.Join(n.Dir, "exec-hang.json")
	sim := procs.Start(t, n.Dir, "ork-worker-sim", "--workers", fmt.Sprint(workers), "--devices", fmt.Sprint(devices), "--join", n.Data,
		"--keys", filepath.Join(n.Dir, "keys"), "--time-scale", "0.01", "--seed", "11",
		"--hang-rate", "0.1", "--command-timeout", simLimit.String(), "--exec-log", execLog)
	ws := procs.WaitWorkers(t, cl, 30*time.Second, workers, "")
	devs := devicesOf(ws)

	subStart := time.Now()
	accepted, rejects, sendErrs := submit(t, cl, devs, total, conc, deadline, 0)
	require.Len(t, accepted, total)
	st := procs.WaitTerminal(t, cl, accepted, deadline+20*time.Second)
	t.Logf("%d accepted (%d rejected, %d send errors), all terminal %.1f s after submission began",
		len(accepted), rejects, sendErrs, time.Since(subStart).Seconds())

	require.True(t, sim.Stop(syscall.SIGINT))
	execs := procs.ReadExecLog(t, execLog)
	counts := map[string]int{}
	hung := 0
	var longest time.Duration
	for _, id := range accepted {
		s := st[id]
		line := fmt.Sprintf("%s %s %s %s err=%q retries=%d attempts=%d execs=%d", id, s.DeviceID, s.Command, s.Status, s.Error, s.Retries, s.Attempts, execs[id])
		code, _, _ := strings.Cut(s.Error, ":")
		counts[s.Status+" "+code]++
		took := time.Duration(s.UpdatedAt-s.CreatedAt) * time.Millisecond
		longest = max(longest, took)
		// Every command reached its Worker and ran exactly once; a hang is
		// never resent (it was delivered: the kernel asks, it does not resend).
		require.Equal(t, 1, execs[id], line)
		require.Equal(t, 1, s.Attempts, line)
		require.LessOrEqual(t, took, deadline+2*time.Second, "ended past its deadline: %s", line)
		switch s.Status {
		case "SUCCESS":
		case "FAILED":
			// The Worker's bound on the hung handler — its own limit, or the
			// shorter budget the kernel sends with each attempt (timeoutMs)
			// — reported by the Worker (in the result, or in its
			// command.status answer).
			require.True(t, strings.HasPrefix(s.Error, envelope.CodeCommandExpired+": no result within "), line)
			hung++
		case "TIMEOUT":
			require.True(t, strings.HasPrefix(s.Error, envelope.CodeCommandOutcomeUnknown), line)
			hung++
		default:
			require.Fail(t, "unexpected end", line)
		}
	}
	t.Logf("outcomes: %v; slowest %.1f s; exec log %d distinct ids; total %.1f s", counts, longest.Seconds(), len(execs), time.Since(start).Seconds())
	noDuplicates(t, execs)
	require.Positive(t, hung, "no hung command seen at --hang-rate 0.1")
	require.Less(t, hung, total/3)
}
