// Time from page load to connected, per transport, and time to fall back when WebSocket
// is blocked: refused (403 to the upgrade) or silently black-holed (never answered), and
// when a proxy also buffers streamed responses (SSE never starts: long-poll).
//
// Each run is a fresh browser context (no remembered transport) loading the demo page;
// "load → connected" is performance.now() at the SDK's first `connected` event (ms since
// navigation start: page, SDK module, dev token, transport handshake); "SDK → connected"
// is from `new Parley()` to that event (the SDK's own part, fallbacks included).
//
//   cargo build --release --bin parley && cd web && npm ci
//   TEST_PARLEY_BIN=../target/release/parley node bench/connect.mjs [runs]
import { ParleyServer, TestProxy, launchBrowser } from "../test/helpers.mjs";

const runs = Number(process.argv[2] ?? 15);
const pct = (xs, p) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
};

const server = await new ParleyServer().start();
const browser = await launchBrowser();
const cases = [
  ["WebSocket, protobuf", {}, ""],
  ["WebSocket, JSON", {}, "&encoding=json"],
  ["SSE", {}, "&transports=sse"],
  ["long-poll", {}, "&transports=poll"],
  ["WebSocket refused → SSE", { ws: "refuse" }, ""],
  ["WebSocket black-holed → SSE", { ws: "blackhole" }, ""],
  ["WebSocket refused + buffering proxy → long-poll", { ws: "refuse", buffer: true }, ""],
];
console.log(`parley: ${process.env.TEST_PARLEY_BIN ?? "target/debug/parley"}; ${runs} runs per case; loopback\n`);
console.log("| case | transport | load → connected p50 / p90 / max (ms) | SDK → connected p50 / p90 / max (ms) |");
console.log("|---|---|---:|---:|");
for (const [name, mode, query] of cases) {
  const proxy = await new TestProxy(server.port, mode).start();
  const load = [];
  const sdk = [];
  let transport = "";
  for (let i = 0; i < runs; i++) {
    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    await page.goto(`${proxy.url}/?name=u${i}${query}`);
    await page.waitForFunction(() => window.connectedAt !== undefined, null, { timeout: 30_000 });
    const r = await page.evaluate(() => ({ at: window.connectedAt, sdk: window.parley.stats.firstConnectMs, t: window.parley.transport }));
    load.push(r.at);
    sdk.push(r.sdk);
    transport = r.t;
    await ctx.close();
  }
  await proxy.stop();
  const f = (xs) => `${pct(xs, 50).toFixed(0)} / ${pct(xs, 90).toFixed(0)} / ${Math.max(...xs).toFixed(0)}`;
  console.log(`| ${name} | ${transport} | ${f(load)} | ${f(sdk)} |`);
}
await browser.close();
await server.stop();
