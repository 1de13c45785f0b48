#!/usr/bin/env bash
# System calls per handshake (docs/BENCHMARKS.md, round four: storms): `strace -f -c`
# on SERVER (CPU 0) over a 3 s storm with join of 64 workers from BENCH (CPU 1).
#   bench/scripts/storm-strace.sh NAME SERVER BENCH  (absolute paths)
set -u
. "$(dirname "$0")/storm-env.sh"
name=$1 server=$2 bench=$3
storm-serve /tmp/storm/st-$name "$server"
taskset -c 1 "$bench" --url ws://127.0.0.1:$port/ws --jwt-secret cg-secret --no-progress --concurrency 64 storm -c 64 -d 1s --settle 0s --join >/dev/null 2>&1
strace -f -c -o strace.txt -p $spid & tpid=$!
sleep 0.5
taskset -c 1 "$bench" --url ws://127.0.0.1:$port/ws --jwt-secret cg-secret --no-progress --json --concurrency 64 storm -c 64 -d 3s --settle 0s --join > out.json 2>/dev/null
sleep 0.3; kill -INT $tpid; wait $tpid 2>/dev/null
kill $spid; wait $spid 2>/dev/null
h=$(python3 -c "import json; r=json.load(open('out.json'))['runs'][0]; print(r['handshakes'])")
echo "$name handshakes=$h"
awk -v h=$h '$1 ~ /^[0-9.]+$/ && NF>=5 {name=$NF; calls=$4; printf "  %-16s %6.2f per handshake\n", name, calls/h}' strace.txt | sort -k2 -nr | head -20
