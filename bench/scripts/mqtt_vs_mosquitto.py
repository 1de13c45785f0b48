#!/usr/bin/env python3
"""parley's MQTT/TCP listener side by side with Debian's mosquitto, same client, same sitting.

    python3 bench/scripts/mqtt_vs_mosquitto.py [--parley target/release/parley]
        [--mosquitto /usr/sbin/mosquitto] [--idle 2000] [--subscribers 100]
        [--duration 10] [--rounds 2] [--over tcp|ws] [--only idle|fanout]
        [--brokers mosquitto,parley]

`--over ws`: MQTT over WebSocket (parley's `/mqtt`, subprotocol `mqtt`), offering
permessage-deflate as browsers do (`permessage-deflate; client_max_window_bits`); the
idle connections then measure what an MQTT-over-WebSocket device costs. mosquitto is
only run over TCP (Debian's build has no WebSocket listener configured here).

For each round and each broker (a fresh process each time, on free ports on 127.0.0.1;
mosquitto with a private config in a temp dir, never the system service; parley with a
fresh SQLite store in a temp dir, so every message is durable and ordered before its
PUBACK):

- idle: IDLE connections, each CONNECT (MQTT 3.1.1, keep-alive 600 s) + SUBSCRIBE to
  rooms/bench at QoS 0 (on parley that joins the room). The broker's RSS (VmRSS) before
  the first and 2 s after the last SUBACK: KiB per idle subscribed connection.
- fanout: SUBSCRIBERS connections subscribed to rooms/fan at QoS 0, one publisher
  sending 32-byte QoS 1 PUBLISHes to it as fast as PUBACKs come back (16 in flight) for
  DURATION seconds. Reports publishes/s (PUBACKed) and deliveries/s (bytes received by
  all subscribers divided by the size of one PUBLISH, so the client spends no time
  parsing), and checks every subscriber got every message.

The client is this script (Python asyncio, one process): at high rates it may be the
bottleneck for both brokers alike; the report prints its CPU time next to the broker's.
Tokens for parley are HS256 JWTs minted here with parley's development secret.
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

SECRET = "mqtt-bench-secret"
TOPIC_IDLE = b"rooms/bench"
TOPIC_FAN = b"rooms/fan"
PAYLOAD = b"x" * 32


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def token(user: str) -> bytes:
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"sub": user, "exp": int(time.time()) + 3600}).encode())
    signing = header + b"." + claims
    sig = b64(hmac.new(SECRET.encode(), signing, hashlib.sha256).digest())
    return signing + b"." + sig


def remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string(s: bytes) -> bytes:
    return len(s).to_bytes(2, "big") + s


def connect_packet(client_id: str, user: str) -> bytes:
    body = string(b"MQTT") + bytes([4, 0xC2]) + (600).to_bytes(2, "big")
    body += string(client_id.encode()) + string(user.encode()) + string(token(user))
    return b"\x10" + remaining(len(body)) + body


def subscribe_packet(pid: int, topic: bytes) -> bytes:
    body = pid.to_bytes(2, "big") + string(topic) + b"\x00"
    return b"\x82" + remaining(len(body)) + body


def publish_qos1(pid: int, topic: bytes, payload: bytes) -> bytes:
    body = string(topic) + pid.to_bytes(2, "big") + payload
    return b"\x32" + remaining(len(body)) + body


def delivered_size(topic: bytes, payload: bytes) -> int:
    body = len(string(topic)) + len(payload)
    return 1 + len(remaining(body)) + body


async def read_packet(reader: asyncio.StreamReader):
    first = (await reader.readexactly(1))[0]
    n, shift = 0, 0
    while True:
        b = (await reader.readexactly(1))[0]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return first >> 4, await reader.readexactly(n)


WS_KEY = base64.b64encode(b"parley-mqtt-benc").decode()


class WsReader:
    """Reads the MQTT byte stream out of WebSocket messages (server frames are unmasked;
    parley sends nothing here above the deflate threshold, so no inflate is needed)."""

    def __init__(self, reader):
        self.reader, self.buf = reader, b""

    async def readexactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            head = await self.reader.readexactly(2)
            assert head[0] & 0x40 == 0, "compressed frame: not expected for small packets"
            size = head[1] & 0x7F
            if size == 126:
                size = int.from_bytes(await self.reader.readexactly(2), "big")
            elif size == 127:
                size = int.from_bytes(await self.reader.readexactly(8), "big")
            payload = await self.reader.readexactly(size)
            if head[0] & 0x0F in (1, 2, 0):
                self.buf += payload
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def ws_binary(data: bytes) -> bytes:
    """One masked binary message (the mask is zero: the frame is still a valid masked
    client frame, and the payload needs no XOR)."""
    n = len(data)
    head = bytes([0x82])
    if n < 126:
        head += bytes([0x80 | n])
    else:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    return head + b"\0\0\0\0" + data


async def open_stream(port: int, over: str):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if over == "tcp":
        return reader, writer, lambda b: b
    writer.write(
        (f"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
         f"Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\n"
         "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n"
         "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
         ).encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), f"upgrade refused: {head[:80]!r}"
    return WsReader(reader), writer, ws_binary


async def open_subscribed(port: int, i: int, topic: bytes, over: str = "tcp"):
    reader, writer, frame = await open_stream(port, over)
    writer.write(frame(connect_packet(f"c{i}", f"u{i}") + subscribe_packet(1, topic)))
    await writer.drain()
    kind, body = await read_packet(reader)
    assert kind == 2 and body[1] == 0, f"CONNACK {body!r}"
    kind, body = await read_packet(reader)
    assert kind == 9 and body[2] != 0x80, f"SUBACK {body!r}"
    return reader, writer


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, name, args, env, port, tmp, http_port=None):
        self.name, self.port, self.tmp = name, port, tmp
        self.http_port = http_port
        self.proc = subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{name} did not listen on {port}")

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def start(name: str, opts) -> Broker:
    tmp = tempfile.mkdtemp(prefix=f"mqtt-bench-{name}-")
    port = free_port()
    env = dict(os.environ)
    if name == "mosquitto":
        conf = os.path.join(tmp, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write(
                f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                "persistence false\nlog_dest none\nmax_queued_messages 100000\n"
                # Like parley (and asyncio): no Nagle, or 16 in flight meet delayed ACKs.
                "set_tcp_nodelay true\n"
            )
        return Broker(name, [opts.mosquitto, "-c", conf], env, port, tmp)
    env.update(
        {
            "PARLEY_AUTH__JWT_SECRET": SECRET,
            "PARLEY_MQTT__LISTEN": f"127.0.0.1:{port}",
            "PARLEY_STORE__PATH": os.path.join(tmp, "parley.db"),
            "PARLEY_LIMITS__SENDS_PER_SECOND": "0",
            "PARLEY_LIMITS__SENDS_BURST": "0",
            "PARLEY_LIMITS__JOINS_PER_SECOND": "0",
            "PARLEY_LIMITS__JOINS_BURST": "0",
            "PARLEY_LIMITS__CONNECTS_PER_IP_PER_SECOND": "0",
            "PARLEY_LIMITS__CONNECTS_PER_IP_BURST": "0",
            "PARLEY_LIMITS__MAX_CONNECTIONS_PER_IP": "0",
            "RUST_LOG": "warn",
        }
    )
    http_port = free_port()
    args = [opts.parley, "--config", "/nonexistent.toml", "serve",
            "--listen", f"127.0.0.1:{http_port}"]
    return Broker(name, args, env, port, tmp, http_port)


async def idle(b: Broker, n: int, over: str) -> dict:
    port = b.http_port if over == "ws" else b.port
    # One connection first so the room exists and lazily built state is there.
    first = await open_subscribed(port, 0, TOPIC_IDLE, over)
    await asyncio.sleep(1)
    before = rss_kib(b.proc.pid)
    conns = [first]
    for start_i in range(1, n, 100):
        batch = range(start_i, min(start_i + 100, n))
        conns += await asyncio.gather(
            *(open_subscribed(port, i, TOPIC_IDLE, over) for i in batch))
    await asyncio.sleep(2)
    after = rss_kib(b.proc.pid)
    for _, w in conns:
        w.close()
    return {"over": over, "connections": n, "rss_before_kib": before, "rss_after_kib": after,
            "kib_per_connection": round((after - before) / (n - 1), 2)}


async def fanout(b: Broker, n: int, duration: float) -> dict:
    subs = []
    for start_i in range(0, n, 100):
        batch = range(start_i, min(start_i + 100, n))
        subs += await asyncio.gather(
            *(open_subscribed(b.port, 100000 + i, TOPIC_FAN) for i in batch))
    received = [0] * n

    async def drain(i, reader):
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            received[i] += len(chunk)

    drains = [asyncio.create_task(drain(i, r)) for i, (r, _) in enumerate(subs)]
    # The publisher is a member too (its SUBACK is its join); it ignores what comes back.
    reader, writer = await open_subscribed(b.port, 99999, TOPIC_FAN)
    acked = 0
    window = asyncio.Semaphore(16)
    done = asyncio.Event()

    async def acks():
        nonlocal acked
        while True:
            kind, _ = await read_packet(reader)
            if kind == 4:
                acked += 1
                window.release()

    ack_task = asyncio.create_task(acks())
    size = delivered_size(TOPIC_FAN, PAYLOAD)
    cpu0 = cpu_s(b.proc.pid)
    client0 = time.process_time()
    t0 = time.perf_counter()
    sent, pid = 0, 0
    while time.perf_counter() - t0 < duration:
        await window.acquire()
        pid = pid % 65535 + 1
        writer.write(publish_qos1(pid, TOPIC_FAN, PAYLOAD))
        sent += 1
        if sent % 64 == 0:
            await writer.drain()
    await writer.drain()
    while acked < sent:
        await asyncio.sleep(0.01)
    t_pub = time.perf_counter() - t0
    # Every subscriber gets every message.
    deadline = time.perf_counter() + 60
    while sum(received) < n * sent * size and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - t0
    cpu = cpu_s(b.proc.pid) - cpu0
    done.set()
    ack_task.cancel()
    for d in drains:
        d.cancel()
    for _, w in subs + [(reader, writer)]:
        w.close()
    delivered = sum(received) // size
    return {"subscribers": n, "published": sent, "publishes_per_s": round(sent / t_pub),
            "deliveries_per_s": round(delivered / elapsed), "complete": delivered == n * sent,
            "broker_cpu_s": round(cpu, 2), "seconds": round(elapsed, 2),
            "client_cpu_s": round(time.process_time() - client0, 2)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--parley", default="target/release/parley")
    p.add_argument("--mosquitto", default=shutil.which("mosquitto") or "/usr/sbin/mosquitto")
    p.add_argument("--idle", type=int, default=2000)
    p.add_argument("--subscribers", type=int, default=100)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--over", choices=("tcp", "ws"), default="tcp")
    p.add_argument("--only", choices=("idle", "fanout"))
    p.add_argument("--brokers", default="mosquitto,parley")
    opts = p.parse_args()
    brokers = opts.brokers.split(",")
    if opts.over == "ws":
        brokers = [b for b in brokers if b == "parley"]
    scenarios = (opts.only,) if opts.only else ("idle", "fanout")
    if opts.over == "ws":
        scenarios = ("idle",)
    for r in range(opts.rounds):
        for name in brokers:
            for scenario in scenarios:
                b = start(name, opts)
                try:
                    if scenario == "idle":
                        res = asyncio.run(idle(b, opts.idle, opts.over))
                    else:
                        res = asyncio.run(fanout(b, opts.subscribers, opts.duration))
                finally:
                    b.stop()
                print(json.dumps({"round": r + 1, "broker": name, "scenario": scenario, **res}),
                      flush=True)


if __name__ == "__main__":
    sys.exit(main())
