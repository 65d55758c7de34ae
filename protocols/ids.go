// Package protocols names the ORK stream protocols and their limits. The
// framing and request/response machinery is in protocols/rpc, the message
// vocabulary in protocols/envelope.
package protocols

import "github.com/libp2p/go-libp2p/core/protocol"

// Worker-side protocols: served by Workers, called by the kernel only.
const (
	WorkerIdentity     protocol.ID = "/ork/worker/identity/1.0.0"
	WorkerCapabilities protocol.ID = "/ork/worker/capabilities/1.0.0"
	WorkerCommand      protocol.ID = "/ork/worker/command/1.0.0"
	WorkerTelemetry    protocol.ID = "/ork/worker/telemetry/1.0.0"
	WorkerState        protocol.ID = "/ork/worker/state/1.0.0"
	WorkerPing         protocol.ID = "/ork/worker/ping/1.0.0"
)

// Kernel-side protocols: served by the kernel to allowlisted callers.
const (
	KernelCommand   protocol.ID = "/ork/kernel/command/1.0.0"
	KernelTelemetry protocol.ID = "/ork/kernel/telemetry/1.0.0"
	KernelRegistry  protocol.ID = "/ork/kernel/registry/1.0.0"
)

// WorkerProtocolPrefix is how the kernel recognises a Worker in identify's
// protocol list, so it can register a Worker the moment it connects.
const WorkerProtocolPrefix = "/ork/worker/"

// DHTPrefix keeps the ORK Kademlia DHT private: /ork/kad/1.0.0, never the
// public /ipfs one.
const DHTPrefix protocol.ID = "/ork"

// Frame size limits (DESIGN §3).
const (
	MaxFrameSize          = 1 << 20 // 1 MiB
	MaxTelemetryFrameSize = 8 << 20 // telemetry responses may carry a whole Worker
)

// WorkerProtocols lists every Worker-side protocol.
var WorkerProtocols = []protocol.ID{WorkerIdentity, WorkerCapabilities, WorkerCommand, WorkerTelemetry, WorkerState, WorkerPing}

// KernelProtocols lists every kernel-side protocol.
var KernelProtocols = []protocol.ID{KernelCommand, KernelTelemetry, KernelRegistry}

// MaxFrame is the response size limit for a protocol.
func MaxFrame(p protocol.ID) int {
	if p == WorkerTelemetry || p == KernelTelemetry {
		return MaxTelemetryFrameSize
	}
	return MaxFrameSize
}
