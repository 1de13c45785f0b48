// The two encodings of parley frames (docs/PROTOCOL.md): protobuf (WebSocket binary
// messages, subprotocol parley.v1.proto) and the proto3 JSON mapping (WebSocket text,
// SSE data lines, long-poll arrays, HTTP command bodies). Inside the SDK a frame is the
// JSON-mapping object either way (see wire.ts): `{ id: "3", sent: { room, seq: "7" } }`.

import { decodeProto, encodeProto, type JsonObject } from "./wire.js";
import { MESSAGES } from "./gen/schema.js";

export type Encoding = "proto" | "json";
export type Frame = JsonObject;
/** A client command: one key naming it, e.g. `{ join: { room: "lobby" } }`. */
export type Command = JsonObject;

export function clientFrame(id: number, cmd: Command): Frame {
  return id ? { id, ...cmd } : { ...cmd };
}

export function encodeClient(encoding: Encoding, frame: Frame): string | Uint8Array {
  return encoding === "proto" ? encodeProto("ClientFrame", frame) : JSON.stringify(frame);
}

export function decodeServer(data: string | ArrayBuffer | Uint8Array): Frame {
  if (typeof data === "string") return JSON.parse(data) as Frame;
  return decodeProto("ServerFrame", data instanceof Uint8Array ? data : new Uint8Array(data));
}

/** The names of the ServerFrame oneof (`error`, `connected`, `message`, …). */
const KINDS = (MESSAGES.ServerFrame ?? []).filter((f) => f[2] === 1).map((f) => f[1]);

/** Which reply or push a server frame is: its oneof name. */
export function kindOf(frame: Frame): string | undefined {
  return KINDS.find((k) => frame[k] !== undefined);
}
