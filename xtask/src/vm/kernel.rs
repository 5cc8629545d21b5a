//! Debian's own kernels for the test VM: the cloud flavour of bullseye (5.10), bookworm (6.1) and
//! trixie (6.12), fetched from the mirror this machine's apt already uses, through a private apt
//! configuration (the system's sources are not touched), and unpacked once under
//! `target/vm/kernels/<series>`.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{output, status};

/// A kernel series the VM boots, with the Debian suite that ships it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Series {
    pub name: &'static str,
    pub suite: &'static str,
    pub debian: &'static str,
}

pub const SERIES: [Series; 3] = [
    Series {
        name: "5.10",
        suite: "bullseye",
        debian: "Debian 11",
    },
    Series {
        name: "6.1",
        suite: "bookworm",
        debian: "Debian 12",
    },
    Series {
        name: "6.12",
        suite: "trixie",
        debian: "Debian 13",
    },
];

/// The modules the tests need that Debian builds as modules, in load order (busybox's insmod
/// resolves no dependencies): veth for the two-namespace tests, inet_diag and tcp_diag for
/// sock_diag (`tcpmgm conns`, con_lifetime), overlay for the command-line test that gives
/// `tcpmgm` a private /etc.
const MODULES: [&str; 4] = ["veth", "inet_diag", "tcp_diag", "overlay"];

/// An unpacked kernel: its image, its config, and the modules of `MODULES`, uncompressed.
pub struct Kernel {
    pub series: Series,
    /// `uname -r` of the kernel.
    pub release: String,
    pub vmlinuz: PathBuf,
    pub config: PathBuf,
    pub modules: Vec<PathBuf>,
    /// The whole modules tree (`lib/modules/<release>`), for a guest with a root filesystem.
    pub module_tree: PathBuf,
    /// The suite's own bpftool when it runs with this machine's libraries (a newer bpftool
    /// queries cgroups in ways Linux 5.10 refuses), else None (use the host's).
    pub bpftool: Option<PathBuf>,
}

pub fn series(name: &str) -> anyhow::Result<Vec<Series>> {
    if name == "all" {
        return Ok(SERIES.to_vec());
    }
    match SERIES.iter().find(|s| s.name == name) {
        Some(s) => Ok(vec![*s]),
        None => bail!(
            "no kernel {name}: choose one of {} or all",
            SERIES.map(|s| s.name).join(", ")
        ),
    }
}

/// The kernel of `series`, downloaded and unpacked on first use (or when `refresh`).
pub fn get(vm_dir: &Path, series: Series, refresh: bool) -> anyhow::Result<Kernel> {
    let dir = vm_dir.join("kernels").join(series.name);
    if refresh || !dir.join("release").exists() {
        fetch(vm_dir, series, &dir)?;
    }
    let release = std::fs::read_to_string(dir.join("release"))?
        .trim()
        .to_owned();
    let root = dir.join("root");
    let module_tree = [
        root.join("lib/modules").join(&release),
        root.join("usr/lib/modules").join(&release),
    ]
    .into_iter()
    .find(|p| p.exists())
    .with_context(|| format!("no modules of {release} in {}", root.display()))?;
    let modules: Vec<PathBuf> = MODULES
        .iter()
        .map(|m| dir.join("modules").join(format!("{m}.ko")))
        .collect();
    // A kernel unpacked before a module joined `MODULES`.
    if !modules.iter().all(|m| m.exists()) {
        unpack_modules(&root, &release, &dir.join("modules"))?;
    }
    let bpftool = dir.join("bpftool/usr/sbin/bpftool");
    let runs = Command::new(&bpftool)
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    Ok(Kernel {
        series,
        bpftool: runs.then_some(bpftool),
        vmlinuz: root.join("boot").join(format!("vmlinuz-{release}")),
        config: root.join("boot").join(format!("config-{release}")),
        release,
        modules,
        module_tree,
    })
}

/// Downloads the suite's current cloud kernel and unpacks it into `dir`.
fn fetch(vm_dir: &Path, series: Series, dir: &Path) -> anyhow::Result<()> {
    let apt = Apt::new(vm_dir, series.suite)?;
    apt.run("update", &[])?;
    // The metapackage depends on the suite's current kernel; its unsigned twin has the same
    // image without the secure-boot signature.
    let depends = output(
        apt.command("apt-cache")
            .args(["depends", "linux-image-cloud-amd64"]),
    );
    let signed = depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
        .with_context(|| {
            format!(
                "no kernel behind linux-image-cloud-amd64 in {}",
                series.suite
            )
        })?
        .to_owned();
    let package = format!("{signed}-unsigned");
    eprintln!(
        "xtask: fetching {package} ({} {})",
        series.debian, series.suite
    );
    let _ = std::fs::remove_dir_all(dir);
    let root = dir.join("root");
    apt.unpack(vm_dir, &package, &root)?;
    apt.unpack(vm_dir, "bpftool", &dir.join("bpftool"))?;
    let release = std::fs::read_dir(root.join("boot"))?
        .flatten()
        .find_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_owned)
        })
        .with_context(|| format!("no boot/vmlinuz-* in {package}"))?;
    unpack_modules(&root, &release, &dir.join("modules"))?;
    std::fs::write(dir.join("release"), &release)?;
    Ok(())
}

/// Copies `MODULES` out of the package, uncompressed (trixie ships them as `.ko.xz`).
fn unpack_modules(root: &Path, release: &str, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let tree = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|p| root.join(p).join(release))
        .find(|p| p.exists())
        .with_context(|| format!("no lib/modules/{release} in the package"))?;
    let mut found = Vec::new();
    walk(&tree, &mut |path| {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        for m in MODULES {
            for (suffix, compressed) in [(".ko", false), (".ko.xz", true)] {
                if name == format!("{m}{suffix}") {
                    found.push((m, path.to_path_buf(), compressed));
                }
            }
        }
    })?;
    for m in MODULES {
        let (_, path, compressed) = found
            .iter()
            .find(|(name, ..)| *name == m)
            .with_context(|| format!("module {m} is not in the {release} package"))?;
        let dest = out.join(format!("{m}.ko"));
        if *compressed {
            let data = Command::new("xz")
                .args(["-dc"])
                .arg(path)
                .output()
                .context("xz (package xz-utils)")?;
            if !data.status.success() {
                bail!("xz -dc {} failed", path.display());
            }
            std::fs::write(&dest, data.stdout)?;
        } else {
            std::fs::copy(path, &dest)?;
        }
    }
    Ok(())
}

pub(crate) fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk(&path, f)?;
        } else {
            f(&path);
        }
    }
    Ok(())
}

/// A private apt configuration for one Debian suite, with the mirror the system already uses.
pub struct Apt {
    options: Vec<String>,
}

impl Apt {
    pub fn new(vm_dir: &Path, suite: &str) -> anyhow::Result<Apt> {
        let dir = vm_dir.join("apt").join(suite);
        for sub in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let mirror = debian_mirror()?;
        let sources = dir.join("sources.list");
        std::fs::write(
            &sources,
            format!(
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} {suite} main\n"
            ),
        )?;
        let p = |s: &Path| s.display().to_string();
        Ok(Apt {
            options: vec![
                format!("Dir::Etc::sourcelist={}", p(&sources)),
                "Dir::Etc::sourceparts=/nonexistent".into(),
                format!("Dir::State::Lists={}", p(&dir.join("lists"))),
                format!("Dir::Cache={}", p(&dir.join("cache"))),
                "Dir::State::status=/dev/null".into(),
                // Downloads land in our own folders, which the _apt user cannot write.
                "APT::Sandbox::User=root".into(),
            ],
        })
    }

    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(crate::setup::APT_LOCK_WAIT);
        for o in &self.options {
            cmd.args(["-o", o]);
        }
        cmd
    }

    pub fn run(&self, verb: &str, args: &[&str]) -> anyhow::Result<()> {
        status(self.command("apt-get").args([verb, "-qq"]).args(args))
    }

    /// Downloads `package` (into `vm_dir/debs`) and unpacks it into `into`.
    pub fn unpack(&self, vm_dir: &Path, package: &str, into: &Path) -> anyhow::Result<()> {
        let debs = vm_dir.join("debs");
        std::fs::create_dir_all(&debs)?;
        let mut download = self.command("apt-get");
        download
            .args(["download", "-qq", package])
            .current_dir(&debs);
        status(&mut download)?;
        let deb = std::fs::read_dir(&debs)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")))
            })
            .max()
            .with_context(|| format!("apt-get download left no {package}_*.deb"))?;
        std::fs::create_dir_all(into)?;
        status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(into))
    }
}

/// The Debian mirror of this machine's apt sources (deb822 `.sources` or one-line
/// `sources.list`), so that no host is written into the project.
pub fn debian_mirror() -> anyhow::Result<String> {
    let mut candidates = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/etc/apt/sources.list") {
        for line in text.lines() {
            let words: Vec<&str> = line
                .split_whitespace()
                .filter(|w| !w.starts_with('['))
                .collect();
            if let ["deb", uri, suite, ..] = words.as_slice() {
                candidates.push((uri.to_string(), suite.to_string()));
            }
        }
    }
    for entry in std::fs::read_dir("/etc/apt/sources.list.d")
        .into_iter()
        .flatten()
    {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("sources") {
            continue;
        }
        for stanza in std::fs::read_to_string(&path)?.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_owned())
            };
            if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) {
                for uri in uris.split_whitespace() {
                    for suite in suites.split_whitespace() {
                        candidates.push((uri.to_owned(), suite.to_owned()));
                    }
                }
            }
        }
    }
    candidates
        .into_iter()
        .find(|(uri, suite)| !suite.contains('-') && !uri.contains("security"))
        .map(|(uri, _)| uri)
        .context("no Debian mirror in /etc/apt/sources.list or /etc/apt/sources.list.d/*.sources")
}
