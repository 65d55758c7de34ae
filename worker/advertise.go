package worker

import (
	"context"
	"math/rand/v2"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/discovery/mdns"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"

	"github.com/orknode/ork/internal/p2p"
)

// Advertising cadences. The first Provide is retried with backoff because
// the routing table fills asynchronously after the bootstrap connection
// (LIBP2P-NOTES §9 pitfall 2).
const (
	provideTimeout     = 30 * time.Second
	provideMinBackoff  = 250 * time.Millisecond
	provideMaxBackoff  = 30 * time.Second
	connectTimeout     = 15 * time.Second
	reconnectMinDelay  = time.Second
	reconnectMaxDelay  = 30 * time.Second
	connectedCheckTick = 30 * time.Second
)

// disconnected wakes the keeper when the last connection to a bootstrap
// peer closes: the kernel notices a Worker when it connects, so the Worker
// stays connected.
func (w *Worker) disconnected(n network.Network, c network.Conn) {
	p := c.RemotePeer()
	if _, ok := w.boot[p]; !ok || n.Connectedness(p) == network.Connected {
		return
	}
	select {
	case w.reconnect <- struct{}{}:
	default:
	}
}

// keepConnected dials the bootstrap peers at start and redials any that
// drop, with jittered exponential backoff.
func (w *Worker) keepConnected() {
	backoff := reconnectMinDelay
	var wait time.Duration // first round at once
	first := true
	for {
		if !w.sleep(wait, w.reconnect) {
			return
		}
		missing := w.missingBootstrap()
		if len(missing) == 0 {
			backoff = reconnectMinDelay
			wait = connectedCheckTick
			if w.sleepUntilSignal(wait) {
				// A bootstrap peer dropped: give it a moment, then redial.
				wait = jitter(backoff)
				continue
			}
			return
		}
		ctx, cancel := context.WithTimeout(w.ctx, connectTimeout)
		n := p2p.ConnectBootstrap(ctx, w.h, missing)
		cancel()
		if w.ctx.Err() != nil {
			return
		}
		if n > 0 {
			if !first {
				w.log.Info("reconnected to bootstrap peers", "connected", n, "missing", len(missing)-n)
			}
			select {
			case w.provideNow <- struct{}{}:
			default:
			}
		}
		if n < len(missing) {
			w.log.Debug("bootstrap peers unreachable", "missing", len(missing)-n, "retryIn", backoff)
		}
		first = false
		wait = jitter(backoff)
		backoff = min(2*backoff, reconnectMaxDelay)
	}
}

func (w *Worker) missingBootstrap() []peer.AddrInfo {
	var out []peer.AddrInfo
	for id, ai := range w.boot {
		if w.h.Network().Connectedness(id) != network.Connected {
			out = append(out, ai)
		}
	}
	return out
}

// sleep waits d (or not at all when d is 0); false when the Worker closes.
// Signals on drain arriving meanwhile are consumed: the wake-up covers them.
func (w *Worker) sleep(d time.Duration, drain chan struct{}) bool {
	if d <= 0 {
		return w.ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-w.ctx.Done():
			return false
		case <-drain:
		case <-t.C:
			return true
		}
	}
}

// sleepUntilSignal waits d or until a bootstrap peer drops; false when the
// Worker closes.
func (w *Worker) sleepUntilSignal(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-w.ctx.Done():
		return false
	case <-w.reconnect:
		return true
	case <-t.C:
		return true
	}
}

func jitter(d time.Duration) time.Duration {
	return d/2 + rand.N(d) // [d/2, 3d/2)
}

// provideLoop announces the topic on the DHT: retried with backoff until it
// works, then again every ReprovideEvery, and at once after a bootstrap peer
// reconnects (a restarted kernel may have lost the record).
func (w *Worker) provideLoop() {
	backoff := provideMinBackoff
	announced := false
	for {
		ok := false
		if w.dht.RoutingTable().Size() > 0 {
			ctx, cancel := context.WithTimeout(w.ctx, provideTimeout)
			err := w.dht.Provide(ctx, w.topic, true)
			cancel()
			if w.ctx.Err() != nil {
				return
			}
			if err != nil {
				w.log.Debug("provide failed", "err", err, "retryIn", backoff)
			} else {
				ok = true
				w.provided.Add(1)
				if !announced {
					w.log.Info("advertised on the DHT", "topic", w.topic)
					announced = true
				}
			}
		}
		wait := w.cfg.ReprovideEvery
		if ok {
			backoff = provideMinBackoff
		} else {
			wait = backoff
			backoff = min(2*backoff, provideMaxBackoff)
		}
		t := time.NewTimer(wait)
		select {
		case <-w.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		case <-w.provideNow:
			t.Stop()
			backoff = provideMinBackoff // a fresh connection: the table fills in moments
		}
	}
}

// startMDNS announces the Worker on the LAN and dials trusted kernels it
// sees there.
func (w *Worker) startMDNS() error {
	svc := mdns.NewMdnsService(w.h, MDNSServiceName, mdnsNotifee{w})
	if err := svc.Start(); err != nil {
		return fieldErr("MDNS", "%v", err)
	}
	w.mdns = svc
	return nil
}

type mdnsNotifee struct{ w *Worker }

func (n mdnsNotifee) HandlePeerFound(ai peer.AddrInfo) {
	w := n.w
	if !w.isTrusted(ai.ID) || w.h.Network().Connectedness(ai.ID) == network.Connected {
		return
	}
	if w.cfg.LoopbackOnly {
		ai.Addrs = loopbackAddrs(ai.Addrs)
	}
	w.goOwned(func() {
		ctx, cancel := context.WithTimeout(w.ctx, connectTimeout)
		defer cancel()
		if err := w.h.Connect(ctx, ai); err != nil {
			w.log.Debug("mdns: kernel unreachable", "peer", ai.ID, "err", err)
		}
	})
}

func loopbackAddrs(in []ma.Multiaddr) []ma.Multiaddr {
	out := in[:0:0]
	for _, a := range in {
		if manet.IsIPLoopback(a) {
			out = append(out, a)
		}
	}
	return out
}
