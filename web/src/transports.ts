// The three ways to carry one parley session (docs/PROTOCOL.md, "One session, three
// transports"). Each transport only opens, frames and closes; the client (parley.ts)
// owns the session, reconnects and delivery. A transport:
//
// - `open()` connects and sends `connect` (token, and session id + position to resume).
//   It resolves with the `connected` frame, or rejects: the transport failed *before
//   opening* and the client moves on to the next one at once.
// - after that, hands every server frame to `hooks.frame` (pushes, and for WebSocket the
//   replies too), and calls `hooks.closed` exactly once when it is dead: closed by the
//   server, dropped, or silent for longer than its heartbeat bound.
// - `request()` runs one command and resolves with its reply frame.

import { clientFrame, decodeServer, encodeClient, type Command, type Encoding, type Frame } from "./codec.js";

type ServerFrame = Frame;
type ClientFrame = Frame;
const serverFromJson = (json: unknown): Frame => json as Frame;

export type TransportName = "websocket" | "sse" | "poll";

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

// ---------------------------------------------------------------- WebSocket

export class WebSocketTransport implements Transport {
  readonly name = "websocket";
  private ws: WebSocket | undefined;
  private pending = new Map<number, { resolve: (f: ServerFrame) => void; reject: (e: Error) => void }>();
  private done = false;
  private opened = false;
  private disconnect: Closed | undefined;
  private watchdog: Watchdog | undefined;
  private pinger: ReturnType<typeof setInterval> | undefined;
  private pingId = -1;

  constructor(
    private url: string,
    readonly encoding: Encoding,
    private hooks: Hooks,
    private timing: Timing,
  ) {}

  open(args: ConnectArgs): Promise<ServerFrame> {
    return withTimeout(
      new Promise<ServerFrame>((resolve, reject) => {
        let ws: WebSocket;
        try {
          ws = new WebSocket(this.url, this.encoding === "proto" ? "parley.v1.proto" : "parley.v1.json");
        } catch (e) {
          reject(new TransportError(`websocket: ${String(e)}`));
          return;
        }
        this.ws = ws;
        ws.binaryType = "arraybuffer";
        ws.onopen = () => this.write(clientFrame(CONNECT_ID, connectCmd(args)));
        ws.onmessage = (ev) => {
          let frame: ServerFrame;
          try {
            frame = decodeServer(ev.data as string | ArrayBuffer);
          } catch {
            return; // not a frame: ignore
          }
          this.watchdog?.heard();
          if (!this.opened) {
            if (Number(frame.id ?? 0) !== CONNECT_ID || frame.pos) return;
            const err = errorOf(frame);
            if (err || !frame.connected) {
              this.close();
              reject(err ?? new TransportError("websocket: unexpected reply to connect"));
              return;
            }
            this.opened = true;
            this.startHeartbeat(frame.connected.heartbeatMs ?? 0);
            this.hooks.connected(frame, this);
            resolve(frame);
            return;
          }
          if (frame.disconnect) {
            const d = frame.disconnect;
            this.disconnect = { code: d.code, reason: d.reason ?? "", reconnect: !!d.reconnect };
          }
          if (!frame.pos && frame.id) {
            const p = this.pending.get(Number(frame.id));
            if (p) {
              this.pending.delete(Number(frame.id));
              p.resolve(frame);
            }
            return; // pongs and replies nobody waits for
          }
          this.hooks.frame(frame, this);
        };
        ws.onclose = (ev) => {
          if (!this.opened) {
            this.done = true;
            reject(new TransportError(`websocket closed before connected (${ev.code})`));
            return;
          }
          this.finish(this.disconnect ?? { code: ev.code, reason: ev.reason || "closed", reconnect: true });
        };
        ws.onerror = () => {
          // A close event follows; nothing to do here.
        };
      }),
      this.timing.connectTimeoutMs,
      "websocket connect",
      () => this.close(),
    );
  }

  private write(frame: ClientFrame): boolean {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(encodeClient(this.encoding, frame) as string);
    return true;
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
    this.write(clientFrame(this.pingId--, { ping: {} }));
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
      if (this.done || !this.write(clientFrame(id, cmd))) {
        reject(new TransportError("websocket not open"));
        return;
      }
      this.pending.set(id, { resolve, reject });
    });
  }

  post(cmd: Command): void {
    this.write(clientFrame(0, cmd));
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
    const ws = this.ws;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      // 4000: the client is leaving this connection but may resume the session.
      try {
        if (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING) ws.close(code);
      } catch {
        /* already closing */
      }
    }
    for (const p of this.pending.values()) p.reject(new TransportError("websocket closed"));
    this.pending.clear();
  }

  close(): void {
    if (!this.done) this.cleanup();
  }

  end(): void {
    if (this.done) return;
    // The server answers `done` and closes with 1000; closing with 1000 ourselves right
    // after ends the session too, should the frame be lost.
    this.write(clientFrame(this.pingId--, { end: {} }));
    this.cleanup(1000);
  }

  setToken(): void {}
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
