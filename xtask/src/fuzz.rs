//! `cargo xtask fuzz`: every fuzz target of `fuzz/` (cargo-fuzz, libFuzzer) for a while each.
//!
//! A target starts from its seeds in `fuzz/corpus/TARGET` (committed) and from what earlier runs
//! found in `fuzz/target/corpus/TARGET` (not committed), where libFuzzer writes the inputs it
//! finds: the seed directory stays as committed. A crash leaves its input in
//! `fuzz/artifacts/TARGET/`, and the run fails naming the target and that file; every target
//! runs even when one crashed, so one run shows every crash.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

use anyhow::{Context as _, bail};

use crate::{on_path, output, status};

/// The fuzz targets, as `fuzz/Cargo.toml` names them.
pub const TARGETS: [&str; 6] = [
    "row",
    "opensips_cfg",
    "listener",
    "config",
    "control",
    "diag",
];

/// Runs `targets` (all when empty) for `seconds` each, built unoptimised when `dev`.
pub fn run(root: &Path, seconds: u64, dev: bool, targets: &[String]) -> anyhow::Result<()> {
    let targets: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("no fuzz target {t} (there are: {})", TARGETS.join(", "));
            }
        }
        targets.iter().map(String::as_str).collect()
    };
    cargo_fuzz()?;
    let fuzz = root.join("fuzz");
    // Build and run take the same profile, or each run would build again.
    let profile: &[&str] = if dev { &["--dev"] } else { &[] };
    // One build for all of them; each run below finds it done.
    status(nightly_fuzz(&fuzz).arg("build").args(profile))?;
    let mut crashed = Vec::new();
    for target in targets {
        let found = fuzz.join("target/corpus").join(target);
        std::fs::create_dir_all(&found)?;
        let log = fuzz.join("target").join(format!("fuzz-{target}.log"));
        let started = SystemTime::now();
        eprintln!(
            "xtask: fuzzing {target} for {seconds} s (log: {})",
            log.display()
        );
        let st = nightly_fuzz(&fuzz)
            .args(["run", target])
            .args(profile)
            .arg(&found)
            .arg(fuzz.join("corpus").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .status()
            .with_context(|| format!("running cargo fuzz run {target}"))?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if st.success() {
            let done = text
                .lines()
                .rfind(|l| l.starts_with("Done "))
                .unwrap_or("(no summary from libFuzzer)");
            eprintln!("xtask: fuzz {target}: ok, {done}");
            continue;
        }
        // The panic (or sanitizer report) and libFuzzer's summary, not the thousands of lines
        // of progress before them.
        let lines: Vec<&str> = text.lines().collect();
        let cause = lines
            .iter()
            .position(|l| l.contains("panicked at") || l.contains("ERROR: "))
            .unwrap_or(lines.len().saturating_sub(20));
        for line in lines[cause..].iter().take(20) {
            eprintln!("  {line}");
        }
        let artifacts = new_artifacts(&fuzz.join("artifacts").join(target), started);
        let artifact = match artifacts.as_slice() {
            [] => format!("no crash artifact ({st}; see {})", log.display()),
            found => found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        };
        eprintln!("xtask: fuzz {target}: CRASHED: {artifact}");
        crashed.push(format!(
            "{target}: {artifact} (again: rustup run nightly cargo fuzz run {target} ARTIFACT, in fuzz/)"
        ));
    }
    if !crashed.is_empty() {
        bail!("fuzz targets crashed:\n{}", crashed.join("\n"));
    }
    Ok(())
}

/// `cargo fuzz` on the preinstalled nightly toolchain (libFuzzer's instrumentation needs
/// nightly flags), in `fuzz/`.
fn nightly_fuzz(fuzz: &Path) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz"])
        .current_dir(fuzz);
    cmd
}

/// Installs cargo-fuzz when it is missing.
fn cargo_fuzz() -> anyhow::Result<()> {
    if output(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])).is_empty() {
        bail!(
            "the `nightly` toolchain is missing: cargo fuzz needs it \
             (rustup toolchain install nightly)"
        );
    }
    if !on_path("cargo-fuzz") {
        eprintln!("xtask: installing cargo-fuzz");
        status(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

/// The files libFuzzer left in `dir` since `since`: the crashing inputs of this run.
fn new_artifacts(dir: &Path, since: SystemTime) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= since)
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}
