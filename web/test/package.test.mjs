// The npm package as a developer gets it: `npm pack` in web/, the tarball installed into
// an empty project, then `import` and `require` in Node (each chatting with the real
// parley binary), a type check of a small TypeScript file against the shipped
// declarations, and the script-tag build used by a plain page on another origin in
// headless Chromium — following only the package README: dev token, allowed_origins,
// chat, an image upload shown on another page, and the error a disallowed origin gets.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync, readdirSync } from "node:fs";
import http from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { ParleyServer, WEB, freePort, launchBrowser, waitFor } from "./helpers.mjs";

const NAME = "@parley-chat/sdk";
let dir; // the consumer project
let tarball;
let packed;

function run(cmd, args, cwd, input) {
  return execFileSync(cmd, args, { cwd, encoding: "utf8", input, stdio: ["pipe", "pipe", "pipe"] });
}

before(() => {
  dir = mkdtempSync(join(tmpdir(), "parley-pkg-"));
  const out = run("npm", ["pack", "--json", "--pack-destination", dir], WEB);
  packed = JSON.parse(out)[0];
  tarball = join(dir, packed.filename);
  writeFileSync(join(dir, "package.json"), JSON.stringify({ name: "consumer", private: true }));
  run("npm", ["install", "--offline", "--no-audit", "--no-fund", "--loglevel=error", tarball], dir);
});
after(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe("npm package", () => {
  test("the tarball: builds, types, maps, README and LICENSE; publishable; no bundled dependency declared", () => {
    const files = packed.files.map((f) => f.path).sort();
    for (const f of [
      "README.md",
      "LICENSE",
      "LICENSE-MIT",
      "LICENSE-APACHE",
      "package.json",
      "dist/parley.js",
      "dist/parley.js.map",
      "dist/parley.cjs",
      "dist/parley.cjs.map",
      "dist/parley.global.js",
      "dist/parley.global.js.map",
      "dist/parley.d.ts",
      "dist/parley.d.cts",
    ]) {
      assert.ok(files.includes(f), `${f} in the tarball: ${files}`);
    }
    assert.ok(!files.some((f) => f.startsWith("src/") || f.startsWith("test/") || f.startsWith("node_modules/")), `${files}`);
    const pkg = JSON.parse(readFileSync(join(dir, "node_modules", NAME, "package.json"), "utf8"));
    assert.equal(pkg.name, NAME);
    assert.notEqual(pkg.private, true, "publishable");
    assert.deepEqual(Object.keys(pkg.dependencies ?? {}), [], "dist/ bundles everything it needs");
    const readme = readFileSync(join(dir, "node_modules", NAME, "README.md"), "utf8");
    for (const must of ["allowed_origins", "expiresInMs", "getToken", "parley.global.js", "require("]) {
      assert.ok(readme.includes(must), `README mentions ${must}`);
    }
    // Each map names the TypeScript sources and carries them.
    const map = JSON.parse(readFileSync(join(dir, "node_modules", NAME, "dist", "parley.cjs.map"), "utf8"));
    const i = map.sources.indexOf("../src/parley.ts");
    assert.ok(i >= 0 && map.sourcesContent[i].includes("export class Parley"));
  });

  test("import (ESM) and require (CommonJS) in Node, each chatting with a real server", async () => {
    const server = await new ParleyServer().start();
    try {
      const token = async (user) =>
        (await (await fetch(`${server.url}/api/v1/dev/token`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ user }) })).json()).token;
      // Node 20 has no WebSocket global: SSE and long-poll (fetch) carry the session.
      const script = (load) => `
        ${load}
        const idle = new Parley(process.env.URL, { token: "x", autoConnect: false });
        if (idle.state !== "idle") throw new Error("state before connect: " + idle.state);
        const c = new Parley(process.env.URL, { token: process.env.TOKEN, transports: [process.env.T] });
        (async () => {
          await c.ready();
          await c.join("pkg");
          const got = c.once("message");
          const seq = await c.send("pkg", "from " + process.env.T);
          const m = await got;
          console.log(JSON.stringify({ seq, body: m.body, transport: c.transport, error: new ParleyError("x").name }));
          c.close();
        })().catch((e) => { console.error(e); process.exit(1); });`;
      const outs = [];
      for (const [kind, load, t] of [
        ["esm", `import { Parley, ParleyError } from "${NAME}";`, "sse"],
        ["cjs", `const { Parley, ParleyError } = require("${NAME}");`, "poll"],
      ]) {
        const out = execFileSync("node", kind === "esm" ? ["--input-type=module", "-e", script(load)] : ["-e", script(load)], {
          cwd: dir,
          encoding: "utf8",
          env: { ...process.env, URL: server.url, TOKEN: await token(`node-${kind}`), T: t },
          timeout: 30_000,
        });
        outs.push(JSON.parse(out.trim().split("\n").pop()));
      }
      assert.deepEqual(
        outs.map((o) => [o.body, o.transport, o.error]),
        [
          ["from sse", "sse", "ParleyError"],
          ["from poll", "poll", "ParleyError"],
        ],
      );
      assert.deepEqual(outs.map((o) => o.seq), [1, 2]);
    } finally {
      await server.stop();
    }
  });

  test("the declarations type-check a consumer (ESM and CommonJS) and catch a wrong call", () => {
    const use = `
      const c = new Parley("https://chat.example", { getToken: async ({ refresh }) => (refresh ? "new" : "cached"), debug: true });
      c.on("state", (e: StateEvent) => { const n: number = e.attempt + e.nextDelayMs; void n; });
      c.on("message", (m: ChatMessage) => { const a: Attachment[] = m.attachments; void a; });
      async function f(file: Blob): Promise<void> {
        const a = await c.upload(file, { onProgress: (sent: number, total: number) => void (sent / total) });
        const seq: number = await c.send("lobby", "hi", { attachments: [a] });
        for await (const m of c.iterateHistory("lobby", { pageSize: 10 })) void m.seq;
        const roster: RosterEntry[] = await c.roster("lobby");
        const first: ChatMessage = await c.once("message");
        void seq; void roster; void first; c.retryNow();
        // @ts-expect-error: a room name is a string
        await c.send(1, "x");
      }
      void f; void ParleyError;
    `;
    const names = "Parley, ParleyError, type StateEvent, type ChatMessage, type Attachment, type RosterEntry";
    writeFileSync(join(dir, "use.mts"), `import { ${names} } from "${NAME}";\n${use}`);
    writeFileSync(join(dir, "use.cts"), `import { ${names} } from "${NAME}";\n${use}`);
    writeFileSync(
      join(dir, "tsconfig.json"),
      JSON.stringify({
        compilerOptions: { strict: true, noEmit: true, module: "nodenext", moduleResolution: "nodenext", target: "es2022", lib: ["es2022", "dom", "dom.iterable", "dom.asynciterable"], skipLibCheck: false, types: [] },
        files: ["use.mts", "use.cts"],
      }),
    );
    const tsc = join(WEB, "node_modules", ".bin", "tsc");
    run(tsc, ["-p", dir], dir);
    // And the check can fail: a wrong type is reported.
    writeFileSync(join(dir, "use.mts"), `import { Parley } from "${NAME}";\nconst s: number = new Parley("x").state;\nvoid s;\n`);
    assert.throws(
      () => run(tsc, ["-p", dir], dir),
      (e) => /use.mts\(2,7\): error TS2322: .* not assignable to type 'number'/.test(String(e.stdout)),
    );
  });

  test("the script-tag build on another origin: README setup, chat, an image shown on another page; a disallowed origin is named", async () => {
    // A plain static site on its own origin, serving the installed package's global build.
    const pagePort = await freePort();
    const site = http.createServer((req, res) => {
      if (req.url === "/parley.global.js") {
        res.writeHead(200, { "content-type": "text/javascript" });
        res.end(readFileSync(join(dir, "node_modules", NAME, "dist", "parley.global.js")));
      } else {
        res.writeHead(200, { "content-type": "text/html" });
        res.end(`<!doctype html><title>app</title><script src="/parley.global.js"></script><img id="pic" alt="">`);
      }
    });
    await new Promise((r) => site.listen(pagePort, "127.0.0.1", r));
    const origin = `http://127.0.0.1:${pagePort}`;
    const server = await new ParleyServer({ env: { PARLEY_SERVER__ALLOWED_ORIGINS: `["${origin}"]` } }).start();
    const strict = await new ParleyServer().start(); // allows no other origin
    const browser = await launchBrowser();
    try {
      const open = async (user) => {
        const page = await browser.newPage();
        await page.goto(`${origin}/`);
        assert.equal(new URL(page.url()).origin, origin);
        await page.evaluate(
          async ({ url, user }) => {
            // As the README says: a dev token, then the global `parley`.
            const r = await fetch(`${url}/api/v1/dev/token`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ user }) });
            const { token } = await r.json();
            window.got = [];
            window.chat = new parley.Parley(url, { token });
            window.chat.on("message", (m) => window.got.push(m));
            await window.chat.ready();
            await window.chat.join("pics");
          },
          { url: server.url, user },
        );
        return page;
      };
      const alice = await open("alice");
      const bob = await open("bob");
      const progress = await alice.evaluate(async () => {
        // A real PNG from a canvas.
        const canvas = document.createElement("canvas");
        canvas.width = 40;
        canvas.height = 30;
        const g = canvas.getContext("2d");
        g.fillStyle = "#c33";
        g.fillRect(0, 0, 40, 30);
        const blob = await new Promise((r) => canvas.toBlob(r, "image/png"));
        const seen = [];
        const a = await window.chat.upload(blob, { name: "red.png", onProgress: (sent, total) => seen.push([sent, total]) });
        await window.chat.send("pics", "a red square", { attachments: [a] });
        return { seen, a, size: blob.size };
      });
      assert.equal(progress.a.contentType, "image/png");
      assert.equal(progress.a.width, 40);
      assert.ok(progress.seen.length >= 1 && progress.seen.at(-1)[0] === progress.size, JSON.stringify(progress.seen));
      await waitFor("bob gets the message", () => bob.evaluate(() => window.got.some((m) => m.body === "a red square")));
      const shown = await bob.evaluate(async () => {
        const m = window.got.find((m) => m.body === "a red square");
        const img = document.getElementById("pic");
        img.src = await window.chat.fileUrl(m.attachments[0].fileId);
        await img.decode();
        return { w: img.naturalWidth, h: img.naturalHeight, name: m.attachments[0].name, transport: window.chat.transport };
      });
      assert.deepEqual(shown, { w: 40, h: 30, name: "red.png", transport: "websocket" });

      // The same page against a parley that does not allow its origin: a clear error.
      const lost = await browser.newPage();
      await lost.goto(`${origin}/`);
      const err = await lost.evaluate(
        (url) =>
          new Promise((resolve) => {
            const c = new parley.Parley(url, { token: "t", connectTimeoutMs: 2000, backoffMinMs: 200 });
            c.on("error", (e) => {
              if (e.code === "ORIGIN_NOT_ALLOWED") {
                c.close();
                resolve(e.message);
              }
            });
          }),
        strict.url,
      );
      assert.match(err, /allowed_origins/);
      assert.ok(err.includes(origin), err);
    } finally {
      await browser.close();
      await server.stop();
      await strict.stop();
      await new Promise((r) => site.close(r));
    }
  });
});
