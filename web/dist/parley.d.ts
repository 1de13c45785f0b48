// parley browser SDK: type declarations for parley.js (generated).
/** The reconnect backoff bounds and the fail-before-open bound, in ms (defaults). */
export declare const DEFAULTS: {
    readonly backoffMinMs: 500;
    readonly backoffMaxMs: 20000;
    readonly connectTimeoutMs: 5000;
    readonly pongTimeoutMs: 10000;
    readonly probeWebSocketMs: 60000;
    readonly pollWaitSeconds: 25;
    readonly webTransportTimeoutMs: 3000;
    readonly networkPings: 20;
    readonly networkPingIntervalMs: 500;
    readonly weakRttMs: number;
    readonly weakLoss: number;
};
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
export interface RosterEntry extends PresenceEvent {
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
export declare class ParleyError extends Error {
    readonly code: string;
    constructor(message: string, code?: string);
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
export declare class Parley {
    #private;
    /** The current connection state. */
    get state(): ConnectionState;
    /** The transport in use (null while not connected). */
    get transport(): TransportName | null;
    /**
     * The network estimate the transport choice is made from: median ping round trip,
     * loss (stalled or unanswered pings), recent drops, `navigator.connection`, and the
     * verdict `weak` with its `reason`.
     */
    get network(): NetworkEstimate;
    /** The authenticated user id (after the first `connected`). */
    get userId(): string;
    /** Failed connection rounds in a row (0 while connected). */
    get attempt(): number;
    readonly stats: ParleyStats;
    constructor(url: string, options?: ParleyOptions);
    /** Subscribes to an event; returns a function that unsubscribes. */
    on<K extends keyof ParleyEvents>(event: K, fn: Listener<ParleyEvents[K]>): () => void;
    off<K extends keyof ParleyEvents>(event: K, fn: Listener<ParleyEvents[K]>): void;
    /**
     * The next occurrence of an event only: with `fn`, calls it once (returns a function that
     * cancels); without, a promise of the event.
     */
    once<K extends keyof ParleyEvents>(event: K, fn: Listener<ParleyEvents[K]>): () => void;
    once<K extends keyof ParleyEvents>(event: K): Promise<ParleyEvents[K]>;
    /**
     * Resolves once connected (at once if connected now); rejects when the client is closed
     * (with the terminal error, e.g. a refused token).
     */
    ready(): Promise<void>;
    /** Ends a backoff wait now and tries to connect (e.g. a "retry now" button). */
    retryNow(): void;
    /** Starts connecting (done by the constructor unless `autoConnect: false`). */
    connect(): void;
    /**
     * Closes the client for good: ends the session on the server (the `end` command, so it
     * is not kept for a resume) and rejects pending commands and sends.
     */
    close(): void;
    /**
     * Sends a message; resolves with its seq once the server has stored it. Retried across
     * reconnects with the same client message id until acknowledged, so it is delivered
     * exactly once.
     */
    send(room: string, body: string, opts?: SendOptions): Promise<number>;
    /** Sends a direct message to `user`; resolves with the DM room and seq. */
    sendDirect(user: string, body: string, opts?: SendOptions): Promise<SentResult>;
    /** Messages sent but not yet acknowledged. */
    get pendingSends(): number;
    /** Joins (and creates on first join) a public room; resolves with its last seq. */
    join(room: string): Promise<{
        room: string;
        lastSeq: number;
    }>;
    leave(room: string): Promise<void>;
    createRoom(room: string, opts?: {
        private?: boolean;
    }): Promise<RoomState>;
    invite(room: string, user: string): Promise<void>;
    members(room: string): Promise<string[]>;
    /** The user's rooms with last seq, read marker and unread count. */
    rooms(): Promise<RoomState[]>;
    /**
     * The room browser: a page of public rooms (never private or direct-message rooms),
     * whether or not this user is a member, by name after `after` (exclusive; "" or absent
     * for the first page). `limit`: rooms per page (absent or 0: the server's 50; it
     * answers at most 200). `more`: ask again with `after` = the last room's name.
     */
    publicRooms(opts?: {
        after?: string;
        limit?: number;
    }): Promise<PublicRoomPage>;
    /**
     * A page of a room's log, oldest first: the newest messages (no option), those before
     * `before` (scrollback), or those after `after` (`after: 0` pages from the first).
     */
    history(room: string, opts?: {
        before?: number;
        after?: number;
        limit?: number;
    }): Promise<HistoryPage>;
    /**
     * Walks a room's log backwards, newest first, a page at a time (`pageSize`, default the
     * server's), starting before `before` (default: the newest message):
     * `for await (const m of c.iterateHistory("lobby")) { … if (enough) break; }`.
     */
    iterateHistory(room: string, opts?: {
        before?: number;
        pageSize?: number;
    }): AsyncGenerator<ChatMessage, void, undefined>;
    /** A room's members with their presence (online, last seen). */
    roster(room: string): Promise<RosterEntry[]>;
    /**
     * Uploads a file (`POST /api/v1/files`, streamed by the server) for a later
     * `send(room, body, { attachments: [attachment] })`; reports progress in browsers.
     * Rejects with a ParleyError whose code is the server's (`ERROR_CODE_FILE_TOO_LARGE` …).
     */
    upload(file: Blob, opts?: UploadOptions): Promise<Attachment>;
    /**
     * A short-lived signed URL for a file (for `<img src>`, where no header can be sent);
     * absolute, valid about 5 minutes.
     */
    fileUrl(fileId: string): Promise<string>;
    /** Moves the read marker (only forward). */
    markRead(room: string, seq: number): Promise<void>;
    /** Tells the room's other members the user is typing. Ephemeral: not retried, errors ignored. */
    typing(room: string): Promise<void>;
    presence(users: string[]): Promise<PresenceEvent[]>;
    /** Hands a payload (WebRTC offer/answer/ICE …) to another user's connected sessions. */
    signal(toUser: string, kind: string, payload: string): Promise<void>;
    /** Application-level ping; resolves with the round trip in ms. */
    ping(): Promise<number>;
}
export interface SendOptions {
    metadata?: Record<string, string>;
    /** Files from `upload()` to show with the message (only `fileId` is needed; `name` renames). At most 10. */
    attachments?: {
        fileId: string;
        name?: string;
    }[];
    /** Defaults to a random UUID. Reuse one to make a retry of your own idempotent. */
    clientMsgId?: string;
}
export default Parley;
