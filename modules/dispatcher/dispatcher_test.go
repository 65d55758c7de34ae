package dispatcher

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/orknode/ork/protocols/envelope"
	"github.com/stretchr/testify/require"
)

// fakeDir is a Directory over plain maps.
type fakeDir struct {
	owner     map[string]string // device → worker
	rack      map[string]string // device → rack
	workers   map[string][]string
	contracts map[string]*envelope.Contract
	down      map[string]bool // not routable
	calls     int             // any method call (to prove Admit only reads)
}

func (f *fakeDir) ResolveDevice(id string) (string, bool) {
	f.calls++
	w, ok := f.owner[id]
	return w, ok
}

func (f *fakeDir) WorkerExists(w string) bool  { f.calls++; _, ok := f.workers[w]; return ok }
func (f *fakeDir) DevicesOf(w string) []string { f.calls++; return f.workers[w] }
func (f *fakeDir) ContractOf(w string) *envelope.Contract {
	f.calls++
	return f.contracts[w]
}
func (f *fakeDir) Routable(w string) bool { f.calls++; return !f.down[w] }

func (f *fakeDir) DevicesInRack(r string) []DeviceRef {
	f.calls++
	var out []DeviceRef
	for _, w := range sortedKeys(f.workers) {
		for _, d := range f.workers[w] {
			if f.rack[d] == r {
				out = append(out, DeviceRef{DeviceID: d, WorkerID: w})
			}
		}
	}
	return out
}

func sortedKeys(m map[string][]string) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	for i := range ks { // tiny insertion sort, no extra import
		for j := i; j > 0 && ks[j] < ks[j-1]; j-- {
			ks[j], ks[j-1] = ks[j-1], ks[j]
		}
	}
	return ks
}

func (f *fakeDir) add(w, rack string, devs ...string) {
	f.workers[w] = append(f.workers[w], devs...)
	for _, d := range devs {
		f.owner[d] = w
		if rack != "" {
			f.rack[d] = rack
		}
	}
}

func ptr(f float64) *float64 { return &f }

func minerContract(extra ...envelope.CommandSpec) *envelope.Contract {
	cmds := append([]envelope.CommandSpec{
		{Name: "reboot"},
		{Name: "setPowerMode", Params: []envelope.ParamSpec{
			{Name: "mode", Type: "string", Required: true, Enum: []any{"normal", "eco", "high"}},
		}},
		{Name: "setPowerLimit", Params: []envelope.ParamSpec{
			{Name: "watts", Type: "number", Required: true, Min: ptr(100), Max: ptr(5000)},
			{Name: "ramp", Type: "number"},
		}},
		{Name: "configure", Params: []envelope.ParamSpec{
			{Name: "pool", Type: "object"},
			{Name: "dryRun", Type: "boolean"},
		}},
	}, extra...)
	return &envelope.Contract{Capabilities: envelope.Capabilities{Commands: cmds}}
}

// newFleet:
//
//	w1: d1 d2 (rack r1)          miner contract + setLed
//	w2: d3 (rack r1), d4 (rack r2) miner contract
//	w3: d5 (rack r3)             no contract (nil)
//	w4: d6 (rack r3)             contract without a command list; not routable
//	wempty: no devices; wbig: 1025 devices (rack big); w1024: 1024 devices (rack full)
//	dx: owned by "wgone", which is not a Worker
func newFleet() *fakeDir {
	f := &fakeDir{
		owner: map[string]string{}, rack: map[string]string{}, workers: map[string][]string{},
		contracts: map[string]*envelope.Contract{}, down: map[string]bool{},
	}
	f.add("w1", "r1", "d1", "d2")
	f.add("w2", "r1", "d3")
	f.add("w2", "r2", "d4")
	f.add("w3", "r3", "d5")
	f.add("w4", "r3", "d6")
	f.workers["wempty"] = []string{}
	for i := range 1025 {
		f.add("wbig", "big", fmt.Sprintf("b%04d", i))
	}
	for i := range 1024 {
		f.add("w1024", "full", fmt.Sprintf("f%04d", i))
	}
	f.owner["dx"] = "wgone"
	f.contracts["w1"] = minerContract(envelope.CommandSpec{Name: "setLed", Params: []envelope.ParamSpec{{Name: "on", Type: "boolean", Required: true}}})
	f.contracts["w2"] = minerContract()
	f.contracts["w4"] = &envelope.Contract{}
	f.contracts["wbig"] = minerContract()
	f.contracts["w1024"] = minerContract()
	f.down["w4"] = true
	return f
}

func cmdEnv(deviceID, payload string) *envelope.Envelope {
	return &envelope.Envelope{
		ID: "id-1", Version: envelope.ProtocolVersion, Type: envelope.TypeRequest,
		Action: envelope.ActionCommandRequest, Sender: "gateway", DeviceID: deviceID, Timestamp: 1,
		Payload: json.RawMessage(payload),
	}
}

func manyTargets(n int) string {
	ts := make([]string, n)
	for i := range ts {
		ts[i] = fmt.Sprintf("%q", fmt.Sprintf("f%04d", i))
	}
	return "[" + strings.Join(ts, ",") + "]"
}

// TestAdmitRejects has one row per rule and per MDK error string, in the order Admit checks them.
func TestAdmitRejects(t *testing.T) {
	tests := []struct {
		name     string
		deviceID string
		payload  string
		want     string // the full error string, or its prefix when it ends with *
	}{
		// 1. payload decode
		{"payload array", "d1", `[1]`, "ERR_PAYLOAD_NOT_OBJECT"},
		{"payload string", "d1", `"x"`, "ERR_PAYLOAD_NOT_OBJECT"},
		{"payload garbage", "d1", `{"command":`, "ERR_PAYLOAD_NOT_OBJECT*"},
		{"params not object", "d1", `{"command":"reboot","params":"x"}`, "ERR_PAYLOAD_NOT_OBJECT*"},
		{"params a raw array", "d1", `{"command":"setPowerLimit","params":[300]}`, "ERR_PAYLOAD_NOT_OBJECT*"},
		{"timeoutMs not number", "d1", `{"command":"reboot","timeoutMs":"1s"}`, "ERR_PAYLOAD_NOT_OBJECT*"},
		{"rack not string", "", `{"command":"reboot","scope":"rack","workerId":"w1","rack":7}`, "ERR_PAYLOAD_NOT_OBJECT*"},
		// 2. CommandRequest.Validate, in the MDK validator order
		{"command missing", "d1", `{}`, "ERR_PAYLOAD_COMMAND_REQUIRED"},
		{"null payload", "d1", `null`, "ERR_PAYLOAD_COMMAND_REQUIRED"},
		{"command empty", "d1", `{"command":""}`, "ERR_PAYLOAD_COMMAND_REQUIRED"},
		{"command not string", "d1", `{"command":5,"scope":"galaxy"}`, "ERR_PAYLOAD_COMMAND_REQUIRED"},
		{"unknown scope rejected, not device", "d1", `{"command":"reboot","scope":"galaxy"}`, "ERR_PAYLOAD_SCOPE_INVALID: galaxy"},
		{"scope not string", "d1", `{"command":"reboot","scope":5}`, "ERR_PAYLOAD_SCOPE_INVALID: 5"},
		{"worker scope without workerId", "", `{"command":"reboot","scope":"worker"}`, "ERR_PAYLOAD_WORKER_ID_REQUIRED"},
		{"worker scope, workerId not string", "", `{"command":"reboot","scope":"worker","workerId":1}`, "ERR_PAYLOAD_WORKER_ID_REQUIRED"},
		{"rack scope without rack or workerId", "", `{"command":"reboot","scope":"rack"}`, "ERR_RACK_REQUIRED"},
		{"workerId not string", "d1", `{"command":"reboot","workerId":1,"targets":[""]}`, "ERR_PAYLOAD_WORKER_ID_INVALID"},
		{"targets not array", "", `{"command":"reboot","scope":"worker","workerId":"w1","targets":"d1"}`, "ERR_PAYLOAD_TARGETS_INVALID"},
		{"1025 targets", "", `{"command":"reboot","scope":"worker","workerId":"w1024","targets":` + manyTargets(1025) + `}`, "ERR_PAYLOAD_TARGETS_TOO_MANY: 1025 > 1024"},
		{"empty target", "", `{"command":"reboot","scope":"worker","workerId":"w1","targets":["d1",""]}`, "ERR_PAYLOAD_TARGET_INVALID: at index 1"},
		{"target not string", "", `{"command":"reboot","scope":"worker","workerId":"w1","targets":[1]}`, "ERR_PAYLOAD_TARGET_INVALID: at index 0"},
		{"negative timeout", "d1", `{"command":"reboot","timeoutMs":-1}`, "ERR_PAYLOAD_NOT_OBJECT: timeoutMs must be >= 0"},
		// 3. target resolution
		{"device scope without deviceId", "", `{"command":"reboot"}`, "ERR_DEVICE_ID_REQUIRED"},
		{"explicit device scope without deviceId", "", `{"command":"reboot","scope":"device"}`, "ERR_DEVICE_ID_REQUIRED"},
		{"unknown device", "nope", `{"command":"reboot"}`, "ERR_DEVICE_NOT_FOUND: nope"},
		{"device of an unknown Worker", "dx", `{"command":"reboot"}`, "ERR_WORKER_NOT_FOUND: wgone"},
		{"device scope with targets", "d1", `{"command":"reboot","targets":["d2"]}`, "ERR_PAYLOAD_TARGETS_INVALID: targets need scope worker or rack"},
		{"unknown worker", "", `{"command":"reboot","scope":"worker","workerId":"wz"}`, "ERR_WORKER_NOT_FOUND: wz"},
		{"target on another Worker", "", `{"command":"reboot","scope":"worker","workerId":"w1","targets":["d1","d3"]}`, "ERR_DEVICE_NOT_FOUND: d3"},
		{"worker without devices", "", `{"command":"reboot","scope":"worker","workerId":"wempty"}`, "ERR_DEVICE_NOT_FOUND: worker wempty"},
		{"worker fan-out 1025", "", `{"command":"reboot","scope":"worker","workerId":"wbig"}`, "ERR_PAYLOAD_TARGETS_TOO_MANY: worker wbig has 1025 devices > 1024"},
		{"unknown rack", "", `{"command":"reboot","scope":"rack","rack":"rz"}`, "ERR_DEVICE_NOT_FOUND: rack rz"},
		{"rack fan-out 1025", "", `{"command":"reboot","scope":"rack","rack":"big"}`, "ERR_PAYLOAD_TARGETS_TOO_MANY: rack big has 1025 devices > 1024"},
		{"rack target outside rack", "", `{"command":"reboot","scope":"rack","rack":"r1","targets":["d4"]}`, "ERR_DEVICE_NOT_FOUND: d4"},
		{"rack on unknown worker", "", `{"command":"reboot","scope":"rack","rack":"r1","workerId":"wz"}`, "ERR_WORKER_NOT_FOUND: wz"},
		{"rack not on that worker", "", `{"command":"reboot","scope":"rack","rack":"r2","workerId":"w1"}`, "ERR_DEVICE_NOT_FOUND: rack r2 on worker w1"},
		{"rack by workerId, unknown", "", `{"command":"reboot","scope":"rack","workerId":"wz"}`, "ERR_WORKER_NOT_FOUND: wz"},
		// 4. capabilities and params (MDK strings)
		{"command not in capabilities", "d1", `{"command":"fly"}`, "ERR_COMMAND_NOT_IN_CAPABILITIES: fly"},
		{"worker scope not in capabilities", "", `{"command":"fly","scope":"worker","workerId":"w2"}`, "ERR_COMMAND_NOT_IN_CAPABILITIES: fly"},
		{"rack across Workers names the refusing one", "", `{"command":"setLed","params":{"on":true},"scope":"rack","rack":"r1"}`, "ERR_COMMAND_NOT_IN_CAPABILITIES: setLed (worker w2)"},
		{"param required", "d1", `{"command":"setPowerMode"}`, "ERR_PARAM_REQUIRED: mode is required"},
		{"param null counts as absent", "d1", `{"command":"setPowerMode","params":{"mode":null}}`, "ERR_PARAM_REQUIRED: mode is required"},
		{"param type number", "d1", `{"command":"setPowerLimit","params":{"watts":"300"}}`, "ERR_PARAM_TYPE: watts must be number"},
		{"param type string", "d1", `{"command":"setPowerMode","params":{"mode":1}}`, "ERR_PARAM_TYPE: mode must be string"},
		{"param type boolean", "d1", `{"command":"setLed","params":{"on":"yes"}}`, "ERR_PARAM_TYPE: on must be boolean"},
		{"param type object", "d1", `{"command":"configure","params":{"pool":"x"}}`, "ERR_PARAM_TYPE: pool must be object"},
		{"param enum", "d1", `{"command":"setPowerMode","params":{"mode":"turbo"}}`, "ERR_PARAM_ENUM: mode must be one of [normal eco high]"},
		{"param below min", "d1", `{"command":"setPowerLimit","params":{"watts":99}}`, "ERR_PARAM_RANGE: watts below min 100"},
		{"param above max", "d1", `{"command":"setPowerLimit","params":{"watts":5001}}`, "ERR_PARAM_RANGE: watts above max 5000"},
		{"positional value checked after normalising", "d1", `{"command":"setPowerLimit","params":{"value":50}}`, "ERR_PARAM_RANGE: watts below min 100"},
		{"positional args checked after normalising", "d1", `{"command":"setPowerLimit","params":{"args":[300,"fast"]}}`, "ERR_PARAM_TYPE: ramp must be number"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := newFleet()
			p, err := New(Options{Directory: dir}).Admit(cmdEnv(tc.deviceID, tc.payload))
			require.Error(t, err)
			var e *envelope.Error
			require.ErrorAs(t, err, &e)
			if prefix, ok := strings.CutSuffix(tc.want, "*"); ok {
				require.True(t, strings.HasPrefix(e.Error(), prefix), e.Error())
			} else {
				require.Equal(t, tc.want, e.Error())
			}
			code, _, _ := strings.Cut(strings.TrimSuffix(tc.want, "*"), ":")
			require.Equal(t, code, e.Code)
			require.Zero(t, p, "a rejected command yields no plan")
		})
	}
}

func TestAdmitNilEnvelope(t *testing.T) {
	_, err := New(Options{Directory: newFleet()}).Admit(nil)
	require.Equal(t, envelope.CodeEnvelopeNotObject, envelope.CodeOf(err))
}

// TestResolveUnreachableCodes covers the MDK dispatcher codes that Validate pre-empts on the Admit path
// (ERR_PAYLOAD_WORKER_ID_REQUIRED comes first), and the unknown-scope guard that must never fall through
// to device scope.
func TestResolveUnreachableCodes(t *testing.T) {
	d := New(Options{Directory: newFleet()})
	_, err := d.admit("", "s", &envelope.CommandRequest{Command: "reboot", Scope: envelope.ScopeWorker})
	require.EqualError(t, err, "ERR_WORKER_ID_REQUIRED")
	_, err = d.admit("", "s", &envelope.CommandRequest{Command: "reboot", Scope: envelope.ScopeRack})
	require.EqualError(t, err, "ERR_RACK_REQUIRED")
	_, err = d.admit("d1", "s", &envelope.CommandRequest{Command: "reboot", Scope: "galaxy"})
	require.EqualError(t, err, "ERR_PAYLOAD_SCOPE_INVALID: galaxy")
}

func children(p Plan) []string {
	var out []string
	for _, c := range p.Children {
		out = append(out, c.WorkerID+"/"+c.DeviceID)
	}
	return out
}

func TestAdmitPlans(t *testing.T) {
	tests := []struct {
		name     string
		deviceID string
		payload  string
		scope    string
		parent   *Child
		rack     string
		children []string
		params   map[string]any // of the first child
	}{
		{
			name: "device scope", deviceID: "d1", payload: `{"command":"setPowerMode","params":{"mode":"eco"}}`,
			scope: "device", children: []string{"w1/d1"}, params: map[string]any{"mode": "eco"},
		},
		{
			name: "explicit device scope, workerId ignored as in MDK", deviceID: "d3",
			payload: `{"command":"reboot","scope":"device","workerId":"w1"}`,
			scope:   "device", children: []string{"w2/d3"},
		},
		{
			name: "worker fan-out", payload: `{"command":"reboot","scope":"worker","workerId":"w2"}`,
			scope: "worker", parent: &Child{WorkerID: "w2", Command: "reboot"}, children: []string{"w2/d3", "w2/d4"},
		},
		{
			name: "worker targets, deduplicated, in targets order", payload: `{"command":"reboot","scope":"worker","workerId":"w1","targets":["d2","d1","d2"]}`,
			scope: "worker", parent: &Child{WorkerID: "w1", Command: "reboot"}, children: []string{"w1/d2", "w1/d1"},
		},
		{
			name: "rack fan-out across Workers", payload: `{"command":"setPowerLimit","params":{"value":300},"scope":"rack","rack":"r1"}`,
			scope: "rack", rack: "r1", parent: &Child{Command: "setPowerLimit", Params: map[string]any{"value": 300.0}},
			children: []string{"w1/d1", "w1/d2", "w2/d3"}, params: map[string]any{"watts": 300.0},
		},
		{
			name: "rack named by workerId (MDK clients)", payload: `{"command":"reboot","scope":"rack","workerId":"w2"}`,
			scope: "rack", parent: &Child{WorkerID: "w2", Command: "reboot"}, children: []string{"w2/d3", "w2/d4"},
		},
		{
			name: "rack and workerId: that rack on that Worker", payload: `{"command":"reboot","scope":"rack","rack":"r1","workerId":"w2"}`,
			scope: "rack", rack: "r1", parent: &Child{WorkerID: "w2", Command: "reboot"}, children: []string{"w2/d3"},
		},
		{
			name: "rack with targets", payload: `{"command":"reboot","scope":"rack","rack":"r1","targets":["d3","d1"]}`,
			scope: "rack", rack: "r1", parent: &Child{Command: "reboot"}, children: []string{"w2/d3", "w1/d1"},
		},
		{
			name: "1024 devices fan out", payload: `{"command":"reboot","scope":"worker","workerId":"w1024"}`,
			scope: "worker", parent: &Child{WorkerID: "w1024", Command: "reboot"},
		},
		{
			name: "1024 targets", payload: `{"command":"reboot","scope":"worker","workerId":"w1024","targets":` + manyTargets(1024) + `}`,
			scope: "worker", parent: &Child{WorkerID: "w1024", Command: "reboot"},
		},
		{
			name: "contract absent: any command passes, params untouched", deviceID: "d5",
			payload: `{"command":"anything","params":{"value":1}}`, scope: "device", children: []string{"w3/d5"},
			params: map[string]any{"value": 1.0},
		},
		{
			name: "contract without a command list: any command passes", deviceID: "d6",
			payload: `{"command":"anything"}`, scope: "device", children: []string{"w4/d6"},
		},
		{
			name: "not routable: admitted, waits in its queue", deviceID: "d6",
			payload: `{"command":"reboot"}`, scope: "device", children: []string{"w4/d6"},
		},
		{
			name: "rack over a nil and an empty contract", payload: `{"command":"blink","scope":"rack","rack":"r3"}`,
			scope: "rack", rack: "r3", parent: &Child{Command: "blink"}, children: []string{"w3/d5", "w4/d6"},
		},
		{
			name: "positional args", deviceID: "d1", payload: `{"command":"setPowerLimit","params":{"args":[300,2]}}`,
			scope: "device", children: []string{"w1/d1"}, params: map[string]any{"watts": 300.0, "ramp": 2.0},
		},
		{
			name: "boolean and object params", deviceID: "d1", payload: `{"command":"configure","params":{"pool":{"url":"x"},"dryRun":true}}`,
			scope: "device", children: []string{"w1/d1"}, params: map[string]any{"pool": map[string]any{"url": "x"}, "dryRun": true},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, err := New(Options{Directory: newFleet()}).Admit(cmdEnv(tc.deviceID, tc.payload))
			require.NoError(t, err)
			require.Equal(t, tc.scope, p.Scope)
			require.Equal(t, tc.rack, p.Rack)
			require.Equal(t, tc.parent, p.Parent)
			require.Equal(t, "gateway", p.Requester)
			if tc.children != nil {
				require.Equal(t, tc.children, children(p))
			}
			require.LessOrEqual(t, len(p.Children), envelope.MaxTargets)
			for _, c := range p.Children {
				require.NotEmpty(t, c.DeviceID)
				require.NotEmpty(t, c.WorkerID)
				require.Equal(t, p.Children[0].Command, c.Command)
			}
			if tc.params != nil {
				require.Equal(t, tc.params, p.Children[0].Params)
			}
		})
	}
}

func TestAdmitFanOutSize(t *testing.T) {
	d := New(Options{Directory: newFleet()})
	p, err := d.Admit(cmdEnv("", `{"command":"reboot","scope":"rack","rack":"full"}`))
	require.NoError(t, err)
	require.Len(t, p.Children, 1024)
	_, err = d.Admit(cmdEnv("", `{"command":"reboot","scope":"rack","rack":"big"}`))
	require.Equal(t, envelope.CodePayloadTargetsTooMany, envelope.CodeOf(err))
}

func TestAdmitCarriesRequestFields(t *testing.T) {
	p, err := New(Options{Directory: newFleet()}).Admit(cmdEnv("d1",
		`{"command":"reboot","idempotencyKey":"k-1","timeoutMs":1500,"requesterId":"ignored","commandId":"ignored"}`))
	require.NoError(t, err)
	require.Equal(t, "k-1", p.IdempotencyKey)
	require.Equal(t, int64(1500), p.TimeoutMs)
	require.Equal(t, "gateway", p.Requester)
	require.Nil(t, p.Parent)
}

func TestRejectUnroutable(t *testing.T) {
	d := New(Options{Directory: newFleet(), RejectUnroutable: true})
	_, err := d.Admit(cmdEnv("d6", `{"command":"reboot"}`))
	require.EqualError(t, err, "ERR_WORKER_NOT_ROUTABLE: w4")
	_, err = d.Admit(cmdEnv("", `{"command":"reboot","scope":"rack","rack":"r3"}`))
	require.EqualError(t, err, "ERR_WORKER_NOT_ROUTABLE: w4")
	_, err = d.Admit(cmdEnv("d1", `{"command":"reboot"}`))
	require.NoError(t, err)
}

// TestContractCheckedOncePerWorker: a fan-out consults each Worker's contract once, not once per device.
func TestContractCheckedOncePerWorker(t *testing.T) {
	dir := newFleet()
	before := dir.calls
	_, err := New(Options{Directory: dir}).Admit(cmdEnv("", `{"command":"reboot","scope":"worker","workerId":"w1024"}`))
	require.NoError(t, err)
	require.Less(t, dir.calls-before, 10)
}

func TestNewPanicsWithoutDirectory(t *testing.T) {
	require.Panics(t, func() { New(Options{}) })
}
