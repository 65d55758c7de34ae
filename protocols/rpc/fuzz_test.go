package rpc

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/protocols/envelope"
)

// FuzzServeFrame feeds arbitrary bytes to the server as one request frame
// (no network): it never panics and always answers with a valid response
// envelope that names the request when the request could be read. The same
// bytes are also read as a raw stream by the framer, which must not panic.
func FuzzServeFrame(f *testing.F) {
	srv := NewServer(ServerOptions{Sender: "fuzz-worker"}, map[string]Handler{
		envelope.ActionHealthPing: func(context.Context, peer.ID, *envelope.Envelope) (any, error) {
			return envelope.HealthPong{Status: "OK"}, nil
		},
		envelope.ActionCommandRequest: func(_ context.Context, _ peer.ID, req *envelope.Envelope) (any, error) {
			var c envelope.CommandRequest
			if err := req.DecodePayload(&c); err != nil {
				return nil, err
			}
			if err := c.Validate(); err != nil {
				return nil, err
			}
			params, err := json.Marshal(c.Params)
			if err != nil {
				return nil, err
			}
			return envelope.CommandResult{CommandID: c.CommandID, Status: envelope.StateSuccess, Result: params}, nil
		},
		envelope.ActionIdentityResponse: func(_ context.Context, _ peer.ID, req *envelope.Envelope) (any, error) {
			var r envelope.IdentityResponse
			if err := req.DecodePayload(&r); err != nil {
				return nil, err
			}
			return nil, r.Validate()
		},
	})
	golden, err := filepath.Glob(filepath.Join("..", "envelope", "testdata", "*.json"))
	require.NoError(f, err)
	for _, p := range golden {
		b, err := os.ReadFile(p)
		require.NoError(f, err)
		f.Add(b)
	}
	for _, s := range []string{
		`{"id":"a","version":"0.2.0","type":"request","action":"health.ping","sender":"k","timestamp":1}`,
		`{"id":"a","version":"0.2.0","type":"request","action":"command.request","sender":"k","timestamp":1,"payload":{"command":"reboot","targets":["m",5]}}`,
		`{"id":"a","version":"0.2.0","type":"request","action":"command.request","sender":"k","timestamp":1,"payload":{"command":"x","params":{"w":1},"scope":"rack"}}`,
		`{"id":"a","version":"0.2.0","type":"request","action":"identity.response","sender":"k","timestamp":1,"payload":{"workerId":"w","devices":[{}]}}`,
		`{"id":"a","version":"0.2.0","type":"request","action":"worker.list","sender":"k","timestamp":1}`,
		`{"id":5}`, `{"id":"b","type":"response"}`, `[]`, ``, "\x05hello", `{"id":"\ud800"}`,
	} {
		f.Add([]byte(s))
	}
	remote := peer.ID("fuzz-peer")
	f.Fuzz(func(t *testing.T, frame []byte) {
		reply := srv.answer(remote, frame)
		require.NotNil(t, reply)
		require.Equal(t, envelope.TypeResponse, reply.Type)
		require.Equal(t, "fuzz-worker", reply.Sender)
		require.NoError(t, reply.Validate())
		wire, err := envelope.Marshal(reply)
		require.NoError(t, err)
		back, err := envelope.Decode(wire)
		require.NoError(t, err, "the reply decodes: %s", wire)
		require.Equal(t, reply, back)

		req, derr := envelope.Decode(frame)
		switch {
		case derr != nil:
			require.Equal(t, envelope.ActionError, reply.Action)
			require.NotNil(t, reply.Error)
			require.Equal(t, envelope.CodeOf(derr), reply.Error.Code)
			var probe struct{ ID any }
			if json.Unmarshal(frame, &probe) == nil {
				if id, ok := probe.ID.(string); ok {
					require.Equal(t, id, reply.ReplyTo)
				}
			}
		default:
			require.Equal(t, req.ID, reply.ReplyTo)
			require.Equal(t, envelope.ResponseAction(req.Action), reply.Action)
			require.Equal(t, req.Sender, reply.Target)
			require.Equal(t, req.DeviceID, reply.DeviceID)
			if reply.Error != nil {
				require.NotEmpty(t, reply.Error.Code)
			}
		}

		// The same bytes as a stream of frames.
		fr := newFramer(struct {
			io.Reader
			io.Writer
		}{bytes.NewReader(frame), io.Discard}, 1<<10)
		for range 64 {
			msg, release, err := fr.readFrame(nil, 1<<10)
			if err != nil {
				break
			}
			require.NotNil(t, srv.answer(remote, msg))
			release()
		}
	})
}
