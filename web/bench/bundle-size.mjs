// Bundle size of the parley SDK against socket.io-client and centrifuge-js, each built
// the same way: one esbuild bundle of the package's browser ES module entry (format esm,
// platform browser, minified, no legal comments), then gzip -9 of that file.
//
//   cd web && npm ci && node bench/bundle-size.mjs
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import * as esbuild from "esbuild";

const root = join(import.meta.dirname ?? new URL(".", import.meta.url).pathname, "..");
const tmp = mkdtempSync(join(tmpdir(), "parley-size-"));
const version = (p) => JSON.parse(readFileSync(join(root, "node_modules", p, "package.json"), "utf8")).version;

const cases = [
  ["parley (this SDK: WebSocket+SSE+long-poll, protobuf+JSON)", `export { Parley } from ${JSON.stringify(join(root, "src/parley.ts"))};`],
  [`socket.io-client ${version("socket.io-client")}`, `export { io } from "socket.io-client";`],
  [`centrifuge ${version("centrifuge")} (JSON)`, `export { Centrifuge } from "centrifuge";`],
  [`centrifuge ${version("centrifuge")} (protobuf build)`, `export { Centrifuge } from "centrifuge/build/protobuf";`],
];

const rows = [];
for (const [name, source] of cases) {
  const entry = join(tmp, "entry.mjs");
  writeFileSync(entry, source);
  const out = join(tmp, "out.js");
  await esbuild.build({
    entryPoints: [entry],
    outfile: out,
    bundle: true,
    format: "esm",
    platform: "browser",
    target: ["es2022"],
    minify: true,
    legalComments: "none",
    nodePaths: [join(root, "node_modules")],
    logLevel: "error",
  });
  const bytes = readFileSync(out);
  rows.push([name, bytes.length, gzipSync(bytes, { level: 9 }).length]);
}
rmSync(tmp, { recursive: true, force: true });
const dist = readFileSync(join(root, "dist/parley.js"));
console.log("| library | minified (bytes) | minified + gzip -9 (bytes) |");
console.log("|---|---:|---:|");
for (const [n, min, gz] of rows) console.log(`| ${n} | ${min} | ${gz} |`);
console.log(`\n(web/dist/parley.js as committed: ${dist.length} bytes, ${gzipSync(dist, { level: 9 }).length} gzipped)`);
