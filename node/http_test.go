package node

import (
	"context"
	"io"
	"net/http"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestHTTPListener(t *testing.T) {
	cfg := testConfig(t, randomTopic(t), nil)
	n, err := New(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, n.Close()) })

	_, _, err = n.ServeHTTP("192.0.2.1:9464") // TEST-NET-1: refused before any listen
	require.ErrorContains(t, err, "loopback")

	addr, stop, err := n.ServeHTTP("127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(stop)
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + addr + path)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return resp.StatusCode, string(b)
	}
	code, _ := get("/livez")
	require.Equal(t, http.StatusOK, code)
	code, _ = get("/readyz")
	require.Equal(t, http.StatusOK, code)
	code, body := get("/metrics")
	require.Equal(t, http.StatusOK, code)
	for _, m := range []string{"ork_workers", "ork_worker_health", "ork_wal_total", "ork_scheduler_runs_total", "ork_telemetry_snapshots", "go_goroutines"} {
		require.Contains(t, body, m)
	}
}
