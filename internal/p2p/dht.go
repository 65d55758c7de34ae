package p2p

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/ipfs/go-cid"
	ds "github.com/ipfs/go-datastore"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p-kad-dht/records"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	mh "github.com/multiformats/go-multihash"

	"github.com/orknode/ork/protocols"
)

// DHTConfig configures the private ORK DHT.
type DHTConfig struct {
	Server    bool            // kernels and bootstrap peers serve; Workers may be clients
	Bootstrap []peer.AddrInfo // only the site's own peers, never the public IPFS ones
	Datastore ds.Batching     // nil = in memory
	// ProvideValidity is how long the storing peers keep a provider record;
	// Workers re-provide at less than half of it. Default 10 min.
	ProvideValidity time.Duration
}

// DefaultProvideValidity keeps provider records short-lived: ORK needs
// liveness, and only a few topic keys exist.
const DefaultProvideValidity = 10 * time.Minute

// NewDHT starts a Kademlia DHT with the /ork prefix (a separate network from
// the public IPFS DHT) in the given mode, bootstrapped from the site's peers.
func NewDHT(h host.Host, cfg DHTConfig) (*dht.IpfsDHT, error) {
	mode := dht.ModeClient
	if cfg.Server {
		mode = dht.ModeServer // ModeAuto never turns server on a LAN (LIBP2P-NOTES §3)
	}
	validity := cfg.ProvideValidity
	if validity <= 0 {
		validity = DefaultProvideValidity
	}
	opts := []dht.Option{
		dht.Mode(mode),
		dht.ProtocolPrefix(protocols.DHTPrefix),
		dht.BootstrapPeers(cfg.Bootstrap...),
		dht.ProviderManagerOpts(records.ProvideValidity(validity)),
		dht.DisableValues(),
	}
	if cfg.Datastore != nil {
		opts = append(opts, dht.Datastore(cfg.Datastore))
	}
	return dht.New(h, opts...)
}

// ConnectBootstrap dials the bootstrap peers (all of them, in parallel) and
// returns how many answered. The DHT itself only dials them when its table is
// empty; dialling up front makes a fresh node useful at once.
func ConnectBootstrap(ctx context.Context, h host.Host, peers []peer.AddrInfo) int {
	type res struct{ err error }
	ch := make(chan res, len(peers))
	for _, p := range peers {
		go func() { ch <- res{h.Connect(ctx, p)} }()
	}
	ok := 0
	for range peers {
		if r := <-ch; r.err == nil {
			ok++
		}
	}
	return ok
}

// TopicCID maps a 32-byte topic (a Hyperswarm-style rendezvous hash) to the
// CID Workers provide and the kernel looks up: the topic is used as a
// sha2-256 digest.
func TopicCID(topic []byte) (cid.Cid, error) {
	if len(topic) != 32 {
		return cid.Undef, fmt.Errorf("ork/p2p: topic must be 32 bytes, got %d", len(topic))
	}
	m, err := mh.Encode(topic, mh.SHA2_256)
	if err != nil {
		return cid.Undef, err
	}
	return cid.NewCidV1(cid.Raw, m), nil
}

// ParseTopic reads a topic given as 64 hex characters.
func ParseTopic(s string) ([]byte, error) {
	s = strings.TrimSpace(s)
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != 32 {
		return nil, errors.New("ork/p2p: topic must be 64 hex characters (32 bytes)")
	}
	return b, nil
}

// TopicFromName derives a topic from a site name, for setups that prefer a
// readable name to 64 hex characters.
func TopicFromName(name string) []byte {
	sum := sha256.Sum256([]byte("ork-topic:" + name))
	return sum[:]
}

// MDNSServiceName is the DNS-SD service ORK Workers announce on a LAN and the
// kernel browses (mDNS discovery, off by default).
const MDNSServiceName = "_ork._udp"
