// Package crash is a process-level crash test: it builds ork-node and
// ork-worker-sim, runs them on 127.0.0.1, SIGKILLs the node in the middle of
// a burst of commands and a Worker in the middle of a command, and checks the
// crash rules of DESIGN §6–§7: no accepted command is lost, none runs twice,
// a Worker crash never takes the kernel down and the Worker comes back alone.
package crash

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/client"
	"github.com/orknode/ork/internal/apifile"
	"github.com/orknode/ork/protocols/envelope"
)

var binDir string

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "ork-crash-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	cmd := exec.Command("go", "build", "-o", dir+"/", "../../cmd/ork-node", "../../cmd/ork-worker-sim", "./victim")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	start := time.Now()
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "built binaries in %.1f s\n", time.Since(start).Seconds())
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// ---- processes ----

type proc struct {
	name string
	cmd  *exec.Cmd
	out  string
	done chan struct{}
	err  error
}

func startProc(t *testing.T, dir, name string, args ...string) *proc {
	t.Helper()
	out := filepath.Join(dir, fmt.Sprintf("%s-%d.log", name, time.Now().UnixNano()))
	f, err := os.Create(out)
	require.NoError(t, err)
	bin := name
	if name == "ork-node-daemon" {
		bin = "ork-node"
	}
	cmd := exec.Command(filepath.Join(binDir, bin), args...)
	cmd.Stdout, cmd.Stderr = f, f
	require.NoError(t, cmd.Start(), name)
	f.Close()
	p := &proc{name: name, cmd: cmd, out: out, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.kill(syscall.SIGKILL)
		if t.Failed() {
			t.Logf("---- %s (pid %d) output tail ----\n%s", name, cmd.Process.Pid, tail(out, 40))
		}
	})
	return p
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill sends sig to this process (only the PID we started) and waits up to 20 s.
func (p *proc) kill(sig syscall.Signal) bool {
	if p.exited() {
		return true
	}
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
		return true
	case <-time.After(20 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
		return false
	}
}

func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func runOnce(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command(filepath.Join(binDir, "ork-node"), args...).CombinedOutput()
	require.NoError(t, err, "ork-node %v: %s", args, out)
}

// eventually polls cond every interval until it is true or the deadline passes.
func eventually(t *testing.T, d time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(d)
	last := ""
	for {
		ok, msg := cond()
		if ok {
			return
		}
		last = msg
		if time.Now().After(deadline) {
			require.FailNow(t, "timed out waiting for "+what, "after %v: %s", d, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ---- node ----

type node struct {
	t      *testing.T
	dir    string // test temp dir (logs)
	data   string
	daemon *proc
}

// freePort finds a free 127.0.0.1 TCP port (listen on :0, close, reuse the number).
func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// fixedListen is the node's listen address on a fixed port: a node restarted
// on a new port is not found again by the Workers (see the report), so the
// node restarts on the same port.
func fixedListen(t *testing.T) string { return fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", freePort(t)) }

func newNode(t *testing.T, listen string) *node {
	dir := t.TempDir()
	n := &node{t: t, dir: dir, data: filepath.Join(dir, "node")}
	runOnce(t, "init", "--data", n.data, "--loopback-only", "--listen", listen)
	return n
}

// start starts the daemon and waits for its api file (with its PID).
func (n *node) start() {
	t := n.t
	t.Helper()
	n.daemon = startProc(t, n.dir, "ork-node-daemon", "daemon", "--data", n.data)
	pid := n.daemon.pid()
	eventually(t, 30*time.Second, "node api file", func() (bool, string) {
		if n.daemon.exited() {
			require.FailNow(t, "daemon exited", "%v\n%s", n.daemon.err, tail(n.daemon.out, 30))
		}
		a, err := apifile.Read(n.data)
		if err != nil {
			return false, err.Error()
		}
		return a.PID == pid, fmt.Sprintf("api pid %d, want %d", a.PID, pid)
	})
}

func (n *node) dial() *client.Client {
	t := n.t
	t.Helper()
	a, err := apifile.Read(n.data)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, client.Options{KeyFile: filepath.Join(n.data, "client.key"), Kernel: a.Addrs})
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func listWorkers(c *client.Client) ([]envelope.WorkerInfo, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return c.ListWorkers(ctx)
}

// waitWorkers waits until want Workers (by id prefix, "" for all) are READY and HEALTHY.
func waitWorkers(t *testing.T, c *client.Client, d time.Duration, want int, prefix string) []envelope.WorkerInfo {
	t.Helper()
	var ws []envelope.WorkerInfo
	eventually(t, d, fmt.Sprintf("%d %q Workers READY+HEALTHY", want, prefix), func() (bool, string) {
		var err error
		ws, err = listWorkers(c)
		if err != nil {
			return false, err.Error()
		}
		ready, states := 0, []string{}
		for _, w := range ws {
			if !strings.HasPrefix(w.WorkerID, prefix) {
				continue
			}
			states = append(states, w.WorkerID+":"+w.State+"/"+w.HealthState)
			if w.State == envelope.WorkerReady && w.HealthState == envelope.HealthHealthy {
				ready++
			}
		}
		return ready >= want, strings.Join(states, " ")
	})
	return ws
}

func terminal(s string) bool {
	switch s {
	case "SUCCESS", "FAILED", "TIMEOUT", "CANCELLED":
		return true
	}
	return false
}

// waitTerminal polls CommandStatus for every id until all are terminal.
func waitTerminal(t *testing.T, c *client.Client, ids []string, d time.Duration) map[string]envelope.CommandStatus {
	t.Helper()
	got := map[string]envelope.CommandStatus{}
	eventually(t, d, "accepted commands terminal", func() (bool, string) {
		pending, lastErr := 0, ""
		for _, id := range ids {
			if s, ok := got[id]; ok && terminal(s.Status) {
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			s, err := c.CommandStatus(ctx, id)
			cancel()
			if err != nil {
				pending++
				lastErr = id + ": " + err.Error()
				continue
			}
			got[id] = s
			if !terminal(s.Status) {
				pending++
				lastErr = id + ": " + s.Status
			}
		}
		return pending == 0, fmt.Sprintf("%d of %d not terminal (e.g. %s)", pending, len(ids), lastErr)
	})
	return got
}

func readExecLog(t *testing.T, path string) map[string]int {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err, "exec log")
	m := map[string]int{}
	require.NoError(t, json.Unmarshal(b, &m))
	return m
}

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

	n := newNode(t, fixedListen(t))
	n.start()
	cl := n.dial()

	keys := filepath.Join(n.dir, "keys")
	execLog := filepath.Join(n.dir, "exec.json")
	simP := startProc(t, n.dir, "ork-worker-sim", "--workers", fmt.Sprint(simWorkers), "--devices", fmt.Sprint(simDevices),
		"--join", n.data, "--keys", keys, "--exec-log", execLog, "--seed", fmt.Sprint(seed))
	ws := waitWorkers(t, cl, 30*time.Second, simWorkers, "sim-")
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
		pid := n.daemon.pid()
		require.True(t, n.daemon.kill(syscall.SIGKILL))
		close(killed)
		down := time.Now()
		t.Logf("seed %d: SIGKILLed node pid %d at %d accepted", seed, pid, nAcc.Load())
		mu.Lock()
		old := cur
		cur = nil
		mu.Unlock()
		_ = old.Close()
		n.start()
		c := n.dial()
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
	st := waitTerminal(t, c, accepted, 60*time.Second)
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

	require.True(t, simP.kill(syscall.SIGINT), "sim did not stop on SIGINT")
	execs := readExecLog(t, execLog)
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
	n := newNode(t, "/ip4/127.0.0.1/tcp/0")
	n.start()
	cl := n.dial()
	simP := startProc(t, n.dir, "ork-worker-sim", "--workers", fmt.Sprint(simWorkers), "--devices", fmt.Sprint(simDevices),
		"--join", n.data, "--keys", filepath.Join(n.dir, "keys"), "--exec-log", filepath.Join(n.dir, "exec.json"))
	victimKey := filepath.Join(n.dir, "victim.key")
	victimArgs := []string{"--join", n.data, "--key", victimKey, "--devices", "2", "--id", "victim-0001"}
	victim := startProc(t, n.dir, "victim", victimArgs...)
	all := waitWorkers(t, cl, 30*time.Second, simWorkers, "sim-")
	waitWorkers(t, cl, 30*time.Second, 1, "victim-")
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
	eventually(t, 10*time.Second, "victim executing both reboots", func() (bool, string) {
		b, _ := os.ReadFile(victim.out)
		for _, id := range inflight {
			if !strings.Contains(string(b), "execute "+id) {
				return false, id + " not executing yet"
			}
		}
		return true, ""
	})
	require.True(t, victim.kill(syscall.SIGKILL))
	killedAt := time.Now()
	t.Logf("SIGKILLed victim pid %d mid-reboot (commands %v)", victim.pid(), inflight)

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
	for id, s := range waitTerminal(t, cl, others, 20*time.Second) {
		require.Equal(t, "SUCCESS", s.Status, "%s: %s", id, s.Error)
	}
	t.Logf("20 commands to the other Workers: all SUCCESS %.1f s after the kill", time.Since(killedAt).Seconds())

	// Health sees the victim go; then restart it with the same key.
	eventually(t, 20*time.Second, "victim not HEALTHY", func() (bool, string) {
		ws, err := listWorkers(cl)
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
	victim2 := startProc(t, n.dir, "victim", victimArgs...)
	restartedAt := time.Now()

	// The victim's journal (a state dir next to its key) shows both reboots
	// started and never finished: the restarted Worker answers them FAILED
	// with ERR_WORKER_RESTARTED, so the kernel ends them instead of resending.
	st := waitTerminal(t, cl, inflight, 40*time.Second)
	for _, id := range inflight {
		s := st[id]
		t.Logf("in-flight %s on %s ended %s err=%q retries=%d attempts=%d, %.1f s after the kill", id, s.DeviceID, s.Status, s.Error, s.Retries, s.Attempts,
			float64(s.UpdatedAt-killedAt.UnixMilli())/1000)
		require.Equal(t, "FAILED", s.Status, "%s: %s", id, s.Error)
		require.True(t, strings.HasPrefix(s.Error, "ERR_WORKER_RESTARTED: reboot was running when the worker stopped"), "%s: %s", id, s.Error)
	}

	waitWorkers(t, cl, 60*time.Second, 1, "victim-")
	t.Logf("victim HEALTHY again %.1f s after its restart; test %.1f s", time.Since(restartedAt).Seconds(), time.Since(start).Seconds())

	require.True(t, victim2.kill(syscall.SIGINT))
	b1, err := os.ReadFile(victim.out)
	require.NoError(t, err)
	b2, err := os.ReadFile(victim2.out)
	require.NoError(t, err)
	t.Logf("restarted victim executed: %d", strings.Count(string(b2), "execute "))
	for _, id := range inflight {
		require.Equal(t, 1, strings.Count(string(b1), "execute "+id+"\n"), "%s before the kill", id)
		require.Zero(t, strings.Count(string(b2), "execute "+id+"\n"), "%s ran again after the restart", id)
	}
	require.True(t, simP.kill(syscall.SIGINT))
	execs := readExecLog(t, filepath.Join(n.dir, "exec.json"))
	for id, k := range execs {
		require.LessOrEqual(t, k, 1, "%s executed %d times", id, k)
	}
}
