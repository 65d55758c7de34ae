package rpc

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/protocols/envelope"
)

// TestServerClose: after Close, a stream that was already open is reset at
// its next request instead of being answered (a Worker closed on a host that
// lives on must stop answering, not keep replying as if alive).
func TestServerClose(t *testing.T) {
	for _, nt := range nets {
		t.Run(nt.name, func(t *testing.T) {
			n := nt.make(t)
			srv := NewServer(ServerOptions{Sender: "srv"}, map[string]Handler{envelope.ActionHealthPing: echo})
			outcomes := serve(t, n.srv, srv)
			raw := openRaw(t, n)
			raw.sendEnvelope(t, newReq(t, envelope.ActionHealthPing, nil))
			reply, err := raw.recv(t)
			require.NoError(t, err)
			require.Nil(t, reply.Error)

			srv.Close()
			raw.sendEnvelope(t, newReq(t, envelope.ActionHealthPing, nil))
			_, err = raw.recv(t)
			require.Error(t, err, "no answer after Close")
			out := nextOutcome(t, outcomes)
			require.ErrorIs(t, out.Err, ErrServerClosed)
			require.Equal(t, 1, out.Requests)
		})
	}
}
