package registry

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
)

// memKV is an in-memory KV with failure injection: fail, when set, is asked before every Put and Delete.
type memKV struct {
	mu   sync.Mutex
	data map[string][]byte // ns + "\x00" + key
	fail func(op, ns, key string) error
}

func newMemKV() *memKV { return &memKV{data: map[string][]byte{}} }

var errDisk = errors.New("disk on fire")

func (m *memKV) check(op, ns, key string) error {
	if m.fail != nil {
		return m.fail(op, ns, key)
	}
	return nil
}

func (m *memKV) Put(_ context.Context, ns, key string, value []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check("put", ns, key); err != nil {
		return err
	}
	m.data[ns+"\x00"+key] = slices.Clone(value)
	return nil
}

func (m *memKV) Delete(_ context.Context, ns, key string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check("delete", ns, key); err != nil {
		return err
	}
	delete(m.data, ns+"\x00"+key)
	return nil
}

func (m *memKV) List(_ context.Context, ns string, fn func(key string, value []byte) error) error {
	m.mu.Lock()
	var keys []string
	for k := range m.data {
		if n, key, _ := strings.Cut(k, "\x00"); n == ns {
			keys = append(keys, key)
		}
	}
	slices.Sort(keys)
	vals := make([][]byte, len(keys))
	for i, k := range keys {
		vals[i] = slices.Clone(m.data[ns+"\x00"+k])
	}
	m.mu.Unlock()
	for i, k := range keys {
		if err := fn(k, vals[i]); err != nil {
			return err
		}
	}
	return nil
}

func (m *memKV) get(ns, key string) ([]byte, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.data[ns+"\x00"+key]
	return v, ok
}

func (m *memKV) keys(ns string) []string {
	var out []string
	_ = m.List(context.Background(), ns, func(k string, _ []byte) error { out = append(out, k); return nil })
	return out
}

func (m *memKV) set(ns, key string, value []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.data[ns+"\x00"+key] = value
}
