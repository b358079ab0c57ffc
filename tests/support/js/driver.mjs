// A remote-controlled @supabase/supabase-js, for the hub's end-to-end tests.
//
// Run by tests/support/jsclient.py from a copy placed next to the npm-installed
// client (.cache/js/scenarios/), so the imports below resolve to the real,
// unmodified packages.
//
// stdin: one JSON command per line, e.g.
//   {"id": 1, "op": "client", "client": "a", "url": "http://...", "key": "JWT"}
//   {"id": 2, "op": "channel", "client": "a", "chan": "c", "topic": "org:42",
//    "config": {"broadcast": {"self": true}}, "presence": true,
//    "changes": [{"label": "gt", "event": "*", "schema": "public",
//                 "table": "items", "filter": "n=gt.5"}]}
//   {"id": 3, "op": "send", "client": "a", "chan": "c", "event": "e", "payload": {...}}
// stdout: one JSON event per line.  Every command with an "id" is answered by
// {"ev": "done", "id", "result"} or {"ev": "failed", "id", "error"}; the rest
// is what the client observed: subscribe statuses, broadcasts, presence
// events, system messages, and every WebSocket frame ("wire") and socket
// event, recorded by a thin subclass of ws's WebSocket used as transport.
// Each binding in a channel's "changes" becomes .on('postgres_changes',
// {event, schema, table, filter}, cb), whose callback prints {"ev": "change",
// client, chan, label, payload}, payload being what supabase-js hands the app.
//
// argv[2]: optional JSON {"maxSeconds": n}: the driver exits by itself after
// that long, so a forgotten driver can never hang a test run.

import { createInterface } from 'node:readline'
import { createClient } from '@supabase/supabase-js'
import WebSocket from 'ws'

const options = JSON.parse(process.argv[2] || '{}')
const maxSeconds = options.maxSeconds ?? 60

function emit(event) {
  process.stdout.write(JSON.stringify(event, jsonSafe) + '\n')
}

// ArrayBuffers and typed arrays (raw broadcast payloads) as {"$bytes": hex}.
function jsonSafe(_key, value) {
  if (value instanceof ArrayBuffer) return { $bytes: Buffer.from(value).toString('hex') }
  if (ArrayBuffer.isView(value) && !(value instanceof DataView)) {
    return { $bytes: Buffer.from(value.buffer, value.byteOffset, value.byteLength).toString('hex') }
  }
  if (value && value.type === 'Buffer' && Array.isArray(value.data)) {
    return { $bytes: Buffer.from(value.data).toString('hex') }
  }
  return value
}

function fromWire(value) {
  if (value && typeof value === 'object' && typeof value.$bytes === 'string') {
    const buf = Buffer.from(value.$bytes, 'hex')
    return buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength)
  }
  return value
}

function toBuffer(data) {
  if (Buffer.isBuffer(data)) return data
  if (Array.isArray(data)) return Buffer.concat(data)
  if (data instanceof ArrayBuffer) return Buffer.from(data)
  return Buffer.from(data.buffer, data.byteOffset, data.byteLength)
}

function frameRecord(data, isBinary) {
  if (!isBinary) return { binary: false, text: typeof data === 'string' ? data : toBuffer(data).toString('utf8') }
  const buf = toBuffer(data)
  return { binary: true, kind: buf[0], hex: buf.toString('hex') }
}

// One WebSocket class per client, so its frames are tagged with the client id.
function recordingTransport(clientId) {
  return class RecordingWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols)
      emit({ ev: 'socket_connecting', client: clientId, url: String(url) })
      this.on('open', () => emit({ ev: 'socket_open', client: clientId }))
      this.on('message', (data, isBinary) =>
        emit({ ev: 'wire', client: clientId, dir: 'in', ...frameRecord(data, isBinary) })
      )
      this.on('error', (err) =>
        emit({ ev: 'socket_error', client: clientId, message: String(err && err.message) })
      )
      this.on('close', (code, reason) =>
        emit({ ev: 'socket_close', client: clientId, code, reason: String(reason) })
      )
    }

    send(data, ...rest) {
      emit({ ev: 'wire', client: clientId, dir: 'out', ...frameRecord(data, typeof data !== 'string') })
      return super.send(data, ...rest)
    }
  }
}

const clients = new Map() // id -> supabase client
const channels = new Map() // `${client}/${chan}` -> RealtimeChannel

function getClient(cmd) {
  const client = clients.get(cmd.client)
  if (!client) throw new Error(`no client ${cmd.client}`)
  return client
}

function getChannel(cmd) {
  const channel = channels.get(`${cmd.client}/${cmd.chan}`)
  if (!channel) throw new Error(`no channel ${cmd.client}/${cmd.chan}`)
  return channel
}

function presenceKeys(channel) {
  return Object.keys(channel.presenceState()).sort()
}

const ops = {
  client(cmd) {
    const realtime = {
      transport: recordingTransport(cmd.client),
      timeout: cmd.timeout ?? 5000,
      ...(cmd.params ? { params: cmd.params } : {}),
    }
    const clientOptions = {
      realtime,
      auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
    }
    if (cmd.accessToken) clientOptions.accessToken = async () => cmd.accessToken
    clients.set(cmd.client, createClient(cmd.url, cmd.key, clientOptions))
    return 'created'
  },

  channel(cmd) {
    const supabase = getClient(cmd)
    const tag = { client: cmd.client, chan: cmd.chan }
    const channel = supabase.channel(cmd.topic, { config: cmd.config ?? {} })
    channel.on('broadcast', { event: cmd.event ?? '*' }, (message) =>
      emit({
        ev: 'broadcast',
        ...tag,
        event: message.event,
        payload: message.payload,
        meta: message.meta ?? null,
      })
    )
    channel.on('system', {}, (payload) => emit({ ev: 'system', ...tag, payload }))
    if (cmd.presence) {
      channel.on('presence', { event: 'sync' }, () =>
        emit({ ev: 'presence_sync', ...tag, keys: presenceKeys(channel), state: channel.presenceState() })
      )
      channel.on('presence', { event: 'join' }, ({ key, newPresences }) =>
        emit({ ev: 'presence_join', ...tag, key, presences: newPresences })
      )
      channel.on('presence', { event: 'leave' }, ({ key, leftPresences }) =>
        emit({ ev: 'presence_leave', ...tag, key, presences: leftPresences })
      )
    }
    for (const binding of cmd.changes ?? []) {
      const { label, ...filter } = binding
      channel.on('postgres_changes', filter, (payload) =>
        emit({ ev: 'change', ...tag, label, payload })
      )
    }
    channels.set(`${cmd.client}/${cmd.chan}`, channel)
    channel.subscribe((status, err) =>
      emit({ ev: 'status', ...tag, status, error: err ? String(err.message ?? err) : null })
    )
    return channel.topic
  },

  async send(cmd) {
    const channel = getChannel(cmd)
    return await channel.send(
      { type: 'broadcast', event: cmd.event, payload: fromWire(cmd.payload) },
      cmd.timeout ? { timeout: cmd.timeout } : {}
    )
  },

  async http_send(cmd) {
    const result = await getChannel(cmd).httpSend(cmd.event, fromWire(cmd.payload))
    return result.success ? 'ok' : 'failed'
  },

  async track(cmd) {
    return await getChannel(cmd).track(cmd.payload ?? {})
  },

  async untrack(cmd) {
    return await getChannel(cmd).untrack()
  },

  presence_state(cmd) {
    return getChannel(cmd).presenceState()
  },

  async remove_channel(cmd) {
    const channel = getChannel(cmd)
    channels.delete(`${cmd.client}/${cmd.chan}`)
    return await getClient(cmd).removeChannel(channel)
  },

  async set_auth(cmd) {
    await getClient(cmd).realtime.setAuth(cmd.token)
    return 'ok'
  },

  async disconnect(cmd) {
    await getClient(cmd).realtime.disconnect()
    return 'ok'
  },

  exit() {
    setImmediate(() => process.exit(0))
    return 'bye'
  },
}

async function run(cmd) {
  const op = ops[cmd.op]
  try {
    if (!op) throw new Error(`unknown op ${cmd.op}`)
    const result = await op(cmd)
    if (cmd.id !== undefined) emit({ ev: 'done', id: cmd.id, result: result ?? null })
  } catch (err) {
    emit({ ev: 'failed', id: cmd.id ?? null, error: String(err && err.stack ? err.stack : err) })
  }
}

process.on('uncaughtException', (err) => emit({ ev: 'uncaught', error: String(err && err.stack) }))
process.on('unhandledRejection', (err) => emit({ ev: 'uncaught', error: String(err && err.stack) }))

setTimeout(() => {
  emit({ ev: 'fatal', error: `driver ran for more than ${maxSeconds} s` })
  process.exit(3)
}, maxSeconds * 1000).unref()

const lines = createInterface({ input: process.stdin })
lines.on('line', (line) => {
  if (!line.trim()) return
  let cmd
  try {
    cmd = JSON.parse(line)
  } catch (err) {
    emit({ ev: 'failed', id: null, error: `bad command line: ${line}` })
    return
  }
  run(cmd)
})
lines.on('close', () => process.exit(0))

emit({ ev: 'ready', node: process.version })
