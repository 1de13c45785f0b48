// parley browser SDK: one class, `Parley`, that keeps a chat session alive over
// WebSocket, Server-Sent Events or long-poll, whichever gets through.
//
//   const c = new Parley("https://chat.example", { token, transports: ["websocket", "sse", "poll"] });
//   c.on("message", (m) => render(m));
//   await c.join("lobby");
//   const seq = await c.send("lobby", "hello");
//
// What it does for you (README, "Browser SDK"):
// - Fallback: a transport that fails before opening moves to the next one at once; one
//   that opened and later dropped is retried with full-jitter exponential backoff
//   (0.5 s – 20 s). What worked is remembered for the page session; WebSocket is probed
//   again later so a passing failure does not pin the page to long-poll.
// - Heartbeats bound server silence; reconnects pause while the page is hidden and start
//   at once on visibilitychange / pageshow / online.
// - No loss, no duplicates: the session is resumed (id + position) on any transport; a
//   new session syncs every room from the log; seq gaps are filled; duplicates dropped;
//   sends carry a client message id and are retried until acknowledged.

import { Backoff, BACKOFF_MAX_MS, BACKOFF_MIN_MS } from "./backoff.js";
import type { Command, Frame } from "./codec.js";
import { kindOf } from "./codec.js";

type ServerFrame = Frame;
import { Sequencer } from "./sequencer.js";
import {
  PollTransport,
  SseTransport,
  TransportError,
  WebSocketTransport,
  errorCodeName,
  type Closed,
  type Hooks,
  type Timing,
  type Transport,
} from "./transports.js";

/** The reconnect backoff bounds and the fail-before-open bound, in ms (defaults). */
export const DEFAULTS = {
  backoffMinMs: BACKOFF_MIN_MS,
  backoffMaxMs: BACKOFF_MAX_MS,
  connectTimeoutMs: 5000,
  pongTimeoutMs: 10_000,
  probeWebSocketMs: 60_000,
  pollWaitSeconds: 25,
} as const;

/** How the client reaches the server. */
export type TransportName = "websocket" | "sse" | "poll";

/**
 * - `connecting`: first connection attempts.
 * - `connected`: a transport is open and the session is live.
 * - `reconnecting`: the transport dropped; waiting (backoff) or trying again.
 * - `paused`: the page is hidden, so reconnect attempts wait until it is shown.
 * - `closed`: `close()` was called, or the server refused the credentials for good.
 */
export type ConnectionState = "connecting" | "connected" | "reconnecting" | "paused" | "closed";

export interface ParleyOptions {
  /** A JWT for the user. Either this or `getToken`. */
  token?: string;
  /** Called before every (re)connect and after an auth failure; return a valid token. */
  getToken?: () => string | Promise<string>;
  /** Transports to try, in order. Default: all three. */
  transports?: TransportName[];
  /** WebSocket encoding: "proto" (binary, the default) or "json". SSE and long-poll use JSON. */
  encoding?: "proto" | "json";
  /** No `connected` within this time: the transport failed before opening (default 5000 ms). */
  connectTimeoutMs?: number;
  /** Reconnect backoff floor and ceiling (defaults 500 ms and 20 000 ms). */
  backoffMinMs?: number;
  backoffMaxMs?: number;
  /** WebSocket ping interval (default: the server's heartbeatMs, 25 s). */
  pingIntervalMs?: number;
  /** Silence allowed past the heartbeat interval before a connection is declared dead (default 10 000 ms). */
  pongTimeoutMs?: number;
  /** Long-poll hold in seconds (default 25). */
  pollWaitSeconds?: number;
  /** While on SSE or long-poll, try WebSocket again after this long, doubling to 10 min (default 60 000 ms; 0 = never). */
  probeWebSocketMs?: number;
  /** Remember the transport that worked in sessionStorage (default true). */
  rememberTransport?: boolean;
  /** Connect in the constructor (default true); otherwise call `connect()`. */
  autoConnect?: boolean;
}

export interface ChatMessage {
  room: string;
  seq: number;
  sender: string;
  clientMsgId: string;
  body: string;
  metadata: Record<string, string>;
  /** Server append time, Unix ms. */
  ts: number;
}

export interface RoomState {
  room: string;
  lastSeq: number;
  readSeq: number;
  unread: number;
  private: boolean;
  /** For a direct-message room: the other user. */
  dmPeer: string;
  members: number;
}

export interface TypingEvent {
  room: string;
  user: string;
}
export interface PresenceEvent {
  user: string;
  online: boolean;
  /** Unix ms of the user's last session end (0 when online or never seen). */
  lastSeen: number;
}
export interface ReceiptEvent {
  room: string;
  user: string;
  seq: number;
  unread: number;
}
export interface SignalEvent {
  fromUser: string;
  kind: string;
  payload: string;
}
export interface MembershipEvent {
  room: string;
  user: string;
  action: string;
  by: string;
}
export interface AnnouncementEvent {
  room: string;
  body: string;
  ts: number;
}
export interface StateEvent {
  state: ConnectionState;
  transport: TransportName | null;
}
export interface ConnectedEvent {
  userId: string;
  sessionId: string;
  /** True when the previous session was resumed (nothing missed); false: a new session, rooms were synced. */
  resumed: boolean;
  transport: TransportName;
  rooms: RoomState[];
}
export interface HistoryPage {
  room: string;
  messages: ChatMessage[];
  more: boolean;
}
export interface SentResult {
  room: string;
  seq: number;
  ts: number;
  duplicate: boolean;
}

export interface ParleyEvents {
  message: ChatMessage;
  typing: TypingEvent;
  presence: PresenceEvent;
  receipt: ReceiptEvent;
  signal: SignalEvent;
  membership: MembershipEvent;
  announcement: AnnouncementEvent;
  state: StateEvent;
  connected: ConnectedEvent;
  /** Something went wrong that the client handled (a failed attempt, a gap it filled …). */
  error: ParleyError;
}

/** A command the server refused (`code` is the wire error code), or a client-side failure. */
export class ParleyError extends Error {
  constructor(
    message: string,
    readonly code: string = "CLIENT",
  ) {
    super(message);
    this.name = "ParleyError";
  }
}

/** Connection counters, for tests and diagnostics. */
export interface ParleyStats {
  /** Transport open attempts (each transport tried counts once). */
  attempts: number;
  /** Successful opens. */
  connects: number;
  /** Opens that resumed the previous session. */
  resumes: number;
  /** Duplicate messages dropped (by seq). */
  duplicatesDropped: number;
  /** Gaps noticed in live traffic and filled by sync. */
  gapsFilled: number;
  /** Time from construction to the first `connected`, ms (-1 until then). */
  firstConnectMs: number;
}

type Listener<T> = (event: T) => void;

interface OutboxItem {
  room: string;
  toUser: string;
  body: string;
  metadata: Record<string, string>;
  clientMsgId: string;
  resolve: (r: SentResult) => void;
  reject: (e: Error) => void;
}

const STORAGE_KEY = "parley.transport";
const PROBE_MAX_MS = 10 * 60_000;
/** A connection that lived this long resets the backoff. */
const STABLE_MS = 10_000;
const ALL: TransportName[] = ["websocket", "sse", "poll"];

const num = (v: string | number | undefined): number => Number(v ?? 0);

function toMessage(m: Frame): ChatMessage {
  return {
    room: m.room,
    seq: num(m.seq),
    sender: m.sender ?? "",
    clientMsgId: m.clientMsgId ?? "",
    body: m.body ?? "",
    metadata: { ...(m.metadata ?? {}) },
    ts: num(m.ts),
  };
}

function toRoom(r: Frame): RoomState {
  return {
    room: r.room,
    lastSeq: num(r.lastSeq),
    readSeq: num(r.readSeq),
    unread: num(r.unread),
    private: !!r.private,
    dmPeer: r.dmPeer ?? "",
    members: num(r.members),
  };
}

function randomId(): string {
  const c = globalThis.crypto;
  if (c?.randomUUID) return c.randomUUID();
  return Math.random().toString(36).slice(2) + Date.now().toString(36);
}

export class Parley {
  /** The current connection state. */
  get state(): ConnectionState {
    return this.#state;
  }
  /** The transport in use (null while not connected). */
  get transport(): TransportName | null {
    return this.#state === "connected" && this.#current ? this.#current.name : null;
  }
  /** The authenticated user id (after the first `connected`). */
  get userId(): string {
    return this.#userId;
  }
  readonly stats: ParleyStats = {
    attempts: 0,
    connects: 0,
    resumes: 0,
    duplicatesDropped: 0,
    gapsFilled: 0,
    firstConnectMs: -1,
  };

  #base: string;
  #opts: Required<Omit<ParleyOptions, "token" | "getToken">>;
  #tokenValue: string;
  #getToken?: () => string | Promise<string>;
  #state: ConnectionState = "connecting";
  #current: Transport | undefined;
  #listeners = new Map<string, Set<Listener<never>>>();
  #sessionId = "";
  #lastPos = 0;
  #ackedPos = 0;
  #ackTimer: ReturnType<typeof setTimeout> | undefined;
  #userId = "";
  #seq = new Sequencer<ChatMessage>();
  #memberRooms = new Set<string>();
  #syncing = new Map<string, boolean>();
  #outbox: OutboxItem[] = [];
  #pumping = false;
  #nextId = 2;
  #backoff: Backoff;
  #preferred: TransportName | undefined;
  #started = Date.now();
  #wake: (() => void) | undefined;
  #connectedWaiters: (() => void)[] = [];
  #dropped: ((why: Closed) => void) | undefined;
  #probeDelay: number;
  // (see #probe)
  #probeTimer: ReturnType<typeof setTimeout> | undefined;
  #needFreshToken = false;
  #probing: Transport | undefined;
  #probeDrop: Closed | undefined;
  #running = false;
  #onWake = () => this.#wakeUp();
  #onVisibility = () => {
    if (typeof document !== "undefined" && !document.hidden) this.#wakeUp();
  };

  constructor(url: string, options: ParleyOptions = {}) {
    this.#base = url.replace(/\/+$/, "").replace(/^ws(s?):/, "http$1:");
    this.#tokenValue = options.token ?? "";
    this.#getToken = options.getToken;
    const transports = (options.transports ?? ALL).filter((t) => ALL.includes(t));
    if (transports.length === 0) throw new ParleyError("no usable transport in options.transports");
    this.#opts = {
      transports,
      encoding: options.encoding ?? "proto",
      connectTimeoutMs: options.connectTimeoutMs ?? DEFAULTS.connectTimeoutMs,
      backoffMinMs: options.backoffMinMs ?? BACKOFF_MIN_MS,
      backoffMaxMs: options.backoffMaxMs ?? BACKOFF_MAX_MS,
      pingIntervalMs: options.pingIntervalMs ?? 0,
      pongTimeoutMs: options.pongTimeoutMs ?? DEFAULTS.pongTimeoutMs,
      pollWaitSeconds: options.pollWaitSeconds ?? DEFAULTS.pollWaitSeconds,
      probeWebSocketMs: options.probeWebSocketMs ?? DEFAULTS.probeWebSocketMs,
      rememberTransport: options.rememberTransport ?? true,
      autoConnect: options.autoConnect ?? true,
    };
    this.#backoff = new Backoff(this.#opts.backoffMinMs, this.#opts.backoffMaxMs);
    this.#probeDelay = this.#opts.probeWebSocketMs;
    if (this.#opts.rememberTransport) {
      try {
        const t = globalThis.sessionStorage?.getItem(STORAGE_KEY) as TransportName | null;
        if (t && transports.includes(t)) this.#preferred = t;
      } catch {
        /* storage blocked */
      }
    }
    if (this.#opts.autoConnect) this.connect();
  }

  // ------------------------------------------------------------ events

  /** Subscribes to an event; returns a function that unsubscribes. */
  on<K extends keyof ParleyEvents>(event: K, fn: Listener<ParleyEvents[K]>): () => void {
    let set = this.#listeners.get(event);
    if (!set) this.#listeners.set(event, (set = new Set()));
    set.add(fn as Listener<never>);
    return () => this.off(event, fn);
  }

  off<K extends keyof ParleyEvents>(event: K, fn: Listener<ParleyEvents[K]>): void {
    this.#listeners.get(event)?.delete(fn as Listener<never>);
  }

  #emit<K extends keyof ParleyEvents>(event: K, value: ParleyEvents[K]): void {
    for (const fn of this.#listeners.get(event) ?? []) {
      try {
        (fn as Listener<ParleyEvents[K]>)(value);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  #setState(state: ConnectionState): void {
    if (this.#state === state && state !== "connected") return;
    this.#state = state;
    this.#emit("state", { state, transport: this.transport });
  }

  // ------------------------------------------------------------ connection loop

  /** Starts connecting (done by the constructor unless `autoConnect: false`). */
  connect(): void {
    if (this.#running || this.#closed()) return;
    this.#running = true;
    if (typeof window !== "undefined") {
      window.addEventListener("online", this.#onWake);
      window.addEventListener("pageshow", this.#onWake);
      document.addEventListener("visibilitychange", this.#onVisibility);
    }
    this.#setState("connecting");
    void this.#run();
  }

  /** Closes the connection for good; pending commands and sends are rejected. */
  close(): void {
    if (this.#closed()) return;
    this.#state = "closed";
    this.#current?.close();
    this.#current = undefined;
    clearTimeout(this.#probeTimer);
    clearTimeout(this.#ackTimer);
    if (typeof window !== "undefined") {
      window.removeEventListener("online", this.#onWake);
      window.removeEventListener("pageshow", this.#onWake);
      document.removeEventListener("visibilitychange", this.#onVisibility);
    }
    for (const item of this.#outbox.splice(0)) item.reject(new ParleyError("client closed"));
    this.#wake?.();
    this.#dropped?.({ reason: "closed", reconnect: false });
    for (const w of this.#connectedWaiters.splice(0)) w();
    this.#emit("state", { state: "closed", transport: null });
  }

  #closed(): boolean {
    return this.#state === "closed";
  }

  #hidden(): boolean {
    return typeof document !== "undefined" && document.hidden === true;
  }

  #wakeUp(): void {
    if (this.#state === "connected") {
      this.#current?.checkAlive();
      return;
    }
    this.#backoff.reset();
    this.#wake?.();
  }

  /** Waits `ms`, or less when woken (page shown, back online). */
  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(done, ms);
      function done() {
        clearTimeout(t);
        resolve();
      }
      this.#wake = () => {
        this.#wake = undefined;
        done();
      };
    });
  }

  /** Waits until the page is visible (or woken another way). */
  async #whileHidden(): Promise<void> {
    while (this.#hidden() && !this.#closed()) {
      this.#setState("paused");
      await new Promise<void>((resolve) => (this.#wake = () => ((this.#wake = undefined), resolve())));
    }
  }

  async #token(): Promise<string> {
    // A getToken callback is asked before every attempt: it may cache, and knows best
    // when its token is about to expire.
    if (this.#getToken) {
      this.#tokenValue = await this.#getToken();
      this.#needFreshToken = false;
    }
    return this.#tokenValue;
  }

  #order(): TransportName[] {
    const list = this.#opts.transports;
    const first = this.#preferred && list.includes(this.#preferred) ? this.#preferred : list[0]!;
    return [first, ...list.filter((t) => t !== first)];
  }

  #timing(): Timing {
    return {
      connectTimeoutMs: this.#opts.connectTimeoutMs,
      pingIntervalMs: this.#opts.pingIntervalMs,
      pongTimeoutMs: this.#opts.pongTimeoutMs,
      pollWaitSeconds: this.#opts.pollWaitSeconds,
    };
  }

  #make(name: TransportName): Transport {
    const hooks: Hooks = {
      connected: (f, t) => {
        // The run loop's transport, or a WebSocket probe taking over a live session.
        if (t === this.#current || (t === this.#probing && this.#state === "connected")) this.#onConnected(f, t);
      },
      frame: (f, t) => {
        if (t === this.#current) this.#onFrame(f);
      },
      closed: (why, t) => {
        if (t !== this.#current) return;
        // A WebSocket probe resuming the session makes the server close the old
        // transport with 4010 before the probe's own `connected` arrives: not a drop.
        if (why.code === 4010 && this.#probing) this.#probeDrop = why;
        else this.#dropped?.(why);
      },
    };
    if (name === "websocket") {
      const ws = this.#base.replace(/^http/, "ws") + "/ws";
      return new WebSocketTransport(ws, this.#opts.encoding, hooks, this.#timing());
    }
    if (name === "sse") return new SseTransport(this.#base, hooks, this.#timing());
    return new PollTransport(this.#base, hooks, this.#timing());
  }

  async #run(): Promise<void> {
    let first = true;
    while (!this.#closed()) {
      if (!first) await this.#whileHidden();
      if (this.#closed()) return;
      if (this.#state !== "connecting") this.#setState("reconnecting");
      first = false;
      let openedAt = 0;
      let why: Closed | undefined;
      for (const name of this.#order()) {
        if (this.#closed()) return;
        let token: string;
        try {
          token = await this.#token();
        } catch (e) {
          this.#emit("error", new ParleyError(`getToken failed: ${String(e)}`));
          break;
        }
        const t = this.#make(name);
        this.#current = t;
        this.stats.attempts++;
        const dropped = new Promise<Closed>((resolve) => (this.#dropped = resolve));
        try {
          await t.open({ token, sessionId: this.#sessionId, lastPos: this.#lastPos });
        } catch (e) {
          // Failed before opening: the next transport, at once.
          this.#current = undefined;
          const err = e as TransportError;
          this.#emit("error", new ParleyError(`${name}: ${err.message}`, err.code));
          if (err.code === "ERROR_CODE_UNAUTHORIZED" || err.code === "ERROR_CODE_TOKEN_EXPIRED") {
            if (!this.#getToken) {
              this.close();
              return;
            }
            this.#needFreshToken = true;
            break; // a credentials problem, not the transport's: back off, new token
          }
          continue;
        }
        openedAt = Date.now();
        this.#afterOpen(t);
        why = await dropped;
        this.#dropped = undefined;
        if (this.#closed()) return;
        this.#current = undefined;
        t.close();
        clearTimeout(this.#probeTimer);
        this.#emit("error", new ParleyError(`${name} dropped: ${why.reason}`, why.code ? String(why.code) : undefined));
        break;
      }
      if (why && !why.reconnect) {
        if (why.code === 4001 && this.#getToken) this.#needFreshToken = true;
        else if (why.code === 4010) this.#sessionId = "";
        else if (why.code !== 4001) {
          /* reconnect anyway, with backoff: a client must not give up on a live server */
        } else {
          this.close();
          return;
        }
      }
      if (openedAt && Date.now() - openedAt >= STABLE_MS) this.#backoff.reset();
      this.#setState(this.#hidden() ? "paused" : "reconnecting");
      const delay = this.#backoff.next();
      await this.#sleep(delay);
    }
  }

  /** Synchronously on the `connected` frame, before any push after it. */
  #onConnected(frame: ServerFrame, t: Transport): void {
    const c = frame.connected;
    if (!c) return;
    const resumed = !!c.resumed && c.sessionId === this.#sessionId;
    if (!resumed) {
      this.#sessionId = c.sessionId;
      this.#lastPos = 0;
      this.#ackedPos = 0;
    } else {
      this.stats.resumes++;
    }
    this.#userId = c.userId;
    this.stats.connects++;
    if (this.stats.firstConnectMs < 0) this.stats.firstConnectMs = Date.now() - this.#started;
    const rooms: RoomState[] = (c.rooms ?? []).map(toRoom);
    this.#memberRooms = new Set(rooms.map((r) => r.room));
    const behind: [string, number][] = [];
    for (const r of rooms) {
      const last = this.#seq.lastSeq(r.room);
      if (last === undefined) this.#seq.baseline(r.room, r.lastSeq);
      else if (r.lastSeq > last) behind.push([r.room, last]);
    }
    this.#current = t;
    this.#preferred = t.name;
    if (this.#opts.rememberTransport) {
      try {
        globalThis.sessionStorage?.setItem(STORAGE_KEY, t.name);
      } catch {
        /* storage blocked */
      }
    }
    this.#setState("connected");
    this.#emit("connected", { userId: c.userId, sessionId: c.sessionId, resumed, transport: t.name, rooms });
    // A resumed session replays what was missed; otherwise catch up from the log.
    if (!resumed) for (const [room, after] of behind) void this.#sync(room, after);
  }

  #afterOpen(t: Transport): void {
    for (const w of this.#connectedWaiters.splice(0)) w();
    void this.#pump();
    if (t.name !== "websocket" && this.#opts.transports.includes("websocket") && this.#probeDelay > 0) {
      clearTimeout(this.#probeTimer);
      this.#probeTimer = setTimeout(() => void this.#probe(), this.#probeDelay);
    }
  }

  /** On SSE or long-poll: try WebSocket again; when it opens, move the session to it. */
  async #probe(): Promise<void> {
    const old = this.#current;
    if (!old || this.#state !== "connected" || old.name === "websocket") return;
    if (this.#hidden()) {
      this.#probeTimer = setTimeout(() => void this.#probe(), this.#probeDelay);
      return;
    }
    const ws = this.#make("websocket");
    this.#probing = ws;
    let token: string;
    try {
      token = await this.#token();
    } catch {
      return;
    }
    // The new transport takes over inside `connected` (synchronously, before its first
    // push); pushes still arriving on the old one are dropped by position.
    try {
      await ws.open({ token, sessionId: this.#sessionId, lastPos: this.#lastPos });
    } catch {
      this.#probing = undefined;
      const dropped = this.#probeDrop;
      this.#probeDrop = undefined;
      if (dropped && this.#current === old) {
        this.#dropped?.(dropped); // the old transport did lose the session: reconnect
        return;
      }
      if (this.#current === old) {
        this.#probeDelay = Math.min(this.#probeDelay * 2, PROBE_MAX_MS);
        this.#probeTimer = setTimeout(() => void this.#probe(), this.#probeDelay);
      }
      return;
    }
    this.#probing = undefined;
    this.#probeDrop = undefined;
    if (this.#current !== ws) {
      ws.close();
      return;
    }
    old.close();
    this.#probeDelay = this.#opts.probeWebSocketMs;
    // Hand the drop promise of the run loop over to the new transport.
    void this.#pump();
  }

  // ------------------------------------------------------------ inbound

  #onFrame(frame: ServerFrame): void {
    const pos = num(frame.pos);
    if (pos > 0) {
      if (pos <= this.#lastPos) return; // replayed twice (resume overlap)
      this.#lastPos = pos;
      this.#scheduleAck();
    }
    const kind = kindOf(frame);
    const v = kind ? frame[kind] : undefined;
    switch (kind) {
      case "message":
        this.#deliver(toMessage(v));
        break;
      case "typing":
        this.#emit("typing", { room: v.room ?? "", user: v.user ?? "" });
        break;
      case "presence":
        this.#emit("presence", { user: v.user ?? "", online: !!v.online, lastSeen: num(v.lastSeen) });
        break;
      case "receipt":
        this.#emit("receipt", { room: v.room ?? "", user: v.user ?? "", seq: num(v.seq), unread: num(v.unread) });
        break;
      case "signal":
        this.#emit("signal", { fromUser: v.fromUser ?? "", kind: v.kind ?? "", payload: v.payload ?? "" });
        break;
      case "membership": {
        const m = { room: v.room ?? "", user: v.user ?? "", action: v.action ?? "", by: v.by ?? "" };
        if (m.user === this.#userId) {
          if (m.action === "left") this.#memberRooms.delete(m.room);
          else this.#memberRooms.add(m.room);
        }
        this.#emit("membership", { room: m.room, user: m.user, action: m.action, by: m.by });
        break;
      }
      case "announcement":
        this.#emit("announcement", { room: v.room ?? "", body: v.body ?? "", ts: num(v.ts) });
        break;
      default:
        break;
    }
  }

  #deliver(msg: ChatMessage): void {
    this.#memberRooms.add(msg.room);
    const before = this.#seq.lastSeq(msg.room);
    const { deliver, gapAfter } = this.#seq.offer(msg);
    if (deliver.length === 0 && before !== undefined && msg.seq <= before) this.stats.duplicatesDropped++;
    for (const m of deliver) this.#emit("message", m);
    if (gapAfter !== undefined) void this.#sync(msg.room, gapAfter, true);
  }

  #scheduleAck(): void {
    if (this.#ackTimer !== undefined) return;
    const t = this.#current;
    if (!t || t.name === "poll") return; // the poll cursor acknowledges
    this.#ackTimer = setTimeout(
      () => {
        this.#ackTimer = undefined;
        if (this.#lastPos > this.#ackedPos && this.#current === t) {
          this.#ackedPos = this.#lastPos;
          t.post({ ack: { pos: String(this.#lastPos) } });
        }
      },
      t.name === "websocket" ? 1000 : 5000,
    );
  }

  /** Fills a room from the log after `after` (a gap, or a new session). One at a time per room. */
  async #sync(room: string, after: number, gap = false): Promise<void> {
    if (this.#syncing.has(room)) {
      this.#syncing.set(room, true); // run again when the current one finishes
      return;
    }
    this.#syncing.set(room, false);
    try {
      let from = after;
      for (;;) {
        const k = await this.#call({ sync: { rooms: { [room]: String(from) } } });
        const page = (k.sync?.rooms ?? []).find((p: Frame) => p.room === room);
        if (!page) break;
        for (const m of page.messages ?? []) this.#deliver(toMessage(m));
        const last = this.#seq.lastSeq(room) ?? from;
        if (!page.more || last <= from) break;
        from = last;
      }
      if (gap) this.stats.gapsFilled++;
    } catch (e) {
      this.#emit("error", e instanceof ParleyError ? e : new ParleyError(String(e)));
    } finally {
      const again = this.#syncing.get(room);
      this.#syncing.delete(room);
      if (again && this.#seq.hasGap(room)) void this.#sync(room, this.#seq.lastSeq(room) ?? 0, true);
    }
  }

  // ------------------------------------------------------------ commands

  /** Resolves when connected (at once if connected). */
  #ready(): Promise<void> {
    if (this.#state === "connected" && this.#current) return Promise.resolve();
    if (this.#closed()) return Promise.reject(new ParleyError("client closed"));
    return new Promise((resolve) => this.#connectedWaiters.push(resolve));
  }

  /** Runs a command, retrying it on the next transport when the current one drops. */
  async #call(cmd: Command, retry = true): Promise<Frame> {
    for (;;) {
      await this.#ready();
      if (this.#closed()) throw new ParleyError("client closed");
      const t = this.#current!;
      let reply: ServerFrame;
      try {
        reply = await t.request(this.#nextId++, cmd);
      } catch (e) {
        const err = e as TransportError;
        if (!retry) throw new ParleyError(err.message, err.code ?? "DISCONNECTED");
        // Wait for the drop to be noticed, then for the next connection.
        if (this.#current === t) await new Promise((r) => setTimeout(r, 50));
        continue;
      }
      if (reply.error) throw new ParleyError(reply.error.message ?? "", errorCodeName(reply.error.code ?? 0));
      return reply;
    }
  }

  async #pump(): Promise<void> {
    if (this.#pumping) return;
    this.#pumping = true;
    try {
      while (this.#outbox.length > 0 && this.#state === "connected" && this.#current) {
        const item = this.#outbox[0]!;
        const t = this.#current;
        let reply: ServerFrame;
        try {
          reply = await t.request(this.#nextId++, { send: {
              room: item.room,
              toUser: item.toUser,
              body: item.body,
              metadata: item.metadata,
              clientMsgId: item.clientMsgId,
            },
          } as Command);
        } catch {
          // The transport dropped: the item stays first; resent (same clientMsgId) once
          // the next transport is open.
          return;
        }
        this.#outbox.shift();
        if (reply.sent) {
          const v = reply.sent;
          item.resolve({ room: v.room ?? "", seq: num(v.seq), ts: num(v.ts), duplicate: !!v.duplicate });
        } else if (reply.error) {
          item.reject(new ParleyError(reply.error.message ?? "", errorCodeName(reply.error.code ?? 0)));
        } else {
          item.reject(new ParleyError(`unexpected reply ${kindOf(reply)}`));
        }
      }
    } finally {
      this.#pumping = false;
    }
  }

  #enqueue(room: string, toUser: string, body: string, opts: SendOptions): Promise<SentResult> {
    if (this.#closed()) return Promise.reject(new ParleyError("client closed"));
    return new Promise((resolve, reject) => {
      this.#outbox.push({
        room,
        toUser,
        body,
        metadata: opts.metadata ?? {},
        clientMsgId: opts.clientMsgId ?? randomId(),
        resolve,
        reject,
      });
      void this.#pump();
    });
  }

  /**
   * Sends a message; resolves with its seq once the server has stored it. Retried across
   * reconnects with the same client message id until acknowledged, so it is delivered
   * exactly once.
   */
  async send(room: string, body: string, opts: SendOptions = {}): Promise<number> {
    return (await this.#enqueue(room, "", body, opts)).seq;
  }

  /** Sends a direct message to `user`; resolves with the DM room and seq. */
  sendDirect(user: string, body: string, opts: SendOptions = {}): Promise<SentResult> {
    return this.#enqueue("", user, body, opts);
  }

  /** Messages sent but not yet acknowledged. */
  get pendingSends(): number {
    return this.#outbox.length;
  }

  /** Joins (and creates on first join) a public room; resolves with its last seq. */
  async join(room: string): Promise<{ room: string; lastSeq: number }> {
    const k = await this.#call({ join: { room } });
    if (!k.joined) throw new ParleyError(`unexpected reply ${kindOf(k)}`);
    const lastSeq = num(k.joined.lastSeq);
    this.#seq.baseline(room, lastSeq);
    this.#memberRooms.add(room);
    return { room, lastSeq };
  }

  async leave(room: string): Promise<void> {
    await this.#call({ leave: { room } });
    this.#memberRooms.delete(room);
  }

  async createRoom(room: string, opts: { private?: boolean } = {}): Promise<RoomState> {
    const k = await this.#call({ createRoom: { room, private: !!opts.private } });
    if (!k.room) throw new ParleyError(`unexpected reply ${kindOf(k)}`);
    this.#seq.baseline(room, 0);
    return toRoom(k.room);
  }

  async invite(room: string, user: string): Promise<void> {
    await this.#call({ invite: { room, user } });
  }

  async members(room: string): Promise<string[]> {
    const k = await this.#call({ members: { room } });
    return [...(k.members?.users ?? [])];
  }

  /** The user's rooms with last seq, read marker and unread count. */
  async rooms(): Promise<RoomState[]> {
    const k = await this.#call({ rooms: {} });
    return (k.rooms?.rooms ?? []).map(toRoom);
  }

  /**
   * A page of a room's log, oldest first: the newest messages (no option), those before
   * `before` (scrollback), or those after `after` (`after: 0` pages from the first).
   */
  async history(room: string, opts: { before?: number; after?: number; limit?: number } = {}): Promise<HistoryPage> {
    // afterSeq has presence: only send it when asked (0 then means "from the first").
    const history: Record<string, unknown> = { room, limit: opts.limit ?? 0 };
    if (opts.before !== undefined) history.beforeSeq = String(opts.before);
    if (opts.after !== undefined) history.afterSeq = String(opts.after);
    const k = await this.#call({ history } as Command);
    if (!k.history) throw new ParleyError(`unexpected reply ${kindOf(k)}`);
    const h = k.history;
    return { room: h.room ?? room, messages: (h.messages ?? []).map(toMessage), more: !!h.more };
  }

  /** Moves the read marker (only forward). */
  async markRead(room: string, seq: number): Promise<void> {
    await this.#call({ read: { room, seq: String(seq) } });
  }

  /** Tells the room's other members the user is typing. Ephemeral: not retried, errors ignored. */
  async typing(room: string): Promise<void> {
    if (this.#state !== "connected") return;
    try {
      await this.#call({ typing: { room } }, false);
    } catch {
      /* rate-limited or disconnected: typing is best effort */
    }
  }

  async presence(users: string[]): Promise<PresenceEvent[]> {
    const k = await this.#call({ presence: { users } });
    return (k.presenceList?.users ?? []).map((p: Frame) => ({ user: p.user ?? "", online: !!p.online, lastSeen: num(p.lastSeen) }));
  }

  /** Hands a payload (WebRTC offer/answer/ICE …) to another user's connected sessions. */
  async signal(toUser: string, kind: string, payload: string): Promise<void> {
    await this.#call({ signal: { toUser, kind, payload } });
  }

  /** Application-level ping; resolves with the round trip in ms. */
  async ping(): Promise<number> {
    const start = Date.now();
    await this.#call({ ping: {} }, false);
    return Date.now() - start;
  }
}

export interface SendOptions {
  metadata?: Record<string, string>;
  /** Defaults to a random UUID. Reuse one to make a retry of your own idempotent. */
  clientMsgId?: string;
}

export default Parley;
