package node

import (
	"context"
	"errors"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	"github.com/libp2p/go-libp2p/core/protocol"

	"github.com/orknode/ork/protocols/rpc"
)

// callWorker makes one request to a Worker. When the request could not even
// be delivered (no connection to the Worker's known addresses), the Worker
// may have moved: its current addresses are looked up by peer ID with the
// DHT's FindPeer and the request is tried once more.
func (n *Node) callWorker(ctx context.Context, p peer.ID, proto protocol.ID, action, deviceID string, payload, out any) error {
	err := n.client.Request(ctx, p, proto, action, deviceID, payload, out)
	if err == nil || !rpc.IsNotDelivered(err) || ctx.Err() != nil {
		return err
	}
	if !n.refreshAddrs(ctx, p) {
		return err
	}
	return n.client.Request(ctx, p, proto, action, deviceID, payload, out)
}

// connect dials p at its known addresses, or finds them first.
func (n *Node) connect(ctx context.Context, p peer.ID) error {
	if len(n.host.Peerstore().Addrs(p)) > 0 {
		if err := n.host.Connect(ctx, peer.AddrInfo{ID: p}); err == nil {
			return nil
		}
	}
	if !n.refreshAddrs(ctx, p) {
		return errors.New("no reachable address (FindPeer found none)")
	}
	return n.host.Connect(ctx, peer.AddrInfo{ID: p})
}

// refreshAddrs resolves p's current addresses through the DHT. Lookups per
// peer are spaced by a second so a dead fleet cannot flood the DHT.
func (n *Node) refreshAddrs(ctx context.Context, p peer.ID) bool {
	now := time.Now()
	if last, ok := n.findPeerLast.Load(p); ok && now.Sub(last.(time.Time)) < time.Second {
		return false
	}
	n.findPeerLast.Store(p, now)
	// A stale routing-table entry can make one lookup fail (LIBP2P-NOTES §9.3):
	// retry a few times with a short pause.
	delay := 50 * time.Millisecond
	for attempt := 0; attempt < 3; attempt++ {
		n.findPeers.Add(1)
		ai, err := n.dht.FindPeer(ctx, p)
		if err == nil && len(ai.Addrs) > 0 {
			n.host.Peerstore().AddAddrs(p, ai.Addrs, peerstore.RecentlyConnectedAddrTTL)
			n.saveAddrs(ctx, p)
			return true
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return false
		case <-t.C:
		}
		delay *= 2
	}
	return false
}
