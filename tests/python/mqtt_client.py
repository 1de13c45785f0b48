"""An MQTT device against a running parley: Python `paho-mqtt` over WebSocket on /mqtt.

Run by tests/mqtt.rs (the venv is made by scripts/test):

    python mqtt_client.py SCENARIO HOST PORT TOKEN [USERNAME]

With MQTT_TRANSPORT=tcp in the environment it speaks plain MQTT/TCP to PORT (the
`[mqtt] listen` listener) instead; with MQTT_PROTOCOL=5 it speaks MQTT 5.0 (else 3.1.1).

Scenarios:

- `chat`: connect, subscribe rooms/lobby at QoS 1, print `{"ready": ...}`, wait for
  one message (a WebSocket client sends it), publish `from-device` at QoS 1 and wait for
  its PUBACK, then disconnect.
  In MQTT 5 the publish carries the user property `sensor: t1`, and the summary has
  the PUBACK's reason code as `puback`.
- `connect`: connect only; report the CONNACK reason code.
- `refused` (MQTT 5): publish `secret` at QoS 1 to rooms/secret (a room the user is not
  a member of), then subscribe rooms/lobby and publish `after` there at QoS 1 on the
  same connection; report both PUBACK reason codes.
- `flow` (MQTT 5): connect with Receive Maximum 2 and acknowledge by hand; subscribe
  rooms/lobby at QoS 1, print `{"ready": ...}`, then receive MQTT_FLOW_MESSAGES (6)
  messages, holding the PUBACKs until no message came for a second, then PUBACKing all
  held; report the payloads in order and the most messages ever held unacknowledged
  (`most_unacked`: the server may never exceed 2).

Every line printed is one JSON object; the last one is the summary. Exits non-zero when
something times out.
"""

import json
import os
import queue
import sys

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

WAIT = 10
V5 = os.environ.get("MQTT_PROTOCOL") == "5"


def say(obj):
    print(json.dumps(obj), flush=True)


def client(host, port, token, username, receive_max=None):
    events = queue.Queue()
    tcp = os.environ.get("MQTT_TRANSPORT") == "tcp"
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id="device-1",
        transport="tcp" if tcp else "websockets",
        protocol=mqtt.MQTTv5 if V5 else mqtt.MQTTv311,
        manual_ack=receive_max is not None,
    )
    if not tcp:
        c.ws_set_options(path="/mqtt")
    c.username_pw_set(username, token)
    c.on_connect = lambda c, u, flags, rc, props: events.put(("connack", rc.value))
    c.on_subscribe = lambda c, u, mid, rcs, props: events.put(
        ("suback", [r.value for r in rcs])
    )
    c.on_message = lambda c, u, m: events.put(
        ("message", {"topic": m.topic, "payload": m.payload.decode(), "qos": m.qos})
    )
    c.on_publish = lambda c, u, mid, rc, props: events.put(("puback", rc.value))
    c.on_disconnect = lambda c, u, flags, rc, props: events.put(("closed", rc.value))
    props = None
    if receive_max is not None:
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = receive_max
        # With manual acks paho leaves PUBACKs to `flow` below.
        c.on_message = lambda c, u, m: events.put(("message", (m.payload.decode(), m.mid)))
    c.connect(host, port, keepalive=30, properties=props)
    c.loop_start()
    return c, events


def expect(events, kind):
    while True:
        got, value = events.get(timeout=WAIT)
        if got == kind:
            return value
        if got == "closed" and kind != "closed":
            raise SystemExit(f"closed ({value}) while waiting for {kind}")


def main():
    scenario, host, port, token = sys.argv[1:5]
    username = sys.argv[5] if len(sys.argv) > 5 else None
    receive_max = 2 if scenario == "flow" else None
    c, events = client(host, int(port), token, username, receive_max)
    code = expect(events, "connack")
    if scenario == "connect":
        # A refused CONNECT is followed by the close.
        closed = None
        if code != 0:
            closed = expect(events, "closed")
        c.loop_stop()
        say({"connack": code, "closed": closed})
        return
    if code != 0:
        raise SystemExit(f"CONNECT refused: {code}")
    if scenario == "refused":
        c.publish("rooms/secret", "secret", qos=1)
        refused = expect(events, "puback")
        c.subscribe("rooms/lobby", qos=1)
        expect(events, "suback")
        c.publish("rooms/lobby", "after", qos=1)
        after = expect(events, "puback")
        c.disconnect()
        c.loop_stop()
        say({"refused": refused, "after": after})
        return
    c.subscribe("rooms/lobby", qos=1)
    granted = expect(events, "suback")
    say({"ready": True, "suback": granted})
    if scenario == "flow":
        flow(c, events, int(os.environ.get("MQTT_FLOW_MESSAGES", "6")))
        return
    received = expect(events, "message")
    props = None
    if V5:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = ("sensor", "t1")
    info = c.publish("rooms/lobby", "from-device", qos=1, properties=props)
    info.wait_for_publish(timeout=WAIT)
    acked = info.is_published()
    puback = expect(events, "puback")
    c.disconnect()
    c.loop_stop()
    say({"suback": granted, "received": received, "acked": acked, "puback": puback})


def flow(c, events, n):
    received, held, most = [], [], 0
    while len(received) < n:
        try:
            # While PUBACKs are held, a second of quiet means the server holds back.
            kind, value = events.get(timeout=1.0 if held else WAIT)
        except queue.Empty:
            if not held:
                raise SystemExit(f"only {len(received)} of {n} messages came")
            for mid in held:
                c.ack(mid, 1)
            held = []
            continue
        if kind == "closed":
            raise SystemExit(f"closed ({value}) after {len(received)} messages")
        if kind == "message":
            payload, mid = value
            received.append(payload)
            held.append(mid)
            most = max(most, len(held))
    for mid in held:
        c.ack(mid, 1)
    c.disconnect()
    c.loop_stop()
    say({"received": received, "most_unacked": most})


if __name__ == "__main__":
    main()
