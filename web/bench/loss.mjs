// The loss benchmark (docs/BENCHMARKS.md, "WebSocket and WebTransport on a lossy path"):
// message latency p50/p99 of the same traffic over WebSocket and over WebTransport,
// measured by the SDK in headless Chromium, through a path of 100 ms RTT with 0 %, 2 %
// and 5 % random packet loss each way (bench/lossnet.py: network namespaces and a TUN
// router, so both ends run the kernel's real TCP and real QUIC). Root only; bounded by
// --seconds per run.
//
//   cargo build --release --bin parley
//   sudo TEST_PARLEY_BIN=target/release/parley node web/bench/loss.mjs [--seconds 30] [--loss 0,0.02,0.05]
//
// Traffic: 4 sending clients and 1 receiving client in one page (one clock), all in one
// room; each sender sends a message every 400 ms (10 messages/s in all); latency is the
// time from `send()` to the receiver's `message` event (upstream and downstream both
// cross the lossy path, as in a real chat).
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync, chmodSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { CHROMIUM, TEST_PARLEY_BIN, WEB, makeCert } from "../test/helpers.mjs";

const arg = (name, dflt) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : dflt;
};
const SECONDS = Number(arg("seconds", "30"));
const LOSSES = arg("loss", "0,0.02,0.05").split(",").map(Number);
const DELAY_MS = Number(arg("delay-ms", "50"));
const SERVER = "10.91.2.2";
const PORT = 8443;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const dir = mkdtempSync(join(tmpdir(), "parley-loss-"));
const cert = makeCert(dir, 10, SERVER);
const wrapper = join(dir, "chromium-in-plc");
writeFileSync(wrapper, `#!/bin/sh\nexec ip netns exec plc ${CHROMIUM} "$@"\n`);
chmodSync(wrapper, 0o755);

function start(cmd, args, opts = {}) {
  const p = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"], ...opts });
  p.log = "";
  p.stdout.on("data", (d) => (p.log += d));
  p.stderr.on("data", (d) => (p.log += d));
  return p;
}
async function stop(p) {
  if (!p || p.exitCode !== null) return;
  const done = new Promise((r) => p.on("exit", r));
  p.kill("SIGTERM");
  await Promise.race([done, sleep(5000)]);
  if (p.exitCode === null) p.kill("SIGKILL");
}

async function run(loss) {
  const net = start("python3", [join(WEB, "bench/lossnet.py"), "up", "--delay-ms", String(DELAY_MS), "--loss", String(loss), "--seconds", String(SECONDS * 2 + 120)]);
  let parley;
  let browser;
  try {
    for (let i = 0; !net.log.includes("ready"); i++) {
      if (i > 100 || net.exitCode !== null) throw new Error(`lossnet: ${net.log}`);
      await sleep(100);
    }
    parley = start("ip", ["netns", "exec", "pls", TEST_PARLEY_BIN, "--config", join(dir, "none.toml")], {
      env: {
        ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("PARLEY_"))),
        PARLEY_SERVER__LISTEN: `${SERVER}:${PORT}`,
        PARLEY_STORE__PATH: join(dir, `p-${loss}.db`),
        PARLEY_STORE__SYNCHRONOUS: "normal",
        PARLEY_FILES__DIR: join(dir, "files"),
        PARLEY_AUTH__JWT_SECRET: "loss-bench-secret",
        PARLEY_WEB__DEV_TOKENS: "true",
        PARLEY_TLS__CERT_FILE: cert.cert,
        PARLEY_TLS__KEY_FILE: cert.key,
        PARLEY_LOG__FILTER: "warn",
      },
    });
    for (let i = 0; ; i++) {
      try {
        execFileSync("ip", ["netns", "exec", "pls", "curl", "-sfk", `https://${SERVER}:${PORT}/healthz`], { stdio: "ignore" });
        break;
      } catch {
        if (i > 100 || parley.exitCode !== null) throw new Error(`parley: ${parley.log}`);
        await sleep(100);
      }
    }
    browser = await chromium.launch({
      executablePath: wrapper,
      headless: true,
      args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"],
    });
    const out = {};
    for (const transport of ["websocket", "webtransport"]) {
      const context = await browser.newContext({ ignoreHTTPSErrors: true });
      const page = await context.newPage();
      for (let i = 0; ; i++) {
        try {
          await page.goto(`https://${SERVER}:${PORT}/healthz`, { timeout: 60_000 });
          break;
        } catch (e) {
          if (i >= 3) throw e; // e.g. ERR_NETWORK_CHANGED while the links settle
          await sleep(1000);
        }
      }
      out[transport] = await page.evaluate(measure, { transport, hash: cert.hash, seconds: SECONDS });
      await context.close();
    }
    return out;
  } finally {
    await browser?.close().catch(() => {});
    await stop(parley);
    await stop(net);
  }
}

/** In the page: 4 senders, 1 receiver, one room; returns the latencies (ms). */
async function measure({ transport, hash, seconds }) {
  const { Parley } = await import("/sdk/parley.js");
  const token = async (user) =>
    (await (await fetch("/api/v1/dev/token", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ user }) })).json()).token;
  const value = new Uint8Array(hash.match(/../g).map((b) => parseInt(b, 16)));
  const opts =
    transport === "webtransport"
      ? { transports: ["webtransport"], serverCertificateHashes: [{ algorithm: "sha-256", value }] }
      : { transports: ["websocket"], webTransport: "never" };
  const room = `bench-${transport}-${Date.now()}`;
  const make = async (user) => {
    const c = new Parley(location.origin, { token: await token(user), networkPings: 0, rememberTransport: false, ...opts });
    await c.ready();
    await c.join(room);
    return c;
  };
  const rx = await make("rx");
  const senders = [];
  for (let i = 0; i < 4; i++) senders.push(await make(`tx${i}`));
  const lat = [];
  rx.on("message", (m) => {
    if (m.room === room) lat.push(performance.now() - Number(m.body));
  });
  let sent = 0;
  // How late the page's own timers fired (the page stalled: a busy machine, not the path).
  let lagMax = 0;
  const end = performance.now() + seconds * 1000;
  const timers = senders.map((c, i) => {
    let due = performance.now() + i * 100;
    return setTimeout(function tick() {
      const now = performance.now();
      lagMax = Math.max(lagMax, now - due);
      if (now >= end) return;
      sent++;
      c.send(room, String(now)).catch(() => {});
      due = now + 400;
      timers[i] = setTimeout(tick, 400);
    }, i * 100);
  });
  while (performance.now() < end) await new Promise((r) => setTimeout(r, 200));
  const deadline = performance.now() + 30_000;
  while (lat.length < sent && performance.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  const used = [rx, ...senders].map((c) => c.transport);
  const reconnects = [rx, ...senders].reduce((n, c) => n + c.stats.connects - 1, 0);
  for (const c of [rx, ...senders]) c.close();
  return { sent, received: lat.length, lat, used: [...new Set(used)], reconnects, lagMax };
}

const pct = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
const rows = [];
try {
  for (const loss of LOSSES) {
    const r = await run(loss);
    for (const [transport, v] of Object.entries(r)) {
      const s = [...v.lat].sort((a, b) => a - b);
      rows.push({ loss, transport, sent: v.sent, received: v.received, p50: pct(s, 50), p90: pct(s, 90), p99: pct(s, 99), max: s.at(-1), used: v.used.join("+"), reconnects: v.reconnects, timerLagMax: Math.round(v.lagMax) });
      console.error(JSON.stringify(rows.at(-1)));
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
console.log(`| loss each way | transport | sent | received | p50 ms | p90 ms | p99 ms | max ms | page timer lag max ms |`);
console.log(`|---|---|---|---|---|---|---|---|---|`);
for (const r of rows) {
  console.log(`| ${r.loss * 100} % | ${r.transport} | ${r.sent} | ${r.received} | ${r.p50.toFixed(0)} | ${r.p90.toFixed(0)} | ${r.p99.toFixed(0)} | ${r.max.toFixed(0)} | ${r.timerLagMax} |`);
}
