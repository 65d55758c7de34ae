// Package rpc carries envelopes over libp2p streams: unsigned-varint length
// prefix + JSON body (go-msgio), a size limit and a deadline on every read and
// write, requests and responses in order on a stream, and a stream reset on
// any error. The server half dispatches by action; the client half reuses idle
// streams from a small per-peer pool (DESIGN §3).
package rpc

import (
	"bufio"
	"errors"
	"fmt"
	"io"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-msgio"

	"github.com/orknode/ork/protocols/envelope"
)

// Errors of the framing layer.
var (
	// ErrFrameTooLarge: the peer announced a frame over the size limit.
	ErrFrameTooLarge = errors.New("ork/rpc: frame too large")
	// ErrNotDelivered: the request never left this side (no stream could be
	// opened, or the peer does not speak the protocol), so a retry cannot
	// duplicate it.
	ErrNotDelivered = errors.New("ork/rpc: request not delivered")
	// ErrBadReply: the reply was not a valid envelope for the request.
	ErrBadReply = errors.New("ork/rpc: bad reply")
	// ErrClosed: the client was closed.
	ErrClosed = errors.New("ork/rpc: client closed")

	// errNoMemory: the resource manager refused the memory for a frame.
	errNoMemory = errors.New("ork/rpc: no memory for the frame")
)

// framer reads and writes varint-delimited frames on one stream. The buffered
// reader saves a stream read per varint byte; it may read ahead, which is safe
// because a stream carries nothing but frames.
type framer struct {
	br *bufio.Reader
	r  msgio.ReadCloser
	w  msgio.WriteCloser
}

// readBufferSize is enough for a varint and a typical request (~300 B) in one
// read; larger frames pass through. Kept small because a kernel holds a pooled
// stream, and so a buffer, per Worker and protocol (a thousand Workers).
const readBufferSize = 512

func newFramer(s io.ReadWriter, maxSize int) *framer {
	br := bufio.NewReaderSize(s, readBufferSize)
	return &framer{
		br: br,
		r:  msgio.NewVarintReaderSize(br, maxSize),
		w:  msgio.NewVarintWriter(s),
	}
}

// buffered reports whether n more bytes are already in memory, so reading
// them cannot block.
func (f *framer) buffered(n int) bool { return f.br.Buffered() >= n }

// readFrame reads one frame, reserving its size in the stream's resource
// scope while it is held. The returned release func must be called.
func (f *framer) readFrame(scope network.StreamScope, max int) ([]byte, func(), error) {
	n, err := f.r.NextMsgLen()
	if err != nil {
		return nil, nil, err
	}
	if n > max {
		return nil, nil, ErrFrameTooLarge
	}
	if scope != nil && n > 0 {
		if err := scope.ReserveMemory(n, network.ReservationPriorityAlways); err != nil {
			return nil, nil, fmt.Errorf("%w: %w", errNoMemory, err)
		}
	}
	msg, err := f.r.ReadMsg()
	release := func() {
		if msg != nil {
			f.r.ReleaseMsg(msg)
		}
		if scope != nil && n > 0 {
			scope.ReleaseMemory(n)
		}
	}
	if err != nil {
		release()
		return nil, nil, err
	}
	return msg, release, nil
}

func (f *framer) writeEnvelope(e *envelope.Envelope) error {
	b, err := envelope.Marshal(e)
	if err != nil {
		return err
	}
	return f.w.WriteMsg(b)
}
