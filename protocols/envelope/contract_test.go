package envelope

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

func ptr(f float64) *float64 { return &f }

// minerContract is the contract of testdata/contract.json.
func minerContract() *Contract {
	return &Contract{
		Metadata: Metadata{
			Provider:        "microbt",
			DeviceFamily:    "miner",
			Brand:           "WhatsMiner",
			ModelsSupported: []string{"M30S", "M50"},
			Overview:        "Bitcoin ASIC miners. A miner that reports 0 hashrate right after a reboot is booting.",
		},
		Capabilities: Capabilities{
			Telemetry: []TelemetryChannel{
				{Name: "hashrate", Unit: "TH/s", Type: "number", Description: "Current hashrate; 0 while booting."},
				{Name: "temperature", Unit: "C", Type: "number", Description: "Board temperature."},
				{Name: "status", Type: "string", Description: "mining | idle | error"},
			},
			Commands: []CommandSpec{
				{Name: "reboot", Description: "Power-cycles the control board.", Constraints: "At most once per 5 minutes.", DurationMs: 30000},
				{Name: "setPowerMode", Description: "Switches the power profile.", Params: []ParamSpec{
					{Name: "mode", Type: "string", Required: true, Enum: []any{"eco", "normal", "turbo"}},
				}, Examples: []Example{{Intent: "reduce power draw", Steps: []string{"setPowerMode eco"}}}},
				{Name: "setPowerLimit", Params: []ParamSpec{
					{Name: "watts", Type: "number", Required: true, Min: ptr(5), Max: ptr(3600)},
					{Name: "persist", Type: "boolean"},
				}},
				{Name: "setLed", Params: []ParamSpec{{Name: "on", Type: "boolean"}, {Name: "color", Type: "string"}}},
			},
			Health: HealthSpec{SupportedStates: []string{"ok", "warning", "error"}, Alerts: []string{"overheat"}},
			Errors: map[string]string{"E_OVERHEAT": "Board over 90C; the miner throttles."},
			Config: &ConfigSpec{Schema: "whatsminer_config_v1"},
		},
	}
}

func TestContractValidate(t *testing.T) {
	require.NoError(t, minerContract().Validate())
	require.Equal(t, CodePayloadContractRequired, CodeOf((*Contract)(nil).Validate()))

	tests := []struct {
		name string
		mod  func(*Contract)
		msg  string
	}{
		{"provider", func(c *Contract) { c.Metadata.Provider = "" }, "metadata.provider is required"},
		{"deviceFamily", func(c *Contract) { c.Metadata.DeviceFamily = "" }, "metadata.deviceFamily is required"},
		{"brand", func(c *Contract) { c.Metadata.Brand = "" }, "metadata.brand is required"},
		{"overview", func(c *Contract) { c.Metadata.Overview = "" }, "metadata.overview is required"},
		{"modelsSupported", func(c *Contract) { c.Metadata.ModelsSupported = nil }, "metadata.modelsSupported is required"},
		{"telemetry", func(c *Contract) { c.Capabilities.Telemetry = nil }, "capabilities.telemetry and capabilities.commands are required"},
		{"commands", func(c *Contract) { c.Capabilities.Commands = nil }, "capabilities.telemetry and capabilities.commands are required"},
		{"health", func(c *Contract) { c.Capabilities.Health.SupportedStates = nil }, "capabilities.health.supportedStates is required"},
		{"telemetry name", func(c *Contract) { c.Capabilities.Telemetry[1].Name = "" }, "telemetry[1].name is required"},
		{"telemetry duplicate", func(c *Contract) { c.Capabilities.Telemetry[2].Name = "hashrate" }, "duplicate telemetry.hashrate"},
		{"telemetry type", func(c *Contract) { c.Capabilities.Telemetry[0].Type = "float" }, `telemetry.hashrate: type "float" not one of [number string boolean object array]`},
		{"command name", func(c *Contract) { c.Capabilities.Commands[0].Name = "" }, "commands[0].name is required"},
		{"command duplicate", func(c *Contract) { c.Capabilities.Commands[3].Name = "reboot" }, "duplicate commands.reboot"},
		{"param name", func(c *Contract) { c.Capabilities.Commands[2].Params[1].Name = "" }, "commands.setPowerLimit.params[1].name is required"},
		{"param duplicate", func(c *Contract) { c.Capabilities.Commands[2].Params[1].Name = "watts" }, "duplicate commands.setPowerLimit.params.watts"},
		{"param type array (not allowed for params)", func(c *Contract) { c.Capabilities.Commands[2].Params[1].Type = "array" }, `commands.setPowerLimit.params.persist: type "array" not one of [number string boolean object]`},
		{"min above max", func(c *Contract) { c.Capabilities.Commands[2].Params[0].Min = ptr(4000) }, "commands.setPowerLimit.params.watts: min > max"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := minerContract()
			tt.mod(c)
			err := c.Validate()
			require.Equal(t, CodePayloadContractRequired, CodeOf(err))
			require.EqualError(t, err, CodePayloadContractRequired+": "+tt.msg)
		})
	}

	// The same name in telemetry and commands is fine.
	c := minerContract()
	c.Capabilities.Commands[0].Name = "status"
	require.NoError(t, c.Validate())
	// Optional sections may be absent.
	c = minerContract()
	c.Capabilities.Errors, c.Capabilities.Config, c.Capabilities.Health.Alerts = nil, nil, nil
	require.NoError(t, c.Validate())
}

func TestContractFromJSON(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("testdata", "contract.json"))
	require.NoError(t, err)
	var c Contract
	require.NoError(t, json.Unmarshal(b, &c))
	require.NoError(t, c.Validate())

	// A contract whose sections are missing in JSON fails Validate.
	var bare Contract
	require.NoError(t, json.Unmarshal([]byte(`{"metadata":{"provider":"p","deviceFamily":"f","brand":"b","modelsSupported":[],"overview":"o"},"capabilities":{"telemetry":[],"commands":[],"health":{}}}`), &bare))
	require.EqualError(t, bare.Validate(), "ERR_PAYLOAD_CONTRACT_REQUIRED: capabilities.health.supportedStates is required")
}

func TestContractCommand(t *testing.T) {
	c := minerContract()
	spec, ok := c.Command("setPowerLimit")
	require.True(t, ok)
	require.Equal(t, "setPowerLimit", spec.Name)
	_, ok = c.Command("selfDestruct")
	require.False(t, ok)
	_, ok = (*Contract)(nil).Command("reboot")
	require.False(t, ok)
}

func TestValidateParams(t *testing.T) {
	c := minerContract()
	cmd := func(name string) CommandSpec { s, ok := c.Command(name); require.True(t, ok); return s }
	typed := CommandSpec{Name: "typed", Params: []ParamSpec{
		{Name: "n", Type: "number"}, {Name: "s", Type: "string"}, {Name: "b", Type: "boolean"}, {Name: "o", Type: "object"},
		{Name: "lo", Type: "number", Min: ptr(-1.5)}, {Name: "any", Type: "custom"},
		{Name: "obj", Type: "object", Enum: []any{map[string]any{"a": 1.0}, []any{1.0}}},
		{Name: "num", Type: "number", Enum: []any{1, 2.5}},
	}}

	tests := []struct {
		name   string
		spec   CommandSpec
		params map[string]any
		msg    string // "" = ok
	}{
		{"no params declared, none given", cmd("reboot"), nil, ""},
		{"undeclared params pass", cmd("reboot"), map[string]any{"x": 1}, ""},
		{"required present", cmd("setPowerLimit"), map[string]any{"watts": 100.0}, ""},
		{"required missing", cmd("setPowerLimit"), map[string]any{"persist": true}, "ERR_PARAM_REQUIRED: watts is required"},
		{"required null", cmd("setPowerLimit"), map[string]any{"watts": nil}, "ERR_PARAM_REQUIRED: watts is required"},
		{"optional absent", cmd("setLed"), map[string]any{}, ""},
		{"number wrong type", cmd("setPowerLimit"), map[string]any{"watts": "100"}, "ERR_PARAM_TYPE: watts must be number"},
		{"number as bool", cmd("setPowerLimit"), map[string]any{"watts": true}, "ERR_PARAM_TYPE: watts must be number"},
		{"below min", cmd("setPowerLimit"), map[string]any{"watts": 4.0}, "ERR_PARAM_RANGE: watts below min 5"},
		{"at min", cmd("setPowerLimit"), map[string]any{"watts": 5.0}, ""},
		{"at max", cmd("setPowerLimit"), map[string]any{"watts": 3600.0}, ""},
		{"above max", cmd("setPowerLimit"), map[string]any{"watts": 3600.5}, "ERR_PARAM_RANGE: watts above max 3600"},
		{"Go int", cmd("setPowerLimit"), map[string]any{"watts": 100}, ""},
		{"Go int below min", cmd("setPowerLimit"), map[string]any{"watts": int64(1)}, "ERR_PARAM_RANGE: watts below min 5"},
		{"json.Number", cmd("setPowerLimit"), map[string]any{"watts": json.Number("250")}, ""},
		{"boolean wrong type", cmd("setPowerLimit"), map[string]any{"watts": 10.0, "persist": "yes"}, "ERR_PARAM_TYPE: persist must be boolean"},
		{"string wrong type", cmd("setLed"), map[string]any{"color": 1.0}, "ERR_PARAM_TYPE: color must be string"},
		{"enum ok", cmd("setPowerMode"), map[string]any{"mode": "eco"}, ""},
		{"enum miss", cmd("setPowerMode"), map[string]any{"mode": "ludicrous"}, "ERR_PARAM_ENUM: mode must be one of [eco normal turbo]"},
		{"enum type before enum", cmd("setPowerMode"), map[string]any{"mode": 1.0}, "ERR_PARAM_TYPE: mode must be string"},
		{"first declared param fails first", typed, map[string]any{"o": 1.0, "n": "x"}, "ERR_PARAM_TYPE: n must be number"},
		{"object ok", typed, map[string]any{"o": map[string]any{}}, ""},
		{"object as array", typed, map[string]any{"o": []any{}}, "ERR_PARAM_TYPE: o must be object"},
		{"fractional min", typed, map[string]any{"lo": -2.0}, "ERR_PARAM_RANGE: lo below min -1.5"},
		{"unknown declared type accepts anything", typed, map[string]any{"any": []any{1.0}}, ""},
		{"object enum match (no panic)", typed, map[string]any{"obj": map[string]any{"a": 1.0}}, ""},
		{"object enum miss (no panic)", typed, map[string]any{"obj": map[string]any{"a": 2.0}}, "ERR_PARAM_ENUM: obj must be one of [map[a:1] [1]]"},
		{"numeric enum across Go types", typed, map[string]any{"num": 1.0}, ""},
		{"numeric enum miss", typed, map[string]any{"num": 2.0}, "ERR_PARAM_ENUM: num must be one of [1 2.5]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.spec.ValidateParams(tt.params)
			if tt.msg == "" {
				require.NoError(t, err)
				return
			}
			require.EqualError(t, err, tt.msg)
		})
	}
	// The codes, for callers that match on them.
	require.Equal(t, CodeParamType, CodeOf(cmd("setPowerLimit").ValidateParams(map[string]any{"watts": "x"})))
	require.Equal(t, CodeParamRange, CodeOf(cmd("setPowerLimit").ValidateParams(map[string]any{"watts": 1e9})))
}

func TestNormalizeParams(t *testing.T) {
	spec := CommandSpec{Name: "setPowerLimit", Params: []ParamSpec{{Name: "watts", Type: "number"}, {Name: "persist", Type: "boolean"}}}
	tests := []struct {
		name string
		spec CommandSpec
		in   map[string]any
		want map[string]any
	}{
		{"named pass through", spec, map[string]any{"watts": 100.0, "persist": true}, map[string]any{"watts": 100.0, "persist": true}},
		{"one named pass through", spec, map[string]any{"watts": 100.0}, map[string]any{"watts": 100.0}},
		{"args positional", spec, map[string]any{"args": []any{100.0, true}}, map[string]any{"watts": 100.0, "persist": true}},
		{"args shorter", spec, map[string]any{"args": []any{100.0}}, map[string]any{"watts": 100.0}},
		{"args longer: extras dropped", spec, map[string]any{"args": []any{100.0, true, "x"}}, map[string]any{"watts": 100.0, "persist": true}},
		{"args empty", spec, map[string]any{"args": []any{}}, map[string]any{}},
		{"value positional", spec, map[string]any{"value": 42.0}, map[string]any{"watts": 42.0}},
		{"args not an array: unchanged", spec, map[string]any{"args": "x"}, map[string]any{"args": "x"}},
		{"args with other keys: named", spec, map[string]any{"args": []any{1.0}, "persist": true}, map[string]any{"args": []any{1.0}, "persist": true}},
		{"args declared: named", CommandSpec{Params: []ParamSpec{{Name: "args", Type: "object"}}}, map[string]any{"args": []any{1.0}}, map[string]any{"args": []any{1.0}}},
		{"value declared: named", CommandSpec{Params: []ParamSpec{{Name: "x"}, {Name: "value"}}}, map[string]any{"value": 1.0}, map[string]any{"value": 1.0}},
		{"no declared params: unchanged", CommandSpec{}, map[string]any{"args": []any{1.0}}, map[string]any{"args": []any{1.0}}},
		{"nil", spec, nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.Equal(t, tt.want, tt.spec.NormalizeParams(tt.in))
		})
	}
	// Normalised positional params then validate against the names.
	got := spec.NormalizeParams(map[string]any{"args": []any{"100"}})
	require.EqualError(t, spec.ValidateParams(got), "ERR_PARAM_TYPE: watts must be number")
}
