// Unit tests (node's test runner) of the SDK's delivery logic: backoff, the per-room
// sequencer (gap detection, duplicate drop), the network estimate (what counts as a
// weak network), and the client's gap filling, dedupe, send retry and close() against
// a scripted in-memory WebSocket (and a `fetch` stand-in where a test needs SSE). The
// TypeScript sources are bundled with esbuild into a temp dir first, so the tests run
// the code the build ships.
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { after, before, describe, test } from "node:test";
import * as esbuild from "esbuild";
import { REPO, WEB } from "./helpers.mjs";

let mod;
const out = mkdtempSync(join(tmpdir(), "parley-unit-"));
before(async () => {
  await esbuild.build({
    entryPoints: {
      backoff: join(WEB, "src/backoff.ts"),
      sequencer: join(WEB, "src/sequencer.ts"),
      network: join(WEB, "src/network.ts"),
      parley: join(WEB, "src/parley.ts"),
    },
    outdir: out,
    bundle: true,
    format: "esm",
    platform: "neutral",
    logLevel: "warning",
  });
  // The SDK's codec next to the reference implementation (protobuf-es reflection) for
  // cross-checking; the SDK bundle itself ships only the tables and the wire reader/writer.
  writeFileSync(
    join(out, "codec-entry.mjs"),
    `export { encodeProto, decodeProto } from ${JSON.stringify(join(WEB, "src/wire.ts"))};
     export { ClientFrameSchema, ServerFrameSchema } from ${JSON.stringify(join(WEB, "src/gen/parley/v1/frames_pb.ts"))};
     export { fromJson, toJson, toBinary, fromBinary } from "@bufbuild/protobuf";`,
  );
  await esbuild.build({
    entryPoints: { codec: join(out, "codec-entry.mjs") },
    outdir: out,
    bundle: true,
    format: "esm",
    platform: "neutral",
    nodePaths: [join(WEB, "node_modules")],
    logLevel: "warning",
  });
  const load = (n) => import(pathToFileURL(join(out, `${n}.js`)).href);
  mod = {
    ...(await load("backoff")),
    ...(await load("sequencer")),
    ...(await load("network")),
    Parley: (await load("parley")).Parley,
    codec: await load("codec"),
  };
});
after(async () => {
  // esbuild's service process is unref'd between builds, but one CI run hung after the
  // last test with it alive: stopping it leaves nothing to hold this process open.
  await esbuild.stop();
  rmSync(out, { recursive: true, force: true });
});

describe("backoff", () => {
  test("full jitter between the floor and an exponential ceiling, capped", () => {
    const { backoffDelay } = mod;
    for (let attempt = 0; attempt < 12; attempt++) {
      const ceiling = Math.min(20_000, 500 * 2 ** attempt);
      assert.equal(backoffDelay(attempt, 500, 20_000, () => 0), 500, "never below the floor");
      assert.ok(Math.abs(backoffDelay(attempt, 500, 20_000, () => 1) - ceiling) < 1e-9, "up to the ceiling");
      for (let i = 0; i < 50; i++) {
        const d = backoffDelay(attempt, 500, 20_000);
        assert.ok(d >= 500 && d <= ceiling, `attempt ${attempt}: ${d} in [500, ${ceiling}]`);
      }
    }
    assert.equal(backoffDelay(1000, 500, 20_000, () => 1), 20_000, "capped at the maximum");
    assert.ok(backoffDelay(0, 0, 0, () => 0) >= 1, "a zero configuration still waits");
  });

  test("the counter grows per failure and resets", () => {
    const b = new mod.Backoff(100, 1000, () => 1);
    assert.deepEqual([b.next(), b.next(), b.next(), b.next(), b.next()], [100, 200, 400, 800, 1000]);
    b.reset();
    assert.equal(b.next(), 100);
  });

  test("delays are spread out (jitter), not all equal", () => {
    const seen = new Set(Array.from({ length: 20 }, () => Math.round(mod.backoffDelay(5, 500, 20_000))));
    assert.ok(seen.size > 10, `spread: ${[...seen]}`);
  });
});

describe("protobuf codec", () => {
  // Every JSON example in docs/PROTOCOL.md (the frames the server is tested against),
  // plus frames that exercise what the examples do not.
  function examples() {
    const doc = readFileSync(join(REPO, "docs/PROTOCOL.md"), "utf8");
    const out = [];
    for (const m of doc.matchAll(/```json (client|server) [^\n]*\n([\s\S]*?)```/g)) {
      out.push([m[1] === "client" ? "ClientFrame" : "ServerFrame", JSON.parse(m[2].replaceAll('"$ANY"', '"1"'))]);
    }
    return out;
  }
  const extra = [
    ["ServerFrame", { disconnect: { code: 4001, reason: "unauthorized", reconnect: true } }],
    ["ServerFrame", { pos: "18446744073709551615", message: { room: "r", seq: "9007199254740993", sender: "é", body: "héllo ✓ 🎉", ts: "1764230400000", metadata: { a: "1", "ü": "" } } }],
    ["ServerFrame", { id: "7", error: { code: "ERROR_CODE_SESSION_NOT_FOUND", message: "gone" } }],
    ["ServerFrame", { id: "2", sync: { rooms: [{ room: "a", more: true }, { room: "b", messages: [{ room: "b", seq: "1" }] }] } }],
    ["ServerFrame", { id: "3", presenceList: { users: [{ user: "x", online: true }, { user: "y", lastSeen: "12" }] } }],
    ["ServerFrame", { id: "4", done: {} }],
    ["ClientFrame", { id: "5", sync: { rooms: { a: "0", b: "42" }, limit: 10 } }],
    ["ClientFrame", { id: "6", history: { room: "a", beforeSeq: "10", afterSeq: "0", limit: 5 } }],
    ["ClientFrame", { ack: { pos: "3" } }],
    ["ClientFrame", { id: "8", presence: { users: ["a", "b", "c"] } }],
  ];

  test("agrees with the reference implementation both ways, on every documented frame", () => {
    const c = mod.codec;
    const all = [...examples(), ...extra];
    assert.ok(all.length > 60, `examples found: ${all.length}`);
    for (const [name, json] of all) {
      const schema = name === "ClientFrame" ? c.ClientFrameSchema : c.ServerFrameSchema;
      const ref = c.fromJson(schema, json, { ignoreUnknownFields: true });
      const canonical = c.toJson(schema, ref);
      const mine = c.encodeProto(name, json);
      assert.deepEqual(c.toJson(schema, c.fromBinary(schema, mine)), canonical, `encode ${JSON.stringify(json)}`);
      assert.deepEqual(c.decodeProto(name, c.toBinary(schema, ref)), canonical, `decode ${JSON.stringify(json)}`);
    }
  });

  test("skips unknown fields", () => {
    const c = mod.codec;
    // ServerFrame{ id: 1, field 99 (string "x"), pong: { ts: 5 } }
    const bytes = Uint8Array.from([0x08, 0x01, 0x9a, 0x06, 0x01, 0x78, 0x8a, 0x01, 0x02, 0x08, 0x05]);
    assert.deepEqual(c.decodeProto("ServerFrame", bytes), { id: "1", pong: { ts: "5" } });
  });
});

const msg = (room, seq) => ({ room, seq, body: `${room}#${seq}` });
const seqs = (r) => r.deliver.map((m) => m.seq);

describe("sequencer", () => {
  test("delivers in order and drops duplicates", () => {
    const s = new mod.Sequencer();
    s.baseline("a", 0);
    assert.deepEqual(seqs(s.offer(msg("a", 1))), [1]);
    assert.deepEqual(seqs(s.offer(msg("a", 2))), [2]);
    for (const dup of [2, 1]) {
      const r = s.offer(msg("a", dup));
      assert.deepEqual(seqs(r), [], `seq ${dup} again is dropped`);
      assert.equal(r.gapAfter, undefined, "a duplicate is not a gap");
      assert.ok(!s.hasGap("a"), "nor held");
    }
    assert.equal(s.lastSeq("a"), 2);
  });

  test("holds messages behind a gap, asks to fill it, then releases them in order", () => {
    const s = new mod.Sequencer();
    s.baseline("a", 3);
    let r = s.offer(msg("a", 6));
    assert.deepEqual(seqs(r), []);
    assert.equal(r.gapAfter, 3, "sync from seq 3");
    r = s.offer(msg("a", 5));
    assert.equal(r.gapAfter, 3);
    assert.ok(s.hasGap("a"));
    r = s.offer(msg("a", 4)); // the fill (from sync)
    assert.deepEqual(seqs(r), [4, 5, 6]);
    assert.equal(r.gapAfter, undefined);
    assert.ok(!s.hasGap("a"));
    // The sync reply overlapping what was released: all duplicates.
    assert.deepEqual(seqs(s.offer(msg("a", 5))), []);
    assert.deepEqual(seqs(s.offer(msg("a", 6))), []);
    assert.deepEqual(seqs(s.offer(msg("a", 7))), [7]);
  });

  test("a partial fill leaves the rest of the gap reported", () => {
    const s = new mod.Sequencer();
    s.baseline("a", 0);
    s.offer(msg("a", 2));
    s.offer(msg("a", 5));
    const r = s.offer(msg("a", 1));
    assert.deepEqual(seqs(r), [1, 2]);
    assert.equal(r.gapAfter, 2, "3 and 4 still missing");
  });

  test("rooms are independent; an unknown room starts at its first message", () => {
    const s = new mod.Sequencer();
    s.baseline("a", 10);
    s.baseline("a", 0); // a second baseline changes nothing
    assert.deepEqual(seqs(s.offer(msg("b", 7))), [7]);
    assert.deepEqual(seqs(s.offer(msg("a", 11))), [11]);
    assert.deepEqual(seqs(s.offer(msg("b", 8))), [8]);
    assert.deepEqual(Object.fromEntries(s.positions()), { a: 11, b: 8 });
  });

  test("the hold buffer is bounded", () => {
    const s = new mod.Sequencer();
    s.baseline("a", 0);
    for (let i = 0; i < mod.MAX_HELD + 50; i++) s.offer(msg("a", 2 + i));
    // Filling seq 1 releases only what was held; the rest comes from the sync.
    const r = s.offer(msg("a", 1));
    assert.equal(r.deliver.length, 1 + mod.MAX_HELD);
  });
});

describe("network estimate", () => {
  const monitor = (conn, now = () => 1_000_000) => new mod.NetworkMonitor(mod.NETWORK_DEFAULTS, now, () => conn);

  test("a clean path is not weak; nothing is judged before minSamples", () => {
    const m = monitor(undefined);
    for (let i = 0; i < 9; i++) m.rtt(i === 3 ? 900 : 100); // one huge stall, too few samples
    assert.equal(m.estimate().weak, false, "9 samples: no verdict yet");
    for (let i = 0; i < 30; i++) m.rtt(100 + (i % 7));
    const e = m.estimate();
    assert.equal(e.weak, false, JSON.stringify(e));
    assert.equal(e.minRttMs, 100);
    assert.ok(e.rttMs >= 100 && e.rttMs <= 106, `median ${e.rttMs}`);
    assert.equal(e.samples, 39);
  });

  test("one stall is not loss (a page pause); two in the window are", () => {
    const m = monitor(undefined);
    for (let i = 0; i < 20; i++) m.rtt(100);
    m.rtt(400); // RTT + a retransmission timeout: the pong waited behind a lost segment
    assert.equal(m.estimate().weak, false, "a single stall");
    m.rtt(380);
    const e = m.estimate();
    assert.equal(e.weak, true);
    assert.equal(e.reason, "loss");
    assert.ok(Math.abs(e.lossRatio - 2 / 22) < 1e-9, `loss ${e.lossRatio}`);
  });

  test("unanswered pings count as loss; a stall is judged against the floor, not a fixed time", () => {
    const m = monitor(undefined);
    for (let i = 0; i < 30; i++) m.rtt(2);
    m.lost();
    m.lost();
    assert.equal(m.estimate().reason, "loss");
    const slow = monitor(undefined);
    for (let i = 0; i < 30; i++) slow.rtt(i % 2 ? 150 : 200); // jitter well under 2 × floor + 80 ms
    assert.equal(slow.estimate().weak, false, JSON.stringify(slow.estimate()));
  });

  test("a high round trip, recent drops and a slow navigator.connection each make it weak", () => {
    const far = monitor(undefined);
    for (let i = 0; i < 12; i++) far.rtt(320);
    assert.equal(far.estimate().reason, "rtt");
    let t = 0;
    const dropping = monitor(undefined, () => t);
    dropping.dropped();
    assert.equal(dropping.estimate().weak, false, "one drop");
    t = 60_000;
    dropping.dropped();
    assert.equal(dropping.estimate().reason, "drops");
    t = 10 * 60_000;
    assert.equal(dropping.estimate().weak, false, "drops older than 5 min are forgotten");
    assert.equal(monitor({ effectiveType: "3g" }).estimate().reason, "effectiveType");
    assert.equal(monitor({ effectiveType: "4g" }).estimate().weak, false);
    assert.equal(monitor({ effectiveType: "4g" }).estimate().effectiveType, "4g");
  });

  test("the window forgets old samples", () => {
    const m = monitor(undefined);
    for (let i = 0; i < 20; i++) m.rtt(i < 3 ? 500 : 100);
    assert.equal(m.estimate().weak, true, "3 stalls in 20");
    for (let i = 0; i < 60; i++) m.rtt(100);
    assert.equal(m.estimate().weak, false, "pushed out of the 60-sample window");
  });
});

// ---------------------------------------------------------------- client, scripted server

/** A WebSocket stand-in the test drives: it records what the client sends. */
class FakeSocket {
  static all = [];
  static OPEN = 1;
  static CONNECTING = 0;
  constructor(url, protocol) {
    this.url = url;
    this.protocol = protocol;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.all.push(this);
    this.waiters = [];
  }
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  send(data) {
    const frame = JSON.parse(data);
    this.sent.push(frame);
    for (const w of this.waiters.splice(0)) w();
  }
  close() {
    this.readyState = 3;
  }
  /** The server drops the connection. */
  drop(code = 1006) {
    this.readyState = 3;
    this.onclose?.({ code, reason: "" });
  }
  push(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  async next(kind) {
    for (;;) {
      const f = this.sent.find((x) => x[kind] !== undefined && !x.seen);
      if (f) {
        f.seen = true;
        return f;
      }
      await new Promise((r) => this.waiters.push(r));
    }
  }
}

async function waitFor(fn, ms = 2000) {
  const end = Date.now() + ms;
  while (!fn()) {
    if (Date.now() > end) throw new Error("timed out");
    await new Promise((r) => setTimeout(r, 2));
  }
}

function client(opts = {}) {
  FakeSocket.all = [];
  globalThis.WebSocket = FakeSocket;
  return new mod.Parley("http://chat.test", {
    token: "t",
    transports: ["websocket"],
    encoding: "json",
    backoffMinMs: 20,
    backoffMaxMs: 40,
    pingIntervalMs: 60_000,
    ...opts,
  });
}

async function connect(c, { sessionId = "s1", resumed = false, rooms = [] } = {}) {
  await waitFor(() => FakeSocket.all.length > 0 && FakeSocket.all.at(-1).onopen);
  const ws = FakeSocket.all.at(-1);
  ws.open();
  const f = await ws.next("connect");
  ws.push({ id: f.id, connected: { sessionId, userId: "alice", resumed, heartbeatMs: 25000, rooms } });
  await waitFor(() => c.state === "connected");
  return { ws, connect: f };
}

const message = (room, seq, pos) => ({
  pos: String(pos),
  message: { room, seq: String(seq), sender: "bob", clientMsgId: `b-${seq}`, body: `m${seq}`, ts: "1" },
});

/**
 * A `fetch` stand-in for an SSE server: `/sse` answers with a stream that starts with
 * `connected` (session s1) and stays open until aborted; every other request is a 200.
 */
async function sseServer(url, init = {}) {
  if (!String(url).includes("/sse?")) return new Response("{}", { status: 200 });
  const hello = `data: ${JSON.stringify({ connected: { sessionId: "s1", userId: "alice", heartbeatMs: 25000, rooms: [] } })}\n\n`;
  const body = new ReadableStream({
    start(ctl) {
      ctl.enqueue(new TextEncoder().encode(hello));
      init.signal?.addEventListener("abort", () => ctl.error(new Error("aborted")));
    },
  });
  return new Response(body, { status: 200, headers: { "content-type": "text/event-stream" } });
}

describe("client", () => {
  test("fills a seq gap in live traffic by sync and drops duplicates", async () => {
    const c = client();
    const got = [];
    c.on("message", (m) => got.push(m.seq));
    const { ws } = await connect(c, { rooms: [{ room: "lobby", lastSeq: "1" }] });
    ws.push(message("lobby", 2, 1));
    ws.push(message("lobby", 5, 2)); // 3 and 4 went missing
    const sync = await ws.next("sync");
    assert.deepEqual(sync.sync.rooms, { lobby: "2" }, "sync from the last seq delivered");
    assert.deepEqual(got, [2], "5 is held behind the gap");
    ws.push(message("lobby", 6, 3)); // live traffic continues meanwhile
    ws.push({
      id: sync.id,
      sync: { rooms: [{ room: "lobby", messages: [3, 4, 5].map((s) => message("lobby", s, 0).message) }] },
    });
    await waitFor(() => got.length === 5);
    assert.deepEqual(got, [2, 3, 4, 5, 6]);
    ws.push(message("lobby", 6, 4)); // the same message again (new position)
    ws.push(message("lobby", 7, 3)); // a replayed position
    ws.push(message("lobby", 7, 5));
    await waitFor(() => got.length === 6);
    assert.deepEqual(got, [2, 3, 4, 5, 6, 7]);
    assert.equal(c.stats.gapsFilled, 1);
    assert.ok(c.stats.duplicatesDropped >= 1);
    c.close();
  });

  test("a send interrupted by a drop is resent with the same clientMsgId and resolves once", async () => {
    const c = client();
    const { ws } = await connect(c);
    ws.push(message("lobby", 1, 1));
    ws.push(message("lobby", 2, 2));
    const sent = c.send("lobby", "hello");
    const first = await ws.next("send");
    assert.ok(first.send.clientMsgId, "a client message id");
    ws.drop(); // no reply: was it stored? The client cannot know.
    assert.equal(c.pendingSends, 1);
    const { ws: ws2, connect: again } = await connect(c, { sessionId: "s1", resumed: true });
    assert.equal(again.connect.sessionId, "s1", "resumes the session");
    assert.equal(again.connect.lastPos, "2", "from the last position seen");
    const retry = await ws2.next("send");
    assert.equal(retry.send.clientMsgId, first.send.clientMsgId, "same id: the server dedupes");
    assert.equal(retry.send.body, "hello");
    ws2.push({ id: retry.id, sent: { room: "lobby", seq: "3", ts: "1", duplicate: true } });
    assert.equal(await sent, 3);
    assert.equal(c.pendingSends, 0);
    c.close();
  });

  test("a new session (server restarted) syncs every room it is behind in", async () => {
    const c = client();
    const got = [];
    c.on("message", (m) => got.push(`${m.room}:${m.seq}`));
    const { ws } = await connect(c, { rooms: [{ room: "a", lastSeq: "1" }, { room: "b", lastSeq: "0" }] });
    ws.push(message("a", 2, 1));
    ws.drop();
    const { ws: ws2 } = await connect(c, {
      sessionId: "s2",
      resumed: false,
      rooms: [{ room: "a", lastSeq: "4" }, { room: "b", lastSeq: "0" }],
    });
    const sync = await ws2.next("sync");
    assert.deepEqual(sync.sync.rooms, { a: "2" });
    ws2.push({ id: sync.id, sync: { rooms: [{ room: "a", messages: [3, 4].map((s) => message("a", s, 0).message) }] } });
    await waitFor(() => got.length === 3);
    assert.deepEqual(got, ["a:2", "a:3", "a:4"]);
    ws2.push(message("a", 5, 1)); // positions restart with the new session
    await waitFor(() => got.length === 4);
    c.close();
  });

  test("failures back off: never a zero-delay reconnect loop", async () => {
    const c = client({ backoffMinMs: 50, backoffMaxMs: 100 });
    const starts = [];
    const seen = new Set();
    const end = Date.now() + 600;
    while (Date.now() < end) {
      for (const ws of FakeSocket.all) {
        if (!seen.has(ws)) {
          seen.add(ws);
          starts.push(Date.now());
          queueMicrotask(() => ws.drop(1006)); // refused before opening
        }
      }
      await new Promise((r) => setTimeout(r, 1));
    }
    c.close();
    assert.ok(starts.length >= 3, `kept trying: ${starts.length}`);
    assert.ok(starts.length <= 13, `but not in a tight loop: ${starts.length} attempts in 600 ms`);
    for (let i = 1; i < starts.length; i++) assert.ok(starts[i] - starts[i - 1] >= 45, `gap ${starts[i] - starts[i - 1]} ms`);
  });

  test("close() during a connect attempt is final: no reconnect after it", async () => {
    // The attempt's failure (close() ends it) must not put the client back into its
    // reconnect loop: it did, and a closed client dialled again every backoff, for ever
    // (two CI runs hung on a node process that such a client kept alive).
    const c = client({ backoffMinMs: 5, backoffMaxMs: 10, connectTimeoutMs: 100 });
    await waitFor(() => FakeSocket.all.length === 1);
    const states = [];
    c.on("state", (s) => states.push(s.state));
    c.close();
    assert.equal(FakeSocket.all[0].readyState, 3, "the pending socket is closed");
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(FakeSocket.all.length, 1, "no socket dialled after close()");
    assert.equal(c.state, "closed");
    assert.deepEqual(states, ["closed"], "closed stays closed");
  });

  test("close() while a probe moves the session back to WebSocket ends the probe too", async () => {
    // On SSE (WebSocket refused at first), the client probes WebSocket again; a close()
    // while that probe connects must end it: a probe that opened afterwards took over a
    // closed client (`connected` emitted, the new transport pumped, a session held).
    const realFetch = globalThis.fetch;
    globalThis.fetch = sseServer;
    try {
      const c = client({ transports: ["websocket", "sse"], probeWebSocketMs: 20 });
      await waitFor(() => FakeSocket.all.length === 1 && FakeSocket.all[0].onclose);
      FakeSocket.all[0].drop(1006); // WebSocket refused: on to SSE
      await waitFor(() => c.state === "connected" && c.transport === "sse");
      await waitFor(() => FakeSocket.all.length === 2 && FakeSocket.all[1].onopen); // the probe
      const probe = FakeSocket.all[1];
      const after = [];
      c.on("connected", () => after.push("connected"));
      c.close();
      assert.equal(probe.readyState, 3, "the probe's socket is closed with the client");
      // Were it still going, the server's answer would hand it the session.
      probe.open();
      await new Promise((r) => setTimeout(r, 100));
      const connect = probe.sent.find((f) => f.connect);
      if (connect) probe.push({ id: connect.id, connected: { sessionId: "s1", userId: "alice", resumed: true, heartbeatMs: 25000, rooms: [] } });
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(c.state, "closed");
      assert.equal(c.transport, null, "no transport after close()");
      assert.deepEqual(after, [], "no connected event after close()");
      assert.equal(FakeSocket.all.length, 2, "nothing dialled after close()");
    } finally {
      globalThis.fetch = realFetch;
    }
  });

  test("close() while a probe waits for getToken: the probe never dials", async () => {
    const realFetch = globalThis.fetch;
    globalThis.fetch = sseServer;
    try {
      let calls = 0;
      let release;
      const held = new Promise((r) => (release = r));
      // The first two tokens (WebSocket, then SSE) at once; the probe's waits.
      const c = client({ transports: ["websocket", "sse"], probeWebSocketMs: 20, getToken: async () => (++calls <= 2 ? "t" : held) });
      await waitFor(() => FakeSocket.all.length === 1 && FakeSocket.all[0].onclose);
      FakeSocket.all[0].drop(1006);
      await waitFor(() => c.state === "connected" && c.transport === "sse");
      await waitFor(() => calls === 3); // the probe asked for its token
      c.close();
      release("t");
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(FakeSocket.all.length, 1, "the probe did not dial after close()");
      assert.equal(c.state, "closed");
    } finally {
      globalThis.fetch = realFetch;
    }
  });
});
