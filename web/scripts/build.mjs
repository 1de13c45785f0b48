// Builds the SDK into dist/: the generated protobuf code (src/gen, from ../proto) and
// three minified bundles with source maps, dependencies bundled by esbuild — an ES module
// (dist/parley.js, also served by parley at /sdk/parley.js), CommonJS (dist/parley.cjs)
// and a script-tag build that defines the global `parley` (dist/parley.global.js) — and
// their type declarations (dist/parley.d.ts, and dist/parley.d.cts for `require`).
// parley embeds dist/parley.js, .js.map and .d.ts (src/web.rs), so dist/ is
// committed; `--check` rebuilds into a temporary directory and fails when the committed
// files differ from what the sources give (a stale build).
//
//   node scripts/build.mjs           # rebuild src/gen and dist/
//   node scripts/build.mjs --check   # exit 1 if src/gen or dist/ is stale
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync, cpSync, existsSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";
import { generateSchema } from "./gen-schema.mjs";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const check = process.argv.includes("--check");
const bin = (name) => join(root, "node_modules", ".bin", name);
const tmp = mkdtempSync(join(tmpdir(), "parley-web-build-"));

const BANNER =
  "// parley browser SDK (web/ in the parley repository). Built by web/scripts/build.mjs from web/src;\n" +
  "// do not edit. Bundles the binary reader/writer of @bufbuild/protobuf (Apache-2.0,\n" +
  "// https://github.com/bufbuild/protobuf-es).";

function listFiles(dir, base = dir) {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? listFiles(join(dir, e.name), base) : [join(dir, e.name).slice(base.length + 1)],
  );
}

function same(a, b) {
  const fa = listFiles(a).sort();
  const fb = listFiles(b).sort();
  if (fa.join() !== fb.join()) return `files differ: [${fa}] vs [${fb}]`;
  for (const f of fa) {
    if (!readFileSync(join(a, f)).equals(readFileSync(join(b, f)))) return `${f} differs`;
  }
  return null;
}

try {
  // 1. Protobuf code from the schema.
  const gen = check ? join(tmp, "gen") : join(root, "src", "gen");
  rmSync(gen, { recursive: true, force: true });
  execFileSync(bin("buf"), ["generate", join(root, "..", "proto"), "--template", join(root, "buf.gen.yaml"), "-o", check ? tmp : root], {
    cwd: root,
    stdio: "inherit",
    env: { ...process.env, PATH: `${join(root, "node_modules", ".bin")}:${process.env.PATH}` },
  });
  const genDir = check ? join(tmp, "src", "gen") : join(root, "src", "gen");
  await generateSchema(join(genDir, "parley", "v1", "frames_pb.ts"), join(genDir, "schema.ts"));
  if (check) {
    const diff = same(join(tmp, "src", "gen"), join(root, "src", "gen"));
    if (diff) throw new Error(`web/src/gen is stale against proto/ (${diff}): run \`npm run build\` in web/ and commit`);
  }

  // 2. The bundle.
  const out = check ? join(tmp, "dist") : join(root, "dist");
  mkdirSync(out, { recursive: true });
  const bundles = [
    { file: "parley.js", format: "esm" },
    { file: "parley.cjs", format: "cjs" },
    { file: "parley.global.js", format: "iife", globalName: "parley" },
  ];
  for (const b of bundles) {
    // Built as if into web/dist (so the maps' relative source paths are the committed
    // ones, with --check too), then written to `out`.
    const result = await esbuild.build({
      entryPoints: [join(root, "src", "parley.ts")],
      outfile: join(root, "dist", b.file),
      write: false,
      bundle: true,
      format: b.format,
      globalName: b.globalName,
      platform: "browser",
      target: ["es2022"],
      minify: true,
      sourcemap: "linked",
      sourcesContent: true,
      // Paths in the maps relative to web/, the same wherever the build ran.
      sourceRoot: "",
      absWorkingDir: root,
      legalComments: "none",
      banner: { js: BANNER },
      logLevel: "warning",
    });
    for (const f of result.outputFiles) writeFileSync(join(out, basename(f.path)), f.contents);
  }

  // 3. Type declarations (parley.d.ts is self-contained: every public type lives in parley.ts).
  const types = join(tmp, "types");
  execFileSync(bin("tsc"), ["-p", root, "--outDir", types], { cwd: root, stdio: "inherit" });
  const dts = readFileSync(join(types, "parley.d.ts"), "utf8");
  if (/^\s*(import|export .* from)/m.test(dts)) throw new Error("parley.d.ts must not import other modules");
  writeFileSync(join(out, "parley.d.ts"), "// parley browser SDK: type declarations for parley.js (generated).\n" + dts);
  writeFileSync(join(out, "parley.d.cts"), "// parley browser SDK: type declarations for parley.cjs (generated).\n" + dts);

  if (check) {
    const diff = same(out, join(root, "dist"));
    if (diff) throw new Error(`web/dist is stale against web/src (${diff}): run \`npm run build\` in web/ and commit`);
    console.log("web/dist and web/src/gen are up to date");
  } else {
    console.log(`built ${join(out, "parley.js")} (${readFileSync(join(out, "parley.js")).length} bytes)`);
  }
} catch (e) {
  console.error(String(e.message ?? e));
  process.exitCode = 1;
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
