//! The log on stderr, as a terminal, journald and log shippers read it.
//!
//! On a terminal: colour and timestamps. Anywhere else (under systemd, into a pipe or a file),
//! or when `JOURNAL_STREAM` says systemd connected stderr to the journal: no colour and no
//! timestamps (journald stamps each entry itself), and every line starts with its syslog
//! priority, `<3>` (error) to `<7>` (debug). journald reads that prefix on a service's stderr
//! (`SyslogLevelPrefix=`, on by default), strips it and files the line at that priority, so
//! `journalctl -u tcpmgm -p warning` shows the warnings and errors alone. The prefix rather
//! than journald's native protocol (tracing-journald): it rides on the stderr systemd already
//! gives every service, so the unit's sandbox needs nothing more, the log and the final error
//! stay one stream in the order they were written, and any other supervisor that reads stderr
//! gets the same lines.
//!
//! `--log-format json` writes one JSON object a line (timestamp, level, target, fields) for log
//! shippers. It carries the priority prefix only when stderr is the journal itself (its device
//! and inode are those `JOURNAL_STREAM` names): journald strips the prefix, so each entry's
//! message is still plain JSON, and a shipper reading a pipe gets plain JSON too.
use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::sync::OnceLock;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// How lines go to stderr, decided once from what stderr is.
#[derive(Clone, Copy, Debug)]
struct Style {
    format: LogFormat,
    /// Colour and timestamps.
    terminal: bool,
    /// Each line starts with `<N>`.
    priorities: bool,
}

/// The style `init` chose, for the lines written outside the log (`error`).
static STYLE: OnceLock<Style> = OnceLock::new();

impl Style {
    fn of_stderr(format: LogFormat) -> Style {
        let terminal =
            std::io::stderr().is_terminal() && std::env::var_os("JOURNAL_STREAM").is_none();
        let priorities = match format {
            LogFormat::Text => !terminal,
            LogFormat::Json => stderr_is_the_journal(),
        };
        Style {
            format,
            terminal,
            priorities,
        }
    }
}

/// Whether stderr is the journal's stream that systemd names in `JOURNAL_STREAM` (as
/// `DEVICE:INODE`), rather than a descriptor that only inherited the variable.
fn stderr_is_the_journal() -> bool {
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::MetadataExt as _;
    let Some(named) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = named.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(stderr) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(stderr)
        .metadata()
        .is_ok_and(|m| device == m.dev().to_string() && inode == m.ino().to_string())
}

/// The syslog priority of a level (syslog(3): LOG_ERR 3, LOG_WARNING 4, LOG_INFO 6,
/// LOG_DEBUG 7).
fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// `text` with `<priority>` at the start of each of its lines: journald makes an entry of each
/// line, so a continuation line (a verifier's log, a list of bad rows) needs its own.
fn prefixed(priority: u8, text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4);
    for line in text.lines() {
        let _ = writeln!(out, "<{priority}>{line}");
    }
    out
}

/// An event formatter that puts the event's priority before each line `inner` writes.
struct Prefixed<F>(F);

impl<S, N, F> FormatEvent<S, N> for Prefixed<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut text = String::new();
        self.0.format_event(ctx, Writer::new(&mut text), event)?;
        writer.write_str(&prefixed(priority(*event.metadata().level()), &text))
    }
}

/// Starts the log: to stderr, at the level `RUST_LOG` sets (info by default), in `format` and
/// the style stderr calls for.
pub fn init(format: LogFormat) {
    let style = *STYLE.get_or_init(|| Style::of_stderr(format));
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(style.terminal);
    let text = tracing_subscriber::fmt::format();
    match (format, style.priorities) {
        (LogFormat::Text, false) => builder.init(),
        (LogFormat::Text, true) => builder
            .event_format(Prefixed(text.without_time().with_ansi(false)))
            .init(),
        (LogFormat::Json, false) => builder.json().init(),
        (LogFormat::Json, true) => builder.json().event_format(Prefixed(text.json())).init(),
    }
}

/// Writes the error a command ends with, as `tcpmgm: TEXT`, in the log's style: with the
/// error priority where log lines carry theirs, as a log event where the log is JSON.
pub fn error(text: &str) {
    let style = STYLE.get().copied();
    if style.is_some_and(|s| s.format == LogFormat::Json) {
        tracing::error!("{text}");
        return;
    }
    let line = format!("tcpmgm: {text}");
    if style
        .unwrap_or_else(|| Style::of_stderr(LogFormat::Text))
        .priorities
    {
        eprint!("{}", prefixed(priority(Level::ERROR), &line));
    } else {
        eprintln!("{line}");
    }
}

/// A usage error from clap: as clap prints it on a terminal; elsewhere without its colours,
/// each line with the error priority.
pub fn usage(e: &clap::Error) {
    if Style::of_stderr(LogFormat::Text).priorities {
        eprint!(
            "{}",
            prefixed(priority(Level::ERROR), &e.render().to_string())
        );
    } else {
        let _ = e.print();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_carries_the_priority() {
        assert_eq!(
            prefixed(4, "2 faults:\nid 1: proto\n"),
            "<4>2 faults:\n<4>id 1: proto\n"
        );
        assert_eq!(prefixed(3, "one"), "<3>one\n");
        assert_eq!(
            [
                Level::ERROR,
                Level::WARN,
                Level::INFO,
                Level::DEBUG,
                Level::TRACE
            ]
            .map(priority),
            [3, 4, 6, 7, 7]
        );
    }
}
