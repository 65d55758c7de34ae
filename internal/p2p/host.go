package p2p

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/control"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/pnet"
	"github.com/libp2p/go-libp2p/core/protocol"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/p2p/net/connmgr"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	"github.com/libp2p/go-libp2p/p2p/security/noise"
	libp2ptls "github.com/libp2p/go-libp2p/p2p/security/tls"
	quic "github.com/libp2p/go-libp2p/p2p/transport/quic"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"

	"github.com/orknode/ork/protocols"
)

// HostConfig is what a node or a Worker asks of its libp2p host.
type HostConfig struct {
	Key         crypto.PrivKey
	ListenAddrs []string // default: 127.0.0.1, TCP and QUIC, ephemeral ports
	NoListen    bool     // dial-only hosts (CLI, client library)
	// AnnounceAddrs replaces the advertised addresses (a public address behind NAT).
	AnnounceAddrs []string
	// LoopbackOnly advertises and dials loopback addresses only: tests, demos
	// and single-machine setups can never reach past 127.0.0.1.
	LoopbackOnly bool
	PSK          pnet.PSK // optional private-network key: a closed swarm
	// Connection manager watermarks; Workers' connections are also protected.
	ConnLow, ConnHigh int
	// MaxInboundConns caps inbound connections (resource manager system scope).
	MaxInboundConns int
	// StreamLimits raises per-peer inbound stream limits for these protocols.
	StreamLimits map[protocol.ID]int
	// WAN switches, off by default (never in tests).
	EnableHolePunching bool
	EnableAutoNAT      bool
	UserAgent          string
	// Gate, if set, decides which peers may complete a connection (after the
	// security handshake). Used for closed sites; the per-protocol allowlists
	// live in the stream handlers so the DHT stays reachable.
	Gate func(peer.ID) bool
}

// DefaultListenAddrs listen on loopback only; a site sets its interfaces.
var DefaultListenAddrs = []string{"/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"}

// NewHost builds a host with the ORK option set: TCP and QUIC only (no
// WebRTC/WebTransport/WebSocket), Noise and TLS, yamux, no relay transport,
// explicit resource limits, a connection manager, metrics off, and a dial
// ranker that tries TCP before QUIC (faster per request and smaller per
// connection on LANs, LIBP2P-NOTES §7).
func NewHost(cfg HostConfig) (host.Host, error) {
	if cfg.Key == nil {
		return nil, errors.New("ork/p2p: host needs a key")
	}
	listen := cfg.ListenAddrs
	if len(listen) == 0 {
		listen = DefaultListenAddrs
	}
	if cfg.PSK != nil {
		// libp2p's private networks work over TCP only: QUIC has no PSK layer.
		listen = withoutQUIC(listen)
		if len(listen) == 0 {
			return nil, errors.New("ork/p2p: a private network (PSK) needs a TCP listen address")
		}
	}
	rm, err := newResourceManager(cfg)
	if err != nil {
		return nil, err
	}
	low, high := cfg.ConnLow, cfg.ConnHigh
	if low <= 0 {
		low = 2000
	}
	if high <= low {
		high = low + low/2
	}
	cm, err := connmgr.NewConnManager(low, high, connmgr.WithGracePeriod(time.Minute))
	if err != nil {
		return nil, err
	}
	ua := cfg.UserAgent
	if ua == "" {
		ua = "ork/0.1"
	}
	opts := []libp2p.Option{
		libp2p.Identity(cfg.Key),
		libp2p.Transport(tcp.NewTCPTransport),
		// Noise first: its per-connection buffers are pooled, where a TLS
		// connection keeps a record-sized buffer each (a kernel holds a
		// thousand idle connections). TLS stays available for peers that ask.
		libp2p.Security(noise.ID, noise.New),
		libp2p.Security(libp2ptls.ID, libp2ptls.New),
		libp2p.DisableRelay(),
		libp2p.ResourceManager(rm),
		libp2p.ConnectionManager(cm),
		libp2p.DisableMetrics(),
		libp2p.UserAgent(ua),
		libp2p.SwarmOpts(swarm.WithDialRanker(tcpFirstRanker)),
		libp2p.ConnectionGater(&gater{loopbackOnly: cfg.LoopbackOnly, allow: cfg.Gate}),
	}
	if cfg.PSK == nil {
		opts = append(opts, libp2p.Transport(quic.NewTransport))
	}
	if cfg.NoListen {
		opts = append(opts, libp2p.NoListenAddrs)
	} else {
		opts = append(opts, libp2p.ListenAddrStrings(listen...))
	}
	if cfg.EnableAutoNAT {
		opts = append(opts, libp2p.EnableAutoNATv2())
	} else {
		opts = append(opts, libp2p.ForceReachabilityPrivate())
	}
	if cfg.EnableHolePunching {
		opts = append(opts, libp2p.EnableHolePunching())
	}
	if cfg.PSK != nil {
		opts = append(opts, libp2p.PrivateNetwork(cfg.PSK))
	}
	if cfg.LoopbackOnly {
		opts = append(opts, libp2p.AddrsFactory(loopbackOnly), libp2p.MultiaddrResolver(noDNS{}))
	}
	if len(cfg.AnnounceAddrs) > 0 {
		announce := make([]ma.Multiaddr, 0, len(cfg.AnnounceAddrs))
		for _, s := range cfg.AnnounceAddrs {
			a, err := ma.NewMultiaddr(s)
			if err != nil {
				return nil, fmt.Errorf("announce address %q: %w", s, err)
			}
			announce = append(announce, a)
		}
		opts = append(opts, libp2p.AddrsFactory(func([]ma.Multiaddr) []ma.Multiaddr { return announce }))
	}
	return libp2p.New(opts...)
}

func withoutQUIC(addrs []string) []string {
	var out []string
	for _, a := range addrs {
		if !strings.Contains(a, "/quic") {
			out = append(out, a)
		}
	}
	return out
}

func newResourceManager(cfg HostConfig) (network.ResourceManager, error) {
	limits := rcmgr.DefaultLimits
	libp2p.SetDefaultServiceLimits(&limits)
	inbound := cfg.MaxInboundConns
	if inbound <= 0 {
		inbound = 4096
	}
	part := rcmgr.PartialLimitConfig{
		System: rcmgr.ResourceLimits{
			ConnsInbound: rcmgr.LimitVal(inbound), Conns: rcmgr.LimitVal(inbound + 256), FD: rcmgr.LimitVal(inbound + 256),
			Streams: rcmgr.Unlimited, StreamsInbound: rcmgr.Unlimited, StreamsOutbound: rcmgr.Unlimited,
		},
		Transient: rcmgr.ResourceLimits{
			ConnsInbound: 1024, Conns: 1024, FD: 1024,
			Streams: 4096, StreamsInbound: 4096, StreamsOutbound: 4096,
		},
		ProtocolPeer: map[protocol.ID]rcmgr.ResourceLimits{},
	}
	for p, n := range cfg.StreamLimits {
		part.ProtocolPeer[p] = rcmgr.ResourceLimits{StreamsInbound: rcmgr.LimitVal(n), Streams: rcmgr.LimitVal(2 * n)}
	}
	// Metrics off: its trace reporter timestamps every scope event, a cost on
	// every stream for figures this node does not export.
	return rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(part.Build(limits.AutoScale())), rcmgr.WithMetricsDisabled())
}

// DefaultStreamLimits are the per-peer inbound stream limits for ORK's own
// protocols: generous enough for a kernel's pool plus bursts, bounded so a
// flood from one peer is refused (reset) rather than buffered.
func DefaultStreamLimits() map[protocol.ID]int {
	m := map[protocol.ID]int{}
	for _, p := range protocols.WorkerProtocols {
		m[p] = 256
	}
	for _, p := range protocols.KernelProtocols {
		m[p] = 256
	}
	return m
}

// tcpFirstRanker dials TCP addresses at once and QUIC ones 250 ms later, so
// QUIC is used only where TCP does not connect.
func tcpFirstRanker(addrs []ma.Multiaddr) []network.AddrDelay {
	out := make([]network.AddrDelay, 0, len(addrs))
	for _, a := range addrs {
		d := time.Duration(0)
		if _, err := a.ValueForProtocol(ma.P_QUIC_V1); err == nil {
			d = 250 * time.Millisecond
		}
		out = append(out, network.AddrDelay{Addr: a, Delay: d})
	}
	return out
}

func loopbackOnly(in []ma.Multiaddr) []ma.Multiaddr {
	out := make([]ma.Multiaddr, 0, len(in))
	for _, a := range in {
		if manet.IsIPLoopback(a) {
			out = append(out, a)
		}
	}
	return out
}

// gater refuses non-loopback addresses in loopback-only mode and, when allow
// is set, peers it does not admit.
type gater struct {
	loopbackOnly bool
	allow        func(peer.ID) bool
}

func (g *gater) InterceptPeerDial(p peer.ID) bool { return g.allow == nil || g.allow(p) }
func (g *gater) InterceptAddrDial(p peer.ID, a ma.Multiaddr) bool {
	return !g.loopbackOnly || manet.IsIPLoopback(a)
}
func (g *gater) InterceptAccept(c network.ConnMultiaddrs) bool {
	return !g.loopbackOnly || manet.IsIPLoopback(c.RemoteMultiaddr())
}
func (g *gater) InterceptSecured(_ network.Direction, p peer.ID, _ network.ConnMultiaddrs) bool {
	return g.allow == nil || g.allow(p)
}
func (g *gater) InterceptUpgraded(network.Conn) (bool, control.DisconnectReason) { return true, 0 }

// noDNS refuses every DNS resolution: in loopback-only mode no query leaves.
type noDNS struct{}

var errNoDNS = errors.New("ork/p2p: DNS disabled in loopback-only mode")

func (noDNS) ResolveDNSAddr(context.Context, peer.ID, ma.Multiaddr, int, int) ([]ma.Multiaddr, error) {
	return nil, errNoDNS
}
func (noDNS) ResolveDNSComponent(context.Context, ma.Multiaddr, int) ([]ma.Multiaddr, error) {
	return nil, errNoDNS
}

// FullAddrs returns h's addresses with the /p2p/<peer ID> suffix, the form
// other libp2p implementations dial.
func FullAddrs(h host.Host) []string {
	out := make([]string, 0, len(h.Addrs()))
	for _, a := range h.Addrs() {
		out = append(out, a.String()+"/p2p/"+h.ID().String())
	}
	return out
}

// ParseAddrInfos parses multiaddrs with /p2p suffixes, grouping them by peer.
func ParseAddrInfos(addrs []string) ([]peer.AddrInfo, error) {
	mas := make([]ma.Multiaddr, 0, len(addrs))
	for _, s := range addrs {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			return nil, fmt.Errorf("address %q: %w", s, err)
		}
		mas = append(mas, a)
	}
	infos, err := peer.AddrInfosFromP2pAddrs(mas...)
	if err != nil {
		return nil, fmt.Errorf("addresses need a /p2p/<peer ID> suffix: %w", err)
	}
	return infos, nil
}
