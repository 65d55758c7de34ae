package node

import (
	"context"
	"encoding/json"
	"strings"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/orknode/ork/store"
)

// Worker addresses are kept in the store so a restarted kernel can reach its
// Workers at once — it is pull-only, and Workers that bootstrap elsewhere
// would not dial it (MDK-REFERENCE §5.7 recommends keeping them).
const addrKeyPrefix = "addrs/"

// saveAddrs records p's current addresses (best effort).
func (n *Node) saveAddrs(ctx context.Context, p peer.ID) {
	addrs := n.host.Peerstore().Addrs(p)
	if len(addrs) == 0 {
		return
	}
	strs := make([]string, 0, len(addrs))
	for _, a := range addrs {
		strs = append(strs, a.String())
	}
	b, _ := json.Marshal(strs)
	if err := n.store.Put(ctx, store.NSMeta, addrKeyPrefix+p.String(), b); err != nil {
		log.Debug("save worker addresses", "peer", p, "err", err)
	}
}

// loadAddrs puts every saved Worker address back into the peerstore.
func (n *Node) loadAddrs(ctx context.Context) int {
	count := 0
	err := n.store.List(ctx, store.NSMeta, func(key string, v []byte) error {
		id, ok := strings.CutPrefix(key, addrKeyPrefix)
		if !ok {
			return nil
		}
		p, err := peer.Decode(id)
		if err != nil {
			return nil
		}
		var strs []string
		if json.Unmarshal(v, &strs) != nil {
			return nil
		}
		for _, s := range strs {
			if a, err := ma.NewMultiaddr(s); err == nil {
				n.host.Peerstore().AddAddr(p, a, peerstore.RecentlyConnectedAddrTTL)
			}
		}
		count++
		return nil
	})
	if err != nil {
		log.Warn("load worker addresses", "err", err)
	}
	return count
}

// forgetAddrs drops a terminated Worker's saved addresses.
func (n *Node) forgetAddrs(ctx context.Context, p peer.ID) {
	_ = n.store.Delete(ctx, store.NSMeta, addrKeyPrefix+p.String())
}
