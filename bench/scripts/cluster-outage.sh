#!/usr/bin/env bash
# Redis Cluster node outage under load (docs/BENCHMARKS.md, "Round five: Redis Cluster
# health per slot"): 3 parley instances on a Redis Cluster of 3 masters (scripts/cluster,
# then cluster-require-full-coverage no on every node, as without it the survivors refuse
# every slot once the dead node is marked failed), parley-bench fanout with publishers on
# instance 0 and subscribers spread over all three. OUTAGE_AT seconds (default 4) into
# the run, the master that serves neither the bench room's channel nor the presence keys
# is killed (no replica: it stays down). Prints the bench report, how often each
# instance's /readyz was not 200 while the node was down, and each instance's broker
# metrics. SCENARIO=chat runs parley-bench's chat scenario instead (many rooms: the
# killed node then carries rooms too; it is the first one without the presence keys).
# OUTAGE=stop stops the node with SIGSTOP instead (a node that hangs: connections stay
# open, nothing is answered) and resumes it (SIGCONT) once the bench has ended.
# OUTAGE_AT=room: the outage starts as soon as one instance has subscribed the bench
# room, while the others and the subscribers are still joining.
#
#   bench/scripts/cluster-outage.sh OUT_DIR [BIN_DIR] -- FANOUT_ARGS...
#   e.g. bench/scripts/cluster-outage.sh /tmp/co target/release -- --subscribers 600 --publishers 4 --rate 200 --duration 10s
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
export PARLEY_BIN="$bin/parley" CLUSTER_REDIS_NODES=3
dir="$out/outage.cluster"
scripts/cluster stop "$dir" >/dev/null 2>&1 || true
mapfile -t urls < <(scripts/cluster start "$dir" 3)
mapfile -t ports < <(tr ',' '\n' <"$dir/redis.url" | sed -E 's#.*:([0-9]+)/?$#\1#')
for p in "${ports[@]}"; do
    redis-cli -p "$p" config set cluster-require-full-coverage no >/dev/null
done
ws=() extra=()
for u in "${urls[@]}"; do ws+=("ws://${u#http://}/ws"); done
for u in "${ws[@]}"; do extra+=(--listener-url "$u"); done
echo "== outage: $(uptime)" | tee -a "$out/summary.txt"
"$bin/parley-bench" --no-progress --json --url "${ws[0]}" "${extra[@]}" "${SCENARIO:-fanout}" "$@" \
    >"$out/outage.json" 2>"$out/outage.txt" &
bench=$!
room_node="" presence_node=""
if [ "${OUTAGE_AT:-4}" = room ]; then
    # As soon as the first instance has subscribed the room (the others and most
    # subscribers are still joining: their subscriptions meet the outage).
    while kill -0 "$bench" 2>/dev/null; do
        subscribed=""
        for p in "${ports[@]}"; do
            subscribed+=$(redis-cli -p "$p" pubsub shardchannels 'parley:room:fanout-*')
        done
        [ -n "$subscribed" ] && break
        sleep 0.02
    done
else
    sleep "${OUTAGE_AT:-4}"
fi
for k in 0 1 2; do
    if redis-cli -p "${ports[$k]}" pubsub shardchannels 'parley:room:fanout-*' | grep -q .; then
        room_node=$k
    fi
    if ! redis-cli -p "${ports[$k]}" exists '{parley}:instances' | grep -q MOVED; then
        presence_node=$k
    fi
done
victim=""
for k in 0 1 2; do
    if [ "$k" != "$room_node" ] && [ "$k" != "$presence_node" ]; then victim=$k; break; fi
done
victim_pid=$(cat "$dir/redis-$victim.pid")
if [ "${OUTAGE:-kill}" = stop ]; then
    kill -STOP "$victim_pid"
    trap 'kill -CONT "$victim_pid" 2>/dev/null || true' EXIT
    how=stopped
else
    kill "$victim_pid"
    how=killed
fi
echo "room on node $room_node, presence on node $presence_node: $how node $victim" | tee -a "$out/summary.txt"
not_ready=(0 0 0) samples=0
while kill -0 "$bench" 2>/dev/null; do
    for i in 0 1 2; do
        code=$(curl -s -o /dev/null -w '%{http_code}' "http://$(cat "$dir/parley-$i.addr")/readyz" || true)
        [ "$code" = 200 ] || not_ready[i]=$((not_ready[i] + 1))
    done
    samples=$((samples + 1))
    sleep 0.25
done
wait "$bench" || echo "bench failed: see $out/outage.txt"
if [ "$how" = stopped ]; then kill -CONT "$victim_pid"; fi
{
    echo "readyz not 200 (of $samples samples): ${not_ready[*]}"
    for i in 0 1 2; do
        curl -fsS "http://$(cat "$dir/parley-$i.addr")/metrics" 2>/dev/null |
            awk -v i="$i" '/^parley_broker_(publishes_total|publish_failures_total|received_total|gap_fills_total|filled_messages_total|resubscribes_total|degraded_slots) /{printf "parley-%s %s %s\n", i, $1, $2}'
    done
    grep -E "delivered/s|latency p50|verification|published" "$out/outage.txt" || true
} | tee -a "$out/summary.txt"
cp "$dir"/parley-*.log "$out/" 2>/dev/null || true
scripts/cluster stop "$dir" >/dev/null
