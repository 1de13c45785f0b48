// A lossy relay for the browser tests: forwards TCP and UDP from one local port number
// to parley's (the TLS listener and the QUIC listener share a port number), adding a
// one-way delay each way and random loss.
//
// - UDP (QUIC): each datagram is dropped with probability `loss`, else delivered after
//   `delayMs`. That is what a lossy link does to QUIC.
// - TCP: the relay terminates TCP on both sides, so a real segment loss cannot happen
//   here; it is modelled as TCP shows it to the application: a chunk "lost" with
//   probability `loss` arrives one retransmission timeout late (max(200 ms, 2 × RTT),
//   Linux's floor and a tail-loss probe), and every chunk behind it waits too (in-order
//   delivery: head-of-line blocking). The benchmark (web/bench/lossnet.py) uses the
//   kernel's own TCP instead.
// - `udp: "drop"` drops every datagram: a network that blocks UDP.
//
// Bounded: the tests stop it; queues hold only what the test itself sends.
import dgram from "node:dgram";
import net from "node:net";

export class LossyRelay {
  constructor(upstreamPort, { delayMs = 0, loss = 0, udp = "pass", seed = 1 } = {}) {
    this.upstreamPort = upstreamPort;
    this.delayMs = delayMs;
    this.loss = loss;
    this.udp = udp;
    this.sockets = new Set();
    this.udpPeers = new Map(); // "addr:port" -> socket to upstream
    this.counts = { tcpConnections: 0, datagrams: 0, dropped: 0, stalled: 0 };
    // A small deterministic PRNG (mulberry32), so a run can be repeated.
    let a = seed >>> 0;
    this.random = () => {
      a = (a + 0x6d2b79f5) >>> 0;
      let t = a;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
  }

  get port() {
    return this.tcp.address().port;
  }

  async start() {
    // The same port number for TCP and UDP; retry when UDP's is taken.
    for (let i = 0; i < 20; i++) {
      this.tcp = net.createServer((c) => this.#tcp(c));
      await new Promise((r) => this.tcp.listen(0, "127.0.0.1", r));
      this.udpSock = dgram.createSocket("udp4");
      const ok = await new Promise((r) => {
        this.udpSock.once("error", () => r(false));
        this.udpSock.bind(this.port, "127.0.0.1", () => r(true));
      });
      if (ok) break;
      this.udpSock.close();
      await new Promise((r) => this.tcp.close(r));
    }
    this.udpSock.on("message", (msg, from) => this.#datagram(msg, from));
    return this;
  }

  /** A delayed, in-order pipe from `from` to `to` with modelled loss. */
  #pipe(from, to) {
    const queue = []; // [due ms, chunk | null (= end)], due times non-decreasing
    let timer;
    let last = 0;
    const flush = () => {
      timer = undefined;
      while (queue.length && queue[0][0] <= Date.now()) {
        const [, chunk] = queue.shift();
        if (to.destroyed) return;
        if (chunk === null) to.end();
        else to.write(chunk);
      }
      if (queue.length) timer = setTimeout(flush, Math.max(0, queue[0][0] - Date.now()));
    };
    const push = (due, chunk) => {
      queue.push([due, chunk]);
      if (!timer) timer = setTimeout(flush, Math.max(0, queue[0][0] - Date.now()));
    };
    from.on("data", (chunk) => {
      // Lost and retransmitted: late by one RTO, counted from its own send time (losses
      // close together are recovered together, not one after the other).
      let at = Date.now() + this.delayMs;
      if (this.loss > 0 && this.random() < this.loss) {
        at += Math.max(200, 4 * this.delayMs);
        this.counts.stalled++;
      }
      at = Math.max(at, last); // in order: nothing overtakes a held chunk
      last = at;
      push(at, chunk);
    });
    from.on("end", () => push(Math.max(Date.now(), last), null));
    to.on("close", () => clearTimeout(timer));
  }

  #tcp(client) {
    this.counts.tcpConnections++;
    const up = net.connect(this.upstreamPort, "127.0.0.1");
    for (const s of [client, up]) {
      this.sockets.add(s);
      s.setNoDelay(true);
      s.on("close", () => this.sockets.delete(s));
      s.on("error", () => {
        client.destroy();
        up.destroy();
      });
    }
    this.#pipe(client, up);
    this.#pipe(up, client);
  }

  #datagram(msg, from) {
    this.counts.datagrams++;
    const key = `${from.address}:${from.port}`;
    let peer = this.udpPeers.get(key);
    if (!peer) {
      peer = dgram.createSocket("udp4");
      peer.bind(0, "127.0.0.1");
      peer.on("message", (back) => this.#forward(back, (b) => this.udpSock.send(b, from.port, from.address)));
      peer.on("error", () => {});
      this.udpPeers.set(key, peer);
    }
    this.#forward(msg, (b) => peer.send(b, this.upstreamPort, "127.0.0.1"));
  }

  #forward(msg, send) {
    if (this.udp === "drop" || (this.loss > 0 && this.random() < this.loss)) {
      this.counts.dropped++;
      return;
    }
    const go = () => {
      if (this.stopped) return;
      try {
        send(msg);
      } catch {
        /* socket closed meanwhile */
      }
    };
    if (this.delayMs > 0) setTimeout(go, this.delayMs);
    else go();
  }

  async stop() {
    this.stopped = true;
    for (const s of this.sockets) s.destroy();
    for (const p of this.udpPeers.values()) p.close();
    this.udpSock?.close();
    await new Promise((r) => this.tcp.close(r));
  }
}
