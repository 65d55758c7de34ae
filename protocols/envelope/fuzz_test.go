package envelope

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func addGoldenSeeds(f *testing.F) {
	files, err := filepath.Glob(filepath.Join("testdata", "*.json"))
	require.NoError(f, err)
	for _, p := range files {
		b, err := os.ReadFile(p)
		require.NoError(f, err)
		f.Add(b)
	}
}

// FuzzDecode: Decode never panics, fails only with an ERR_ENVELOPE_* *Error,
// and whatever it accepts marshals and decodes back to an equal envelope
// (byte for byte from the second encoding on).
func FuzzDecode(f *testing.F) {
	addGoldenSeeds(f)
	for _, s := range []string{
		obj(), obj(field{"id", `5`}), obj(field{"timestamp", `1.5`}), obj(field{"timestamp", `1e400`}),
		obj(field{"payload", `null`}), obj(field{"payload", `[]`}), obj(field{"error", `"ERR_X: y"`}),
		obj(field{"error", `{"code":"E","message":"m","x":[1]}`}), obj(field{"sender", `"a\u0000\"\\\ud83d\ude00"`}),
		strings.Replace(obj(), `"id"`, `"\u0069d"`, 1), strings.Replace(obj(), `"id"`, `"ID"`, 1),
		`{"id":"a","id":5}`, `[]`, `null`, ``, `{`, `{"a":{"b":[{"c":"}"}]}}`, "{\"id\":\"\xff\"}",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := Decode(b)
		if err != nil {
			require.Nil(t, e)
			var ee *Error
			require.ErrorAs(t, err, &ee)
			require.True(t, strings.HasPrefix(ee.Code, "ERR_ENVELOPE_"), "code %q", ee.Code)
			return
		}
		require.True(t, json.Valid(b), "accepted invalid JSON")
		require.NoError(t, e.Validate())

		b2, err := Marshal(e)
		require.NoError(t, err)
		require.True(t, json.Valid(b2), "Marshal wrote invalid JSON: %q", b2)
		e2, err := Decode(b2)
		require.NoError(t, err, "re-decoding %q", b2)
		require.Equal(t, e, e2)
		b3, err := Marshal(e2)
		require.NoError(t, err)
		require.Equal(t, string(b2), string(b3))

		// encoding/json agrees on the re-encoded form (exact keys, valid UTF-8,
		// an integer timestamp), apart from how the payload bytes are spelt.
		var std Envelope
		require.NoError(t, json.Unmarshal(b2, &std))
		std.Payload, e2.Payload = nil, nil
		if std.Error != nil && e2.Error != nil {
			require.Equal(t, *e2.Error, *std.Error)
		}
		std.Error, e2.Error = nil, nil
		require.Equal(t, e2, &std)
	})
}

// FuzzContractDecode: any JSON a Worker sends as its contract decodes and
// validates without panicking; a valid contract stays valid through a
// re-encoding; its commands' params can be checked without panicking.
func FuzzContractDecode(f *testing.F) {
	b, err := os.ReadFile(filepath.Join("testdata", "contract.json"))
	require.NoError(f, err)
	f.Add(b)
	f.Add([]byte(`{}`))
	f.Add([]byte(`null`))
	f.Add([]byte(`{"metadata":{"provider":"p","deviceFamily":"f","brand":"b","modelsSupported":[],"overview":"o"},"capabilities":{"telemetry":[],"commands":[{"name":"c","params":[{"name":"x","type":"object","enum":[{"a":1},[1],null]}]}],"health":{"supportedStates":[]}}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var c Contract
		if json.Unmarshal(b, &c) != nil {
			return
		}
		err := c.Validate()
		if err != nil {
			require.Equal(t, CodePayloadContractRequired, CodeOf(err))
			return
		}
		for _, cmd := range c.Capabilities.Commands {
			params := map[string]any{}
			for _, p := range cmd.Params {
				if len(p.Enum) > 0 {
					params[p.Name] = p.Enum[0]
				} else if p.Min != nil {
					params[p.Name] = *p.Min
				}
			}
			if err := cmd.ValidateParams(cmd.NormalizeParams(params)); err != nil {
				require.True(t, strings.HasPrefix(CodeOf(err), "ERR_PARAM_"), "%v", err)
			}
		}
		again, err := json.Marshal(&c)
		require.NoError(t, err)
		var c2 Contract
		require.NoError(t, json.Unmarshal(again, &c2))
		require.NoError(t, c2.Validate(), "valid contract invalid after re-encoding: %s", again)
	})
}

// FuzzValidateParams: arbitrary param specs and caller params (both from
// JSON, as they arrive on the wire) never panic, and every failure is an
// ERR_PARAM_* error naming a declared param.
func FuzzValidateParams(f *testing.F) {
	for _, cmd := range minerContract().Capabilities.Commands {
		spec, err := json.Marshal(cmd)
		require.NoError(f, err)
		f.Add(spec, []byte(`{"watts":100,"mode":"eco","on":true}`))
		f.Add(spec, []byte(`{"args":[4,"x"]}`))
		f.Add(spec, []byte(`{"value":"turbo"}`))
	}
	f.Add([]byte(`{"name":"c","params":[{"name":"o","type":"object","enum":[{"a":[1,{"b":null}]},[1],"s",2,true,null]}]}`), []byte(`{"o":{"a":[1,{"b":null}]}}`))
	f.Add([]byte(`{"name":"c","params":[{"name":"o","type":"weird","enum":[[1,2]]}]}`), []byte(`{"o":[1,2]}`))
	f.Add([]byte(`{"name":"c","params":[{"name":"n","type":"number","min":1e308,"max":-1e308}]}`), []byte(`{"n":1e308}`))
	f.Fuzz(func(t *testing.T, specJSON, paramsJSON []byte) {
		var spec CommandSpec
		var params map[string]any
		if json.Unmarshal(specJSON, &spec) != nil || json.Unmarshal(paramsJSON, &params) != nil {
			return
		}
		norm := spec.NormalizeParams(params)
		err := spec.ValidateParams(norm)
		if err == nil {
			return
		}
		var ee *Error
		require.ErrorAs(t, err, &ee)
		require.Contains(t, []string{CodeParamRequired, CodeParamType, CodeParamEnum, CodeParamRange}, ee.Code)
		named := false
		for _, p := range spec.Params {
			if strings.HasPrefix(ee.Message, ee.Code+": "+p.Name+" ") {
				named = true
			}
		}
		require.True(t, named, "%q names no declared param", ee.Message)
	})
}
