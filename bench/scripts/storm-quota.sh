#!/usr/bin/env bash
# Connect storm with each server held to a CPU quota (issue 24, goal 3; docs/BENCHMARKS.md
# "Round eight: the storm with the server at its limit"). On a small machine one
# generator core cannot fill a server core, so the floor's rate says what the generator
# offered, not what the floor can take. A CFS quota (QUOTA % of one core) makes every
# server the bottleneck: the generator then has spare CPU, both servers run at their
# limit, and rate ÷ rate is the same-sitting ratio of what a handshake costs.
#
#   bench/scripts/storm-quota.sh OUTDIR QUOTA ROUNDS BENCH SERVER... [-- STORM ARGS]
#
# QUOTA: percent of one core (e.g. 50). SERVERs are absolute paths (parley or
# parley-floor), run in turn each round, the first being the one the others are divided
# by; BENCH the parley-bench binary. Default storm: `storm -c 64 -d 6s --settle 1s
# --join`. Needs root and the cgroup cpu controller (v1 `cpu.cfs_quota_us` or v2
# `cpu.max`). Server on CPU 0, generator on CPU 1, both at nice NICE (default -15, so
# that other work on the machine, a build, does not take the server's quota or the
# generator's core; the cgroup gets the largest CPU weight for the same reason). Writes OUTDIR/RUN.json and the cgroup's throttling counters
# (OUTDIR/RUN.throttled: periods, throttled periods; a server at its limit is throttled in
# most periods of the storm), prints a table, and removes its cgroup and wrapper scripts
# when done. Bounded: ROUNDS × servers runs of the storm's duration.
set -euo pipefail
nice=${NICE:--15}
[ $# -ge 5 ] || { sed -n 2,16p "$0"; exit 2; }
out=$1 quota=$2 rounds=$3 bench=$4; shift 4
servers=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do servers+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
storm=("$@"); [ ${#storm[@]} -gt 0 ] || storm=(storm -c 64 -d 6s --settle 1s --join)
mkdir -p "$out"
name=parley-quota-$$
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  cg=/sys/fs/cgroup/$name; mkdir "$cg"
  echo "$((quota * 1000)) 100000" > "$cg/cpu.max"; echo 10000 > "$cg/cpu.weight"
elif [ -d /sys/fs/cgroup/cpu ]; then
  cg=/sys/fs/cgroup/cpu/$name; mkdir "$cg"
  echo 100000 > "$cg/cpu.cfs_period_us"; echo $((quota * 1000)) > "$cg/cpu.cfs_quota_us"
  echo 262144 > "$cg/cpu.shares"
else
  echo "no cgroup cpu controller" >&2; exit 1
fi
# "periods throttled_periods" of the cgroup so far.
throttled() { awk '/^nr_periods/ {p=$2} /^nr_throttled/ {t=$2} END {print p+0, t+0}' "$cg/cpu.stat"; }
wraps=()
cleanup() {
  rm -f "${wraps[@]}"
  # The servers are gone once parley-bench returns (it kills what it spawned).
  rmdir "$cg" 2>/dev/null || true
}
trap cleanup EXIT
i=0
for s in "${servers[@]}"; do
  w=$(mktemp /tmp/storm-quota-wrap.XXXXXX); wraps+=("$w")
  printf '#!/bin/sh\necho $$ > %s/cgroup.procs\nrenice -n %s -p $$ >/dev/null\nexec %s "$@"\n' "$cg" "$nice" "$s" > "$w"; chmod +x "$w"
  i=$((i + 1))
done
for r in $(seq 1 "$rounds"); do
  i=0
  for s in "${servers[@]}"; do
    run="r$r-$i-$(basename "$s")"
    before=$(throttled)
    nice -n "$nice" taskset -c 1 "$bench" --no-progress --server-cpu 0 --json --spawn-server "${wraps[$i]}" \
      "${storm[@]}" > "$out/$run.json" 2> "$out/$run.log"
    echo "$before $(throttled)" > "$out/$run.throttled"
    i=$((i + 1))
  done
done
python3 - "$out" "$quota" "${servers[@]}" <<'EOF'
import json, os, sys
out, quota, servers = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
runs = sorted(f for f in os.listdir(out) if f.endswith('.json'))
print(f"quota {quota:.0f} % of one core; µs = server CPU per handshake")
print("run | handshakes/s | errors | server CPU % | µs/hs | generator CPU % | throttled periods | ÷ first: rate, µs")
first = {}
for f in runs:
    d = json.load(open(os.path.join(out, f)))["runs"][0]
    rate, cpu, gen = d["handshakes_per_s"], d["server_cpu"], d["client_cpu"]
    us = cpu / 100 * 1e6 / rate
    p0, t0, p1, t1 = map(int, open(os.path.join(out, f[:-5] + ".throttled")).read().split())
    thr = f"{t1 - t0}/{p1 - p0}"
    r, i = f.split("-")[0], int(f.split("-")[1])
    if i == 0:
        first[r] = (rate, us)
    fr, fu = first.get(r, (rate, us))
    print(f"{f[:-5]} | {rate:,.0f} | {d.get('errors', 0)} | {cpu:.1f} | {us:.1f} | {gen:.1f} | {thr} | {rate/fr:.2f}, {us/fu:.2f}")
EOF
