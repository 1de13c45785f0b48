#!/usr/bin/env bash
# What each idle connection holds (docs/BENCHMARKS.md, "Round four: memory"): SERVER
# (parley, release) under heaptrack (LD_PRELOAD), N idle connections from BENCH with the
# given bench options, the server SIGKILLed SETTLE (12) s after they are open, so
# heaptrack's "leaked" is what they hold (plus startup state). Writes /tmp/mem/ht-NAME.zst
# and NAME.folded; prints bytes per connection by innermost frames. For `--transport wt`
# export the TLS variables (PARLEY_TLS__CERT_FILE/KEY_FILE) and CONNECTED_AFTER=SECONDS
# (how long the N sessions take to open; QUIC has no socket per connection to count).
#   bench/scripts/heaptrack-idle.sh NAME SERVER N [bench options, e.g. --transport sse] [-- idle options, e.g. --join big]
set -u
name=$1 server=$(realpath $2) n=$3; shift 3
# heaptrack sees glibc's malloc only: a jemalloc build (the default; glibc: `cargo build
# --release --workspace --bins --no-default-features`) would give
# a near-empty profile. Its options string is in the binary.
if grep -aq 'background_thread:true,dirty_decay_ms' "$server"; then
  echo "$server is a jemalloc build: heaptrack sees none of its allocations; profile a glibc build (cargo build --release --workspace --bins --no-default-features)" >&2
  exit 2
fi
BENCH=$(realpath ${BENCH:-target/release/parley-bench})
here=$(dirname $(realpath $0))
pre=(); post=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do pre+=("$1"); shift; done
[ $# -gt 0 ] && shift && post=("$@")
mkdir -p /tmp/mem
port=$((20000 + RANDOM % 12000)) # below the ephemeral range (32768-60999)
wd=/tmp/mem/wd-$name; rm -rf $wd; mkdir -p $wd; cd $wd
export PARLEY_SERVER__LISTEN=127.0.0.1:$port PARLEY_AUTH__JWT_SECRET=ht-secret RUST_LOG=warn
for v in MAX_CONNECTIONS MAX_CONNECTIONS_PER_IP CONNECTS_PER_IP_PER_SECOND CONNECTS_PER_IP_BURST \
    TICKETS_PER_IP_PER_SECOND TICKETS_PER_IP_BURST MAX_SESSIONS_PER_USER MAX_ROOMS_PER_USER \
    SENDS_PER_SECOND SENDS_BURST JOINS_PER_SECOND JOINS_BURST; do export "PARLEY_LIMITS__$v=0"; done
fifo=/tmp/mem/ht-fifo.$$; rm -f $fifo; mkfifo $fifo
/usr/lib/heaptrack/libexec/heaptrack_interpret < $fifo | zstd -q -f -o /tmp/mem/ht-$name.zst &
LD_PRELOAD=/usr/lib/heaptrack/libheaptrack_preload.so DUMP_HEAPTRACK_OUTPUT=$fifo \
    "$server" serve > /tmp/mem/$name.server.log 2>&1 &
spid=$!
for i in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.2; done
sleep 1
taskset -c 1 "$BENCH" --no-progress --jwt-secret ht-secret --url ws://127.0.0.1:$port/ws \
    --server-pid $spid "${pre[@]}" idle -n $n --hold 60s "${post[@]}" > /tmp/mem/$name.bench.log 2>&1 &
bpid=$!
if [ -n "${CONNECTED_AFTER:-}" ]; then
  # QUIC (`--transport wt`): one socket for every connection, nothing to count.
  sleep $CONNECTED_AFTER
else
  for i in $(seq 1 300); do
    [ "$(ls /proc/$spid/fd 2>/dev/null | wc -l)" -ge "$n" ] && break; sleep 1
  done
fi
sleep ${SETTLE:-12}
kill -KILL $spid; sleep 3
kill $bpid 2>/dev/null; wait $bpid 2>/dev/null; rm -f $fifo
heaptrack_print -f /tmp/mem/ht-$name.zst --flamegraph-cost-type leaked -F /tmp/mem/$name.folded >/dev/null 2>&1
python3 "$here/heaptrack-fold.py" /tmp/mem/$name.folded $n ${DEPTH:-7}
