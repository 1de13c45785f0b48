#!/bin/bash
# RSS after a burst (docs/BENCHMARKS.md, "Round four: memory"): bench/scripts/burst-rss.sh NAME SERVER [ENV=VALUE...]
# BENCH (default target/release/parley-bench); N, R, D: subscribers, msg/s, duration. Server on CPU 0; fanout
# N x R/s for D (proto)
# from CPU 1; RSS before, connected (bench), right after drain (bench), and 5 s and 12 s after the
# bench closed its connections (/proc). Also the anonymous part of each (RssAnon: heap,
# stacks, written data; the rest is the binary's code and read-only data mapped from its
# file), and RSS above the process's own reading before the bench connected ("above own
# idle"), which is what grows with load. SAMPLE=1: also /tmp/mem/NAME.rss.tsv, RSS and
# RssAnon (KiB) every 0.5 s from start to the end, seconds since the server started.
# LATE=70: also a reading 70 s after close (past parley's 60 s session grace period).
set -u
BENCH=$(realpath ${BENCH:-target/release/parley-bench}); server=$(realpath $2)
mkdir -p /tmp/mem
name=$1; shift 2
port=$((20000 + RANDOM % 12000)) # below the ephemeral range (32768-60999)
wd=/tmp/mem/wd-$name; rm -rf $wd; mkdir -p $wd; cd $wd
export PARLEY_SERVER__LISTEN=127.0.0.1:$port PARLEY_AUTH__JWT_SECRET=b-secret RUST_LOG=warn
for v in MAX_CONNECTIONS MAX_CONNECTIONS_PER_IP CONNECTS_PER_IP_PER_SECOND CONNECTS_PER_IP_BURST \
    TICKETS_PER_IP_PER_SECOND TICKETS_PER_IP_BURST MAX_SESSIONS_PER_USER MAX_ROOMS_PER_USER \
    SENDS_PER_SECOND SENDS_BURST JOINS_PER_SECOND JOINS_BURST; do export "PARLEY_LIMITS__$v=0"; done
for kv in "$@"; do export "$kv"; done
taskset -c 0 $server serve > /tmp/mem/$name.server.log 2>&1 &
spid=$!
for i in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.2; done
sleep 1
rss() { awk '/VmRSS/ {print $2}' /proc/$spid/status; }
anon() { awk '/RssAnon/ {print $2}' /proc/$spid/status; }
r0=$(rss); a0=$(anon)
if [ -n "${SAMPLE:-}" ]; then
  t0=$(date +%s.%N)
  ( while [ -e /proc/$spid/status ]; do
      echo "$(echo "$(date +%s.%N) - $t0" | bc) $(awk '/VmRSS|RssAnon/ {printf "%s ", $2}' /proc/$spid/status 2>/dev/null)"
      sleep 0.5
    done > /tmp/mem/$name.rss.tsv ) &
  sampler=$!
fi
taskset -c 1 $BENCH --no-progress --json --jwt-secret b-secret --url ws://127.0.0.1:$port/ws --server-pid $spid \
  --encoding proto fanout -n ${N:-2000} --publishers 1 -r ${R:-400} -d ${D:-10s} > /tmp/mem/$name.fanout.json 2>/tmp/mem/$name.fanout.log
sleep 5
r1=$(rss); a1=$(anon)
sleep 7
r2=$(rss); a2=$(anon)
if [ -n "${LATE:-}" ]; then sleep $((LATE - 12)); r3=$(rss); a3=$(anon)
  echo "$name $LATE s after close: rss $((r3 / 1024)) MiB anon $((a3 / 1024)) MiB above own idle $(((r3 - r0) / 1024)) MiB"; fi
ut=$(awk '{print $14+$15}' /proc/$spid/stat)
kill -TERM $spid; wait $spid 2>/dev/null
[ -n "${SAMPLE:-}" ] && wait $sampler 2>/dev/null
python3 - "$name" "$r0" "$r1" "$ut" "$r2" "$a0" "$a1" "$a2" <<'PY'
import json, sys
name, r0, r1, ut, r2, a0, a1, a2 = sys.argv[1], *map(int, sys.argv[2:])
r = json.load(open(f'/tmp/mem/{name}.fanout.json'))['runs'][0]
v = r['verification']; M = 1024 * 1024
bad = sum(v[k] for k in ('lost', 'duplicates', 'pos_errors', 'incomplete_members', 'disconnected'))
print(f"{name:14s} rss before {r['server_rss_before']/M:6.1f} connected {r['server_rss_connected']/M:6.1f} after-drain {r['server_rss_after']/M:6.1f} 5s/12s-after-close {r1/1024:6.1f}/{r2/1024:6.1f} MiB | delivered {r['delivered']}/{r['expected_deliveries']} {r['delivered_per_s']/1e3:.0f}k/s p99 {r['latency']['p99_ms']:.0f} ms server CPU {r['server_cpu']:.0f}% cpu-ticks {ut} -> {ut*1e4/r['delivered']:.2f} us/delivery | bad {bad}")
print(f"{'':14s} anon before {a0/1024:6.1f} 5s/12s-after-close {a1/1024:6.1f}/{a2/1024:6.1f} MiB | above own idle: connected {(r['server_rss_connected']/1024-r0)/1024:6.1f} after-drain {(r['server_rss_after']/1024-r0)/1024:6.1f} 5s/12s-after-close {(r1-r0)/1024:6.1f}/{(r2-r0)/1024:6.1f} MiB")
PY
