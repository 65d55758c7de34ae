package node

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/orknode/ork/internal/p2p"
)

// ConfigFile is the config's name inside the data directory.
const ConfigFile = "config.json"

// Roles of callers, each including the ones before it (DESIGN §5).
const (
	RoleRead    = "read"    // lists, telemetry, status
	RoleOperate = "operate" // + commands
	RoleAdmin   = "admin"   // + terminate
)

var roleRank = map[string]int{RoleRead: 1, RoleOperate: 2, RoleAdmin: 3}

// Caller is one allowlisted caller.
type Caller struct {
	PeerID string `json:"peerId"`
	Role   string `json:"role"`
	Name   string `json:"name,omitempty"`
}

// Config is everything a node reads at start. `ork-node init` writes it with
// every default spelled out; zero values are honoured as written (a 0 retry
// budget means no retries), and Validate names the field at fault.
type Config struct {
	// DataDir holds config.json, identity.key, the LevelDB store and the api
	// file. It is not stored in the file itself.
	DataDir string `json:"-"`

	KeyFile  string   `json:"keyFile"`  // relative to DataDir
	Listen   []string `json:"listen"`   // multiaddrs; TCP and QUIC
	Announce []string `json:"announce"` // replaces advertised addresses (public address behind NAT)
	// LoopbackOnly advertises and dials only 127.0.0.1/::1: demos, tests,
	// single-machine setups.
	LoopbackOnly bool     `json:"loopbackOnly"`
	Bootstrap    []string `json:"bootstrap"` // the site's own DHT peers (multiaddrs with /p2p), never public ones
	Topic        string   `json:"topic"`     // 64 hex chars: the rendezvous Workers advertise on
	// PrivateNetworkKeyFile, if set, closes the swarm to peers without the
	// same pre-shared key (relative to DataDir).
	PrivateNetworkKeyFile string `json:"privateNetworkKeyFile"`

	Discovery    DiscoveryConfig    `json:"discovery"`
	WAN          WANConfig          `json:"wan"`
	Callers      []Caller           `json:"callers"`
	Cadences     CadenceConfig      `json:"cadences"`
	Health       HealthConfig       `json:"health"`
	Commands     CommandsConfig     `json:"commands"`
	Registration RegistrationConfig `json:"registration"`
	Telemetry    TelemetryConfig    `json:"telemetry"`
	Limits       LimitsConfig       `json:"limits"`
	HTTP         HTTPConfig         `json:"http"`
	LogLevel     string             `json:"logLevel"`
}

// DiscoveryConfig selects how Workers are found (modes combine).
type DiscoveryConfig struct {
	Modes            []string `json:"modes"` // dht, static, local, mdns
	LookupIntervalMs int64    `json:"lookupIntervalMs"`
	// WorkerPeers are Worker peer IDs resolved with FindPeer (discovery by
	// public key without a topic).
	WorkerPeers []string `json:"workerPeers"`
	// AllowWorkers, when not empty, is the closed list of Worker peer IDs
	// this kernel registers; any other peer is ignored, however it was found.
	// Empty admits every Worker that finds the kernel (the topic is a
	// rendezvous, not a credential; a private-network key closes the swarm).
	AllowWorkers []string `json:"allowWorkers"`
	Static       []string `json:"static"`   // Worker multiaddrs with /p2p
	LocalDir     string   `json:"localDir"` // Worker address files
	LocalScanMs  int64    `json:"localScanMs"`
}

// WANConfig holds NAT-traversal switches, off by default.
type WANConfig struct {
	AutoNAT      bool `json:"autoNat"`
	HolePunching bool `json:"holePunching"`
}

// CadenceConfig sets the scheduler's jobs (DESIGN §8); 0 disables a job.
type CadenceConfig struct {
	TelemetryPullMs   int64 `json:"telemetryPullMs"`
	HealthPingMs      int64 `json:"healthPingMs"`
	HealthTimeoutMs   int64 `json:"healthTimeoutMs"`
	IdentityRefreshMs int64 `json:"identityRefreshMs"`
	CompactionMs      int64 `json:"compactionMs"`
}

// HealthConfig tunes the health monitor.
type HealthConfig struct {
	FailureThreshold int `json:"failureThreshold"` // consecutive failures before DEAD
}

// CommandsConfig tunes the command state machine and the per-device queues.
type CommandsConfig struct {
	MaxRetries  int   `json:"maxRetries"` // resends of undelivered commands
	TimeoutMs   int64 `json:"timeoutMs"`  // per attempt
	QueueDepth  int   `json:"queueDepth"` // per device
	ResultTTLMs int64 `json:"resultTtlMs"`
	MaxInFlight int   `json:"maxInFlight"`
	// DefaultDeadlineMs is the deadline given to a command whose caller sent
	// no timeoutMs (a caller's timeoutMs wins): a command still queued then
	// (its Worker not routable, e.g. DEAD) fails ERR_COMMAND_EXPIRED instead
	// of waiting in the WAL forever. 0 means no default deadline.
	DefaultDeadlineMs int64 `json:"defaultDeadlineMs"`
}

// RegistrationConfig bounds the registration pipeline.
type RegistrationConfig struct {
	MaxConcurrent int   `json:"maxConcurrent"`
	TimeoutMs     int64 `json:"timeoutMs"`
	BackoffMinMs  int64 `json:"backoffMinMs"`
	BackoffMaxMs  int64 `json:"backoffMaxMs"`
}

// TelemetryConfig tunes the collector.
type TelemetryConfig struct {
	MaxConcurrent   int   `json:"maxConcurrent"`
	DefaultMaxAgeMs int64 `json:"defaultMaxAgeMs"`
}

// LimitsConfig caps connections and memory.
type LimitsConfig struct {
	MaxInboundConns int `json:"maxInboundConns"`
	ConnLow         int `json:"connLow"`
	ConnHigh        int `json:"connHigh"`
	// GCPercent is the Go GC target (GOGC); the default 25 keeps the heap
	// near its live size, which a kernel with a thousand Workers can afford
	// (its allocation rate is low). MemoryLimitMB, if set, is a soft limit.
	GCPercent     int `json:"gcPercent"`
	MemoryLimitMB int `json:"memoryLimitMB"`
}

// HTTPConfig is the optional loopback listener for /metrics, /livez, /readyz.
type HTTPConfig struct {
	Listen string `json:"listen"` // e.g. 127.0.0.1:9464; empty disables
}

// Discovery modes.
const (
	ModeDHT    = "dht"
	ModeStatic = "static"
	ModeLocal  = "local"
	ModeMDNS   = "mdns"
)

// DefaultConfig is the configuration `ork-node init` writes.
func DefaultConfig() Config {
	return Config{
		KeyFile:   "identity.key",
		Listen:    []string{"/ip4/127.0.0.1/tcp/4801", "/ip4/127.0.0.1/udp/4801/quic-v1"},
		Announce:  []string{},
		Bootstrap: []string{},
		Discovery: DiscoveryConfig{
			Modes:            []string{ModeDHT},
			LookupIntervalMs: 10_000,
			WorkerPeers:      []string{},
			AllowWorkers:     []string{},
			Static:           []string{},
			LocalScanMs:      4_000,
		},
		Callers: []Caller{},
		Cadences: CadenceConfig{
			TelemetryPullMs:   10_000,
			HealthPingMs:      5_000,
			HealthTimeoutMs:   3_000,
			IdentityRefreshMs: 60_000,
			CompactionMs:      600_000,
		},
		Health: HealthConfig{FailureThreshold: 3},
		Commands: CommandsConfig{
			MaxRetries: 3, TimeoutMs: 30_000, QueueDepth: 64, ResultTTLMs: 24 * 3600 * 1000, MaxInFlight: 256,
			DefaultDeadlineMs: 600_000,
		},
		Registration: RegistrationConfig{MaxConcurrent: 64, TimeoutMs: 10_000, BackoffMinMs: 500, BackoffMaxMs: 30_000},
		Telemetry:    TelemetryConfig{MaxConcurrent: 64, DefaultMaxAgeMs: 10_000},
		Limits:       LimitsConfig{MaxInboundConns: 4096, ConnLow: 2000, ConnHigh: 3000, GCPercent: 25},
		LogLevel:     "info",
	}
}

// LoadConfig reads DataDir/config.json over the defaults. Unknown fields are
// errors (a typo must not silently fall back to a default).
func LoadConfig(dataDir string) (Config, error) {
	cfg := DefaultConfig()
	path := filepath.Join(dataDir, ConfigFile)
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return cfg, fmt.Errorf("no %s in %s: run `ork-node init --data %s` first", ConfigFile, dataDir, dataDir)
		}
		return cfg, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 4<<20))
	if err != nil {
		return cfg, err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		return cfg, fmt.Errorf("%s: %w", path, err)
	}
	// One object only: a second one (a bad merge, a doubled paste) would
	// otherwise be ignored without a word.
	if _, err := dec.Token(); err != io.EOF {
		return cfg, fmt.Errorf("%s: unexpected data after the config object", path)
	}
	cfg.DataDir = dataDir
	return cfg, nil
}

// Save writes the config to DataDir/config.json (0600: it names trusted peers).
func (c Config) Save() error {
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return err
	}
	path := filepath.Join(c.DataDir, ConfigFile)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// ApplyEnv overrides fields from ORK_* environment variables.
func (c *Config) ApplyEnv(getenv func(string) string) error {
	list := func(v string) []string {
		var out []string
		for _, s := range strings.Split(v, ",") {
			if s = strings.TrimSpace(s); s != "" {
				out = append(out, s)
			}
		}
		return out
	}
	if v := getenv("ORK_LISTEN"); v != "" {
		c.Listen = list(v)
	}
	if v := getenv("ORK_ANNOUNCE"); v != "" {
		c.Announce = list(v)
	}
	if v := getenv("ORK_BOOTSTRAP"); v != "" {
		c.Bootstrap = list(v)
	}
	if v := getenv("ORK_TOPIC"); v != "" {
		c.Topic = v
	}
	if v := getenv("ORK_DISCOVERY"); v != "" {
		c.Discovery.Modes = list(v)
	}
	if v := getenv("ORK_HTTP_LISTEN"); v != "" {
		c.HTTP.Listen = v
	}
	if v := getenv("ORK_LOG_LEVEL"); v != "" {
		c.LogLevel = v
	}
	if v := getenv("ORK_LOOPBACK_ONLY"); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return fmt.Errorf("ORK_LOOPBACK_ONLY: %w", err)
		}
		c.LoopbackOnly = b
	}
	return nil
}

// Validate checks the config; the error names the field.
func (c *Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("config %s: %s", field, fmt.Sprintf(format, args...)))
	}
	if c.KeyFile == "" {
		bad("keyFile", "must not be empty")
	}
	if len(c.Listen) == 0 {
		bad("listen", "needs at least one address")
	}
	for i, s := range c.Listen {
		if _, err := ma.NewMultiaddr(s); err != nil {
			bad(fmt.Sprintf("listen[%d]", i), "%v", err)
		}
	}
	for i, s := range c.Announce {
		if _, err := ma.NewMultiaddr(s); err != nil {
			bad(fmt.Sprintf("announce[%d]", i), "%v", err)
		}
	}
	if _, err := p2p.ParseAddrInfos(c.Bootstrap); err != nil {
		bad("bootstrap", "%v", err)
	}
	if _, err := p2p.ParseAddrInfos(c.Discovery.Static); err != nil {
		bad("discovery.static", "%v", err)
	}
	for i, s := range c.Discovery.WorkerPeers {
		if _, err := peer.Decode(s); err != nil {
			bad(fmt.Sprintf("discovery.workerPeers[%d]", i), "%v", err)
		}
	}
	for i, s := range c.Discovery.AllowWorkers {
		if _, err := peer.Decode(s); err != nil {
			bad(fmt.Sprintf("discovery.allowWorkers[%d]", i), "%v", err)
		}
	}
	modes := map[string]bool{}
	for i, m := range c.Discovery.Modes {
		switch m {
		case ModeDHT, ModeStatic, ModeLocal, ModeMDNS:
			modes[m] = true
		default:
			bad(fmt.Sprintf("discovery.modes[%d]", i), "%q is not one of dht, static, local, mdns", m)
		}
	}
	if modes[ModeDHT] || modes[ModeMDNS] {
		if _, err := p2p.ParseTopic(c.Topic); err != nil {
			bad("topic", "%v", err)
		}
	}
	if modes[ModeLocal] && c.Discovery.LocalDir == "" {
		bad("discovery.localDir", "required with the local mode")
	}
	for i, cl := range c.Callers {
		if _, err := peer.Decode(cl.PeerID); err != nil {
			bad(fmt.Sprintf("callers[%d].peerId", i), "%v", err)
		}
		if roleRank[cl.Role] == 0 {
			bad(fmt.Sprintf("callers[%d].role", i), "%q is not one of read, operate, admin", cl.Role)
		}
	}
	nonNeg := []struct {
		field string
		v     int64
	}{
		{"cadences.telemetryPullMs", c.Cadences.TelemetryPullMs},
		{"cadences.healthPingMs", c.Cadences.HealthPingMs},
		{"cadences.identityRefreshMs", c.Cadences.IdentityRefreshMs},
		{"cadences.compactionMs", c.Cadences.CompactionMs},
		{"commands.maxRetries", int64(c.Commands.MaxRetries)},
		{"commands.resultTtlMs", c.Commands.ResultTTLMs},
		{"commands.defaultDeadlineMs", c.Commands.DefaultDeadlineMs},
		{"limits.connLow", int64(c.Limits.ConnLow)},
		{"limits.connHigh", int64(c.Limits.ConnHigh)},
		{"limits.memoryLimitMB", int64(c.Limits.MemoryLimitMB)},
	}
	for _, f := range nonNeg {
		if f.v < 0 {
			bad(f.field, "must not be negative, got %d", f.v)
		}
	}
	positive := []struct {
		field string
		v     int64
	}{
		{"cadences.healthTimeoutMs", c.Cadences.HealthTimeoutMs},
		{"health.failureThreshold", int64(c.Health.FailureThreshold)},
		{"commands.timeoutMs", c.Commands.TimeoutMs},
		{"commands.queueDepth", int64(c.Commands.QueueDepth)},
		{"commands.maxInFlight", int64(c.Commands.MaxInFlight)},
		{"registration.maxConcurrent", int64(c.Registration.MaxConcurrent)},
		{"registration.timeoutMs", c.Registration.TimeoutMs},
		{"registration.backoffMinMs", c.Registration.BackoffMinMs},
		{"registration.backoffMaxMs", c.Registration.BackoffMaxMs},
		{"telemetry.maxConcurrent", int64(c.Telemetry.MaxConcurrent)},
		{"limits.maxInboundConns", int64(c.Limits.MaxInboundConns)},
		{"limits.gcPercent", int64(c.Limits.GCPercent)},
	}
	for _, f := range positive {
		if f.v <= 0 {
			bad(f.field, "must be positive, got %d", f.v)
		}
	}
	// Discovery intervals, unlike cadences, have no "0 disables": a mode is
	// disabled by leaving it out of discovery.modes. 0 is refused rather than
	// silently replaced by a built-in interval.
	if v := c.Discovery.LookupIntervalMs; v <= 0 {
		bad("discovery.lookupIntervalMs", "must be positive (ms between discovery lookups; default 10000), got %d", v)
	}
	if v := c.Discovery.LocalScanMs; v <= 0 {
		bad("discovery.localScanMs", "must be positive (ms between scans of discovery.localDir; default 4000), got %d", v)
	}
	if c.Telemetry.DefaultMaxAgeMs < 0 {
		bad("telemetry.defaultMaxAgeMs", "must not be negative")
	}
	if c.Registration.BackoffMaxMs < c.Registration.BackoffMinMs {
		bad("registration.backoffMaxMs", "must be ≥ backoffMinMs")
	}
	if c.Limits.ConnHigh > 0 && c.Limits.ConnHigh < c.Limits.ConnLow {
		bad("limits.connHigh", "must be ≥ connLow")
	}
	if c.HTTP.Listen != "" {
		if err := checkLoopbackListen(c.HTTP.Listen); err != nil {
			bad("http.listen", "%v", err)
		}
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		bad("logLevel", "%q is not one of debug, info, warn, error", c.LogLevel)
	}
	return errors.Join(errs...)
}

func ms(v int64) time.Duration { return time.Duration(v) * time.Millisecond }

// path resolves a file name relative to the data directory.
func (c *Config) path(name string) string {
	if name == "" || filepath.IsAbs(name) {
		return name
	}
	return filepath.Join(c.DataDir, name)
}

// RoleOf returns the role of an allowlisted caller, or "".
func (c *Config) RoleOf(p peer.ID) string {
	for _, cl := range c.Callers {
		if cl.PeerID == p.String() {
			return cl.Role
		}
	}
	return ""
}

// checkLoopbackListen accepts host:port on a loopback address only: metrics and
// profiles are for the local agent, not the network.
func checkLoopbackListen(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return fmt.Errorf("port %q: %v", port, err)
	}
	ip := net.ParseIP(host)
	if host == "localhost" {
		return nil
	}
	if ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("%q is not a loopback address (127.0.0.1, ::1)", host)
	}
	return nil
}
