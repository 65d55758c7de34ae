package registry

import (
	"errors"

	"github.com/orknode/ork/modules/internal/memkv"
)

// memKV is the shared in-memory KV with failure injection.
type memKV = memkv.KV

func newMemKV() *memKV { return memkv.New() }

var errDisk = errors.New("disk on fire")
