// The SDK's API in Node against the real parley binary (SSE and long-poll: Node 20 has
// fetch streams but no WebSocket global): state before connect, once/ready, the terminal
// auth error, token refresh before `exp` on a live session, reconnect details and
// retryNow(), the history iterator, the roster, the room browser, attachments, and close()
// ending the session on the server at once.
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { describe, test } from "node:test";
import { ParleyServer, waitFor } from "./helpers.mjs";
import { Parley } from "../dist/parley.js";

const SECRET = "browser-test-secret"; // helpers.mjs starts parley with it

/** A JWT for `user`, valid `seconds` from now, signed as parley expects (HS256). */
function jwt(user, seconds) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub: user, exp: Math.floor(Date.now() / 1000) + seconds })}`;
  return `${head}.${createHmac("sha256", SECRET).update(head).digest("base64url")}`;
}

function client(server, user, opts = {}) {
  return new Parley(server.url, { token: jwt(user, 3600), transports: ["sse"], rememberTransport: false, ...opts });
}

describe("SDK API against parley", () => {
  test("state is idle before connect(); once() and ready(); history iterator; roster with presence", async () => {
    const server = await new ParleyServer().start();
    try {
      const a = client(server, "ann", { autoConnect: false });
      assert.equal(a.state, "idle");
      const connected = a.once("connected");
      a.connect();
      assert.equal(a.state, "connecting");
      await a.ready();
      assert.equal((await connected).userId, "ann");
      await a.join("hist");
      for (let i = 1; i <= 25; i++) await server.post("hist", `h${i}`, `h-${i}`);
      const seen = [];
      for await (const m of a.iterateHistory("hist", { pageSize: 10 })) seen.push(m.seq);
      assert.deepEqual(seen, Array.from({ length: 25 }, (_, i) => 25 - i), "newest first, every message once");
      const b = client(server, "bob", { transports: ["poll"] });
      await b.join("hist");
      const roster = await a.roster("hist");
      const online = Object.fromEntries(roster.map((r) => [r.user, r.online]));
      assert.equal(online.ann, true);
      assert.equal(online.bob, true);
      let once = 0;
      const all = [];
      a.once("message", () => once++);
      a.on("message", (m) => all.push(m.body));
      await b.send("hist", "x");
      await b.send("hist", "y");
      await waitFor("both delivered", () => all.length === 2);
      assert.equal(once, 1, "once() fired for the first only");
      a.close();
      b.close();
    } finally {
      await server.stop();
    }
  });

  test("publicRooms(): public rooms a page at a time with more, private rooms and DMs left out", async () => {
    const server = await new ParleyServer().start();
    try {
      const a = client(server, "ann");
      const b = client(server, "bob", { transports: ["poll"] });
      await a.ready();
      for (const room of ["r1", "r2", "r3", "r4", "r5"]) await a.join(room);
      await b.join("r2");
      await a.createRoom("r3-hidden", { private: true });
      await a.sendDirect("bob", "hi");
      const names = [];
      let after;
      for (;;) {
        const page = await b.publicRooms({ after, limit: 2 });
        assert.ok(page.rooms.length <= 2);
        names.push(...page.rooms.map((r) => r.room));
        if (!page.more) break;
        after = page.rooms[page.rooms.length - 1].room;
      }
      // "lobby" is no room here: nobody joined it.
      assert.deepEqual(names, ["r1", "r2", "r3", "r4", "r5"]);
      const first = await b.publicRooms();
      assert.equal(first.more, false);
      assert.deepEqual(
        first.rooms.find((r) => r.room === "r2"),
        { room: "r2", lastSeq: 0, readSeq: 0, unread: 0, private: false, dmPeer: "", members: 2 },
      );
      a.close();
      b.close();
    } finally {
      await server.stop();
    }
  });

  test("a refused token: getToken is asked once more with refresh, then the client closes with the error", async () => {
    const server = await new ParleyServer().start();
    try {
      const asked = [];
      const c = new Parley(server.url, { getToken: (r) => (asked.push(r.refresh), "not-a-token"), transports: ["sse", "poll"], backoffMinMs: 50, backoffMaxMs: 100 });
      const closed = new Promise((resolve) => c.on("state", (e) => e.state === "closed" && resolve(e)));
      await assert.rejects(c.ready(), (e) => e.code === "ERROR_CODE_UNAUTHORIZED");
      const e = await closed;
      assert.equal(e.error.code, "ERROR_CODE_UNAUTHORIZED");
      assert.deepEqual(asked, [false, true]);
      await assert.rejects(c.send("x", "y"), /client closed/);

      // A fixed token that is refused closes at once.
      const d = new Parley(server.url, { token: jwt("dan", -3600), transports: ["poll"] });
      await assert.rejects(d.ready(), (e) => e.code === "ERROR_CODE_TOKEN_EXPIRED");
      assert.equal(d.state, "closed");
    } finally {
      await server.stop();
    }
  });

  test("getToken refreshes before exp: an SSE session keeps sending past the first token's expiry", async () => {
    const server = await new ParleyServer({ env: { PARLEY_AUTH__LEEWAY: "0s" } }).start();
    try {
      const asked = [];
      const c = new Parley(server.url, {
        getToken: ({ refresh }) => (asked.push(refresh), jwt("eve", 4)),
        transports: ["sse"],
      });
      await c.ready();
      await c.join("r");
      await new Promise((r) => setTimeout(r, 6000)); // past the first token's exp
      assert.ok(asked.filter((x) => x).length >= 1, `refreshed: ${asked}`);
      assert.equal(await c.send("r", "still here"), 1, "the command POST carried a valid token");
      assert.equal(c.stats.connects, 1, "no reconnect needed");
      c.close();
    } finally {
      await server.stop();
    }
  });

  test("reconnect details: attempt and nextDelayMs while the server is down; retryNow() cuts the wait", async () => {
    const server = await new ParleyServer().start();
    try {
      const states = [];
      const c = client(server, "rita", { transports: ["poll"], backoffMinMs: 8000, backoffMaxMs: 9000, pollWaitSeconds: 1, pongTimeoutMs: 1000 });
      c.on("state", (e) => states.push(e));
      await c.ready();
      await server.kill();
      await waitFor("reconnecting with a delay", () => states.some((s) => s.state === "reconnecting" && s.nextDelayMs >= 8000), 15_000);
      const r = states.find((s) => s.state === "reconnecting" && s.nextDelayMs > 0);
      assert.equal(r.attempt, 1);
      assert.equal(c.attempt, 1);
      await server.start();
      const t0 = Date.now();
      c.retryNow();
      await c.ready();
      assert.ok(Date.now() - t0 < 4000, `reconnected ${Date.now() - t0} ms after retryNow, not after the 8 s backoff`);
      assert.equal(c.attempt, 0);
      assert.equal(states.at(-1).attempt, 0);
      c.close();
    } finally {
      await server.stop();
    }
  });

  test("attachments: upload with progress, send, received with the message, signed URL", async () => {
    const server = await new ParleyServer().start();
    try {
      const a = client(server, "ann");
      const b = client(server, "bob", { transports: ["poll"] });
      await a.join("files");
      await b.join("files");
      const got = b.once("message");
      const progress = [];
      const att = await a.upload(new Blob(["hello, file"]), { name: "note.txt", onProgress: (s, t) => progress.push([s, t]) });
      assert.deepEqual(progress.at(-1), [11, 11]);
      assert.equal(att.size, 11);
      await a.send("files", "see attached", { attachments: [att] });
      const m = await got;
      assert.equal(m.attachments.length, 1);
      assert.equal(m.attachments[0].fileId, att.fileId);
      assert.equal(m.attachments[0].name, "note.txt");
      const url = await b.fileUrl(att.fileId);
      assert.equal(await (await fetch(url)).text(), "hello, file", "the signed URL needs no header");
      await assert.rejects(b.fileUrl("0".repeat(32)), (e) => e.code === "ERROR_CODE_NOT_FOUND");
      a.close();
      b.close();
    } finally {
      await server.stop();
    }
  });

  for (const transport of ["sse", "poll"]) {
    test(`close() over ${transport} ends the session on the server at once`, async () => {
      const server = await new ParleyServer().start();
      try {
        const a = client(server, "ann");
        const b = client(server, "bob", { transports: [transport] });
        await a.join("r");
        await b.join("r");
        const offline = new Promise((resolve) => a.on("presence", (p) => p.user === "bob" && !p.online && resolve(p)));
        const t0 = Date.now();
        b.close();
        // The grace period is 60 s: only `end` makes bob go offline now.
        await Promise.race([offline, new Promise((_, reject) => setTimeout(() => reject(new Error("bob still online after 10 s")), 10_000))]);
        assert.ok(Date.now() - t0 < 5000);
        a.close();
      } finally {
        await server.stop();
      }
    });
  }
});
