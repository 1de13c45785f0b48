# Sourced by the storm-*.sh scripts and fanout-callgrind.sh: the environment of a server they start themselves
# (`storm-env PORT`: listen on 127.0.0.1:PORT, the scripts' JWT secret `cg-secret`, every
# per-IP and per-user limit off, as `parley-bench --spawn-server` does) and a wait for its
# port (`storm-wait PORT`, up to 10 s).
storm-env() {
  export PARLEY_SERVER__LISTEN=127.0.0.1:$1 PARLEY_AUTH__JWT_SECRET=cg-secret RUST_LOG=warn
  local v
  for v in MAX_CONNECTIONS MAX_CONNECTIONS_PER_IP CONNECTS_PER_IP_PER_SECOND CONNECTS_PER_IP_BURST \
      TICKETS_PER_IP_PER_SECOND TICKETS_PER_IP_BURST MAX_SESSIONS_PER_USER MAX_ROOMS_PER_USER \
      SENDS_PER_SECOND SENDS_BURST JOINS_PER_SECOND JOINS_BURST; do export "PARLEY_LIMITS__$v=0"; done
}
storm-wait() {
  local i
  for i in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.1; done
}
# `cg-start NAME SERVER`: a work directory /tmp/cg/wd-NAME, SERVER under callgrind on CPU 0
# (output /tmp/cg/NAME.out*, log /tmp/cg/NAME.server.log) on a random port, waited for
# (up to 60 s: valgrind starts slowly), counters zeroed. Sets `port` and `vpid`.
cg-start() {
  local i
  mkdir -p /tmp/cg
  storm-port
  local wd=/tmp/cg/wd-$1; rm -rf "$wd"; mkdir -p "$wd"; cd "$wd"
  storm-env $port
  taskset -c 0 valgrind --tool=callgrind --callgrind-out-file=/tmp/cg/$1.out "$2" serve > /tmp/cg/$1.server.log 2>&1 &
  vpid=$!
  for i in $(seq 1 300); do
    (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break
    sleep 0.2
  done
  sleep 1
  if ! kill -0 $vpid 2>/dev/null; then
    echo "$1: the server did not start: $(grep -v '^==' /tmp/cg/$1.server.log | tail -1)" >&2
    exit 1
  fi
  callgrind_control -z $vpid >/dev/null 2>&1
}
# `storm-port`: sets `port` to a random one that nothing listens on (another run's server
# on it would answer the scripts' wait and take their storm), below Linux's ephemeral range
# (32768-60999, where another generator's thousands of client sockets hold ports).
storm-port() {
  port=$((20000 + RANDOM % 12000))
  while (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; do port=$((20000 + RANDOM % 12000)); done
}
# `storm-serve DIR SERVER`: a fresh work directory DIR (the current one after), SERVER on
# CPU 0 on a free port (log DIR/server.log), waited for. Sets `port` and `spid`.
storm-serve() {
  storm-port
  rm -rf "$1"; mkdir -p "$1"; cd "$1"
  storm-env $port
  taskset -c 0 "$2" serve > server.log 2>&1 &
  spid=$!
  storm-wait $port
}
