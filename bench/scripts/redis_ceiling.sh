#!/usr/bin/env bash
# Redis' pub/sub ceiling (docs/BENCHMARKS.md, "Many instances"): how many messages/s one
# redis-server (one core: Redis runs commands on one thread) takes when each message is
# a parley-sized envelope published on one channel that K subscriber connections read
# (K = the instances with members in the room). Each row: redis-benchmark publishing
# pipelined (as parley's publisher does), the rate it reached, and messages per
# redis-server CPU-second, counted until every subscriber has read everything (what one
# core carries). Subscribers are redis-cli processes writing to /dev/null; they fall
# behind at these rates, so the pubsub output-buffer limit is lifted for the run (memory:
# up to MESSAGES × PAYLOAD per subscriber) and the script checks they all stayed.
#
#   bench/scripts/redis_ceiling.sh [MESSAGES] [PAYLOAD_BYTES]
set -euo pipefail
n=${1:-1000000}
size=${2:-200}
dir=$(mktemp -d /tmp/redis-ceiling.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
    --client-output-buffer-limit "pubsub 0 0 0"
trap 'kill $(cat "$dir/redis.pid") 2>/dev/null; sleep 0.2; rm -rf "$dir"' EXIT
for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
pid=$(cat "$dir/redis.pid")
hz=$(getconf CLK_TCK)
payload=$(head -c "$size" /dev/zero | tr '\0' x)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
printf '%-9s %4s %12s %10s %16s %s\n' command subs "msgs/s" "redis CPU" "msgs/CPU-s" note
for command in PUBLISH SPUBLISH; do
    sub=SUBSCRIBE
    [ "$command" = SPUBLISH ] && sub=SSUBSCRIBE
    for k in 0 1 2 3; do
        subs=()
        for _ in $(seq 1 "$k"); do
            redis-cli -p "$port" "$sub" bench:room >/dev/null 2>&1 &
            subs+=($!)
        done
        sleep 0.3
        c0=$(ticks "$pid")
        t0=$(date +%s.%N)
        rps=$(redis-benchmark -p "$port" -c 8 -P 32 -n "$n" -q "$command" bench:room "$payload" |
            tr '\r' '\n' | awk '/requests per second/{for (i = 2; i <= NF; i++) if ($i == "requests") v = $(i - 1)} END{printf "%.0f\n", v}')
        t1=$(date +%s.%N)
        # Until the subscribers have read everything (their output buffers are empty).
        for _ in $(seq 600); do
            redis-cli -p "$port" client list type pubsub | grep -qv ' omem=0 ' || break
            sleep 0.1
        done
        c1=$(ticks "$pid")
        if [ "$command" = SPUBLISH ]; then
            left=$(redis-cli -p "$port" pubsub shardnumsub bench:room | tail -1)
        else
            left=$(redis-cli -p "$port" pubsub numsub bench:room | tail -1)
        fi
        note=""
        [ "$left" = "$k" ] || note="only $left of $k subscribers left"
        cpu=$(echo "scale=3; ($c1 - $c0) / $hz" | bc)
        per=$(echo "scale=0; $n / $cpu" | bc)
        printf '%-9s %4s %12s %9.2fs %16s %s\n' "$command" "$k" "$rps" "$cpu" "$per" "$note"
        for p in "${subs[@]}"; do kill "$p" 2>/dev/null || true; done
        wait 2>/dev/null || true
    done
done
