// Package memkv is the in-memory KV the module tests share: the three methods
// registry.KV and health.KV need, a write counter, and failure injection.
package memkv

import (
	"context"
	"slices"
	"strings"
	"sync"
)

// KV is an in-memory namespaced KV. Safe for concurrent use.
type KV struct {
	mu     sync.Mutex
	data   map[string][]byte // ns + "\x00" + key
	writes int
	fail   func(op, ns, key string) error
}

// New makes an empty KV.
func New() *KV { return &KV{data: map[string][]byte{}} }

// SetFail installs fail, asked before every Put ("put") and Delete
// ("delete"); its error is returned and nothing is written. nil removes it.
func (m *KV) SetFail(fail func(op, ns, key string) error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.fail = fail
}

// Always is a SetFail function that fails every write with err.
func Always(err error) func(op, ns, key string) error {
	return func(string, string, string) error { return err }
}

func (m *KV) check(op, ns, key string) error {
	if m.fail != nil {
		return m.fail(op, ns, key)
	}
	return nil
}

// Put stores a copy of value.
func (m *KV) Put(_ context.Context, ns, key string, value []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check("put", ns, key); err != nil {
		return err
	}
	m.writes++
	m.data[ns+"\x00"+key] = slices.Clone(value)
	return nil
}

// Delete removes a key (a missing key is not an error).
func (m *KV) Delete(_ context.Context, ns, key string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check("delete", ns, key); err != nil {
		return err
	}
	m.writes++
	delete(m.data, ns+"\x00"+key)
	return nil
}

// List calls fn for every key of ns in key order, with copies of the values,
// without holding the lock (fn may write).
func (m *KV) List(_ context.Context, ns string, fn func(key string, value []byte) error) error {
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

// Get reads a value as stored.
func (m *KV) Get(ns, key string) ([]byte, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.data[ns+"\x00"+key]
	return v, ok
}

// Set stores a value directly (no failure injection, not counted): tests
// plant records, corrupt ones included.
func (m *KV) Set(ns, key string, value []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.data[ns+"\x00"+key] = value
}

// Keys lists the keys of ns in order.
func (m *KV) Keys(ns string) []string {
	var out []string
	_ = m.List(context.Background(), ns, func(k string, _ []byte) error { out = append(out, k); return nil })
	return out
}

// Writes counts the Puts and Deletes that succeeded.
func (m *KV) Writes() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.writes
}
