package envelope

import (
	"encoding/json"
	"fmt"
	"math"
	"reflect"
	"slices"
)

// Contract is a Worker's self-description (MDK-REFERENCE §4.11).
type Contract struct {
	Schema       string       `json:"$schema,omitempty"`
	Metadata     Metadata     `json:"metadata"`
	Capabilities Capabilities `json:"capabilities"`
}

// Metadata describes the Worker's device family; DeviceFamily drives write
// permissions.
type Metadata struct {
	Provider        string   `json:"provider"`
	DeviceFamily    string   `json:"deviceFamily"`
	Brand           string   `json:"brand"`
	ModelsSupported []string `json:"modelsSupported"`
	Overview        string   `json:"overview"`
}

// Capabilities lists what a Worker's devices report and accept.
type Capabilities struct {
	Telemetry []TelemetryChannel `json:"telemetry"`
	Commands  []CommandSpec      `json:"commands"`
	Health    HealthSpec         `json:"health"`
	Errors    map[string]string  `json:"errors"`
	Config    *ConfigSpec        `json:"config,omitempty"`
}

// TelemetryChannel is one telemetry value a device reports.
type TelemetryChannel struct {
	Name        string `json:"name"`
	Unit        string `json:"unit,omitempty"`
	Type        string `json:"type"`
	Description string `json:"description"`
}

// CommandSpec declares one command and its parameters.
type CommandSpec struct {
	Name        string      `json:"name"`
	Description string      `json:"description,omitempty"`
	Constraints string      `json:"constraints,omitempty"`
	Params      []ParamSpec `json:"params,omitempty"`
	Examples    []Example   `json:"examples,omitempty"`
	// DurationMs is how long the command takes on a device, as a hint for
	// callers' timeouts (ORK addition).
	DurationMs int64 `json:"durationMs,omitempty"`
}

// ParamSpec declares one command parameter.
type ParamSpec struct {
	Name     string   `json:"name"`
	Type     string   `json:"type"`
	Required bool     `json:"required,omitempty"`
	Enum     []any    `json:"enum,omitempty"`
	Min      *float64 `json:"min,omitempty"`
	Max      *float64 `json:"max,omitempty"`
}

// Example is an intent and the steps that fulfil it (for AI agents).
type Example struct {
	Intent string   `json:"intent"`
	Steps  []string `json:"steps"`
}

// HealthSpec lists the health states and hints a device reports.
type HealthSpec struct {
	SupportedStates []string `json:"supportedStates"`
	Alerts          []string `json:"alerts,omitempty"`
	Troubleshooting []string `json:"troubleshooting,omitempty"`
}

// ConfigSpec names the device config payload shape.
type ConfigSpec struct {
	Schema string `json:"schema"`
}

var (
	telemetryTypes = []string{"number", "string", "boolean", "object", "array"}
	paramTypes     = []string{"number", "string", "boolean", "object"}
)

// Validate checks a contract against the schema of MDK-REFERENCE §4.11: every
// required field, known types, unique non-empty names. Workers run it at start;
// the kernel runs it on every capability.response.
func (c *Contract) Validate() error {
	if c == nil {
		return Err(CodePayloadContractRequired)
	}
	m := c.Metadata
	for _, f := range []struct{ name, v string }{
		{"provider", m.Provider}, {"deviceFamily", m.DeviceFamily}, {"brand", m.Brand}, {"overview", m.Overview},
	} {
		if f.v == "" {
			return Errf(CodePayloadContractRequired, "metadata.%s is required", f.name)
		}
	}
	if m.ModelsSupported == nil {
		return Errf(CodePayloadContractRequired, "metadata.modelsSupported is required")
	}
	caps := c.Capabilities
	if caps.Telemetry == nil || caps.Commands == nil {
		return Errf(CodePayloadContractRequired, "capabilities.telemetry and capabilities.commands are required")
	}
	if caps.Health.SupportedStates == nil {
		return Errf(CodePayloadContractRequired, "capabilities.health.supportedStates is required")
	}
	seen := map[string]bool{}
	for i, t := range caps.Telemetry {
		if t.Name == "" {
			return Errf(CodePayloadContractRequired, "telemetry[%d].name is required", i)
		}
		if seen[t.Name] {
			return Errf(CodePayloadContractRequired, "duplicate telemetry.%s", t.Name)
		}
		seen[t.Name] = true
		if !slices.Contains(telemetryTypes, t.Type) {
			return Errf(CodePayloadContractRequired, "telemetry.%s: type %q not one of %v", t.Name, t.Type, telemetryTypes)
		}
	}
	clear(seen)
	for i, cmd := range caps.Commands {
		if cmd.Name == "" {
			return Errf(CodePayloadContractRequired, "commands[%d].name is required", i)
		}
		if seen[cmd.Name] {
			return Errf(CodePayloadContractRequired, "duplicate commands.%s", cmd.Name)
		}
		seen[cmd.Name] = true
		params := map[string]bool{}
		for j, p := range cmd.Params {
			if p.Name == "" {
				return Errf(CodePayloadContractRequired, "commands.%s.params[%d].name is required", cmd.Name, j)
			}
			if params[p.Name] {
				return Errf(CodePayloadContractRequired, "duplicate commands.%s.params.%s", cmd.Name, p.Name)
			}
			params[p.Name] = true
			if !slices.Contains(paramTypes, p.Type) {
				return Errf(CodePayloadContractRequired, "commands.%s.params.%s: type %q not one of %v", cmd.Name, p.Name, p.Type, paramTypes)
			}
			if p.Min != nil && p.Max != nil && *p.Min > *p.Max {
				return Errf(CodePayloadContractRequired, "commands.%s.params.%s: min > max", cmd.Name, p.Name)
			}
		}
	}
	return nil
}

// Command returns the spec of the named command.
func (c *Contract) Command(name string) (CommandSpec, bool) {
	if c == nil {
		return CommandSpec{}, false
	}
	for _, cmd := range c.Capabilities.Commands {
		if cmd.Name == name {
			return cmd, true
		}
	}
	return CommandSpec{}, false
}

// NormalizeParams maps positional params onto declared names (MDK-REFERENCE
// §4.7): {args:[...]} when args is not a declared name, or {value:x} when value
// is not a declared name. Named params pass through unchanged.
func (s CommandSpec) NormalizeParams(params map[string]any) map[string]any {
	if len(s.Params) == 0 || len(params) != 1 {
		return params
	}
	declared := func(n string) bool {
		return slices.ContainsFunc(s.Params, func(p ParamSpec) bool { return p.Name == n })
	}
	if args, ok := params["args"].([]any); ok && !declared("args") {
		out := make(map[string]any, len(args))
		for i, a := range args {
			if i < len(s.Params) {
				out[s.Params[i].Name] = a
			}
		}
		return out
	}
	if v, ok := params["value"]; ok && !declared("value") {
		return map[string]any{s.Params[0].Name: v}
	}
	return params
}

// ValidateParams checks params against the spec: required, type, enum, min,
// max (the original checked only type and range, and only number/string). The
// error strings keep the MDK wording.
func (s CommandSpec) ValidateParams(params map[string]any) error {
	for _, p := range s.Params {
		v, present := params[p.Name]
		if !present || v == nil {
			if p.Required {
				return Errf(CodeParamRequired, "%s is required", p.Name)
			}
			continue
		}
		if !typeMatches(p.Type, v) {
			return Errf(CodeParamType, "%s must be %s", p.Name, p.Type)
		}
		if len(p.Enum) > 0 && !slices.ContainsFunc(p.Enum, func(e any) bool { return jsonEqual(e, v) }) {
			return Errf(CodeParamEnum, "%s must be one of %v", p.Name, p.Enum)
		}
		if n, ok := asNumber(v); ok {
			if p.Min != nil && n < *p.Min {
				return Errf(CodeParamRange, "%s below min %s", p.Name, fmtNum(*p.Min))
			}
			if p.Max != nil && n > *p.Max {
				return Errf(CodeParamRange, "%s above max %s", p.Name, fmtNum(*p.Max))
			}
		}
	}
	return nil
}

func typeMatches(t string, v any) bool {
	switch t {
	case "number":
		n, ok := asNumber(v)
		return ok && !math.IsNaN(n) && !math.IsInf(n, 0)
	case "string":
		_, ok := v.(string)
		return ok
	case "boolean":
		_, ok := v.(bool)
		return ok
	case "object":
		_, ok := v.(map[string]any)
		return ok
	}
	return true
}

func asNumber(v any) (float64, bool) {
	switch n := v.(type) {
	case float64:
		return n, true
	case float32:
		return float64(n), true
	case int:
		return float64(n), true
	case int64:
		return float64(n), true
	case int32:
		return float64(n), true
	case json.Number:
		f, err := n.Float64()
		return f, err == nil
	}
	return 0, false
}

// jsonEqual compares two JSON values: numbers by value whatever their Go
// type, objects and arrays element by element. (A plain == on two maps or
// slices inside interfaces panics: an enum of objects must not crash the
// caller.)
func jsonEqual(a, b any) bool {
	if an, ok := asNumber(a); ok {
		bn, ok := asNumber(b)
		return ok && an == bn
	}
	switch av := a.(type) {
	case map[string]any:
		bv, ok := b.(map[string]any)
		if !ok || len(av) != len(bv) {
			return false
		}
		for k, x := range av {
			y, ok := bv[k]
			if !ok || !jsonEqual(x, y) {
				return false
			}
		}
		return true
	case []any:
		bv, ok := b.([]any)
		return ok && slices.EqualFunc(av, bv, jsonEqual)
	case nil, bool, string:
		return a == b
	}
	return reflect.DeepEqual(a, b)
}

func fmtNum(f float64) string {
	if f == math.Trunc(f) && math.Abs(f) < 1e15 {
		return fmt.Sprintf("%d", int64(f))
	}
	return fmt.Sprintf("%g", f)
}
