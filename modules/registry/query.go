package registry

import (
	"cmp"
	"slices"
	"time"

	"github.com/orknode/ork/modules/internal/kvrec"
	"github.com/orknode/ork/protocols/envelope"
)

// WorkerView is a copy of one Worker entry; changing it changes nothing in the Registry. Contract is shared
// and must not be modified.
type WorkerView struct {
	PeerID   string
	WorkerID string                // "" until the peer has answered identity
	State    string                // lifecycle state
	Health   string                // as last set by SetHealth; UNKNOWN if never
	Devices  []envelope.DeviceInfo // owned, in declaration order
	// DeclaredDevices is the device list of the last identity answer (deduplicated by deviceId): Devices plus
	// the devices in Conflicts. Compare a new answer with it, not with Devices, to tell whether it changed.
	DeclaredDevices []envelope.DeviceInfo
	Conflicts       []string
	DeviceFamily    string
	Contract        *envelope.Contract // non-nil exactly when State is READY
	RegisteredAt    time.Time
	LastSeen        time.Time
	LastError       string // why the last registration step failed; "" once a step succeeds
}

// Routable reports whether the registry side of routing allows commands to the Worker: it is READY and its
// health is neither SICK nor DEAD (UNKNOWN is routable, as in MDK).
func (v WorkerView) Routable() bool { return routable(v.State, v.Health) }

func routable(state, health string) bool {
	return state == Ready && health != envelope.HealthSick && health != envelope.HealthDead
}

// DeviceRef names a device and its owner.
type DeviceRef struct {
	DeviceID string
	WorkerID string
}

func (w *worker) view() WorkerView {
	v := WorkerView{
		PeerID: w.peerID, WorkerID: w.workerID, State: w.state, Health: w.health,
		Devices: clone(w.devices), DeclaredDevices: clone(w.declared), Conflicts: clone(w.conflicts), DeviceFamily: w.family, Contract: w.contract,
		RegisteredAt: w.registeredAt, LastSeen: w.lastSeen, LastError: w.lastError,
	}
	if v.Health == "" {
		v.Health = envelope.HealthUnknown
	}
	if w.contract != nil && w.contract.Metadata.DeviceFamily != "" {
		v.DeviceFamily = w.contract.Metadata.DeviceFamily
	}
	return v
}

// Worker returns the Worker with this workerId.
func (r *Registry) Worker(workerID string) (WorkerView, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if w := r.byWorker[workerID]; w != nil {
		return w.view(), true
	}
	return WorkerView{}, false
}

// ByPeer returns the Worker entry of a peer ID (also one that has not answered identity yet).
func (r *Registry) ByPeer(peerID string) (WorkerView, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if w := r.byPeer[peerID]; w != nil {
		return w.view(), true
	}
	return WorkerView{}, false
}

// Routable reports whether workerID is READY and not SICK or DEAD (see WorkerView.Routable).
func (r *Registry) Routable(workerID string) bool {
	r.mu.RLock()
	defer r.mu.RUnlock()
	w := r.byWorker[workerID]
	return w != nil && routable(w.state, w.health)
}

// ResolveDevice returns the owner of a device, whatever the owner's state (the caller checks routability).
func (r *Registry) ResolveDevice(deviceID string) (workerID, peerID string, ok bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	dev, ok := r.devices[deviceID]
	if !ok {
		return "", "", false
	}
	return dev.workerID, r.byWorker[dev.workerID].peerID, true
}

// DevicesOf returns the devices workerID owns, in the order its identity declared them.
func (r *Registry) DevicesOf(workerID string) []envelope.DeviceInfo {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if w := r.byWorker[workerID]; w != nil {
		return clone(w.devices)
	}
	return nil
}

// DevicesInRack returns the owned devices whose rack label is rack, sorted by deviceId. An empty rack matches
// nothing.
func (r *Registry) DevicesInRack(rack string) []DeviceRef {
	if rack == "" {
		return nil
	}
	r.mu.RLock()
	var out []DeviceRef
	for id, dev := range r.devices {
		if dev.info.Rack == rack {
			out = append(out, DeviceRef{DeviceID: id, WorkerID: dev.workerID})
		}
	}
	r.mu.RUnlock()
	slices.SortFunc(out, func(a, b DeviceRef) int { return cmp.Compare(a.DeviceID, b.DeviceID) })
	return out
}

// Contract returns workerID's contract, or nil unless it is READY. The contract is shared: do not modify it.
func (r *Registry) Contract(workerID string) *envelope.Contract {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if w := r.byWorker[workerID]; w != nil {
		return w.contract
	}
	return nil
}

// ContractForDevice returns the contract of the device's owner, or nil (unknown device, owner not READY).
func (r *Registry) ContractForDevice(deviceID string) *envelope.Contract {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if dev, ok := r.devices[deviceID]; ok {
		return r.byWorker[dev.workerID].contract
	}
	return nil
}

// List returns every entry (TERMINATED ones and peers that have not answered identity included) as
// worker.list rows, sorted by workerId, then peer ID.
func (r *Registry) List() []envelope.WorkerInfo {
	r.mu.RLock()
	out := make([]envelope.WorkerInfo, 0, len(r.byPeer))
	for _, w := range r.byPeer {
		v := w.view()
		info := envelope.WorkerInfo{
			WorkerID: v.WorkerID, PeerID: v.PeerID, DeviceIDs: make([]string, len(v.Devices)), State: v.State,
			HealthState: v.Health, DeviceFamily: v.DeviceFamily, Conflicts: v.Conflicts,
			RegisteredAt: kvrec.UnixMilli(v.RegisteredAt), LastSeen: kvrec.UnixMilli(v.LastSeen), Error: v.LastError,
		}
		for i, d := range v.Devices {
			info.DeviceIDs[i] = d.DeviceID
			if d.Rack != "" && !slices.Contains(info.Racks, d.Rack) {
				info.Racks = append(info.Racks, d.Rack)
			}
		}
		slices.Sort(info.Racks)
		out = append(out, info)
	}
	r.mu.RUnlock()
	slices.SortFunc(out, func(a, b envelope.WorkerInfo) int {
		return cmp.Or(cmp.Compare(a.WorkerID, b.WorkerID), cmp.Compare(a.PeerID, b.PeerID))
	})
	return out
}

// Devices returns every owned device as device.list rows, sorted by deviceId.
func (r *Registry) Devices() []envelope.DeviceRow {
	r.mu.RLock()
	out := make([]envelope.DeviceRow, 0, len(r.devices))
	for id, dev := range r.devices {
		owner := r.byWorker[dev.workerID]
		out = append(out, envelope.DeviceRow{
			DeviceID: id, WorkerID: dev.workerID, Rack: dev.info.Rack, Model: dev.info.Model,
			Routable: routable(owner.state, owner.health),
		})
	}
	r.mu.RUnlock()
	slices.SortFunc(out, func(a, b envelope.DeviceRow) int { return cmp.Compare(a.DeviceID, b.DeviceID) })
	return out
}

// Counts returns the number of entries per lifecycle state; every state but UNREGISTERED is present.
func (r *Registry) Counts() map[string]int {
	out := map[string]int{Discovered: 0, IdentitySaved: 0, Ready: 0, Terminated: 0}
	r.mu.RLock()
	defer r.mu.RUnlock()
	for _, w := range r.byPeer {
		out[w.state]++
	}
	return out
}

// ReadyWorkers returns the READY Workers sorted by workerId (the scheduler's and health monitor's work list).
func (r *Registry) ReadyWorkers() []WorkerView {
	r.mu.RLock()
	var out []WorkerView
	for _, w := range r.byWorker {
		if w.state == Ready {
			out = append(out, w.view())
		}
	}
	r.mu.RUnlock()
	slices.SortFunc(out, func(a, b WorkerView) int { return cmp.Compare(a.WorkerID, b.WorkerID) })
	return out
}

// PeerIDs returns the peer IDs of every entry that is not TERMINATED, sorted: the peers the node should keep
// resolving and connected to.
func (r *Registry) PeerIDs() []string {
	r.mu.RLock()
	out := make([]string, 0, len(r.byPeer))
	for id, w := range r.byPeer {
		if w.state != Terminated {
			out = append(out, id)
		}
	}
	r.mu.RUnlock()
	slices.Sort(out)
	return out
}
