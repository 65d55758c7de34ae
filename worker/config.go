package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/orknode/ork/internal/p2p"
	"github.com/orknode/ork/protocols/envelope"
)

// Defaults and limits of the Config durations and sizes.
const (
	// DefaultReprovideEvery keeps the topic's provider record alive: under half
	// of the 10 min validity the ORK DHT servers give it.
	DefaultReprovideEvery = 4 * time.Minute
	// MinDedupTTL is the shortest commandId → result retention allowed
	// (MDK-REFERENCE §12 item 2); it is also the default.
	MinDedupTTL = 10 * time.Minute
	// DefaultDedupMaxEntries bounds the result cache; the oldest finished
	// entries go first.
	DefaultDedupMaxEntries = 100_000
	// DefaultCommandTimeout bounds one run of a command handler when the
	// request names no shorter deadline.
	DefaultCommandTimeout = 60 * time.Second
)

// MDNSServiceName is the DNS-SD service Workers announce themselves under when
// Config.MDNS is set; a kernel browsing for LAN Workers uses the same name.
const MDNSServiceName = p2p.MDNSServiceName

// Device is one device a Worker owns.
type Device struct {
	DeviceID string
	Rack     string // rack label, for rack-scoped commands; optional
	Model    string // optional
	// Offline devices are still listed by identity and state answers, but
	// their commands and reads fail with ERR_DEVICE_UNAVAILABLE.
	Offline bool
}

// Config describes a Worker. Zero durations and sizes take the defaults.
type Config struct {
	// WorkerID names the Worker on the wire and in address files
	// (letters, digits, '.', '_', '-').
	WorkerID string
	// Contract is what the Worker's devices report and accept; it must pass
	// Contract.Validate.
	Contract *envelope.Contract
	// Devices are the devices at start; SetDevices and SetOnline change them.
	Devices []Device

	// Commands, Telemetry and Queries are handlers in place before the
	// Worker answers its first request (HandleCommand, HandleTelemetry and
	// HandleQuery add or replace handlers later). Every command must be
	// declared in the contract; "metrics" is not a Queries key.
	Commands  map[string]CommandHandler
	Telemetry TelemetryHandler
	Queries   map[string]QueryHandler

	// Key is the Worker's identity. KeyFile instead keeps it in a file (made
	// with mode 0600 on first use, reused on restart, so the peer ID stays).
	// With neither, a fresh key is made on every start (tests, throw-away
	// fleets).
	Key     crypto.PrivKey
	KeyFile string
	// ListenAddrs default to 127.0.0.1, TCP and QUIC, ephemeral ports.
	ListenAddrs []string
	// LoopbackOnly advertises and dials loopback addresses only.
	LoopbackOnly bool
	// PSK is the site's private-network key, when the kernel uses one (a
	// closed swarm; TCP only). Read it with pnet.DecodeV1PSK.
	PSK []byte
	// Host, if set, is used instead of making one (tests on mocknet, or a
	// process that already has a host); Key, KeyFile and ListenAddrs must
	// then be empty. The Worker does not close a host it did not make.
	Host host.Host

	// TrustedKernels are the only peers the /ork/worker/* protocols answer;
	// any other peer's stream is reset unanswered. Required.
	TrustedKernels []peer.ID

	// Topic (32 bytes) turns on DHT advertising: the Worker provides the
	// topic's CID on the private DHT reached through Bootstrap.
	Topic []byte
	// Bootstrap peers are dialled at start and kept connected; with Topic
	// they are the DHT's bootstrap peers.
	Bootstrap []peer.AddrInfo
	// AddrDir turns on local-directory advertising: the Worker writes
	// <AddrDir>/<WorkerID>.addr and rewrites it when its addresses change.
	AddrDir string
	// MDNS announces the Worker on the LAN (multicast). Off by default; never
	// in tests.
	MDNS bool
	// ReprovideEvery is the re-provide period of DHT advertising; it must
	// stay under half of the servers' provider-record validity (10 min).
	ReprovideEvery time.Duration

	// DedupTTL is how long a finished command's result is kept by commandId
	// (≥ 10 min). DedupMaxEntries bounds the cache.
	DedupTTL        time.Duration
	DedupMaxEntries int
	// Results, if set, is used as the commandId → result cache instead of a
	// new one, so a Worker restarted in the same process (a simulated crash)
	// still never runs a command twice. DedupTTL and DedupMaxEntries are then
	// the cache's own.
	Results *ResultCache
	// StateDir, if set, makes the commandId → result cache durable: the
	// Worker keeps an append-only journal there (results.log; the directory
	// is made with mode 0700, the file 0600) with a synced record before
	// each handler runs and one after it returns, and replays it on New.
	// Results come back for DedupTTL; a command whose handler was running
	// when the process died answers FAILED with ERR_WORKER_RESTARTED (its
	// outcome is unknown) to command.status and to a resend, instead of
	// UNKNOWN, so the kernel never runs it twice. The journal is compacted
	// on start and as it grows. One Worker per directory; empty keeps the
	// cache in memory. Not with Results.
	StateDir string
	// CommandTimeout bounds one handler run (default 60 s); a request's
	// timeoutMs may shorten it. It must be shorter than DedupTTL.
	CommandTimeout time.Duration
	// OnExecute, if set, is called each time a command handler is about to
	// run (the simulator's "no command ran twice" check).
	OnExecute func(commandID, command, deviceID string)
	// Intercept, if set, runs before every request is answered; its error
	// becomes the reply's error (an *envelope.Error keeps its code).
	// Simulators add latency and faults here.
	Intercept func(ctx context.Context, remote peer.ID, action string) error

	// Logger defaults to the "ork/worker" subsystem logger.
	Logger *slog.Logger
}

// ErrInvalidConfig is wrapped by every Config validation error.
var ErrInvalidConfig = errors.New("ork/worker: invalid config")

// ConfigError says which Config field is wrong and why.
type ConfigError struct {
	Field  string // e.g. "Config.WorkerID", "Config.Devices[2].DeviceID"
	Reason string
}

func (e *ConfigError) Error() string { return "ork/worker: " + e.Field + ": " + e.Reason }

// Unwrap makes errors.Is(err, ErrInvalidConfig) true.
func (e *ConfigError) Unwrap() error { return ErrInvalidConfig }

func fieldErr(field, format string, args ...any) error {
	return &ConfigError{Field: "Config." + field, Reason: fmt.Sprintf(format, args...)}
}

// validate checks cfg and fills in the defaults. It does not touch the disk.
func (cfg *Config) validate() error {
	if cfg.WorkerID == "" {
		return fieldErr("WorkerID", "required")
	}
	if !validName(cfg.WorkerID) {
		return fieldErr("WorkerID", "%q: use letters, digits, '.', '_' and '-' only", cfg.WorkerID)
	}
	if cfg.Contract == nil {
		return fieldErr("Contract", "required")
	}
	if err := cfg.Contract.Validate(); err != nil {
		return fieldErr("Contract", "%v", err)
	}
	if err := validateDevices(cfg.Devices, "Devices"); err != nil {
		return err
	}
	for name, fn := range cfg.Commands {
		field := fmt.Sprintf("Commands[%q]", name)
		if _, ok := cfg.Contract.Command(name); !ok {
			return fieldErr(field, "not declared in the contract")
		}
		if fn == nil {
			return fieldErr(field, "nil handler")
		}
	}
	for typ, fn := range cfg.Queries {
		field := fmt.Sprintf("Queries[%q]", typ)
		if typ == "" || typ == queryMetrics {
			return fieldErr(field, "reserved query type (use Telemetry for metrics)")
		}
		if fn == nil {
			return fieldErr(field, "nil handler")
		}
	}
	if cfg.Key != nil && cfg.KeyFile != "" {
		return fieldErr("KeyFile", "set either Key or KeyFile, not both")
	}
	if cfg.Host != nil {
		switch {
		case cfg.Key != nil:
			return fieldErr("Key", "must be empty when Host is set (the host has its key)")
		case cfg.KeyFile != "":
			return fieldErr("KeyFile", "must be empty when Host is set (the host has its key)")
		case len(cfg.ListenAddrs) > 0:
			return fieldErr("ListenAddrs", "must be empty when Host is set")
		}
	}
	for i, a := range cfg.ListenAddrs {
		if _, err := ma.NewMultiaddr(a); err != nil {
			return fieldErr(fmt.Sprintf("ListenAddrs[%d]", i), "%q: %v", a, err)
		}
	}
	if len(cfg.TrustedKernels) == 0 {
		return fieldErr("TrustedKernels", "required: the peer IDs of the kernels this Worker answers")
	}
	for i, k := range cfg.TrustedKernels {
		if err := k.Validate(); err != nil {
			return fieldErr(fmt.Sprintf("TrustedKernels[%d]", i), "%v", err)
		}
	}
	if cfg.Topic != nil && len(cfg.Topic) != 32 {
		return fieldErr("Topic", "must be 32 bytes, got %d", len(cfg.Topic))
	}
	if cfg.Topic != nil && len(cfg.Bootstrap) == 0 {
		return fieldErr("Bootstrap", "required with Topic: the DHT needs at least one peer")
	}
	for i, b := range cfg.Bootstrap {
		if err := b.ID.Validate(); err != nil {
			return fieldErr(fmt.Sprintf("Bootstrap[%d]", i), "peer ID: %v", err)
		}
		if len(b.Addrs) == 0 {
			return fieldErr(fmt.Sprintf("Bootstrap[%d]", i), "no addresses for %s", b.ID)
		}
	}
	maxReprovide := p2p.DefaultProvideValidity / 2
	switch {
	case cfg.ReprovideEvery == 0:
		cfg.ReprovideEvery = DefaultReprovideEvery
	case cfg.ReprovideEvery < 0:
		return fieldErr("ReprovideEvery", "must be positive")
	case cfg.ReprovideEvery >= maxReprovide:
		return fieldErr("ReprovideEvery", "%v: must be under %v (half the provider-record validity)", cfg.ReprovideEvery, maxReprovide)
	}
	if cfg.Results != nil && cfg.StateDir != "" {
		return fieldErr("StateDir", "set either StateDir or Results, not both (StateDir makes its own durable cache)")
	}
	if cfg.Results != nil && cfg.Results.j != nil {
		return fieldErr("Results", "this cache belongs to a Worker with a StateDir: give the new Worker the same StateDir instead")
	}
	if cfg.Results != nil {
		if cfg.DedupTTL != 0 || cfg.DedupMaxEntries != 0 {
			return fieldErr("DedupTTL", "leave DedupTTL and DedupMaxEntries zero when Results is set (the cache has its own)")
		}
		cfg.DedupTTL = cfg.Results.ttl
	} else {
		switch {
		case cfg.DedupTTL == 0:
			cfg.DedupTTL = MinDedupTTL
		case cfg.DedupTTL < MinDedupTTL:
			return fieldErr("DedupTTL", "%v: must be at least %v", cfg.DedupTTL, MinDedupTTL)
		}
		switch {
		case cfg.DedupMaxEntries == 0:
			cfg.DedupMaxEntries = DefaultDedupMaxEntries
		case cfg.DedupMaxEntries < 0:
			return fieldErr("DedupMaxEntries", "must be positive")
		}
	}
	switch {
	case cfg.CommandTimeout == 0:
		cfg.CommandTimeout = DefaultCommandTimeout
	case cfg.CommandTimeout < 0:
		return fieldErr("CommandTimeout", "must be positive")
	}
	if cfg.CommandTimeout >= cfg.DedupTTL {
		return fieldErr("CommandTimeout", "%v: must be shorter than DedupTTL (%v)", cfg.CommandTimeout, cfg.DedupTTL)
	}
	return nil
}

func validateDevices(devs []Device, field string) error {
	seen := make(map[string]bool, len(devs))
	for i, d := range devs {
		if d.DeviceID == "" {
			return fieldErr(fmt.Sprintf("%s[%d].DeviceID", field, i), "required")
		}
		if seen[d.DeviceID] {
			return fieldErr(fmt.Sprintf("%s[%d].DeviceID", field, i), "duplicate %q", d.DeviceID)
		}
		seen[d.DeviceID] = true
	}
	return nil
}

func validName(s string) bool {
	if s == "." || s == ".." || len(s) > 128 {
		return false
	}
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '_', r == '-':
		default:
			return false
		}
	}
	return true
}
