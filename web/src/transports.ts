// The four ways to carry one parley session (docs/PROTOCOL.md, "One session, three
// transports", and "/wt"). Each transport only opens, frames and closes; the client (parley.ts)
// owns the session, reconnects and delivery. A transport:
//
// - `open()` connects and sends `connect` (token, and session id + position to resume).
//   It resolves with the `connected` frame, or rejects: the transport failed *before
//   opening* and the client moves on to the next one at once.
// - after that, hands every server frame to `hooks.frame` (pushes, and for WebSocket the
//   replies too), and calls `hooks.closed` exactly once when it is dead: closed by the
//   server, dropped, or silent for longer than its heartbeat bound.
// - `request()` runs one command and resolves with its reply frame.

import type { CertificateHash } from "./parley.js";
import { clientFrame, decodeServer, encodeClient, type Command, type Encoding, type Frame } from "./codec.js";

type ServerFrame = Frame;
type ClientFrame = Frame;
const serverFromJson = (json: unknown): Frame => json as Frame;

export type TransportName = "websocket" | "sse" | "poll" | "webtransport";

export interface ConnectArgs {
  token: string;
  sessionId: string;
  lastPos: number;
}

export interface Closed {
  /** The `disconnect` code (or WebSocket close code) when the server said why. */
  code?: number;
  reason: string;
  /** False when the server said not to reconnect (e.g. 4001 unauthorized). */
  reconnect: boolean;
}

export interface Hooks {
  /** The `connected` reply, handled synchronously before any push that follows it. */
  connected(frame: ServerFrame, transport: Transport): void;
  frame(frame: ServerFrame, transport: Transport): void;
  closed(why: Closed, transport: Transport): void;
  /** A heartbeat ping was answered after `ms` (framed transports). */
  rtt?(ms: number, transport: Transport): void;
  /** A heartbeat ping got no answer within pongTimeoutMs. */
  lost?(transport: Transport): void;
}

export interface Timing {
  /** Fail-before-open bound: no `connected` within this time moves to the next transport. */
  connectTimeoutMs: number;
  /** WebSocket: client ping interval (0 = the server's heartbeatMs). */
  pingIntervalMs: number;
  /** Extra silence allowed past the heartbeat interval before a connection is dead. */
  pongTimeoutMs: number;
  /** Long-poll hold, in seconds. */
  pollWaitSeconds: number;
}

/** A failure before the transport opened (or of a request): carries the server error. */
export class TransportError extends Error {
  constructor(
    message: string,
    readonly code?: string,
    readonly status?: number,
  ) {
    super(message);
    this.name = "TransportError";
  }
}

export interface Transport {
  readonly name: TransportName;
  readonly encoding: Encoding;
  open(args: ConnectArgs): Promise<ServerFrame>;
  request(id: number, cmd: Command): Promise<ServerFrame>;
  /** Sends a command that has no reply (ack); best effort. */
  post(cmd: Command): void;
  /** Checks liveness now (after the page becomes visible): a ping with a short bound. */
  checkAlive(): void;
  /** Closes without calling `hooks.closed`. */
  close(): void;
  /** Ends the session on the server (`end`, best effort), then closes. */
  end(): void;
  /** The token for requests from now on (HTTP transports send it with each). */
  setToken(token: string): void;
}

const CONNECT_ID = 1;

function errorOf(frame: ServerFrame): TransportError | undefined {
  if (!frame.error) return undefined;
  const code = errorCodeName(frame.error.code ?? 0);
  return new TransportError(frame.error.message || code, code);
}

/** The wire name of an error code ("ERROR_CODE_NOT_MEMBER"). */
export function errorCodeName(code: number | string): string {
  return typeof code === "string" ? code : (ERROR_CODES[code] ?? `ERROR_CODE_${code}`);
}

const ERROR_CODES = [
  "ERROR_CODE_UNSPECIFIED",
  "ERROR_CODE_BAD_FRAME",
  "ERROR_CODE_UNKNOWN_COMMAND",
  "ERROR_CODE_NOT_CONNECTED",
  "ERROR_CODE_ALREADY_CONNECTED",
  "ERROR_CODE_UNAUTHORIZED",
  "ERROR_CODE_TOKEN_EXPIRED",
  "ERROR_CODE_INVALID_ARGUMENT",
  "ERROR_CODE_NOT_MEMBER",
  "ERROR_CODE_FRAME_TOO_LARGE",
  "ERROR_CODE_AUTH_TIMEOUT",
  "ERROR_CODE_INTERNAL",
  "ERROR_CODE_SLOW_CONSUMER",
  "ERROR_CODE_FORBIDDEN",
  "ERROR_CODE_NOT_FOUND",
  "ERROR_CODE_ROOM_EXISTS",
  "ERROR_CODE_RATE_LIMITED",
  "ERROR_CODE_USER_OFFLINE",
  "ERROR_CODE_SESSION_NOT_FOUND",
  "ERROR_CODE_FILE_TOO_LARGE",
  "ERROR_CODE_QUOTA_EXCEEDED",
  "ERROR_CODE_RANGE_NOT_SATISFIABLE",
  "ERROR_CODE_LIMIT_EXCEEDED",
];

function connectCmd(a: ConnectArgs): Command {
  const connect: Command = { token: a.token };
  if (a.sessionId) Object.assign(connect, { sessionId: a.sessionId, lastPos: String(a.lastPos) });
  return { connect };
}

/** Watches for silence: calls `dead` when nothing was heard for `limitMs`. */
class Watchdog {
  private lastHeard = Date.now();
  private timer: ReturnType<typeof setInterval> | undefined;
  constructor(
    private limitMs: number,
    private dead: () => void,
  ) {}
  start(): void {
    this.lastHeard = Date.now();
    this.stop();
    const every = Math.max(100, Math.min(1000, this.limitMs / 4));
    this.timer = setInterval(() => {
      if (Date.now() - this.lastHeard > this.limitMs) this.dead();
    }, every);
  }
  heard(): void {
    this.lastHeard = Date.now();
  }
  silentForMs(): number {
    return Date.now() - this.lastHeard;
  }
  stop(): void {
    if (this.timer !== undefined) clearInterval(this.timer);
    this.timer = undefined;
  }
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string, onTimeout: () => void): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const t = setTimeout(() => {
      onTimeout();
      reject(new TransportError(`${what}: no answer within ${ms} ms`));
    }, ms);
    p.then(
      (v) => {
        clearTimeout(t);
        resolve(v);
      },
      (e) => {
        clearTimeout(t);
        reject(e);
      },
    );
  });
}

// ---------------------------------------------------------------- framed: WebSocket and WebTransport

/**
 * A full-duplex connection that carries whole frames both ways (a WebSocket, or the one
 * bidirectional stream of a WebTransport session): the `connect` handshake, replies
 * matched to requests by id, client pings with a silence watchdog, and the close. The
 * subclass only dials, writes and closes its wire.
 */
abstract class FramedTransport implements Transport {
  abstract readonly name: TransportName;
  protected pending = new Map<number, { resolve: (f: ServerFrame) => void; reject: (e: Error) => void }>();
  protected done = false;
  protected opened = false;
  private disconnect: Closed | undefined;
  private watchdog: Watchdog | undefined;
  private pinger: ReturnType<typeof setInterval> | undefined;
  // Heartbeat ids, far above the client's request ids (which count up from 2); ids are uint64.
  private pingId = 2_000_000_000;
  /** Heartbeat pings in flight: id → sent at (ms), for the round trip. */
  private pings = new Map<number, number>();
  private openWaiter: { resolve: (f: ServerFrame) => void; reject: (e: Error) => void } | undefined;

  constructor(
    readonly encoding: Encoding,
    protected hooks: Hooks,
    protected timing: Timing,
  ) {}

  /** Starts the connection; calls `wireOpen` once it can carry frames, and `received`/`wireClosed`. */
  protected abstract dial(): void;
  /** Writes one frame; false when the wire is not open. */
  protected abstract writeWire(frame: ClientFrame): boolean;
  /** Closes the wire (no callbacks after this). */
  protected abstract closeWire(code: number): void;

  open(args: ConnectArgs): Promise<ServerFrame> {
    return withTimeout(
      new Promise<ServerFrame>((resolve, reject) => {
        this.openWaiter = { resolve, reject };
        this.connectArgs = args;
        try {
          this.dial();
        } catch (e) {
          this.openWaiter = undefined;
          reject(new TransportError(`${this.name}: ${String(e)}`));
        }
      }),
      this.timing.connectTimeoutMs,
      `${this.name} connect`,
      () => this.close(),
    );
  }

  private connectArgs: ConnectArgs | undefined;

  /** The wire is up: send `connect`. */
  protected wireOpen(): void {
    if (this.connectArgs) this.writeWire(clientFrame(CONNECT_ID, connectCmd(this.connectArgs)));
  }

  /** A failure before `connected` (the dial failed). */
  protected wireFailed(message: string): void {
    this.done = true;
    const w = this.openWaiter;
    this.openWaiter = undefined;
    w?.reject(new TransportError(message));
  }

  protected received(frame: ServerFrame): void {
    this.watchdog?.heard();
    if (!this.opened) {
      const w = this.openWaiter;
      if (!w || Number(frame.id ?? 0) !== CONNECT_ID || frame.pos) return;
      this.openWaiter = undefined;
      const err = errorOf(frame);
      if (err || !frame.connected) {
        this.close();
        w.reject(err ?? new TransportError(`${this.name}: unexpected reply to connect`));
        return;
      }
      this.opened = true;
      this.startHeartbeat(frame.connected.heartbeatMs ?? 0);
      this.hooks.connected(frame, this);
      w.resolve(frame);
      return;
    }
    if (frame.disconnect) {
      const d = frame.disconnect;
      this.disconnect = { code: d.code, reason: d.reason ?? "", reconnect: !!d.reconnect };
    }
    if (!frame.pos && frame.id) {
      const id = Number(frame.id);
      const sent = this.pings.get(id);
      if (sent !== undefined) {
        this.pings.delete(id);
        this.hooks.rtt?.(Date.now() - sent, this);
        return;
      }
      const p = this.pending.get(id);
      if (p) {
        this.pending.delete(id);
        p.resolve(frame);
      }
      return; // replies nobody waits for
    }
    this.hooks.frame(frame, this);
  }

  /** The wire closed (by the server, or it broke). */
  protected wireClosed(code: number | undefined, reason: string): void {
    if (!this.opened) {
      this.wireFailed(`${this.name} closed before connected${code !== undefined ? ` (${code})` : ""}${reason ? `: ${reason}` : ""}`);
      return;
    }
    this.finish(this.disconnect ?? { code, reason: reason || "closed", reconnect: true });
  }

  private startHeartbeat(serverHeartbeatMs: number): void {
    const interval = this.timing.pingIntervalMs || serverHeartbeatMs || 25_000;
    this.watchdog = new Watchdog(interval + this.timing.pongTimeoutMs, () =>
      this.finish({ reason: "heartbeat timeout: server silent", reconnect: true }),
    );
    this.watchdog.start();
    this.pinger = setInterval(() => this.ping(), interval);
  }

  private ping(): void {
    const id = this.pingId++;
    // A ping still unanswered when the next one goes out was lost (or is very late).
    for (const [old, at] of this.pings) {
      if (Date.now() - at > this.timing.pongTimeoutMs) {
        this.pings.delete(old);
        this.hooks.lost?.(this);
      }
    }
    if (this.writeWire(clientFrame(id, { ping: {} }))) this.pings.set(id, Date.now());
  }

  checkAlive(): void {
    if (!this.opened || this.done || !this.watchdog) return;
    // Anything heard recently proves life; otherwise ping and allow pongTimeout.
    if (this.watchdog.silentForMs() < 1000) return;
    const before = Date.now();
    this.ping();
    setTimeout(() => {
      if (!this.done && this.watchdog && this.watchdog.silentForMs() >= Date.now() - before)
        this.finish({ reason: "heartbeat timeout after wake-up", reconnect: true });
    }, this.timing.pongTimeoutMs);
  }

  request(id: number, cmd: Command): Promise<ServerFrame> {
    return new Promise((resolve, reject) => {
      if (this.done || !this.writeWire(clientFrame(id, cmd))) {
        reject(new TransportError(`${this.name} not open`));
        return;
      }
      this.pending.set(id, { resolve, reject });
    });
  }

  post(cmd: Command): void {
    this.writeWire(clientFrame(0, cmd));
  }

  private finish(why: Closed): void {
    if (this.done) return;
    this.cleanup();
    this.hooks.closed(why, this);
  }

  private cleanup(code = 4000): void {
    this.done = true;
    this.watchdog?.stop();
    if (this.pinger !== undefined) clearInterval(this.pinger);
    // 4000: the client is leaving this connection but may resume the session.
    this.closeWire(code);
    for (const p of this.pending.values()) p.reject(new TransportError(`${this.name} closed`));
    this.pending.clear();
    const w = this.openWaiter;
    this.openWaiter = undefined;
    w?.reject(new TransportError(`${this.name} closed`));
  }

  close(): void {
    if (!this.done) this.cleanup();
  }

  end(): void {
    if (this.done) return;
    // The server answers `done` and closes; closing with 1000 ourselves right after ends
    // the session too, should the frame be lost.
    this.writeWire(clientFrame(this.pingId++, { end: {} }));
    this.cleanup(1000);
  }

  setToken(): void {}
}

export class WebSocketTransport extends FramedTransport {
  readonly name = "websocket";
  private ws: WebSocket | undefined;

  constructor(
    private url: string,
    encoding: Encoding,
    hooks: Hooks,
    timing: Timing,
  ) {
    super(encoding, hooks, timing);
  }

  protected dial(): void {
    const ws = new WebSocket(this.url, this.encoding === "proto" ? "parley.v1.proto" : "parley.v1.json");
    this.ws = ws;
    ws.binaryType = "arraybuffer";
    ws.onopen = () => this.wireOpen();
    ws.onmessage = (ev) => {
      let frame: ServerFrame;
      try {
        frame = decodeServer(ev.data as string | ArrayBuffer);
      } catch {
        return; // not a frame: ignore
      }
      this.received(frame);
    };
    ws.onclose = (ev) => this.wireClosed(ev.code, ev.reason);
    ws.onerror = () => {
      // A close event follows; nothing to do here.
    };
  }

  protected writeWire(frame: ClientFrame): boolean {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(encodeClient(this.encoding, frame) as string);
    return true;
  }

  protected closeWire(code: number): void {
    const ws = this.ws;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      if (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING) ws.close(code);
    } catch {
      /* already closing */
    }
  }
}

// The parts of the WebTransport API the SDK uses (lib.dom has it only in newer versions).
interface WebTransportLike {
  ready: Promise<unknown>;
  closed: Promise<{ closeCode?: number; reason?: string } | undefined>;
  createBidirectionalStream(): Promise<{ readable: ReadableStream<Uint8Array>; writable: WritableStream<Uint8Array> }>;
  close(info?: { closeCode?: number; reason?: string }): void;
}
type WebTransportCtor = new (url: string, options?: { serverCertificateHashes?: CertificateHash[] }) => WebTransportLike;

/** The browser's WebTransport constructor, where it has one. */
export function webTransportCtor(): WebTransportCtor | undefined {
  const c = (globalThis as { WebTransport?: WebTransportCtor }).WebTransport;
  return typeof c === "function" ? c : undefined;
}

/** A varint length, then the frame (docs/PROTOCOL.md, "/wt"). */
function lengthPrefixed(body: Uint8Array): Uint8Array {
  const head: number[] = [];
  let n = body.length;
  while (n >= 0x80) {
    head.push((n & 0x7f) | 0x80);
    n = Math.floor(n / 128);
  }
  head.push(n);
  const out = new Uint8Array(head.length + body.length);
  out.set(head, 0);
  out.set(body, head.length);
  return out;
}

/** Frames bigger than this end the connection (the server's own bound is lower). */
const MAX_WT_FRAME = 16 << 20;

/**
 * WebTransport (HTTP/3 over QUIC) at `/wt`: one bidirectional stream carries the frames
 * of `/ws`, each a varint length and the frame (protobuf, or UTF-8 JSON with
 * `?enc=json`). The certificate is checked by the browser as for any HTTPS page,
 * or against `serverCertificateHashes` (a self-signed ECDSA certificate valid ≤ 14 days).
 */
export class WebTransportTransport extends FramedTransport {
  readonly name = "webtransport";
  private wt: WebTransportLike | undefined;
  private writer: WritableStreamDefaultWriter<Uint8Array> | undefined;
  private reader: ReadableStreamDefaultReader<Uint8Array> | undefined;
  private utf8 = new TextEncoder();

  constructor(
    private url: string,
    encoding: Encoding,
    hooks: Hooks,
    timing: Timing,
    private certificateHashes: CertificateHash[] | undefined,
  ) {
    super(encoding, hooks, timing);
  }

  protected dial(): void {
    const Ctor = webTransportCtor();
    if (!Ctor) throw new TransportError("webtransport: not supported by this browser");
    const url = this.encoding === "json" ? `${this.url}?enc=json` : this.url;
    const wt = new Ctor(url, this.certificateHashes?.length ? { serverCertificateHashes: this.certificateHashes } : {});
    this.wt = wt;
    wt.closed.then(
      (info) => this.wt === wt && !this.done && this.wireClosed(info?.closeCode, info?.reason ?? "session closed"),
      (e) => this.wt === wt && !this.done && this.wireClosed(undefined, String(e?.message ?? e)),
    );
    (async () => {
      await wt.ready;
      const stream = await wt.createBidirectionalStream();
      if (this.done) return;
      this.writer = stream.writable.getWriter();
      this.reader = stream.readable.getReader();
      this.wireOpen();
      await this.readLoop(this.reader);
    })().catch((e) => {
      if (this.done) return;
      if (!this.opened) this.wireFailed(`webtransport: ${String(e?.message ?? e)}`);
      else this.wireClosed(undefined, `webtransport: ${String(e?.message ?? e)}`);
    });
  }

  private async readLoop(reader: ReadableStreamDefaultReader<Uint8Array>): Promise<void> {
    let buf = new Uint8Array(0);
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done || this.done) break;
      if (!value?.length) continue;
      const joined = new Uint8Array(buf.length + value.length);
      joined.set(buf, 0);
      joined.set(value, buf.length);
      buf = joined;
      let at = 0;
      for (;;) {
        // A varint length (at most 5 bytes here), then that many bytes.
        let len = 0;
        let shift = 0;
        let i = at;
        let complete = false;
        while (i < buf.length && shift <= 28) {
          const b = buf[i++]!;
          len += (b & 0x7f) * 2 ** shift;
          shift += 7;
          if (b < 0x80) {
            complete = true;
            break;
          }
        }
        if (!complete) {
          if (shift > 28) throw new TransportError("webtransport: bad frame length");
          break;
        }
        if (len > MAX_WT_FRAME) throw new TransportError("webtransport: frame too large");
        if (buf.length - i < len) break;
        const body = buf.subarray(i, i + len);
        at = i + len;
        let frame: ServerFrame | undefined;
        try {
          frame = this.encoding === "json" ? decodeServer(decoder.decode(body)) : decodeServer(body.slice());
        } catch {
          frame = undefined; // not a frame: ignore
        }
        if (frame) this.received(frame);
        if (this.done) return;
      }
      buf = buf.slice(at);
    }
    if (!this.done) this.wireClosed(undefined, "stream ended");
  }

  protected writeWire(frame: ClientFrame): boolean {
    const w = this.writer;
    if (!w || this.done) return false;
    const encoded = encodeClient(this.encoding, frame);
    const bytes = typeof encoded === "string" ? this.utf8.encode(encoded) : encoded;
    w.write(lengthPrefixed(bytes)).catch(() => {
      /* the close is seen by the reader / `closed` */
    });
    return true;
  }

  protected closeWire(code: number): void {
    const wt = this.wt;
    this.wt = undefined;
    if (!wt) return;
    const writer = this.writer;
    this.writer = undefined;
    this.reader?.cancel().catch(() => {});
    const shut = () => {
      try {
        wt.close({ closeCode: code, reason: "" });
      } catch {
        /* already closed */
      }
    };
    // Finishing the stream ends the session on the server (like a WebSocket close
    // frame): only for `end` (1000), after its frame went out. Otherwise (4000) the
    // session is left to be resumed: close the connection only.
    if (writer && code === 1000) writer.close().then(shut, shut);
    else shut();
  }
}

// ---------------------------------------------------------------- HTTP (SSE and long-poll)

/** Commands over HTTP: `POST /session/{id}`, the reply in the response. */
abstract class HttpTransport implements Transport {
  abstract readonly name: TransportName;
  readonly encoding: Encoding = "json";
  protected sessionId = "";
  protected token = "";
  protected done = false;
  protected opened = false;
  protected abort = new AbortController();

  constructor(
    protected base: string,
    protected hooks: Hooks,
    protected timing: Timing,
  ) {}

  abstract open(args: ConnectArgs): Promise<ServerFrame>;
  checkAlive(): void {}

  protected headers(): Record<string, string> {
    return { authorization: `Bearer ${this.token}`, "content-type": "application/json" };
  }

  async request(id: number, cmd: Command): Promise<ServerFrame> {
    if (this.done) throw new TransportError(`${this.name} closed`);
    const body = encodeClient("json", clientFrame(id, cmd)) as string;
    const timeout = new AbortController();
    const timer = setTimeout(() => timeout.abort(), this.timing.connectTimeoutMs + this.timing.pongTimeoutMs);
    let r: Response;
    try {
      r = await fetch(`${this.base}/session/${encodeURIComponent(this.sessionId)}`, {
        method: "POST",
        headers: this.headers(),
        body,
        signal: anySignal(this.abort.signal, timeout.signal),
        cache: "no-store",
      });
    } catch (e) {
      this.fail(`${this.name}: command failed: ${String(e)}`);
      throw new TransportError(`${this.name}: ${String(e)}`);
    } finally {
      clearTimeout(timer);
    }
    if (r.status === 204) return clientReply(id);
    const text = await r.text();
    if (r.status === 410) {
      this.fail("session gone", 4011);
      throw new TransportError("session gone", "ERROR_CODE_SESSION_NOT_FOUND", 410);
    }
    try {
      return serverFromJson(JSON.parse(text));
    } catch {
      throw new TransportError(`${this.name}: bad reply (HTTP ${r.status})`, undefined, r.status);
    }
  }

  post(cmd: Command): void {
    this.request(0, cmd).catch(() => {});
  }

  setToken(token: string): void {
    this.token = token;
  }

  end(): void {
    if (this.done || !this.sessionId) return this.close();
    // Not tied to this transport's abort signal (closed right after), and `keepalive`
    // so that it still goes out while the page unloads.
    const url = `${this.base}/session/${encodeURIComponent(this.sessionId)}`;
    fetch(url, { method: "POST", headers: this.headers(), body: JSON.stringify({ id: "1", end: {} }), keepalive: true, cache: "no-store" }).catch(
      () => {},
    );
    this.close();
  }

  protected fail(reason: string, code?: number, reconnect = true): void {
    if (this.done || !this.opened) return;
    this.close();
    this.hooks.closed({ reason, code, reconnect }, this);
  }

  close(): void {
    this.done = true;
    this.abort.abort();
  }
}

function clientReply(id: number): ServerFrame {
  return serverFromJson({ id: String(id), done: {} });
}

function anySignal(a: AbortSignal, b: AbortSignal): AbortSignal {
  const c = new AbortController();
  const on = () => c.abort();
  if (a.aborted || b.aborted) c.abort();
  a.addEventListener("abort", on, { once: true });
  b.addEventListener("abort", on, { once: true });
  return c.signal;
}

async function refusal(r: Response, what: string): Promise<TransportError> {
  let code: string | undefined;
  let message = `${what}: HTTP ${r.status}`;
  try {
    const e = JSON.parse(await r.text());
    code = e.code;
    if (e.message) message = `${what}: ${e.message}`;
  } catch {
    /* not JSON */
  }
  return new TransportError(message, code, r.status);
}

/**
 * Server-Sent Events read with `fetch` and a stream reader rather than `EventSource`: the
 * token travels in the Authorization header (no ticket in the URL), the client sees the
 * server's `: ping` comments (so a silent stream is detected as dead), and reconnects are
 * the client's (backoff, paused while hidden) instead of the browser's fixed retry.
 */
export class SseTransport extends HttpTransport {
  readonly name = "sse";
  private watchdog: Watchdog | undefined;

  open(args: ConnectArgs): Promise<ServerFrame> {
    this.token = args.token;
    const q = new URLSearchParams();
    if (args.sessionId) {
      q.set("session_id", args.sessionId);
      q.set("last_pos", String(args.lastPos));
    }
    return withTimeout(this.stream(q), this.timing.connectTimeoutMs, "sse connect", () => this.close());
  }

  private stream(q: URLSearchParams): Promise<ServerFrame> {
    return new Promise<ServerFrame>((resolve, reject) => {
      const run = async () => {
        const r = await fetch(`${this.base}/sse?${q}`, {
          headers: { authorization: `Bearer ${this.token}`, accept: "text/event-stream" },
          signal: this.abort.signal,
          cache: "no-store",
        });
        if (!r.ok || !r.body) throw await refusal(r, "sse");
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        let data: string[] = [];
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          this.watchdog?.heard();
          buf += value;
          let nl: number;
          while ((nl = buf.indexOf("\n")) >= 0) {
            let line = buf.slice(0, nl);
            buf = buf.slice(nl + 1);
            if (line.endsWith("\r")) line = line.slice(0, -1);
            if (line === "") {
              if (data.length) this.event(data.join("\n"), resolve, reject);
              data = [];
            } else if (line.startsWith("data:")) {
              data.push(line.slice(line[5] === " " ? 6 : 5));
            }
            // `id:`, `retry:` and `: comments` need nothing: positions are in the frames,
            // and any bytes at all (comments included) fed the watchdog above.
          }
        }
        throw new TransportError("sse stream ended");
      };
      run().catch((e) => {
        if (!this.opened) reject(e instanceof TransportError ? e : new TransportError(`sse: ${String(e)}`));
        else this.fail(this.lastDisconnect?.reason ?? `sse: ${String(e)}`, this.lastDisconnect?.code, this.lastDisconnect?.reconnect ?? true);
      });
    });
  }

  private lastDisconnect: Closed | undefined;

  private event(data: string, resolve: (f: ServerFrame) => void, reject: (e: Error) => void): void {
    let frame: ServerFrame;
    try {
      frame = serverFromJson(JSON.parse(data));
    } catch {
      return;
    }
    if (!this.opened) {
      const err = errorOf(frame);
      if (err || !frame.connected) {
        this.close();
        reject(err ?? new TransportError("sse: stream did not start with connected"));
        return;
      }
      this.opened = true;
      this.sessionId = frame.connected.sessionId;
      const hb = frame.connected.heartbeatMs || 15_000;
      this.watchdog = new Watchdog(hb + this.timing.pongTimeoutMs, () =>
        this.fail("heartbeat timeout: stream silent"),
      );
      this.watchdog.start();
      this.hooks.connected(frame, this);
      resolve(frame);
      return;
    }
    if (frame.disconnect) {
      const d = frame.disconnect;
      this.lastDisconnect = { code: d.code, reason: d.reason ?? "", reconnect: !!d.reconnect };
    }
    this.hooks.frame(frame, this);
  }

  close(): void {
    this.watchdog?.stop();
    super.close();
  }
}

/** Long-poll: `POST /session` opens or resumes, then `GET /poll` in a loop. */
export class PollTransport extends HttpTransport {
  readonly name = "poll";
  private cursor = 0;

  async open(args: ConnectArgs): Promise<ServerFrame> {
    this.token = args.token;
    const timeout = new AbortController();
    const frame = await withTimeout(
      (async () => {
        const r = await fetch(`${this.base}/session`, {
          method: "POST",
          headers: this.headers(),
          body: encodeClient("json", clientFrame(CONNECT_ID, connectCmd(args))) as string,
          signal: anySignal(this.abort.signal, timeout.signal),
          cache: "no-store",
        });
        if (!r.ok) throw await refusal(r, "poll");
        return serverFromJson(await r.json());
      })(),
      this.timing.connectTimeoutMs,
      "poll connect",
      () => timeout.abort(),
    ).catch((e) => {
      throw e instanceof TransportError ? e : new TransportError(`poll: ${String(e)}`);
    });
    const err = errorOf(frame);
    if (err || !frame.connected) throw err ?? new TransportError("poll: unexpected reply");
    this.opened = true;
    this.sessionId = frame.connected.sessionId;
    this.cursor = frame.connected.resumed ? args.lastPos : 0;
    this.hooks.connected(frame, this);
    queueMicrotask(() => this.loop());
    return frame;
  }

  private async loop(): Promise<void> {
    const wait = this.timing.pollWaitSeconds;
    while (!this.done) {
      const timeout = new AbortController();
      const timer = setTimeout(() => timeout.abort(), wait * 1000 + this.timing.pongTimeoutMs);
      try {
        const q = new URLSearchParams({ session_id: this.sessionId, cursor: String(this.cursor), wait: String(wait) });
        const r = await fetch(`${this.base}/poll?${q}`, {
          headers: { authorization: `Bearer ${this.token}`, accept: "application/json" },
          signal: anySignal(this.abort.signal, timeout.signal),
          cache: "no-store",
        });
        if (r.status === 410) return this.fail("session gone", 4011);
        if (r.status === 401) return this.fail("unauthorized", 4001, false);
        if (!r.ok) return this.fail(`poll: HTTP ${r.status}`);
        const frames = (await r.json()) as unknown[];
        for (const json of frames) {
          if (this.done) return;
          const frame = serverFromJson(json as never);
          if (Number(frame.pos ?? 0) > this.cursor) this.cursor = Number(frame.pos);
          if (frame.disconnect) {
            const d = frame.disconnect;
            this.hooks.frame(frame, this);
            return this.fail(d.reason ?? "", d.code, !!d.reconnect);
          }
          this.hooks.frame(frame, this);
        }
      } catch (e) {
        if (this.done) return;
        return this.fail(timeout.signal.aborted ? "poll: no answer within the hold time" : `poll: ${String(e)}`);
      } finally {
        clearTimeout(timer);
      }
    }
  }
}
