// Package proc runs the child processes of the benchmarks (bench/...) and of
// the process-level tests (through internal/testutil/procs): the ork-node
// daemon, the simulator. It reads their CPU and memory from /proc and stops
// only the processes it started, by PID.
package proc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/orknode/ork/internal/apifile"
)

// clkTck is USER_HZ: /proc/<pid>/stat counts CPU in these.
const clkTck = 100

// Build compiles the project's binaries (ork-node, ork-worker-sim) and the
// extra packages, if any, into dir. It must run inside the module.
func Build(ctx context.Context, dir string, extra ...string) error {
	args := []string{"build", "-o", dir + "/", "github.com/orknode/ork/cmd/ork-node", "github.com/orknode/ork/cmd/ork-worker-sim"}
	return Run(ctx, "go", append(args, extra...)...)
}

// Run runs a short command, showing its output only on failure.
func Run(ctx context.Context, name string, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

// Child is a process this program started.
type Child struct {
	Cmd  *exec.Cmd
	log  *os.File
	done chan error
}

// Start starts name with args, its output appended to logPath.
func Start(logPath, name string, args ...string) (*Child, error) {
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, err
	}
	c := &Child{Cmd: cmd, log: lf, done: make(chan error, 1)}
	go func() { c.done <- cmd.Wait() }()
	return c, nil
}

// PID is the child's process ID.
func (c *Child) PID() int { return c.Cmd.Process.Pid }

// Exited reports whether the child has ended.
func (c *Child) Exited() bool {
	select {
	case err := <-c.done:
		c.done <- err
		return true
	default:
		return false
	}
}

// Stop sends sig and waits up to grace, then kills. It reports whether the
// process ended within grace (or had already ended). Safe to call twice.
func (c *Child) Stop(sig syscall.Signal, grace time.Duration) bool {
	if c.Exited() {
		c.log.Close()
		return true
	}
	_ = c.Cmd.Process.Signal(sig)
	ended := true
	select {
	case err := <-c.done:
		c.done <- err
	case <-time.After(grace):
		_ = c.Cmd.Process.Kill()
		err := <-c.done
		c.done <- err
		ended = false
	}
	c.log.Close()
	return ended
}

// Kill sends SIGKILL and waits.
func (c *Child) Kill() { c.Stop(syscall.SIGKILL, 5*time.Second) }

// StartDaemon starts `ork-node daemon --data dataDir` and waits until it has
// written its api file.
func StartDaemon(ctx context.Context, bin, dataDir, logPath string, extra ...string) (*Child, error) {
	c, err := Start(logPath, bin, append([]string{"daemon", "--data", dataDir}, extra...)...)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if a, err := apifile.Read(dataDir); err == nil && a.PID == c.PID() {
			return c, nil
		}
		if c.Exited() {
			log, _ := os.ReadFile(logPath)
			return nil, fmt.Errorf("ork-node daemon exited\n%s", log)
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			c.Kill()
			log, _ := os.ReadFile(logPath)
			return nil, fmt.Errorf("ork-node daemon wrote no api file within 30 s\n%s", log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// CPU is utime+stime of a process, from /proc/<pid>/stat.
func CPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces: fields start after ')'.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return time.Duration(utime+stime) * time.Second / clkTck, nil
}

// RSS is a process's resident set size in bytes, from /proc/<pid>/status.
func RSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) >= 1 {
				kb, err := strconv.ParseInt(f[0], 10, 64)
				return kb * 1024, err
			}
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no VmRSS", pid)
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
