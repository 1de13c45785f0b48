# Sourced by the storm-*.sh scripts: the environment of a server they start themselves
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
