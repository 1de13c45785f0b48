#!/usr/bin/env bash
# The benchmark suite behind docs/BENCHMARKS.md: every scenario, release builds, server
# pinned to CPU 0 and the generator to CPU 1, each configuration run REPEAT times (a fresh
# server each time) with medians reported. Every run is bounded (seconds to a minute).
#
#   bench/scripts/suite.sh [OUT_DIR]        (default: target/bench-results)
#
# Environment: PARLEY (server binary), BENCH (generator binary), REPEAT (default 3),
# ONLY (run only the steps whose name contains this string).
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${1:-target/bench-results}
REPEAT=${REPEAT:-3}
PARLEY=${PARLEY:-target/release/parley}
BENCH=${BENCH:-target/release/parley-bench}
ONLY=${ONLY:-}
mkdir -p "$OUT"

if [[ ! -x $PARLEY || ! -x $BENCH ]]; then
    cargo build --release -p parley --bin parley -p parley-bench
fi

{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty tree)')"
    echo "nproc: $(nproc)"
    lscpu | head -15
    echo "kernel: $(uname -r)"
    echo "loadavg: $(cat /proc/loadavg)"
} > "$OUT/machine.txt"

step() {
    local name=$1
    shift
    if [[ -n $ONLY && $name != *$ONLY* ]]; then
        return
    fi
    echo "== $name: $*" | tee -a "$OUT/commands.txt"
    # The generator runs on CPU 1; the server it spawns is pinned to CPU 0.
    taskset -c 1 "$BENCH" --spawn-server "$PARLEY" --server-cpu 0 --no-progress \
        --repeat "$REPEAT" --json --chart "$OUT/$name.svg" "$@" \
        > "$OUT/$name.json" 2> "$OUT/$name.log" || echo "   ($name: some run failed verification; see $OUT/$name.log)"
    grep -A40 "^medians of" "$OUT/$name.log" | sed -n '1,20p' || true
}

# Memory per idle WebSocket (connect + auth, no rooms), and connect rate.
step idle-1k idle -n 1000 --hold 5s
step idle-5k idle -n 5000 --hold 5s
step idle-10k idle -n 10000 --hold 5s
step idle-10k-json --encoding json idle -n 10000 --hold 5s

# Fan-out: 1k subscribers x 1000 msgs/s (10 publishers at 100/s each; a single publisher
# connection cannot offer more than ~1/fsync sends per second, see BENCHMARKS.md).
step fanout-1k fanout -n 1000 --publishers 10 -r 1000 -d 10s
step fanout-1k-json --encoding json fanout -n 1000 --publishers 10 -r 1000 -d 10s
step fanout-1k-1pub fanout -n 1000 --publishers 1 -r 1000 -d 10s --drain-timeout 10s
# Fan-out: 10k subscribers x 100 msgs/s = 1M deliveries/s offered.
step fanout-10k fanout -n 10000 --publishers 1 -r 100 -d 10s --drain-timeout 20s

# The realistic mix: 10k users in rooms of 10, a message each every 5 s.
step chat-10k chat -n 10000 -k 10 --every 5s -d 20s

# Connect/auth/disconnect churn.
step storm storm -c 64 -d 10s --settle 3s

# SSE and long-poll listeners (publishers on WebSocket), beside WebSocket at the same N.
step idle-sse-10k --transport sse idle -n 10000 --hold 5s
step idle-poll-10k --transport poll --poll-wait 60 idle -n 10000 --hold 5s
for n in 1000 5000; do
    for t in ws sse poll; do
        step "fanout-$t-$n" --transport "$t" fanout -n "$n" --publishers 1 -r 100 -d 10s
    done
done

echo "results in $OUT"
