// An MQTT device against a running parley: MQTT.js (npm `mqtt`), over WebSocket
// (ws://HOST:PORT/mqtt) or plain TCP (mqtt://HOST:PORT, the `[mqtt] listen` listener).
//
// Run by tests/mqtt.rs (scripts/test installs the package here with `npm ci`):
//
//     node client.mjs SCENARIO URL TOKEN USERNAME
//
// Scenarios:
//
// - `chat`: connect, subscribe rooms/lobby at QoS 1, print {"ready": ...}, wait for one
//   message (a WebSocket client sends it), publish `from-mqttjs` at QoS 1, wait for its
//   PUBACK, disconnect and print the summary.
// - `flood`: subscribe rooms/flood (joining it), then publish `m0`, `m1`, ... to it at
//   QoS 1 (up to 16 in flight) and print {"acked": BODY} for each PUBACK, until the
//   connection is lost; then print {"lost": true} and exit 0. The caller kills the
//   server under it.
//
// With MQTT_PROTOCOL=5 in the environment it speaks MQTT 5.0 (else 3.1.1); `chat` then
// reports the PUBACK's reason code as `puback`.
//
// Every line printed is one JSON object. Exits non-zero when something times out.

import mqtt from "mqtt";

const WAIT = 10_000;
const [scenario, url, token, username] = process.argv.slice(2);

function say(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function fail(why) {
  process.stderr.write(`mqttjs: ${why}\n`);
  process.exit(1);
}

const client = mqtt.connect(url, {
  clientId: `mqttjs-${process.pid}`,
  username,
  password: token,
  protocolVersion: process.env.MQTT_PROTOCOL === "5" ? 5 : 4,
  keepalive: 30,
  reconnectPeriod: 0,
  connectTimeout: WAIT,
});
const timer = setTimeout(() => fail(`${scenario}: timed out`), 30_000);
// Set once the scenario is done: MQTT.js may still try to write (a PUBACK for the
// device's own message coming back) into the socket it is closing; that is no failure.
let ending = false;
client.on("error", (e) => {
  if (scenario !== "flood" && !ending) fail(`error: ${e.message}`);
});

if (scenario === "chat") {
  client.on("connect", () => {
    client.subscribe("rooms/lobby", { qos: 1 }, (err, granted) => {
      if (err) fail(`subscribe: ${err.message}`);
      say({ ready: true, suback: granted.map((g) => g.qos) });
    });
  });
  client.once("message", (topic, payload, packet) => {
    const received = { topic, payload: payload.toString(), qos: packet.qos };
    client.publish("rooms/lobby", "from-mqttjs", { qos: 1 }, (err, ack) => {
      if (err) fail(`publish: ${err.message}`);
      ending = true;
      const puback = ack?.reasonCode ?? 0;
      client.end(false, () => {
        clearTimeout(timer);
        say({ received, acked: true, puback });
      });
    });
  });
} else if (scenario === "flood") {
  let next = 0;
  let inFlight = 0;
  let lost = false;
  const pump = () => {
    while (!lost && inFlight < 16) {
      const body = `m${next++}`;
      inFlight++;
      client.publish("rooms/flood", body, { qos: 1 }, (err) => {
        inFlight--;
        if (!err && !lost) say({ acked: body });
        pump();
      });
    }
  };
  // Subscribing joins the room (sending needs membership).
  client.on("connect", () => {
    client.subscribe("rooms/flood", { qos: 0 }, (err) => {
      if (err) fail(`subscribe: ${err.message}`);
      say({ ready: true });
      pump();
    });
  });
  client.on("close", () => {
    if (lost) return;
    lost = true;
    clearTimeout(timer);
    say({ lost: true });
    client.end(true, () => process.exit(0));
  });
} else {
  fail(`unknown scenario ${scenario}`);
}
