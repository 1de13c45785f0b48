#!/usr/bin/env python3
"""A lossy path between two network namespaces, for the loss benchmark (root only).

    lossnet.py up --delay-ms 50 --loss 0.02      # runs until SIGTERM/SIGINT or --seconds
    ip netns exec plc ...                        # the client side: 10.91.1.2
    ip netns exec pls ...                        # the server side: 10.91.2.2

Three namespaces: plc (client) -- plr (router) -- pls (server), joined by veth pairs.
The router sends every forwarded IP packet through a TUN device to this program, which
delays it by `delay_ms` (each way, so the RTT is twice that) and drops it with
probability `loss`, then writes it back, and the kernel forwards it on. So both ends
run the kernel's real TCP (real retransmission timeouts, fast retransmit, tail loss
probes) and real QUIC over UDP — what `tc netem` would do; this kernel has no sch_netem.

Everything is removed on exit (the namespaces, with their links and the TUN device).
Bounded: `--seconds` (default 900) ends it, and the delay queue holds at most 10 000
packets (more are dropped, as a full router queue would).
"""

import argparse
import fcntl
import heapq
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time

NS = {"client": "plc", "router": "plr", "server": "pls"}
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MAX_QUEUE = 10_000


def sh(*args, check=True):
    return subprocess.run(args, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ns(name, *args, check=True):
    return sh("ip", "netns", "exec", NS[name], *args, check=check)


def down():
    for n in NS.values():
        sh("ip", "netns", "del", n, check=False)


def up():
    down()
    for n in NS.values():
        sh("ip", "netns", "add", n)
        sh("ip", "-n", n, "link", "set", "lo", "up")
        # IPv4 only: no IPv6 addresses appearing seconds later (Chromium reports such a
        # change as ERR_NETWORK_CHANGED to requests in flight).
        for key in ("net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"):
            sh("ip", "netns", "exec", n, "sysctl", "-q", "-w", key, check=False)
    # client <-> router, server <-> router
    sh("ip", "link", "add", "plc0", "netns", NS["client"], "type", "veth", "peer", "name", "plr0", "netns", NS["router"])
    sh("ip", "link", "add", "pls0", "netns", NS["server"], "type", "veth", "peer", "name", "plr1", "netns", NS["router"])
    sh("ip", "-n", NS["client"], "addr", "add", "10.91.1.2/24", "dev", "plc0")
    sh("ip", "-n", NS["router"], "addr", "add", "10.91.1.1/24", "dev", "plr0")
    sh("ip", "-n", NS["server"], "addr", "add", "10.91.2.2/24", "dev", "pls0")
    sh("ip", "-n", NS["router"], "addr", "add", "10.91.2.1/24", "dev", "plr1")
    for n, dev in (("client", "plc0"), ("router", "plr0"), ("router", "plr1"), ("server", "pls0")):
        sh("ip", "-n", NS[n], "link", "set", dev, "up")
    sh("ip", "-n", NS["client"], "route", "add", "default", "via", "10.91.1.1")
    sh("ip", "-n", NS["server"], "route", "add", "default", "via", "10.91.2.1")
    for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"):
        ns("router", "sysctl", "-q", "-w", key)


def open_tun():
    """The TUN device (this process runs inside the router namespace)."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"pltun", IFF_TUN | IFF_NO_PI))
    sh("ip", "link", "set", "pltun", "up")
    sh("sysctl", "-q", "-w", "net.ipv4.conf.pltun.rp_filter=0")
    sh("sysctl", "-q", "-w", "net.ipv4.conf.pltun.accept_local=1")
    # What arrives from either side goes to the TUN device; what comes back out of it
    # is routed normally (main table) to the other side.
    sh("ip", "route", "add", "default", "dev", "pltun", "table", "100")
    sh("ip", "rule", "add", "iif", "plr0", "lookup", "100", "priority", "100")
    sh("ip", "rule", "add", "iif", "plr1", "lookup", "100", "priority", "101")
    return fd


def relay(fd, delay_s, loss, seconds, seed):
    rng = random.Random(seed)
    queue = []  # (due, n, packet)
    n = 0
    stats = {"packets": 0, "dropped": 0}
    end = time.monotonic() + seconds
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    print("ready", flush=True)
    while not stop and time.monotonic() < end:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, pkt = heapq.heappop(queue)
            try:
                os.write(fd, pkt)
            except OSError:
                pass
        wait = max(0.0, queue[0][0] - now) if queue else 0.2
        try:
            readable, _, _ = select.select([fd], [], [], wait)
        except InterruptedError:
            continue
        if readable:
            pkt = os.read(fd, 65536)
            stats["packets"] += 1
            if (loss > 0 and rng.random() < loss) or len(queue) >= MAX_QUEUE:
                stats["dropped"] += 1
                continue
            n += 1
            heapq.heappush(queue, (time.monotonic() + delay_s, n, pkt))
    print(f"done {stats}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["up", "down", "_relay"])
    p.add_argument("--delay-ms", type=float, default=50.0, help="one-way delay (RTT = 2x)")
    p.add_argument("--loss", type=float, default=0.0, help="drop probability per packet, each way")
    p.add_argument("--seconds", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    if a.command == "down":
        down()
        return
    if os.geteuid() != 0:
        sys.exit("lossnet.py needs root (network namespaces, a TUN device)")
    if a.command == "_relay":  # inside the router namespace
        relay(open_tun(), a.delay_ms / 1000.0, a.loss, a.seconds, a.seed)
        return
    child = None
    try:
        up()
        args = ["--delay-ms", str(a.delay_ms), "--loss", str(a.loss), "--seconds", str(a.seconds), "--seed", str(a.seed)]
        child = subprocess.Popen(["ip", "netns", "exec", NS["router"], sys.executable, os.path.abspath(__file__), "_relay", *args])
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: child.send_signal(signal.SIGTERM))
        child.wait()
    finally:
        if child and child.poll() is None:
            child.kill()
        down()


if __name__ == "__main__":
    main()
