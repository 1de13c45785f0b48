#!/usr/bin/env bash
# Instructions per handshake (docs/BENCHMARKS.md, round three): SERVER (parley or
# parley-floor, release) under callgrind on CPU 0, counters zeroed once it listens, a
# storm with join from BENCH on CPU 1, a dump, the server killed. Writes /tmp/cg/NAME.*;
# prints instructions per handshake. Needs valgrind (callgrind_control).
#   bench/scripts/storm-callgrind.sh NAME SERVER BENCH [DURATION, default 20s]
# SERVER and BENCH as absolute paths (the script runs in a work directory of its own).
# STORM_OPTS: more generator options, e.g. over TLS `STORM_OPTS="--tls-ca cert.pem"` with
# PARLEY_TLS__CERT_FILE/KEY_FILE exported for the server (absolute paths).
set -u
. "$(dirname "$0")/storm-env.sh"
name=$1 server=$2 bench=$3 dur=${4:-20s}
cg-start $name "$server"
taskset -c 1 "$bench" --url ws://127.0.0.1:$port/ws --jwt-secret cg-secret --no-progress --json \
   ${STORM_OPTS:-} storm -c 8 -d "$dur" --settle 0s --join > /tmp/cg/$name.storm.json 2>/tmp/cg/$name.storm.log
callgrind_control -d $vpid >/dev/null 2>&1
sleep 1
kill -KILL $vpid 2>/dev/null; wait $vpid 2>/dev/null
h=$(grep -m1 '"handshakes":' /tmp/cg/$name.storm.json | tr -dc 0-9)
f=$(ls -t /tmp/cg/$name.out* | head -1)
ir=$(grep -m1 '^summary:\|^totals:' "$f" | awk '{print $2}')
echo "$name handshakes=$h instructions=$ir per_handshake=$(awk -v a=$ir -v b=$h 'BEGIN{printf "%.0f", a/b}') file=$f"
