// Package p2p builds the libp2p pieces the node and the worker SDK share:
// identity key files, the host option set, the private DHT, topic CIDs and
// address files. It knows nothing of the kernel modules.
package p2p

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/libp2p/go-libp2p/core/crypto"
)

// LoadOrCreateKey reads the libp2p-marshalled private key at path, or makes a
// new Ed25519 key there (mode 0600) if the file does not exist. Restarts thus
// keep the peer ID.
func LoadOrCreateKey(path string) (crypto.PrivKey, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		k, err := crypto.UnmarshalPrivateKey(b)
		if err != nil {
			return nil, fmt.Errorf("key file %s: %w", path, err)
		}
		return k, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("key file: %w", err)
	}
	k, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		return nil, err
	}
	if err := WriteKey(path, k); err != nil {
		return nil, err
	}
	return k, nil
}

// WriteKey writes k to path (mode 0600) atomically, creating the directory.
func WriteKey(path string, k crypto.PrivKey) error {
	b, err := crypto.MarshalPrivateKey(k)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
