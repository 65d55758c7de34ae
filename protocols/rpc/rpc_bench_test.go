package rpc

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"testing"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-msgio"

	"github.com/orknode/ork/protocols/envelope"
)

// Benchmarks on real hosts over 127.0.0.1 TCP (TLS 1.3/Noise + yamux), not
// mocknet, so the figures compare with LIBP2P-NOTES §7.1 (65 µs per exchange
// on a reused stream, 263 µs on a fresh one). Run all three in one
// invocation to get the pooled/raw ratio on the same machine state:
//
//	go test -run '^$' -bench . -benchmem -benchtime 2000x -count 3 ./protocols/rpc

const benchPingProto protocol.ID = "/ork/bench/ping/1.0.0"

const warmup = 50

func benchCall(b *testing.B, opts ClientOptions) {
	n := newTCPNet(b)
	srv := NewServer(ServerOptions{Sender: "worker-bench"}, map[string]Handler{
		envelope.ActionHealthPing: func(context.Context, peer.ID, *envelope.Envelope) (any, error) {
			return envelope.HealthPong{Status: "OK", UptimeMs: 1000}, nil
		},
	})
	n.srv.SetStreamHandler(testProto, srv.HandleStream)
	c := NewClient(n.cli, opts)
	defer c.Close()
	ctx := context.Background()
	call := func() {
		req, err := envelope.NewRequest(envelope.ActionHealthPing, "kernel", nil)
		if err != nil {
			b.Fatal(err)
		}
		reply, err := c.Call(ctx, n.srv.ID(), testProto, req)
		if err != nil {
			b.Fatal(err)
		}
		if reply.Error != nil {
			b.Fatal(reply.Error)
		}
	}
	for range warmup {
		call()
	}
	b.ReportAllocs()
	for b.Loop() {
		call()
	}
	st := c.Stats()
	b.ReportMetric(float64(st.Fresh), "fresh-streams")
}

// BenchmarkCallPooled: one health.ping request/response through Client.Call
// and Server on a reused stream, envelopes built, encoded, decoded and
// validated on both sides.
func BenchmarkCallPooled(b *testing.B) { benchCall(b, ClientOptions{}) }

// BenchmarkCallFresh: the same with pooling off, a fresh stream per call.
func BenchmarkCallFresh(b *testing.B) { benchCall(b, ClientOptions{MaxIdlePerPeer: -1}) }

// pingMsg is the ~25 B JSON body of the LIBP2P-NOTES §4 ping.
type pingMsg struct {
	Seq int    `json:"seq"`
	Msg string `json:"msg"`
}

// BenchmarkRawReusedStream is the floor: a go-libp2p stream reused for
// msgio varint ping-pong of a ~25 B JSON body, no envelope, no pool (the
// LIBP2P-NOTES §4 framing, measured as in §7.1).
func BenchmarkRawReusedStream(b *testing.B) {
	n := newTCPNet(b)
	n.srv.SetStreamHandler(benchPingProto, func(s network.Stream) {
		r := msgio.NewVarintReaderSize(s, 1<<20)
		w := msgio.NewVarintWriter(s)
		for {
			msg, err := r.ReadMsg()
			if err != nil {
				if errors.Is(err, io.EOF) {
					_ = s.Close()
				} else {
					_ = s.Reset()
				}
				return
			}
			var req pingMsg
			err = json.Unmarshal(msg, &req)
			r.ReleaseMsg(msg)
			if err != nil {
				_ = s.Reset()
				return
			}
			out, _ := json.Marshal(pingMsg{Seq: req.Seq, Msg: "pong"})
			if err := w.WriteMsg(out); err != nil {
				_ = s.Reset()
				return
			}
		}
	})
	s, err := n.cli.NewStream(context.Background(), n.srv.ID(), benchPingProto)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	r := msgio.NewVarintReaderSize(s, 1<<20)
	w := msgio.NewVarintWriter(s)
	seq := 0
	ping := func() {
		seq++
		body, _ := json.Marshal(pingMsg{Seq: seq, Msg: "ping"})
		if err := w.WriteMsg(body); err != nil {
			b.Fatal(err)
		}
		msg, err := r.ReadMsg()
		if err != nil {
			b.Fatal(err)
		}
		var resp pingMsg
		err = json.Unmarshal(msg, &resp)
		r.ReleaseMsg(msg)
		if err != nil || resp.Seq != seq {
			b.Fatalf("pong %+v, %v", resp, err)
		}
	}
	for range warmup {
		ping()
	}
	b.ReportAllocs()
	for b.Loop() {
		ping()
	}
}
