package node

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"golang.org/x/sync/errgroup"

	"github.com/orknode/ork/modules/telemetry"
	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
)

// puller gives the telemetry collector its calls to Workers. Each call has
// its own timeout (pullTimeout), so one hung Worker cannot hold a scheduled
// tick — which waits for every pull — past the telemetry cadence. A Worker
// that is not routable is refused (ERR_WORKER_NOT_ROUTABLE) without dialling.
type puller struct{ n *Node }

// Bounds of pullTimeout.
const (
	maxPullTimeout = 5 * time.Second
	minPullTimeout = time.Second
)

// pullTimeout bounds one telemetry call to a Worker: half the telemetry
// cadence, at most 5 s (also when the scheduled pull is disabled), at least 1 s.
func (p puller) pullTimeout() time.Duration {
	d := maxPullTimeout
	if c := ms(p.n.cfg.Cadences.TelemetryPullMs); c > 0 {
		d = min(d, c/2)
	}
	return max(d, minPullTimeout)
}

func (p puller) peer(workerID string) (peer.ID, error) {
	w, ok := p.n.reg.Worker(workerID)
	if !ok || w.PeerID == "" {
		return "", envelope.Errf(envelope.CodeWorkerNotFound, "%s", workerID)
	}
	if !p.n.reg.Routable(workerID) {
		return "", envelope.Errf(envelope.CodeWorkerNotRoutable, "%s", workerID)
	}
	return peer.Decode(w.PeerID)
}

func (p puller) PullWorker(ctx context.Context, workerID string) (envelope.TelemetryBatch, error) {
	var b envelope.TelemetryBatch
	pid, err := p.peer(workerID)
	if err != nil {
		return b, err
	}
	ctx, cancel := context.WithTimeout(ctx, p.pullTimeout())
	defer cancel()
	err = p.n.callWorker(ctx, pid, protocols.WorkerTelemetry, envelope.ActionTelemetryPull, "", envelope.TelemetryPull{}, &b)
	return b, err
}

func (p puller) PullDevice(ctx context.Context, workerID, deviceID string, query map[string]any) (json.RawMessage, error) {
	var raw json.RawMessage
	pid, err := p.peer(workerID)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, p.pullTimeout())
	defer cancel()
	err = p.n.callWorker(ctx, pid, protocols.WorkerTelemetry, envelope.ActionTelemetryPull, deviceID,
		envelope.TelemetryPull{DeviceID: deviceID, Query: query}, &raw)
	return raw, err
}

func (n *Node) newCollector() (*telemetry.Collector, error) {
	return telemetry.New(telemetry.Options{
		Puller: puller{n},
		Owner: func(id string) (string, bool) {
			w, _, ok := n.reg.ResolveDevice(id)
			return w, ok
		},
		DevicesOf:     func(w string) []string { return deviceIDs(n.reg.DevicesOf(w)) },
		Workers:       n.routableWorkers, // Fleet: only Workers that can be pulled
		MaxConcurrent: n.cfg.Telemetry.MaxConcurrent,
		DefaultMaxAge: ms(n.cfg.Telemetry.DefaultMaxAgeMs),
	})
}

// pullTelemetry is the scheduled job: one batched pull per READY Worker, its
// outcome fed to health.
func (n *Node) pullTelemetry(ctx context.Context) {
	ids := n.routableWorkers()
	rep := n.telem.Tick(ctx, ids)
	for _, id := range ids {
		if err, failed := rep.Failed[id]; failed {
			if envelope.CodeOf(err) == envelope.CodeWorkerNotRoutable {
				continue // it stopped being routable since it was listed: nothing was sent
			}
			n.health.Failure(n.ctx, id, "telemetry: "+err.Error())
		} else {
			n.health.Success(n.ctx, id)
		}
	}
}

// routableWorkers lists the READY Workers that may be called now.
func (n *Node) routableWorkers() []string {
	ws := n.reg.ReadyWorkers()
	ids := make([]string, 0, len(ws))
	for _, w := range ws {
		if w.Routable() {
			ids = append(ids, w.WorkerID)
		}
	}
	return ids
}

func maxAgeOf(q envelope.TelemetryPull) time.Duration {
	if q.MaxAgeMs == nil {
		return telemetry.UseDefaultMaxAge
	}
	return time.Duration(*q.MaxAgeMs) * time.Millisecond
}

// anyAge, as a maxAge, accepts a snapshot however old it is.
const anyAge = time.Duration(math.MaxInt64)

// isMetricsQuery mirrors the collector: a query without a type, or of type
// "" or "metrics", is answered from snapshots; any other goes to the device.
func isMetricsQuery(query map[string]any) bool {
	t, ok := query["type"]
	if !ok {
		return true
	}
	s, ok := t.(string)
	return ok && (s == "" || s == "metrics")
}

// handleTelemetryPull answers telemetry.pull for a device, a Worker or the
// fleet.
//
// A metrics query for a device or Worker that is not routable (SICK, DEAD,
// not READY) is answered from the last snapshots, whatever their age (each
// device payload carries its own timestamp), without dialling the Worker;
// with no snapshot at all it is ERR_WORKER_NOT_ROUTABLE. A non-metrics query
// always goes live: for a Worker, to each of its devices (the answer is a
// batch whose entries are the devices' own answers, or {deviceId, error,
// timestamp} for a device that could not be read).
func (n *Node) handleTelemetryPull(ctx context.Context, _ peer.ID, req *envelope.Envelope) (any, error) {
	var q envelope.TelemetryPull
	if err := req.DecodePayload(&q); err != nil {
		return nil, err
	}
	if q.DeviceID == "" {
		q.DeviceID = req.DeviceID
	}
	maxAge := maxAgeOf(q)
	switch {
	case q.DeviceID != "":
		w, _, ok := n.reg.ResolveDevice(q.DeviceID)
		if !ok {
			return nil, envelope.Errf(envelope.CodeDeviceNotFound, "%s", q.DeviceID)
		}
		if !n.reg.Routable(w) {
			if !isMetricsQuery(q.Query) {
				return nil, envelope.Errf(envelope.CodeWorkerNotRoutable, "%s (device %s)", w, q.DeviceID)
			}
			// The puller refuses a Worker that is not routable, so this
			// answers from the snapshot or fails without dialling.
			snap, _, err := n.telem.Device(ctx, q.DeviceID, anyAge, nil)
			if err != nil {
				return nil, envelope.Errf(envelope.CodeWorkerNotRoutable, "%s (device %s): no telemetry held", w, q.DeviceID)
			}
			return snap.Raw, nil
		}
		snap, _, err := n.telem.Device(ctx, q.DeviceID, maxAge, q.Query)
		if err != nil {
			return nil, err
		}
		return snap.Raw, nil
	case q.WorkerID != "":
		if _, ok := n.reg.Worker(q.WorkerID); !ok {
			return nil, envelope.Errf(envelope.CodeWorkerNotFound, "%s", q.WorkerID)
		}
		if !n.reg.Routable(q.WorkerID) {
			if !isMetricsQuery(q.Query) {
				return nil, envelope.Errf(envelope.CodeWorkerNotRoutable, "%s", q.WorkerID)
			}
			snaps := n.lastSnapshots(ctx, q.WorkerID)
			if len(snaps) == 0 {
				return nil, envelope.Errf(envelope.CodeWorkerNotRoutable, "%s: no telemetry held", q.WorkerID)
			}
			return batchOf(q.WorkerID, snaps), nil
		}
		if !isMetricsQuery(q.Query) {
			return n.queryDevices(ctx, q.WorkerID, q.Query), nil
		}
		snaps, _, err := n.telem.Worker(ctx, q.WorkerID, maxAge)
		if err != nil {
			return nil, err
		}
		return batchOf(q.WorkerID, snaps), nil
	default:
		view := n.telem.Fleet(ctx, maxAge)
		return batchOf("", view.Snapshots), nil
	}
}

// lastSnapshots returns the snapshots held for a Worker's devices, however
// old. The Worker is not routable: the puller refuses it, so a device with
// no snapshot costs no call.
func (n *Node) lastSnapshots(ctx context.Context, workerID string) []telemetry.Snapshot {
	var out []telemetry.Snapshot
	for _, d := range deviceIDs(n.reg.DevicesOf(workerID)) {
		if s, _, err := n.telem.Device(ctx, d, anyAge, nil); err == nil && s.WorkerID == workerID {
			out = append(out, s)
		}
	}
	return out
}

// maxDeviceQueries bounds the live device queries of one worker-scope
// telemetry.pull (the collector's MaxConcurrent bounds them all together).
const maxDeviceQueries = 8

// queryDevices sends a non-metrics query to every device of a Worker, live,
// and batches the answers; a device that could not be read is reported in
// its entry, as a device-level error.
func (n *Node) queryDevices(ctx context.Context, workerID string, query map[string]any) any {
	devs := deviceIDs(n.reg.DevicesOf(workerID))
	out := make([]json.RawMessage, len(devs))
	var g errgroup.Group
	g.SetLimit(maxDeviceQueries)
	for i, d := range devs {
		g.Go(func() error {
			snap, _, err := n.telem.Device(ctx, d, 0, query)
			if err == nil {
				out[i] = snap.Raw
				return nil
			}
			var e *envelope.Error
			if !errors.As(err, &e) {
				e = envelope.Errf(envelope.CodeDeviceUnavailable, "%s: %v", d, err)
			}
			out[i], _ = json.Marshal(envelope.DeviceTelemetry{DeviceID: d, Error: e.Message, Timestamp: time.Now().UnixMilli()})
			return nil
		})
	}
	_ = g.Wait()
	return struct {
		WorkerID  string            `json:"workerId,omitempty"`
		Devices   []json.RawMessage `json:"devices"`
		Timestamp int64             `json:"timestamp"`
	}{workerID, out, time.Now().UnixMilli()}
}

// batchOf renders snapshots as a batched answer without re-encoding them.
func batchOf(workerID string, snaps []telemetry.Snapshot) any {
	devs := make([]json.RawMessage, len(snaps))
	for i, s := range snaps {
		devs[i] = s.Raw
	}
	return struct {
		WorkerID  string            `json:"workerId,omitempty"`
		Devices   []json.RawMessage `json:"devices"`
		Timestamp int64             `json:"timestamp"`
	}{workerID, devs, time.Now().UnixMilli()}
}

// maxStatePulls bounds the state.pull calls to Workers in flight at once,
// node-wide; they bypass the telemetry collector and its slots.
const maxStatePulls = 16

// handleStatePull reads one device's state live from its Worker: only when
// the Worker is routable (ERR_WORKER_NOT_ROUTABLE, nothing dialled), and at
// most maxStatePulls at once; a request that gets no slot before its
// context ends is ERR_BUSY.
func (n *Node) handleStatePull(ctx context.Context, _ peer.ID, req *envelope.Envelope) (any, error) {
	var q envelope.StatePull
	if err := req.DecodePayload(&q); err != nil {
		return nil, err
	}
	if q.DeviceID == "" {
		q.DeviceID = req.DeviceID
	}
	if q.DeviceID == "" {
		return nil, envelope.Err(envelope.CodeDeviceIDRequired)
	}
	w, pidStr, ok := n.reg.ResolveDevice(q.DeviceID)
	if !ok {
		return nil, envelope.Errf(envelope.CodeDeviceNotFound, "%s", q.DeviceID)
	}
	if !n.reg.Routable(w) {
		return nil, envelope.Errf(envelope.CodeWorkerNotRoutable, "%s (device %s)", w, q.DeviceID)
	}
	pid, err := peer.Decode(pidStr)
	if err != nil {
		return nil, envelope.Errf(envelope.CodeWorkerNotRoutable, "%s", q.DeviceID)
	}
	sem := n.statePulls
	select {
	case sem <- struct{}{}:
	case <-ctx.Done():
		return nil, envelope.Errf(envelope.CodeBusy, "state.pull: %d reads in flight", maxStatePulls)
	}
	defer func() { <-sem }()
	var raw json.RawMessage
	if err := n.callWorker(ctx, pid, protocols.WorkerState, envelope.ActionStatePull, q.DeviceID, q, &raw); err != nil {
		return nil, err
	}
	return raw, nil
}
