// The SDK's estimate of the network it is on (issue 21): round-trip time and loss from
// its own pings, connections that dropped, and `navigator.connection` where the browser
// has it. The client (parley.ts) asks `weak()` when it picks a transport: on a weak
// network it prefers WebTransport (QUIC: loss recovery in about one round trip, no
// 200 ms minimum retransmission timeout, and a new connection in one round trip).
//
// Loss is not visible to a page over TCP: the kernel retransmits and the bytes arrive
// late, in order. So a ping whose round trip is far above the floor (the smallest round
// trip seen) counts as a loss event — the pong waited behind a retransmission — and so
// does a ping that got no pong at all.

import type { NetworkEstimate } from "./parley.js";

export interface NetworkThresholds {
  /** Median round trip at or above which the network is weak (ms). */
  weakRttMs: number;
  /** Loss ratio at or above which the network is weak. */
  weakLoss: number;
  /** Round trips needed before RTT and loss are judged at all (and loss needs two events). */
  minSamples: number;
}

export const NETWORK_DEFAULTS: NetworkThresholds = { weakRttMs: 300, weakLoss: 0.06, minSamples: 10 };

/** Samples kept (the window). */
const WINDOW = 60;
/** Drops within this long count (ms), and this many make the network weak. */
const DROP_WINDOW_MS = 5 * 60_000;
const WEAK_DROPS = 2;
/** A round trip this far above the floor (factor × floor + slack) is a stall. */
const STALL_FACTOR = 2;
const STALL_SLACK_MS = 80;

const SLOW_TYPES = new Set(["slow-2g", "2g", "3g"]);

interface NetworkInformationLike {
  effectiveType?: string;
  rtt?: number;
}

export class NetworkMonitor {
  /** Round trips in ms; NaN = a ping that got no answer. */
  #samples: number[] = [];
  #drops: number[] = [];

  constructor(
    private thresholds: NetworkThresholds = NETWORK_DEFAULTS,
    private now: () => number = Date.now,
    private connection: () => NetworkInformationLike | undefined = () =>
      (globalThis.navigator as { connection?: NetworkInformationLike } | undefined)?.connection,
  ) {}

  /** A ping answered after `ms`. */
  rtt(ms: number): void {
    this.#push(Math.max(0, ms));
  }

  /** A ping that got no answer within its bound. */
  lost(): void {
    this.#push(Number.NaN);
  }

  /** A connection that had opened dropped (heartbeat timeout, reset), not a server `disconnect`. */
  dropped(): void {
    this.#drops.push(this.now());
    if (this.#drops.length > 20) this.#drops.shift();
  }

  #push(v: number): void {
    this.#samples.push(v);
    if (this.#samples.length > WINDOW) this.#samples.shift();
  }

  estimate(): NetworkEstimate {
    const t = this.thresholds;
    const answered = this.#samples.filter((v) => !Number.isNaN(v)).sort((a, b) => a - b);
    const rttMs = answered.length ? answered[Math.floor((answered.length - 1) / 2)]! : -1;
    const minRttMs = answered.length ? answered[0]! : -1;
    const stall = minRttMs * STALL_FACTOR + STALL_SLACK_MS;
    const lostCount = this.#samples.filter((v) => Number.isNaN(v) || v > stall).length;
    const samples = this.#samples.length;
    const lossRatio = samples ? lostCount / samples : 0;
    const since = this.now() - DROP_WINDOW_MS;
    const recentDrops = this.#drops.filter((d) => d >= since).length;
    let effectiveType = "";
    let reason = "";
    try {
      const c = this.connection();
      effectiveType = typeof c?.effectiveType === "string" ? c.effectiveType : "";
    } catch {
      /* not readable */
    }
    // Two events at least: one stall may be the page's own pause (a long task, GC).
    if (samples >= t.minSamples && lostCount >= 2 && lossRatio >= t.weakLoss) reason = "loss";
    else if (answered.length >= t.minSamples && rttMs >= t.weakRttMs) reason = "rtt";
    else if (recentDrops >= WEAK_DROPS) reason = "drops";
    else if (SLOW_TYPES.has(effectiveType)) reason = "effectiveType";
    return { rttMs, minRttMs, lossRatio, samples, recentDrops, effectiveType, weak: reason !== "", reason };
  }

  /** Forgets the round trips (after a move to another path: the floor may differ). */
  resetSamples(): void {
    this.#samples = [];
  }
}
