// The two encodings of parley frames (docs/PROTOCOL.md): protobuf (WebSocket binary
// messages, subprotocol parley.v1.proto) and the proto3 JSON mapping (WebSocket text,
// SSE data lines, long-poll arrays, HTTP command bodies). Both go through the generated
// schema (src/gen), so the JSON is exactly what the server's generated mapping expects.

import { create, fromBinary, fromJson, toBinary, toJson, type JsonValue } from "@bufbuild/protobuf";
import {
  ClientFrameSchema,
  ServerFrameSchema,
  type ClientFrame,
  type ServerFrame,
} from "./gen/parley/v1/frames_pb.js";

export type Encoding = "proto" | "json";

export type { ClientFrame, ServerFrame };

/** The oneof of a client frame, as `{ case, value }` (value fields are partial). */
export type Command = Exclude<ClientFrame["cmd"], { case: undefined }>;

export function clientFrame(id: number, cmd: Command): ClientFrame {
  // `create` fills defaults for nested messages given as partial objects.
  return create(ClientFrameSchema, { id: BigInt(id), cmd } as never);
}

export function encodeClient(encoding: Encoding, frame: ClientFrame): string | Uint8Array {
  return encoding === "proto"
    ? toBinary(ClientFrameSchema, frame)
    : JSON.stringify(toJson(ClientFrameSchema, frame));
}

export function decodeServer(data: string | ArrayBuffer | Uint8Array): ServerFrame {
  if (typeof data === "string") return serverFromJson(JSON.parse(data));
  return fromBinary(ServerFrameSchema, data instanceof Uint8Array ? data : new Uint8Array(data));
}

export function serverFromJson(json: JsonValue): ServerFrame {
  return fromJson(ServerFrameSchema, json, { ignoreUnknownFields: true });
}
