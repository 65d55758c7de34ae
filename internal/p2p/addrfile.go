package p2p

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/libp2p/go-libp2p/core/peer"
)

// AddrFileExt is the extension of the address files of local-directory
// discovery: one file per Worker, one multiaddr with /p2p suffix per line.
const AddrFileExt = ".addr"

// maxAddrFile bounds what is read from a discovery directory entry.
const maxAddrFile = 64 << 10

// WriteAddrFile publishes addrs (with /p2p suffixes) as <dir>/<name>.addr,
// atomically, so a scanner never reads half a file.
func WriteAddrFile(dir, name string, addrs []string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	path := filepath.Join(dir, name+AddrFileExt)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(strings.Join(addrs, "\n")+"\n"), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// ReadAddrDir reads every address file in dir. Unreadable or malformed files
// are skipped and reported in the joined error; the good ones are returned.
func ReadAddrDir(dir string) ([]peer.AddrInfo, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []peer.AddrInfo
	var errs []error
	for _, e := range entries {
		if e.IsDir() || !strings.HasSuffix(e.Name(), AddrFileExt) {
			continue
		}
		infos, err := readAddrFile(filepath.Join(dir, e.Name()))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, infos...)
	}
	return out, errors.Join(errs...)
}

func readAddrFile(path string) ([]peer.AddrInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	buf, err := io.ReadAll(io.LimitReader(f, maxAddrFile+1))
	if err != nil {
		return nil, err
	}
	if len(buf) > maxAddrFile {
		return nil, fmt.Errorf("%s: larger than %d bytes", path, maxAddrFile)
	}
	var addrs []string
	for _, l := range strings.Split(string(buf), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			addrs = append(addrs, l)
		}
	}
	infos, err := ParseAddrInfos(addrs)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return infos, nil
}
