use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Builds the eBPF programs (tcpmgm-ebpf) with the nightly toolchain for the BPF target and
/// leaves the object in OUT_DIR, where `kernel/programs.rs` embeds it.
fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    // The programs are built from tcpmgm-common too: a change there must rebuild them (aya-build
    // watches the eBPF package's own directory only).
    let common = packages
        .iter()
        .find(|p| p.name.as_str() == "tcpmgm-common")
        .ok_or_else(|| anyhow!("tcpmgm-common package not found"))?;
    let common_dir = common.manifest_path.parent().context("manifest dir")?;
    println!("cargo:rerun-if-changed={common_dir}");
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "tcpmgm-ebpf")
        .ok_or_else(|| anyhow!("tcpmgm-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .context("manifest dir")?
        .as_str()
        .to_owned();
    aya_build::build_ebpf(
        [Package {
            name: "tcpmgm-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
