// A fast stand-in for the AI Tutor workflow API (CONTRACT Part A), for benchmarks only.
//
// It must never be the bottleneck, so it is a bare Node.js http server with no dependencies:
//   GET  /api/v1/token?ttl=N                  Bearer API key -> {"success": true, "token", "ttl"}
//   POST /api/v1/run/{id}/stream?token=T      single-use token -> text/plain, streamed
// The stream's shape comes from the request's own inputs, so every target relays the same request:
//   {"topic": "...", "chunks": "100", "delay_ms": "50", "size": "24", "trace": "1"}
// Chunk i is `[topic:i]é` padded with dots to `size` bytes (bench/load.py builds the same bytes).
// The first chunk is written at once; chunk i is due `i * delay_ms` after it, on a drift-free clock.
//
// Bench-only routes, for the harness:
//   POST /_bench/tokens?n=N   N fresh tokens (direct and nginx clients hold a token, like a browser)
//   GET  /_bench/stats        counters: connections accepted, requests, mints, streams, chunks
//   GET  /_bench/records      per stream: when the request arrived and when each chunk was written;
//                             per mint carrying an X-Request-ID: when it arrived
//   POST /_bench/reset        zero the counters and records (tokens stay valid)
// Times are CLOCK_MONOTONIC microseconds, the clock Python's time.monotonic() reads.
//
// Usage: node bench/upstream.mjs --api-key KEY [--port 0] [--rtt-ms 0]
// Prints one JSON line {"listening": PORT} once it accepts connections.

import http from "node:http";
import { randomBytes } from "node:crypto";
import { performance } from "node:perf_hooks";

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, arg, index, all) => {
    if (arg.startsWith("--")) pairs.push([arg.slice(2), all[index + 1]]);
    return pairs;
  }, []),
);
const API_KEY = args["api-key"];
const PORT = Number(args.port ?? 0);
// Emulated network round trip, added before a mint answers and before a stream's first byte.
const RTT_MS = Number(args["rtt-ms"] ?? 0);
if (!API_KEY) {
  console.error("--api-key is required");
  process.exit(2);
}

// performance.now() runs on libuv's hrtime (CLOCK_MONOTONIC); this offset turns it into the
// absolute monotonic clock other processes on the machine read.
const OFFSET_MS = Number(process.hrtime.bigint()) / 1e6 - performance.now();
const nowUs = () => Math.round((performance.now() + OFFSET_MS) * 1000);

const tokens = new Map(); // token -> expiry (ms, Date.now())
let stats = freshStats();
let records = [];

function freshStats() {
  return { connections: 0, requests: 0, mints: 0, streams: 0, chunks: 0, refused: 0, active: 0 };
}

function mintToken(ttl) {
  const token = "pub_tok_" + randomBytes(12).toString("base64url");
  tokens.set(token, Date.now() + ttl * 1000);
  return token;
}

function chunkBytes(topic, index, size) {
  const base = Buffer.from(`[${topic}:${index}]é`, "utf8");
  if (base.length >= size) return base;
  return Buffer.concat([base, Buffer.alloc(size - base.length, ".")]);
}

function json(res, status, body, headers = {}) {
  const payload = JSON.stringify(body);
  res.writeHead(status, {
    "Content-Type": "application/json",
    "Content-Length": Buffer.byteLength(payload),
    ...headers,
  });
  res.end(payload);
}

function readBody(req, done) {
  const parts = [];
  req.on("data", (part) => parts.push(part));
  req.on("end", () => done(Buffer.concat(parts)));
}

function later(ms, fn) {
  if (ms > 0) setTimeout(fn, ms);
  else fn();
}

function mint(req, res, url, received) {
  stats.mints++;
  const rid = req.headers["x-request-id"];
  if (rid !== undefined) records.push({ kind: "mint", rid, received });
  if (req.headers.authorization !== `Bearer ${API_KEY}`) {
    stats.refused++;
    return json(res, 401, { success: false, error: "Invalid or missing API key" });
  }
  const ttl = Number(url.searchParams.get("ttl") ?? 60);
  if (!Number.isInteger(ttl) || ttl < 1 || ttl > 300) {
    return json(res, 400, { success: false, error: "ttl must be 1 to 300" });
  }
  const token = mintToken(ttl);
  later(RTT_MS, () =>
    json(res, 200, { success: true, token, ttl }, {
      "x-ratelimit-limit": "1000000",
      "x-ratelimit-remaining": "999999",
    }),
  );
}

function stream(req, res, url, received) {
  stats.streams++;
  const token = url.searchParams.get("token") ?? "";
  const expiry = tokens.get(token);
  tokens.delete(token); // single use, even when the request is refused below
  readBody(req, (raw) => {
    if (expiry === undefined || expiry < Date.now()) {
      stats.refused++;
      return json(res, 401, { success: false, error: "Invalid or expired token" });
    }
    let inputs;
    try {
      inputs = JSON.parse(raw.toString("utf8"));
    } catch {
      return json(res, 400, { success: false, error: "Body is not JSON" });
    }
    const topic = String(inputs.topic ?? "");
    const count = Math.min(Math.max(parseInt(inputs.chunks ?? "1", 10) || 1, 1), 100000);
    const delayMs = Math.max(Number(inputs.delay_ms ?? 0) || 0, 0);
    const size = Math.min(Math.max(parseInt(inputs.size ?? "24", 10) || 24, 1), 65536);
    const record = {
      kind: "stream",
      topic,
      rid: req.headers["x-request-id"] ?? null,
      received,
      writes: inputs.trace === "1" ? [] : null,
    };
    records.push(record);
    stats.active++;
    let index = 0;
    let start = 0;
    let timer = null;
    let finished = false;
    const finish = () => {
      if (!finished) {
        finished = true;
        stats.active--;
      }
    };
    res.on("close", () => {
      if (timer !== null) clearTimeout(timer);
      finish();
    });
    res.writeHead(200, { "Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-cache" });
    const next = () => {
      timer = null;
      if (res.destroyed) return finish();
      const bytes = chunkBytes(topic, index, size);
      if (record.writes !== null) record.writes.push(nowUs());
      stats.chunks++;
      index++;
      if (index >= count) {
        res.end(bytes);
        return finish();
      }
      res.write(bytes);
      if (delayMs <= 0) return setImmediate(next);
      timer = setTimeout(next, Math.max(start + index * delayMs - performance.now(), 0));
    };
    later(RTT_MS, () => {
      start = performance.now();
      next();
    });
  });
}

function bench(req, res, url) {
  if (req.method === "POST" && url.pathname === "/_bench/tokens") {
    const n = Math.min(Number(url.searchParams.get("n") ?? 1), 100000);
    return json(res, 200, Array.from({ length: n }, () => mintToken(300)));
  }
  if (url.pathname === "/_bench/stats") return json(res, 200, { ...stats, tokens: tokens.size });
  if (url.pathname === "/_bench/records") return json(res, 200, records);
  if (req.method === "POST" && url.pathname === "/_bench/reset") {
    stats = { ...freshStats(), active: stats.active };
    records = [];
    const now = Date.now();
    for (const [token, expiry] of tokens) if (expiry < now) tokens.delete(token);
    return json(res, 200, { ok: true });
  }
  return json(res, 404, { success: false, error: "Not found" });
}

const STREAM_PATH = /^\/api\/v1\/run\/[^/]+\/stream$/;

const server = http.createServer({ noDelay: true, keepAlive: true }, (req, res) => {
  const received = nowUs();
  const url = new URL(req.url, "http://upstream");
  if (url.pathname.startsWith("/_bench/")) return readBody(req, () => bench(req, res, url));
  stats.requests++;
  if (req.method === "GET" && url.pathname === "/api/v1/token") return readBody(req, () => mint(req, res, url, received));
  if (req.method === "POST" && STREAM_PATH.test(url.pathname)) return stream(req, res, url, received);
  readBody(req, () => json(res, 404, { success: false, error: { message: "Not found", code: "not_found" } }));
});
// Keep idle keep-alive connections much longer than any client's pool does, so the count of
// accepted connections measures the clients' connection reuse, not this server's timeouts.
server.keepAliveTimeout = 300_000;
server.headersTimeout = 310_000;
server.requestTimeout = 0;
server.on("connection", (socket) => {
  stats.connections++;
  socket.setNoDelay(true);
});
server.listen({ host: "127.0.0.1", port: PORT, backlog: 4096 }, () => {
  console.log(JSON.stringify({ listening: server.address().port }));
});
for (const signal of ["SIGTERM", "SIGINT"]) process.on(signal, () => process.exit(0));
