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
	descCmds    = prometheus.NewDesc("ork_commands", "Unfinished commands by state.", []string{"state"}, nil)
	descDone    = prometheus.NewDesc("ork_commands_finished_total", "Commands that reached a terminal state since start.", []string{"state"}, nil)
	descQueued  = prometheus.NewDesc("ork_commands_queued", "Commands waiting in device queues.", nil, nil)
	descUnknown = prometheus.NewDesc("ork_commands_outcome_unknown", "Commands whose outcome is being asked of their Worker.", nil, nil)
	descWAL     = prometheus.NewDesc("ork_wal_total", "WAL operations committed and fsyncs (group commit: ops per sync).", []string{"kind"}, nil)
	descJobRuns = prometheus.NewDesc("ork_scheduler_runs_total", "Scheduler job runs.", []string{"job"}, nil)
	descJobOver = prometheus.NewDesc("ork_scheduler_overruns_total", "Scheduler ticks dropped because the previous run was still going.", []string{"job"}, nil)
	descJobDur  = prometheus.NewDesc("ork_scheduler_last_duration_seconds", "Duration of each job's last run.", []string{"job"}, nil)
	descSnaps   = prometheus.NewDesc("ork_telemetry_snapshots", "Devices with a telemetry snapshot in the cache.", nil, nil)
)

type stateCollector struct{ n *Node }

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descWorkers
	ch <- descHealth
	ch <- descDevices
	ch <- descPeers
	ch <- descRPC
	ch <- descCmds
	ch <- descDone
	ch <- descQueued
	ch <- descUnknown
	ch <- descWAL
	ch <- descJobRuns
	ch <- descJobOver
	ch <- descJobDur
	ch <- descSnaps
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

	cs := c.n.cmds.Stats()
	for s, v := range cs.States {
		ch <- prometheus.MustNewConstMetric(descCmds, prometheus.GaugeValue, float64(v), s)
	}
	for s, v := range cs.Finished {
		ch <- prometheus.MustNewConstMetric(descDone, prometheus.CounterValue, float64(v), s)
	}
	ch <- prometheus.MustNewConstMetric(descQueued, prometheus.GaugeValue, float64(cs.Queued))
	ch <- prometheus.MustNewConstMetric(descUnknown, prometheus.GaugeValue, float64(cs.Unknown))
	ws := c.n.store.WAL().Stats()
	ch <- prometheus.MustNewConstMetric(descWAL, prometheus.CounterValue, float64(ws.Appends), "ops")
	ch <- prometheus.MustNewConstMetric(descWAL, prometheus.CounterValue, float64(ws.Syncs), "syncs")
	for job, js := range c.n.sched.Stats() {
		ch <- prometheus.MustNewConstMetric(descJobRuns, prometheus.CounterValue, float64(js.Runs), job)
		ch <- prometheus.MustNewConstMetric(descJobOver, prometheus.CounterValue, float64(js.Overruns), job)
		ch <- prometheus.MustNewConstMetric(descJobDur, prometheus.GaugeValue, js.LastDuration.Seconds(), job)
	}
	ch <- prometheus.MustNewConstMetric(descSnaps, prometheus.GaugeValue, float64(c.n.telem.Len()))
}
