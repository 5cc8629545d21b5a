//! `cargo xtask deb`: the Debian package, `target/debian/tcpmgm_VERSION_amd64.deb`.
//!
//! cargo-deb (installed when missing) assembles it from `[package.metadata.deb]` in
//! tcpmgm-user's Cargo.toml, which lists every file and the maintainer scripts of `debian/`.
//! xtask builds what goes in first: the release binary (the eBPF object is embedded in it) and,
//! from the same command-line definition, its man pages and shell completions (tcpmgm-user's
//! `package-docs` example: xtask does not depend on tcpmgm-user, see main.rs). cargo-deb
//! then runs with `--no-build`: on its own it would build the whole workspace to find the
//! generated files, the eBPF crate included, which does not build for the host.
//!
//! The package must install on Debian 12: the binary may need no glibc symbol newer than
//! bookworm's 2.36 (checked here with objdump), and `Depends:` comes from dpkg-shlibdeps. The
//! package is then checked with lintian, which must report no error.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{cargo, output, status};

const CARGO_DEB_VERSION: &str = "3.8.0";
/// Debian 12's glibc: the newest symbol version the binary may use.
const GLIBC_MAX: (u32, u32) = (2, 36);

/// The optimised build of `tcpmgm` and of the package's docs generator, as one cargo run (so
/// that a later one finds it done, whichever it is): `target/release`.
pub fn release_build(root: &Path) -> anyhow::Result<PathBuf> {
    status(cargo(root).args([
        "build",
        "--release",
        "--package",
        "tcpmgm-user",
        "--bin",
        "tcpmgm",
        "--example",
        "package-docs",
    ]))?;
    Ok(root.join("target/release"))
}

/// Builds the package and checks it; returns its path. `revision` overrides the Debian revision
/// (the VM's upgrade test builds a second, newer package).
pub fn build(root: &Path, revision: Option<&str>) -> anyhow::Result<PathBuf> {
    crate::setup::toolchain()?;
    tools()?;
    let release = release_build(root)?;
    glibc_versions(&release.join("tcpmgm"))?;
    let docs = release.join("package-docs");
    if docs.exists() {
        std::fs::remove_dir_all(&docs)?;
    }
    status(Command::new(release.join("examples/package-docs")).arg(&docs))?;
    let out = cargo(root)
        .args(["deb", "--package", "tcpmgm-user", "--no-build"])
        .args(revision.map(|r| format!("--deb-revision={r}")))
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cargo deb")?;
    if !out.status.success() {
        bail!("cargo deb failed ({})", out.status);
    }
    let deb = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .context("cargo deb named no .deb")?;
    eprintln!("xtask: built {}", deb.display());
    Ok(deb)
}

/// lintian on the package: its findings are printed, and any error fails.
pub fn lintian(deb: &Path) -> anyhow::Result<()> {
    status(
        Command::new("lintian")
            .args([
                "--fail-on",
                "error",
                "--display-info",
                "--tag-display-limit",
                "0",
            ])
            .arg(deb),
    )
    .context("lintian reports errors")?;
    eprintln!("xtask: lintian reports no error on {}", deb.display());
    Ok(())
}

/// cargo-deb, and the Debian tools it and the checks call.
fn tools() -> anyhow::Result<()> {
    crate::setup::tools(&[
        ("dpkg-shlibdeps", "dpkg-dev"),
        ("objdump", "binutils"),
        ("lintian", "lintian"),
    ])?;
    if !output(cargo(Path::new(".")).args(["deb", "--version"])).contains(CARGO_DEB_VERSION) {
        eprintln!("xtask: installing cargo-deb {CARGO_DEB_VERSION}");
        status(Command::new("cargo").args([
            "install",
            "cargo-deb",
            "--version",
            CARGO_DEB_VERSION,
            "--locked",
        ]))?;
    }
    Ok(())
}

/// Fails when `binary` needs a glibc symbol newer than Debian 12 has.
fn glibc_versions(binary: &Path) -> anyhow::Result<()> {
    let symbols = output(Command::new("objdump").arg("-T").arg(binary));
    let newest = symbols
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
        })
        .max()
        .context("objdump -T lists no GLIBC_ symbol version")?;
    if newest > GLIBC_MAX {
        bail!(
            "{} needs GLIBC_{}.{}, newer than Debian 12's {}.{}",
            binary.display(),
            newest.0,
            newest.1,
            GLIBC_MAX.0,
            GLIBC_MAX.1
        );
    }
    eprintln!(
        "xtask: {} needs glibc {}.{} at most (Debian 12 has {}.{})",
        binary.display(),
        newest.0,
        newest.1,
        GLIBC_MAX.0,
        GLIBC_MAX.1
    );
    Ok(())
}
