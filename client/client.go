// Package client is the Go client library for ORK node callers: it dials a
// kernel by peer ID over libp2p and speaks the /ork/kernel/* protocols.
// Reads may be retried by the caller; commands are never resent by this
// library (pass an idempotency key to make a resend safe).
package client

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	manet "github.com/multiformats/go-multiaddr/net"

	"github.com/orknode/ork/internal/p2p"
	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/protocols/rpc"
)

// Options say which kernel to dial and as whom.
type Options struct {
	// Key is the caller's identity; the kernel must allowlist its peer ID.
	// KeyFile is read when Key is nil. It must exist unless CreateKey is
	// set: a mistyped path would otherwise make a fresh key that no kernel
	// allowlists, and every call would fail with ERR_UNAUTHORIZED. A missing
	// file is an error that wraps fs.ErrNotExist.
	Key     crypto.PrivKey
	KeyFile string
	// CreateKey makes a new Ed25519 key at KeyFile (mode 0600) if the file
	// does not exist, for callers that enrol their peer ID out of band.
	CreateKey bool
	// Kernel is the kernel's addresses, each with its /p2p/<peer ID> suffix.
	Kernel []string
	// Sender is the envelope sender name (default "cli").
	Sender string
	// PSK for a private-network site.
	PSK []byte
}

// Client talks to one kernel. Safe for concurrent use.
type Client struct {
	h      host.Host
	rpc    *rpc.Client
	kernel peer.ID
}

// Dial connects to the kernel. On error nothing is left running.
func Dial(ctx context.Context, o Options) (c *Client, err error) {
	key := o.Key
	if key == nil {
		if o.KeyFile == "" {
			return nil, errors.New("ork/client: a Key or a KeyFile is required")
		}
		if key, err = loadKey(o.KeyFile, o.CreateKey); err != nil {
			return nil, err
		}
	}
	infos, err := p2p.ParseAddrInfos(o.Kernel)
	if err != nil {
		return nil, fmt.Errorf("ork/client: kernel address: %w", err)
	}
	if len(infos) != 1 {
		return nil, fmt.Errorf("ork/client: kernel addresses name %d peers, want 1", len(infos))
	}
	loopback := true
	for _, a := range infos[0].Addrs {
		loopback = loopback && manet.IsIPLoopback(a)
	}
	h, err := p2p.NewHost(p2p.HostConfig{Key: key, NoListen: true, LoopbackOnly: loopback, PSK: o.PSK, ConnLow: 16, ConnHigh: 32, UserAgent: "ork-client/0.1"})
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			_ = h.Close()
		}
	}()
	if err := h.Connect(ctx, infos[0]); err != nil {
		return nil, fmt.Errorf("ork/client: connect to kernel %s: %w", infos[0].ID, err)
	}
	sender := o.Sender
	if sender == "" {
		sender = "cli"
	}
	return &Client{h: h, rpc: rpc.NewClient(h, rpc.ClientOptions{Sender: sender, MaxIdlePerPeer: 128}), kernel: infos[0].ID}, nil
}

// loadKey reads the key at path, or creates one there when create is set.
func loadKey(path string, create bool) (crypto.PrivKey, error) {
	if create {
		return p2p.LoadOrCreateKey(path)
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("ork/client: key file %s: %w (`ork-node init` makes one)", path, fs.ErrNotExist)
	}
	if err != nil {
		return nil, fmt.Errorf("ork/client: key file: %w", err)
	}
	k, err := crypto.UnmarshalPrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("ork/client: key file %s: %w", path, err)
	}
	return k, nil
}

// Kernel is the kernel's peer ID.
func (c *Client) Kernel() peer.ID { return c.kernel }

// ID is this client's peer ID (what the kernel's allowlist must hold).
func (c *Client) ID() peer.ID { return c.h.ID() }

// Close closes the client's host.
func (c *Client) Close() error {
	return errors.Join(c.rpc.Close(), c.h.Close())
}

func (c *Client) call(ctx context.Context, proto protocol.ID, action, deviceID string, payload, out any) error {
	return c.rpc.Request(ctx, c.kernel, proto, action, deviceID, payload, out)
}

// ListWorkers returns every Worker the kernel knows, with state and health.
func (c *Client) ListWorkers(ctx context.Context) ([]envelope.WorkerInfo, error) {
	var out envelope.WorkerList
	err := c.call(ctx, protocols.KernelRegistry, envelope.ActionWorkerList, "", nil, &out)
	return out.Workers, err
}

// ListDevices returns every device and its owner.
func (c *Client) ListDevices(ctx context.Context) ([]envelope.DeviceRow, error) {
	var out envelope.DeviceList
	err := c.call(ctx, protocols.KernelRegistry, envelope.ActionDeviceList, "", nil, &out)
	return out.Devices, err
}

// Capabilities returns a device's capabilities (and its Worker's metadata).
func (c *Client) Capabilities(ctx context.Context, deviceID string) (map[string]any, error) {
	var out map[string]any
	err := c.call(ctx, protocols.KernelRegistry, envelope.ActionDeviceCapabilities, deviceID, nil, &out)
	return out, err
}

// Terminate evicts a Worker (admin role).
func (c *Client) Terminate(ctx context.Context, workerID string) error {
	return c.call(ctx, protocols.KernelRegistry, envelope.ActionWorkerTerminate, "", envelope.WorkerRef{WorkerID: workerID}, nil)
}

// Status returns the kernel's summary.
func (c *Client) Status(ctx context.Context) (envelope.KernelStatus, error) {
	var out envelope.KernelStatus
	err := c.call(ctx, protocols.KernelRegistry, envelope.ActionKernelStatus, "", nil, &out)
	return out, err
}

// SendCommand submits a command (operate role). deviceID is the target for
// device scope; worker and rack scopes name their target in req. It returns
// once the kernel has durably accepted (or rejected) the command.
func (c *Client) SendCommand(ctx context.Context, deviceID string, req envelope.CommandRequest) (envelope.CommandAccepted, error) {
	var out envelope.CommandAccepted
	err := c.call(ctx, protocols.KernelCommand, envelope.ActionCommandRequest, deviceID, req, &out)
	return out, err
}

// SendAndWait submits a command and waits, in the same round trip, until it
// ends or wait passes (at most 60 s per call): the answer's Status is final
// (SUCCESS, FAILED, ...) with its Result or Error, or the state it was still
// in. Resending after an error is safe only with req.IdempotencyKey set.
func (c *Client) SendAndWait(ctx context.Context, deviceID string, req envelope.CommandRequest, wait time.Duration) (envelope.CommandAccepted, error) {
	req.WaitMs = max(wait.Milliseconds(), 1)
	ctx, cancel := context.WithTimeout(ctx, wait+5*time.Second)
	defer cancel()
	return c.SendCommand(ctx, deviceID, req)
}

// CommandStatus reads a command's state (kept 24 h after it ends).
func (c *Client) CommandStatus(ctx context.Context, commandID string) (envelope.CommandStatus, error) {
	var out envelope.CommandStatus
	err := c.call(ctx, protocols.KernelCommand, envelope.ActionCommandStatus, "", envelope.CommandRef{CommandID: commandID}, &out)
	return out, err
}

// WaitCommand long-polls until the command is terminal or timeout passes,
// then returns its status (not an error if it is still running). timeout is
// rounded up to whole milliseconds (at least 1 ms: the kernel reads 0 as
// its maximum wait); the kernel caps it at its maximum wait (60 s).
func (c *Client) WaitCommand(ctx context.Context, commandID string, timeout time.Duration) (envelope.CommandStatus, error) {
	var out envelope.CommandStatus
	ms := timeout.Milliseconds()
	if timeout%time.Millisecond > 0 {
		ms++
	}
	ms = max(ms, 1)
	ctx, cancel := context.WithTimeout(ctx, time.Duration(ms)*time.Millisecond+5*time.Second)
	defer cancel()
	err := c.call(ctx, protocols.KernelCommand, envelope.ActionCommandWait, "", envelope.CommandRef{CommandID: commandID, TimeoutMs: ms}, &out)
	return out, err
}

// CancelCommand cancels a command that is still queued.
func (c *Client) CancelCommand(ctx context.Context, commandID string) (bool, error) {
	var out envelope.CommandCancelled
	err := c.call(ctx, protocols.KernelCommand, envelope.ActionCommandCancel, "", envelope.CommandRef{CommandID: commandID}, &out)
	return out.Cancelled, err
}

// PullTelemetry reads telemetry for a device (q.DeviceID) or a Worker
// (q.WorkerID), from the kernel's snapshot when younger than q.MaxAgeMs.
func (c *Client) PullTelemetry(ctx context.Context, q envelope.TelemetryPull) (map[string]any, error) {
	var out map[string]any
	err := c.call(ctx, protocols.KernelTelemetry, envelope.ActionTelemetryPull, q.DeviceID, q, &out)
	return out, err
}
