// Per-room delivery in seq order, exactly once.
//
// Every room's log numbers messages 1, 2, 3 ... without gaps. The sequencer remembers the
// last seq delivered per room, drops anything at or below it (a duplicate: replayed on
// resume, returned by a sync that overlaps live traffic), delivers the next one, and holds
// anything beyond a gap until the gap is filled (by a `sync` from the last delivered seq),
// then releases the held messages in order.

export interface Sequenced {
  room: string;
  seq: number;
}

export interface Offered<M> {
  /** Messages to deliver now, in seq order. */
  deliver: M[];
  /** Set when the room has a gap: sync it from this seq (the last delivered one). */
  gapAfter?: number;
}

/** Most messages held behind a gap per room; beyond that the sync brings them anyway. */
export const MAX_HELD = 1000;

export class Sequencer<M extends Sequenced> {
  private last = new Map<string, number>();
  private held = new Map<string, Map<number, M>>();

  /** The last seq delivered for the room (undefined: room not tracked yet). */
  lastSeq(room: string): number | undefined {
    return this.last.get(room);
  }

  /** Every tracked room with its last delivered seq. */
  positions(): Map<string, number> {
    return new Map(this.last);
  }

  /** Starts tracking a room from `seq` (what the client already has or does not want).
   * Does nothing for a room already tracked. */
  baseline(room: string, seq: number): void {
    if (!this.last.has(room)) this.last.set(room, seq);
  }

  /** Whether the room has messages held behind a gap. */
  hasGap(room: string): boolean {
    return (this.held.get(room)?.size ?? 0) > 0;
  }

  offer(msg: M): Offered<M> {
    const last = this.last.get(msg.room);
    if (last === undefined) {
      // A room we knew nothing of (a new DM, an invitation): start from this message.
      this.last.set(msg.room, msg.seq);
      return { deliver: [msg] };
    }
    if (msg.seq <= last) return { deliver: [] };
    if (msg.seq === last + 1) {
      const deliver = [msg];
      let next = msg.seq;
      const held = this.held.get(msg.room);
      while (held) {
        const m = held.get(next + 1);
        if (!m) break;
        held.delete(next + 1);
        deliver.push(m);
        next++;
      }
      this.last.set(msg.room, next);
      if (held) {
        for (const s of held.keys()) if (s <= next) held.delete(s);
        if (held.size === 0) this.held.delete(msg.room);
      }
      return { deliver, gapAfter: held && held.size > 0 ? next : undefined };
    }
    let held = this.held.get(msg.room);
    if (!held) this.held.set(msg.room, (held = new Map()));
    if (held.size < MAX_HELD) held.set(msg.seq, msg);
    return { deliver: [], gapAfter: last };
  }
}
