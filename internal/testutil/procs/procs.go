// Package procs is the harness of the process-level tests (test/...): it
// builds ork-node and ork-worker-sim once per test binary (Main), starts
// them with their output in the test's temp dir (Start, Node), and waits,
// by bounded polling, for what the tests need: the node's api file, READY
// Workers, terminal commands (Eventually, WaitWorkers, WaitTerminal). It
// stops only the processes it started, by PID, and prints the tail of their
// output when a test fails. The processes themselves are run by
// internal/testutil/proc, shared with the benchmarks.
package procs

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/client"
	"github.com/orknode/ork/internal/apifile"
	"github.com/orknode/ork/internal/testutil/proc"
	"github.com/orknode/ork/protocols/envelope"
)

// binDir holds the binaries built by Main.
var binDir string

// Main is a TestMain: unless -short, it builds ork-node, ork-worker-sim and
// the extra packages (e.g. "./victim") into a temporary dir, runs the tests
// and removes the dir. It does not return.
func Main(m *testing.M, extra ...string) {
	flag.Parse()
	if testing.Short() {
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "ork-test-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	start := time.Now()
	if err := proc.Build(context.Background(), dir, extra...); err != nil {
		fmt.Fprintln(os.Stderr, "build:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "built binaries in %.1f s\n", time.Since(start).Seconds())
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// Bin is the path of a binary built by Main.
func Bin(name string) string { return filepath.Join(binDir, name) }

// stopGrace is how long Stop waits for a process before it kills it.
const stopGrace = 20 * time.Second

// Proc is a process a test started.
type Proc struct {
	Name string
	Log  string // the file holding its stdout and stderr
	c    *proc.Child
}

// Start starts the binary name (built by Main) with args, its output in a
// new log file in dir. The process is killed when the test ends, and the
// tail of its output logged if the test failed.
func Start(t *testing.T, dir, name string, args ...string) *Proc {
	t.Helper()
	log := logPath(dir, name)
	c, err := proc.Start(log, Bin(name), args...)
	require.NoError(t, err, name)
	return track(t, name, log, c)
}

func logPath(dir, name string) string {
	return filepath.Join(dir, fmt.Sprintf("%s-%d.log", name, time.Now().UnixNano()))
}

func track(t *testing.T, name, log string, c *proc.Child) *Proc {
	p := &Proc{Name: name, Log: log, c: c}
	t.Cleanup(func() {
		p.Stop(syscall.SIGKILL)
		if t.Failed() {
			t.Logf("---- %s (pid %d) output tail ----\n%s", name, p.PID(), Tail(log, 40))
		}
	})
	return p
}

// PID is the process's ID.
func (p *Proc) PID() int { return p.c.PID() }

// Exited reports whether the process has ended.
func (p *Proc) Exited() bool { return p.c.Exited() }

// Stop sends sig to the process (only the PID we started) and waits up to
// 20 s, then kills it. It reports whether it ended within the 20 s.
func (p *Proc) Stop(sig syscall.Signal) bool { return p.c.Stop(sig, stopGrace) }

// Tail is the last n lines of the file at path (or the error reading it).
func Tail(path string, n int) string {
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

// Eventually polls cond every 100 ms until it is true, and fails the test
// if d passes first, with what and cond's last message.
func Eventually(t *testing.T, d time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(d)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, msg := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			require.FailNow(t, "timed out waiting for "+what, "after %v: %s", d, msg)
		}
		<-tick.C
	}
}

// FixedListen is a listen address on 127.0.0.1 with a port that was free a
// moment ago, for a node that must restart on the same address.
func FixedListen(t *testing.T) string {
	port, err := proc.FreePort()
	require.NoError(t, err)
	return fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", port)
}

// Node is an ork-node data dir in a test's temp dir, and its daemon.
type Node struct {
	T      *testing.T
	Dir    string // the test's temp dir: logs, keys, exec logs
	Data   string // the node's data dir
	Daemon *Proc  // set by Start
}

// NewNode runs `ork-node init` (loopback only, listening on listen) in a
// new temp dir.
func NewNode(t *testing.T, listen string) *Node {
	t.Helper()
	dir := t.TempDir()
	n := &Node{T: t, Dir: dir, Data: filepath.Join(dir, "node")}
	args := []string{"init", "--data", n.Data, "--loopback-only", "--listen", listen}
	require.NoError(t, proc.Run(context.Background(), Bin("ork-node"), args...))
	return n
}

// Start starts `ork-node daemon` and waits (up to 30 s) for its api file
// with its PID.
func (n *Node) Start() {
	t := n.T
	t.Helper()
	const name = "ork-node-daemon"
	log := logPath(n.Dir, name)
	c, err := proc.StartDaemon(context.Background(), Bin("ork-node"), n.Data, log)
	require.NoError(t, err, name)
	n.Daemon = track(t, name, log, c)
}

// Dial connects a client to the running daemon, closed when the test ends.
func (n *Node) Dial() *client.Client {
	t := n.T
	t.Helper()
	a, err := apifile.Read(n.Data)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, client.Options{KeyFile: filepath.Join(n.Data, "client.key"), Kernel: a.Addrs})
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// ListWorkers is worker.list with a 5 s timeout.
func ListWorkers(c *client.Client) ([]envelope.WorkerInfo, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return c.ListWorkers(ctx)
}

// WaitWorkers waits up to d until want Workers whose id starts with prefix
// ("" for all) are READY and HEALTHY, and returns every Worker listed.
func WaitWorkers(t *testing.T, c *client.Client, d time.Duration, want int, prefix string) []envelope.WorkerInfo {
	t.Helper()
	var ws []envelope.WorkerInfo
	Eventually(t, d, fmt.Sprintf("%d %q Workers READY+HEALTHY", want, prefix), func() (bool, string) {
		var err error
		ws, err = ListWorkers(c)
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

// Terminal reports whether a command status is final.
func Terminal(s string) bool {
	switch s {
	case "SUCCESS", "FAILED", "TIMEOUT", "CANCELLED":
		return true
	}
	return false
}

// WaitTerminal polls CommandStatus for every id until all are terminal
// (up to d) and returns their statuses.
func WaitTerminal(t *testing.T, c *client.Client, ids []string, d time.Duration) map[string]envelope.CommandStatus {
	t.Helper()
	got := map[string]envelope.CommandStatus{}
	Eventually(t, d, "accepted commands terminal", func() (bool, string) {
		pending, lastErr := 0, ""
		for _, id := range ids {
			if s, ok := got[id]; ok && Terminal(s.Status) {
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
			if !Terminal(s.Status) {
				pending++
				lastErr = id + ": " + s.Status
			}
		}
		return pending == 0, fmt.Sprintf("%d of %d not terminal (e.g. %s)", pending, len(ids), lastErr)
	})
	return got
}

// ReadExecLog reads a simulator's --exec-log: how many times each command
// id was executed.
func ReadExecLog(t *testing.T, path string) map[string]int {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err, "exec log")
	m := map[string]int{}
	require.NoError(t, json.Unmarshal(b, &m))
	return m
}
