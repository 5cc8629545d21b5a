use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};
use sha2::{Digest as _, Sha256};

/// Builds the eBPF programs (tcpmgm-ebpf) with the nightly toolchain for the BPF target and
/// leaves the object in OUT_DIR, where `kernel/mod.rs` embeds it; then names the build for
/// `--version`: its commit and the object's hash.
fn main() -> anyhow::Result<()> {
    build_ebpf()?;
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
    let object = std::fs::read(Path::new(&out_dir).join("tcpmgm")).context("the eBPF object")?;
    let hash: String = Sha256::digest(&object)
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    println!("cargo:rustc-env=TCPMGM_EBPF_SHA256={hash}");
    println!("cargo:rustc-env=TCPMGM_COMMIT={}", commit());
    Ok(())
}

/// The commit the build comes from: TCPMGM_COMMIT when set (a build from a source tarball,
/// which has no git), else `git describe` of this workspace's own repository (not of one it
/// may be unpacked in), else "unknown".
fn commit() -> String {
    println!("cargo:rerun-if-env-changed=TCPMGM_COMMIT");
    if let Ok(given) = std::env::var("TCPMGM_COMMIT") {
        return given;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace holds the crate");
    // No optional locks: describe --dirty would otherwise rewrite the index, which is watched.
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(workspace)
            .env("GIT_OPTIONAL_LOCKS", "0")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let ours = git(&["rev-parse", "--show-toplevel"])
        .is_some_and(|top| Path::new(&top).canonicalize().ok() == workspace.canonicalize().ok());
    if !ours {
        return "unknown".into();
    }
    // A commit, a checkout or a staged change touches one of these; an edit not yet staged
    // shows as -dirty from the next of them on.
    for what in ["HEAD", "index", "packed-refs"] {
        if let Some(path) = git(&["rev-parse", "--git-path", what]) {
            watch(workspace, &path);
        }
    }
    if let Some(path) = git(&["symbolic-ref", "-q", "HEAD"])
        .and_then(|head| git(&["rev-parse", "--git-path", &head]))
    {
        watch(workspace, &path);
    }
    git(&["describe", "--tags", "--always", "--dirty", "--abbrev=12"])
        .unwrap_or_else(|| "unknown".into())
}

/// Reruns the build script when the git file at `path` (relative to `workspace`) changes; a
/// file that does not exist is not watched, or cargo would rerun the script on every build.
fn watch(workspace: &Path, path: &str) {
    let path = workspace.join(path);
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

fn build_ebpf() -> anyhow::Result<()> {
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
