package kvrec

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

func TestKey(t *testing.T) {
	for id, want := range map[string]string{
		"whatsminer-m56s-rack-1": "whatsminer-m56s-rack-1",
		"a/b":                    "a%2Fb",
		"100%":                   "100%25",
		".":                      "%2E",
		"..":                     "%2E%2E",
		"...":                    "...",
	} {
		assert.Equal(t, want, Key(id), id)
	}
	assert.NotEqual(t, Key("a/b"), Key("a%2Fb"), "escaping is injective")
}

func TestUnixMilli(t *testing.T) {
	assert.Zero(t, UnixMilli(time.Time{}))
	assert.True(t, FromUnixMilli(0).IsZero())
	now := time.UnixMilli(1_700_000_000_123)
	assert.Equal(t, int64(1_700_000_000_123), UnixMilli(now))
	assert.True(t, now.Equal(FromUnixMilli(UnixMilli(now))))
}
