package node

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/protocols/envelope"
)

// cfgtPeer makes a fresh peer ID.
func cfgtPeer(t *testing.T) peer.ID {
	t.Helper()
	k, _, err := crypto.GenerateEd25519Key(rand.Reader)
	require.NoError(t, err)
	id, err := peer.IDFromPrivateKey(k)
	require.NoError(t, err)
	return id
}

// cfgtValid is DefaultConfig with a topic: the smallest valid config.
func cfgtValid(t *testing.T) Config {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Topic = hex.EncodeToString(randomTopic(t))
	return cfg
}

func TestDefaultConfigValidWithTopic(t *testing.T) {
	cfg := cfgtValid(t)
	require.NoError(t, cfg.Validate())

	// Without a topic the default (dht) mode is invalid, naming the field.
	cfg.Topic = ""
	require.ErrorContains(t, cfg.Validate(), "config topic")
}

func TestConfigValidateNamesField(t *testing.T) {
	p := cfgtPeer(t).String()
	cases := []struct {
		name  string
		mut   func(*Config)
		field string // the error must contain "config " + field
	}{
		{"empty keyFile", func(c *Config) { c.KeyFile = "" }, "keyFile"},
		{"no listen address", func(c *Config) { c.Listen = nil }, "listen"},
		{"bad listen multiaddr", func(c *Config) { c.Listen = []string{"/ip4/127.0.0.1/tcp/1", "127.0.0.1:4801"} }, "listen[1]"},
		{"bad announce multiaddr", func(c *Config) { c.Announce = []string{"/ip4/nope"} }, "announce[0]"},
		{"bootstrap without /p2p", func(c *Config) { c.Bootstrap = []string{"/ip4/127.0.0.1/tcp/4801"} }, "bootstrap"},
		{"static without /p2p", func(c *Config) { c.Discovery.Static = []string{"/ip4/127.0.0.1/tcp/4801"} }, "discovery.static"},
		{"bad worker peer", func(c *Config) { c.Discovery.WorkerPeers = []string{"not-a-peer"} }, "discovery.workerPeers[0]"},
		{"unknown discovery mode", func(c *Config) { c.Discovery.Modes = []string{"carrier-pigeon"} }, "discovery.modes[0]"},
		{"unknown second discovery mode", func(c *Config) { c.Discovery.Modes = []string{ModeDHT, "DHT"} }, "discovery.modes[1]"},
		{"dht mode without topic", func(c *Config) { c.Topic = "" }, "topic"},
		{"dht mode with short topic", func(c *Config) { c.Topic = "abcd" }, "topic"},
		{"dht mode with non-hex topic", func(c *Config) { c.Topic = strings.Repeat("zz", 32) }, "topic"},
		{"mdns mode without topic", func(c *Config) { c.Discovery.Modes = []string{ModeMDNS}; c.Topic = "" }, "topic"},
		{"local mode without localDir", func(c *Config) { c.Discovery.Modes = []string{ModeLocal} }, "discovery.localDir"},
		{"bad caller peer ID", func(c *Config) { c.Callers = []Caller{{PeerID: "QmNotAPeer", Role: RoleRead}} }, "callers[0].peerId"},
		{"unknown caller role", func(c *Config) {
			c.Callers = []Caller{{PeerID: p, Role: RoleAdmin}, {PeerID: p, Role: "root"}}
		}, "callers[1].role"},
		{"empty caller role", func(c *Config) { c.Callers = []Caller{{PeerID: p}} }, "callers[0].role"},
		{"negative lookup interval", func(c *Config) { c.Discovery.LookupIntervalMs = -1 }, "discovery.lookupIntervalMs"},
		{"negative local scan", func(c *Config) { c.Discovery.LocalScanMs = -1 }, "discovery.localScanMs"},
		{"negative telemetry cadence", func(c *Config) { c.Cadences.TelemetryPullMs = -1 }, "cadences.telemetryPullMs"},
		{"negative health cadence", func(c *Config) { c.Cadences.HealthPingMs = -5 }, "cadences.healthPingMs"},
		{"negative identity cadence", func(c *Config) { c.Cadences.IdentityRefreshMs = -1 }, "cadences.identityRefreshMs"},
		{"negative compaction cadence", func(c *Config) { c.Cadences.CompactionMs = -1 }, "cadences.compactionMs"},
		{"zero health timeout", func(c *Config) { c.Cadences.HealthTimeoutMs = 0 }, "cadences.healthTimeoutMs"},
		{"zero failureThreshold", func(c *Config) { c.Health.FailureThreshold = 0 }, "health.failureThreshold"},
		{"negative maxRetries", func(c *Config) { c.Commands.MaxRetries = -1 }, "commands.maxRetries"},
		{"zero command timeout", func(c *Config) { c.Commands.TimeoutMs = 0 }, "commands.timeoutMs"},
		{"zero queueDepth", func(c *Config) { c.Commands.QueueDepth = 0 }, "commands.queueDepth"},
		{"negative resultTtl", func(c *Config) { c.Commands.ResultTTLMs = -1 }, "commands.resultTtlMs"},
		{"zero maxInFlight", func(c *Config) { c.Commands.MaxInFlight = 0 }, "commands.maxInFlight"},
		{"zero registration concurrency", func(c *Config) { c.Registration.MaxConcurrent = 0 }, "registration.maxConcurrent"},
		{"zero registration timeout", func(c *Config) { c.Registration.TimeoutMs = 0 }, "registration.timeoutMs"},
		{"zero backoffMin", func(c *Config) { c.Registration.BackoffMinMs = 0 }, "registration.backoffMinMs"},
		{"backoffMax < backoffMin", func(c *Config) {
			c.Registration.BackoffMinMs, c.Registration.BackoffMaxMs = 1000, 500
		}, "registration.backoffMaxMs"},
		{"zero telemetry concurrency", func(c *Config) { c.Telemetry.MaxConcurrent = 0 }, "telemetry.maxConcurrent"},
		{"negative telemetry max age", func(c *Config) { c.Telemetry.DefaultMaxAgeMs = -1 }, "telemetry.defaultMaxAgeMs"},
		{"zero maxInboundConns", func(c *Config) { c.Limits.MaxInboundConns = 0 }, "limits.maxInboundConns"},
		{"negative connLow", func(c *Config) { c.Limits.ConnLow = -1 }, "limits.connLow"},
		{"negative connHigh", func(c *Config) { c.Limits.ConnHigh = -1 }, "limits.connHigh"},
		{"connHigh < connLow", func(c *Config) { c.Limits.ConnLow, c.Limits.ConnHigh = 3000, 2000 }, "limits.connHigh"},
		{"zero gcPercent", func(c *Config) { c.Limits.GCPercent = 0 }, "limits.gcPercent"},
		{"negative memoryLimitMB", func(c *Config) { c.Limits.MemoryLimitMB = -1 }, "limits.memoryLimitMB"},
		{"bad logLevel", func(c *Config) { c.LogLevel = "verbose" }, "logLevel"},
		{"empty logLevel", func(c *Config) { c.LogLevel = "" }, "logLevel"},
		{"http listen not loopback", func(c *Config) { c.HTTP.Listen = "metrics.example:9464" }, "http.listen"},
		{"http listen no port", func(c *Config) { c.HTTP.Listen = "127.0.0.1" }, "http.listen"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := cfgtValid(t)
			tc.mut(&cfg)
			err := cfg.Validate()
			require.Error(t, err)
			require.ErrorContains(t, err, "config "+tc.field+":")
			// Each row breaks exactly one rule: one error, not a cascade.
			require.Len(t, strings.Split(err.Error(), "\n"), 1, "%v", err)
		})
	}
}

func TestConfigValidateAccepts(t *testing.T) {
	cases := []struct {
		name string
		mut  func(*Config)
	}{
		{"zero cadences disable jobs", func(c *Config) {
			c.Cadences.TelemetryPullMs, c.Cadences.HealthPingMs, c.Cadences.IdentityRefreshMs, c.Cadences.CompactionMs = 0, 0, 0, 0
		}},
		{"zero retries", func(c *Config) { c.Commands.MaxRetries = 0 }},
		{"static mode needs no topic", func(c *Config) { c.Discovery.Modes = []string{ModeStatic}; c.Topic = "" }},
		{"local mode with localDir", func(c *Config) {
			c.Discovery.Modes = []string{ModeLocal, ModeStatic}
			c.Topic = ""
			c.Discovery.LocalDir = "/tmp/ork-workers"
		}},
		{"all modes", func(c *Config) {
			c.Discovery.Modes = []string{ModeDHT, ModeStatic, ModeLocal, ModeMDNS}
			c.Discovery.LocalDir = "w"
		}},
		{"bootstrap with /p2p", func(c *Config) {
			c.Bootstrap = []string{"/ip4/127.0.0.1/tcp/4801/p2p/" + cfgtPeer(t).String()}
		}},
		{"every role", func(c *Config) {
			c.Callers = []Caller{{PeerID: cfgtPeer(t).String(), Role: RoleRead}, {PeerID: cfgtPeer(t).String(), Role: RoleOperate}, {PeerID: cfgtPeer(t).String(), Role: RoleAdmin, Name: "x"}}
		}},
		{"backoffMax == backoffMin", func(c *Config) { c.Registration.BackoffMinMs, c.Registration.BackoffMaxMs = 700, 700 }},
		{"memory limit", func(c *Config) { c.Limits.MemoryLimitMB = 512 }},
		{"zero conn watermarks (host defaults)", func(c *Config) { c.Limits.ConnLow, c.Limits.ConnHigh = 0, 0 }},
		{"debug log", func(c *Config) { c.LogLevel = "debug" }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := cfgtValid(t)
			tc.mut(&cfg)
			require.NoError(t, cfg.Validate())
		})
	}
}

func cfgtWrite(t *testing.T, dir, body string) {
	t.Helper()
	require.NoError(t, os.WriteFile(filepath.Join(dir, ConfigFile), []byte(body), 0o600))
}

func TestLoadConfigHonoursZeroValues(t *testing.T) {
	dir := t.TempDir()
	cfgtWrite(t, dir, `{
		"commands": {"maxRetries": 0},
		"cadences": {"telemetryPullMs": 0},
		"limits": {"memoryLimitMB": 0},
		"loopbackOnly": false
	}`)
	cfg, err := LoadConfig(dir)
	require.NoError(t, err)
	require.Equal(t, dir, cfg.DataDir)
	require.Equal(t, 0, cfg.Commands.MaxRetries, "an explicit 0 is not replaced by the default")
	require.Equal(t, int64(0), cfg.Cadences.TelemetryPullMs)
	def := DefaultConfig()
	// Fields not in the file keep their defaults, also inside a given section.
	require.Equal(t, def.Commands.TimeoutMs, cfg.Commands.TimeoutMs)
	require.Equal(t, def.Commands.QueueDepth, cfg.Commands.QueueDepth)
	require.Equal(t, def.Cadences.HealthPingMs, cfg.Cadences.HealthPingMs)
	require.Equal(t, def.Listen, cfg.Listen)
	require.Equal(t, def.LogLevel, cfg.LogLevel)
}

func TestLoadConfigUnknownFieldNamed(t *testing.T) {
	for _, tc := range []struct{ body, field string }{
		{`{"maxRetries": 0}`, `"maxRetries"`},
		{`{"commands": {"maxRetrys": 1}}`, `"maxRetrys"`},
		{`{"discovery": {"mode": ["dht"]}}`, `"mode"`},
	} {
		dir := t.TempDir()
		cfgtWrite(t, dir, tc.body)
		_, err := LoadConfig(dir)
		require.Error(t, err, tc.body)
		require.ErrorContains(t, err, "unknown field "+tc.field)
		require.ErrorContains(t, err, filepath.Join(dir, ConfigFile), "the error names the file")
	}
}

func TestLoadConfigErrors(t *testing.T) {
	dir := t.TempDir()
	_, err := LoadConfig(dir)
	require.ErrorContains(t, err, "ork-node init", "a missing config says how to make one")

	cfgtWrite(t, dir, `{"commands": {"maxRetries": "three"}}`)
	_, err = LoadConfig(dir)
	require.ErrorContains(t, err, "maxRetries")

	cfgtWrite(t, dir, `{"logLevel": `)
	_, err = LoadConfig(dir)
	require.Error(t, err)

	// A second object after the first is not silently ignored.
	cfgtWrite(t, dir, `{"logLevel": "debug"}
{"logLevel": "error"}`)
	_, err = LoadConfig(dir)
	require.ErrorContains(t, err, "unexpected data after the config object")
	cfgtWrite(t, dir, `{"logLevel": "debug"} x`)
	_, err = LoadConfig(dir)
	require.Error(t, err)
	// Trailing whitespace is fine.
	cfgtWrite(t, dir, "{\"logLevel\": \"debug\"}\n\n  \n")
	cfg, err := LoadConfig(dir)
	require.NoError(t, err)
	require.Equal(t, "debug", cfg.LogLevel)
}

func TestConfigSaveLoadRoundTrip(t *testing.T) {
	cfg := cfgtValid(t)
	cfg.DataDir = t.TempDir()
	cfg.Listen = []string{"/ip4/127.0.0.1/tcp/0"}
	cfg.Announce = []string{"/ip4/10.0.0.1/tcp/4801"}
	cfg.LoopbackOnly = true
	cfg.Bootstrap = []string{"/ip4/127.0.0.1/tcp/4801/p2p/" + cfgtPeer(t).String()}
	cfg.Discovery.Modes = []string{ModeDHT, ModeLocal}
	cfg.Discovery.LocalDir = "workers"
	cfg.Discovery.WorkerPeers = []string{cfgtPeer(t).String()}
	cfg.Callers = []Caller{{PeerID: cfgtPeer(t).String(), Role: RoleOperate, Name: "gw"}}
	cfg.Commands.MaxRetries = 0
	cfg.Cadences.TelemetryPullMs = 0
	cfg.Limits.MemoryLimitMB = 256
	cfg.HTTP.Listen = "127.0.0.1:0"
	cfg.LogLevel = "debug"
	cfg.WAN.AutoNAT = true
	require.NoError(t, cfg.Validate())
	require.NoError(t, cfg.Save())

	st, err := os.Stat(filepath.Join(cfg.DataDir, ConfigFile))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), st.Mode().Perm(), "config.json names trusted peers")
	_, err = os.Stat(filepath.Join(cfg.DataDir, ConfigFile+".tmp"))
	require.True(t, errors.Is(err, os.ErrNotExist), "no temp file left behind")
	b, err := os.ReadFile(filepath.Join(cfg.DataDir, ConfigFile))
	require.NoError(t, err)
	require.NotContains(t, string(b), cfg.DataDir, "DataDir is not stored in the file")

	got, err := LoadConfig(cfg.DataDir)
	require.NoError(t, err)
	require.Equal(t, cfg, got)
	require.NoError(t, got.Validate())
}

func TestConfigApplyEnv(t *testing.T) {
	boot := "/ip4/127.0.0.1/tcp/4801/p2p/" + cfgtPeer(t).String()
	topic := hex.EncodeToString(randomTopic(t))
	env := map[string]string{
		"ORK_LISTEN":        " /ip4/127.0.0.1/tcp/5001 , /ip4/127.0.0.1/udp/5001/quic-v1 ,",
		"ORK_ANNOUNCE":      "/ip4/10.1.2.3/tcp/5001",
		"ORK_BOOTSTRAP":     boot,
		"ORK_TOPIC":         topic,
		"ORK_DISCOVERY":     "dht,static",
		"ORK_HTTP_LISTEN":   "127.0.0.1:9464",
		"ORK_LOG_LEVEL":     "warn",
		"ORK_LOOPBACK_ONLY": "true",
	}
	cfg := DefaultConfig()
	require.NoError(t, cfg.ApplyEnv(func(k string) string { return env[k] }))
	require.Equal(t, []string{"/ip4/127.0.0.1/tcp/5001", "/ip4/127.0.0.1/udp/5001/quic-v1"}, cfg.Listen)
	require.Equal(t, []string{"/ip4/10.1.2.3/tcp/5001"}, cfg.Announce)
	require.Equal(t, []string{boot}, cfg.Bootstrap)
	require.Equal(t, topic, cfg.Topic)
	require.Equal(t, []string{ModeDHT, ModeStatic}, cfg.Discovery.Modes)
	require.Equal(t, "127.0.0.1:9464", cfg.HTTP.Listen)
	require.Equal(t, "warn", cfg.LogLevel)
	require.True(t, cfg.LoopbackOnly)
	require.NoError(t, cfg.Validate())

	// ORK_LOOPBACK_ONLY=false turns it off again.
	require.NoError(t, cfg.ApplyEnv(func(k string) string {
		if k == "ORK_LOOPBACK_ONLY" {
			return "0"
		}
		return ""
	}))
	require.False(t, cfg.LoopbackOnly)

	// An empty environment changes nothing.
	before := cfgtValid(t)
	after := before
	require.NoError(t, after.ApplyEnv(func(string) string { return "" }))
	require.Equal(t, before, after)

	// A bad bool is an error naming the variable.
	err := after.ApplyEnv(func(k string) string {
		if k == "ORK_LOOPBACK_ONLY" {
			return "yes please"
		}
		return ""
	})
	require.ErrorContains(t, err, "ORK_LOOPBACK_ONLY")

	// Env values are validated like the file's.
	bad := cfgtValid(t)
	require.NoError(t, bad.ApplyEnv(func(k string) string {
		return map[string]string{"ORK_DISCOVERY": "dht,bogus", "ORK_LOG_LEVEL": "loud"}[k]
	}))
	err = bad.Validate()
	require.ErrorContains(t, err, "config discovery.modes[1]")
	require.ErrorContains(t, err, "config logLevel")
}

func TestConfigRoleOf(t *testing.T) {
	a, b, c := cfgtPeer(t), cfgtPeer(t), cfgtPeer(t)
	cfg := cfgtValid(t)
	cfg.Callers = []Caller{{PeerID: a.String(), Role: RoleRead}, {PeerID: b.String(), Role: RoleAdmin}}
	require.Equal(t, RoleRead, cfg.RoleOf(a))
	require.Equal(t, RoleAdmin, cfg.RoleOf(b))
	require.Equal(t, "", cfg.RoleOf(c))
}

func TestAuthorizeRoles(t *testing.T) {
	reader, operator, admin, stranger := cfgtPeer(t), cfgtPeer(t), cfgtPeer(t), cfgtPeer(t)
	var al allowlist
	al.set([]Caller{
		{PeerID: reader.String(), Role: RoleRead},
		{PeerID: operator.String(), Role: RoleOperate},
		{PeerID: admin.String(), Role: RoleAdmin},
		{PeerID: "not-a-peer-id", Role: RoleAdmin}, // skipped, not fatal
	})

	readActions := []string{
		envelope.ActionWorkerList, envelope.ActionDeviceList, envelope.ActionDeviceCapabilities,
		envelope.ActionKernelStatus, envelope.ActionTelemetryPull, envelope.ActionStatePull,
		envelope.ActionCommandStatus, envelope.ActionCommandWait,
	}
	operateActions := []string{envelope.ActionCommandRequest, envelope.ActionCommandCancel}
	adminActions := []string{envelope.ActionWorkerTerminate, "some.future.action"} // unknown actions need admin

	type row struct {
		who    string
		p      peer.ID
		action string
		code   string // "" = allowed
	}
	var rows []row
	for _, a := range readActions {
		rows = append(rows,
			row{"read", reader, a, ""},
			row{"operate", operator, a, ""},
			row{"admin", admin, a, ""},
			row{"unknown", stranger, a, envelope.CodeUnauthorized})
	}
	for _, a := range operateActions {
		rows = append(rows,
			row{"read", reader, a, envelope.CodeForbidden},
			row{"operate", operator, a, ""},
			row{"admin", admin, a, ""},
			row{"unknown", stranger, a, envelope.CodeUnauthorized})
	}
	for _, a := range adminActions {
		rows = append(rows,
			row{"read", reader, a, envelope.CodeForbidden},
			row{"operate", operator, a, envelope.CodeForbidden},
			row{"admin", admin, a, ""},
			row{"unknown", stranger, a, envelope.CodeUnauthorized})
	}
	// Every action the kernel serves is in the table above.
	covered := map[string]bool{}
	for _, r := range rows {
		covered[r.action] = true
	}
	for a := range actionRoles {
		require.True(t, covered[a], "action %s has no authorize row", a)
	}

	for _, r := range rows {
		t.Run(r.who+"/"+r.action, func(t *testing.T) {
			err := al.authorize(r.p, r.action)
			if r.code == "" {
				require.NoError(t, err)
				return
			}
			var e *envelope.Error
			require.True(t, errors.As(err, &e), "%v", err)
			require.Equal(t, r.code, e.Code, "%v", err)
			require.ErrorContains(t, err, r.code)
		})
	}

	// A reload replaces the list: the old admin is now unknown, the reader
	// became an operator.
	al.set([]Caller{{PeerID: reader.String(), Role: RoleOperate}})
	require.NoError(t, al.authorize(reader, envelope.ActionCommandRequest))
	var e *envelope.Error
	require.True(t, errors.As(al.authorize(admin, envelope.ActionWorkerList), &e))
	require.Equal(t, envelope.CodeUnauthorized, e.Code)
}
