// A remote-controlled @supabase/supabase-js for tests/e2e/test_durable.py:
// the same line protocol as driver.mjs (commands on stdin, JSON events on
// stdout, {"ev": "ready"} first, every command answered by "done"/"failed",
// every WebSocket frame recorded as "wire"), plus postgres_changes bindings.
//
//   {"id": 1, "op": "client", "client": "a", "url": "http://...", "key": "JWT"}
//   {"id": 2, "op": "channel", "client": "a", "chan": "c", "topic": "org:42",
//    "config": {"private": true, "broadcast": {"replay": {"after": 10}}},
//    "changes": [{"label": "gt", "event": "*", "schema": "public",
//                 "table": "items", "filter": "n=gt.5"}]}
//
// Each binding in "changes" becomes .on('postgres_changes', {event, schema,
// table, filter}, cb) and each callback prints {"ev": "change", client, chan,
// label, payload}, payload being what supabase-js hands to the app.
//
// argv[2]: optional JSON {"maxSeconds": n}: the script exits by itself after
// that long, so a forgotten process can never hang a test run.

import { createInterface } from 'node:readline'
import { createClient } from '@supabase/supabase-js'
import WebSocket from 'ws'

const options = JSON.parse(process.argv[2] || '{}')
const maxSeconds = options.maxSeconds ?? 60

function emit(event) {
  process.stdout.write(JSON.stringify(event) + '\n')
}

function toBuffer(data) {
  if (Buffer.isBuffer(data)) return data
  if (Array.isArray(data)) return Buffer.concat(data)
  if (data instanceof ArrayBuffer) return Buffer.from(data)
  return Buffer.from(data.buffer, data.byteOffset, data.byteLength)
}

function frameRecord(data, isBinary) {
  if (!isBinary) {
    return { binary: false, text: typeof data === 'string' ? data : toBuffer(data).toString('utf8') }
  }
  const buf = toBuffer(data)
  return { binary: true, kind: buf[0], hex: buf.toString('hex') }
}

function recordingTransport(clientId) {
  return class RecordingWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols)
      emit({ ev: 'socket_connecting', client: clientId, url: String(url) })
      this.on('open', () => emit({ ev: 'socket_open', client: clientId }))
      this.on('message', (data, isBinary) =>
        emit({ ev: 'wire', client: clientId, dir: 'in', ...frameRecord(data, isBinary) })
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

const clients = new Map()
const channels = new Map()

function getClient(cmd) {
  const client = clients.get(cmd.client)
  if (!client) throw new Error(`no client ${cmd.client}`)
  return client
}

const ops = {
  client(cmd) {
    const clientOptions = {
      realtime: { transport: recordingTransport(cmd.client), timeout: cmd.timeout ?? 5000 },
      auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
    }
    clients.set(cmd.client, createClient(cmd.url, cmd.key, clientOptions))
    return 'created'
  },

  channel(cmd) {
    const tag = { client: cmd.client, chan: cmd.chan }
    const channel = getClient(cmd).channel(cmd.topic, { config: cmd.config ?? {} })
    channel.on('broadcast', { event: '*' }, (message) =>
      emit({
        ev: 'broadcast',
        ...tag,
        event: message.event,
        payload: message.payload,
        meta: message.meta ?? null,
      })
    )
    channel.on('system', {}, (payload) => emit({ ev: 'system', ...tag, payload }))
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

  async remove_channel(cmd) {
    const key = `${cmd.client}/${cmd.chan}`
    const channel = channels.get(key)
    if (!channel) throw new Error(`no channel ${key}`)
    channels.delete(key)
    return await getClient(cmd).removeChannel(channel)
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
  emit({ ev: 'fatal', error: `durable.mjs ran for more than ${maxSeconds} s` })
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
