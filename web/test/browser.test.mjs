// The SDK and demo page in headless Chromium against the real parley binary: WebSocket
// with protobuf, fallback to SSE and long-poll behind hostile proxies, SSE and long-poll
// over HTTPS (HTTP/2), a server killed and restarted mid-chat, and a hidden page that
// must not spin reconnects.
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import {
  ParleyServer,
  REPO,
  TestProxy,
  WEB,
  launchBrowser,
  makeCert,
  openChat,
  say,
  shown,
  sleep,
  transportOf,
  waitFor,
  waitShown,
} from "./helpers.mjs";

// Documented in README ("Browser SDK"): a refused WebSocket falls back at once; a
// black-holed one, or an SSE stream a proxy buffers, after connectTimeoutMs (5 s).
const CONNECT_TIMEOUT_MS = 5000;
const ARTIFACTS = process.env.TEST_SCREENSHOTS_DIR || join(WEB, "test-results");

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
});

/** Each message on screen exactly once, in seq order. */
function assertOnceInOrder(list, expectedBodies, who) {
  const bodies = list.map((m) => m.body);
  for (const b of expectedBodies) {
    assert.equal(bodies.filter((x) => x === b).length, 1, `${who}: "${b}" shown exactly once; screen: ${JSON.stringify(bodies)}`);
  }
  const seqs = list.map((m) => m.seq);
  assert.deepEqual(seqs, [...new Set(seqs)].sort((a, b) => a - b), `${who}: seqs unique and ascending`);
}

describe("browser", () => {
  test("two pages chat over WebSocket with protobuf; screenshots", async () => {
    const server = await new ParleyServer().start();
    try {
      const alice = await openChat(browser, server.url, "alice");
      const frames = { binary: 0, text: 0 };
      const bob = await openChat(browser, server.url, "bob", "", undefined);
      // Count what alice's page puts on the wire from now on.
      alice.on("websocket", () => {});
      const cdp = await alice.context().newCDPSession(alice);
      await cdp.send("Network.enable");
      cdp.on("Network.webSocketFrameSent", (e) => (e.response.opcode === 2 ? frames.binary++ : frames.text++));
      for (const p of [alice, bob]) {
        const t = await transportOf(p);
        assert.equal(t.transport, "websocket");
        assert.match(t.label, /WebSocket · protobuf/);
      }
      for (const p of [alice, bob]) await p.waitForSelector('#room-title:text-is("# lobby")');
      await alice.type("#text", "hel"); // typing indicator on bob's side
      await waitFor("bob sees alice typing", async () => (await bob.textContent("#typing")).includes("alice is typing"));
      await say(alice, "hello bob");
      await waitShown(bob, "hello bob");
      await say(bob, "hi alice");
      await waitShown(alice, "hi alice");
      await say(alice, "how are you?");
      await waitShown(bob, "how are you?");
      assert.ok(frames.binary >= 1, `alice sent binary (protobuf) frames: ${JSON.stringify(frames)}`);
      assert.equal(frames.text, 0, "no text (JSON) frames on a protobuf connection");
      const expected = ["hello bob", "hi alice", "how are you?"];
      await waitFor("alice shows 3", async () => (await shown(alice)).length >= 3);
      assertOnceInOrder(await shown(alice), expected, "alice");
      assertOnceInOrder(await shown(bob), expected, "bob");

      // Chromium offers permessage-deflate and parley accepts it; a message over
      // ws.deflate_min_bytes reaches bob compressed once for every recipient (its pos
      // in a stored block in front of the shared compressed body), and Chromium's
      // inflater reads it.
      const extensions = await alice.evaluate(
        () =>
          new Promise((resolve, reject) => {
            const ws = new WebSocket(location.origin.replace(/^http/, "ws") + "/ws", "parley.v1.proto");
            ws.onopen = () => {
              resolve(ws.extensions);
              ws.close();
            };
            ws.onerror = () => reject(new Error("WebSocket failed"));
          }),
      );
      assert.match(extensions, /^permessage-deflate/);
      assert.match(extensions, /server_no_context_takeover/);
      const long = "a longer message, so that it is compressed: " + "the quick brown fox jumps over the lazy dog ".repeat(4).trim();
      await say(alice, long);
      await waitShown(bob, long);

      // A DM with an unread badge and a presence dot on the other side.
      await alice.fill("#dm-input", "bob");
      await alice.press("#dm-input", "Enter");
      await say(alice, "psst, a direct message");
      await bob.waitForSelector('#dms li[data-room="dm:alice:bob"] .badge:text-is("1")');
      await bob.waitForSelector('#dms li[data-room="dm:alice:bob"] .dot.online');

      mkdirSync(ARTIFACTS, { recursive: true });
      await bob.setViewportSize({ width: 1280, height: 800 });
      await bob.screenshot({ path: join(ARTIFACTS, "demo-desktop.png") });
      const phone = await openChat(browser, server.url, "carol", "", { width: 390, height: 780 });
      await waitShown(phone, "how are you?");
      await phone.screenshot({ path: join(ARTIFACTS, "demo-phone.png") });
      await phone.click("#menu"); // the room list slides in over the chat
      await phone.waitForSelector("#sidebar.open");
      await sleep(300); // the slide-in transition
      await phone.screenshot({ path: join(ARTIFACTS, "demo-phone-rooms.png") });
      for (const p of [alice, bob, phone]) assert.deepEqual(p.errors, []);
      for (const p of [alice, bob, phone]) await p.context().close();
    } finally {
      await server.stop();
    }
  });

  test("history scrollback loads older pages, in order, without duplicates", async () => {
    const server = await new ParleyServer().start();
    try {
      const first = await openChat(browser, server.url, "fred"); // creates the lobby
      await first.waitForSelector('#room-title:text-is("# lobby")');
      for (let i = 1; i <= 45; i++) await server.post("lobby", `old ${i}`, `old-${i}`);
      const page = await openChat(browser, server.url, "gina");
      await waitShown(page, "old 45");
      let list = await shown(page);
      assert.deepEqual(list.map((m) => m.seq), Array.from({ length: 30 }, (_, i) => 16 + i), "the newest page");
      assert.equal(await page.isVisible("#older"), true, "more to load");
      await page.$eval("#messages", (box) => (box.scrollTop = 0)); // scrolling up loads more
      await waitShown(page, "old 1");
      list = await shown(page);
      assert.deepEqual(list.map((m) => m.seq), Array.from({ length: 45 }, (_, i) => 1 + i));
      assert.equal(await page.isVisible("#older"), false, "the beginning of the room");
      for (const p of [first, page]) await p.context().close();
    } finally {
      await server.stop();
    }
  });

  for (const [name, mode, want, bound] of [
    ["refused WebSocket upgrades fall back to SSE", { ws: "refuse" }, "sse", 2000],
    ["a black-holed WebSocket falls back to SSE", { ws: "blackhole" }, "sse", CONNECT_TIMEOUT_MS + 2000],
    ["refused WebSocket and a buffering proxy fall back to long-poll", { ws: "refuse", buffer: true }, "poll", CONNECT_TIMEOUT_MS + 2000],
  ]) {
    test(name, async () => {
      const server = await new ParleyServer().start();
      const proxy = await new TestProxy(server.port, mode).start();
      try {
        const alice = await openChat(browser, proxy.url, "alice");
        const bob = await openChat(browser, proxy.url, "bob");
        const label = { sse: "SSE", poll: "long-poll" }[want];
        for (const [who, p] of [["alice", alice], ["bob", bob]]) {
          const t = await transportOf(p);
          assert.equal(t.transport, want, `${who} on ${want}`);
          assert.equal(t.label, label, "the indicator names the transport");
          const ms = await p.evaluate(() => window.parley.stats.firstConnectMs);
          assert.ok(ms < bound, `${who} connected after ${ms} ms (bound ${bound} ms)`);
          console.log(`# ${name}: ${who} connected over ${want} ${ms} ms after the SDK started`);
        }
        assert.ok(proxy.counts.upgrade >= 2, "WebSocket was tried first");
        await say(alice, `over ${want} 1`);
        await waitShown(bob, `over ${want} 1`);
        await say(bob, `over ${want} 2`);
        await waitShown(alice, `over ${want} 2`);
        assertOnceInOrder(await shown(alice), [`over ${want} 1`, `over ${want} 2`], "alice");
        assertOnceInOrder(await shown(bob), [`over ${want} 1`, `over ${want} 2`], "bob");
        for (const p of [alice, bob]) assert.deepEqual(p.errors, []);
        for (const p of [alice, bob]) await p.context().close();
      } finally {
        await proxy.stop();
        await server.stop();
      }
    });
  }

  // What a browser on HTTPS does: SSE and long-poll over HTTP/2 (ALPN), with
  // Chromium's own request headers, which it indexes in the connection's HPACK table and
  // which the patched h2 shares between connections (vendor/README.md, h2 change 25).
  for (const transport of ["sse", "poll"]) {
    test(`${transport} over HTTPS is HTTP/2 with Chromium's own headers: two pages chat, each message once`, async () => {
      const dir = mkdtempSync(join(tmpdir(), "parley-h2-test-"));
      const server = await new ParleyServer({ tls: makeCert(dir, 10) }).start();
      try {
        const q = `&transports=${transport}`;
        const alice = await openChat(browser, server.url, "alice", q);
        const bob = await openChat(browser, server.url, "bob", q);
        for (const [who, p] of [["alice", alice], ["bob", bob]]) {
          assert.equal((await transportOf(p)).transport, transport, `${who} on ${transport}`);
        }
        const bodies = [];
        for (let i = 1; i <= 3; i++) {
          for (const [from, to] of [[alice, bob], [bob, alice]]) {
            const body = `h2 ${transport} ${bodies.length + 1}`;
            bodies.push(body);
            await say(from, body);
            await waitShown(to, body);
          }
        }
        for (const [who, p] of [["alice", alice], ["bob", bob]]) {
          await waitFor(`${who} shows all ${bodies.length}`, async () => (await shown(p)).length >= bodies.length);
          assertOnceInOrder(await shown(p), bodies, who);
          // The page and the SDK's requests (commands, polls) went over HTTP/2.
          const used = await p.evaluate(() => ({
            page: performance.getEntriesByType("navigation")[0].nextHopProtocol,
            fetches: performance
              .getEntriesByType("resource")
              .filter((e) => e.initiatorType === "fetch")
              .map((e) => e.nextHopProtocol),
          }));
          assert.equal(used.page, "h2", `${who}: the page over HTTP/2`);
          assert.ok(used.fetches.length > 0 && used.fetches.every((x) => x === "h2"), `${who}: the SDK's requests over HTTP/2: ${JSON.stringify(used)}`);
          assert.deepEqual(p.errors, []);
        }
        for (const p of [alice, bob]) await p.context().close();
      } finally {
        await server.stop();
        rmSync(dir, { recursive: true, force: true });
      }
    });
  }

  for (const transport of ["websocket", "sse", "poll"]) {
    test(`kill -9 and restart parley mid-chat over ${transport}: nothing lost, nothing twice`, async () => {
      const server = await new ParleyServer().start();
      try {
        const q = `&transports=${transport}`;
        const alice = await openChat(browser, server.url, "alice", q);
        const bob = await openChat(browser, server.url, "bob", q);
        await say(alice, "before 1");
        await waitShown(bob, "before 1");
        await say(bob, "before 2");
        await waitShown(alice, "before 2");

        await server.kill();
        await waitFor("alice notices", async () => (await transportOf(alice)).state !== "connected");
        await waitFor("bob notices", async () => (await transportOf(bob)).state !== "connected");
        // Typed during the outage: shown as pending, delivered once the server is back.
        await say(alice, "during the outage");
        await alice.waitForSelector("#list .msg.pending");
        await sleep(1500);
        await server.start(); // same port, same database
        // Stored while the pages may still be reconnecting: reaches them by sync or live.
        await server.post("lobby", "posted right after the restart", "bot-1");
        await waitShown(bob, "during the outage", 30_000);
        await waitShown(alice, "during the outage", 30_000);
        await say(bob, "after 1");
        await waitShown(alice, "after 1");
        await waitShown(alice, "posted right after the restart");
        await waitShown(bob, "posted right after the restart");
        await sleep(500); // let any late duplicate arrive before judging
        const expected = ["before 1", "before 2", "during the outage", "posted right after the restart", "after 1"];
        for (const [who, p] of [["alice", alice], ["bob", bob]]) {
          assert.equal(await p.$$eval("#list .msg.pending", (e) => e.length), 0, `${who}: nothing left pending`);
          const list = await shown(p);
          assertOnceInOrder(list, expected, who);
          assert.deepEqual(list.map((m) => m.seq), [1, 2, 3, 4, 5], `${who}: seqs 1..5`);
          const t = await transportOf(p);
          assert.equal(t.transport, transport);
          const stats = await p.evaluate(() => window.parley.stats);
          assert.ok(stats.connects >= 2, `${who} reconnected: ${JSON.stringify(stats)}`);
          assert.deepEqual(p.errors, []);
        }
        // The server stored the outage message once (the resend was deduped by clientMsgId).
        const hist = await (
          await fetch(`${server.url}/api/v1/rooms/lobby/messages?limit=50`, {
            headers: { authorization: `Bearer ${await devToken(server, "alice")}` },
          })
        ).json();
        assert.equal(hist.messages.filter((m) => m.body === "during the outage").length, 1);
        for (const p of [alice, bob]) await p.context().close();
      } finally {
        await server.stop();
      }
    });
  }

  for (const transport of ["websocket", "sse"]) {
    test(`a silently dead ${transport} connection is detected by heartbeats and resumed`, async () => {
      // Server SSE comments every second; the SDK pings every second and allows one more.
      const server = await new ParleyServer({ env: { PARLEY_SSE__HEARTBEAT_INTERVAL: "1s" } }).start();
      const proxy = await new TestProxy(server.port).start();
      try {
        const q = `&transports=${transport}&ping=1000&pong=1000`;
        const alice = await openChat(browser, proxy.url, "alice", q);
        const bob = await openChat(browser, server.url, "bob"); // direct, unaffected
        await say(bob, "before the freeze");
        await waitShown(alice, "before the freeze");
        const frozenAt = Date.now();
        proxy.freeze(); // nothing closes: only silence tells
        await say(bob, "sent into the void");
        await waitFor("alice notices", async () => (await transportOf(alice)).state !== "connected", 8000, 20);
        const detectedMs = Date.now() - frozenAt;
        await alice.waitForSelector('#transport[data-state="connected"]', { timeout: 5000 });
        await waitShown(alice, "sent into the void");
        console.log(`# ${transport}: silence detected after ${detectedMs} ms (bound: heartbeat 1000 + 1000 ms)`);
        // Nominal: 1 s interval + 1 s allowance + up to one 0.5 s watchdog tick; slack for
        // a loaded machine. Without heartbeats nothing would ever notice (nothing closes).
        assert.ok(detectedMs >= 900 && detectedMs < 5000, `detected after ${detectedMs} ms`);
        const stats = await alice.evaluate(() => window.parley.stats);
        assert.equal(stats.resumes, 1, `the session was resumed: ${JSON.stringify(stats)}`);
        await say(alice, "back");
        await waitShown(bob, "back");
        assertOnceInOrder(await shown(alice), ["before the freeze", "sent into the void", "back"], "alice");
        for (const p of [alice, bob]) await p.context().close();
      } finally {
        await proxy.stop();
        await server.stop();
      }
    });
  }

  test("WebSocket is probed again later: a page that fell back to SSE moves back", async () => {
    const server = await new ParleyServer().start();
    const proxy = await new TestProxy(server.port, { ws: "refuse" }).start();
    try {
      const alice = await openChat(browser, proxy.url, "alice", "&probe=1500");
      const bob = await openChat(browser, server.url, "bob");
      assert.equal((await transportOf(alice)).transport, "sse");
      await say(bob, "while on sse");
      await waitShown(alice, "while on sse");
      proxy.mode.ws = "pass"; // the WebSocket problem goes away
      // Probes come 1.5 s after connecting, then 3 s, 6 s … after each failed one.
      await alice.waitForSelector('#transport[data-transport="websocket"][data-state="connected"]', { timeout: 10_000 });
      await say(bob, "after the switch");
      await waitShown(alice, "after the switch");
      await say(alice, "from alice over websocket");
      await waitShown(bob, "from alice over websocket");
      const stats = await alice.evaluate(() => window.parley.stats);
      assert.equal(stats.resumes, 1, `the session moved, not restarted: ${JSON.stringify(stats)}`);
      assertOnceInOrder(await shown(alice), ["while on sse", "after the switch", "from alice over websocket"], "alice");
      for (const p of [alice, bob]) await p.context().close();
    } finally {
      await proxy.stop();
      await server.stop();
    }
  });

  test("a hidden page does not spin reconnects; it reconnects when shown", async () => {
    const server = await new ParleyServer().start();
    const proxy = await new TestProxy(server.port).start();
    try {
      const page = await openChat(browser, proxy.url, "dora");
      await page.evaluate(() => {
        // Emulates the tab going to the background (headless Chromium has no tabs to hide).
        window.__hidden = true;
        Object.defineProperty(document, "hidden", { configurable: true, get: () => window.__hidden });
        Object.defineProperty(document, "visibilityState", { configurable: true, get: () => (window.__hidden ? "hidden" : "visible") });
        document.dispatchEvent(new Event("visibilitychange"));
      });
      const before = await page.evaluate(() => window.parley.stats.attempts);
      const upgrades = proxy.counts.upgrade;
      await server.kill();
      await waitFor("the page notices", async () => (await transportOf(page)).state === "paused");
      await server.start();
      await sleep(4000); // a visible page would have reconnected several times by now
      assert.equal((await transportOf(page)).state, "paused");
      assert.equal(await page.evaluate(() => window.parley.stats.attempts), before, "no attempts while hidden");
      assert.equal(proxy.counts.upgrade, upgrades, "no upgrade requests reached the proxy while hidden");
      const shownAt = Date.now();
      await page.evaluate(() => {
        window.__hidden = false;
        document.dispatchEvent(new Event("visibilitychange"));
      });
      await page.waitForSelector('#transport[data-state="connected"]', { timeout: 5000 });
      const ms = Date.now() - shownAt;
      console.log(`# hidden page: reconnected ${ms} ms after being shown`);
      assert.ok(ms < 2000, `reconnected ${ms} ms after being shown`);
      assert.equal(await page.evaluate(() => window.parley.stats.attempts), before + 1);
      assert.deepEqual(page.errors, []);
      await page.context().close();
    } finally {
      await proxy.stop();
      await server.stop();
    }
  });
});

async function devToken(server, user) {
  const r = await fetch(`${server.url}/api/v1/dev/token`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ user }),
  });
  return (await r.json()).token;
}

void REPO;
