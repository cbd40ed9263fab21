//! Builds the eBPF probes (`sensor-ebpf`) with the nightly toolchain and bpf-linker, so that
//! the agent binary embeds them (`include_bytes_aligned!` in `probes/loader.rs`).
//! `cargo xtask setup` installs what this needs.

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../sensor-ebpf");
    let common = concat!(env!("CARGO_MANIFEST_DIR"), "/../sensor-common");
    println!("cargo:rerun-if-changed={common}");
    // The workspace's release profile builds the userspace binaries as one unit (fat LTO,
    // one codegen unit); the probes are built as they always were, with cargo's defaults
    // (sensor-ebpf's own codegen-units = 1 still applies) and linked by bpf-linker.
    // SAFETY: a build script is single-threaded; the variables are read by the cargo that
    // aya-build starts next.
    unsafe {
        std::env::set_var("CARGO_PROFILE_RELEASE_LTO", "false");
        std::env::set_var("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16");
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "sensor-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
