#!/usr/bin/env bash
# What each idle MQTT device holds (docs/BENCHMARKS.md, "Round five: MQTT memory"): like
# heaptrack-idle.sh, for MQTT. SERVER (parley, release) under heaptrack (LD_PRELOAD), N
# devices from mqtt_vs_mosquitto.py's client (CONNECT 3.1.1 keep-alive 600 s + SUBSCRIBE
# rooms/bench, one room), over tcp (`[mqtt] listen`) or ws (`/mqtt`, deflate offered); the
# server SIGKILLed SETTLE (12) s after the last SUBACK, so heaptrack's "leaked" is what the
# devices hold (plus startup state). Writes /tmp/mem/ht-NAME.zst and NAME.folded; prints
# bytes per device by innermost frames.
#   bench/scripts/heaptrack-mqtt.sh NAME SERVER N [tcp|ws]
set -u
name=$1 server=$(realpath $2) n=$3 over=${4:-tcp}
# heaptrack sees glibc's malloc only: a jemalloc build (the default; glibc: `cargo build
# --release --workspace --bins --no-default-features`) would give
# a near-empty profile. Its options string is in the binary.
if grep -aq 'background_thread:true,dirty_decay_ms' "$server"; then
  echo "$server is a jemalloc build: heaptrack sees none of its allocations; profile a glibc build (cargo build --release --workspace --bins --no-default-features)" >&2
  exit 2
fi
here=$(dirname $(realpath $0))
mkdir -p /tmp/mem
# Below the ephemeral range (32768-): clients closed a moment ago leave ports there.
port=$((20000 + RANDOM % 6000)) mport=$((26000 + RANDOM % 6000))
wd=/tmp/mem/wd-$name; rm -rf $wd; mkdir -p $wd; cd $wd
export PARLEY_SERVER__LISTEN=127.0.0.1:$port PARLEY_MQTT__LISTEN=127.0.0.1:$mport \
    PARLEY_AUTH__JWT_SECRET=mqtt-bench-secret RUST_LOG=warn PARLEY_STORE__PATH=$wd/parley.db
for v in MAX_CONNECTIONS MAX_CONNECTIONS_PER_IP CONNECTS_PER_IP_PER_SECOND CONNECTS_PER_IP_BURST \
    MAX_SESSIONS_PER_USER MAX_ROOMS_PER_USER SENDS_PER_SECOND SENDS_BURST JOINS_PER_SECOND \
    JOINS_BURST; do export "PARLEY_LIMITS__$v=0"; done
fifo=/tmp/mem/ht-fifo.$$; rm -f $fifo; mkfifo $fifo
/usr/lib/heaptrack/libexec/heaptrack_interpret < $fifo | zstd -q -f -o /tmp/mem/ht-$name.zst &
LD_PRELOAD=/usr/lib/heaptrack/libheaptrack_preload.so DUMP_HEAPTRACK_OUTPUT=$fifo \
    "$server" --config /nonexistent.toml serve > /tmp/mem/$name.server.log 2>&1 &
spid=$!
for i in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$mport) 2>/dev/null && break; sleep 0.2; done
sleep 1
[ $over = ws ] && p=$port || p=$mport
python3 - "$here" $p $n $over $spid ${SETTLE:-12} <<'PY' > /tmp/mem/$name.bench.log 2>&1
import asyncio, os, signal, sys
sys.path.insert(0, sys.argv[1])
from mqtt_vs_mosquitto import open_subscribed, TOPIC_IDLE
port, n, over, spid, settle = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), float(sys.argv[6])
async def main():
    conns = []
    for s in range(0, n, 100):
        conns += await asyncio.gather(*(open_subscribed(port, i, TOPIC_IDLE, over) for i in range(s, min(s + 100, n))))
    print("open", len(conns), flush=True)
    await asyncio.sleep(settle)
    os.kill(spid, signal.SIGKILL)
asyncio.run(main())
PY
sleep 3; rm -f $fifo
heaptrack_print -f /tmp/mem/ht-$name.zst --flamegraph-cost-type leaked -F /tmp/mem/$name.folded >/dev/null 2>&1
cat /tmp/mem/$name.bench.log
python3 "$here/heaptrack-fold.py" /tmp/mem/$name.folded $n ${DEPTH:-7}
