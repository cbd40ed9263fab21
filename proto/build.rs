//! Compiles `proto/sensor/v1/*.proto` in pure Rust (protox), so no `protoc` is needed, then
//! generates the prost messages, the tonic service and the protobuf-JSON (pbjson) mapping.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let mut files = Vec::new();
    for entry in fs::read_dir(root.join("sensor/v1"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "proto") {
            files.push(path);
        }
    }
    files.sort();
    println!("cargo:rerun-if-changed={}", root.display());

    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out.join("sensor_descriptor.bin");
    fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;

    tonic_prost_build::configure()
        .compile_well_known_types(true)
        // Users bring their own transport (tonic with rustls); the schema crate stays light.
        .build_transport(false)
        .extern_path(".google.protobuf", "::pbjson_types")
        // An exec is the largest kind by far: boxed, every other event is a third its size
        // (events are moved, cloned into evidence and kept in sequence partials).
        .boxed(".sensor.v1.Event.kind.exec")
        // Set on some execs only (identity where the agent reads it, a verdict where a
        // policy is enforced): boxed, an exec without them stays small.
        .boxed(".sensor.v1.ExecEvent.exe_identity")
        .boxed(".sensor.v1.ExecEvent.enforcement")
        .boxed(".sensor.v1.ExecFailedEvent.enforcement")
        .compile_fds(fds)?;

    pbjson_build::Builder::new()
        .register_descriptors(&fs::read(&descriptor_path)?)?
        .extern_path(".google.protobuf", "::pbjson_types")
        .build(&[".sensor.v1"])?;
    Ok(())
}
