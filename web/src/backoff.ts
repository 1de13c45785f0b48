// Reconnect delays: exponential backoff with full jitter and a floor.
//
// Attempt n (0-based) waits a uniformly random time in [min, min(max, min * 2^n)]: the
// first retry after a drop comes after `min`, later ones spread out up to `max`, and
// clients that dropped together (a server restart) do not come back together. The floor
// means there is never a zero-delay reconnect loop.

/** Default floor of a reconnect delay, in ms. */
export const BACKOFF_MIN_MS = 500;
/** Default ceiling of a reconnect delay, in ms. */
export const BACKOFF_MAX_MS = 20_000;

export function backoffDelay(
  attempt: number,
  min = BACKOFF_MIN_MS,
  max = BACKOFF_MAX_MS,
  random: () => number = Math.random,
): number {
  const floor = Math.max(1, min);
  const ceiling = Math.max(floor, Math.min(max, floor * 2 ** Math.min(Math.max(0, attempt), 30)));
  return floor + random() * (ceiling - floor);
}

/** Counts consecutive failures; `next()` gives the delay before the next try. */
export class Backoff {
  attempt = 0;
  constructor(
    readonly min = BACKOFF_MIN_MS,
    readonly max = BACKOFF_MAX_MS,
    private readonly random: () => number = Math.random,
  ) {}
  next(): number {
    return backoffDelay(this.attempt++, this.min, this.max, this.random);
  }
  reset(): void {
    this.attempt = 0;
  }
}
