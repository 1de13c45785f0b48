// Test fixtures: the real parley binary on a free port with a SQLite file in a temp dir,
// a node proxy that can refuse or black-hole WebSocket upgrades and buffer streamed
// responses, and headless Chromium (Debian's /usr/bin/chromium via playwright-core).
import { execFileSync, spawn } from "node:child_process";
import { createHash, X509Certificate } from "node:crypto";
import { mkdtempSync, rmSync, existsSync, readFileSync } from "node:fs";
import http from "node:http";
import https from "node:https";
import net from "node:net";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const WEB = join(dirname(fileURLToPath(import.meta.url)), "..");
export const REPO = join(WEB, "..");
export const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
export const TEST_PARLEY_BIN = process.env.TEST_PARLEY_BIN || join(REPO, "target", "debug", "parley");
export const ADMIN_TOKEN = "test-admin-token";

const children = new Set();
function killAll() {
  for (const c of children) {
    try {
      c.kill("SIGKILL");
    } catch {
      /* gone */
    }
  }
}
process.on("exit", killAll);
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => (killAll(), process.exit(130)));

export async function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export async function waitFor(what, fn, timeoutMs = 10_000, everyMs = 50) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    await sleep(everyMs);
  }
  throw new Error(`timed out waiting for ${what} (last: ${last})`);
}

/**
 * A self-signed ECDSA P-256 certificate for `ip` and localhost, valid `days` (≤ 14
 * for WebTransport's `serverCertificateHashes`), written into `dir`: `{ cert, key, pem,
 * hash }` (hash: hex SHA-256 of the DER certificate, what the browser compares).
 */
export function makeCert(dir, days = 10, ip = "127.0.0.1") {
  const cert = join(dir, "cert.pem");
  const key = join(dir, "key.pem");
  execFileSync(
    "openssl",
    ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", String(days), "-subj", "/CN=localhost",
     "-addext", `subjectAltName=IP:${ip},DNS:localhost`, "-keyout", key, "-out", cert],
    { stdio: "ignore" },
  );
  const pem = readFileSync(cert, "utf8");
  const hash = createHash("sha256").update(new X509Certificate(pem).raw).digest("hex");
  return { cert, key, pem, hash };
}

/** GET over https trusting only `ca`; resolves with the status code. */
export function httpsStatus(url, ca) {
  return new Promise((resolve, reject) => {
    const req = https.get(url, { ca }, (r) => {
      r.resume();
      resolve(r.statusCode);
    });
    req.on("error", reject);
    req.setTimeout(2000, () => req.destroy(new Error("timeout")));
  });
}

/**
 * The real parley binary, on `port`, storing into `dir/p.db`. Restartable. With `tls`
 * (from makeCert) it serves HTTPS and, on the same port number over UDP, HTTP/3 and
 * WebTransport (`/wt`).
 */
export class ParleyServer {
  constructor({ port, dir, env = {}, tls } = {}) {
    this.port = port;
    this.dir = dir ?? mkdtempSync(join(tmpdir(), "parley-web-test-"));
    this.ownDir = !dir;
    this.env = env;
    this.tls = tls;
    this.proc = undefined;
    this.log = "";
  }
  get url() {
    return `${this.tls ? "https" : "http"}://127.0.0.1:${this.port}`;
  }
  async start() {
    if (!existsSync(TEST_PARLEY_BIN)) throw new Error(`${TEST_PARLEY_BIN} missing: run \`cargo build --bin parley\``);
    this.port ??= await freePort();
    const proc = spawn(TEST_PARLEY_BIN, ["--config", join(this.dir, "none.toml")], {
      env: {
        // Only the configuration below: parley reads every PARLEY_* variable.
        ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("PARLEY_"))),
        PARLEY_SERVER__LISTEN: `127.0.0.1:${this.port}`,
        PARLEY_STORE__PATH: join(this.dir, "p.db"),
        PARLEY_FILES__DIR: join(this.dir, "files"), // uploads stay in the temp dir
        PARLEY_STORE__SYNCHRONOUS: "normal",
        PARLEY_AUTH__JWT_SECRET: "browser-test-secret",
        PARLEY_AUTH__ADMIN_TOKEN: ADMIN_TOKEN,
        PARLEY_WEB__DEV_TOKENS: "true",
        PARLEY_LOG__FILTER: process.env.TEST_PARLEY_LOG || "warn",
        RUST_LOG: "warn",
        ...(this.tls ? { PARLEY_TLS__CERT_FILE: this.tls.cert, PARLEY_TLS__KEY_FILE: this.tls.key } : {}),
        ...this.env,
      },
      stdio: ["ignore", "pipe", "pipe"],
    });
    children.add(proc);
    proc.on("exit", () => children.delete(proc));
    proc.stdout.on("data", (d) => (this.log += d));
    proc.stderr.on("data", (d) => (this.log += d));
    this.proc = proc;
    await waitFor(`parley on ${this.port}`, async () => {
      if (proc.exitCode !== null) throw new Error(`parley exited: ${this.log}`);
      if (this.tls) return (await httpsStatus(`${this.url}/healthz`, this.tls.pem).catch(() => 0)) === 200;
      const r = await fetch(`${this.url}/healthz`).catch(() => undefined);
      return r?.ok;
    });
    return this;
  }
  /** SIGKILL: no goodbye to clients, sessions lost; the store keeps every acked message. */
  async kill() {
    const p = this.proc;
    if (!p || p.exitCode !== null) return;
    const exited = new Promise((r) => p.on("exit", r));
    p.kill("SIGKILL");
    await exited;
  }
  async stop() {
    await this.kill();
    if (this.ownDir) rmSync(this.dir, { recursive: true, force: true });
  }
  /** Posts a message as the admin (HTTP API), bypassing any browser. */
  async post(room, body, clientMsgId) {
    const r = await fetch(`${this.url}/api/v1/rooms/${encodeURIComponent(room)}/messages`, {
      method: "POST",
      headers: { authorization: `Bearer ${ADMIN_TOKEN}`, "content-type": "application/json" },
      body: JSON.stringify({ clientMsgId, body, sender: "bot" }),
    });
    if (!r.ok) throw new Error(`post: HTTP ${r.status} ${await r.text()}`);
    return r.json();
  }
}

/**
 * A reverse proxy in front of parley. `mode.ws`: "pass" | "refuse" (403 to every
 * upgrade) | "blackhole" (accept the TCP connection, never answer). `mode.buffer`: hold
 * every response until it is complete (breaks streaming: SSE never starts).
 */
export class TestProxy {
  constructor(upstreamPort, mode = {}) {
    this.upstreamPort = upstreamPort;
    this.mode = { ws: "pass", buffer: false, ...mode };
    this.counts = { upgrade: 0, sse: 0, poll: 0, session: 0, other: 0 };
    this.sockets = new Set();
    this.pipes = new Set(); // live [from, to] stream pairs, for freeze()
  }
  /**
   * Silently stops forwarding on every open connection (WebSocket tunnels, streaming
   * responses) without closing anything: a dead path only heartbeats can detect. New
   * connections work normally.
   */
  freeze() {
    for (const [from, to] of this.pipes) {
      from.unpipe(to);
      from.pause();
    }
    this.pipes.clear();
  }
  #pipe(from, to) {
    const pair = [from, to];
    this.pipes.add(pair);
    from.on("close", () => this.pipes.delete(pair));
    from.pipe(to);
  }
  get url() {
    return `http://127.0.0.1:${this.port}`;
  }
  async start() {
    this.server = http.createServer((req, res) => this.#request(req, res));
    this.server.on("upgrade", (req, socket, head) => this.#upgrade(req, socket, head));
    this.server.on("connection", (s) => {
      this.sockets.add(s);
      s.on("close", () => this.sockets.delete(s));
    });
    await new Promise((r) => this.server.listen(0, "127.0.0.1", r));
    this.port = this.server.address().port;
    return this;
  }
  #count(path) {
    if (path.startsWith("/sse")) this.counts.sse++;
    else if (path.startsWith("/poll")) this.counts.poll++;
    else if (path.startsWith("/session")) this.counts.session++;
    else this.counts.other++;
  }
  #request(req, res) {
    this.#count(req.url);
    const up = http.request(
      { host: "127.0.0.1", port: this.upstreamPort, method: req.method, path: req.url, headers: req.headers },
      (upRes) => {
        if (!this.mode.buffer) {
          res.writeHead(upRes.statusCode, upRes.headers);
          this.#pipe(upRes, res);
          return;
        }
        // A buffering proxy: nothing reaches the client until the response is complete.
        const chunks = [];
        upRes.on("data", (c) => chunks.push(c));
        upRes.on("end", () => {
          const body = Buffer.concat(chunks);
          const headers = { ...upRes.headers, "content-length": body.length };
          delete headers["transfer-encoding"];
          res.writeHead(upRes.statusCode, headers);
          res.end(body);
        });
      },
    );
    up.on("error", (e) => {
      if (process.env.PROXY_DEBUG) console.error("proxy:", e);
      if (!res.headersSent) res.writeHead(502);
      res.end();
    });
    res.on("close", () => {
      if (!res.writableFinished) up.destroy(); // the client went away
    });
    req.pipe(up);
  }
  #upgrade(req, socket, head) {
    this.counts.upgrade++;
    if (this.mode.ws === "refuse") {
      socket.end("HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
      return;
    }
    if (this.mode.ws === "blackhole") return; // never answer; closed in stop()
    const up = net.connect(this.upstreamPort, "127.0.0.1", () => {
      let head1 = `${req.method} ${req.url} HTTP/1.1\r\n`;
      for (let i = 0; i < req.rawHeaders.length; i += 2) head1 += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
      up.write(head1 + "\r\n");
      if (head.length) up.write(head);
      this.#pipe(up, socket);
      this.#pipe(socket, up);
    });
    this.sockets.add(up);
    up.on("close", () => this.sockets.delete(up));
    up.on("error", () => socket.destroy());
    socket.on("error", () => up.destroy());
  }
  async stop() {
    for (const s of this.sockets) s.destroy();
    await new Promise((r) => this.server.close(r));
  }
}

export async function launchBrowser(extraArgs = [], executablePath = CHROMIUM) {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} not found: install the Debian package \`chromium\` (apt-get install chromium)`);
  }
  return chromium.launch({
    executablePath,
    headless: true,
    // --disable-dev-shm-usage: containers often have a tiny /dev/shm.
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage", ...extraArgs],
  });
}

/**
 * Opens the demo page signed in as `name`; resolves once the SDK is connected. An
 * https `base` (a self-signed certificate) is trusted for the page, its fetches and
 * WebSockets only through `ignoreHTTPSErrors`; WebTransport checks the certificate
 * against the page's `certHash` itself.
 */
export async function openChat(browser, base, name, query = "", viewport) {
  const context = await browser.newContext({ ...(viewport ? { viewport } : {}), ...(base.startsWith("https:") ? { ignoreHTTPSErrors: true } : {}) });
  const page = await context.newPage();
  page.errors = [];
  page.on("pageerror", (e) => page.errors.push(e.message));
  const loaded = Date.now();
  await page.goto(`${base}/?name=${encodeURIComponent(name)}${query}`);
  await page.waitForSelector('#transport[data-state="connected"]', { timeout: 20_000 });
  page.connectedAfterMs = Date.now() - loaded;
  return page;
}

export async function say(page, text) {
  await page.fill("#text", text);
  await page.press("#text", "Enter");
}

/** The delivered (not pending) messages on screen, in order: [{seq, sender, body}]. */
export async function shown(page) {
  return page.$$eval("#list .msg[data-seq]", (els) =>
    els.map((e) => ({
      seq: Number(e.dataset.seq),
      sender: e.querySelector(".sender").textContent,
      body: e.querySelector(".body").textContent,
    })),
  );
}

export async function waitShown(page, body, timeoutMs = 10_000) {
  await page.waitForSelector(`#list .msg[data-seq] .body:text-is(${JSON.stringify(body)})`, { timeout: timeoutMs });
}

export async function transportOf(page) {
  return page.$eval("#transport", (e) => ({ transport: e.dataset.transport, state: e.dataset.state, label: e.textContent }));
}
