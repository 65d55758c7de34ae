package sim

import (
	"time"

	"github.com/orknode/ork/protocols/envelope"
)

// Contract is the simulated miners' contract. Command durations are
// published scaled by timeScale (what callers will actually see).
func Contract(timeScale float64) *envelope.Contract {
	if timeScale <= 0 {
		timeScale = 1
	}
	ms := func(d time.Duration) int64 { return max(1, int64(float64(d.Milliseconds())*timeScale)) }
	f := func(v float64) *float64 { return &v }
	models := make([]string, len(Models))
	for i, m := range Models {
		models[i] = m.Name
	}
	return &envelope.Contract{
		Metadata: envelope.Metadata{
			Provider:        "ork-sim",
			DeviceFamily:    "miner",
			Brand:           "ORK Simulator",
			ModelsSupported: models,
			Overview: "Simulated SHA-256 ASIC miners. Hashrate follows the power mode and the power limit; " +
				"temperatures follow power with thermal inertia; a reboot takes the miner offline for a few seconds.",
		},
		Capabilities: envelope.Capabilities{
			Telemetry: []envelope.TelemetryChannel{
				{Name: "hashrate", Unit: "TH/s", Type: "number", Description: "Current hashrate. 0 while rebooting or offline."},
				{Name: "power", Unit: "W", Type: "number", Description: "Power draw at the wall. About 150 W while rebooting."},
				{Name: "chipTemp", Unit: "°C", Type: "number", Description: "Hottest chip temperature; alarms above 85."},
				{Name: "boardTemp", Unit: "°C", Type: "number", Description: "Hash board temperature."},
				{Name: "fanRpm", Unit: "rpm", Type: "number", Description: "Fan speed; full speed while booting, 0 when offline."},
				{Name: "status", Type: "string", Description: "online, rebooting or offline."},
				{Name: "uptime", Unit: "s", Type: "number", Description: "Seconds since the last boot; 0 while rebooting."},
				{Name: "poolUrl", Type: "string", Description: "The active pool; empty if none is set."},
				{Name: "powerMode", Type: "string", Description: "low, normal or high."},
				{Name: "powerLimit", Unit: "W", Type: "number", Description: "Power cap; 0 when none is set."},
				{Name: "led", Type: "boolean", Description: "Locate LED."},
			},
			Commands: []envelope.CommandSpec{
				{
					Name: "reboot", Description: "Restarts the miner: no hashing until it is back.",
					Constraints: "Answers once the miner is back online.", DurationMs: ms(RebootDuration),
					Examples: []envelope.Example{{Intent: "recover a miner with low hashrate", Steps: []string{"reboot", "check hashrate after the reboot"}}},
				},
				{
					Name: "setPowerMode", Description: "low ≈ 75% hashrate at 68% power; high ≈ 112% at 122%.",
					DurationMs: ms(PowerModeDuration),
					Params:     []envelope.ParamSpec{{Name: "mode", Type: "string", Required: true, Enum: []any{ModeLow, ModeNormal, ModeHigh}}},
					Examples:   []envelope.Example{{Intent: "cut power during a price spike", Steps: []string{"setPowerMode low"}}},
				},
				{
					Name: "setLed", Description: "Turns the locate LED on or off.", DurationMs: ms(LedDuration),
					Params: []envelope.ParamSpec{{Name: "on", Type: "boolean", Required: true}},
				},
				{
					Name: "setPowerLimit", Description: "Caps the power draw; hashrate drops in proportion.",
					DurationMs: ms(PowerLimitDelay),
					Params:     []envelope.ParamSpec{{Name: "watts", Type: "number", Required: true, Min: f(MinPowerLimitW), Max: f(MaxPowerLimitW)}},
				},
				{
					Name: "setPools", Description: "Replaces the pools: {url, user?, password?} for one, or {list: [pool, ...]} for up to 3 (first = active).",
					DurationMs: ms(PoolsDuration),
					Params:     []envelope.ParamSpec{{Name: "pools", Type: "object", Required: true}},
				},
			},
			Health: envelope.HealthSpec{
				SupportedStates: []string{StatusOnline, StatusRebooting, StatusOffline},
				Alerts:          []string{"chipTemp above 85 °C", "hashrate below 80% of nominal"},
				Troubleshooting: []string{"if hashrate is 0 and status is online, reboot", "if chipTemp is high, setPowerMode low"},
			},
			Errors: map[string]string{
				"ERR_DEVICE_UNAVAILABLE": "The miner is rebooting or offline; retry after it is back.",
				"ERR_SIM_FAULT":          "A failure injected by the simulator (--error-rate).",
			},
		},
	}
}
