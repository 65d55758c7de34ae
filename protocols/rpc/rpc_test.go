package rpc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/protocols/envelope"
)

func TestRoundTrip(t *testing.T) {
	for _, nt := range nets {
		t.Run(nt.name, func(t *testing.T) {
			n := nt.make(t)
			var gotRemote peer.ID
			var gotReq *envelope.Envelope
			outcomes := serve(t, n.srv, NewServer(ServerOptions{Sender: "worker-1"}, map[string]Handler{
				envelope.ActionCommandRequest: func(_ context.Context, remote peer.ID, req *envelope.Envelope) (any, error) {
					gotRemote, gotReq = remote, req
					var c envelope.CommandRequest
					if err := req.DecodePayload(&c); err != nil {
						return nil, err
					}
					return envelope.CommandResult{CommandID: c.CommandID, Status: envelope.StateSuccess}, nil
				},
			}))
			c := NewClient(n.cli, ClientOptions{Sender: "kernel"})
			defer c.Close()

			req, err := envelope.NewRequest(envelope.ActionCommandRequest, c.Sender(), envelope.CommandRequest{CommandID: "c1", Command: "reboot"})
			require.NoError(t, err)
			req.DeviceID = "miner-1"
			reply, err := c.Call(ctxT(t), n.srv.ID(), testProto, req)
			require.NoError(t, err)

			require.Equal(t, n.cli.ID(), gotRemote)
			require.Equal(t, req, gotReq, "the handler sees the request as sent")
			require.Equal(t, envelope.TypeResponse, reply.Type)
			require.Equal(t, envelope.ActionCommandResult, reply.Action)
			require.Equal(t, req.ID, reply.ReplyTo)
			require.Equal(t, "worker-1", reply.Sender)
			require.Equal(t, "kernel", reply.Target)
			require.Equal(t, "miner-1", reply.DeviceID)
			require.Nil(t, reply.Error)
			require.JSONEq(t, `{"commandId":"c1","status":"SUCCESS"}`, string(reply.Payload))

			// The Request helper decodes the payload.
			var res envelope.CommandResult
			require.NoError(t, c.Request(ctxT(t), n.srv.ID(), testProto, envelope.ActionCommandRequest, "miner-1",
				envelope.CommandRequest{CommandID: "c2", Command: "reboot"}, &res))
			require.Equal(t, envelope.CommandResult{CommandID: "c2", Status: envelope.StateSuccess}, res)

			require.NoError(t, c.Close())
			o := nextOutcome(t, outcomes)
			require.Equal(t, Outcome{Requests: 2, Closed: true}, o, "one stream served both, closed when the client closed it")
		})
	}
}

func TestSequentialCallsReuseOneStream(t *testing.T) {
	for _, nt := range nets {
		t.Run(nt.name, func(t *testing.T) {
			n := nt.make(t)
			outcomes := serve(t, n.srv, NewServer(ServerOptions{}, map[string]Handler{envelope.ActionHealthPing: echo}))
			c := NewClient(n.cli, ClientOptions{})
			const calls = 50
			for i := range calls {
				reply, err := c.Call(ctxT(t), n.srv.ID(), testProto, newReq(t, envelope.ActionHealthPing, map[string]int{"seq": i}))
				require.NoError(t, err)
				require.JSONEq(t, fmt.Sprintf(`{"seq":%d}`, i), string(reply.Payload))
			}
			require.Equal(t, ClientStats{Calls: calls, Fresh: 1, Reused: calls - 1}, c.Stats())
			require.NoError(t, c.Close())
			require.NoError(t, c.Close(), "Close is idempotent")
			require.Equal(t, Outcome{Requests: calls, Closed: true}, nextOutcome(t, outcomes))

			_, err := c.Call(ctxT(t), n.srv.ID(), testProto, newReq(t, envelope.ActionHealthPing, nil))
			require.ErrorIs(t, err, ErrClosed)
		})
	}
}

func TestConcurrentCalls(t *testing.T) {
	for _, nt := range nets {
		t.Run(nt.name, func(t *testing.T) {
			n := nt.make(t)
			// The first `overlap` requests wait for each other: proof that
			// calls run at the same time, on different streams.
			const overlap = 4
			var arrived atomic.Int32
			together := make(chan struct{})
			serve(t, n.srv, NewServer(ServerOptions{}, map[string]Handler{
				envelope.ActionHealthPing: func(ctx context.Context, p peer.ID, req *envelope.Envelope) (any, error) {
					if k := arrived.Add(1); k <= overlap {
						if k == overlap {
							close(together)
						}
						select {
						case <-together:
						case <-ctx.Done():
							return nil, errors.New("calls did not overlap")
						}
					}
					return echo(ctx, p, req)
				},
			}))
			c := NewClient(n.cli, ClientOptions{})
			defer c.Close()

			const workers, perWorker = 32, 20
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			var wg sync.WaitGroup
			errs := make(chan error, workers*perWorker)
			for w := range workers {
				wg.Go(func() {
					for i := range perWorker {
						want := fmt.Sprintf(`{"w":%d,"i":%d}`, w, i)
						reply, err := c.Call(ctx, n.srv.ID(), testProto, newReq(t, envelope.ActionHealthPing, json.RawMessage(want)))
						if err != nil {
							errs <- err
							continue
						}
						if string(reply.Payload) != want {
							errs <- fmt.Errorf("reply %s to request %s", reply.Payload, want)
						}
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				require.NoError(t, err)
			}
			st := c.Stats()
			require.Equal(t, uint64(workers*perWorker), st.Calls)
			require.Equal(t, st.Calls, st.Fresh+st.Reused)
			require.Zero(t, st.Failed)
			require.Positive(t, st.Reused)
			require.GreaterOrEqual(t, st.Fresh, uint64(overlap), "overlapping calls use their own streams")

			c.mu.Lock()
			idle := len(c.idle[poolKey{n.srv.ID(), testProto}])
			c.mu.Unlock()
			require.LessOrEqual(t, idle, 8, "the pool keeps at most MaxIdlePerPeer idle streams")
		})
	}
}

func TestErrorReplies(t *testing.T) {
	for _, nt := range nets {
		t.Run(nt.name, func(t *testing.T) {
			n := nt.make(t)
			handlers := map[string]Handler{
				envelope.ActionDeviceCapabilities: func(context.Context, peer.ID, *envelope.Envelope) (any, error) {
					return nil, envelope.Errf(envelope.CodeDeviceNotFound, "%s", "miner-9")
				},
				envelope.ActionCommandStatus: func(context.Context, peer.ID, *envelope.Envelope) (any, error) {
					return nil, fmt.Errorf("lookup: %w", envelope.Err(envelope.CodeCommandNotFound))
				},
				envelope.ActionStatePull: func(context.Context, peer.ID, *envelope.Envelope) (any, error) {
					return nil, errors.New("disk on fire")
				},
				envelope.ActionTelemetryPull: func(context.Context, peer.ID, *envelope.Envelope) (any, error) {
					return func() {}, nil // not JSON
				},
				envelope.ActionHealthPing: echo,
			}
			outcomes := serve(t, n.srv, NewServer(ServerOptions{}, handlers))
			c := NewClient(n.cli, ClientOptions{})

			for _, tc := range []struct {
				action, code, msg string
			}{
				{envelope.ActionWorkerList, envelope.CodeUnknownAction, "ERR_UNKNOWN_ACTION: worker.list"},
				{envelope.ActionDeviceCapabilities, envelope.CodeDeviceNotFound, "ERR_DEVICE_NOT_FOUND: miner-9"},
				{envelope.ActionCommandStatus, envelope.CodeCommandNotFound, "ERR_COMMAND_NOT_FOUND"},
				{envelope.ActionStatePull, envelope.CodeInternal, "ERR_INTERNAL: disk on fire"},
				{envelope.ActionTelemetryPull, envelope.CodeInternal, ""},
			} {
				req := newReq(t, tc.action, nil)
				reply, err := c.Call(ctxT(t), n.srv.ID(), testProto, req)
				require.NoError(t, err, "an error reply is a successful exchange")
				require.NotNil(t, reply.Error, tc.action)
				require.Equal(t, tc.code, reply.Error.Code)
				if tc.msg != "" {
					require.Equal(t, tc.msg, reply.Error.Message)
				}
				require.Equal(t, req.ID, reply.ReplyTo)
				require.Equal(t, envelope.ResponseAction(tc.action), reply.Action)

				// Request returns the structured error as the error.
				err = c.Request(ctxT(t), n.srv.ID(), testProto, tc.action, "", nil, nil)
				require.ErrorIs(t, err, &envelope.Error{Code: tc.code})
			}
			// Error replies keep the stream: all of it went over one.
			require.NoError(t, c.Request(ctxT(t), n.srv.ID(), testProto, envelope.ActionHealthPing, "", nil, nil))
			require.Equal(t, uint64(1), c.Stats().Fresh)
			require.NoError(t, c.Close())
			require.Equal(t, Outcome{Requests: 11, Closed: true}, nextOutcome(t, outcomes))
		})
	}
}

func TestHandlerPanicResetsStream(t *testing.T) {
	for _, nt := range nets {
		t.Run(nt.name, func(t *testing.T) {
			n := nt.make(t)
			srv := NewServer(ServerOptions{}, map[string]Handler{
				envelope.ActionCommandRequest: func(context.Context, peer.ID, *envelope.Envelope) (any, error) {
					panic("handler bug")
				},
				envelope.ActionHealthPing: echo,
			})
			n.srv.SetStreamHandler(testProto, srv.HandleStream)
			c := NewClient(n.cli, ClientOptions{})
			defer c.Close()

			require.NoError(t, c.Request(ctxT(t), n.srv.ID(), testProto, envelope.ActionHealthPing, "", nil, nil))
			_, err := c.Call(ctxT(t), n.srv.ID(), testProto, newReq(t, envelope.ActionCommandRequest, nil))
			require.Error(t, err)
			require.True(t, isReset(err), "the stream is reset, not closed: %v", err)
			require.False(t, IsNotDelivered(err), "the request reached the handler")

			// The server lives on; the broken stream left the pool.
			require.NoError(t, c.Request(ctxT(t), n.srv.ID(), testProto, envelope.ActionHealthPing, "", nil, nil))
			require.Equal(t, ClientStats{Calls: 3, Fresh: 2, Reused: 1, Failed: 1}, c.Stats())
		})
	}
}

func TestAllowPeer(t *testing.T) {
	for _, nt := range nets {
		t.Run(nt.name, func(t *testing.T) {
			n := nt.make(t)
			var ran atomic.Bool
			var asked atomic.Value
			outcomes := serve(t, n.srv, NewServer(ServerOptions{
				AllowPeer: func(p peer.ID) bool { asked.Store(p); return false },
			}, map[string]Handler{
				envelope.ActionHealthPing: func(ctx context.Context, p peer.ID, req *envelope.Envelope) (any, error) {
					ran.Store(true)
					return nil, nil
				},
			}))
			c := NewClient(n.cli, ClientOptions{})
			defer c.Close()
			reply, err := c.Call(ctxT(t), n.srv.ID(), testProto, newReq(t, envelope.ActionHealthPing, nil))
			require.Error(t, err)
			require.Nil(t, reply, "no reply")
			require.True(t, isReset(err), "%v", err)
			o := nextOutcome(t, outcomes)
			require.ErrorIs(t, o.Err, errPeerNotAllowed)
			require.False(t, o.Closed)
			require.False(t, ran.Load())
			require.Equal(t, n.cli.ID(), asked.Load())
		})
	}
}

func TestAuthorize(t *testing.T) {
	n := newMockNet(t)
	var calls atomic.Int32
	serve(t, n.srv, NewServer(ServerOptions{
		Authorize: func(p peer.ID, action string) error {
			if p != n.cli.ID() {
				return errors.New("who?")
			}
			switch action {
			case envelope.ActionWorkerTerminate:
				return envelope.Errf(envelope.CodeForbidden, "%s needs admin", action)
			case envelope.ActionCommandCancel:
				return errors.New("policy store down")
			}
			return nil
		},
	}, map[string]Handler{
		envelope.ActionWorkerTerminate: func(context.Context, peer.ID, *envelope.Envelope) (any, error) { calls.Add(1); return nil, nil },
		envelope.ActionCommandCancel:   func(context.Context, peer.ID, *envelope.Envelope) (any, error) { calls.Add(1); return nil, nil },
		envelope.ActionWorkerList:      func(context.Context, peer.ID, *envelope.Envelope) (any, error) { calls.Add(1); return nil, nil },
	}))
	c := NewClient(n.cli, ClientOptions{})
	defer c.Close()

	err := c.Request(ctxT(t), n.srv.ID(), testProto, envelope.ActionWorkerTerminate, "", envelope.WorkerRef{WorkerID: "w"}, nil)
	require.EqualError(t, err, "ERR_FORBIDDEN: worker.terminate needs admin")
	err = c.Request(ctxT(t), n.srv.ID(), testProto, envelope.ActionCommandCancel, "", nil, nil)
	require.ErrorIs(t, err, &envelope.Error{Code: envelope.CodeInternal})
	require.Zero(t, calls.Load(), "refused actions never reach their handler")
	require.NoError(t, c.Request(ctxT(t), n.srv.ID(), testProto, envelope.ActionWorkerList, "", nil, nil))
	require.Equal(t, int32(1), calls.Load())
}

// A caller that half-closes after its request (as a one-shot JS client does)
// still gets the reply, and the server closes the stream rather than resetting it.
func TestHalfCloseGetsReplyAndClose(t *testing.T) {
	for _, nt := range nets {
		t.Run(nt.name, func(t *testing.T) {
			n := nt.make(t)
			outcomes := serve(t, n.srv, NewServer(ServerOptions{}, map[string]Handler{envelope.ActionHealthPing: echo}))
			s := openRaw(t, n)
			req := newReq(t, envelope.ActionHealthPing, map[string]string{"hello": "world"})
			s.sendEnvelope(t, req)
			require.NoError(t, s.CloseWrite())

			reply, err := s.recv(t)
			require.NoError(t, err)
			require.Equal(t, req.ID, reply.ReplyTo)
			require.JSONEq(t, `{"hello":"world"}`, string(reply.Payload))
			_, err = s.recv(t)
			require.ErrorIs(t, err, io.EOF, "a clean end of stream, not a reset")
			require.Equal(t, Outcome{Requests: 1, Closed: true}, nextOutcome(t, outcomes))
		})
	}
}

func TestBadInputFromRawStream(t *testing.T) {
	good := func(tb testing.TB) []byte {
		b, err := envelope.Marshal(newReq(tb, envelope.ActionHealthPing, nil))
		require.NoError(tb, err)
		return b
	}
	const limit = 1024
	tests := []struct {
		name  string
		frame func(testing.TB) []byte
		code  string // the error reply; the stream stays usable
	}{
		{"invalid JSON", func(testing.TB) []byte { return []byte(`{"id":"x",`) }, envelope.CodeEnvelopeMalformed},
		{"empty frame", func(testing.TB) []byte { return nil }, envelope.CodeEnvelopeMalformed},
		{"not an object", func(testing.TB) []byte { return []byte(`["health.ping"]`) }, envelope.CodeEnvelopeNotObject},
		{"id a number", func(testing.TB) []byte {
			return []byte(`{"id":7,"version":"0.2.0","type":"request","action":"health.ping","sender":"s","timestamp":1}`)
		}, envelope.CodeEnvelopeIDMissing},
		{"version missing", func(testing.TB) []byte {
			return []byte(`{"id":"x","type":"request","action":"health.ping","sender":"s","timestamp":1}`)
		}, envelope.CodeEnvelopeVersionMissing},
		{"unknown action", func(testing.TB) []byte {
			return []byte(`{"id":"x","version":"0.2.0","type":"request","action":"rm.rf","sender":"s","timestamp":1}`)
		}, envelope.CodeEnvelopeActionUnknown},
		{"timestamp false", func(testing.TB) []byte {
			return []byte(`{"id":"x","version":"0.2.0","type":"request","action":"health.ping","sender":"s","timestamp":false}`)
		}, envelope.CodeEnvelopeTimestampInvalid},
		{"major version 1", func(testing.TB) []byte {
			return []byte(`{"id":"x","version":"1.0.0","type":"request","action":"health.ping","sender":"s","timestamp":1}`)
		}, envelope.CodeEnvelopeVersionUnsupported},
		{"a response sent as a request", func(tb testing.TB) []byte {
			return []byte(`{"id":"x","version":"0.2.0","type":"response","action":"health.pong","sender":"s","timestamp":1}`)
		}, envelope.CodeEnvelopeTypeInvalid},
		{"largest allowed frame", func(tb testing.TB) []byte {
			b := good(tb)
			pad := limit - len(b) - len(`,"pad":""`)
			return append(b[:len(b)-1], []byte(fmt.Sprintf(`,"pad":"%0*d"}`, pad, 0))...)
		}, ""},
	}
	for _, nt := range nets {
		t.Run(nt.name, func(t *testing.T) {
			n := nt.make(t)
			outcomes := serve(t, n.srv, NewServer(ServerOptions{MaxRequestSize: limit}, map[string]Handler{envelope.ActionHealthPing: echo}))

			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					s := openRaw(t, n)
					frame := tt.frame(t)
					require.LessOrEqual(t, len(frame), limit)
					s.send(t, frame)
					reply, err := s.recv(t)
					require.NoError(t, err)
					require.Equal(t, envelope.TypeResponse, reply.Type)
					if tt.code == "" {
						require.Nil(t, reply.Error)
					} else {
						require.NotNil(t, reply.Error)
						require.Equal(t, tt.code, reply.Error.Code, reply.Error.Message)
						var probe struct{ ID any }
						if json.Unmarshal(frame, &probe) == nil {
							if id, ok := probe.ID.(string); ok {
								require.Equal(t, id, reply.ReplyTo, "the error names the request when it can")
							}
						}
					}
					// The stream still serves a good request, then closes cleanly.
					req := newReq(t, envelope.ActionHealthPing, nil)
					s.sendEnvelope(t, req)
					reply, err = s.recv(t)
					require.NoError(t, err)
					require.Equal(t, req.ID, reply.ReplyTo)
					require.NoError(t, s.CloseWrite())
					require.Equal(t, Outcome{Requests: 2, Closed: true}, nextOutcome(t, outcomes))
				})
			}

			t.Run("frame over the limit", func(t *testing.T) {
				s := openRaw(t, n)
				var hdr [10]byte
				k := putUvarint(hdr[:], limit+1)
				_, err := s.Write(append(hdr[:k], `{"id":"x"`...))
				require.NoError(t, err)
				reply, err := s.recv(t)
				if err == nil {
					require.NotNil(t, reply.Error)
					require.Equal(t, envelope.CodeFrameTooLarge, reply.Error.Code)
					_, err = s.recv(t)
				}
				require.True(t, isReset(err), "the stream ends in a reset: %v", err)
				o := nextOutcome(t, outcomes)
				require.ErrorIs(t, o.Err, ErrFrameTooLarge)
				require.False(t, o.Closed)
			})

			t.Run("non-minimal varint", func(t *testing.T) {
				s := openRaw(t, n)
				_, err := s.Write([]byte{0x80, 0x00})
				require.NoError(t, err)
				_, err = s.recv(t)
				require.True(t, isReset(err), "%v", err)
				require.Error(t, nextOutcome(t, outcomes).Err)
			})

			for name, partial := range map[string][]byte{"length then end of stream": {50}, "part of a frame then end of stream": {50, '{'}} {
				t.Run(name, func(t *testing.T) {
					s := openRaw(t, n)
					_, err := s.Write(partial)
					require.NoError(t, err)
					require.NoError(t, s.CloseWrite())
					_, err = s.recv(t)
					require.True(t, isReset(err), "a truncated frame is an error, and gets no reply (no ERR_BUSY): %v", err)
					o := nextOutcome(t, outcomes)
					require.Error(t, o.Err)
					require.False(t, o.Closed)
				})
			}
		})
	}
}

// The peerstore says the peer speaks the protocol (identify did, then the
// handler went away): libp2p selects it lazily, the request goes out with
// the multistream header, and the refusal shows only when the reply is read,
// as "na" or as the host's negotiation-failed reset, whichever comes first.
// Real TCP only: mocknet streams drop reset error codes.
func TestNotDeliveredLazyNegotiation(t *testing.T) {
	n := newTCPNet(t)
	const absent = "/ork/absent/1"
	c := NewClient(n.cli, ClientOptions{})
	defer c.Close()
	for range 20 { // both orders of the race
		require.NoError(t, n.cli.Peerstore().AddProtocols(n.srv.ID(), absent))
		_, err := c.Call(ctxT(t), n.srv.ID(), absent, newReq(t, envelope.ActionHealthPing, nil))
		require.True(t, IsNotDelivered(err), "lazy negotiation failure is not-delivered too: %v", err)
		supported, err := n.cli.Peerstore().SupportsProtocols(n.srv.ID(), absent)
		require.NoError(t, err)
		require.Empty(t, supported, "the client forgot the protocol")
	}
}

func randomPeer(t *testing.T) peer.ID {
	k, _, err := crypto.GenerateEd25519Key(nil)
	require.NoError(t, err)
	id, err := peer.IDFromPrivateKey(k)
	require.NoError(t, err)
	return id
}

// stingyStream's resource scope refuses every memory reservation.
type stingyStream struct{ network.Stream }

func (stingyStream) Scope() network.StreamScope { return stingyScope{&network.NullScope{}} }

type stingyScope struct{ *network.NullScope }

func (stingyScope) ReserveMemory(int, uint8) error { return network.ErrResourceLimitExceeded }

// When the resource manager refuses a frame's memory the caller is told to
// back off (ERR_BUSY, best effort: the reset that follows may overtake it)
// and the stream is reset.
func TestNoMemoryForFrame(t *testing.T) {
	for _, nt := range nets {
		t.Run(nt.name, func(t *testing.T) {
			n := nt.make(t)
			srv := NewServer(ServerOptions{}, map[string]Handler{envelope.ActionHealthPing: echo})
			outcomes := make(chan Outcome, 1)
			n.srv.SetStreamHandler(testProto, func(st network.Stream) { outcomes <- srv.serveStream(stingyStream{st}) })
			s := openRaw(t, n)
			s.sendEnvelope(t, newReq(t, envelope.ActionHealthPing, nil))
			reply, err := s.recv(t)
			if err == nil {
				require.Equal(t, envelope.CodeBusy, reply.Error.Code)
				_, err = s.recv(t)
			}
			require.True(t, isReset(err), "%v", err)
			o := nextOutcome(t, outcomes)
			require.ErrorIs(t, o.Err, errNoMemory)
			require.ErrorIs(t, o.Err, network.ErrResourceLimitExceeded)
		})
	}
}

func putUvarint(b []byte, x uint64) int {
	i := 0
	for x >= 0x80 {
		b[i] = byte(x) | 0x80
		x >>= 7
		i++
	}
	b[i] = byte(x)
	return i + 1
}

// A request that starts (a length prefix) and then stalls is reset within the
// server's ReadTimeout. Real TCP: mocknet streams ignore deadlines.
func TestStalledRequestIsReset(t *testing.T) {
	n := newTCPNet(t)
	const readTimeout = 200 * time.Millisecond
	outcomes := serve(t, n.srv, NewServer(ServerOptions{ReadTimeout: readTimeout}, map[string]Handler{envelope.ActionHealthPing: echo}))
	s := openRaw(t, n)
	start := time.Now()
	_, err := s.Write([]byte{100, '{', '"'})
	require.NoError(t, err)

	o := nextOutcome(t, outcomes)
	elapsed := time.Since(start)
	require.True(t, isTimeout(o.Err), "reset for the read deadline: %v", o.Err)
	require.False(t, o.Closed)
	require.GreaterOrEqual(t, elapsed, readTimeout)
	require.Less(t, elapsed, readTimeout+2*time.Second)
	_, err = s.recv(t)
	require.True(t, isReset(err), "the stalled peer sees a reset: %v", err)
}

// The server closes an idle stream cleanly; a client whose pool still holds
// it retries on a fresh stream, transparently. Real TCP: mocknet streams
// ignore deadlines.
func TestIdleTimeoutClosesAndPoolRecovers(t *testing.T) {
	n := newTCPNet(t)
	outcomes := serve(t, n.srv, NewServer(ServerOptions{IdleTimeout: 200 * time.Millisecond}, map[string]Handler{envelope.ActionHealthPing: echo}))
	c := NewClient(n.cli, ClientOptions{}) // client idle timeout 30 s: longer than the server's
	defer c.Close()

	require.NoError(t, c.Request(ctxT(t), n.srv.ID(), testProto, envelope.ActionHealthPing, "", nil, nil))
	require.Equal(t, Outcome{Requests: 1, Closed: true}, nextOutcome(t, outcomes), "idle: closed, not reset")

	req := newReq(t, envelope.ActionHealthPing, map[string]int{"n": 2})
	reply, err := c.Call(ctxT(t), n.srv.ID(), testProto, req)
	require.NoError(t, err)
	require.Equal(t, req.ID, reply.ReplyTo)
	require.Equal(t, ClientStats{Calls: 2, Fresh: 2, Reused: 1, Stale: 1}, c.Stats())

	// The fresh stream went back to the pool and is used next.
	require.NoError(t, c.Request(ctxT(t), n.srv.ID(), testProto, envelope.ActionHealthPing, "", nil, nil))
	require.Equal(t, ClientStats{Calls: 3, Fresh: 2, Reused: 2, Stale: 1}, c.Stats())
}

func TestClientPoolHousekeeping(t *testing.T) {
	n := newMockNet(t)
	serve(t, n.srv, NewServer(ServerOptions{}, map[string]Handler{envelope.ActionHealthPing: echo}))
	ping := func(c *Client) {
		t.Helper()
		require.NoError(t, c.Request(ctxT(t), n.srv.ID(), testProto, envelope.ActionHealthPing, "", nil, nil))
	}
	idle := func(c *Client) int {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.idle[poolKey{n.srv.ID(), testProto}])
	}

	// Pooling disabled: a fresh stream per call, nothing kept.
	c := NewClient(n.cli, ClientOptions{MaxIdlePerPeer: -1})
	ping(c)
	ping(c)
	require.Equal(t, ClientStats{Calls: 2, Fresh: 2}, c.Stats())
	require.Zero(t, idle(c))
	require.NoError(t, c.Close())

	// The client's own idle timeout: an expired stream is closed, not used.
	c = NewClient(n.cli, ClientOptions{IdleTimeout: time.Nanosecond})
	ping(c)
	require.Equal(t, 1, idle(c))
	ping(c)
	require.Equal(t, ClientStats{Calls: 2, Fresh: 2}, c.Stats())
	c.Trim()
	require.Zero(t, idle(c), "Trim drops expired streams")
	require.NoError(t, c.Close())

	// DropPeer empties the peer's pool.
	c = NewClient(n.cli, ClientOptions{})
	ping(c)
	require.Equal(t, 1, idle(c))
	c.Trim()
	require.Equal(t, 1, idle(c), "Trim keeps live streams")
	c.DropPeer(n.srv.ID())
	require.Zero(t, idle(c))
	ping(c)
	require.Equal(t, ClientStats{Calls: 2, Fresh: 2}, c.Stats())
	require.NoError(t, c.Close())
}

func TestContextCancelledMidCall(t *testing.T) {
	for _, nt := range nets {
		t.Run(nt.name, func(t *testing.T) {
			n := nt.make(t)
			started := make(chan struct{}, 1)
			release := make(chan struct{})
			outcomes := serve(t, n.srv, NewServer(ServerOptions{}, map[string]Handler{
				envelope.ActionCommandWait: func(ctx context.Context, _ peer.ID, _ *envelope.Envelope) (any, error) {
					started <- struct{}{}
					<-release
					return nil, nil
				},
				envelope.ActionHealthPing: echo,
			}))
			c := NewClient(n.cli, ClientOptions{})
			defer c.Close()

			for _, cause := range []error{context.Canceled, context.DeadlineExceeded} {
				ctx, cancel := context.WithCancel(context.Background())
				if cause == context.DeadlineExceeded {
					ctx, cancel = context.WithTimeout(context.Background(), 300*time.Millisecond)
				}
				done := make(chan error, 1)
				go func() {
					_, err := c.Call(ctx, n.srv.ID(), testProto, newReq(t, envelope.ActionCommandWait, nil))
					done <- err
				}()
				<-started
				if cause == context.Canceled {
					cancel()
				}
				select {
				case err := <-done:
					require.ErrorIs(t, err, cause)
					require.False(t, IsNotDelivered(err))
				case <-time.After(5 * time.Second):
					t.Fatal("Call did not return after its context ended")
				}
				cancel()
				release <- struct{}{} // let the handler finish; its reply hits a reset stream
				o := nextOutcome(t, outcomes)
				require.Error(t, o.Err, "the server's stream ends in a reset")
				require.False(t, o.Closed)
			}
			// The reset streams were not pooled.
			require.NoError(t, c.Request(ctxT(t), n.srv.ID(), testProto, envelope.ActionHealthPing, "", nil, nil))
			require.Equal(t, ClientStats{Calls: 3, Fresh: 3, Failed: 2}, c.Stats())
		})
	}
}

// badServer answers each request with what reply makes of it.
func badServer(t *testing.T, n *testNet, reply func(req *envelope.Envelope) []byte) {
	n.srv.SetStreamHandler(testProto, func(st network.Stream) {
		f := newFramer(st, 1<<20)
		for {
			msg, release, err := f.readFrame(nil, 1<<20)
			if err != nil {
				_ = st.Reset()
				return
			}
			req, err := envelope.Decode(msg)
			release()
			if err != nil {
				_ = st.Reset()
				return
			}
			if err := f.w.WriteMsg(reply(req)); err != nil {
				_ = st.Reset()
				return
			}
		}
	})
}

func TestBadReply(t *testing.T) {
	n := newMockNet(t)
	mode := atomic.Value{}
	badServer(t, n, func(req *envelope.Envelope) []byte {
		r, err := req.Reply("bad", nil, nil)
		require.NoError(t, err)
		switch mode.Load() {
		case "wrong replyTo":
			r.ReplyTo = "someone-else"
		case "no replyTo":
			r.ReplyTo = ""
		case "error without replyTo":
			r.ReplyTo, r.Error = "", envelope.Err(envelope.CodeBusy)
		case "not an envelope":
			return []byte(`{"hello":1}`)
		case "not JSON":
			return []byte(`<html>`)
		}
		b, err := envelope.Marshal(r)
		require.NoError(t, err)
		return b
	})
	c := NewClient(n.cli, ClientOptions{})
	defer c.Close()
	for _, m := range []string{"wrong replyTo", "no replyTo", "not an envelope", "not JSON"} {
		mode.Store(m)
		_, err := c.Call(ctxT(t), n.srv.ID(), testProto, newReq(t, envelope.ActionHealthPing, nil))
		require.ErrorIs(t, err, ErrBadReply, m)
		require.False(t, IsNotDelivered(err))
	}
	// An error reply that could not name the request (e.g. its frame did not
	// parse) is accepted as the reply.
	mode.Store("error without replyTo")
	reply, err := c.Call(ctxT(t), n.srv.ID(), testProto, newReq(t, envelope.ActionHealthPing, nil))
	require.NoError(t, err)
	require.Equal(t, envelope.CodeBusy, reply.Error.Code)
	mode.Store("ok")
	_, err = c.Call(ctxT(t), n.srv.ID(), testProto, newReq(t, envelope.ActionHealthPing, nil))
	require.NoError(t, err)
	require.Equal(t, ClientStats{Calls: 6, Fresh: 5, Reused: 1, Failed: 4}, c.Stats(), "a stream with a bad reply is never reused")
}

func TestReplyOverClientLimit(t *testing.T) {
	n := newMockNet(t)
	serve(t, n.srv, NewServer(ServerOptions{}, map[string]Handler{
		envelope.ActionTelemetryPull: func(context.Context, peer.ID, *envelope.Envelope) (any, error) {
			return map[string]string{"blob": string(make([]byte, 4096))}, nil
		},
	}))
	c := NewClient(n.cli, ClientOptions{MaxResponseSize: func(protocol.ID) int { return 1024 }})
	defer c.Close()
	err := c.Request(ctxT(t), n.srv.ID(), testProto, envelope.ActionTelemetryPull, "", nil, nil)
	require.ErrorIs(t, err, ErrFrameTooLarge)
}

func TestNotDelivered(t *testing.T) {
	for _, nt := range nets {
		t.Run(nt.name, func(t *testing.T) {
			n := nt.make(t)
			const absent = "/ork/absent/1"
			serve(t, n.srv, NewServer(ServerOptions{}, map[string]Handler{envelope.ActionHealthPing: echo}))
			c := NewClient(n.cli, ClientOptions{})
			defer c.Close()

			// The peer never offered the protocol: negotiation fails up front.
			_, err := c.Call(ctxT(t), n.srv.ID(), absent, newReq(t, envelope.ActionHealthPing, nil))
			require.True(t, IsNotDelivered(err), "%v", err)

			// An unknown peer cannot be reached.
			_, err = c.Call(ctxT(t), randomPeer(t), testProto, newReq(t, envelope.ActionHealthPing, nil))
			require.True(t, IsNotDelivered(err), "%v", err)

			// A context that ends before the stream opens: not delivered, and the cause shows.
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			_, err = c.Call(ctx, n.srv.ID(), testProto, newReq(t, envelope.ActionHealthPing, nil))
			require.True(t, IsNotDelivered(err), "%v", err)
			require.ErrorIs(t, err, context.Canceled)

			// Delivered-but-failed is not "not delivered".
			require.False(t, IsNotDelivered(fmt.Errorf("read: %w", network.ErrReset)))
		})
	}
}
