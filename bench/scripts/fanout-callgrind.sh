#!/usr/bin/env bash
# Instructions per delivery: SERVER (release) under callgrind on CPU 0, counters zeroed
# once it listens, a fan-out from BENCH on CPU 1 with the given options (transport,
# subscribers, rate, duration), a dump, the server killed. The count includes the
# subscribers' connects, so compare binaries with the same options, or two durations
# (their difference is the deliveries' own cost). Writes /tmp/cg/NAME.*; prints
# instructions per delivery, and the bytes the server wrote (`wchar`: two durations'
# difference is the deliveries' bytes on the wire). Needs valgrind (callgrind_control).
#   bench/scripts/fanout-callgrind.sh NAME SERVER BENCH [bench options] -- [fanout options]
#   e.g. ... h2new /tmp/new/parley /tmp/base/parley-bench --transport sse --http2 -- -n 100 -r 10 -d 8s
set -u
. "$(dirname "$0")/storm-env.sh"
name=$1 server=$2 bench=$3; shift 3
pre=(); post=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do pre+=("$1"); shift; done
[ $# -gt 0 ] && shift && post=("$@")
cg-start $name "$server"
taskset -c 1 "$bench" --url ws://127.0.0.1:$port/ws --jwt-secret cg-secret --no-progress --json \
   "${pre[@]}" fanout "${post[@]}" > /tmp/cg/$name.fanout.json 2>/tmp/cg/$name.fanout.log
# What the server wrote (its sockets and its log) since it started, before the dump.
wchar=$(awk '/^wchar/{print $2}' /proc/$vpid/io 2>/dev/null)
callgrind_control -d $vpid >/dev/null 2>&1
sleep 1
kill -KILL $vpid 2>/dev/null; wait $vpid 2>/dev/null
read -r d lost < <(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))["runs"][0]
print(r["delivered"], r["verification"]["lost"])' /tmp/cg/$name.fanout.json)
f=$(ls -t /tmp/cg/$name.out* | head -1)
ir=$(grep -m1 '^summary:\|^totals:' "$f" | awk '{print $2}')
echo "$name delivered=$d lost=$lost instructions=$ir per_delivery=$(awk -v a=$ir -v b=$d 'BEGIN{printf "%.0f", a/b}') wchar=$wchar file=$f"
