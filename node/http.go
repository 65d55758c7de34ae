package node

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// ServeHTTP starts the loopback HTTP listener: /livez (the process answers),
// /readyz (the node is up and listening), /metrics (Prometheus). It refuses
// non-loopback addresses: metrics are for the local agent, not the network.
func (n *Node) ServeHTTP(addr string) (string, func(), error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return "", nil, fmt.Errorf("http listen %q: %w", addr, err)
	}
	ip := net.ParseIP(host)
	if host == "localhost" {
		ip = net.IPv4(127, 0, 0, 1)
	}
	if ip == nil || !ip.IsLoopback() {
		return "", nil, fmt.Errorf("http listen %q: only loopback addresses are allowed", addr)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return "", nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if n.ctx.Err() != nil || len(n.host.Addrs()) == 0 {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.Handle("/metrics", promhttp.HandlerFor(n.metricsRegistry(), promhttp.HandlerOpts{}))
	// Profiles for operators, on the same loopback-only listener.
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("http listener", "err", err)
		}
	}()
	return ln.Addr().String(), func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	}, nil
}

// metricsRegistry exposes the node's state as gauges computed at scrape time
// (nothing on the hot path).
func (n *Node) metricsRegistry() *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	r.MustRegister(&stateCollector{n: n})
	return r
}

var (
	descWorkers = prometheus.NewDesc("ork_workers", "Workers by lifecycle state.", []string{"state"}, nil)
	descHealth  = prometheus.NewDesc("ork_worker_health", "Workers by health state.", []string{"state"}, nil)
	descDevices = prometheus.NewDesc("ork_devices", "Devices known to the registry.", nil, nil)
	descPeers   = prometheus.NewDesc("ork_connected_peers", "Connected libp2p peers.", nil, nil)
	descRPC     = prometheus.NewDesc("ork_worker_rpc_total", "Calls to Workers by stream kind.", []string{"kind"}, nil)
)

type stateCollector struct{ n *Node }

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descWorkers
	ch <- descHealth
	ch <- descDevices
	ch <- descPeers
	ch <- descRPC
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	for s, v := range c.n.reg.Counts() {
		ch <- prometheus.MustNewConstMetric(descWorkers, prometheus.GaugeValue, float64(v), s)
	}
	for s, v := range c.n.health.Counts() {
		ch <- prometheus.MustNewConstMetric(descHealth, prometheus.GaugeValue, float64(v), s)
	}
	ch <- prometheus.MustNewConstMetric(descDevices, prometheus.GaugeValue, float64(len(c.n.reg.Devices())))
	ch <- prometheus.MustNewConstMetric(descPeers, prometheus.GaugeValue, float64(len(c.n.host.Network().Peers())))
	st := c.n.client.Stats()
	ch <- prometheus.MustNewConstMetric(descRPC, prometheus.CounterValue, float64(st.Fresh), "fresh")
	ch <- prometheus.MustNewConstMetric(descRPC, prometheus.CounterValue, float64(st.Reused), "reused")
	ch <- prometheus.MustNewConstMetric(descRPC, prometheus.CounterValue, float64(st.Failed), "failed")
}
