// Package cli implements the ork-node command line: the daemon and the
// kubo-style client commands that talk to it. cmd/ork-node only calls Main.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// ErrUsage marks a command-line mistake (exit code 2).
var ErrUsage = errors.New("usage")

type command struct {
	name    string
	summary string
	run     func(ctx context.Context, env *Env, args []string) error
}

// Env is what commands read and write; tests substitute buffers.
type Env struct {
	Stdout, Stderr io.Writer
	Getenv         func(string) string
}

func commands() []command {
	return []command{
		{"init", "create a data directory: config.json, identity.key, an allowlisted admin client key", runInit},
		{"daemon", "run the node until SIGINT/SIGTERM (SIGHUP reloads the caller allowlist)", runDaemon},
		{"id", "print the node's peer ID and addresses", runID},
		{"status", "print the running node's summary, or a command's state: status [COMMAND_ID]", runStatus},
		{"workers", "list Workers with lifecycle state and health", runWorkers},
		{"devices", "list devices and their owners", runDevices},
		{"caps", "show a device's capabilities: caps DEVICE", runCaps},
		{"send", "send a command: send --device ID CMD [k=v ...] [--wait]", runSend},
		{"wait", "wait until a command ends: wait COMMAND_ID", runWait},
		{"cancel", "cancel a queued command: cancel COMMAND_ID", runCancel},
		{"telemetry", "read telemetry: telemetry --device ID | --worker ID", runTelemetry},
		{"terminate", "evict a Worker: terminate WORKER_ID", runTerminate},
		{"allow", "allowlist a caller: allow PEER_ID --role read|operate|admin [--name N]", runAllow},
	}
}

// Main runs the CLI and returns the process exit code.
func Main(ctx context.Context, args []string, env *Env) int {
	if len(args) == 0 {
		usage(env.Stderr) // a mistake: usage goes with the exit code 2
		return 2
	}
	if args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(env.Stdout)
		return 0
	}
	for _, c := range commands() {
		if c.name == args[0] {
			err := c.run(ctx, env, args[1:])
			switch {
			case err == nil:
				return 0
			case errors.Is(err, flag.ErrHelp):
				return 0
			case errors.Is(err, ErrUsage):
				fmt.Fprintf(env.Stderr, "ork-node %s: %v\n", c.name, err)
				return 2
			default:
				fmt.Fprintf(env.Stderr, "ork-node %s: %v\n", c.name, err)
				return 1
			}
		}
	}
	fmt.Fprintf(env.Stderr, "ork-node: unknown command %q\n\n", args[0])
	usage(env.Stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "ork-node — the ORK orchestration kernel on libp2p\n\nUsage: ork-node COMMAND [flags]\n\nCommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nEvery command takes --data DIR (default $ORK_DATA or ~/.ork). Run `ork-node COMMAND -h` for its flags.")
}

// common flags shared by the client commands.
type common struct {
	data    string
	api     string
	key     string
	json    bool
	timeout time.Duration
}

func newFlags(name string, env *Env, c *common) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	fs.StringVar(&c.data, "data", defaultDataDir(env), "node data directory")
	fs.StringVar(&c.api, "api", "", "kernel multiaddr with /p2p suffix (default: read from DATA/api)")
	fs.StringVar(&c.key, "key", "", "client key file (default DATA/client.key)")
	fs.BoolVar(&c.json, "json", false, "print JSON")
	fs.DurationVar(&c.timeout, "timeout", 10*time.Second, "how long to wait for the node")
	return fs
}

// parse parses flags that may come after positional arguments too
// (`caps DEV --json`), which the stdlib flag package stops at.
func parse(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, fmt.Errorf("%w: %v", ErrUsage, err)
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		if args[0] == "--" {
			return append(pos, args[1:]...), nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

func defaultDataDir(env *Env) string {
	if d := env.Getenv("ORK_DATA"); d != "" {
		return d
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".ork")
	}
	return ".ork"
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func joinSorted(xs []string, max int) string {
	xs = append([]string(nil), xs...)
	sort.Strings(xs)
	if max > 0 && len(xs) > max {
		return strings.Join(xs[:max], ",") + fmt.Sprintf(",…(+%d)", len(xs)-max)
	}
	return strings.Join(xs, ",")
}
