// Package kvrec holds what the modules that persist per-Worker records in the
// KV (registry, health) share: the key of a workerId and the Unix-millisecond
// form of the records' times.
package kvrec

import (
	"net/url"
	"strings"
	"time"
)

// Key is the KV key of a workerId: path-escaped, so that any workerId (one
// holding "/" or "%", or exactly "." or "..") is one valid key segment and
// distinct workerIds never share a key.
func Key(workerID string) string {
	k := url.PathEscape(workerID)
	if k == "." || k == ".." {
		k = strings.ReplaceAll(k, ".", "%2E")
	}
	return k
}

// UnixMilli is t in Unix milliseconds, 0 for the zero time.
func UnixMilli(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMilli()
}

// FromUnixMilli is the inverse of UnixMilli: 0 is the zero time.
func FromUnixMilli(ms int64) time.Time {
	if ms == 0 {
		return time.Time{}
	}
	return time.UnixMilli(ms)
}
