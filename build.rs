//! Generates the protocol types from `proto/` with no system `protoc`: protox parses the
//! schema in pure Rust, prost-build emits the structs and pbjson-build the proto3 JSON
//! mapping (serde impls) for the same types.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cfg(jemalloc)`: jemalloc is the build's global allocator (src/lib.rs `allocator`):
    // feature `jemalloc` (a default one), not `mimalloc`, on a target its C library
    // builds for (not Windows' MSVC).
    println!("cargo::rustc-check-cfg=cfg(jemalloc)");
    if std::env::var_os("CARGO_FEATURE_JEMALLOC").is_some()
        && std::env::var_os("CARGO_FEATURE_MIMALLOC").is_none()
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() != Ok("msvc")
    {
        println!("cargo::rustc-cfg=jemalloc");
    }

    let protos = ["proto/parley/v1/frames.proto"];
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("parley_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&descriptors),
    )?;

    prost_build::Config::new()
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        .btree_map(["."])
        .compile_protos(&protos, &["proto"])?;

    let descriptor_bytes = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .btree_map(["."])
        .ignore_unknown_fields()
        .build(&[".parley"])?;
    Ok(())
}
