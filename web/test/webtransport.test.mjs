// WebTransport (`/wt`, HTTP/3 over QUIC) in headless Chromium against the real parley
// binary with a self-signed ECDSA certificate (valid 10 days, trusted by its SHA-256
// through `serverCertificateHashes`), and the SDK's choice of transport by the network:
// through a lossy relay (web/test/relay.mjs: 100 ms RTT, random loss) it moves a live
// session to WebTransport without losing or repeating a message; through the same relay
// without loss it stays on WebSocket; with UDP blocked it falls back to WebSocket within
// its WebTransport timeout.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { ParleyServer, launchBrowser, makeCert, openChat, say, shown, transportOf, waitFor, waitShown } from "./helpers.mjs";
import { LossyRelay } from "./relay.mjs";

let browser;
let server;
let cert;
let dir;
before(async () => {
  dir = mkdtempSync(join(tmpdir(), "parley-wt-test-"));
  cert = makeCert(dir, 10);
  server = await new ParleyServer({ tls: cert }).start();
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
  await server?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** Each body on screen exactly once, seqs strictly ascending. */
function assertOnceInOrder(list, bodies, who) {
  const seen = list.map((m) => m.body);
  for (const b of bodies) assert.equal(seen.filter((x) => x === b).length, 1, `${who}: "${b}" exactly once; screen: ${JSON.stringify(seen)}`);
  const seqs = list.map((m) => m.seq);
  assert.deepEqual(seqs, [...new Set(seqs)].sort((a, b) => a - b), `${who}: seqs unique and ascending`);
}

const sdk = (page, expr, arg) => page.evaluate(expr, arg);

describe("webtransport", () => {
  test("WebTransport with serverCertificateHashes chats with a WebSocket page (protobuf and JSON); a wrong hash falls back", async () => {
    const q = `&webTransport=prefer&certHash=${cert.hash}`;
    const alice = await openChat(browser, server.url, "alice", q);
    const carol = await openChat(browser, server.url, "carol", `${q}&encoding=json`);
    const bob = await openChat(browser, server.url, "bob"); // auto on a clean network: WebSocket
    assert.match((await transportOf(alice)).label, /WebTransport · protobuf/);
    assert.match((await transportOf(carol)).label, /WebTransport · json/);
    assert.equal((await transportOf(bob)).transport, "websocket");
    for (const p of [alice, bob, carol]) await p.waitForSelector('#room-title:text-is("# lobby")');
    await say(alice, "over quic");
    await waitShown(bob, "over quic");
    await waitShown(carol, "over quic");
    await say(bob, "over tcp");
    await waitShown(alice, "over tcp");
    await say(carol, "json on quic");
    await waitShown(alice, "json on quic");
    await waitShown(bob, "json on quic");
    const expected = ["over quic", "over tcp", "json on quic"];
    for (const [p, who] of [[alice, "alice"], [bob, "bob"], [carol, "carol"]]) {
      await waitFor(`${who} shows 3`, async () => (await shown(p)).length >= 3);
      assertOnceInOrder(await shown(p), expected, who);
    }
    // The heartbeat pings on /wt are answered: the estimate has round trips.
    await waitFor("alice has RTT samples", () => sdk(alice, () => window.parley.network.samples > 3));

    // The browser checks the certificate against the hash: a wrong one fails the
    // handshake, and the SDK moves on to WebSocket at once.
    const wrong = await openChat(browser, server.url, "dave", `&webTransport=prefer&certHash=${"00".repeat(32)}`);
    assert.equal((await transportOf(wrong)).transport, "websocket");
    const errors = await sdk(wrong, () => window.parley.stats.attempts);
    assert.ok(errors >= 2, `WebTransport tried first, then WebSocket (attempts ${errors})`);
    for (const p of [alice, bob, carol, wrong]) assert.deepEqual(p.errors, []);
    for (const p of [alice, bob, carol, wrong]) await p.context().close();
  });

  test("UDP blocked: the WebTransport attempt gives way to WebSocket within webTransportTimeoutMs", async () => {
    const relay = await new LossyRelay(server.port, { udp: "drop" }).start();
    try {
      const base = `https://127.0.0.1:${relay.port}`;
      const started = Date.now();
      const alice = await openChat(browser, base, "erin", `&webTransport=prefer&wtTimeout=2000&certHash=${cert.hash}`);
      const took = Date.now() - started;
      assert.equal((await transportOf(alice)).transport, "websocket");
      assert.ok(relay.counts.datagrams > 0 && relay.counts.dropped === relay.counts.datagrams, `QUIC was tried and dropped: ${JSON.stringify(relay.counts)}`);
      assert.ok(took < 2000 + 6000, `connected over WebSocket ${took} ms after the page opened`);
      await alice.waitForSelector('#room-title:text-is("# lobby")');
      await say(alice, "tcp only here");
      await waitShown(alice, "tcp only here");
      await alice.context().close();
    } finally {
      await relay.stop();
    }
  });

  test("the SDK picks WebTransport on a lossy relay (moving the live session, nothing lost or repeated) and WebSocket on a clean one", async () => {
    // 100 ms RTT both; 15 % loss on one. 30 pings 50 ms apart measure each path.
    let sending = false;
    let sender;
    const lossy = await new LossyRelay(server.port, { delayMs: 50, loss: 0.15, seed: 7 }).start();
    const clean = await new LossyRelay(server.port, { delayMs: 50, loss: 0 }).start();
    try {
      const q = `&netPings=30&netPingInterval=50&wtTimeout=8000&certHash=${cert.hash}`;
      const bob = await openChat(browser, server.url, "frank");
      const [alice, carol] = await Promise.all([
        openChat(browser, `https://127.0.0.1:${lossy.port}`, "gina", q),
        openChat(browser, `https://127.0.0.1:${clean.port}`, "hank", q),
      ]);
      for (const p of [alice, bob, carol]) await p.waitForSelector('#room-title:text-is("# lobby")');
      const session = await sdk(alice, () => window.parley.stats.connects);
      // Messages flow while alice's session moves.
      const bodies = [];
      sending = true;
      sender = (async () => {
        for (let i = 0; sending && i < 200; i++) {
          const b = `m${i}`;
          bodies.push(b);
          await sdk(bob, (text) => window.parley.send("lobby", text), b).catch(() => (sending = false));
          await new Promise((r) => setTimeout(r, 150));
        }
      })();
      await waitFor("alice on WebTransport", async () => (await transportOf(alice)).transport === "webtransport", 30_000, 200);
      const net = await sdk(alice, () => window.parley.network);
      assert.equal(net.weak, true, JSON.stringify(net));
      assert.equal(net.reason, "loss", JSON.stringify(net));
      await waitFor("carol measured her path", () => sdk(carol, () => window.parley.network.samples >= 30), 30_000, 200);
      // A few more messages after the move, then stop.
      const afterMove = bodies.length;
      await waitFor("messages after the move", () => bodies.length >= afterMove + 5, 10_000);
      sending = false;
      await sender;
      const cnet = await sdk(carol, () => window.parley.network);
      assert.equal(cnet.weak, false, `clean path: ${JSON.stringify(cnet)}`);
      assert.equal((await transportOf(carol)).transport, "websocket");
      const stats = await sdk(alice, () => ({ ...window.parley.stats }));
      assert.ok(stats.resumes >= 1, `the move resumed the session: ${JSON.stringify(stats)}`);
      assert.equal(stats.connects, session + stats.resumes, "no new session: every later connect was a resume");
      for (const [p, who] of [[alice, "alice"], [carol, "carol"]]) {
        await waitFor(`${who} shows all ${bodies.length}`, async () => (await shown(p)).filter((m) => /^m\d+$/.test(m.body)).length >= bodies.length, 20_000, 200).catch(async (e) => {
          const seen = (await shown(p)).map((m) => `${m.seq}:${m.body}`);
          const stats = await sdk(p, () => ({ ...window.parley.stats, transport: window.parley.transport }));
          throw new Error(`${e.message}; ${who} shows ${JSON.stringify(seen)}; stats ${JSON.stringify(stats)}`);
        });
        assertOnceInOrder((await shown(p)).filter((m) => /^m\d+$/.test(m.body)), bodies, who);
      }
      assert.ok(lossy.counts.stalled > 0 && lossy.counts.dropped > 0, `the relay did lose: ${JSON.stringify(lossy.counts)}`);
      for (const p of [alice, bob, carol]) assert.deepEqual(p.errors, []);
      for (const p of [alice, bob, carol]) await p.context().close();
    } finally {
      sending = false;
      await sender?.catch(() => {});
      await lossy.stop();
      await clean.stop();
    }
  });
});
