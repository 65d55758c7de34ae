package p2p

import (
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/stretchr/testify/require"
)

func TestLoadOrCreateKeyKeepsThePeerID(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "identity.key")
	k1, err := LoadOrCreateKey(path)
	require.NoError(t, err)
	fi, err := os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	require.Equal(t, crypto.Ed25519, int(k1.Type()))

	k2, err := LoadOrCreateKey(path)
	require.NoError(t, err)
	id1, _ := peer.IDFromPrivateKey(k1)
	id2, _ := peer.IDFromPrivateKey(k2)
	require.Equal(t, id1, id2)

	require.NoError(t, os.WriteFile(path, []byte("not a key"), 0o600))
	_, err = LoadOrCreateKey(path)
	require.ErrorContains(t, err, "key file")
}

func TestTopic(t *testing.T) {
	_, err := ParseTopic("abc")
	require.Error(t, err)
	_, err = ParseTopic("zz" + string(make([]byte, 62)))
	require.Error(t, err)
	topic := TopicFromName("site-a")
	require.Len(t, topic, 32)
	c1, err := TopicCID(topic)
	require.NoError(t, err)
	c2, err := TopicCID(TopicFromName("site-a"))
	require.NoError(t, err)
	require.Equal(t, c1, c2)
	c3, _ := TopicCID(TopicFromName("site-b"))
	require.NotEqual(t, c1, c3)
	_, err = TopicCID(topic[:31])
	require.Error(t, err)
}

func TestAddrFiles(t *testing.T) {
	dir := t.TempDir()
	k, _, _ := crypto.GenerateEd25519Key(rand.Reader)
	id, _ := peer.IDFromPrivateKey(k)
	addr := "/ip4/127.0.0.1/tcp/4001/p2p/" + id.String()
	require.NoError(t, WriteAddrFile(dir, "w1", []string{addr}))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "bad"+AddrFileExt), []byte("/ip4/127.0.0.1/tcp/1\n"), 0o644)) // no /p2p
	require.NoError(t, os.WriteFile(filepath.Join(dir, "ignored.txt"), []byte("x"), 0o644))
	infos, err := ReadAddrDir(dir)
	require.Error(t, err, "the malformed file is reported")
	require.Len(t, infos, 1, "the good file is still read")
	require.Equal(t, id, infos[0].ID)

	missing, err := ReadAddrDir(filepath.Join(dir, "none"))
	require.NoError(t, err)
	require.Empty(t, missing)
}

func TestGaterLoopbackOnly(t *testing.T) {
	g := &gater{loopbackOnly: true}
	lo := ma.StringCast("/ip4/127.0.0.1/tcp/1")
	lan := ma.StringCast("/ip4/192.0.2.10/tcp/1") // TEST-NET-1: checked, never dialled
	require.True(t, g.InterceptAddrDial("", lo))
	require.False(t, g.InterceptAddrDial("", lan))
	open := &gater{}
	require.True(t, open.InterceptAddrDial("", lan))

	k, _, _ := crypto.GenerateEd25519Key(rand.Reader)
	allowed, _ := peer.IDFromPrivateKey(k)
	gated := &gater{allow: func(p peer.ID) bool { return p == allowed }}
	require.True(t, gated.InterceptSecured(network.DirInbound, allowed, nil))
	require.False(t, gated.InterceptSecured(network.DirInbound, "other", nil))
	require.Equal(t, []ma.Multiaddr{lo}, loopbackOnly([]ma.Multiaddr{lo, lan}))
}

func newTestHost(t *testing.T, psk []byte) (hostAddrs []string, connect func(addrs []string) error) {
	t.Helper()
	k, _, err := crypto.GenerateEd25519Key(rand.Reader)
	require.NoError(t, err)
	h, err := NewHost(HostConfig{Key: k, ListenAddrs: []string{"/ip4/127.0.0.1/tcp/0"}, LoopbackOnly: true, PSK: psk})
	require.NoError(t, err)
	t.Cleanup(func() { _ = h.Close() })
	return FullAddrs(h), func(addrs []string) error {
		infos, err := ParseAddrInfos(addrs)
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		return h.Connect(ctx, infos[0])
	}
}

// TestPrivateNetwork: hosts with the same pre-shared key connect; a host
// without it cannot (a closed swarm for sites that want one).
func TestPrivateNetwork(t *testing.T) {
	psk := make([]byte, 32)
	_, _ = rand.Read(psk)
	addrA, _ := newTestHost(t, psk)
	_, connectB := newTestHost(t, psk)
	_, connectC := newTestHost(t, nil)
	require.NoError(t, connectB(addrA))
	require.Error(t, connectC(addrA))
}

func TestNewHostNeedsAKey(t *testing.T) {
	_, err := NewHost(HostConfig{})
	require.Error(t, err)
	k, _, _ := crypto.GenerateEd25519Key(rand.Reader)
	_, err = NewHost(HostConfig{Key: k, AnnounceAddrs: []string{"not-a-multiaddr"}, LoopbackOnly: true})
	require.ErrorContains(t, err, "announce address")
}

func TestParseAddrInfosNeedsPeerID(t *testing.T) {
	_, err := ParseAddrInfos([]string{"/ip4/127.0.0.1/tcp/1"})
	require.Error(t, err)
	_, err = ParseAddrInfos([]string{"garbage"})
	require.Error(t, err)
}
