#!/usr/bin/env bash
# Where a connect storm's real CPU goes (docs/BENCHMARKS.md, round nine: the storm's
# real CPU): `perf record` with the cpu-clock software event (no hardware counters
# needed, so it works in a VM without a PMU) on SERVER (CPU 0) over a 6 s storm with join
# of 64 workers from BENCH (CPU 1), then µs of server CPU per handshake split by system
# call (the outermost `__x64_sys_*` frame of each sample; "user" is everything outside
# one) and, for user space, by crate (the symbol's first path segment; `parley::x` and
# `core::x` by their first two).
#   bench/scripts/storm-perf.sh NAME SERVER BENCH  (absolute paths; needs perf and root,
#   or kernel.perf_event_paranoid ≤ 1)
# Writes /tmp/storm/perf-NAME/{perf.data,out.json,report.txt}. The kernel's share of a
# handshake depends on the machine (loopback TCP runs the peer's receive path inside the
# sender's system call): compare servers within one sitting, not across machines.
set -u
. "$(dirname "$0")/storm-env.sh"
name=$1 server=$2 bench=$3
storm-serve /tmp/storm/perf-$name "$server"
trap 'kill $spid 2>/dev/null; wait $spid 2>/dev/null' EXIT
# A warm-up storm, as storm-strace.sh does (first connections, the store's first pages).
taskset -c 1 "$bench" --url ws://127.0.0.1:$port/ws --jwt-secret cg-secret --no-progress storm -c 64 -d 1s --settle 0s --join >/dev/null 2>&1
perf record -q -e cpu-clock -F 4999 -g -p $spid -o perf.data 2>/dev/null & ppid=$!
sleep 0.3
taskset -c 1 "$bench" --url ws://127.0.0.1:$port/ws --jwt-secret cg-secret --no-progress --json --server-pid $spid storm -c 64 -d 6s --settle 0s --join > out.json 2>/dev/null
kill -INT $ppid; wait $ppid 2>/dev/null
python3 - "$name" > report.txt <<'PY'
import collections, json, re, subprocess, sys
name = sys.argv[1]
r = json.load(open('out.json'))['runs'][0]
h = r['handshakes']
# Each sample stands for 1/4999 s of CPU (cpu-clock at -F 4999).
us = 1e6 / 4999 / h
script = subprocess.run(['perf', 'script', '-i', 'perf.data', '-F', 'ip,sym'],
                        capture_output=True, text=True).stdout
calls, crates = collections.Counter(), collections.Counter()
n = 0
for block in script.split('\n\n'):
    lines = [x.strip() for x in block.strip().splitlines() if x.strip()]
    if not lines:
        continue
    kernel = lines[0].startswith('ffffffff')
    frames = [l.split(None, 1)[1].split('+0x')[0] if len(l.split(None, 1)) > 1 else '?'
              for l in lines]
    n += 1
    sys_ = [f for f in frames if f.startswith('__x64_sys_')]
    if sys_:
        calls[sys_[-1][len('__x64_sys_'):]] += 1
        continue
    if kernel:
        calls['kernel, outside a system call'] += 1
        continue
    calls['user space'] += 1
    s = re.sub(r'^[<&]+(mut )?', '', frames[0])
    parts = s.split('::')
    key = parts[0] if len(parts) > 1 else ('sqlite' if s.startswith('sqlite3') else s)
    if parts[0] in ('parley', 'core', 'alloc', 'parley_floor') and len(parts) > 2:
        key = '::'.join(parts[:2])
    crates[key] += 1
print(f"{name}: {h} handshakes, {r['handshakes_per_s']:.0f}/s, server CPU {r['server_cpu']:.0f} %, "
      f"{n * us:.1f} µs of server CPU per handshake ({n} samples)")
print("by system call (µs per handshake):")
for k, v in calls.most_common(12):
    print(f"  {k:34s} {v * us:6.2f}")
print("user space by crate or symbol (µs per handshake):")
for k, v in crates.most_common(24):
    print(f"  {k:34s} {v * us:6.2f}")
PY
cat report.txt
