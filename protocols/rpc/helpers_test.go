package rpc

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	mocknet "github.com/libp2p/go-libp2p/p2p/net/mock"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	"github.com/libp2p/go-msgio"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/orknode/ork/protocols/envelope"
)

const testProto protocol.ID = "/ork/test/1.0.0"

func TestMain(m *testing.M) {
	// The hostile-input tests make the server log on purpose; keep the
	// output to the test results.
	slog.SetDefault(slog.New(slog.DiscardHandler))
	// Every test closes its hosts (mocknet.Close, host.Close), so no
	// goroutine may outlive the tests: neither ours nor libp2p's.
	goleak.VerifyTestMain(m)
}

// testNet is a client host connected to a server host.
type testNet struct {
	cli, srv host.Host
}

// nets are the two networks the protocol tests run on: mocknet (STYLE 12)
// and real hosts on 127.0.0.1 TCP (yamux: its deadline and close semantics
// differ from mocknet's, whose streams ignore deadlines).
var nets = []struct {
	name string
	make func(testing.TB) *testNet
}{
	{"mocknet", newMockNet},
	{"tcp", newTCPNet},
}

func newMockNet(tb testing.TB) *testNet {
	mn, err := mocknet.FullMeshConnected(2)
	require.NoError(tb, err)
	tb.Cleanup(func() { _ = mn.Close() })
	hs := mn.Hosts()
	return &testNet{cli: hs[0], srv: hs[1]}
}

func newTCPNet(tb testing.TB) *testNet {
	n := &testNet{cli: newTCPHost(tb), srv: newTCPHost(tb)}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(tb, n.cli.Connect(ctx, peer.AddrInfo{ID: n.srv.ID(), Addrs: n.srv.Addrs()}))
	return n
}

// newTCPHost is a loopback-only TCP host (LIBP2P-NOTES §2) with the stream
// limits raised (§5): no QUIC, relay, NAT port mapping, mDNS or bootstrap
// peers.
func newTCPHost(tb testing.TB) host.Host {
	sl := rcmgr.DefaultLimits
	libp2p.SetDefaultServiceLimits(&sl)
	part := rcmgr.PartialLimitConfig{
		System:    rcmgr.ResourceLimits{ConnsInbound: 4096, Conns: 4352, FD: 4352},
		Transient: rcmgr.ResourceLimits{ConnsInbound: 1024, Conns: 1024, FD: 1024},
		ProtocolPeer: map[protocol.ID]rcmgr.ResourceLimits{
			testProto:       {StreamsInbound: 1024, Streams: 2048},
			benchPingProto:  {StreamsInbound: 1024, Streams: 2048},
			"/ork/absent/1": {StreamsInbound: 16, Streams: 32},
		},
	}
	// WithMetricsDisabled: libp2p.DisableMetrics does not reach a resource
	// manager built here, whose stats reporter would otherwise run on every
	// frame's memory reservation (~15% of a pooled call's CPU).
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(part.Build(sl.AutoScale())), rcmgr.WithMetricsDisabled())
	require.NoError(tb, err)
	h, err := libp2p.New(
		libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"),
		libp2p.Transport(tcp.NewTCPTransport),
		libp2p.DisableRelay(),
		libp2p.ForceReachabilityPrivate(),
		libp2p.DisableMetrics(),
		libp2p.ResourceManager(rm),
	)
	require.NoError(tb, err)
	tb.Cleanup(func() { _ = h.Close() })
	return h
}

// serve installs srv on h and reports every stream's Outcome.
func serve(tb testing.TB, h host.Host, srv *Server) <-chan Outcome {
	outcomes := make(chan Outcome, 4096)
	h.SetStreamHandler(testProto, func(st network.Stream) { outcomes <- srv.serveStream(st) })
	tb.Cleanup(func() { h.RemoveStreamHandler(testProto) })
	return outcomes
}

func nextOutcome(tb testing.TB, outcomes <-chan Outcome) Outcome {
	tb.Helper()
	select {
	case o := <-outcomes:
		return o
	case <-time.After(10 * time.Second):
		tb.Fatal("no stream outcome within 10s")
		return Outcome{}
	}
}

func echo(_ context.Context, _ peer.ID, req *envelope.Envelope) (any, error) {
	return req.Payload, nil
}

func newReq(tb testing.TB, action string, payload any) *envelope.Envelope {
	e, err := envelope.NewRequest(action, "test-client", payload)
	require.NoError(tb, err)
	return e
}

func ctxT(tb testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	tb.Cleanup(cancel)
	return ctx
}

// rawStream is a stream to the server without the Client: the test writes
// and reads the frames itself.
type rawStream struct {
	network.Stream
	r msgio.ReadCloser
	w msgio.WriteCloser
}

func openRaw(tb testing.TB, n *testNet) *rawStream {
	s, err := n.cli.NewStream(ctxT(tb), n.srv.ID(), testProto)
	require.NoError(tb, err)
	tb.Cleanup(func() { _ = s.Reset() })
	return &rawStream{Stream: s, r: msgio.NewVarintReaderSize(s, 1<<20), w: msgio.NewVarintWriter(s)}
}

func (r *rawStream) send(tb testing.TB, body []byte) {
	tb.Helper()
	require.NoError(tb, r.w.WriteMsg(body))
}

func (r *rawStream) sendEnvelope(tb testing.TB, e *envelope.Envelope) {
	tb.Helper()
	b, err := envelope.Marshal(e)
	require.NoError(tb, err)
	r.send(tb, b)
}

func (r *rawStream) recv(tb testing.TB) (*envelope.Envelope, error) {
	tb.Helper()
	_ = r.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := r.r.ReadMsg()
	if err != nil {
		return nil, err
	}
	e, err := envelope.Decode(b)
	require.NoError(tb, err, "server replies are valid envelopes: %s", b)
	return e, nil
}

// isReset reports a stream reset as seen by the other side.
func isReset(err error) bool { return errors.Is(err, network.ErrReset) }

func mustJSON(tb testing.TB, v any) json.RawMessage {
	b, err := json.Marshal(v)
	require.NoError(tb, err)
	return b
}
