package node

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	"github.com/libp2p/go-libp2p/core/protocol"

	"github.com/orknode/ork/protocols/rpc"
)

// callWorker makes one request to a Worker. When the request could not even
// be delivered because the Worker is not connected and its known addresses
// fail, it may have moved: its current addresses are looked up by peer ID
// with the DHT's FindPeer and the request is tried once more. (A connected
// Worker that refused a stream has not moved: no lookup.)
func (n *Node) callWorker(ctx context.Context, p peer.ID, proto protocol.ID, action, deviceID string, payload, out any) error {
	err := n.client.Request(ctx, p, proto, action, deviceID, payload, out)
	if err == nil || !rpc.IsNotDelivered(err) || ctx.Err() != nil || n.host.Network().Connectedness(p) == network.Connected {
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

// Bounds on address lookups: a dead fleet must not turn into a DHT storm.
const (
	maxFindPeersInFlight = 8
	findPeerSpacing      = time.Second // per peer, doubled after each failed lookup
	findPeerMaxSpacing   = time.Minute
	findPeerForget       = 2 * findPeerMaxSpacing
	findPeerTableSize    = 4096 // entries kept before old ones are pruned
)

// finder spaces and bounds FindPeer lookups.
type finder struct {
	sem  chan struct{}
	mu   sync.Mutex
	last map[peer.ID]findState
}

type findState struct {
	at       time.Time
	failures int
}

func newFinder() *finder {
	return &finder{sem: make(chan struct{}, maxFindPeersInFlight), last: map[peer.ID]findState{}}
}

// admit says whether p may be looked up now, and records the attempt.
func (f *finder) admit(p peer.ID, now time.Time) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	st := f.last[p]
	spacing := min(findPeerSpacing<<min(st.failures, 6), findPeerMaxSpacing)
	if !st.at.IsZero() && now.Sub(st.at) < spacing {
		return false
	}
	if len(f.last) >= findPeerTableSize {
		for id, s := range f.last {
			if now.Sub(s.at) > findPeerForget {
				delete(f.last, id)
			}
		}
	}
	st.at = now
	f.last[p] = st
	return true
}

func (f *finder) done(p peer.ID, ok bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	st := f.last[p]
	if ok {
		st.failures = 0
	} else {
		st.failures++
	}
	f.last[p] = st
}

// refreshAddrs resolves p's current addresses through the DHT, within the
// finder's bounds.
func (n *Node) refreshAddrs(ctx context.Context, p peer.ID) (found bool) {
	if !n.finder.admit(p, time.Now()) {
		return false
	}
	select {
	case n.finder.sem <- struct{}{}:
		defer func() { <-n.finder.sem }()
	case <-ctx.Done():
		return false
	}
	defer func() { n.finder.done(p, found) }()
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
		if !sleepCtx(ctx, delay) {
			return false
		}
		delay *= 2
	}
	return false
}
