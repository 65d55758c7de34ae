package node

import (
	"context"
	"encoding/json"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/orknode/ork/modules/telemetry"
	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
)

// puller gives the telemetry collector its calls to Workers.
type puller struct{ n *Node }

func (p puller) peer(workerID string) (peer.ID, error) {
	w, ok := p.n.reg.Worker(workerID)
	if !ok || w.PeerID == "" {
		return "", envelope.Errf(envelope.CodeWorkerNotFound, "%s", workerID)
	}
	return peer.Decode(w.PeerID)
}

func (p puller) PullWorker(ctx context.Context, workerID string) (envelope.TelemetryBatch, error) {
	var b envelope.TelemetryBatch
	pid, err := p.peer(workerID)
	if err != nil {
		return b, err
	}
	err = p.n.callWorker(ctx, pid, protocols.WorkerTelemetry, envelope.ActionTelemetryPull, "", envelope.TelemetryPull{}, &b)
	return b, err
}

func (p puller) PullDevice(ctx context.Context, workerID, deviceID string, query map[string]any) (json.RawMessage, error) {
	var raw json.RawMessage
	pid, err := p.peer(workerID)
	if err != nil {
		return nil, err
	}
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
		DevicesOf: func(w string) []string { return deviceIDs(n.reg.DevicesOf(w)) },
		Workers: func() []string {
			ws := n.reg.ReadyWorkers()
			out := make([]string, len(ws))
			for i, w := range ws {
				out[i] = w.WorkerID
			}
			return out
		},
		MaxConcurrent: n.cfg.Telemetry.MaxConcurrent,
		DefaultMaxAge: ms(n.cfg.Telemetry.DefaultMaxAgeMs),
	})
}

// pullTelemetry is the scheduled job: one batched pull per READY Worker, its
// outcome fed to health.
func (n *Node) pullTelemetry(ctx context.Context) {
	ws := n.reg.ReadyWorkers()
	ids := make([]string, 0, len(ws))
	for _, w := range ws {
		if w.Routable() {
			ids = append(ids, w.WorkerID)
		}
	}
	rep := n.telem.Tick(ctx, ids)
	for _, id := range ids {
		if err, failed := rep.Failed[id]; failed {
			n.health.Failure(n.ctx, id, "telemetry: "+err.Error())
		} else {
			n.health.Success(n.ctx, id)
		}
	}
}

func maxAgeOf(q envelope.TelemetryPull) time.Duration {
	if q.MaxAgeMs == nil {
		return telemetry.UseDefaultMaxAge
	}
	return time.Duration(*q.MaxAgeMs) * time.Millisecond
}

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
		snap, _, err := n.telem.Device(ctx, q.DeviceID, maxAge, q.Query)
		if err != nil {
			return nil, err
		}
		return snap.Raw, nil
	case q.WorkerID != "":
		if _, ok := n.reg.Worker(q.WorkerID); !ok {
			return nil, envelope.Errf(envelope.CodeWorkerNotFound, "%s", q.WorkerID)
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
	_, pidStr, ok := n.reg.ResolveDevice(q.DeviceID)
	if !ok {
		return nil, envelope.Errf(envelope.CodeDeviceNotFound, "%s", q.DeviceID)
	}
	pid, err := peer.Decode(pidStr)
	if err != nil {
		return nil, envelope.Errf(envelope.CodeWorkerNotRoutable, "%s", q.DeviceID)
	}
	var raw json.RawMessage
	if err := n.callWorker(ctx, pid, protocols.WorkerState, envelope.ActionStatePull, q.DeviceID, q, &raw); err != nil {
		return nil, err
	}
	return raw, nil
}
