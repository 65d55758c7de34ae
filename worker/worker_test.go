package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	mocknet "github.com/libp2p/go-libp2p/p2p/net/mock"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/orknode/ork/protocols"
	"github.com/orknode/ork/protocols/envelope"
	"github.com/orknode/ork/protocols/rpc"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func ptr(f float64) *float64 { return &f }

// fanContract declares a fan controller: two telemetry channels and a few
// commands, some of them test-only.
func fanContract() *envelope.Contract {
	return &envelope.Contract{
		Metadata: envelope.Metadata{
			Provider: "ork-test", DeviceFamily: "fan", Brand: "Test", ModelsSupported: []string{"F1"},
			Overview: "A fan controller used by the worker SDK tests.",
		},
		Capabilities: envelope.Capabilities{
			Telemetry: []envelope.TelemetryChannel{
				{Name: "rpm", Unit: "rpm", Type: "number", Description: "fan speed"},
				{Name: "temp", Unit: "C", Type: "number", Description: "air temperature"},
			},
			Commands: []envelope.CommandSpec{
				{Name: "setSpeed", Params: []envelope.ParamSpec{{Name: "rpm", Type: "number", Required: true, Min: ptr(0), Max: ptr(5000)}}},
				{Name: "setMode", Params: []envelope.ParamSpec{{Name: "mode", Type: "string", Required: true, Enum: []any{"auto", "manual"}}}},
				{Name: "slow"},
				{Name: "fail"},
				{Name: "hang"},
				{Name: "noHandler"},
			},
			Health: envelope.HealthSpec{SupportedStates: []string{"ok", "fault"}},
			Errors: map[string]string{},
		},
	}
}

type harness struct {
	t       *testing.T
	mn      mocknet.Mocknet
	kernel  host.Host
	client  *rpc.Client
	w       *Worker
	runs    atomic.Int64 // setSpeed + slow handler runs
	release chan struct{}
	entered chan string
}

// newHarness starts a Worker on a mocknet host with two devices (the second
// offline) and a kernel host trusted by it.
func newHarness(t *testing.T, mutate func(*Config)) *harness {
	t.Helper()
	mn := mocknet.New()
	t.Cleanup(func() { _ = mn.Close() })
	kh, err := mn.GenPeer()
	require.NoError(t, err)
	wh, err := mn.GenPeer()
	require.NoError(t, err)
	require.NoError(t, mn.LinkAll())

	cfg := Config{
		WorkerID: "fan-1",
		Contract: fanContract(),
		Devices: []Device{
			{DeviceID: "fan-1-a", Rack: "rack-01", Model: "F1"},
			{DeviceID: "fan-1-b", Rack: "rack-01", Model: "F1", Offline: true},
		},
		Host:           wh,
		TrustedKernels: []peer.ID{kh.ID()},
	}
	if mutate != nil {
		mutate(&cfg)
	}
	w, err := New(context.Background(), cfg)
	require.NoError(t, err)
	h := &harness{t: t, mn: mn, kernel: kh, w: w, release: make(chan struct{}), entered: make(chan string, 16)}
	t.Cleanup(func() { require.NoError(t, w.Close()) })

	require.NoError(t, w.HandleCommand("setSpeed", func(_ context.Context, dev string, p map[string]any) (any, error) {
		h.runs.Add(1)
		return map[string]any{"device": dev, "rpm": p["rpm"]}, nil
	}))
	require.NoError(t, w.HandleCommand("setMode", func(context.Context, string, map[string]any) (any, error) { return nil, nil }))
	require.NoError(t, w.HandleCommand("slow", func(ctx context.Context, dev string, _ map[string]any) (any, error) {
		h.runs.Add(1)
		h.entered <- dev
		select {
		case <-h.release:
			return map[string]any{"done": true}, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}))
	require.NoError(t, w.HandleCommand("fail", func(context.Context, string, map[string]any) (any, error) {
		return nil, errors.New("motor stalled")
	}))
	require.NoError(t, w.HandleCommand("hang", func(ctx context.Context, _ string, _ map[string]any) (any, error) {
		<-ctx.Done()
		return nil, ctx.Err()
	}))
	w.HandleTelemetry(func(_ context.Context, dev string) (map[string]any, error) {
		return map[string]any{"rpm": 1200.0, "temp": 31.5, "dev": dev}, nil
	})

	h.client = rpc.NewClient(kh, rpc.ClientOptions{Sender: "kernel"})
	t.Cleanup(func() { _ = h.client.Close() })
	return h
}

func (h *harness) request(proto protocol.ID, action, dev string, payload, out any) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return h.client.Request(ctx, h.w.ID(), proto, action, dev, payload, out)
}

func (h *harness) command(id, name, dev string, params map[string]any) envelope.CommandResult {
	h.t.Helper()
	var res envelope.CommandResult
	require.NoError(h.t, h.request(protocols.WorkerCommand, envelope.ActionCommandRequest, dev,
		envelope.CommandRequest{CommandID: id, Command: name, Params: params, Scope: envelope.ScopeDevice}, &res))
	return res
}

func (h *harness) status(id string) envelope.CommandResult {
	h.t.Helper()
	var res envelope.CommandResult
	require.NoError(h.t, h.request(protocols.WorkerCommand, envelope.ActionCommandStatus, "", envelope.CommandRef{CommandID: id}, &res))
	return res
}

func TestIdentityCapabilitiesPingState(t *testing.T) {
	h := newHarness(t, nil)

	var id envelope.IdentityResponse
	require.NoError(t, h.request(protocols.WorkerIdentity, envelope.ActionIdentityRequest, "", nil, &id))
	require.NoError(t, id.Validate())
	require.Equal(t, envelope.IdentityResponse{WorkerID: "fan-1", DeviceFamily: "fan", Devices: []envelope.DeviceInfo{
		{DeviceID: "fan-1-a", Rack: "rack-01", Model: "F1"}, {DeviceID: "fan-1-b", Rack: "rack-01", Model: "F1"},
	}}, id)

	var caps envelope.CapabilityResponse
	require.NoError(t, h.request(protocols.WorkerCapabilities, envelope.ActionCapabilityRequest, "", nil, &caps))
	require.NoError(t, caps.Contract.Validate())
	require.Equal(t, fanContract(), caps.Contract)

	var pong envelope.HealthPong
	require.NoError(t, h.request(protocols.WorkerPing, envelope.ActionHealthPing, "", nil, &pong))
	require.Equal(t, "OK", pong.Status)
	require.GreaterOrEqual(t, pong.UptimeMs, int64(0))
	require.Zero(t, pong.Load)

	var st envelope.StateResponse
	require.NoError(t, h.request(protocols.WorkerState, envelope.ActionStatePull, "", nil, &st))
	require.Equal(t, envelope.StateResponse{WorkerID: "fan-1", DeviceCount: 2, State: map[string]envelope.DeviceState{
		"fan-1-a": {Status: "online"}, "fan-1-b": {Status: "offline"},
	}}, st)

	var one envelope.StateResponse
	require.NoError(t, h.request(protocols.WorkerState, envelope.ActionStatePull, "fan-1-a", nil, &one))
	require.Equal(t, map[string]envelope.DeviceState{"fan-1-a": {Status: "online"}}, one.State)

	err := h.request(protocols.WorkerState, envelope.ActionStatePull, "nope", nil, &st)
	require.Equal(t, "ERR_DEVICE_NOT_FOUND: nope", err.Error())

	// Devices change at run time; the next identity answer shows it.
	require.NoError(t, h.w.SetDevices([]Device{{DeviceID: "fan-1-c"}}))
	var id2 envelope.IdentityResponse
	require.NoError(t, h.request(protocols.WorkerIdentity, envelope.ActionIdentityRequest, "", nil, &id2))
	require.Equal(t, []envelope.DeviceInfo{{DeviceID: "fan-1-c"}}, id2.Devices)
	require.ErrorIs(t, h.w.SetOnline("nope", true), ErrUnknownDevice)
	require.ErrorIs(t, h.w.SetDevices([]Device{{DeviceID: "x"}, {DeviceID: "x"}}), ErrInvalidConfig)
}

func TestTelemetry(t *testing.T) {
	h := newHarness(t, nil)
	pull := func(dev string, query map[string]any) map[string]any {
		t.Helper()
		var out map[string]any
		require.NoError(t, h.request(protocols.WorkerTelemetry, envelope.ActionTelemetryPull, dev, envelope.TelemetryPull{Query: query}, &out))
		require.NotZero(t, out["timestamp"])
		delete(out, "timestamp")
		return out
	}

	// One device.
	require.Equal(t, map[string]any{"deviceId": "fan-1-a", "metrics": map[string]any{"rpm": 1200.0, "temp": 31.5, "dev": "fan-1-a"}}, pull("fan-1-a", nil))
	require.Equal(t, map[string]any{"deviceId": "fan-1-b", "error": "ERR_DEVICE_UNAVAILABLE: fan-1-b"}, pull("fan-1-b", map[string]any{"type": "metrics"}))
	require.Equal(t, map[string]any{"deviceId": "nope", "error": "ERR_DEVICE_NOT_FOUND: nope"}, pull("nope", nil))

	// Every device in one answer.
	var batch envelope.TelemetryBatch
	require.NoError(t, h.request(protocols.WorkerTelemetry, envelope.ActionTelemetryPull, "", envelope.TelemetryPull{Query: map[string]any{}}, &batch))
	require.Equal(t, "fan-1", batch.WorkerID)
	require.NotZero(t, batch.Timestamp)
	require.Equal(t, []envelope.DeviceTelemetry{
		{DeviceID: "fan-1-a", Metrics: json.RawMessage(`{"dev":"fan-1-a","rpm":1200,"temp":31.5}`)},
		{DeviceID: "fan-1-b", Error: "ERR_DEVICE_UNAVAILABLE: fan-1-b"},
	}, batch.Devices)

	// The device id may also come in the payload.
	var one envelope.DeviceTelemetry
	require.NoError(t, h.request(protocols.WorkerTelemetry, envelope.ActionTelemetryPull, "", envelope.TelemetryPull{DeviceID: "fan-1-a"}, &one))
	require.JSONEq(t, `{"dev":"fan-1-a","rpm":1200,"temp":31.5}`, string(one.Metrics))

	// One channel.
	require.Equal(t, map[string]any{"deviceId": "fan-1-a", "name": "temp", "value": 31.5}, pull("fan-1-a", map[string]any{"type": "temp"}))
	require.Equal(t, map[string]any{"deviceId": "", "error": "ERR_DEVICE_ID_REQUIRED: temp"}, pull("", map[string]any{"type": "temp"}))

	// Unknown and registered query types.
	require.Equal(t, map[string]any{"deviceId": "fan-1-a", "error": "ERR_UNKNOWN_QUERY_TYPE: logs"}, pull("fan-1-a", map[string]any{"type": "logs"}))
	require.NoError(t, h.w.HandleQuery("logs", func(_ context.Context, dev string, q map[string]any) (map[string]any, error) {
		return map[string]any{"logs": []any{"boot " + dev}, "limit": q["limit"]}, nil
	}))
	require.Equal(t, map[string]any{"deviceId": "fan-1-a", "logs": []any{"boot fan-1-a"}, "limit": 5.0},
		pull("fan-1-a", map[string]any{"type": "logs", "limit": 5}))
	require.Error(t, h.w.HandleQuery("metrics", func(context.Context, string, map[string]any) (map[string]any, error) { return nil, nil }))

	// A failing reader fails its device only.
	h.w.HandleTelemetry(func(_ context.Context, dev string) (map[string]any, error) {
		if dev == "fan-1-a" {
			return nil, errors.New("i2c timeout")
		}
		return map[string]any{"rpm": 1.0}, nil
	})
	require.NoError(t, h.w.SetOnline("fan-1-b", true))
	var batch2 envelope.TelemetryBatch
	require.NoError(t, h.request(protocols.WorkerTelemetry, envelope.ActionTelemetryPull, "", nil, &batch2))
	require.Equal(t, []envelope.DeviceTelemetry{
		{DeviceID: "fan-1-a", Error: "i2c timeout"},
		{DeviceID: "fan-1-b", Metrics: json.RawMessage(`{"rpm":1}`)},
	}, batch2.Devices)
}

func TestCommandOutcomes(t *testing.T) {
	h := newHarness(t, nil)

	res := h.command("c1", "setSpeed", "fan-1-a", map[string]any{"rpm": 3000})
	require.Equal(t, envelope.StateSuccess, res.Status)
	require.Equal(t, "c1", res.CommandID)
	require.JSONEq(t, `{"device":"fan-1-a","rpm":3000}`, string(res.Result))

	// Positional params are mapped onto the declared names.
	res = h.command("c2", "setSpeed", "fan-1-a", map[string]any{"value": 10})
	require.Equal(t, envelope.StateSuccess, res.Status)
	require.JSONEq(t, `{"device":"fan-1-a","rpm":10}`, string(res.Result))

	res = h.command("c3", "setMode", "fan-1-a", map[string]any{"mode": "auto"})
	require.Equal(t, envelope.StateSuccess, res.Status)
	require.JSONEq(t, `{}`, string(res.Result))

	failures := []struct {
		name, cmd, dev string
		params         map[string]any
		want           string
	}{
		{"handler error", "fail", "fan-1-a", nil, "motor stalled"},
		{"no device", "setSpeed", "", map[string]any{"rpm": 1}, "ERR_DEVICE_ID_REQUIRED"},
		{"unknown device", "setSpeed", "nope", map[string]any{"rpm": 1}, "ERR_DEVICE_NOT_FOUND: nope"},
		{"offline device", "setSpeed", "fan-1-b", map[string]any{"rpm": 1}, "ERR_DEVICE_UNAVAILABLE: fan-1-b"},
		{"undeclared command", "explode", "fan-1-a", nil, "ERR_UNKNOWN_COMMAND: explode"},
		{"declared without handler", "noHandler", "fan-1-a", nil, "ERR_UNKNOWN_COMMAND: noHandler"},
		{"param above max", "setSpeed", "fan-1-a", map[string]any{"rpm": 9000}, "ERR_PARAM_RANGE: rpm above max 5000"},
		{"param below min", "setSpeed", "fan-1-a", map[string]any{"rpm": -1}, "ERR_PARAM_RANGE: rpm below min 0"},
		{"param type", "setSpeed", "fan-1-a", map[string]any{"rpm": "fast"}, "ERR_PARAM_TYPE: rpm must be number"},
		{"param required", "setSpeed", "fan-1-a", nil, "ERR_PARAM_REQUIRED: rpm is required"},
		{"param enum", "setMode", "fan-1-a", map[string]any{"mode": "turbo"}, "ERR_PARAM_ENUM: mode must be one of [auto manual]"},
	}
	for i, f := range failures {
		t.Run(f.name, func(t *testing.T) {
			id := fmt.Sprintf("f%d", i)
			res := h.command(id, f.cmd, f.dev, f.params)
			require.Equal(t, envelope.CommandResult{CommandID: id, Status: envelope.StateFailed, Error: f.want}, res)
			require.Equal(t, res, h.status(id), "command.status answers the same outcome")
		})
	}
	require.EqualValues(t, 2, h.runs.Load(), "failed validation never reaches the handler")

	// A commandId is required on both actions.
	err := h.request(protocols.WorkerCommand, envelope.ActionCommandRequest, "fan-1-a", envelope.CommandRequest{Command: "setSpeed"}, nil)
	require.Equal(t, envelope.CodePayloadCommandIDRequired, envelope.CodeOf(err))
	err = h.request(protocols.WorkerCommand, envelope.ActionCommandStatus, "", envelope.CommandRef{}, nil)
	require.Equal(t, envelope.CodePayloadCommandIDRequired, envelope.CodeOf(err))

	require.ErrorIs(t, h.w.HandleCommand("explode", func(context.Context, string, map[string]any) (any, error) { return nil, nil }), ErrUnknownCommand)
}

func TestCommandDedup(t *testing.T) {
	h := newHarness(t, nil)

	// Sequential resend: the stored result, no second run.
	first := h.command("dup-1", "setSpeed", "fan-1-a", map[string]any{"rpm": 100})
	again := h.command("dup-1", "setSpeed", "fan-1-a", map[string]any{"rpm": 4000})
	require.Equal(t, first, again)
	require.EqualValues(t, 1, h.runs.Load())

	// Concurrent duplicates while the first run is in progress: all wait for
	// it and get its result.
	const n = 8
	results := make([]envelope.CommandResult, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { results[i] = h.command("dup-2", "slow", "fan-1-a", nil) })
	}
	require.Equal(t, "fan-1-a", <-h.entered)
	require.Eventually(t, func() bool {
		var pong envelope.HealthPong
		return h.request(protocols.WorkerPing, envelope.ActionHealthPing, "", nil, &pong) == nil && pong.Load == 1
	}, 5*time.Second, 10*time.Millisecond)
	require.Equal(t, StatusRunning, h.status("dup-2").Status)
	close(h.release)
	wg.Wait()
	for _, r := range results {
		require.Equal(t, envelope.CommandResult{CommandID: "dup-2", Status: envelope.StateSuccess, Result: json.RawMessage(`{"done":true}`)}, r)
	}
	require.EqualValues(t, 2, h.runs.Load())
	require.Equal(t, map[string]int{"dup-1": 1, "dup-2": 1}, h.w.Executions())
	select {
	case dev := <-h.entered:
		t.Fatalf("slow ran twice (%s)", dev)
	default:
	}
}

func TestCommandStatus(t *testing.T) {
	h := newHarness(t, nil)
	require.Equal(t, envelope.CommandResult{CommandID: "never", Status: envelope.StatusUnknown}, h.status("never"))

	done := make(chan envelope.CommandResult, 1)
	go func() { done <- h.command("s1", "slow", "fan-1-a", nil) }()
	<-h.entered
	require.Equal(t, envelope.CommandResult{CommandID: "s1", Status: StatusRunning}, h.status("s1"))
	close(h.release)
	res := <-done
	require.Equal(t, envelope.StateSuccess, res.Status)
	require.Equal(t, res, h.status("s1"))
}

func TestCommandDeadlineAndClose(t *testing.T) {
	h := newHarness(t, nil)

	// The request's timeoutMs shortens the handler's deadline.
	var res envelope.CommandResult
	require.NoError(t, h.request(protocols.WorkerCommand, envelope.ActionCommandRequest, "fan-1-a",
		envelope.CommandRequest{CommandID: "h1", Command: "hang", TimeoutMs: 50}, &res))
	require.Equal(t, envelope.StateFailed, res.Status)
	require.True(t, strings.HasPrefix(res.Error, "ERR_COMMAND_EXPIRED"), res.Error)

	// Close cancels a running handler and waits for it.
	go func() {
		var r envelope.CommandResult
		_ = h.request(protocols.WorkerCommand, envelope.ActionCommandRequest, "fan-1-a", envelope.CommandRequest{CommandID: "h2", Command: "slow"}, &r)
	}()
	<-h.entered
	require.NoError(t, h.w.Close())
	require.NoError(t, h.w.Close(), "Close is idempotent")
	require.Contains(t, h.w.Results().Lookup("h2").Error, "shut down")
}

func TestUntrustedPeerIsReset(t *testing.T) {
	h := newHarness(t, nil)
	stranger, err := h.mn.GenPeer()
	require.NoError(t, err)
	require.NoError(t, h.mn.LinkAll())
	c := rpc.NewClient(stranger, rpc.ClientOptions{Sender: "stranger"})
	defer c.Close()

	for _, proto := range protocols.WorkerProtocols {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		req, err := envelope.NewRequest(envelope.ActionCommandRequest, "stranger",
			envelope.CommandRequest{CommandID: "evil", Command: "setSpeed", Params: map[string]any{"rpm": 1}})
		require.NoError(t, err)
		req.DeviceID = "fan-1-a"
		reply, err := c.Call(ctx, h.w.ID(), proto, req)
		cancel()
		require.Error(t, err, "%s answered a stranger", proto)
		require.Nil(t, reply)
		require.ErrorIs(t, err, network.ErrReset, "%s", proto)
	}
	require.Zero(t, h.runs.Load())
	require.Equal(t, envelope.StatusUnknown, h.status("evil").Status)
}

func TestInterceptAndOnExecute(t *testing.T) {
	var seen []string
	var mu sync.Mutex
	h := newHarness(t, func(c *Config) {
		c.Intercept = func(_ context.Context, _ peer.ID, action string) error {
			if action == envelope.ActionHealthPing {
				return envelope.Errf(envelope.CodeBusy, "injected")
			}
			return nil
		}
		c.OnExecute = func(id, cmd, dev string) {
			mu.Lock()
			defer mu.Unlock()
			seen = append(seen, id+"/"+cmd+"/"+dev)
		}
	})
	err := h.request(protocols.WorkerPing, envelope.ActionHealthPing, "", nil, nil)
	require.Equal(t, "ERR_BUSY: injected", err.Error())
	h.command("x1", "setSpeed", "fan-1-a", map[string]any{"rpm": 5})
	h.command("x1", "setSpeed", "fan-1-a", map[string]any{"rpm": 5})
	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, []string{"x1/setSpeed/fan-1-a"}, seen)
}

func TestConfigValidation(t *testing.T) {
	kernel := peer.ID("12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo")
	good := func() Config {
		return Config{WorkerID: "w1", Contract: fanContract(), TrustedKernels: []peer.ID{kernel}}
	}
	require.NoError(t, func() error { c := good(); return c.validate() }())
	badContract := fanContract()
	badContract.Metadata.Provider = ""
	dir := t.TempDir()
	cases := []struct {
		field  string
		mutate func(*Config)
	}{
		{"Config.WorkerID", func(c *Config) { c.WorkerID = "" }},
		{"Config.WorkerID", func(c *Config) { c.WorkerID = "../etc" }},
		{"Config.Contract", func(c *Config) { c.Contract = nil }},
		{"Config.Contract", func(c *Config) { c.Contract = badContract }},
		{"Config.Devices[1].DeviceID", func(c *Config) { c.Devices = []Device{{DeviceID: "a"}, {DeviceID: ""}} }},
		{"Config.Devices[1].DeviceID", func(c *Config) { c.Devices = []Device{{DeviceID: "a"}, {DeviceID: "a"}} }},
		{"Config.TrustedKernels", func(c *Config) { c.TrustedKernels = nil }},
		{"Config.TrustedKernels[0]", func(c *Config) { c.TrustedKernels = []peer.ID{""} }},
		{"Config.Topic", func(c *Config) { c.Topic = []byte("short") }},
		{"Config.Bootstrap", func(c *Config) { c.Topic = make([]byte, 32) }},
		{"Config.Bootstrap[0]", func(c *Config) { c.Bootstrap = []peer.AddrInfo{{ID: kernel}} }},
		{"Config.ListenAddrs[0]", func(c *Config) { c.ListenAddrs = []string{"not-a-multiaddr"} }},
		{"Config.ReprovideEvery", func(c *Config) { c.ReprovideEvery = 5 * time.Minute }},
		{"Config.ReprovideEvery", func(c *Config) { c.ReprovideEvery = -time.Second }},
		{"Config.DedupTTL", func(c *Config) { c.DedupTTL = 9 * time.Minute }},
		{"Config.DedupMaxEntries", func(c *Config) { c.DedupMaxEntries = -1 }},
		{"Config.CommandTimeout", func(c *Config) { c.CommandTimeout = time.Hour }},
		{"Config.KeyFile", func(c *Config) { c.KeyFile = filepath.Join(dir, "k"); c.Key = testKey(t) }},
		{"Config.AddrDir", func(c *Config) {
			f := filepath.Join(dir, "file")
			require.NoError(t, os.WriteFile(f, nil, 0o600))
			c.AddrDir = filepath.Join(f, "sub") // a directory under a file: cannot be made
		}},
	}
	for _, tc := range cases {
		t.Run(tc.field, func(t *testing.T) {
			c := good()
			tc.mutate(&c)
			w, err := New(context.Background(), c)
			require.Nil(t, w)
			require.ErrorIs(t, err, ErrInvalidConfig)
			var ce *ConfigError
			require.ErrorAs(t, err, &ce)
			require.Equal(t, tc.field, ce.Field, err.Error())
			require.Contains(t, err.Error(), tc.field)
		})
	}
}

func TestResultCacheExpiryAndBound(t *testing.T) {
	now := time.Unix(1000, 0)
	c := newResultCache(10*time.Minute, 2, func() time.Time { return now })
	put := func(id string) {
		e, first := c.begin(id)
		require.True(t, first)
		c.finish(e, envelope.CommandResult{CommandID: id, Status: envelope.StateSuccess})
	}
	put("a")
	now = now.Add(time.Minute)
	put("b")
	running, first := c.begin("r") // running entries are never evicted
	require.True(t, first)
	put("c") // over the bound (the running entry counts): the oldest finished go
	require.Equal(t, envelope.StatusUnknown, c.Lookup("a").Status)
	require.Equal(t, envelope.StatusUnknown, c.Lookup("b").Status)
	require.Equal(t, envelope.StateSuccess, c.Lookup("c").Status)
	require.Equal(t, StatusRunning, c.Lookup("r").Status)
	now = now.Add(9 * time.Minute)
	require.Equal(t, envelope.StateSuccess, c.Lookup("c").Status)
	now = now.Add(time.Minute) // c expires; the running entry stays
	require.Equal(t, envelope.StatusUnknown, c.Lookup("c").Status)
	require.Equal(t, StatusRunning, c.Lookup("r").Status)
	c.finish(running, envelope.CommandResult{CommandID: "r", Status: envelope.StateFailed})
	require.Equal(t, envelope.StateFailed, c.Lookup("r").Status)
	require.Equal(t, 1, c.Len())

	_, err := NewResultCache(time.Minute, 0)
	require.ErrorIs(t, err, ErrInvalidConfig)
}

func testKey(t *testing.T) crypto.PrivKey {
	t.Helper()
	k, _, err := crypto.GenerateEd25519Key(nil)
	require.NoError(t, err)
	return k
}
