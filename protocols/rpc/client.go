package rpc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	msmux "github.com/multiformats/go-multistream"

	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
)

// ClientOptions configure a Client. Zero values take the defaults.
type ClientOptions struct {
	Sender string // the sender name in requests
	// MaxIdlePerPeer bounds the idle streams kept per peer and protocol; 0
	// means 8, a negative value disables pooling (a fresh stream per call).
	MaxIdlePerPeer int
	// IdleTimeout drops pooled streams idle this long; it must stay below the
	// servers' idle timeout (60 s) so a pooled stream is never one the server
	// is closing. Default 30 s.
	IdleTimeout time.Duration
	// CallTimeout bounds a call whose context has no deadline. Default 30 s.
	CallTimeout time.Duration
	// MaxResponseSize per protocol; default protocols.MaxFrame.
	MaxResponseSize func(protocol.ID) int
}

// Client calls peers' stream protocols, reusing idle streams.
type Client struct {
	h    host.Host
	opts ClientOptions

	mu     sync.Mutex
	idle   map[poolKey][]*pooled
	closed bool

	calls, fresh, reused, failed, stale atomic.Uint64
}

// ClientStats count stream use; Fresh/Reused show the pool's hit rate.
// Stale counts pooled streams the peer had already closed (its idle timeout
// was shorter than ours): each such call was retried once on a fresh stream.
type ClientStats struct {
	Calls, Fresh, Reused, Failed, Stale uint64
}

type poolKey struct {
	p     peer.ID
	proto protocol.ID
}

type pooled struct {
	s        network.Stream
	f        *framer
	max      int
	lastUsed time.Time
}

// NewClient makes a client that opens streams from h.
func NewClient(h host.Host, opts ClientOptions) *Client {
	if opts.MaxIdlePerPeer == 0 {
		opts.MaxIdlePerPeer = 8
	}
	if opts.IdleTimeout <= 0 {
		opts.IdleTimeout = 30 * time.Second
	}
	if opts.CallTimeout <= 0 {
		opts.CallTimeout = 30 * time.Second
	}
	if opts.MaxResponseSize == nil {
		opts.MaxResponseSize = protocols.MaxFrame
	}
	if opts.Sender == "" {
		opts.Sender = "ork"
	}
	return &Client{h: h, opts: opts, idle: map[poolKey][]*pooled{}}
}

// Sender is the name this client puts in its requests.
func (c *Client) Sender() string { return c.opts.Sender }

// Stats returns a snapshot of the counters.
func (c *Client) Stats() ClientStats {
	return ClientStats{Calls: c.calls.Load(), Fresh: c.fresh.Load(), Reused: c.reused.Load(), Failed: c.failed.Load(), Stale: c.stale.Load()}
}

// Call sends req to p over proto and returns the reply. A reply carrying a
// structured error is returned as is (err == nil): the exchange worked. err is
// set when the exchange failed; errors.Is(err, ErrNotDelivered) means the
// request provably never reached a handler (no stream could be opened, or the
// peer does not speak the protocol), so resending cannot duplicate it.
//
// A pooled stream that the peer closed while it sat idle answers the request
// with a clean end of stream and no reply: an ORK server closes only between
// requests, so the request was not read, and Call sends it again, once, on a
// fresh stream.
func (c *Client) Call(ctx context.Context, p peer.ID, proto protocol.ID, req *envelope.Envelope) (*envelope.Envelope, error) {
	key := poolKey{p, proto}
	c.calls.Add(1)
	reply, err := c.call(ctx, key, req, false)
	if errors.Is(err, errStale) {
		c.stale.Add(1)
		reply, err = c.call(ctx, key, req, true)
	}
	if err != nil {
		c.failed.Add(1)
		return nil, err
	}
	return reply, nil
}

// errStale: a pooled stream ended cleanly before any reply byte.
var errStale = errors.New("ork/rpc: pooled stream closed by the peer")

func (c *Client) call(ctx context.Context, key poolKey, req *envelope.Envelope, freshOnly bool) (*envelope.Envelope, error) {
	ps, reused, err := c.get(ctx, key, freshOnly)
	if err != nil {
		return nil, err
	}
	if reused {
		c.reused.Add(1)
	} else {
		c.fresh.Add(1)
	}
	if err := ctx.Err(); err != nil {
		// Nothing was written: the stream is as good as before.
		c.put(key, ps)
		return nil, fmt.Errorf("%w: %w", ErrNotDelivered, err)
	}
	reply, reusable, err := c.exchange(ctx, ps, req, reused)
	if err != nil {
		_ = ps.s.Reset()
		switch {
		case errors.Is(err, errStale):
			// Streams idle at least as long are likely closed too.
			c.dropIdleSince(key, ps.lastUsed)
		case !reused && protocolRefused(err):
			// Identify said the peer speaks proto; it no longer does. Forget
			// it, so the next stream negotiates (and fails) up front.
			_ = c.h.Peerstore().RemoveProtocols(key.p, key.proto)
		}
		return nil, err
	}
	if reusable {
		c.put(key, ps)
	} else {
		_ = ps.s.Reset()
	}
	return reply, nil
}

// exchange writes req and reads its reply. reusable is false when the stream
// must not go back to the pool even though the exchange worked (the context
// was cancelled as it ended, so the stream is being reset).
func (c *Client) exchange(ctx context.Context, ps *pooled, req *envelope.Envelope, reused bool) (reply *envelope.Envelope, reusable bool, err error) {
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(c.opts.CallTimeout)
	}
	_ = ps.s.SetDeadline(deadline)
	// A cancelled context resets the stream, which unblocks the read below;
	// the remote side sees the reset too (the original never cancelled).
	stop := context.AfterFunc(ctx, func() { _ = ps.s.Reset() })
	defer func() {
		if !stop() {
			reusable = false // the reset has run or is running
		}
	}()
	if err := ps.f.writeEnvelope(req); err != nil {
		return nil, false, c.ctxErr(ctx, fmt.Errorf("write %s: %w", req.Action, err))
	}
	if _, err := ps.f.r.NextMsgLen(); err != nil {
		if reused && errors.Is(err, io.EOF) && ctx.Err() == nil {
			return nil, false, fmt.Errorf("%w: %w", errStale, err)
		}
		return nil, false, c.readErr(ctx, req, err)
	}
	msg, release, err := ps.f.readFrame(nil, ps.max)
	if err != nil {
		return nil, false, c.readErr(ctx, req, err)
	}
	defer release()
	reply, err = envelope.Decode(msg)
	if err != nil {
		return nil, false, fmt.Errorf("%w: %v", ErrBadReply, err)
	}
	if reply.ReplyTo != req.ID && !(reply.ReplyTo == "" && reply.Error != nil) {
		return nil, false, fmt.Errorf("%w: replyTo %q, want %q", ErrBadReply, reply.ReplyTo, req.ID)
	}
	return reply, true, nil
}

func (c *Client) readErr(ctx context.Context, req *envelope.Envelope, err error) error {
	if refusedBeforeHandler(err) {
		return fmt.Errorf("%w: %s: %w", ErrNotDelivered, req.Action, err)
	}
	return c.ctxErr(ctx, fmt.Errorf("read reply to %s: %w", req.Action, err))
}

// refusedBeforeHandler reports a read error that proves the peer's host
// turned the stream away before any handler saw it. When the peerstore lists
// the protocol (identify said so), libp2p selects it lazily: the request goes
// out with the multistream header, and a refusal shows only now, as the "na"
// answer (ErrNotSupported) or as the reset the host sends when negotiation or
// its resource manager fails (which of the two arrives first is a race).
func refusedBeforeHandler(err error) bool {
	return protocolRefused(err) || remoteReset(err, network.StreamResourceLimitExceeded)
}

// protocolRefused: the peer does not speak the protocol it was offered.
func protocolRefused(err error) bool {
	return errors.Is(err, msmux.ErrNotSupported[protocol.ID]{}) || remoteReset(err, network.StreamProtocolNegotiationFailed)
}

func remoteReset(err error, code network.StreamErrorCode) bool {
	var se *network.StreamError
	return errors.As(err, &se) && se.Remote && se.ErrorCode == code
}

// ctxErr says when a failure is the context's doing. A deadline that came
// from the context counts even if the stream's deadline (set to the same
// instant) fired a moment before the context's own timer.
func (c *Client) ctxErr(ctx context.Context, err error) error {
	cerr := ctx.Err()
	if cerr == nil && isTimeout(err) {
		if d, ok := ctx.Deadline(); ok && !time.Now().Before(d) {
			cerr = context.DeadlineExceeded
		}
	}
	if cerr != nil {
		return fmt.Errorf("%w (%v)", cerr, err)
	}
	return err
}

// get takes an idle stream from the pool (unless freshOnly), or opens a
// fresh one.
func (c *Client) get(ctx context.Context, key poolKey, freshOnly bool) (*pooled, bool, error) {
	now := time.Now()
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, false, ErrClosed
	}
	var stale []*pooled
	var found *pooled
	if !freshOnly {
		list := c.idle[key]
		for len(list) > 0 {
			ps := list[len(list)-1]
			list = list[:len(list)-1]
			if now.Sub(ps.lastUsed) < c.opts.IdleTimeout && !ps.s.Conn().IsClosed() {
				found = ps
				break
			}
			stale = append(stale, ps)
		}
		c.idle[key] = list
	}
	c.mu.Unlock()
	for _, ps := range stale {
		_ = ps.s.Close()
	}
	if found != nil {
		return found, true, nil
	}
	s, err := c.h.NewStream(ctx, key.p, key.proto)
	if err != nil {
		return nil, false, fmt.Errorf("%w: open %s to %s: %w", ErrNotDelivered, key.proto, key.p, c.ctxErr(ctx, err))
	}
	max := c.opts.MaxResponseSize(key.proto)
	return &pooled{s: s, f: newFramer(s, max), max: max}, false, nil
}

// dropIdleSince closes the idle streams of key last used at or before t.
func (c *Client) dropIdleSince(key poolKey, t time.Time) {
	c.mu.Lock()
	list := c.idle[key]
	keep := list[:0]
	var drop []*pooled
	for _, ps := range list {
		if ps.lastUsed.After(t) {
			keep = append(keep, ps)
		} else {
			drop = append(drop, ps)
		}
	}
	clear(list[len(keep):])
	if len(keep) == 0 {
		delete(c.idle, key)
	} else {
		c.idle[key] = keep
	}
	c.mu.Unlock()
	for _, ps := range drop {
		_ = ps.s.Close()
	}
}

// put returns a healthy stream to the pool, or closes it if the pool is full.
func (c *Client) put(key poolKey, ps *pooled) {
	_ = ps.s.SetDeadline(time.Time{})
	ps.lastUsed = time.Now()
	c.mu.Lock()
	if !c.closed && c.opts.MaxIdlePerPeer > 0 && len(c.idle[key]) < c.opts.MaxIdlePerPeer {
		c.idle[key] = append(c.idle[key], ps)
		c.mu.Unlock()
		return
	}
	c.mu.Unlock()
	_ = ps.s.Close()
}

// DropPeer closes every idle stream to p (call it when p disconnects or
// restarts).
func (c *Client) DropPeer(p peer.ID) {
	c.mu.Lock()
	var drop []*pooled
	for k, list := range c.idle {
		if k.p == p {
			drop = append(drop, list...)
			delete(c.idle, k)
		}
	}
	c.mu.Unlock()
	for _, ps := range drop {
		_ = ps.s.Close()
	}
}

// Trim closes idle streams older than the idle timeout; callers with many
// peers run it now and then to bound memory.
func (c *Client) Trim() {
	now := time.Now()
	c.mu.Lock()
	var drop []*pooled
	for k, list := range c.idle {
		keep := list[:0]
		for _, ps := range list {
			if now.Sub(ps.lastUsed) >= c.opts.IdleTimeout || ps.s.Conn().IsClosed() {
				drop = append(drop, ps)
			} else {
				keep = append(keep, ps)
			}
		}
		if len(keep) == 0 {
			delete(c.idle, k)
		} else {
			c.idle[k] = keep
		}
	}
	c.mu.Unlock()
	for _, ps := range drop {
		_ = ps.s.Close()
	}
}

// Close closes every idle stream; later calls fail with ErrClosed. Idempotent.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	idle := c.idle
	c.idle = map[poolKey][]*pooled{}
	c.mu.Unlock()
	for _, list := range idle {
		for _, ps := range list {
			_ = ps.s.Close()
		}
	}
	return nil
}

// Request builds a request envelope from this client and calls p. The reply's
// structured error, if any, is returned as the error (an *envelope.Error);
// otherwise the reply payload is decoded into out (when out is not nil).
func (c *Client) Request(ctx context.Context, p peer.ID, proto protocol.ID, action, deviceID string, payload, out any) error {
	req, err := envelope.NewRequest(action, c.opts.Sender, payload)
	if err != nil {
		return err
	}
	req.DeviceID = deviceID
	reply, err := c.Call(ctx, p, proto, req)
	if err != nil {
		return err
	}
	if reply.Error != nil {
		return reply.Error
	}
	if out != nil {
		return reply.DecodePayload(out)
	}
	return nil
}

// IsNotDelivered reports whether err proves the request never reached the peer.
func IsNotDelivered(err error) bool { return errors.Is(err, ErrNotDelivered) }
