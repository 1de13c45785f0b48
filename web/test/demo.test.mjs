// The demo page as a product, in headless Chromium against the real parley binary:
// attachments end to end (pick a file, upload progress, the image on the other page),
// the member roster with presence, read receipts, leave, "1 member", the typing
// indicator right after a send, errors shown in the page (no alert()), the phone drawer
// (backdrop, Escape, unread sign on ☰), rooms reachable by keyboard, the outage banner
// with "retry now", private rooms and invitations, the public room browser, desktop notifications, the end of a session on sign-out or
// page unload over SSE and long-poll, and axe-core over the login, room, DM and phone
// views: no serious or critical violation.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { deflateSync, crc32 } from "node:zlib";
import { after, before, describe, test } from "node:test";
import { ParleyServer, WEB, launchBrowser, say, sleep, waitFor, waitShown } from "./helpers.mjs";

const AXE = readFileSync(join(WEB, "node_modules", "axe-core", "axe.min.js"), "utf8");

/** A real PNG, `w`x`h`, one colour. */
function png(w, h, [r, g, b]) {
  const chunk = (type, data) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const td = Buffer.concat([Buffer.from(type), data]);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(crc32(td));
    return Buffer.concat([len, td, crc]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0);
  ihdr.writeUInt32BE(h, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // RGB
  const row = Buffer.concat([Buffer.from([0]), Buffer.from(Array.from({ length: w }, () => [r, g, b]).flat())]);
  const raw = Buffer.concat(Array.from({ length: h }, () => row));
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    chunk("IDAT", deflateSync(raw)),
    chunk("IEND", Buffer.alloc(0)),
  ]);
}

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
});

/** The demo signed in as `name`, under its Content-Security-Policy (axe goes in through evaluate, which CSP does not govern). */
async function open(server, name, { query = "", viewport, lag } = {}) {
  const context = await browser.newContext(viewport ? { viewport } : {});
  if (lag) {
    // The page's WebSocket frames reach the server `lag.ms` after they were sent (0: at
    // once), in order: a slow uplink, switched on and off by the test.
    await context.routeWebSocket(/\/ws/, (ws) => {
      const server = ws.connectToServer();
      let queue = Promise.resolve();
      ws.onMessage((m) => {
        const due = Date.now() + lag.ms;
        queue = queue.then(() => sleep(due - Date.now())).then(() => server.send(m));
      });
    });
  }
  const page = await context.newPage();
  page.errors = [];
  page.dialogs = [];
  page.on("pageerror", (e) => page.errors.push(e.message));
  page.on("console", (m) => /Content Security Policy/.test(m.text()) && page.errors.push(m.text()));
  page.on("dialog", (d) => (page.dialogs.push(d.message()), d.dismiss()));
  await page.goto(`${server.url}/${name ? `?name=${encodeURIComponent(name)}` : ""}${query}`);
  if (name) await page.waitForSelector('#transport[data-state="connected"]', { timeout: 20_000 });
  return page;
}

/** axe-core on the page as it is: the serious and critical violations (none expected). */
async function axe(page, view) {
  if (!(await page.evaluate(() => typeof window.axe === "object"))) await page.evaluate(AXE);
  const result = await page.evaluate(() => window.axe.run(document, { resultTypes: ["violations"] }));
  const bad = result.violations.filter((v) => v.impact === "serious" || v.impact === "critical");
  assert.deepEqual(
    bad.map((v) => `${v.id} (${v.impact}): ${v.nodes.map((n) => n.target.join(" ")).join(", ")}`),
    [],
    `axe on the ${view} view`,
  );
  return result.violations.length;
}

describe("demo page", () => {
  test("attachments, roster, receipts, leave, typing after a send, drawer, keyboard, outage banner; axe on every view", async () => {
    const server = await new ParleyServer().start();
    try {
      // Login view: the name pattern is a valid regex (validation runs) and allows 128 bytes.
      const login = await open(server, "");
      await axe(login, "login");
      await login.fill("#name", "bad name!");
      assert.equal(await login.$eval("#name", (e) => e.validity.patternMismatch), true, "the pattern compiles and refuses a space");
      await login.fill("#name", "a".repeat(128));
      assert.equal(await login.$eval("#name", (e) => e.checkValidity()), true, "128 characters allowed");
      await login.context().close();

      const aliceLag = { ms: 0 };
      const alice = await open(server, "alice", { lag: aliceLag });
      const bob = await open(server, "bob");
      for (const p of [alice, bob]) await p.waitForSelector('#room-title:text-is("# lobby")');
      await say(alice, "hello bob");
      await waitShown(bob, "hello bob");

      // Typing right after a send still reaches the other side, even when the last
      // "typing" reached the server late: here alice's uplink holds "one more" and the
      // typing before it 400 ms, and the next typing must still come after the server's
      // limit (chat.typing_interval, 1 s) counted from when the server took the last.
      await sleep(1200); // the typing for "hello bob" is past the limit: "one more" announces at once
      aliceLag.ms = 400;
      await say(alice, "one more");
      await waitShown(bob, "one more");
      aliceLag.ms = 0;
      await alice.type("#text", "and");
      await waitFor("bob sees alice typing", async () => (await bob.textContent("#typing")).includes("alice is typing"));
      await alice.fill("#text", "");

      // Read receipts: bob has the room open, so he read it; alice sees who.
      await alice.waitForSelector('#list .msg.mine .seen:text-is("Seen by bob")');

      // Roster with presence.
      await alice.click("#people-btn");
      await alice.waitForSelector('#members li[data-user="bob"] .dot.online');
      assert.equal(await alice.textContent("#room-sub"), "2 members, 2 online");
      await axe(alice, "room");

      // An image: picked with Attach, uploaded with progress, shown on bob's page.
      await alice.setInputFiles("#file", { name: "red.png", mimeType: "image/png", buffer: png(64, 48, [200, 40, 40]) });
      await bob.waitForSelector(".attachment img");
      await waitFor("bob's image loaded", () => bob.$eval(".attachment img", (i) => i.complete && i.naturalWidth === 64));
      assert.equal(await bob.$eval(".attachment img", (i) => i.alt), "red.png");
      // The BlurHash placeholder is painted (a data: URL of the decoded hash), reddish like the picture.
      const placeholder = await bob.$eval(".attachment img", async (i) => {
        const url = i.style.backgroundImage.slice(5, -2);
        if (!url.startsWith("data:image/png")) return { url };
        const im = new Image();
        im.src = url;
        await im.decode();
        const c = document.createElement("canvas");
        c.width = im.width;
        c.height = im.height;
        const g = c.getContext("2d");
        g.drawImage(im, 0, 0);
        return { url: "data", rgb: [...g.getImageData(im.width >> 1, im.height >> 1, 1, 1).data.slice(0, 3)] };
      });
      assert.equal(placeholder.url, "data", JSON.stringify(placeholder));
      const [pr, pg, pb] = placeholder.rgb;
      assert.ok(Math.abs(pr - 200) < 30 && Math.abs(pg - 40) < 30 && Math.abs(pb - 40) < 30, `placeholder colour ${placeholder.rgb}`);
      await alice.waitForSelector(".attachment img"); // and on the sender's own page

      // "1 member", errors in the page instead of alert(), leave.
      await alice.fill("#join-input", "solo");
      await alice.press("#join-input", "Enter");
      await alice.waitForSelector('#room-title:text-is("# solo")');
      await waitFor("1 member", async () => (await alice.textContent("#room-sub")) === "1 member, 1 online");
      await alice.fill("#join-input", "bad room name that is far too long ".repeat(10));
      await alice.press("#join-input", "Enter");
      await alice.waitForSelector("#notice:not([hidden])");
      assert.match(await alice.textContent("#notice"), /Could not join/);
      await alice.click("#leave-btn");
      await alice.waitForSelector('#room-title:text-is("# lobby")');
      assert.equal(await alice.$('#rooms li[data-room="solo"]'), null, "left: gone from the list");

      // A DM; rooms reachable by keyboard (rows are buttons).
      await alice.fill("#dm-input", "bob");
      await alice.press("#dm-input", "Enter");
      await say(alice, "psst");
      await bob.waitForSelector('#dms li[data-room="dm:alice:bob"] .badge:text-is("1")');
      assert.match(await bob.title(), /^\(1\) /, "unread count in the title");
      await bob.focus('#dms li[data-room="dm:alice:bob"] button.row');
      await bob.keyboard.press("Enter");
      await bob.waitForSelector('#room-title:text-is("@ alice")');
      await waitShown(bob, "psst");
      await axe(bob, "DM");

      // Phone: unread sign on ☰ with the drawer closed; backdrop and Escape close it.
      const carol = await open(server, "carol", { viewport: { width: 390, height: 780 } });
      await carol.waitForSelector('#room-title:text-is("# lobby")');
      await alice.fill("#dm-input", "carol");
      await alice.press("#dm-input", "Enter");
      await say(alice, "hi carol");
      await carol.waitForSelector("#menu-badge:not([hidden])");
      await axe(carol, "phone");
      await carol.click("#menu");
      await carol.waitForSelector("#sidebar.open");
      await carol.waitForSelector("#backdrop:not([hidden])");
      await axe(carol, "phone, rooms open");
      await carol.keyboard.press("Escape");
      await carol.waitForSelector("#sidebar:not(.open)", { state: "attached" });
      await carol.click("#menu");
      await carol.waitForSelector("#sidebar.open");
      await carol.mouse.click(380, 400); // the backdrop, right of the drawer
      await carol.waitForSelector("#sidebar:not(.open)", { state: "attached" });

      // An outage: a banner with "retry now"; gone once the server is back.
      await server.kill();
      await alice.waitForSelector("#outage:not([hidden])");
      assert.match(await alice.textContent("#outage-text"), /Connection lost/);
      await server.start();
      await alice.click("#retry");
      await alice.waitForSelector('#transport[data-state="connected"]', { timeout: 20_000 });
      await alice.waitForSelector("#outage[hidden]", { state: "attached" });

      for (const p of [alice, bob, carol]) {
        assert.deepEqual(p.errors, []);
        assert.deepEqual(p.dialogs, [], "no alert()");
      }
      for (const p of [alice, bob, carol]) await p.context().close();
    } finally {
      await server.stop();
    }
  });

  test("private rooms: create, invite, the invitee is told and reads it, a stranger cannot join", async () => {
    const server = await new ParleyServer().start();
    try {
      const aliceLag = { ms: 0 };
      const alice = await open(server, "alice", { lag: aliceLag });
      const bob = await open(server, "bob");
      const carol = await open(server, "carol");
      await alice.fill("#create-input", "secret");
      await alice.press("#create-input", "Enter");
      await alice.waitForSelector('#room-title:text-is("# secret")');
      await alice.waitForSelector('#rooms li[data-room="secret"] .tag:text-is("private")');
      await say(alice, "just us");
      await alice.click("#invite-btn");
      await alice.fill("#invite-input", "bob");
      await alice.press("#invite-input", "Enter");
      await alice.waitForSelector('#notice:text-is("bob is now a member of # secret.")');
      await bob.waitForSelector('#notice:text-is("alice invited you to # secret.")');
      await bob.click('#rooms li[data-room="secret"] button.row');
      await waitShown(bob, "just us");
      await axe(bob, "private room");
      await carol.fill("#join-input", "secret");
      await carol.press("#join-input", "Enter");
      await carol.waitForSelector("#notice:not([hidden])");
      assert.match(await carol.textContent("#notice"), /Could not join # secret/);
      assert.equal(await carol.$('#rooms li[data-room="secret"]'), null);
      for (const p of [alice, bob, carol]) {
        assert.deepEqual(p.errors, []);
        await p.context().close();
      }
    } finally {
      await server.stop();
    }
  });

  test("room browser: a public room one user creates, another finds under Browse rooms and joins by keyboard; no private room listed; axe on desktop and phone", async () => {
    const server = await new ParleyServer().start();
    try {
      const aliceLag = { ms: 0 };
      const alice = await open(server, "alice", { lag: aliceLag });
      const bob = await open(server, "bob", { query: "&browsePage=1" });
      await alice.fill("#join-input", "games"); // joining a room that does not exist creates it, public
      await alice.press("#join-input", "Enter");
      await alice.waitForSelector('#room-title:text-is("# games")');
      await say(alice, "anyone for chess?");
      await waitShown(alice, "anyone for chess?");
      await alice.fill("#create-input", "hideout");
      await alice.press("#create-input", "Enter");
      await alice.waitForSelector('#room-title:text-is("# hideout")');

      await bob.focus("#browse-btn");
      await bob.keyboard.press("Enter");
      await bob.waitForSelector('#browse:not([hidden]) #public-rooms li[data-room="games"]');
      assert.equal(await bob.getAttribute("#browse-btn", "aria-expanded"), "true");
      assert.equal(await bob.evaluate(() => document.activeElement?.id), "browse-title");
      // A page of one here: "More rooms" fetches the next and moves focus to it.
      await bob.click("#browse-more");
      await bob.waitForSelector('#public-rooms li[data-room="lobby"]');
      assert.equal(await bob.evaluate(() => document.activeElement?.closest("li")?.dataset.room), "lobby");
      await bob.waitForSelector("#browse-more", { state: "hidden" });
      await bob.focus("#browse-title");
      const listed = await bob.$$eval("#public-rooms li", (lis) => lis.map((li) => li.dataset.room));
      assert.deepEqual(listed, ["games", "lobby"], "public rooms by name, the private one not listed");
      assert.equal(await bob.textContent('#public-rooms li[data-room="games"] .muted'), "1 member");
      assert.equal(await bob.textContent('#public-rooms li[data-room="lobby"] button'), "Open # lobby");
      await axe(bob, "room browser");
      // From the heading: ✕, then the first room's Join.
      await bob.keyboard.press("Tab");
      await bob.keyboard.press("Tab");
      assert.equal(
        await bob.evaluate(() => `${document.activeElement?.closest("li")?.dataset.room}: ${document.activeElement?.textContent}`),
        "games: Join # games",
      );
      await bob.keyboard.press("Enter");
      await bob.waitForSelector('#room-title:text-is("# games")');
      await bob.waitForSelector("#browse", { state: "hidden" });
      await waitShown(bob, "anyone for chess?");
      await bob.waitForSelector('#rooms li[data-room="games"]');
      await alice.click('#rooms li[data-room="games"] button.row');
      await alice.waitForSelector('#room-sub:has-text("2 members")');

      // Phone: the browser opens from the drawer, over the chat; Escape closes it.
      const carol = await open(server, "carol", { viewport: { width: 390, height: 780 } });
      await carol.click("#menu");
      await carol.waitForSelector("#sidebar.open");
      await carol.click("#browse-btn");
      await carol.waitForSelector('#public-rooms li[data-room="games"] .muted:text-is("2 members")');
      await carol.waitForSelector("#sidebar:not(.open)", { state: "attached" });
      await axe(carol, "phone, room browser");
      await carol.keyboard.press("Escape");
      await carol.waitForSelector("#browse", { state: "hidden" });
      assert.equal(await carol.evaluate(() => document.activeElement?.id), "menu");
      for (const p of [alice, bob, carol]) {
        assert.deepEqual(p.errors, []);
        assert.deepEqual(p.dialogs, []);
        await p.context().close();
      }
    } finally {
      await server.stop();
    }
  });

  test("desktop notifications: turned on from the page, shown for a message while the page is hidden", async () => {
    const server = await new ParleyServer().start();
    try {
      const aliceLag = { ms: 0 };
      const alice = await open(server, "alice", { lag: aliceLag });
      const bob = await open(server, "bob");
      await alice.context().grantPermissions(["notifications"], { origin: server.url });
      await alice.click("#notify-btn");
      await alice.waitForSelector("#notify-btn", { state: "hidden" });
      await bob.fill("#dm-input", "alice");
      await bob.press("#dm-input", "Enter");
      await say(bob, "first, while alice looks at the lobby");
      await waitFor("a notification for a DM while another room is open", () => alice.evaluate(() => window.notifications.length === 1));
      await alice.click('#dms li[data-room="dm:alice:bob"] button.row');
      await waitShown(alice, "first, while alice looks at the lobby"); // opened, and so read
      await alice.evaluate(() => {
        // The tab goes to the background (headless Chromium has no tabs to hide).
        Object.defineProperty(document, "hidden", { configurable: true, get: () => true });
        document.dispatchEvent(new Event("visibilitychange"));
      });
      await say(bob, "are you there?");
      await waitFor("a notification while hidden", () => alice.evaluate(() => window.notifications.length === 2));
      assert.deepEqual(await alice.evaluate(() => window.notifications[1]), { title: "bob", body: "are you there?", room: "dm:alice:bob" });
      await waitFor("the title counts it", async () => /^\(1\) /.test(await alice.title()), 5000).catch(async (e) => {
        throw new Error(`${e.message}: ${await alice.title()}; rooms ${await alice.$$eval(".rooms li", (l) => l.map((x) => x.textContent).join(" | "))}`);
      });
      for (const p of [alice, bob]) {
        assert.deepEqual(p.errors, []);
        await p.context().close();
      }
    } finally {
      await server.stop();
    }
  });

  for (const transport of ["sse", "poll"]) {
    test(`signing out, or leaving the page, over ${transport} ends the session at once (the end command): the others see the user go offline`, async () => {
      // Grace period 60 s (default): without `end` the user would stay online that long.
      const server = await new ParleyServer().start();
      try {
        const aliceLag = { ms: 0 };
      const alice = await open(server, "alice", { lag: aliceLag });
        const dave = await open(server, "dave", { query: `&transports=${transport}` });
        assert.equal((await dave.$eval("#transport", (e) => e.dataset.transport)), transport);
        await alice.click("#people-btn");
        await alice.waitForSelector('#members li[data-user="dave"] .dot.online');
        const t0 = Date.now();
        await dave.click("#logout");
        await alice.waitForSelector('#members li[data-user="dave"] .dot:not(.online)', { timeout: 10_000 });
        assert.ok(Date.now() - t0 < 10_000);
        // Leaving the page (unloaded, not cached) ends the session the same way.
        const erin = await open(server, "erin", { query: `&transports=${transport}` });
        await alice.waitForSelector('#members li[data-user="erin"] .dot.online', { timeout: 10_000 });
        await erin.goto("about:blank");
        await alice.waitForSelector('#members li[data-user="erin"] .dot:not(.online)', { timeout: 10_000 });
        for (const p of [alice, dave, erin]) await p.context().close();
      } finally {
        await server.stop();
      }
    });
  }
});
