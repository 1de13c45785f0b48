#!/usr/bin/env bash
# The load runs for the large (16-core) machine of issue 24, in one bounded sitting:
#
#   - fan-out, parley and the bare floor, server pinned to 1, 2, 4 and 8 cores
#     (CPUs 0..k-1), the generator (parley-bench, one shard thread per CPU) on CPUs
#     8-15: 16k subscribers × 200 msg/s (3.2M deliveries/s offered), and a heavier
#     offer (16k × 600/s = 9.6M/s) at 4 and 8 server cores to find the ceiling;
#   - an older generator once, at 8 server cores, for the generator's own before/after
#     on that machine: OLD_BENCH (a parley-bench built before round four's read path,
#     e.g. from 635250e) with the same flags, or without it this build with one
#     work-stealing runtime (--threads 0, the runtime layout before issue 24);
#   - the connect storm (connect + upgrade + auth + join + close, 512 workers) at 1 and
#     8 server cores for both servers.
#
# Every delivery is verified by parley-bench (lost, duplicated, reordered). Needs only
# the three stripped release binaries (built elsewhere and carried):
#
#   BIN/parley  BIN/parley-bench  BIN/parley-floor        (BIN default: target/release)
#
# Usage:
#   OUT=/some/dir bench/scripts/device.sh            # the full sitting (≈ 5 minutes)
#   OUT=/tmp/dry SCALE=small bench/scripts/device.sh # a tiny dry run (2-core machine)
#
# Environment (all optional): OUT (results; default target/device-out), BIN, SCALE
# (full | small), OLD_BENCH (see above), GEN_CPUS (generator CPUs; default 8-15, small: 1), CORES (server core
# counts; default "1 2 4 8", small: "1"), BUDGET_S (no new step starts after this many
# seconds; default 400), ONLY (run only steps whose name contains it).
#
# Writes under OUT: <step>.json (parley-bench --json), <step>.log (its table and
# messages), machine.txt, summary.txt (the table printed at the end), all.tar.gz (all of
# these in one file). Each step runs
# under `timeout`; a spawned server dies with its generator (PR_SET_PDEATHSIG), and
# every generator still running is killed on exit. Client sockets are spread over
# source addresses 127.0.0.1..127.0.0.8 (`--source-ips 8`) so storms do not run out of
# ports; no process holds more than ~16.1k fds (the machine caps processes at 20k).
set -uo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-target/device-out}
BIN=${BIN:-target/release}
SCALE=${SCALE:-full}
BUDGET_S=${BUDGET_S:-400}
ONLY=${ONLY:-}
case $SCALE in
full)
    GEN_CPUS=${GEN_CPUS:-8-15}
    CORES=${CORES:-1 2 4 8}
    SUBS=16000          # subscribers
    RATE=200            # msg/s, all publishers together
    PUBS=4              # publishers (one connection offers ~1/fsync sends per second)
    HEAVY_RATE=600
    HEAVY_PUBS=12
    HEAVY_CORES="4 8"   # where the heavier offer runs
    DURATION=5s
    DRAIN=5s
    STORM_WORKERS=512
    STORM_DURATION=5s
    STORM_CORES="1 8"
    STEP_LIMIT=60       # seconds, per step
    ;;
small)
    GEN_CPUS=${GEN_CPUS:-1}
    CORES=${CORES:-1}
    SUBS=300
    RATE=50
    PUBS=2
    HEAVY_RATE=100
    HEAVY_PUBS=2
    HEAVY_CORES="1"
    DURATION=2s
    DRAIN=3s
    STORM_WORKERS=16
    STORM_DURATION=2s
    STORM_CORES="1"
    STEP_LIMIT=40
    ;;
*)
    echo "SCALE must be full or small" >&2
    exit 2
    ;;
esac

mkdir -p "$OUT"
for b in parley parley-bench parley-floor; do
    if [[ ! -x $BIN/$b ]]; then
        echo "missing $BIN/$b (build: cargo build --release -p parley --bin parley -p parley-bench --bins)" >&2
        exit 2
    fi
done

START=$SECONDS
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do
        kill -KILL "$p" 2>/dev/null
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

{
    echo "date: $(date -u +%FT%TZ)"
    echo "scale: $SCALE  generator CPUs: $GEN_CPUS  server cores: $CORES"
    echo "nproc: $(nproc)  fd limit: $(ulimit -n) (hard $(ulimit -Hn))"
    lscpu 2>/dev/null | grep -E 'Model name|^CPU\(s\)|Thread|NUMA node' || true
    echo "kernel: $(uname -r)"
    echo "loadavg: $(cat /proc/loadavg)"
    "$BIN/parley-bench" --version
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# "0-(k-1)", the first k CPUs.
cpus_of() { echo "0-$(($1 - 1))"; }

# step NAME SERVER SERVER_CPUS BENCH_ARGS...: one bounded parley-bench run.
step() {
    local name=$1 server=$2 cpus=$3
    shift 3
    if [[ -n $ONLY && $name != *$ONLY* ]]; then
        return
    fi
    local elapsed=$((SECONDS - START))
    if ((elapsed > BUDGET_S)); then
        echo "== $name: skipped (${elapsed}s elapsed, budget ${BUDGET_S}s)" | tee -a "$OUT/skipped.txt"
        return
    fi
    echo "== $name (t=${elapsed}s): server $server on CPUs $cpus; $*" | tee -a "$OUT/commands.txt"
    # SIGINT first: parley-bench stops and kills its server; SIGKILL 5 s later.
    timeout -s INT -k 5 "$STEP_LIMIT" \
        taskset -c "$GEN_CPUS" "${BENCH:-$BIN/parley-bench}" --spawn-server "$BIN/$server" \
        --server-cpu "$cpus" --no-progress --json --source-ips 8 "$@" \
        > "$OUT/$name.json" 2> "$OUT/$name.log" &
    local pid=$!
    PIDS+=("$pid")
    wait "$pid"
    local rc=$?
    if ((rc != 0)); then
        echo "   $name: exit $rc (1: verification failed; 124: timed out; see $OUT/$name.log)"
    fi
}

fanout() { # name server cores rate publishers [extra args]
    local name=$1 server=$2 k=$3 rate=$4 pubs=$5
    shift 5
    step "$name" "$server" "$(cpus_of "$k")" "$@" fanout -n "$SUBS" --publishers "$pubs" \
        -r "$rate" -d "$DURATION" --drain-timeout "$DRAIN"
}

for k in $CORES; do
    for s in parley-floor parley; do
        fanout "fanout-$s-${k}c" "$s" "$k" "$RATE" "$PUBS"
    done
done
for k in $STORM_CORES; do
    for s in parley-floor parley; do
        step "storm-$s-${k}c" "$s" "$(cpus_of "$k")" --concurrency "$STORM_WORKERS" \
            storm -c "$STORM_WORKERS" -d "$STORM_DURATION" --settle 1s --join
    done
done
for k in $HEAVY_CORES; do
    for s in parley-floor parley; do
        fanout "heavy-$s-${k}c" "$s" "$k" "$HEAVY_RATE" "$HEAVY_PUBS"
    done
done
# An older generator, same load, for comparison: OLD_BENCH if given (same flags), else
# this one on one work-stealing runtime (the layout before issue 24).
last_k=${CORES##* }
if [[ -n ${OLD_BENCH:-} && -x ${OLD_BENCH:-} ]]; then
    BENCH=$OLD_BENCH fanout "oldgen-parley-floor-${last_k}c" parley-floor "$last_k" "$RATE" "$PUBS"
else
    fanout "oldgen-parley-floor-${last_k}c" parley-floor "$last_k" "$RATE" "$PUBS" --threads 0
fi

# The summary: medians from each step's JSON (one run each here).
med() { # KEY FILE: the number under "medians" (null/absent: nan)
    local v
    v=$(grep -F "\"$1\":" "$2" 2>/dev/null | head -1 | sed 's/.*: //; s/,$//')
    [[ -z $v || $v == null ]] && v=nan
    echo "$v"
}
ok_of() { grep -m1 -E '^  "ok": ' "$1" 2>/dev/null | sed 's/.*: //; s/,$//'; }

per_core_s() { # FILE: delivered/s per server core-second
    awk -v d="$(med "delivered/s (window)" "$1")" -v c="$(med "server CPU %" "$1")" \
        'BEGIN { if (c > 0) printf "%.0f", d / (c / 100); else print "nan" }'
}

{
    echo
    echo "fan-out (per core-second: delivered/s ÷ server CPU share; ratio: parley ÷ floor at the same cores)"
    printf '%-30s %10s %12s %9s %14s %8s %6s %6s %6s\n' step offered/s delivered/s srv_cpu% per_core_s gen_cpu% bound ok ratio
    for f in "$OUT"/fanout-*.json "$OUT"/heavy-*.json "$OUT"/oldgen-*.json; do
        [[ -e $f ]] || continue
        name=$(basename "$f" .json)
        case $name in heavy-*) r=$HEAVY_RATE ;; *) r=$RATE ;; esac
        d=$(med "delivered/s (window)" "$f")
        c=$(med "server CPU %" "$f")
        g=$(med "generator CPU %" "$f")
        b=$(med "generator bound" "$f")
        per=$(per_core_s "$f")
        ratio=""
        floor_file=$OUT/$(echo "$name" | sed 's/-parley-\([0-9]*c\)$/-parley-floor-\1/').json
        if [[ $name == *-parley-[0-9]*c && -e $floor_file ]]; then
            fp=$(per_core_s "$floor_file")
            ratio=$(awk -v p="$per" -v f="$fp" 'BEGIN { if (f > 0) printf "%.2f", p / f; else print "" }')
        fi
        printf '%-30s %10.0f %12.0f %9.0f %14s %8.0f %6s %6s %6s\n' "$name" "$((SUBS * r))" "$d" "$c" "$per" "$g" "$b" "$(ok_of "$f")" "$ratio"
    done
    echo
    echo "connect storm (connect + upgrade + auth + join + close; CPU per handshake = server CPU share ÷ rate;"
    echo "ratios: parley ÷ floor at the same cores)"
    printf '%-30s %12s %9s %16s %8s %6s %10s %10s\n' step handshakes/s srv_cpu% srv_us/handshake errors ok rate_ratio cpu_ratio
    us_of() { # FILE: server CPU microseconds per handshake
        awk -v h="$(med "handshakes/s" "$1")" -v c="$(med "server CPU %" "$1")" \
            'BEGIN { if (h > 0) printf "%.1f", c / 100 / h * 1e6; else print "nan" }'
    }
    for f in "$OUT"/storm-*.json; do
        [[ -e $f ]] || continue
        name=$(basename "$f" .json)
        h=$(med "handshakes/s" "$f")
        c=$(med "server CPU %" "$f")
        e=$(med "errors" "$f")
        us=$(us_of "$f")
        rr="" cr=""
        floor_file=$OUT/$(echo "$name" | sed 's/-parley-\([0-9]*c\)$/-parley-floor-\1/').json
        if [[ $name == *-parley-[0-9]*c && -e $floor_file ]]; then
            rr=$(awk -v a="$h" -v b="$(med "handshakes/s" "$floor_file")" 'BEGIN { if (b > 0) printf "%.2f", a / b }')
            cr=$(awk -v a="$us" -v b="$(us_of "$floor_file")" 'BEGIN { if (b > 0) printf "%.2f", a / b }')
        fi
        printf '%-30s %12.0f %9.0f %16s %8s %6s %10s %10s\n' "$name" "$h" "$c" "$us" "$e" "$(ok_of "$f")" "$rr" "$cr"
    done
    echo
    echo "wall clock: $((SECONDS - START)) s"
} | tee "$OUT/summary.txt"

# Everything in one file: a device tool that brings back only a few files per run still
# brings back every step's log (the 16-core sitting at e15be8d lost the logs of the runs
# that failed verification).
tar -czf "$OUT.tar.gz" --exclude=all.tar.gz -C "$(dirname "$OUT")" "$(basename "$OUT")" &&
    mv "$OUT.tar.gz" "$OUT/all.tar.gz" && echo "all results: $OUT/all.tar.gz"
