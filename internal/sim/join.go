package sim

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/orknode/ork/internal/apifile"
	"github.com/orknode/ork/internal/p2p"
)

// Join is what a fleet needs to reach a local node.
type Join struct {
	Bootstrap []peer.AddrInfo
	Topic     []byte // nil when the node has no topic
	Kernel    peer.ID
}

// ReadJoin reads a node's <dataDir>/api file: its addresses become the
// bootstrap peers, its peer ID the kernel to trust, its topic the DHT topic.
func ReadJoin(dataDir string) (Join, error) {
	a, err := apifile.Read(dataDir)
	if err != nil {
		return Join{}, err
	}
	var j Join
	if j.Kernel, err = peer.Decode(a.PeerID); err != nil {
		return Join{}, fmt.Errorf("%s: peerId: %w", apifile.Path(dataDir), err)
	}
	if j.Bootstrap, err = p2p.ParseAddrInfos(a.Addrs); err != nil {
		return Join{}, fmt.Errorf("%s: addrs: %w", apifile.Path(dataDir), err)
	}
	if a.Topic != "" {
		if j.Topic, err = p2p.ParseTopic(a.Topic); err != nil {
			return Join{}, fmt.Errorf("%s: topic: %w", apifile.Path(dataDir), err)
		}
	}
	return j, nil
}

// MinLevel wraps a handler so records below level are dropped (a fleet of a
// thousand Workers keeps their start-up lines out of the way).
func MinLevel(h slog.Handler, level slog.Leveler) slog.Handler { return minLevel{h, level} }

type minLevel struct {
	slog.Handler
	level slog.Leveler
}

func (m minLevel) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= m.level.Level() && m.Handler.Enabled(ctx, l)
}
func (m minLevel) WithAttrs(as []slog.Attr) slog.Handler {
	return minLevel{m.Handler.WithAttrs(as), m.level}
}
func (m minLevel) WithGroup(g string) slog.Handler { return minLevel{m.Handler.WithGroup(g), m.level} }
