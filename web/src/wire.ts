// The protobuf encoding of parley frames, in the shape of the proto3 JSON mapping.
//
// Frames inside the SDK are plain objects exactly as the JSON encoding has them
// (lowerCamelCase names, 64-bit integers as decimal strings, enums by name, defaults
// omitted), so the JSON encoding is JSON.parse/JSON.stringify and the protobuf encoding
// is this table-driven codec over @bufbuild/protobuf's BinaryReader/BinaryWriter, with
// the tables generated from the schema (src/gen/schema.ts). Unknown fields are skipped.

import { BinaryReader, BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
import { ENUMS, MESSAGES, type FieldSpec } from "./gen/schema.js";

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type JsonObject = { [key: string]: any };

const SCALAR = 0, MESSAGE = 1, ENUM = 2, LIST_SCALAR = 3, LIST_MESSAGE = 4, MAP = 5, OPTIONAL_SCALAR = 6;
const INT64 = 3, UINT64 = 4, INT32 = 5, BOOL = 8, STRING = 9, UINT32 = 13;

const enumNumbers: Record<string, Record<string, number>> = {};
for (const [name, values] of Object.entries(ENUMS)) {
  enumNumbers[name] = Object.fromEntries(Object.entries(values).map(([n, v]) => [v, Number(n)]));
}

function isDefault(type: number, v: unknown): boolean {
  if (v === undefined || v === null) return true;
  if (type === STRING) return v === "";
  if (type === BOOL) return v === false;
  return v === 0 || v === "0" || v === 0n;
}

function writeScalar(w: BinaryWriter, type: number, v: unknown): void {
  switch (type) {
    case STRING:
      w.string(String(v));
      break;
    case BOOL:
      w.bool(Boolean(v));
      break;
    case UINT64:
      w.uint64(v as string | number);
      break;
    case INT64:
      w.int64(v as string | number);
      break;
    case UINT32:
      w.uint32(Number(v));
      break;
    default:
      w.int32(Number(v));
  }
}

const wireType = (type: number) => (type === STRING ? WireType.LengthDelimited : WireType.Varint);

function writeMessage(w: BinaryWriter, name: string, obj: JsonObject): void {
  for (const [no, json, kind, type, valueType] of MESSAGES[name] as FieldSpec[]) {
    const v = obj[json];
    if (v === undefined || v === null) continue;
    switch (kind) {
      case SCALAR:
        if (!isDefault(type as number, v)) writeScalar(w.tag(no, wireType(type as number)), type as number, v);
        break;
      case OPTIONAL_SCALAR:
        // Explicit presence: set means written, zero included.
        writeScalar(w.tag(no, wireType(type as number)), type as number, v);
        break;
      case ENUM: {
        const n = typeof v === "number" ? v : (enumNumbers[type as string]?.[v] ?? 0);
        if (n !== 0) w.tag(no, WireType.Varint).int32(n);
        break;
      }
      case MESSAGE:
        // Present means written, even when empty (a oneof member such as `ping: {}`).
        w.tag(no, WireType.LengthDelimited).fork();
        writeMessage(w, type as string, v);
        w.join();
        break;
      case LIST_SCALAR:
        for (const item of v) writeScalar(w.tag(no, wireType(type as number)), type as number, item);
        break;
      case LIST_MESSAGE:
        for (const item of v) {
          w.tag(no, WireType.LengthDelimited).fork();
          writeMessage(w, type as string, item);
          w.join();
        }
        break;
      case MAP:
        for (const [k, item] of Object.entries(v)) {
          w.tag(no, WireType.LengthDelimited).fork();
          writeScalar(w.tag(1, wireType(type as number)), type as number, k);
          writeScalar(w.tag(2, wireType(valueType!)), valueType!, item);
          w.join();
        }
        break;
    }
  }
}

function readScalar(r: BinaryReader, type: number): unknown {
  switch (type) {
    case STRING:
      return r.string();
    case BOOL:
      return r.bool();
    case UINT64:
      return String(r.uint64());
    case INT64:
      return String(r.int64());
    case UINT32:
      return r.uint32();
    default:
      return r.int32();
  }
}

function readMessage(r: BinaryReader, name: string, end: number): JsonObject {
  const fields = MESSAGES[name] as FieldSpec[];
  const out: JsonObject = {};
  while (r.pos < end) {
    const [no, wt] = r.tag();
    const f = fields.find((x) => x[0] === no);
    if (!f) {
      r.skip(wt, no);
      continue;
    }
    const [, json, kind, type, valueType] = f;
    switch (kind) {
      case SCALAR: {
        const v = readScalar(r, type as number);
        if (isDefault(type as number, v)) delete out[json];
        else out[json] = v;
        break;
      }
      case OPTIONAL_SCALAR:
        out[json] = readScalar(r, type as number);
        break;
      case ENUM: {
        const n = r.int32();
        out[json] = ENUMS[type as string]?.[n] ?? n;
        break;
      }
      case MESSAGE: {
        const len = r.uint32();
        out[json] = readMessage(r, type as string, r.pos + len);
        break;
      }
      case LIST_SCALAR:
        (out[json] ??= []).push(readScalar(r, type as number));
        break;
      case LIST_MESSAGE: {
        const len = r.uint32();
        (out[json] ??= []).push(readMessage(r, type as string, r.pos + len));
        break;
      }
      case MAP: {
        const len = r.uint32();
        const stop = r.pos + len;
        let k: unknown = type === STRING ? "" : "0";
        let v: unknown = valueType === STRING ? "" : valueType === BOOL ? false : valueType === UINT32 || valueType === INT32 ? 0 : "0";
        while (r.pos < stop) {
          const [n, t] = r.tag();
          if (n === 1) k = readScalar(r, type as number);
          else if (n === 2) v = readScalar(r, valueType!);
          else r.skip(t, n);
        }
        (out[json] ??= {})[String(k)] = v;
        break;
      }
    }
  }
  return out;
}

export function encodeProto(message: string, obj: JsonObject): Uint8Array {
  const w = new BinaryWriter();
  writeMessage(w, message, obj);
  return w.finish();
}

export function decodeProto(message: string, bytes: Uint8Array): JsonObject {
  const r = new BinaryReader(bytes);
  return readMessage(r, message, r.len);
}
