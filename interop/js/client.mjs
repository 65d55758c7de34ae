// A js-libp2p client that calls an ORK node (DESIGN §3 interop): TCP + Noise +
// yamux, unsigned-varint length prefix + JSON MDK envelopes.
//
//   node client.mjs [flags] <kernel multiaddr with /p2p/ID> <deviceId>
//
//   --key FILE       libp2p-marshalled private key (the kernel's DATA/client.key,
//                    Go's crypto.MarshalPrivateKey); without it a fresh Ed25519
//                    key is made, which the kernel will not have allowlisted
//   --half-close     close the write side right after each request, then read
//                    the reply (the node must answer and close cleanly)
//   --command NAME   command to send (default setPowerLimit)
//   --params JSON    its params (default {"watts":3000})
//   --wait-ms N      command.request waitMs (default 10000)
//   --timeout-ms N   per-call timeout (default 20000)
//
// Output, one JSON object a line on stdout: {"event":"identity","peerId"}, then
// one {"event":"reply","protocol","action","halfClose","streamClose","envelope"}
// per call. Exit 0 when both calls got a reply without an error envelope and
// both streams closed cleanly; otherwise a message on stderr and exit 1.

// js-libp2p 3.x calls Promise.withResolvers (Node >= 22); this machine has
// Node 20. The polyfill must run before libp2p is loaded, hence the dynamic
// imports below.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function () {
    let resolve, reject
    const promise = new Promise((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}

const { readFileSync } = await import('node:fs')
const { randomUUID } = await import('node:crypto')
const { parseArgs } = await import('node:util')
const { createLibp2p } = await import('libp2p')
const { tcp } = await import('@libp2p/tcp')
const { noise } = await import('@chainsafe/libp2p-noise')
const { yamux } = await import('@chainsafe/libp2p-yamux')
const { lpStream } = await import('@libp2p/utils')
const { multiaddr } = await import('@multiformats/multiaddr')
const { generateKeyPair, privateKeyFromProtobuf } = await import('@libp2p/crypto/keys')

const REGISTRY = '/ork/kernel/registry/1.0.0'
const COMMAND = '/ork/kernel/command/1.0.0'
const SENDER = 'js-client'
const VERSION = '0.2.0' // MDK protocol version

function fail (msg) {
  process.stderr.write(`interop client: ${msg}\n`)
  process.exit(1)
}

const { values: opts, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    key: { type: 'string' },
    'half-close': { type: 'boolean', default: false },
    command: { type: 'string', default: 'setPowerLimit' },
    params: { type: 'string', default: '{"watts":3000}' },
    'wait-ms': { type: 'string', default: '10000' },
    'timeout-ms': { type: 'string', default: '20000' }
  }
})
if (positionals.length !== 2) {
  fail('usage: node client.mjs [--key FILE] [--half-close] <kernel multiaddr with /p2p/ID> <deviceId>')
}
const [kernelAddr, deviceId] = positionals
const halfClose = opts['half-close']
const waitMs = Number(opts['wait-ms'])
const timeoutMs = Number(opts['timeout-ms'])
if (!Number.isInteger(waitMs) || waitMs < 1 || !Number.isInteger(timeoutMs) || timeoutMs < 1) {
  fail('--wait-ms and --timeout-ms take positive integers')
}

function envelope (action, payload, device) {
  const env = {
    id: randomUUID(),
    version: VERSION,
    type: 'request',
    action,
    sender: SENDER,
    timestamp: Date.now(),
    payload
  }
  if (device !== undefined) env.deviceId = device
  return env
}

// Resolves with 'clean' when both ends have closed the stream without an
// error, rejects if it was reset or aborted, or did not close in time.
function closed (stream, signal) {
  if (stream.status === 'closed') return Promise.resolve('clean')
  if (stream.status === 'reset' || stream.status === 'aborted') {
    return Promise.reject(new Error(`stream ${stream.status}`))
  }
  return new Promise((resolve, reject) => {
    const onAbort = () => reject(new Error(`stream not closed by the node in time (status ${stream.status})`))
    signal.addEventListener('abort', onAbort, { once: true })
    stream.addEventListener('close', (evt) => {
      signal.removeEventListener('abort', onAbort)
      if (evt.error != null) reject(new Error(`stream closed with an error: ${evt.error.name}: ${evt.error.message}`))
      else resolve('clean')
    }, { once: true })
  })
}

// call sends one request on a new stream of conn and returns its reply.
async function call (conn, protocol, req) {
  const signal = AbortSignal.timeout(timeoutMs)
  const stream = await conn.newStream(protocol, { signal })
  const done = closed(stream, signal)
  done.catch(() => {}) // awaited below; do not let an early rejection go unhandled
  const lp = lpStream(stream)
  await lp.write(new TextEncoder().encode(JSON.stringify(req)), { signal })
  if (halfClose) await stream.close({ signal }) // EOF before the reply is read
  const raw = await lp.read({ signal })
  if (!halfClose) await stream.close({ signal })
  // lpStream may have read ahead; the node closes its side after the reply.
  const streamClose = await done
  let reply
  try {
    reply = JSON.parse(new TextDecoder().decode(raw.subarray()))
  } catch (err) {
    throw new Error(`${protocol}: reply is not JSON: ${err.message}`)
  }
  process.stdout.write(JSON.stringify({ event: 'reply', protocol, action: req.action, halfClose, streamClose, envelope: reply }) + '\n')
  if (reply.replyTo !== req.id) throw new Error(`${protocol}: replyTo ${reply.replyTo} is not the request id ${req.id}`)
  if (reply.error != null) throw new Error(`${protocol} ${req.action}: ${reply.error.code}: ${reply.error.message}`)
  return reply
}

let privateKey
if (opts.key !== undefined) {
  try {
    privateKey = privateKeyFromProtobuf(readFileSync(opts.key))
  } catch (err) {
    fail(`key file ${opts.key}: ${err.message}`)
  }
} else {
  privateKey = await generateKeyPair('Ed25519')
}

let params
try {
  params = JSON.parse(opts.params)
} catch (err) {
  fail(`--params: ${err.message}`)
}

let node
try {
  node = await createLibp2p({
    privateKey,
    addresses: { listen: [] }, // a client: dial only
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()]
    // no peerDiscovery, no services: no mdns, bootstrap, identify, autonat, upnp or relay
  })
  process.stdout.write(JSON.stringify({ event: 'identity', peerId: node.peerId.toString() }) + '\n')

  const conn = await node.dial(multiaddr(kernelAddr), { signal: AbortSignal.timeout(timeoutMs) })
  await call(conn, REGISTRY, envelope('worker.list', {}))
  await call(conn, COMMAND, envelope('command.request', { command: opts.command, params, waitMs }, deviceId))
} catch (err) {
  if (node != null) await node.stop().catch(() => {})
  fail(err?.message ?? String(err))
}
await node.stop()
process.exit(0)
