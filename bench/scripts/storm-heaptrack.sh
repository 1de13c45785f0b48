#!/usr/bin/env bash
# Allocations per handshake and where they come from (docs/BENCHMARKS.md, round five:
# storms): SERVER (parley or parley-floor, release) under heaptrack (LD_PRELOAD), a storm
# with join from BENCH (8 workers, DURATION), the server stopped. Writes /tmp/ht-storm/NAME.*;
# prints allocations per handshake summed by their innermost non-allocator frames (startup's
# few thousand allocations included: use a storm of thousands of handshakes).
#   bench/scripts/storm-heaptrack.sh NAME SERVER BENCH [DURATION, default 10s] [DEPTH, default 4]
set -u
name=$1 server=$(realpath $2) bench=$(realpath $3) dur=${4:-10s} depth=${5:-4}
# heaptrack sees glibc's malloc only: a jemalloc build (the default; glibc: `cargo build
# --release --workspace --bins --no-default-features`) would give
# a near-empty profile. Its options string is in the binary.
if grep -aq 'background_thread:true,dirty_decay_ms' "$server"; then
  echo "$server is a jemalloc build: heaptrack sees none of its allocations; profile a glibc build (cargo build --release --workspace --bins --no-default-features)" >&2
  exit 2
fi
here=$(dirname $(realpath $0))
out=/tmp/ht-storm; mkdir -p $out
port=$((20000 + RANDOM % 12000)) # below the ephemeral range (32768-60999)
wd=$out/wd-$name; rm -rf $wd; mkdir -p $wd; cd $wd
export PARLEY_SERVER__LISTEN=127.0.0.1:$port PARLEY_AUTH__JWT_SECRET=ht-secret RUST_LOG=warn
for v in MAX_CONNECTIONS MAX_CONNECTIONS_PER_IP CONNECTS_PER_IP_PER_SECOND CONNECTS_PER_IP_BURST \
    TICKETS_PER_IP_PER_SECOND TICKETS_PER_IP_BURST MAX_SESSIONS_PER_USER MAX_ROOMS_PER_USER \
    SENDS_PER_SECOND SENDS_BURST JOINS_PER_SECOND JOINS_BURST; do export "PARLEY_LIMITS__$v=0"; done
fifo=$out/fifo.$$; rm -f $fifo; mkfifo $fifo
/usr/lib/heaptrack/libexec/heaptrack_interpret < $fifo | zstd -q -f -o $out/$name.zst &
ipid=$!
taskset -c 0 env LD_PRELOAD=/usr/lib/heaptrack/libheaptrack_preload.so \
    DUMP_HEAPTRACK_OUTPUT=$fifo "$server" serve > $out/$name.server.log 2>&1 &
spid=$!
for i in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.2; done
sleep 1
taskset -c 1 "$bench" --url ws://127.0.0.1:$port/ws --jwt-secret ht-secret --no-progress --json \
   storm -c 8 -d "$dur" --settle 0s --join > $out/$name.storm.json 2>$out/$name.storm.log
kill -TERM $spid; wait $spid 2>/dev/null; wait $ipid 2>/dev/null; rm -f $fifo
h=$(grep -m1 '"handshakes":' $out/$name.storm.json | tr -dc 0-9)
heaptrack_print -f $out/$name.zst --flamegraph-cost-type allocations -F $out/$name.folded >/dev/null 2>&1
echo "$name handshakes=$h"
python3 "$here/heaptrack-fold.py" $out/$name.folded $h $depth
