package node

import (
	"context"
	"strings"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	"github.com/libp2p/go-libp2p/p2p/discovery/mdns"

	"github.com/orknode/ork/internal/p2p"
	"github.com/orknode/ork/protocols"
)

// discovery learns Worker peer IDs (DESIGN §4) and hands them to the
// registrar: the DHT topic (looked up every lookupInterval), configured peer
// IDs resolved with FindPeer, static addresses, a local directory of address
// files, mDNS on a LAN — and, event-driven, any peer whose identify lists the
// /ork/worker/* protocols the moment it connects.
type discovery struct {
	n         *Node
	bootstrap []peer.AddrInfo
	topic     cid.Cid
	modes     map[string]bool
	sub       event.Subscription
	mdns      mdns.Service
	wg        sync.WaitGroup
}

func newDiscovery(n *Node, bootstrap []peer.AddrInfo) (*discovery, error) {
	d := &discovery{n: n, bootstrap: bootstrap, modes: map[string]bool{}}
	for _, m := range n.cfg.Discovery.Modes {
		d.modes[m] = true
	}
	if n.cfg.Topic != "" {
		t, err := p2p.ParseTopic(n.cfg.Topic)
		if err != nil {
			return nil, err
		}
		if d.topic, err = p2p.TopicCID(t); err != nil {
			return nil, err
		}
	}
	sub, err := n.host.EventBus().Subscribe([]any{
		new(event.EvtPeerIdentificationCompleted),
		new(event.EvtPeerConnectednessChanged),
	})
	if err != nil {
		return nil, err
	}
	d.sub = sub
	return d, nil
}

func (d *discovery) start() {
	ctx := d.n.ctx
	d.wg.Go(func() { d.watchEvents(ctx) })
	d.wg.Go(func() {
		if len(d.bootstrap) > 0 {
			p2p.ConnectBootstrap(ctx, d.n.host, d.bootstrap)
		}
		d.loop(ctx)
	})
	if d.modes[ModeLocal] {
		d.wg.Go(func() { d.scanLocal(ctx) })
	}
	if d.modes[ModeMDNS] {
		d.mdns = mdns.NewMdnsService(d.n.host, p2p.MDNSServiceName, mdnsNotifee{d})
		if err := d.mdns.Start(); err != nil {
			log.Warn("mdns discovery off", "err", err)
			d.mdns = nil
		}
	}
}

// learn records a peer's addresses and offers it for registration. A no-op
// once the node is closing.
func (d *discovery) learn(ai peer.AddrInfo, source string) {
	if ai.ID == d.n.host.ID() || ai.ID == "" || d.n.ctx.Err() != nil {
		return
	}
	if len(ai.Addrs) > 0 {
		d.n.host.Peerstore().AddAddrs(ai.ID, ai.Addrs, peerstore.RecentlyConnectedAddrTTL)
	}
	d.n.regs.offer(ai.ID, source)
}

func (d *discovery) watchEvents(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-d.sub.Out():
			if !ok {
				return
			}
			switch e := ev.(type) {
			case event.EvtPeerIdentificationCompleted:
				// Any peer may list /ork/worker/* protocols: being offered
				// only starts a registration, and the registry refuses a
				// workerId that belongs to another live peer.
				for _, p := range e.Protocols {
					if strings.HasPrefix(string(p), protocols.WorkerProtocolPrefix) {
						d.learn(peer.AddrInfo{ID: e.Peer}, "identify")
						break
					}
				}
			case event.EvtPeerConnectednessChanged:
				if e.Connectedness == network.Connected {
					// A known Worker reconnecting is taken back at once (a
					// TERMINATED one too: it registers again).
					if _, ok := d.n.reg.ByPeer(e.Peer.String()); ok {
						d.n.regs.offer(e.Peer, "reconnect")
					}
				} else {
					d.n.client.DropPeer(e.Peer)
				}
			}
		}
	}
}

// loop runs the periodic lookups: the topic's providers, configured peer IDs
// and static addresses. The first round runs at once.
func (d *discovery) loop(ctx context.Context) {
	every := ms(d.n.cfg.Discovery.LookupIntervalMs)
	if every <= 0 {
		every = 10 * time.Second
	}
	static, _ := p2p.ParseAddrInfos(d.n.cfg.Discovery.Static)
	for {
		if d.modes[ModeDHT] && d.topic.Defined() {
			d.lookupTopic(ctx)
		}
		for _, s := range d.n.cfg.Discovery.WorkerPeers {
			p, err := peer.Decode(s)
			if err != nil {
				continue
			}
			if d.n.host.Network().Connectedness(p) != network.Connected {
				if !d.n.refreshAddrs(ctx, p) {
					continue
				}
			}
			d.learn(peer.AddrInfo{ID: p}, "findpeer")
		}
		if d.modes[ModeStatic] {
			for _, ai := range static {
				d.learn(ai, "static")
			}
		}
		if !sleepCtx(ctx, every) {
			return
		}
	}
}

func (d *discovery) lookupTopic(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for ai := range d.n.dht.FindProvidersAsync(ctx, d.topic, 0) {
		d.learn(ai, "dht")
	}
}

func (d *discovery) scanLocal(ctx context.Context) {
	every := ms(d.n.cfg.Discovery.LocalScanMs)
	if every <= 0 {
		every = 4 * time.Second
	}
	for {
		infos, err := p2p.ReadAddrDir(d.n.cfg.Discovery.LocalDir)
		if err != nil {
			log.Debug("local discovery: some files skipped", "err", err)
		}
		for _, ai := range infos {
			d.learn(ai, "local")
		}
		if !sleepCtx(ctx, every) {
			return
		}
	}
}

// sleepCtx waits d; false if ctx ended first.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

func (d *discovery) close() {
	if d.mdns != nil {
		_ = d.mdns.Close()
	}
	if d.sub != nil {
		_ = d.sub.Close()
	}
	d.wg.Wait()
}

type mdnsNotifee struct{ d *discovery }

func (m mdnsNotifee) HandlePeerFound(ai peer.AddrInfo) { m.d.learn(ai, "mdns") }
