// Package crash is a process-level crash test: it builds ork-node and
// ork-worker-sim, runs them on 127.0.0.1, SIGKILLs the node in the middle of
// a burst of commands and a Worker in the middle of a command, and checks the
// crash rules of DESIGN §6–§7: no accepted command is lost, none runs twice,
// a Worker crash never takes the kernel down and the Worker comes back alone.
package crash

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
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

func TestMain(m *testing.M) { procs.Main(m, "./victim") }

// ---- test 1: the node is SIGKILLed during a burst of commands ----

const (
	simWorkers = 10
	simDevices = 4
	total      = 200
	conc       = 16
)

func TestNodeKilledDuringSubmission(t *testing.T) {
	if testing.Short() {
		t.Skip("crash test: processes and seconds")
	}
	for _, seed := range []uint64{1, 2, 3} {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) { nodeKill(t, seed) })
	}
}

// listenAddr is the node's listen address. The node restarts on the same
// address when sameAddrOnRestart (see the report in nodeKill).
func nodeKill(t *testing.T, seed uint64) {
	start := time.Now()
	rng := rand.New(rand.NewPCG(seed, 0xC0FFEE))
	killAt := int64(20 + rng.IntN(140)) // accepted commands before the SIGKILL

	// A fixed port: a node restarted on a new port is not found again by
	// the Workers (see the report), so the node restarts on the same port.
	n := procs.NewNode(t, procs.FixedListen(t))
	n.Start()
	cl := n.Dial()

	keys := filepath.Join(n.Dir, "keys")
	execLog := filepath.Join(n.Dir, "exec.json")
	simP := procs.Start(t, n.Dir, "ork-worker-sim", "--workers", fmt.Sprint(simWorkers), "--devices", fmt.Sprint(simDevices),
		"--join", n.Data, "--keys", keys, "--exec-log", execLog, "--seed", fmt.Sprint(seed))
	ws := procs.WaitWorkers(t, cl, 30*time.Second, simWorkers, "sim-")
	var devices []string
	for _, w := range ws {
		devices = append(devices, w.DeviceIDs...)
	}
	require.Len(t, devices, simWorkers*simDevices)
	t.Logf("seed %d: %d Workers READY in %.1f s; SIGKILL after %d accepted", seed, len(ws), time.Since(start).Seconds(), killAt)

	var (
		mu       sync.Mutex
		cur      = cl
		accepted []string
		slots    atomic.Int64 // accepted + in flight, ≤ total
		nAcc     atomic.Int64
		next     atomic.Int64
		rejects  atomic.Int64
		sendErrs atomic.Int64
		killOnce sync.Once
		killed   = make(chan struct{})
		restart  = make(chan struct{})
		downFor  time.Duration
	)
	getClient := func() *client.Client { mu.Lock(); defer mu.Unlock(); return cur }
	crash := func() {
		pid := n.Daemon.PID()
		require.True(t, n.Daemon.Stop(syscall.SIGKILL))
		close(killed)
		down := time.Now()
		t.Logf("seed %d: SIGKILLed node pid %d at %d accepted", seed, pid, nAcc.Load())
		mu.Lock()
		old := cur
		cur = nil
		mu.Unlock()
		_ = old.Close()
		n.Start()
		c := n.Dial()
		mu.Lock()
		cur = c
		mu.Unlock()
		downFor = time.Since(down)
		close(restart)
	}

	subStart := time.Now()
	var wg sync.WaitGroup
	for range conc {
		wg.Go(func() {
			for {
				if slots.Add(1) > total {
					slots.Add(-1)
					return
				}
				for {
					c := getClient()
					if c == nil {
						time.Sleep(50 * time.Millisecond) // node down: keep trying
						continue
					}
					i := next.Add(1)
					dev := devices[int(i)%len(devices)]
					watts := 1000 + (i*37)%4000
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					acc, err := c.SendCommand(ctx, dev, envelope.CommandRequest{Command: "setPowerLimit", Params: map[string]any{"watts": watts}})
					cancel()
					if err == nil && acc.CommandID != "" && acc.Status != "REJECTED" {
						mu.Lock()
						accepted = append(accepted, acc.CommandID)
						mu.Unlock()
						if nAcc.Add(1) == killAt {
							killOnce.Do(func() { go crash() })
						}
						break
					}
					if err == nil {
						rejects.Add(1)
						t.Logf("rejected: %+v", acc)
					} else {
						sendErrs.Add(1)
					}
					time.Sleep(20 * time.Millisecond)
				}
			}
		})
	}
	wg.Wait()
	select {
	case <-restart:
	case <-time.After(60 * time.Second):
		require.FailNow(t, "node restart did not finish")
	}
	require.Len(t, accepted, total)
	t.Logf("seed %d: %d accepted in %.1f s (%d send errors while down, %d rejected), node down %.1f s",
		seed, len(accepted), time.Since(subStart).Seconds(), sendErrs.Load(), rejects.Load(), downFor.Seconds())

	c := getClient()
	waitStart := time.Now()
	st := procs.WaitTerminal(t, c, accepted, 60*time.Second)
	counts := map[string]int{}
	var notOK []string
	for _, id := range accepted {
		s := st[id]
		counts[s.Status]++
		if s.Status != "SUCCESS" {
			notOK = append(notOK, fmt.Sprintf("%s %s %s err=%s retries=%d attempts=%d", id, s.DeviceID, s.Status, s.Error, s.Retries, s.Attempts))
		}
	}
	t.Logf("seed %d: all %d accepted commands terminal after %.1f s: %v", seed, len(accepted), time.Since(waitStart).Seconds(), counts)
	for _, l := range notOK {
		t.Logf("  not SUCCESS: %s", l)
	}

	require.True(t, simP.Stop(syscall.SIGINT), "sim did not stop on SIGINT")
	execs := procs.ReadExecLog(t, execLog)
	var dups []string
	for id, k := range execs {
		if k > 1 {
			dups = append(dups, fmt.Sprintf("%s×%d", id, k))
		}
	}
	for _, id := range accepted {
		if st[id].Status == "SUCCESS" && execs[id] != 1 {
			dups = append(dups, fmt.Sprintf("SUCCESS %s executed %d times", id, execs[id]))
		}
	}
	t.Logf("seed %d: exec log: %d distinct command ids; total %.1f s", seed, len(execs), time.Since(start).Seconds())
	require.Empty(t, dups, "commands executed more than once (or SUCCESS without exactly one execution)")
	require.Equal(t, total, counts["SUCCESS"], "non-SUCCESS: %v", notOK)
	_ = killed
}

// ---- test 2: a Worker is SIGKILLed mid-command ----

func TestWorkerKilledMidCommand(t *testing.T) {
	if testing.Short() {
		t.Skip("crash test: processes and seconds")
	}
	start := time.Now()
	n := procs.NewNode(t, "/ip4/127.0.0.1/tcp/0")
	n.Start()
	cl := n.Dial()
	simP := procs.Start(t, n.Dir, "ork-worker-sim", "--workers", fmt.Sprint(simWorkers), "--devices", fmt.Sprint(simDevices),
		"--join", n.Data, "--keys", filepath.Join(n.Dir, "keys"), "--exec-log", filepath.Join(n.Dir, "exec.json"))
	victimKey := filepath.Join(n.Dir, "victim.key")
	victimArgs := []string{"--join", n.Data, "--key", victimKey, "--devices", "2", "--id", "victim-0001"}
	victim := procs.Start(t, n.Dir, "victim", victimArgs...)
	all := procs.WaitWorkers(t, cl, 30*time.Second, simWorkers, "sim-")
	procs.WaitWorkers(t, cl, 30*time.Second, 1, "victim-")
	var ws []envelope.WorkerInfo // the other 10 Workers only
	for _, w := range all {
		if strings.HasPrefix(w.WorkerID, "sim-") {
			ws = append(ws, w)
		}
	}
	t.Logf("11 Workers READY in %.1f s", time.Since(start).Seconds())

	// Two slow commands on the victim (a reboot takes 5 s), 20 s deadline each.
	var inflight []string
	for _, dev := range []string{"victim-0001-d01", "victim-0001-d02"} {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		acc, err := cl.SendCommand(ctx, dev, envelope.CommandRequest{Command: "reboot", TimeoutMs: 20000})
		cancel()
		require.NoError(t, err)
		inflight = append(inflight, acc.CommandID)
	}
	procs.Eventually(t, 10*time.Second, "victim executing both reboots", func() (bool, string) {
		b, _ := os.ReadFile(victim.Log)
		for _, id := range inflight {
			if !strings.Contains(string(b), "execute "+id) {
				return false, id + " not executing yet"
			}
		}
		return true, ""
	})
	require.True(t, victim.Stop(syscall.SIGKILL))
	killedAt := time.Now()
	t.Logf("SIGKILLed victim pid %d mid-reboot (commands %v)", victim.PID(), inflight)

	// The kernel keeps serving the other 10 Workers.
	var others []string
	for i := range 20 {
		w := ws[i%len(ws)]
		dev := w.DeviceIDs[i%len(w.DeviceIDs)]
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		acc, err := cl.SendCommand(ctx, dev, envelope.CommandRequest{Command: "setPowerLimit", Params: map[string]any{"watts": 1500 + 10*i}})
		cancel()
		require.NoError(t, err)
		others = append(others, acc.CommandID)
	}
	for id, s := range procs.WaitTerminal(t, cl, others, 20*time.Second) {
		require.Equal(t, "SUCCESS", s.Status, "%s: %s", id, s.Error)
	}
	t.Logf("20 commands to the other Workers: all SUCCESS %.1f s after the kill", time.Since(killedAt).Seconds())

	// Health sees the victim go; then restart it with the same key.
	procs.Eventually(t, 20*time.Second, "victim not HEALTHY", func() (bool, string) {
		ws, err := procs.ListWorkers(cl)
		if err != nil {
			return false, err.Error()
		}
		for _, w := range ws {
			if w.WorkerID == "victim-0001" {
				return w.HealthState != envelope.HealthHealthy, w.State + "/" + w.HealthState
			}
		}
		return false, "victim not listed"
	})
	victim2 := procs.Start(t, n.Dir, "victim", victimArgs...)
	restartedAt := time.Now()

	// The victim's journal (a state dir next to its key) shows both reboots
	// started and never finished: the restarted Worker answers them FAILED
	// with ERR_WORKER_RESTARTED, so the kernel ends them instead of resending.
	st := procs.WaitTerminal(t, cl, inflight, 40*time.Second)
	for _, id := range inflight {
		s := st[id]
		t.Logf("in-flight %s on %s ended %s err=%q retries=%d attempts=%d, %.1f s after the kill", id, s.DeviceID, s.Status, s.Error, s.Retries, s.Attempts,
			float64(s.UpdatedAt-killedAt.UnixMilli())/1000)
		require.Equal(t, "FAILED", s.Status, "%s: %s", id, s.Error)
		require.True(t, strings.HasPrefix(s.Error, "ERR_WORKER_RESTARTED: reboot was running when the worker stopped"), "%s: %s", id, s.Error)
	}

	procs.WaitWorkers(t, cl, 60*time.Second, 1, "victim-")
	t.Logf("victim HEALTHY again %.1f s after its restart; test %.1f s", time.Since(restartedAt).Seconds(), time.Since(start).Seconds())

	require.True(t, victim2.Stop(syscall.SIGINT))
	b1, err := os.ReadFile(victim.Log)
	require.NoError(t, err)
	b2, err := os.ReadFile(victim2.Log)
	require.NoError(t, err)
	t.Logf("restarted victim executed: %d", strings.Count(string(b2), "execute "))
	for _, id := range inflight {
		require.Equal(t, 1, strings.Count(string(b1), "execute "+id+"\n"), "%s before the kill", id)
		require.Zero(t, strings.Count(string(b2), "execute "+id+"\n"), "%s ran again after the restart", id)
	}
	require.True(t, simP.Stop(syscall.SIGINT))
	execs := procs.ReadExecLog(t, filepath.Join(n.Dir, "exec.json"))
	for id, k := range execs {
		require.LessOrEqual(t, k, 1, "%s executed %d times", id, k)
	}
}
