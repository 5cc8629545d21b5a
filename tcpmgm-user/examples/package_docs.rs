//! The man pages and shell completions of the Debian package, generated from the command line's
//! definition (`tcpmgm::cli::command`) so that they never drift from `--help`. `cargo xtask deb`
//! runs it with the directory to write to:
//!
//!     man/tcpmgm.8.gz, man/tcpmgm-run.8.gz, ...  one page per command, gzip -9 without a name
//!                                                or timestamp (Debian policy; reproducible)
//!     completions/tcpmgm.bash, _tcpmgm, tcpmgm.fish
use std::io::Write as _;
use std::path::{Path, PathBuf};

use clap_complete::Shell;
use flate2::{Compression, GzBuilder};

/// The exit statuses every command may end with; `man tcpmgm` lists them (sysexits.h values).
const EXIT_STATUS: [(&str, &str); 7] = [
    ("0", "Success."),
    ("1", "Any other failure."),
    (
        "64",
        "Usage error: an unknown option, a missing or malformed argument.",
    ),
    ("65", "Bad table data: a row of the rule table is invalid."),
    ("69", "The rule database is unavailable."),
    (
        "77",
        "Missing privileges (root, or the capabilities the unit grants).",
    ),
    (
        "78",
        "Bad configuration: the configuration file or opensips.cfg cannot be used.",
    ),
];

fn main() -> std::io::Result<()> {
    let out = PathBuf::from(std::env::args_os().nth(1).expect("usage: package-docs DIR"));
    let mut cmd = tcpmgm::cli::command().disable_help_subcommand(true);
    cmd.build();
    let man = out.join("man");
    std::fs::create_dir_all(&man)?;
    pages(&cmd, &man, true)?;
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "tcpmgm", &completions)?;
    }
    Ok(())
}

/// The page of `cmd` and of each of its subcommands, in section 8 (daemons and system
/// administration). `top` adds the exit statuses, which hold for every command.
fn pages(cmd: &clap::Command, dir: &Path, top: bool) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages(sub, dir, false)?;
    }
    let page = clap_mangen::Man::new(cmd.clone()).section("8");
    // clap_mangen's sections, with the exit statuses before VERSION.
    let mut roff = Vec::new();
    page.render_title(&mut roff)?;
    page.render_name_section(&mut roff)?;
    page.render_synopsis_section(&mut roff)?;
    page.render_description_section(&mut roff)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        page.render_options_section(&mut roff)?;
    }
    if cmd.has_subcommands() {
        page.render_subcommands_section(&mut roff)?;
    }
    if cmd.get_after_help().is_some() || cmd.get_after_long_help().is_some() {
        page.render_extra_section(&mut roff)?;
    }
    if top {
        roff.extend_from_slice(exit_status().as_bytes());
    }
    if cmd.get_version().is_some() {
        page.render_version_section(&mut roff)?;
    }
    let file = std::fs::File::create(dir.join(format!("{}.gz", page.get_filename())))?;
    let mut gz = GzBuilder::new().mtime(0).write(file, Compression::best());
    gz.write_all(&roff)?;
    gz.finish()?.sync_all()
}

fn exit_status() -> String {
    // The meanings are plain text: no backslash or leading dot for roff to read as a request.
    let mut roff = String::from(".SH \"EXIT STATUS\"\n");
    for (code, meaning) in EXIT_STATUS {
        roff.push_str(&format!(".TP\n\\fB{code}\\fR\n{meaning}\n"));
    }
    roff
}
