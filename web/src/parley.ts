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
import { NETWORK_DEFAULTS, NetworkMonitor } from "./network.js";
import {
  PollTransport,
  SseTransport,
  TransportError,
  WebSocketTransport,
  WebTransportTransport,
  errorCodeName,
  webTransportCtor,
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
  webTransportTimeoutMs: 3000,
  networkPings: 20,
  networkPingIntervalMs: 500,
  weakRttMs: NETWORK_DEFAULTS.weakRttMs,
  weakLoss: NETWORK_DEFAULTS.weakLoss,
} as const;

/** How the client reaches the server. */
export type TransportName = "websocket" | "sse" | "poll" | "webtransport";

/** `serverCertificateHashes` of the WebTransport constructor (a self-signed certificate). */
export interface CertificateHash {
  algorithm: "sha-256";
  value: BufferSource;
}

/** What the estimate says now (`Parley.network`). */
export interface NetworkEstimate {
  /** Median of the recent ping round trips, ms (-1 before the first). */
  rttMs: number;
  /** The smallest recent round trip, ms (-1 before the first). */
  minRttMs: number;
  /** Recent pings that stalled (far above the floor) or got no answer, as a share of those sent. */
  lossRatio: number;
  /** Ping round trips in the window. */
  samples: number;
  /** Connections that dropped (not closed by the server on purpose) in the last `dropWindowMs`. */
  recentDrops: number;
  /** `navigator.connection.effectiveType` ("4g", "3g", …), "" where the browser has none. */
  effectiveType: string;
  /** The verdict: prefer WebTransport. */
  weak: boolean;
  /** Why it is weak ("" when it is not): "rtt", "loss", "drops" or "effectiveType". */
  reason: string;
}

/**
 * - `idle`: not started yet (`autoConnect: false` and `connect()` not called).
 * - `connecting`: first connection attempts.
 * - `connected`: a transport is open and the session is live.
 * - `reconnecting`: the transport dropped; waiting (backoff) or trying again.
 * - `paused`: the page is hidden, so reconnect attempts wait until it is shown.
 * - `closed`: `close()` was called, or the server refused the credentials for good
 *   (then the `state` event carries the `error`, code `ERROR_CODE_UNAUTHORIZED` or
 *   `ERROR_CODE_TOKEN_EXPIRED`).
 */
export type ConnectionState = "idle" | "connecting" | "connected" | "reconnecting" | "paused" | "closed";

/** What `getToken` is told: `refresh` is true when the last token was refused or is about to expire. */
export interface TokenRequest {
  refresh: boolean;
}

export interface ParleyOptions {
  /** A JWT for the user. Either this or `getToken`. */
  token?: string;
  /**
   * Called before every (re)connect, shortly before the token's `exp` (JWT), and after the
   * server refused a token (then with `{ refresh: true }`: return a new one, not a cached
   * one). A fresh token refused again closes the client (a terminal auth error).
   */
  getToken?: (request: TokenRequest) => string | Promise<string>;
  /**
   * Transports to try, in order. Default: `["websocket", "sse", "poll"]`, with
   * WebTransport put first when the network is weak (see `webTransport`). Listing
   * `"webtransport"` asks for it at that place whatever the network.
   */
  transports?: TransportName[];
  /**
   * When to use WebTransport (`/wt`, HTTP/3 over QUIC), where the browser has it and the
   * URL is https: `"auto"` (default) first while the network estimate says weak (high
   * round trip, loss, dropped connections, a slow `navigator.connection`), and a live
   * session moves to it when the network turns weak; `"prefer"` always first; `"never"`.
   */
  webTransport?: "auto" | "prefer" | "never";
  /** WebTransport URL (default: the server URL + "/wt"). */
  webTransportUrl?: string;
  /** For a self-signed certificate (ECDSA, valid ≤ 14 days): `[{ algorithm: "sha-256", value }]`. */
  serverCertificateHashes?: CertificateHash[];
  /** A WebTransport attempt with no `connected` by then gives way to the next transport (default 3000 ms). */
  webTransportTimeoutMs?: number;
  /** Pings sent after each connect to measure the network (default 20; 0 = only heartbeats). */
  networkPings?: number;
  /** Spacing of those pings (default 500 ms). */
  networkPingIntervalMs?: number;
  /** Median round trip from which the network is weak (default 300 ms). */
  weakRttMs?: number;
  /** Share of stalled or unanswered pings from which the network is weak (default 0.06). */
  weakLoss?: number;
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
  /** Log what the client does (state changes, attempts, frames) to `console.debug`, or to this function. */
  debug?: boolean | ((message: string, ...data: unknown[]) => void);
}

/** A file shown with a message (`upload()`'s result, and `ChatMessage.attachments`). */
export interface Attachment {
  fileId: string;
  /** The file name to show and save as (cleaned by the server). */
  name: string;
  /** Sniffed from the bytes by the server, e.g. "image/png". */
  contentType: string;
  size: number;
  /** Hex SHA-256 of the bytes. */
  sha256: string;
  /** Images: pixel size (0 when unknown). */
  width: number;
  height: number;
  /** Images: a BlurHash placeholder ("" when none). */
  blurhash: string;
}

export interface UploadOptions {
  /** The name to store (default: the File's name, or "file"). */
  name?: string;
  /** Upload progress: bytes sent so far and the total. */
  onProgress?: (loaded: number, total: number) => void;
  signal?: AbortSignal;
}

/** A room member and their presence (`roster()`). */
export interface RosterEntry extends PresenceEvent {}

export interface ChatMessage {
  room: string;
  seq: number;
  sender: string;
  clientMsgId: string;
  body: string;
  metadata: Record<string, string>;
  /** Server append time, Unix ms. */
  ts: number;
  /** Files shown with the message (empty when none). */
  attachments: Attachment[];
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

/** A page of the room browser ({@link Parley.publicRooms}). */
export interface PublicRoomPage {
  /** Public rooms by name, each with `lastSeq` and `members` (no read marker). */
  rooms: RoomState[];
  /** More rooms follow the last one. */
  more: boolean;
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
  /** Failed connection rounds in a row (0 once connected). */
  attempt: number;
  /** While `reconnecting`: the wait before the next try, ms (0 otherwise). `retryNow()` cuts it short. */
  nextDelayMs: number;
  /** With `closed`: why, when it was not `close()` (a refused token). */
  error?: ParleyError;
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
  attachments: { fileId: string; name?: string }[];
  clientMsgId: string;
  resolve: (r: SentResult) => void;
  reject: (e: Error) => void;
}

const STORAGE_KEY = "parley.transport";
const MAX_TIMER_MS = 2 ** 31 - 1;
const PROBE_MAX_MS = 10 * 60_000;
/** A connection that lived this long resets the backoff. */
const STABLE_MS = 10_000;
const ALL: TransportName[] = ["websocket", "sse", "poll"];

const num = (v: string | number | undefined): number => Number(v ?? 0);

function toAttachment(a: Frame): Attachment {
  return {
    fileId: a.fileId ?? "",
    name: a.name ?? "",
    contentType: a.contentType ?? "",
    size: num(a.size),
    sha256: a.sha256 ?? "",
    width: num(a.width),
    height: num(a.height),
    blurhash: a.blurhash ?? "",
  };
}

/** The `exp` of a JWT, Unix ms (0 when it has none or is not a JWT). */
function tokenExpiry(token: string): number {
  try {
    const part = token.split(".")[1];
    if (!part) return 0;
    const json = JSON.parse(atob(part.replace(/-/g, "+").replace(/_/g, "/")));
    return typeof json.exp === "number" ? json.exp * 1000 : 0;
  } catch {
    return 0;
  }
}

function toMessage(m: Frame): ChatMessage {
  return {
    room: m.room,
    seq: num(m.seq),
    sender: m.sender ?? "",
    clientMsgId: m.clientMsgId ?? "",
    body: m.body ?? "",
    metadata: { ...(m.metadata ?? {}) },
    ts: num(m.ts),
    attachments: (m.attachments ?? []).map(toAttachment),
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
  /**
   * The network estimate the transport choice is made from: median ping round trip,
   * loss (stalled or unanswered pings), recent drops, `navigator.connection`, and the
   * verdict `weak` with its `reason`.
   */
  get network(): NetworkEstimate {
    return this.#network.estimate();
  }
  /** The authenticated user id (after the first `connected`). */
  get userId(): string {
    return this.#userId;
  }
  /** Failed connection rounds in a row (0 while connected). */
  get attempt(): number {
    return this.#attempt;
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
  #opts: Required<Omit<ParleyOptions, "token" | "getToken" | "debug" | "webTransportUrl" | "serverCertificateHashes">> &
    Pick<ParleyOptions, "webTransportUrl" | "serverCertificateHashes">;
  #network: NetworkMonitor;
  /** No WebTransport attempt before this time (ms): the last one failed before opening. */
  #wtBlockedUntil = 0;
  #wtBlockMs: number = DEFAULTS.probeWebSocketMs;
  #measuring: Transport | undefined;
  #tokenValue: string;
  #getToken?: (request: TokenRequest) => string | Promise<string>;
  #state: ConnectionState = "idle";
  #attempt = 0;
  #nextDelayMs = 0;
  #closeError: ParleyError | undefined;
  #authRefused = 0;
  #refreshTimer: ReturnType<typeof setTimeout> | undefined;
  #originChecked = false;
  #log: ((message: string, ...data: unknown[]) => void) | undefined;
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
  // The page is being unloaded for good (not kept in the back/forward cache): nothing
  // can resume this session, so end it on the server now (\`end\` goes out with
  // fetch keepalive) rather than leave it for the grace period.
  #onPageHide = (e: Event) => {
    if (!(e as PageTransitionEvent).persisted) this.close();
  };
  #onVisibility = () => {
    if (typeof document !== "undefined" && !document.hidden) this.#wakeUp();
  };

  constructor(url: string, options: ParleyOptions = {}) {
    this.#base = url.replace(/\/+$/, "").replace(/^ws(s?):/, "http$1:");
    this.#tokenValue = options.token ?? "";
    this.#getToken = options.getToken;
    const transports = (options.transports ?? ALL).filter((t) => ALL.includes(t) || t === "webtransport");
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
      webTransport: options.webTransport ?? "auto",
      webTransportUrl: options.webTransportUrl,
      serverCertificateHashes: options.serverCertificateHashes,
      webTransportTimeoutMs: options.webTransportTimeoutMs ?? DEFAULTS.webTransportTimeoutMs,
      networkPings: options.networkPings ?? DEFAULTS.networkPings,
      networkPingIntervalMs: options.networkPingIntervalMs ?? DEFAULTS.networkPingIntervalMs,
      weakRttMs: options.weakRttMs ?? DEFAULTS.weakRttMs,
      weakLoss: options.weakLoss ?? DEFAULTS.weakLoss,
    };
    this.#network = new NetworkMonitor({ weakRttMs: this.#opts.weakRttMs, weakLoss: this.#opts.weakLoss, minSamples: NETWORK_DEFAULTS.minSamples });
    if (options.debug) this.#log = typeof options.debug === "function" ? options.debug : (m, ...d) => console.debug(`[parley] ${m}`, ...d);
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

  /**
   * The next occurrence of an event only: with `fn`, calls it once (returns a function that
   * cancels); without, a promise of the event.
   */
  once<K extends keyof ParleyEvents>(event: K, fn: Listener<ParleyEvents[K]>): () => void;
  once<K extends keyof ParleyEvents>(event: K): Promise<ParleyEvents[K]>;
  once<K extends keyof ParleyEvents>(event: K, fn?: Listener<ParleyEvents[K]>): (() => void) | Promise<ParleyEvents[K]> {
    if (!fn) return new Promise((resolve) => this.once(event, resolve));
    const off = this.on(event, (v) => {
      off();
      fn(v);
    });
    return off;
  }

  /**
   * Resolves once connected (at once if connected now); rejects when the client is closed
   * (with the terminal error, e.g. a refused token).
   */
  async ready(): Promise<void> {
    await this.#ready().catch(() => undefined);
    if (this.#closed()) throw this.#closeError ?? new ParleyError("client closed");
  }

  /** Ends a backoff wait now and tries to connect (e.g. a "retry now" button). */
  retryNow(): void {
    if (this.#state === "reconnecting" || this.#state === "paused") {
      this.#log?.("retry now");
      this.#wake?.();
    }
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

  #setState(state: ConnectionState, force = false): void {
    if (this.#closed()) return; // closed is final (only #shutdown sets it)
    if (this.#state === state && state !== "connected" && !force) return;
    this.#state = state;
    if (state !== "reconnecting") this.#nextDelayMs = 0;
    this.#log?.(`state ${state}`, { transport: this.transport, attempt: this.#attempt, nextDelayMs: this.#nextDelayMs });
    this.#emit("state", { state, transport: this.transport, attempt: this.#attempt, nextDelayMs: this.#nextDelayMs });
  }

  // ------------------------------------------------------------ connection loop

  /** Starts connecting (done by the constructor unless `autoConnect: false`). */
  connect(): void {
    if (this.#running || this.#closed()) return;
    this.#running = true;
    if (typeof window !== "undefined") {
      window.addEventListener("online", this.#onWake);
      window.addEventListener("pageshow", this.#onWake);
      window.addEventListener("pagehide", this.#onPageHide);
      document.addEventListener("visibilitychange", this.#onVisibility);
    }
    this.#setState("connecting");
    void this.#run();
  }

  /**
   * Closes the client for good: ends the session on the server (the `end` command, so it
   * is not kept for a resume) and rejects pending commands and sends.
   */
  close(): void {
    this.#shutdown();
  }

  #shutdown(error?: ParleyError): void {
    if (this.#closed()) return;
    this.#state = "closed";
    this.#closeError = error;
    const t = this.#current;
    if (t && !error) t.end();
    else t?.close();
    this.#current = undefined;
    // A probe still connecting ends with the client (opened later, it took the session over).
    this.#probing?.close();
    this.#probing = undefined;
    clearTimeout(this.#probeTimer);
    clearTimeout(this.#ackTimer);
    clearTimeout(this.#refreshTimer);
    if (typeof window !== "undefined") {
      window.removeEventListener("online", this.#onWake);
      window.removeEventListener("pageshow", this.#onWake);
      window.removeEventListener("pagehide", this.#onPageHide);
      document.removeEventListener("visibilitychange", this.#onVisibility);
    }
    for (const item of this.#outbox.splice(0)) item.reject(error ?? new ParleyError("client closed"));
    this.#wake?.();
    this.#dropped?.({ reason: "closed", reconnect: false });
    for (const w of this.#connectedWaiters.splice(0)) w();
    this.#log?.("closed", error);
    this.#emit("state", { state: "closed", transport: null, attempt: this.#attempt, nextDelayMs: 0, error });
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
    // when its token is about to expire; told to refresh after a refusal or near `exp`.
    if (this.#getToken) {
      const exp = tokenExpiry(this.#tokenValue);
      const refresh = this.#needFreshToken || (exp > 0 && exp - Date.now() < 5000);
      this.#tokenValue = await this.#getToken({ refresh });
      this.#needFreshToken = false;
      this.#scheduleRefresh();
    }
    return this.#tokenValue;
  }

  /** Asks getToken for a new token shortly before this one's `exp`, so HTTP requests and the next reconnect never carry an expired one. */
  #scheduleRefresh(): void {
    clearTimeout(this.#refreshTimer);
    const exp = tokenExpiry(this.#tokenValue);
    if (!this.#getToken || exp === 0 || this.#closed()) return;
    const left = exp - Date.now();
    const at = Math.max(1000, left - Math.min(60_000, left / 10));
    // setTimeout holds at most 2^31-1 ms (24.8 days): a longer token is looked at again then.
    const far = at > MAX_TIMER_MS;
    this.#refreshTimer = setTimeout(() => {
      if (this.#closed() || !this.#getToken) return;
      if (far) return this.#scheduleRefresh();
      this.#log?.("refreshing the token before it expires");
      Promise.resolve(this.#getToken({ refresh: true })).then(
        (token) => {
          this.#tokenValue = token;
          this.#current?.setToken(token);
          this.#scheduleRefresh();
        },
        (e) => this.#emit("error", new ParleyError(`getToken failed: ${String(e)}`)),
      );
    }, Math.min(at, MAX_TIMER_MS));
  }

  /** The current token for an HTTP request of our own (upload, signed URL). */
  async #httpToken(): Promise<string> {
    const exp = tokenExpiry(this.#tokenValue);
    if (this.#tokenValue && (exp === 0 || exp - Date.now() > 5000)) return this.#tokenValue;
    return this.#token();
  }

  /**
   * After a whole round of transports failed before opening, on a page from another
   * origin: is it the origin? (The browser hides CORS refusals: a WebSocket shows 1006,
   * fetch "Failed to fetch".) Reachable with `no-cors` but not with CORS means parley
   * does not allow this origin.
   */
  async #checkOrigin(): Promise<void> {
    if (this.#originChecked || typeof location === "undefined" || typeof fetch === "undefined") return;
    let origin: string;
    try {
      origin = new URL(this.#base).origin;
    } catch {
      return;
    }
    if (origin === location.origin) return;
    this.#originChecked = true;
    const url = `${this.#base}/healthz`;
    try {
      await fetch(url, { cache: "no-store" });
      return; // CORS allowed: something else is wrong
    } catch {
      /* refused, or unreachable */
    }
    try {
      await fetch(url, { mode: "no-cors", cache: "no-store" });
    } catch {
      return; // unreachable: not an origin problem
    }
    const e = new ParleyError(
      `the server at ${origin} does not allow this page's origin (${location.origin}): CORS and WebSocket ` +
        `origin checks refuse it. Add "${location.origin}" to server.allowed_origins in parley's config ` +
        `(or PARLEY_SERVER__ALLOWED_ORIGINS).`,
      "ORIGIN_NOT_ALLOWED",
    );
    this.#log?.(e.message);
    this.#emit("error", e);
  }

  /** The WebTransport URL, or "" where it cannot be used (no browser support, not https, turned off). */
  #wtUrl(): string {
    if (this.#opts.webTransport === "never" || !webTransportCtor()) return "";
    const url = this.#opts.webTransportUrl ?? `${this.#base}/wt`;
    return url.startsWith("https:") ? url : "";
  }

  /** Whether WebTransport is usable now (not waiting after a failed attempt). */
  #wtUsable(): boolean {
    return this.#wtUrl() !== "" && Date.now() >= this.#wtBlockedUntil;
  }

  /**
   * The transports for one round, in order: the listed ones (the one that worked last
   * first), with WebTransport first when asked for (`"prefer"`, or it worked last) or
   * when the network is weak, and left out when it cannot be used.
   */
  #order(): TransportName[] {
    const listed = this.#opts.transports;
    const tcp = listed.filter((t) => t !== "webtransport");
    const pref = this.#preferred;
    const first = pref && pref !== "webtransport" && tcp.includes(pref) ? pref : tcp[0];
    const order: TransportName[] = first ? [first, ...tcp.filter((t) => t !== first)] : [];
    if (!this.#wtUsable()) return order.length ? order : ["webtransport"]; // fails fast, then backoff
    const wtFirst =
      this.#opts.webTransport === "prefer" || pref === "webtransport" || listed[0] === "webtransport" || this.#network.estimate().weak;
    if (wtFirst) return ["webtransport", ...order];
    if (listed.includes("webtransport")) {
      // At its listed place among the others.
      const at = listed.indexOf("webtransport");
      const before = listed.slice(0, at).filter((t) => t !== "webtransport");
      const idx = Math.max(0, ...before.map((t) => order.indexOf(t) + 1));
      order.splice(idx, 0, "webtransport");
    }
    return order;
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
      rtt: (ms) => this.#sample(ms),
      lost: () => this.#sample(-1),
      closed: (why, t) => {
        if (t !== this.#current) return;
        // A probe (WebSocket, or WebTransport on a weak network) resuming the session
        // makes the server close the old transport with 4010 before the probe's own
        // `connected` arrives: not a drop. Any other end of the old transport while a
        // probe is under way waits for the probe too: it is a drop only if the probe fails.
        if (this.#probing) this.#probeDrop = why;
        else this.#dropped?.(why);
      },
    };
    if (name === "websocket") {
      const ws = this.#base.replace(/^http/, "ws") + "/ws";
      return new WebSocketTransport(ws, this.#opts.encoding, hooks, this.#timing());
    }
    if (name === "webtransport") {
      const timing = { ...this.#timing(), connectTimeoutMs: this.#opts.webTransportTimeoutMs };
      return new WebTransportTransport(this.#wtUrl(), this.#opts.encoding, hooks, timing, this.#opts.serverCertificateHashes);
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
      let refused = false;
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
        if (this.#closed()) return; // close() while getToken ran
        const t = this.#make(name);
        this.#current = t;
        this.stats.attempts++;
        this.#log?.(`trying ${name}`, { attempt: this.#attempt, resume: this.#sessionId || undefined });
        const dropped = new Promise<Closed>((resolve) => (this.#dropped = resolve));
        try {
          await t.open({ token, sessionId: this.#sessionId, lastPos: this.#lastPos });
        } catch (e) {
          // close() ends a pending attempt too: that failure is the end, not a cue to retry.
          if (this.#closed()) return;
          // Failed before opening: the next transport, at once.
          this.#current = undefined;
          const err = e as TransportError;
          if (name === "webtransport") this.#wtFailed();
          this.#emit("error", new ParleyError(`${name}: ${err.message}`, err.code));
          if (err.code === "ERROR_CODE_UNAUTHORIZED" || err.code === "ERROR_CODE_TOKEN_EXPIRED") {
            // Terminal when there is no way to a new token, or a fresh one was refused too.
            if (!this.#getToken || this.#authRefused > 0) {
              this.#shutdown(new ParleyError(`the server refused the token: ${err.message}`, err.code));
              return;
            }
            this.#authRefused++;
            this.#needFreshToken = true;
            refused = true;
            break; // a credentials problem, not the transport's: back off, new token
          }
          continue;
        }
        openedAt = Date.now();
        this.#afterOpen(t);
        why = await dropped;
        this.#dropped = undefined;
        if (this.#closed()) return;
        // A drop the server did not announce (reset, heartbeat timeout) says something
        // about the network; a `disconnect` (shutdown, slow consumer …) does not.
        if (why.code === undefined || why.code === 1006) this.#network.dropped();
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
          this.#shutdown(new ParleyError(`the server refused the token: ${why.reason}`, "ERROR_CODE_UNAUTHORIZED"));
          return;
        }
      }
      if (!openedAt && !refused) void this.#checkOrigin();
      if (openedAt && Date.now() - openedAt >= STABLE_MS) this.#backoff.reset();
      const delay = this.#backoff.next();
      this.#attempt++;
      this.#nextDelayMs = delay;
      this.#setState(this.#hidden() ? "paused" : "reconnecting", true);
      await this.#sleep(delay);
      this.#nextDelayMs = 0;
    }
  }

  /** Synchronously on the `connected` frame, before any push after it. */
  #onConnected(frame: ServerFrame, t: Transport): void {
    const c = frame.connected;
    if (!c || this.#closed()) return;
    const resumed = !!c.resumed && c.sessionId === this.#sessionId;
    if (!resumed) {
      this.#sessionId = c.sessionId;
      this.#lastPos = 0;
      this.#ackedPos = 0;
    } else {
      this.stats.resumes++;
    }
    this.#userId = c.userId;
    this.#attempt = 0;
    this.#authRefused = 0;
    this.#originChecked = false;
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
    if (t.name === "webtransport") this.#wtBlockMs = this.#opts.probeWebSocketMs;
    void this.#measure();
    if (t.name !== "websocket" && this.#opts.transports.includes("websocket") && this.#probeDelay > 0) {
      clearTimeout(this.#probeTimer);
      this.#probeTimer = setTimeout(() => void this.#probe(), this.#probeDelay);
    }
  }

  /**
   * On SSE or long-poll: try WebSocket again; on a weak network: try WebTransport. When
   * the new transport opens, the session moves to it (resumed by id and position).
   */
  async #probe(target: TransportName = "websocket"): Promise<void> {
    const old = this.#current;
    if (!old || this.#state !== "connected" || old.name === target || this.#probing) return;
    if (this.#hidden()) {
      if (target === "websocket") this.#probeTimer = setTimeout(() => void this.#probe(), this.#probeDelay);
      return;
    }
    this.#log?.(`moving the session to ${target}`, this.#network.estimate());
    const ws = this.#make(target);
    this.#probing = ws;
    let token: string;
    try {
      token = await this.#token();
    } catch {
      this.#probing = undefined;
      const dropped = this.#probeDrop;
      this.#probeDrop = undefined;
      if (dropped && this.#current === old) this.#dropped?.(dropped);
      return;
    }
    if (this.#probing !== ws) return; // close() while getToken ran (it ended the probe)
    // The new transport takes over inside `connected` (synchronously, before its first
    // push); pushes still arriving on the old one are dropped by position.
    try {
      await ws.open({ token, sessionId: this.#sessionId, lastPos: this.#lastPos });
    } catch {
      this.#probing = undefined;
      if (target === "webtransport") this.#wtFailed();
      const dropped = this.#probeDrop;
      this.#probeDrop = undefined;
      if (dropped && this.#current === old) {
        this.#dropped?.(dropped); // the old transport did lose the session: reconnect
        return;
      }
      if (this.#current === old && target === "websocket") {
        this.#probeDelay = Math.min(this.#probeDelay * 2, PROBE_MAX_MS);
        this.#probeTimer = setTimeout(() => void this.#probe(), this.#probeDelay);
      }
      return;
    }
    this.#probing = undefined;
    const dropped = this.#probeDrop;
    this.#probeDrop = undefined;
    if (this.#current !== ws) {
      ws.close();
      if (dropped && this.#current === old) this.#dropped?.(dropped);
      return;
    }
    old.close();
    clearTimeout(this.#probeTimer);
    if (target === "websocket") this.#probeDelay = this.#opts.probeWebSocketMs;
    // Hand the drop promise of the run loop over to the new transport.
    void this.#pump();
  }

  /** A WebTransport attempt failed before opening: not again for a while (doubling to 10 min). */
  #wtFailed(): void {
    this.#wtBlockedUntil = Date.now() + this.#wtBlockMs;
    this.#wtBlockMs = Math.min(this.#wtBlockMs * 2, PROBE_MAX_MS);
    if (this.#preferred === "webtransport") this.#preferred = undefined;
  }

  /** A ping round trip (ms; -1: no answer) for the network estimate; may move the session. */
  #sample(ms: number): void {
    if (ms < 0) this.#network.lost();
    else this.#network.rtt(ms);
    const t = this.#current;
    if (this.#state !== "connected" || !t || t.name === "webtransport" || this.#probing || !this.#wtUsable()) return;
    if (this.#opts.webTransport === "auto" && !this.#network.estimate().weak) return;
    void this.#probe("webtransport");
  }

  /** After a connect: `networkPings` pings, `networkPingIntervalMs` apart, on whatever transport is current. */
  async #measure(): Promise<void> {
    const first = this.#current;
    if (!first || this.#measuring || this.#opts.networkPings <= 0) return;
    this.#measuring = first;
    try {
      for (let i = 0; i < this.#opts.networkPings; i++) {
        await new Promise((r) => setTimeout(r, this.#opts.networkPingIntervalMs));
        const t = this.#current;
        if (!t || this.#state !== "connected" || this.#closed()) return;
        const start = Date.now();
        const bound = this.#opts.pongTimeoutMs;
        const answered = await Promise.race([
          t.request(this.#nextId++, { ping: {} }).then(
            () => true,
            () => undefined,
          ),
          new Promise<boolean>((r) => setTimeout(() => r(false), bound)),
        ]);
        if (answered === undefined || this.#current !== t) continue; // the transport changed
        this.#sample(answered ? Date.now() - start : -1);
      }
    } finally {
      this.#measuring = undefined;
    }
  }

  // ------------------------------------------------------------ inbound

  #onFrame(frame: ServerFrame): void {
    this.#log?.(`<- ${kindOf(frame) ?? "?"}`, frame);
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
        // Not while a probe is opening: its `connect` carries the position it resumes
        // from, and an ack past it that reached the server first would make the server
        // forget pushes the resume needs (a new session instead of a resume).
        if (this.#probing) return this.#scheduleAck();
        if (this.#lastPos > this.#ackedPos && this.#current === t) {
          this.#ackedPos = this.#lastPos;
          t.post({ ack: { pos: String(this.#lastPos) } });
        }
      },
      t.name === "sse" ? 5000 : 1000,
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
              attachments: item.attachments,
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
        attachments: (opts.attachments ?? []).map((a) => (a.name ? { fileId: a.fileId, name: a.name } : { fileId: a.fileId })),
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
   * The room browser: a page of public rooms (never private or direct-message rooms),
   * whether or not this user is a member, by name after `after` (exclusive; "" or absent
   * for the first page). `limit`: rooms per page (absent or 0: the server's 50; it
   * answers at most 200). `more`: ask again with `after` = the last room's name.
   */
  async publicRooms(opts: { after?: string; limit?: number } = {}): Promise<PublicRoomPage> {
    const k = await this.#call({ rooms: { public: true, after: opts.after ?? "", limit: opts.limit ?? 0 } });
    return { rooms: (k.rooms?.rooms ?? []).map(toRoom), more: !!k.rooms?.more };
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

  /**
   * Walks a room's log backwards, newest first, a page at a time (`pageSize`, default the
   * server's), starting before `before` (default: the newest message):
   * `for await (const m of c.iterateHistory("lobby")) { … if (enough) break; }`.
   */
  async *iterateHistory(room: string, opts: { before?: number; pageSize?: number } = {}): AsyncGenerator<ChatMessage, void, undefined> {
    let before = opts.before;
    for (;;) {
      const page = await this.history(room, { before, limit: opts.pageSize });
      for (let i = page.messages.length - 1; i >= 0; i--) yield page.messages[i]!;
      const oldest = page.messages[0];
      if (!page.more || !oldest || oldest.seq <= 1) return;
      before = oldest.seq;
    }
  }

  /** A room's members with their presence (online, last seen). */
  async roster(room: string): Promise<RosterEntry[]> {
    const users = await this.members(room);
    const seen = new Map<string, PresenceEvent>();
    for (let i = 0; i < users.length; i += 500) {
      for (const p of await this.presence(users.slice(i, i + 500))) seen.set(p.user, p);
    }
    return users.map((user) => seen.get(user) ?? { user, online: false, lastSeen: 0 });
  }

  /**
   * Uploads a file (`POST /api/v1/files`, streamed by the server) for a later
   * `send(room, body, { attachments: [attachment] })`; reports progress in browsers.
   * Rejects with a ParleyError whose code is the server's (`ERROR_CODE_FILE_TOO_LARGE` …).
   */
  async upload(file: Blob, opts: UploadOptions = {}): Promise<Attachment> {
    const name = opts.name ?? ((file as { name?: string }).name || "file");
    const url = `${this.#base}/api/v1/files?name=${encodeURIComponent(name)}`;
    const token = await this.#httpToken();
    const fail = (status: number, text: string): ParleyError => {
      try {
        const e = JSON.parse(text);
        return new ParleyError(e.message ?? `upload: HTTP ${status}`, e.code ?? `HTTP_${status}`);
      } catch {
        return new ParleyError(`upload: HTTP ${status}`, `HTTP_${status}`);
      }
    };
    if (typeof XMLHttpRequest === "undefined") {
      // Node and workers without XHR: fetch, progress only at the end.
      const r = await fetch(url, { method: "POST", headers: { authorization: `Bearer ${token}` }, body: file, signal: opts.signal });
      const text = await r.text();
      if (r.status !== 201) throw fail(r.status, text);
      opts.onProgress?.(file.size, file.size);
      return toAttachment(JSON.parse(text));
    }
    return new Promise<Attachment>((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", url);
      xhr.setRequestHeader("authorization", `Bearer ${token}`);
      xhr.upload.onprogress = (e) => opts.onProgress?.(e.loaded, e.lengthComputable ? e.total : file.size);
      xhr.onload = () => {
        if (xhr.status !== 201) return reject(fail(xhr.status, xhr.responseText));
        opts.onProgress?.(file.size, file.size);
        try {
          resolve(toAttachment(JSON.parse(xhr.responseText)));
        } catch {
          reject(new ParleyError("upload: bad reply"));
        }
      };
      xhr.onerror = () => reject(new ParleyError("upload failed (network, or this origin is not in the server's allowed_origins)", "NETWORK"));
      xhr.onabort = () => reject(new ParleyError("upload aborted", "ABORTED"));
      opts.signal?.addEventListener("abort", () => xhr.abort(), { once: true });
      xhr.send(file);
    });
  }

  /**
   * A short-lived signed URL for a file (for `<img src>`, where no header can be sent);
   * absolute, valid about 5 minutes.
   */
  async fileUrl(fileId: string): Promise<string> {
    const token = await this.#httpToken();
    const r = await fetch(`${this.#base}/api/v1/files/${encodeURIComponent(fileId)}/url`, {
      method: "POST",
      headers: { authorization: `Bearer ${token}` },
    });
    const text = await r.text();
    let v: { url?: string; code?: string; message?: string } = {};
    try {
      v = JSON.parse(text);
    } catch {
      /* not JSON */
    }
    if (!r.ok || !v.url) throw new ParleyError(v.message ?? `fileUrl: HTTP ${r.status}`, v.code ?? `HTTP_${r.status}`);
    return new URL(v.url, this.#base + "/").href;
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
  /** Files from `upload()` to show with the message (only `fileId` is needed; `name` renames). At most 10. */
  attachments?: { fileId: string; name?: string }[];
  /** Defaults to a random UUID. Reuse one to make a retry of your own idempotent. */
  clientMsgId?: string;
}

export default Parley;
