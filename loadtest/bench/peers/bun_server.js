// Bun's built-in WebSocket pub/sub (uWebSockets underneath), the fastest
// server a JavaScript team would reach for, in the benchmark's peer shape.
//
//   bun bun_server.js PORT CONTROL_PORT
//
// ws://127.0.0.1:PORT/ws/ROOM: the socket subscribes to ROOM on open and gets
// one text frame as the join ack; each message is one server.publish(room, text),
// which Bun writes to every subscriber (corked per loop iteration).
// CONTROL_PORT speaks the line protocol of peers/_control.py, so the harness
// publishes here in-process exactly as it does into the Python peers:
//   P COUNT START NROOMS BODY [T]  ->  K      C  ->  {"joined":N}
"use strict";

const port = Number(process.argv[2]);
const controlPort = Number(process.argv[3]);
const bodies = new Map();
let joined = 0;

const server = Bun.serve({
  hostname: "127.0.0.1",
  port,
  fetch(req, srv) {
    const path = new URL(req.url).pathname;
    const room = path.slice(path.lastIndexOf("/") + 1);
    if (srv.upgrade(req, { data: { room } })) return undefined;
    return new Response("websocket only", { status: 400 });
  },
  websocket: {
    perMessageDeflate: false,
    // The harness's flow control bounds what is in flight; Bun's default
    // 16 MB backpressure limit is never the thing measured.
    open(ws) {
      ws.subscribe(ws.data.room);
      joined++;
      ws.send('{"ok":true}');
    },
    message() {},
    close(ws) {
      joined--;
    },
  },
});

// The timestamp arrives as a decimal string of ns and is pasted in as text:
// a JS number cannot hold ns since the epoch exactly.
function nowNs() {
  return String(BigInt(Math.round((performance.timeOrigin + performance.now()) * 1000)) * 1000n);
}

function command(socket, line) {
  const parts = line.split(" ");
  if (parts[0] === "P") {
    const count = Number(parts[1]);
    const start = Number(parts[2]);
    const nrooms = Number(parts[3]);
    const size = Number(parts[4]);
    const stamp = parts[5] || nowNs();
    let body = bodies.get(size);
    if (body === undefined) bodies.set(size, (body = "x".repeat(size)));
    for (let j = 0; j < count; j++) {
      const i = start + j;
      server.publish(`o${i % nrooms}`, `{"t":${stamp},"i":${i},"body":"${body}"}`);
    }
    socket.write("K\n");
  } else if (parts[0] === "C") {
    socket.write(`{"joined":${joined}}\n`);
  }
}

Bun.listen({
  hostname: "127.0.0.1",
  port: controlPort,
  socket: {
    open(socket) {
      socket.data = { rest: "" };
    },
    data(socket, chunk) {
      const text = socket.data.rest + chunk.toString();
      const lines = text.split("\n");
      socket.data.rest = lines.pop();
      for (const line of lines) if (line) command(socket, line);
    },
  },
});

console.log("ready");
