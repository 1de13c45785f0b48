"""permessage-deflate against a running parley, with Python `websockets` as the peer.

Run by tests/deflate.rs (the venv is made by scripts/test):

    python deflate_client.py SCENARIO ws://127.0.0.1:PORT/ws TOKENS_JSON

SCENARIO is one of `broadcast`, `takeover`, `plain`, `bomb`. TOKENS_JSON maps user ids
to JWTs. The script asserts what it can see and prints one JSON object (what it saw)
on its last line for the Rust test to check further; it exits non-zero on a failed
assertion.

To see the frames as they travel, `PerMessageDeflate.decode`/`encode` are wrapped:
the wrapper records each compressed payload (RSV1 set) before websockets inflates it,
and whether each outgoing frame was compressed.
"""

import asyncio
import json
import sys
import zlib

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.extensions import permessage_deflate as pmd

_decode = pmd.PerMessageDeflate.decode
_encode = pmd.PerMessageDeflate.encode


def _recording_decode(self, frame, *, max_size=None):
    out = _decode(self, frame, max_size=max_size)
    if frame.rsv1 and hasattr(self, "raw_in"):
        # (what came on the wire, what it inflated to)
        self.raw_in.append((bytes(frame.data), bytes(out.data)))
    return out


def _recording_encode(self, frame):
    out = _encode(self, frame)
    if hasattr(self, "compressed_out"):
        self.compressed_out.append(bool(out.rsv1))
    return out


pmd.PerMessageDeflate.decode = _recording_decode
pmd.PerMessageDeflate.encode = _recording_encode

SUBPROTOCOL = "parley.v1.json"
BODY = (
    "Meeting moved to 15:30 in room B. Please bring the quarterly numbers, the draft "
    "of the roadmap and your questions for the team; we will also go through the "
    "open issues in the tracker one by one."
)


class Peer:
    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        ext = ws.protocol.extensions
        self.deflate = ext[0] if ext else None
        if self.deflate is not None:
            self.deflate.raw_in = []
            self.deflate.compressed_out = []

    @property
    def extensions_header(self):
        return self.ws.response.headers.get("Sec-WebSocket-Extensions")

    async def request(self, **cmd):
        self.next_id += 1
        rid = str(self.next_id)
        await self.ws.send(json.dumps({"id": rid, **cmd}))
        while True:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), 5))
            if frame.get("id") == rid:
                assert "error" not in frame, frame
                return frame

    async def push(self, kind):
        """The next push of `kind` (others are skipped), with its raw payload when it
        came compressed."""
        while True:
            text = await asyncio.wait_for(self.ws.recv(), 5)
            frame = json.loads(text)
            if kind in frame:
                return frame, text, self.raw_of(text)

    def raw_of(self, text):
        """The compressed payload that inflated to `text`, if it came compressed."""
        if self.deflate is None:
            return None
        for raw, plain in self.deflate.raw_in:
            if plain == text.encode():
                return raw
        return None


async def open_peer(url, token, compression="deflate", extensions=None):
    kwargs = {"subprotocols": [SUBPROTOCOL], "max_size": 2**20}
    if extensions is not None:
        kwargs["extensions"] = extensions
        kwargs["compression"] = None
    else:
        kwargs["compression"] = compression
    ws = await connect(url, **kwargs)
    peer = Peer(ws)
    await peer.request(connect={"token": token})
    return peer


def parse_stored_prefix(raw):
    """Splits a payload that starts with a non-final stored DEFLATE block."""
    assert raw[0] == 0x00, f"first byte {raw[0]:#x} is not a non-final stored block"
    length = int.from_bytes(raw[1:3], "little")
    nlength = int.from_bytes(raw[3:5], "little")
    assert length ^ nlength == 0xFFFF, "LEN/NLEN mismatch"
    return raw[5 : 5 + length], raw[5 + length :]


def inflate(raw):
    d = zlib.decompressobj(-15)
    return d.decompress(raw + b"\x00\x00\xff\xff")


async def broadcast(url, tokens):
    users = ["ann", "bob", "cid"]
    peers = {u: await open_peer(url, tokens[u]) for u in users}
    for u in users:
        header = peers[u].extensions_header
        assert header and "permessage-deflate" in header, header
        assert "server_no_context_takeover" in header, header
        await peers[u].request(join={"room": "deflate"})
    sender = await open_peer(url, tokens["dan"])
    await sender.request(join={"room": "deflate"})
    await sender.request(
        send={
            "room": "deflate",
            "clientMsgId": "m-1",
            "body": BODY,
            "metadata": {"lang": "en", "kind": "text"},
        }
    )
    seen = {}
    for u in users:
        frame, text, raw = await peers[u].push("message")
        assert frame["message"]["body"] == BODY, frame
        assert raw is not None, f"{u}: the message push was not compressed"
        prefix, shared = parse_stored_prefix(raw)
        assert prefix == f'{{"pos":"{frame["pos"]}",'.encode(), prefix
        assert inflate(raw) == text.encode(), "zlib inflates to the same frame"
        seen[u] = {"pos": int(frame["pos"]), "shared": shared.hex(), "wire": len(raw),
                   "plain": len(text.encode())}
    shared = {v["shared"] for v in seen.values()}
    assert len(shared) == 1, "the compressed body differs between recipients"
    positions = {v["pos"] for v in seen.values()}
    assert len(positions) > 1, f"recipients should have different positions: {positions}"
    # Sending compressed: the sender's long message went out with RSV1.
    assert any(sender.deflate.compressed_out), "the client compressed nothing"
    for p in [*peers.values(), sender]:
        await p.ws.close()
    return {"recipients": seen, "header": peers["ann"].extensions_header}


async def takeover(url, tokens):
    """The client keeps its compression context between messages (it did not offer
    client_no_context_takeover); the server must inflate each message with the
    previous ones' history. Prints what was negotiated; the Rust side checks it
    against the server's configuration."""
    peer = await open_peer(url, tokens["eve"])
    header = peer.extensions_header
    await peer.request(join={"room": "ctx"})
    acks = []
    for i in range(5):
        reply = await peer.request(
            send={"room": "ctx", "clientMsgId": f"c-{i}", "body": BODY}
        )
        acks.append(reply["sent"]["seq"])
    assert all(peer.deflate.compressed_out), "every frame should have been compressed"
    # The history reply is long: the server compresses it (per connection, by yawc).
    hist = await peer.request(history={"room": "ctx", "limit": 10})
    assert len(hist["history"]["messages"]) == 5, hist
    assert any(
        b'"history"' in plain for _, plain in peer.deflate.raw_in
    ), "the history reply was not compressed"
    await peer.ws.close()
    return {"header": header, "acks": acks}


async def no_context_offer(url, tokens):
    """The client offers client_no_context_takeover and server_no_context_takeover."""
    ext = pmd.ClientPerMessageDeflateFactory(
        server_no_context_takeover=True,
        client_no_context_takeover=True,
        client_max_window_bits=True,
    )
    peer = await open_peer(url, tokens["eve"], extensions=[ext])
    header = peer.extensions_header
    await peer.request(join={"room": "ctx2"})
    for i in range(3):
        await peer.request(send={"room": "ctx2", "clientMsgId": f"n-{i}", "body": BODY})
    assert all(peer.deflate.compressed_out)
    await peer.ws.close()
    return header


async def plain(url, tokens):
    """A client that offers no extension gets none and chats as usual."""
    a = await open_peer(url, tokens["ann"], compression=None)
    b = await open_peer(url, tokens["bob"], compression=None)
    assert a.extensions_header is None, a.extensions_header
    assert a.deflate is None
    await a.request(join={"room": "plain"})
    await b.request(join={"room": "plain"})
    await a.request(send={"room": "plain", "clientMsgId": "p-1", "body": BODY})
    frame, _, _ = await b.push("message")
    assert frame["message"]["body"] == BODY
    await a.ws.close()
    await b.ws.close()
    return {"header": a.extensions_header}


async def bomb(url, tokens):
    """Compressed messages that inflate past ws.max_frame_bytes (64 KiB): one just past
    it (FRAME_TOO_LARGE, then close 1009) and one of 64 MiB (inflating stops at twice
    the limit; close 1009). A bystander connected meanwhile keeps chatting."""
    bystander = await open_peer(url, tokens["bob"])
    await bystander.request(join={"room": "bombs"})
    results = []
    for size in [100 * 1024, 64 * 1024 * 1024]:
        attacker = await open_peer(url, tokens["ann"])
        await attacker.request(join={"room": "bombs"})
        payload = '{"id":"9","ping":{}}' + " " * size
        sent_before = len(attacker.deflate.compressed_out)
        await attacker.ws.send(payload)
        errors = []
        try:
            while True:
                frame = json.loads(await asyncio.wait_for(attacker.ws.recv(), 10))
                if "error" in frame:
                    errors.append(frame["error"]["code"])
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd else None
        assert code == 1009, f"closed with {code}"
        assert attacker.deflate.compressed_out[sent_before], "the bomb went out compressed"
        results.append({"inflated": size, "close": code, "errors": errors})
        reply = await bystander.request(
            send={"room": "bombs", "clientMsgId": f"b-{size}", "body": "still here"}
        )
        assert int(reply["sent"]["seq"]) >= 1
    await bystander.ws.close()
    return {"bombs": results}


async def main():
    scenario, url, tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if scenario == "broadcast":
        out = await broadcast(url, tokens)
    elif scenario == "takeover":
        out = await takeover(url, tokens)
        out["no_context_offer"] = await no_context_offer(url, tokens)
    elif scenario == "plain":
        out = await plain(url, tokens)
    elif scenario == "bomb":
        out = await bomb(url, tokens)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    print(json.dumps(out))


asyncio.run(main())
