#!/usr/bin/env bash
# Where a 1-core storm's time goes (docs/BENCHMARKS.md, round four: storms): SERVER
# (parley or parley-floor, release) on CPU 0, a 2 s warm-up then a 5 s storm with join
# of 512 workers from BENCH on CPU 1. Prints the rate and, per handshake, the server's
# CPU time and its threads' run-queue wait (/proc/PID/task/*/schedstat: runnable but
# not running); writes each thread's schedstat to /tmp/storm/wd-NAME/threads.txt. With
# a 4th argument, `perf record -g` of the server over the storm to /tmp/storm/NAME.perf.
#   bench/scripts/storm-sched.sh NAME SERVER BENCH [perf]
# SERVER and BENCH as absolute paths.
set -u
. "$(dirname "$0")/storm-env.sh"
name=$1 server=$2 bench=$3 perf=${4:-}
storm-serve /tmp/storm/wd-$name "$server"
taskset -c 1 "$bench" --url ws://127.0.0.1:$port/ws --jwt-secret cg-secret --no-progress --concurrency 512 storm -c 512 -d 2s --settle 0s --join >/dev/null 2>&1
ss() { awk '{c+=$1; w+=$2} END {print c, w}' /proc/$spid/task/*/schedstat; }
read c0 w0 < <(ss)
if [ -n "$perf" ]; then perf record -F 2000 -g -o /tmp/storm/$name.perf -p $spid -- sleep 5 >/dev/null 2>&1 & ppid=$!; fi
taskset -c 1 "$bench" --url ws://127.0.0.1:$port/ws --jwt-secret cg-secret --no-progress --json --concurrency 512 storm -c 512 -d 5s --settle 0s --join > out.json 2>/dev/null
read c1 w1 < <(ss)
for t in /proc/$spid/task/*; do echo "  $(cat $t/comm) $(cat $t/schedstat) $(grep ctxt_switches $t/status | tr -s '\t\n' ' ')"; done > threads.txt
[ -n "$perf" ] && wait $ppid
kill $spid; wait $spid 2>/dev/null
h=$(python3 -c "import json; r=json.load(open('out.json'))['runs'][0]; print(r['handshakes'])")
awk -v n=$name -v h=$h -v c=$((c1-c0)) -v w=$((w1-w0)) 'BEGIN{printf "%s handshakes=%d rate=%.0f/s cpu=%.1fus/hs runq_wait=%.1fus/hs cpu%%=%.0f wait%%=%.0f\n", n, h, h/5, c/h/1000, w/h/1000, c/5e7, w/5e7}'
