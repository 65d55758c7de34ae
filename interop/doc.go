// Package interop holds the cross-language interoperability test (DESIGN §3):
// a js-libp2p client (js/client.mjs) calls an in-process kernel over TCP +
// Noise + yamux with varint-framed JSON envelopes. The test is behind the
// `interop` build tag, so `go test ./...` never runs it; `make interop` does.
package interop
