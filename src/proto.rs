//! The generated wire types (`proto/parley/v1/frames.proto`): prost structs for the
//! protobuf encoding plus pbjson serde impls for the proto3 JSON mapping.
#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/parley.v1.rs"));
include!(concat!(env!("OUT_DIR"), "/parley.v1.serde.rs"));
