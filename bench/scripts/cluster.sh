#!/usr/bin/env bash
# Cluster fan-out benchmark (docs/BENCHMARKS.md, "Many instances"): in one sitting,
#   1. one instance (memory broker): publishers and subscribers on it;
#   2. N = 1, 2, 3 instances on one Redis (CLUSTER_SIZES, default "1 2 3"): publishers
#      on instance 0, subscribers spread evenly over all N instances (parley-bench
#      --listener-url), so every message crosses Redis to the N - 1 others;
# all on the same kind of private PostgreSQL store (scripts/cluster). Prints
# parley-bench's report per run, the CPU seconds of every parley and of redis-server,
# and Redis' command count, over the run. CLUSTER_PUBSUB=sharded runs the Redis
# configurations with broker.pubsub = "sharded"; CLUSTER_REDIS_NODES=K runs them on a
# Redis Cluster of K masters (scripts/cluster; sharded pub/sub), counting every node.
#
#   bench/scripts/cluster.sh OUT_DIR [BIN_DIR] -- FANOUT_ARGS...
#   e.g. bench/scripts/cluster.sh /tmp/cb target/release -- --subscribers 600 --publishers 4 --rate 200 --duration 10s
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$1
bin=${2:-target/release}
shift 2
[ "${1:-}" = "--" ] && shift
mkdir -p "$out"
for v in MAX_CONNECTIONS MAX_CONNECTIONS_PER_IP CONNECTS_PER_IP_PER_SECOND CONNECTS_PER_IP_BURST \
    TICKETS_PER_IP_PER_SECOND TICKETS_PER_IP_BURST MAX_SESSIONS_PER_USER MAX_ROOMS_PER_USER \
    SENDS_PER_SECOND SENDS_BURST JOINS_PER_SECOND JOINS_BURST; do
    export "PARLEY_LIMITS__$v=0"
done
export PARLEY_BIN="$bin/parley"
export PARLEY_BROKER__PUBSUB="${CLUSTER_PUBSUB:-classic}"

cpu_ticks() { # utime + stime of a pid, in clock ticks
    awk '{print $14 + $15}' "/proc/$1/stat"
}

publishes() { # PUBLISH and SPUBLISH calls so far, over the nodes on ports "$@"
    for p in "$@"; do redis-cli -p "$p" info commandstats; done |
        awk -F'[=,]' '/^cmdstat_s?publish:/{n += $2} END{print n+0}'
}

commands() { # commands processed so far, over the nodes on ports "$@"
    for p in "$@"; do redis-cli -p "$p" info stats; done |
        awk -F: '/^total_commands_processed/{n += $2} END{print n+0}'
}

run() { # name n_instances bench-args...
    local name=$1 n=$2
    shift 2
    local dir="$out/$name.cluster"
    scripts/cluster stop "$dir" >/dev/null 2>&1 || true
    mapfile -t urls < <(scripts/cluster start "$dir" "$n")
    local pids=() before=() i
    for i in $(seq 0 $((n - 1))); do pids+=("$(cat "$dir/parley-$i.pid")"); done
    local f
    for f in "$dir"/redis*.pid; do [ -e "$f" ] && pids+=("$(cat "$f")"); done
    local redis_ports
    mapfile -t redis_ports < <(tr ',' '\n' <"$dir/redis.url" | sed -E 's#.*:([0-9]+)/?$#\1#')
    local cmds_before pubs_before
    cmds_before=$(commands "${redis_ports[@]}")
    pubs_before=$(publishes "${redis_ports[@]}")
    for p in "${pids[@]}"; do before+=("$(cpu_ticks "$p")"); done
    local t0 t1
    t0=$(date +%s.%N)
    echo "== $name: $(uptime)" | tee -a "$out/summary.txt"
    local ws=()
    for u in "${urls[@]}"; do ws+=("ws://${u#http://}/ws"); done
    local extra=()
    if [ "$n" -gt 1 ]; then
        for u in "${ws[@]}"; do extra+=(--listener-url "$u"); done
    fi
    "$bin/parley-bench" --no-progress --json --url "${ws[0]}" --server-pid "${pids[0]}" \
        "${extra[@]}" fanout "$@" >"$out/$name.json" 2>"$out/$name.txt" || echo "bench failed: see $out/$name.txt"
    t1=$(date +%s.%N)
    local hz
    hz=$(getconf CLK_TCK)
    local cmds_after pubs_after
    cmds_after=$(commands "${redis_ports[@]}")
    pubs_after=$(publishes "${redis_ports[@]}")
    {
        echo "wall $(echo "$t1 - $t0" | bc) s"
        for k in "${!pids[@]}"; do
            local a
            a=$(cpu_ticks "${pids[$k]}")
            echo "pid ${pids[$k]} ($( [ "$k" -lt "$n" ] && echo "parley-$k" || echo redis)): $(echo "scale=2; ($a - ${before[$k]}) / $hz" | bc) CPU s"
        done
        echo "redis commands: $((cmds_after - cmds_before)) (PUBLISH/SPUBLISH: $((pubs_after - pubs_before)))"
        for i in $(seq 0 $((n - 1))); do
            curl -fsS "http://$(cat "$dir/parley-$i.addr")/metrics" 2>/dev/null |
                awk -v i="$i" '/^parley_broker_(publishes|publish_batches|received|gap_fills)_total /{printf "parley-%s %s %s\n", i, $1, $2}'
        done
        grep -E "delivered/s|latency p50|verification|published" "$out/$name.txt" || true
    } | tee -a "$out/summary.txt"
    scripts/cluster stop "$dir" >/dev/null
}

CLUSTER_BROKER=memory run single 1 "$@"
for n in ${CLUSTER_SIZES:-1 2 3}; do
    run "redis$n" "$n" "$@"
done
