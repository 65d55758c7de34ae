package cli

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"github.com/libp2p/go-libp2p/core/pnet"
	"github.com/orknode/ork/node"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/orknode/ork/client"
	"github.com/orknode/ork/internal/apifile"
	"github.com/orknode/ork/protocols/envelope"
)

// dial connects to the node named by --api, or by DATA/api.
func dial(ctx context.Context, c *common) (*client.Client, error) {
	addrs := []string{c.api}
	if c.api == "" {
		a, err := apifile.Read(c.data)
		if err != nil {
			return nil, err
		}
		addrs = a.Addrs
	}
	key := c.key
	if key == "" {
		key = filepath.Join(c.data, ClientKeyFile)
	}
	// A site with a private-network key: the data directory's config names it.
	var psk []byte
	if cfg, err := node.LoadConfig(c.data); err == nil && cfg.PrivateNetworkKeyFile != "" {
		path := cfg.PrivateNetworkKeyFile
		if !filepath.IsAbs(path) {
			path = filepath.Join(c.data, path)
		}
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("private network key: %w", err)
		}
		psk, err = pnet.DecodeV1PSK(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("private network key %s: %w", path, err)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	return client.Dial(ctx, client.Options{KeyFile: key, Kernel: addrs, PSK: psk})
}

// withClient parses flags, checks the arguments, dials, and runs fn. check
// runs before dialing, so a usage mistake is exit 2 whether or not a node
// is running.
func withClient(ctx context.Context, env *Env, name string, args []string, extra func(*flag.FlagSet), check func(pos []string) error, fn func(ctx context.Context, c *common, cl *client.Client, pos []string) error) error {
	var c common
	fs := newFlags(name, env, &c)
	if extra != nil {
		extra(fs)
	}
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if check != nil {
		if err := check(pos); err != nil {
			return err
		}
	}
	cl, err := dial(ctx, &c)
	if err != nil {
		return err
	}
	defer cl.Close()
	return fn(ctx, &c, cl, pos)
}

// nArgs is a check for exactly n positional arguments.
func nArgs(n int, synopsis string) func([]string) error {
	return func(pos []string) error {
		if len(pos) != n {
			return fmt.Errorf("%w: %s", ErrUsage, synopsis)
		}
		return nil
	}
}

func timed(ctx context.Context, c *common) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, c.timeout)
}

func runWorkers(ctx context.Context, env *Env, args []string) error {
	return withClient(ctx, env, "workers", args, nil, nArgs(0, "workers [--json]"), func(ctx context.Context, c *common, cl *client.Client, _ []string) error {
		ctx, cancel := timed(ctx, c)
		defer cancel()
		ws, err := cl.ListWorkers(ctx)
		if err != nil {
			return err
		}
		if c.json {
			return printJSON(env.Stdout, ws)
		}
		tw := tabwriter.NewWriter(env.Stdout, 2, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "WORKER\tSTATE\tHEALTH\tDEVICES\tRACKS\tPEER ID")
		for _, w := range ws {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\n", w.WorkerID, w.State, w.HealthState, len(w.DeviceIDs), joinSorted(w.Racks, 3), w.PeerID)
		}
		_ = tw.Flush()
		counts := map[string]int{}
		for _, w := range ws {
			counts[w.State]++
		}
		fmt.Fprintf(env.Stdout, "%d workers (%s)\n", len(ws), fmtCounts(counts))
		return nil
	})
}

func fmtCounts(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	if len(keys) == 0 {
		return "none"
	}
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	return strings.Join(parts, ", ")
}

func runDevices(ctx context.Context, env *Env, args []string) error {
	return withClient(ctx, env, "devices", args, nil, nArgs(0, "devices [--json]"), func(ctx context.Context, c *common, cl *client.Client, _ []string) error {
		ctx, cancel := timed(ctx, c)
		defer cancel()
		ds, err := cl.ListDevices(ctx)
		if err != nil {
			return err
		}
		if c.json {
			return printJSON(env.Stdout, ds)
		}
		tw := tabwriter.NewWriter(env.Stdout, 2, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "DEVICE\tWORKER\tRACK\tMODEL\tROUTABLE")
		for _, d := range ds {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%v\n", d.DeviceID, d.WorkerID, d.Rack, d.Model, d.Routable)
		}
		_ = tw.Flush()
		fmt.Fprintf(env.Stdout, "%d devices\n", len(ds))
		return nil
	})
}

func runCaps(ctx context.Context, env *Env, args []string) error {
	return withClient(ctx, env, "caps", args, nil, nArgs(1, "caps DEVICE"), func(ctx context.Context, c *common, cl *client.Client, pos []string) error {
		ctx, cancel := timed(ctx, c)
		defer cancel()
		caps, err := cl.Capabilities(ctx, pos[0])
		if err != nil {
			return err
		}
		return printJSON(env.Stdout, caps)
	})
}

func runTerminate(ctx context.Context, env *Env, args []string) error {
	return withClient(ctx, env, "terminate", args, nil, nArgs(1, "terminate WORKER_ID"), func(ctx context.Context, c *common, cl *client.Client, pos []string) error {
		ctx, cancel := timed(ctx, c)
		defer cancel()
		if err := cl.Terminate(ctx, pos[0]); err != nil {
			return err
		}
		if c.json {
			return printJSON(env.Stdout, map[string]string{"status": envelope.WorkerTerminated, "workerId": pos[0]})
		}
		fmt.Fprintf(env.Stdout, "terminated %s\n", pos[0])
		return nil
	})
}

func runStatus(ctx context.Context, env *Env, args []string) error {
	check := func(pos []string) error {
		if len(pos) > 1 {
			return fmt.Errorf("%w: status [COMMAND_ID]", ErrUsage)
		}
		return nil
	}
	return withClient(ctx, env, "status", args, nil, check, func(ctx context.Context, c *common, cl *client.Client, pos []string) error {
		ctx, cancel := timed(ctx, c)
		defer cancel()
		if len(pos) == 1 {
			st, err := cl.CommandStatus(ctx, pos[0])
			if err != nil {
				return err
			}
			return printCommand(env, c, st)
		}
		st, err := cl.Status(ctx)
		if err != nil {
			return err
		}
		if c.json {
			return printJSON(env.Stdout, st)
		}
		fmt.Fprintf(env.Stdout, "peer ID:  %s\nversion:  %s\nuptime:   %s\nworkers:  %s\nhealth:   %s\ndevices:  %d\ncommands: %s\n",
			st.PeerID, st.Version, (time.Duration(st.UptimeMs) * time.Millisecond).Round(time.Second), fmtCounts(st.Workers), fmtCounts(st.Health), st.Devices, fmtCounts(st.Commands))
		return nil
	})
}

func printCommand(env *Env, c *common, st envelope.CommandStatus) error {
	if c.json {
		return printJSON(env.Stdout, st)
	}
	fmt.Fprintf(env.Stdout, "%s  %s  %s", st.CommandID, st.Status, st.Command)
	if st.DeviceID != "" {
		fmt.Fprintf(env.Stdout, "  device=%s", st.DeviceID)
	}
	if len(st.Children) > 0 {
		fmt.Fprintf(env.Stdout, "  children=%d", len(st.Children))
	}
	if st.Error != "" {
		fmt.Fprintf(env.Stdout, "  error=%q", st.Error)
	}
	if len(st.Result) > 0 && string(st.Result) != "{}" {
		fmt.Fprintf(env.Stdout, "  result=%s", st.Result)
	}
	fmt.Fprintln(env.Stdout)
	return nil
}

// parseParams turns k=v arguments into params: numbers, booleans and JSON
// values are decoded, anything else is a string.
func parseParams(kvs []string) (map[string]any, error) {
	params := map[string]any{}
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("%w: parameter %q is not k=v", ErrUsage, kv)
		}
		// Finite numbers only: "nan" or "inf" would not encode as JSON.
		if f, err := strconv.ParseFloat(v, 64); err == nil && !math.IsInf(f, 0) && !math.IsNaN(f) {
			params[k] = f
			continue
		}
		if b, err := strconv.ParseBool(v); err == nil {
			params[k] = b
			continue
		}
		var j any
		if (strings.HasPrefix(v, "{") || strings.HasPrefix(v, "[")) && json.Unmarshal([]byte(v), &j) == nil {
			params[k] = j
			continue
		}
		params[k] = v
	}
	return params, nil
}

func runSend(ctx context.Context, env *Env, args []string) error {
	var device, scope, worker, rack, idem string
	var wait bool
	var waitFor, timeoutCmd time.Duration
	extra := func(fs *flag.FlagSet) {
		fs.StringVar(&device, "device", "", "target device (device scope)")
		fs.StringVar(&scope, "scope", "device", "device, worker or rack")
		fs.StringVar(&worker, "worker", "", "target Worker (worker scope)")
		fs.StringVar(&rack, "rack", "", "target rack label (rack scope)")
		fs.StringVar(&idem, "idempotency-key", "", "makes a resend of this request safe")
		fs.BoolVar(&wait, "wait", false, "wait for the command to end")
		fs.DurationVar(&waitFor, "wait-timeout", 60*time.Second, "how long --wait waits")
		fs.DurationVar(&timeoutCmd, "deadline", 0, "fail the command if it has not run within this (ERR_COMMAND_EXPIRED)")
	}
	var params map[string]any
	check := func(pos []string) (err error) {
		if len(pos) < 1 {
			return fmt.Errorf("%w: send --device ID COMMAND [k=v ...]", ErrUsage)
		}
		// The target flag each scope needs (envelope.CommandRequest.Validate
		// on the kernel): a mistake here is exit 2, with no round trip.
		switch scope {
		case "", envelope.ScopeDevice:
			if device == "" {
				return fmt.Errorf("%w: --device is required (device scope): send --device ID COMMAND [k=v ...]", ErrUsage)
			}
		case envelope.ScopeWorker:
			if worker == "" {
				return fmt.Errorf("%w: --scope worker needs --worker ID", ErrUsage)
			}
		case envelope.ScopeRack:
			if rack == "" && worker == "" {
				return fmt.Errorf("%w: --scope rack needs --rack LABEL (or --worker ID)", ErrUsage)
			}
		default:
			return fmt.Errorf("%w: --scope %q: want device, worker or rack", ErrUsage, scope)
		}
		params, err = parseParams(pos[1:])
		return err
	}
	return withClient(ctx, env, "send", args, extra, check, func(ctx context.Context, c *common, cl *client.Client, pos []string) error {
		req := envelope.CommandRequest{Command: pos[0], Params: params, Scope: scope, WorkerID: worker, Rack: rack, IdempotencyKey: idem, TimeoutMs: timeoutCmd.Milliseconds()}
		var acc envelope.CommandAccepted
		var err error
		if wait {
			// One round trip: the kernel answers when the command ends (or
			// after the first slice; then the wait continues below).
			acc, err = cl.SendAndWait(ctx, device, req, min(waitFor, 5*time.Second))
		} else {
			cctx, cancel := timed(ctx, c)
			acc, err = cl.SendCommand(cctx, device, req)
			cancel()
		}
		if err != nil {
			return err
		}
		if wait && envelope.IsTerminalState(acc.Status) {
			return printAccepted(env, c, acc, req.Command, device)
		}
		if !wait {
			if c.json {
				return printJSON(env.Stdout, acc)
			}
			fmt.Fprintf(env.Stdout, "%s  %s", acc.CommandID, acc.Status)
			if len(acc.Children) > 0 {
				fmt.Fprintf(env.Stdout, "  (%d device commands)", len(acc.Children))
			}
			fmt.Fprintln(env.Stdout)
			return nil
		}
		return waitAndPrint(ctx, env, c, cl, acc.CommandID, waitFor)
	})
}

// printAccepted prints a command that ended within send --wait's first call,
// like `status` would, and fails unless it succeeded.
func printAccepted(env *Env, c *common, acc envelope.CommandAccepted, command, device string) error {
	if c.json {
		if err := printJSON(env.Stdout, acc); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(env.Stdout, "%s  %s  %s", acc.CommandID, acc.Status, command)
		if device != "" {
			fmt.Fprintf(env.Stdout, "  device=%s", device)
		}
		if len(acc.Children) > 0 {
			fmt.Fprintf(env.Stdout, "  children=%d", len(acc.Children))
		}
		if acc.Error != "" {
			fmt.Fprintf(env.Stdout, "  error=%q", acc.Error)
		}
		if len(acc.Result) > 0 && string(acc.Result) != "{}" {
			fmt.Fprintf(env.Stdout, "  result=%s", acc.Result)
		}
		fmt.Fprintln(env.Stdout)
	}
	if acc.Status != envelope.StateSuccess {
		return fmt.Errorf("command %s ended %s", acc.CommandID, acc.Status)
	}
	return nil
}

// minWaitSlice is the shortest long-poll waitAndPrint sends: a slice that
// rounds to 0 ms would ask the kernel for its maximum wait.
const minWaitSlice = 100 * time.Millisecond

func waitAndPrint(ctx context.Context, env *Env, c *common, cl *client.Client, id string, waitFor time.Duration) error {
	deadline := time.Now().Add(waitFor)
	for {
		// Long-poll in slices so a person sees progress on long waits.
		slice := max(min(5*time.Second, time.Until(deadline)), minWaitSlice)
		st, err := cl.WaitCommand(ctx, id, slice)
		if err != nil {
			return err
		}
		ended := envelope.IsTerminalState(st.Status)
		if ended || !time.Now().Before(deadline) {
			if err := printCommand(env, c, st); err != nil {
				return err
			}
			switch {
			case !ended:
				return fmt.Errorf("command %s is still %s after %s", id, st.Status, waitFor)
			case st.Status != envelope.StateSuccess:
				return fmt.Errorf("command %s ended %s", id, st.Status)
			}
			return nil
		}
		if !c.json {
			fmt.Fprintf(env.Stderr, "… %s %s\n", id, st.Status)
		}
	}
}

func runWait(ctx context.Context, env *Env, args []string) error {
	var waitFor time.Duration
	extra := func(fs *flag.FlagSet) { fs.DurationVar(&waitFor, "wait-timeout", 60*time.Second, "how long to wait") }
	return withClient(ctx, env, "wait", args, extra, nArgs(1, "wait COMMAND_ID"), func(ctx context.Context, c *common, cl *client.Client, pos []string) error {
		return waitAndPrint(ctx, env, c, cl, pos[0], waitFor)
	})
}

func runCancel(ctx context.Context, env *Env, args []string) error {
	return withClient(ctx, env, "cancel", args, nil, nArgs(1, "cancel COMMAND_ID"), func(ctx context.Context, c *common, cl *client.Client, pos []string) error {
		ctx, cancel := timed(ctx, c)
		defer cancel()
		ok, err := cl.CancelCommand(ctx, pos[0])
		if err != nil {
			return err
		}
		if c.json {
			return printJSON(env.Stdout, envelope.CommandCancelled{CommandID: pos[0], Cancelled: ok})
		}
		if ok {
			fmt.Fprintf(env.Stdout, "cancelled %s\n", pos[0])
			return nil
		}
		return fmt.Errorf("%s was not cancelled (only queued commands can be)", pos[0])
	})
}

func runTelemetry(ctx context.Context, env *Env, args []string) error {
	var device, worker, typ string
	var maxAge time.Duration
	extra := func(fs *flag.FlagSet) {
		fs.StringVar(&device, "device", "", "one device")
		fs.StringVar(&worker, "worker", "", "every device of one Worker")
		fs.StringVar(&typ, "type", "", "query type (default metrics)")
		fs.DurationVar(&maxAge, "max-age", -1, "accept a snapshot this old (0 = live; default: the node's)")
	}
	check := func(pos []string) error {
		if (device == "") == (worker == "") || len(pos) != 0 {
			return fmt.Errorf("%w: telemetry --device ID | --worker ID", ErrUsage)
		}
		return nil
	}
	return withClient(ctx, env, "telemetry", args, extra, check, func(ctx context.Context, c *common, cl *client.Client, _ []string) error {
		q := envelope.TelemetryPull{DeviceID: device, WorkerID: worker}
		if typ != "" {
			q.Query = map[string]any{"type": typ}
		}
		if maxAge >= 0 {
			ms := maxAge.Milliseconds()
			q.MaxAgeMs = &ms
		}
		ctx, cancel := timed(ctx, c)
		defer cancel()
		out, err := cl.PullTelemetry(ctx, q)
		if err != nil {
			return err
		}
		return printJSON(env.Stdout, out)
	})
}
