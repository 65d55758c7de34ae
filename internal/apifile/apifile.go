// Package apifile reads and writes <data>/api: how local tools (the CLI, the
// simulator) find a running node — its dialable multiaddrs with /p2p
// suffixes, its peer ID and its discovery topic.
package apifile

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// Name is the file's name inside the node's data directory.
const Name = "api"

// maxSize bounds what is read: the file is a few hundred bytes.
const maxSize = 64 << 10

// API is the content of the file.
type API struct {
	PeerID string   `json:"peerId"`
	Addrs  []string `json:"addrs"` // with /p2p/<peerId>
	Topic  string   `json:"topic"` // 64 hex chars
	PID    int      `json:"pid"`
}

// Path is the api file of a data directory.
func Path(dataDir string) string { return filepath.Join(dataDir, Name) }

// Write writes the file atomically (the daemon writes it once it listens).
func Write(dataDir string, a API) error {
	b, err := json.MarshalIndent(a, "", "  ")
	if err != nil {
		return err
	}
	tmp := Path(dataDir) + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, Path(dataDir))
}

// Read reads the file; a missing file says the node is not running.
func Read(dataDir string) (API, error) {
	var a API
	f, err := os.Open(Path(dataDir))
	if errors.Is(err, os.ErrNotExist) {
		return a, fmt.Errorf("no node running for %s (no %s file; start `ork-node daemon --data %s`)", dataDir, Name, dataDir)
	}
	if err != nil {
		return a, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxSize))
	if err != nil {
		return a, err
	}
	if err := json.Unmarshal(b, &a); err != nil {
		return a, fmt.Errorf("%s: %w", Path(dataDir), err)
	}
	if a.PeerID == "" || len(a.Addrs) == 0 {
		return a, fmt.Errorf("%s: missing peerId or addrs", Path(dataDir))
	}
	return a, nil
}

// Remove deletes the file (on clean shutdown).
func Remove(dataDir string) error {
	err := os.Remove(Path(dataDir))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}
