package node

import (
	"context"
	"errors"
	"sort"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/orknode/ork/modules/registry"
	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/protocols/rpc"
)

// actionRoles is the least role each caller action needs (DESIGN §5).
var actionRoles = map[string]string{
	envelope.ActionWorkerList:         RoleRead,
	envelope.ActionDeviceList:         RoleRead,
	envelope.ActionDeviceCapabilities: RoleRead,
	envelope.ActionKernelStatus:       RoleRead,
	envelope.ActionTelemetryPull:      RoleRead,
	envelope.ActionStatePull:          RoleRead,
	envelope.ActionCommandStatus:      RoleRead,
	envelope.ActionCommandWait:        RoleRead,
	envelope.ActionCommandRequest:     RoleOperate,
	envelope.ActionCommandCancel:      RoleOperate,
	envelope.ActionWorkerTerminate:    RoleAdmin,
}

// allowlist holds the callers' roles; SetCallers swaps it at run time
// (the daemon reloads it on SIGHUP).
type allowlist struct {
	mu    sync.RWMutex
	roles map[peer.ID]string
}

func (a *allowlist) set(callers []Caller) {
	roles := make(map[peer.ID]string, len(callers))
	for _, c := range callers {
		if p, err := peer.Decode(c.PeerID); err == nil {
			roles[p] = c.Role
		}
	}
	a.mu.Lock()
	a.roles = roles
	a.mu.Unlock()
}

func (a *allowlist) role(p peer.ID) string {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.roles[p]
}

// authorize is the kernel servers' per-action gate.
func (a *allowlist) authorize(p peer.ID, action string) error {
	role := a.role(p)
	if role == "" {
		return envelope.Errf(envelope.CodeUnauthorized, "peer %s is not on this kernel's allowlist (ork-node allow)", p)
	}
	need, ok := actionRoles[action]
	if !ok {
		need = RoleAdmin
	}
	if roleRank[role] < roleRank[need] {
		return envelope.Errf(envelope.CodeForbidden, "role %s cannot %s (needs %s)", role, action, need)
	}
	return nil
}

// SetCallers replaces the caller allowlist.
func (n *Node) SetCallers(callers []Caller) { n.allow.set(callers) }

func (n *Node) serverOptions() rpc.ServerOptions {
	return rpc.ServerOptions{Sender: Sender, Service: "ork.kernel", Authorize: n.allow.authorize}
}

// serveKernelProtocols installs the caller-facing stream handlers.
func (n *Node) serveKernelProtocols() {
	n.allow.set(n.cfg.Callers)
	reg := rpc.NewServer(n.serverOptions(), map[string]rpc.Handler{
		envelope.ActionWorkerList:         n.handleWorkerList,
		envelope.ActionDeviceList:         n.handleDeviceList,
		envelope.ActionDeviceCapabilities: n.handleDeviceCapabilities,
		envelope.ActionWorkerTerminate:    n.handleWorkerTerminate,
		envelope.ActionKernelStatus:       n.handleKernelStatus,
	})
	n.host.SetStreamHandler(protocols.KernelRegistry, reg.HandleStream)

	cmdOpts := n.serverOptions()
	cmdOpts.HandlerTimeout = maxWait + 5*time.Second // command.wait long-polls
	cmd := rpc.NewServer(cmdOpts, map[string]rpc.Handler{
		envelope.ActionCommandRequest: n.handleCommandRequest,
		envelope.ActionCommandStatus:  n.handleCommandStatus,
		envelope.ActionCommandWait:    n.handleCommandWait,
		envelope.ActionCommandCancel:  n.handleCommandCancel,
	})
	n.host.SetStreamHandler(protocols.KernelCommand, cmd.HandleStream)

	tel := rpc.NewServer(n.serverOptions(), map[string]rpc.Handler{
		envelope.ActionTelemetryPull: n.handleTelemetryPull,
		envelope.ActionStatePull:     n.handleStatePull,
	})
	n.host.SetStreamHandler(protocols.KernelTelemetry, tel.HandleStream)
}

func (n *Node) handleWorkerList(context.Context, peer.ID, *envelope.Envelope) (any, error) {
	return envelope.WorkerList{Workers: n.reg.List()}, nil
}

func (n *Node) handleDeviceList(context.Context, peer.ID, *envelope.Envelope) (any, error) {
	return envelope.DeviceList{Devices: n.reg.Devices()}, nil
}

func (n *Node) handleDeviceCapabilities(_ context.Context, _ peer.ID, req *envelope.Envelope) (any, error) {
	if req.DeviceID == "" {
		return nil, envelope.Err(envelope.CodeDeviceIDRequired)
	}
	c := n.reg.ContractForDevice(req.DeviceID)
	if c == nil {
		if _, _, ok := n.reg.ResolveDevice(req.DeviceID); !ok {
			return nil, envelope.Errf(envelope.CodeDeviceNotFound, "%s", req.DeviceID)
		}
		return map[string]any{"capabilities": nil}, nil
	}
	return map[string]any{"capabilities": c.Capabilities, "metadata": c.Metadata}, nil
}

func (n *Node) handleWorkerTerminate(ctx context.Context, _ peer.ID, req *envelope.Envelope) (any, error) {
	var ref envelope.WorkerRef
	if err := req.DecodePayload(&ref); err != nil {
		return nil, err
	}
	if ref.WorkerID == "" {
		return nil, envelope.Err(envelope.CodeWorkerIDRequired)
	}
	w, ok := n.reg.Worker(ref.WorkerID)
	if ok && w.State == envelope.WorkerTerminated {
		ok = false // terminating twice is not an error (MDK answers TERMINATED for unknown ids too)
	}
	if ok {
		if _, err := n.reg.Terminate(ctx, ref.WorkerID); err != nil {
			// A concurrent terminate or re-registration may have moved it
			// between the lookup and here: gone or already TERMINATED is done.
			now, still := n.reg.Worker(ref.WorkerID)
			if !errors.Is(err, registry.ErrUnknownWorker) && (!still || now.State != envelope.WorkerTerminated) {
				return nil, envelope.Errf(envelope.CodeInternal, "%v", err)
			}
			ok = false
		}
	}
	if ok {
		_ = n.health.Forget(ctx, ref.WorkerID)
		if p, err := peer.Decode(w.PeerID); err == nil {
			n.regs.forget(p)
			n.forgetAddrs(ctx, p)
			n.host.ConnManager().Unprotect(p, "ork-worker")
		}
	}
	return map[string]string{"status": envelope.WorkerTerminated, "workerId": ref.WorkerID}, nil
}

func (n *Node) handleKernelStatus(context.Context, peer.ID, *envelope.Envelope) (any, error) {
	return n.Status(), nil
}

// Status summarises the node for kernel.status and the CLI.
func (n *Node) Status() envelope.KernelStatus {
	modes := append([]string(nil), n.cfg.Discovery.Modes...)
	sort.Strings(modes)
	return envelope.KernelStatus{
		PeerID:    n.host.ID().String(),
		Version:   Version,
		Addrs:     n.Addrs(),
		Topic:     n.cfg.Topic,
		UptimeMs:  n.now().Sub(n.started).Milliseconds(),
		Workers:   n.reg.Counts(),
		Health:    n.health.Counts(),
		Devices:   len(n.reg.Devices()),
		Commands:  n.commandCounts(),
		Discovery: modes,
	}
}

// commandCounts merges unfinished commands by state with those finished since start.
func (n *Node) commandCounts() map[string]int {
	st := n.cmds.Stats()
	out := make(map[string]int, len(st.States)+len(st.Finished))
	for k, v := range st.States {
		out[k] += v
	}
	for k, v := range st.Finished {
		out[k] += v
	}
	return out
}
