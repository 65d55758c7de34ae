package registry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/orknode/ork/modules/internal/kvrec"
	"github.com/orknode/ork/protocols/envelope"
)

// record is the persisted form of a Worker that has answered identity (NSRegistry/<workerId>). It keeps the
// MDK record's fields (workerId, registeredAt; peerId in place of rpcKey) plus what routing needs after a
// restart. Devices are the ones the Worker owns; declared devices owned by others are in Conflicts.
type record struct {
	WorkerID string                `json:"workerId"`
	PeerID   string                `json:"peerId"`
	Devices  []envelope.DeviceInfo `json:"devices"`
	// Declared is the identity answer's device list (owned and conflicting). Records written before it
	// existed have none: their Devices stand in for it.
	Declared     []envelope.DeviceInfo `json:"declared,omitempty"`
	DeviceFamily string                `json:"deviceFamily,omitempty"`
	Conflicts    []string              `json:"conflicts,omitempty"`
	RegisteredAt int64                 `json:"registeredAt,omitempty"` // Unix ms
	LastSeen     int64                 `json:"lastSeen,omitempty"`     // Unix ms, as of the last registration event
}

func decodeRecord(key string, value []byte) (record, error) {
	var rec record
	if err := json.Unmarshal(value, &rec); err != nil {
		return rec, err
	}
	switch {
	case rec.WorkerID == "":
		return rec, errors.New("no workerId")
	case kvrec.Key(rec.WorkerID) != key:
		return rec, fmt.Errorf("workerId %q does not match its key", rec.WorkerID)
	case rec.PeerID == "":
		return rec, errors.New("no peerId")
	}
	for i, d := range rec.Devices {
		if d.DeviceID == "" {
			return rec, fmt.Errorf("devices[%d]: no deviceId", i)
		}
	}
	return rec, nil
}

type loadedContract struct {
	c   *envelope.Contract
	err error
}

// Load restores the persisted Workers; call it once at start, before any event. A Worker whose record and
// contract were both persisted comes back READY, with its devices and contract, so it can be routed as soon as
// health allows; one without a contract (it had not reached READY) comes back DISCOVERED with its devices
// still claimed, and the node re-registers it when its peer is found again (Discovered on either is a no-op
// that reports the state).
//
// Records that cannot be used are skipped, each reported as a *CorruptRecordError in the joined error; a
// Worker whose contract is corrupt comes back DISCOVERED (and is reported). Records naming a peer or workerId
// already in memory are skipped silently (memory wins). A device claimed by two records goes to the first
// in key order and is a conflict of the second. Load changes no state in the lifecycle sense and calls no
// OnChange. It returns the number of Workers restored; a KV listing error aborts it.
func (r *Registry) Load(ctx context.Context) (int, error) {
	if r.kv == nil {
		return 0, nil
	}
	r.writeMu.Lock()
	defer r.writeMu.Unlock()

	var errs []error
	contracts := map[string]loadedContract{}
	err := r.kv.List(ctx, NSContracts, func(key string, value []byte) error {
		c := new(envelope.Contract)
		err := json.Unmarshal(value, c)
		if err == nil {
			err = c.Validate()
		}
		contracts[key] = loadedContract{c: c, err: err}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("%w: list %s: %w", ErrPersist, NSContracts, err)
	}
	type keyed struct {
		key string
		rec record
	}
	var recs []keyed
	err = r.kv.List(ctx, NSRegistry, func(key string, value []byte) error {
		rec, err := decodeRecord(key, value)
		if err != nil {
			errs = append(errs, &CorruptRecordError{NS: NSRegistry, Key: key, Err: err})
			return nil
		}
		recs = append(recs, keyed{key, rec})
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("%w: list %s: %w", ErrPersist, NSRegistry, err)
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	seenPeer := map[string]string{} // peerId → workerId, among the records
	for _, k := range recs {
		rec := k.rec
		if other, dup := seenPeer[rec.PeerID]; dup {
			errs = append(errs, &CorruptRecordError{NS: NSRegistry, Key: k.key,
				Err: fmt.Errorf("peer %s already loaded for worker %s", rec.PeerID, other)})
			continue
		}
		seenPeer[rec.PeerID] = rec.WorkerID
		if r.byPeer[rec.PeerID] != nil || r.byWorker[rec.WorkerID] != nil {
			continue
		}
		w := &worker{
			peerID: rec.PeerID, workerID: rec.WorkerID, state: Discovered, family: rec.DeviceFamily,
			conflicts: rec.Conflicts, declared: rec.Declared, registeredAt: kvrec.FromUnixMilli(rec.RegisteredAt), lastSeen: kvrec.FromUnixMilli(rec.LastSeen),
		}
		for _, d := range rec.Devices {
			if dev, taken := r.devices[d.DeviceID]; taken {
				if dev.workerID != w.workerID {
					w.conflicts = append(w.conflicts, conflictText(d.DeviceID, dev.workerID))
				}
				continue
			}
			r.devices[d.DeviceID] = device{workerID: w.workerID, info: d}
			w.devices = append(w.devices, d)
		}
		if w.declared == nil {
			w.declared = clone(rec.Devices)
		}
		if lc, ok := contracts[k.key]; ok {
			if lc.err == nil {
				w.state, w.contract = Ready, lc.c
			} else {
				w.lastError = "persisted contract unusable: " + lc.err.Error()
				errs = append(errs, &CorruptRecordError{NS: NSContracts, Key: k.key, Err: lc.err})
			}
		}
		r.byPeer[w.peerID] = w
		r.byWorker[w.workerID] = w
		n++
	}
	return n, errors.Join(errs...)
}
