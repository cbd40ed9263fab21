//! Builds the eBPF probes (`sensor-ebpf`) with the nightly toolchain and bpf-linker, so that
//! the agent binary embeds them (`include_bytes_aligned!` in `probes/loader.rs`).
//! `cargo xtask setup` installs what this needs.

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../sensor-ebpf");
    let common = concat!(env!("CARGO_MANIFEST_DIR"), "/../sensor-common");
    println!("cargo:rerun-if-changed={common}");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "sensor-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
