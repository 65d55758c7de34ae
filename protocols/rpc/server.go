package rpc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/orknode/ork/internal/logging"
	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
)

var log = logging.Logger("ork/rpc")

// Handler serves one action. It returns the reply payload (nil = {}); an
// error becomes the reply's structured error (an *envelope.Error keeps its
// code, anything else is ERR_INTERNAL). The context ends at the handler
// timeout (ServerOptions.HandlerTimeout); the stream is not watched while the
// handler runs. A panic resets the stream (the caller gets an error, no
// reply) and is logged.
type Handler func(ctx context.Context, remote peer.ID, req *envelope.Envelope) (any, error)

// ServerOptions configure a Server. Zero values take the defaults.
type ServerOptions struct {
	Sender         string        // the sender name in replies
	Service        string        // resource-manager service name for the streams
	MaxRequestSize int           // default protocols.MaxFrameSize
	IdleTimeout    time.Duration // close a stream with no request for this long; default 60 s
	ReadTimeout    time.Duration // a started frame must arrive within this; default 10 s
	WriteTimeout   time.Duration // default 10 s
	HandlerTimeout time.Duration // default 30 s
	// AllowPeer gates the whole stream: false resets it at once (Workers use
	// it to talk to their trusted kernels only). Nil admits everyone.
	AllowPeer func(peer.ID) bool
	// Authorize gates one action for an admitted peer; its error is the reply.
	Authorize func(remote peer.ID, action string) error
}

func (o *ServerOptions) fill() {
	if o.MaxRequestSize <= 0 {
		o.MaxRequestSize = protocols.MaxFrameSize
	}
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = 60 * time.Second
	}
	if o.ReadTimeout <= 0 {
		o.ReadTimeout = 10 * time.Second
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = 10 * time.Second
	}
	if o.HandlerTimeout <= 0 {
		o.HandlerTimeout = 30 * time.Second
	}
	if o.Sender == "" {
		o.Sender = "ork"
	}
}

// Server answers requests on the streams of one protocol, by action.
type Server struct {
	opts     ServerOptions
	handlers map[string]Handler
	closed   atomic.Bool
}

// ErrServerClosed resets streams that bring a request after Close.
var ErrServerClosed = errors.New("ork/rpc: server closed")

// Close makes the server answer no more requests: a stream that brings one
// is reset unanswered. Streams already open stay until then (a host that
// outlives the server keeps them), so the peer sees a failure, not silence.
func (s *Server) Close() { s.closed.Store(true) }

// NewServer makes a server with one handler per action.
func NewServer(opts ServerOptions, handlers map[string]Handler) *Server {
	opts.fill()
	return &Server{opts: opts, handlers: handlers}
}

// Outcome says how a stream ended; serveStream returns it so tests can assert
// on it.
type Outcome struct {
	Requests int   // requests answered
	Closed   bool  // ended cleanly (peer closed its side, or idle)
	Err      error // why it was reset
}

// HandleStream is the libp2p stream handler: it serves the stream until the
// peer closes it, it idles out, or an error resets it. It never panics: a
// panicking handler resets the stream and is logged with its stack.
func (s *Server) HandleStream(st network.Stream) {
	defer func() {
		if r := recover(); r != nil {
			log.Error("panic serving stream", "proto", st.Protocol(), "panic", r, "stack", string(debug.Stack()))
		}
	}()
	out := s.serveStream(st)
	if out.Err != nil {
		log.Debug("stream reset", "peer", st.Conn().RemotePeer(), "proto", st.Protocol(), "requests", out.Requests, "err", out.Err)
	}
}

// serveStream serves st and then closes it cleanly, or resets it if serving
// failed or panicked (the panic goes on up to HandleStream).
func (s *Server) serveStream(st network.Stream) (out Outcome) {
	returned := false
	defer func() {
		if returned && out.Err == nil {
			out.Closed = true
			_ = st.Close()
		} else {
			_ = st.Reset()
		}
	}()
	out = s.serve(st)
	returned = true
	return out
}

func (s *Server) serve(st network.Stream) (out Outcome) {
	remote := st.Conn().RemotePeer()
	if s.opts.AllowPeer != nil && !s.opts.AllowPeer(remote) {
		return Outcome{Err: errPeerNotAllowed}
	}
	if s.opts.Service != "" {
		if err := st.Scope().SetService(s.opts.Service); err != nil {
			return Outcome{Err: fmt.Errorf("resource manager: %w", err)}
		}
	}
	f := newFramer(st, s.opts.MaxRequestSize)
	for {
		// Waiting for the next request: the idle timeout applies.
		_ = st.SetReadDeadline(time.Now().Add(s.opts.IdleTimeout))
		n, err := f.r.NextMsgLen()
		if err != nil {
			if errors.Is(err, io.EOF) || isTimeout(err) {
				return out // peer finished, or idle: close cleanly
			}
			out.Err = err
			return out
		}
		// A request has started: it must arrive within the read timeout
		// (unless it is all here already, the usual case for small ones).
		if !f.buffered(n) {
			_ = st.SetReadDeadline(time.Now().Add(s.opts.ReadTimeout))
		}
		msg, release, err := f.readFrame(st.Scope(), s.opts.MaxRequestSize)
		if err != nil {
			switch {
			case errors.Is(err, ErrFrameTooLarge):
				// Say why, then end the stream: the rest of the frame is unread.
				s.writeError(st, f, envelope.Errf(envelope.CodeFrameTooLarge, "limit %d bytes", s.opts.MaxRequestSize))
			case errors.Is(err, errNoMemory):
				// The resource manager refused the memory: tell the caller to back off.
				s.writeError(st, f, envelope.Errf(envelope.CodeBusy, "%v", err))
			}
			out.Err = err
			return out
		}
		if s.closed.Load() {
			release()
			out.Err = ErrServerClosed
			return out
		}
		reply := s.answer(remote, msg)
		release()
		_ = st.SetWriteDeadline(time.Now().Add(s.opts.WriteTimeout))
		if err := f.writeEnvelope(reply); err != nil {
			out.Err = err
			return out
		}
		out.Requests++
	}
}

var errPeerNotAllowed = errors.New("ork/rpc: peer not allowed")

// isTimeout reports a deadline error, whatever the transport calls it: yamux
// (TCP) returns its own ErrTimeout, which is not os.ErrDeadlineExceeded.
func isTimeout(err error) bool {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// answer turns one request frame into its reply envelope; it always has one.
func (s *Server) answer(remote peer.ID, msg []byte) *envelope.Envelope {
	req, err := envelope.Decode(msg)
	if err != nil {
		return s.errorReply(&envelope.Envelope{ID: looseID(msg), Action: envelope.ActionError}, err)
	}
	if req.Type != envelope.TypeRequest {
		return s.errorReply(req, envelope.Errf(envelope.CodeEnvelopeTypeInvalid, "expected a request, got %s", req.Type))
	}
	// Authorize first, so a peer that may not call anything learns nothing,
	// not even which actions exist.
	if s.opts.Authorize != nil {
		if err := s.opts.Authorize(remote, req.Action); err != nil {
			return s.errorReply(req, err)
		}
	}
	h, ok := s.handlers[req.Action]
	if !ok {
		return s.errorReply(req, envelope.Errf(envelope.CodeUnknownAction, "%s", req.Action))
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.HandlerTimeout)
	defer cancel()
	payload, err := h(ctx, remote, req)
	if err != nil {
		return s.errorReply(req, err)
	}
	reply, err := req.Reply(s.opts.Sender, payload, nil)
	if err != nil {
		return s.errorReply(req, envelope.Errf(envelope.CodeInternal, "encode reply: %v", err))
	}
	return reply
}

func (s *Server) errorReply(req *envelope.Envelope, err error) *envelope.Envelope {
	var e *envelope.Error
	if !errors.As(err, &e) {
		log.Warn("handler error", "err", err)
		e = envelope.Errf(envelope.CodeInternal, "%v", err)
	}
	if req == nil {
		req = &envelope.Envelope{Action: envelope.ActionError}
	}
	r, _ := req.Reply(s.opts.Sender, nil, e)
	return r
}

func (s *Server) writeError(st network.Stream, f *framer, e *envelope.Error) {
	_ = st.SetWriteDeadline(time.Now().Add(s.opts.WriteTimeout))
	_ = f.writeEnvelope(s.errorReply(nil, e))
}

// looseID digs the request id out of a frame that failed validation, so the
// error reply can still name it in replyTo.
func looseID(msg []byte) string {
	var v struct {
		ID any `json:"id"`
	}
	if json.Unmarshal(msg, &v) == nil {
		if s, ok := v.ID.(string); ok {
			return s
		}
	}
	return ""
}

// LogValue keeps option dumps short in logs.
func (o ServerOptions) LogValue() slog.Value {
	return slog.GroupValue(slog.String("sender", o.Sender), slog.Duration("idle", o.IdleTimeout))
}
