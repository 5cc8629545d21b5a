//! The control socket: a root-only unix socket (directory 0700, socket 0600) that takes one
//! request a connection, `reload` or `detach`, and answers `ok <report>` or `error <reason>`
//! (which may span lines). Each connection is served by a task of its own, and a client that
//! sends nothing is dropped after `READ_TIMEOUT`.
//!
//! What a client can cost the daemon is bounded, since a stuck or hostile client must not stop
//! the next `reload`: a request is read through a reader that stops at `MAX_REQUEST` bytes and
//! is never echoed back whole; at most `MAX_CONNECTIONS` are served at once; and when accept()
//! fails (at the open-file limit, typically) the serve loop backs off instead of spinning, and
//! logs the failures at a bounded rate.
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::DaemonError;
use super::request::Request as ReloaderRequest;

/// How long a client has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest request line, its newline included. A request is one short word, so this is
/// generous; more is refused without being read.
pub const MAX_REQUEST: usize = 4096;

/// Connections served at once. Beyond it a connection is accepted, told `error busy` and
/// closed at once, rather than left unaccepted: a client left in the listen backlog would wait
/// with no word of why (as if the daemon hung), while the answer costs one fd for one
/// non-blocking write. Each served connection holds an fd for at most `READ_TIMEOUT` plus its
/// reload, so 64 leave the rest of a 1024-fd limit to the daemon's maps, links and database.
pub const MAX_CONNECTIONS: usize = 64;

/// How much of an unknown request an error quotes.
const QUOTED: usize = 100;

/// The first wait after accept() failed; it doubles while accept() keeps failing.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line about failing accept() per this long.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// A request of the control protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// `reload`, or `reload full`: the whole table read, whatever its change log says.
    Reload {
        full: bool,
    },
    Detach,
}

/// Why a request was refused. The reason never holds more than `QUOTED` characters of what
/// the client sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("no request (expected: reload, reload full, detach)")]
    Empty,
    #[error("request longer than {MAX_REQUEST} bytes (expected: reload, reload full, detach)")]
    TooLong,
    #[error("the request is not UTF-8 (expected: reload, reload full, detach)")]
    NotUtf8,
    #[error("unknown request '{0}' (expected: reload, reload full, detach)")]
    Unknown(String),
}

/// Parses one request line as read from a client: the bytes up to and including the newline,
/// or up to the end of the stream when the client sent none.
pub fn parse_request(line: &[u8]) -> Result<Request, ProtocolError> {
    if line.len() > MAX_REQUEST {
        return Err(ProtocolError::TooLong);
    }
    let text = std::str::from_utf8(line).map_err(|_| ProtocolError::NotUtf8)?;
    match text.trim() {
        "" => Err(ProtocolError::Empty),
        "reload" => Ok(Request::Reload { full: false }),
        "reload full" => Ok(Request::Reload { full: true }),
        "detach" => Ok(Request::Detach),
        other => Err(ProtocolError::Unknown(quote(other))),
    }
}

/// At most `QUOTED` characters of `s`, control characters escaped so that the reply stays
/// one line and prints safely.
fn quote(s: &str) -> String {
    let mut quoted: String = s
        .chars()
        .take(QUOTED)
        .flat_map(char::escape_debug)
        .collect();
    if s.chars().nth(QUOTED).is_some() {
        quoted.push_str("...");
    }
    quoted
}

pub(super) fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    let fail = |source| DaemonError::Control {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
        if dir == Path::new(crate::system::CONTROL_DIR) {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
        }
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(fail(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another tcpmgm run answers there (one daemon per cgroup)",
        )));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    Ok(listener)
}

/// The listening socket with its limits: the connection cap and the backoff after failures.
pub(super) struct Acceptor {
    listener: UnixListener,
    slots: Arc<Semaphore>,
    failures: Failures,
    /// While accept() fails: when to try again.
    resume_at: Option<Instant>,
}

impl Acceptor {
    pub(super) fn new(listener: UnixListener) -> Acceptor {
        Acceptor {
            listener,
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            failures: Failures::default(),
            resume_at: None,
        }
    }

    /// The next connection to serve, with its slot (held until it is served). Cancel-safe, for
    /// the serve loop's select: a backoff under way is kept in `resume_at`.
    pub(super) async fn next(&mut self) -> (UnixStream, OwnedSemaphorePermit) {
        loop {
            if let Some(at) = self.resume_at {
                tokio::time::sleep_until(at).await;
                self.resume_at = None;
            }
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    self.failures.succeeded();
                    match self.slots.clone().try_acquire_owned() {
                        Ok(slot) => return (stream, slot),
                        Err(_) => busy(stream),
                    }
                }
                Err(e) => {
                    let now = Instant::now();
                    let (wait, report) = self.failures.failed(now.into_std());
                    if let Some(suppressed) = report {
                        tracing::warn!(
                            "control socket: accept failed: {e}{}; retrying after {wait:?} \
                             (at most one such line per {LOG_EVERY:?})",
                            if suppressed > 0 {
                                format!(" ({suppressed} more failures since the last report)")
                            } else {
                                String::new()
                            }
                        );
                    }
                    self.resume_at = Some(now + wait);
                }
            }
        }
    }
}

/// Tells a client beyond the cap why it is turned away, without waiting: the socket is fresh,
/// so one short non-blocking write fits its buffer (and if not, the close says enough).
fn busy(stream: UnixStream) {
    if let Ok(stream) = stream.into_std() {
        let _ = (&stream).write_all(
            format!("error busy: {MAX_CONNECTIONS} control connections are open; try again\n")
                .as_bytes(),
        );
    }
}

/// accept()'s failures in a row: how long to wait before the next try, and when to log.
#[derive(Debug, Default)]
struct Failures {
    /// The wait after the last failure; zero after a success.
    wait: Duration,
    /// When the last line was logged.
    logged_at: Option<std::time::Instant>,
    /// Failures since then, not logged.
    suppressed: u64,
}

impl Failures {
    /// One more failure at `now`: the wait before the next try, and Some(failures not logged
    /// since the last line) when this one is to be logged.
    fn failed(&mut self, now: std::time::Instant) -> (Duration, Option<u64>) {
        self.wait = if self.wait.is_zero() {
            BACKOFF_FIRST
        } else {
            (self.wait * 2).min(BACKOFF_MAX)
        };
        let due = self
            .logged_at
            .is_none_or(|at| now.saturating_duration_since(at) >= LOG_EVERY);
        if due {
            self.logged_at = Some(now);
            (self.wait, Some(std::mem::take(&mut self.suppressed)))
        } else {
            self.suppressed += 1;
            (self.wait, None)
        }
    }

    /// accept() worked: the next failure waits the shortest time again. The log's rate limit
    /// stays, so failures alternating with successes do not flood it either.
    fn succeeded(&mut self) {
        self.wait = Duration::ZERO;
    }
}

/// Reads one request line, never more than `MAX_REQUEST + 1` bytes (one more than allowed,
/// so that `parse_request` can tell a line that is too long).
async fn read_request(read: impl AsyncRead + Unpin) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    BufReader::new(read.take(MAX_REQUEST as u64 + 1))
        .read_until(b'\n', &mut line)
        .await?;
    Ok(line)
}

/// Serves one connection: a reload waits for the reloader's answer; a detach tells the serve
/// loop. `_slot` is the connection's place under `MAX_CONNECTIONS`, given back when it ends.
pub(super) async fn answer(
    stream: UnixStream,
    _slot: OwnedSemaphorePermit,
    requests: mpsc::UnboundedSender<ReloaderRequest>,
    detach: mpsc::Sender<()>,
) {
    let (read, mut write) = stream.into_split();
    let line = match tokio::time::timeout(READ_TIMEOUT, read_request(read)).await {
        Ok(Ok(line)) => line,
        Ok(Err(_)) => return,
        Err(_) => {
            let _ = write
                .write_all(format!("error no request within {READ_TIMEOUT:?}\n").as_bytes())
                .await;
            return;
        }
    };
    let reply = match parse_request(&line) {
        Ok(Request::Reload { full }) => {
            let (tx, rx) = oneshot::channel();
            let _ = requests.send(ReloaderRequest::Reload {
                reply: Some(tx),
                automatic: false,
                full,
                rows: None,
            });
            match rx.await {
                Ok(Ok(report)) => format!("ok {report}\n"),
                Ok(Err(e)) => format!("error {e}\n"),
                Err(_) => "error the daemon is stopping\n".to_owned(),
            }
        }
        Ok(Request::Detach) => {
            let _ = detach.send(()).await;
            "ok detaching\n".to_owned()
        }
        Err(e) => format!("error {e}\n"),
    };
    let _ = write.write_all(reply.as_bytes()).await;
}

/// Sends one request to the daemon at `control`: Ok(report) or Err(reason).
pub async fn request(control: &Path, what: &str) -> Result<String, String> {
    let mut stream = UnixStream::connect(control)
        .await
        .map_err(|e| format!("no tcpmgm run answers on {}: {e}", control.display()))?;
    stream
        .write_all(format!("{what}\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut reply)
        .await
        .map_err(|e| e.to_string())?;
    match reply.strip_prefix("ok ") {
        Some(report) => Ok(report.trim_end().to_owned()),
        None => Err(reply
            .strip_prefix("error ")
            .unwrap_or(&reply)
            .trim_end()
            .to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_word_with_or_without_a_newline() {
        assert_eq!(
            parse_request(b"reload\n"),
            Ok(Request::Reload { full: false })
        );
        assert_eq!(parse_request(b"detach"), Ok(Request::Detach));
        assert_eq!(
            parse_request(b"  reload \r\n"),
            Ok(Request::Reload { full: false })
        );
        assert_eq!(parse_request(b""), Err(ProtocolError::Empty));
        assert_eq!(parse_request(b"\n"), Err(ProtocolError::Empty));
        assert_eq!(
            parse_request(b"RELOAD\n"),
            Err(ProtocolError::Unknown("RELOAD".into()))
        );
        assert_eq!(parse_request(b"\xff\xfe\n"), Err(ProtocolError::NotUtf8));
    }

    #[test]
    fn a_line_over_the_limit_is_refused_whatever_it_holds() {
        let mut line = vec![b' '; MAX_REQUEST - "reload\n".len()];
        line.extend_from_slice(b"reload\n");
        assert_eq!(parse_request(&line), Ok(Request::Reload { full: false }));
        line.insert(0, b' ');
        assert_eq!(parse_request(&line), Err(ProtocolError::TooLong));
    }

    #[test]
    fn an_unknown_request_is_quoted_short_and_on_one_line() {
        let long = format!("{}\n", "é".repeat(MAX_REQUEST / 4));
        let reason = parse_request(long.as_bytes()).unwrap_err().to_string();
        assert_eq!(
            reason,
            format!(
                "unknown request '{}...' (expected: reload, reload full, detach)",
                "é".repeat(QUOTED)
            )
        );
        let reason = parse_request(b"re\rlo\x1bad\n").unwrap_err().to_string();
        assert_eq!(
            reason,
            "unknown request 're\\rlo\\u{1b}ad' (expected: reload, reload full, detach)"
        );
    }

    #[tokio::test]
    async fn the_reader_stops_one_byte_past_the_limit() {
        let sent = vec![b'x'; 10 * MAX_REQUEST];
        let line = read_request(&sent[..]).await.unwrap();
        assert_eq!(line.len(), MAX_REQUEST + 1);
        let line = read_request(&b"reload\nmore"[..]).await.unwrap();
        assert_eq!(line, b"reload\n");
    }

    #[test]
    fn accept_failures_back_off_to_a_second_and_log_once_per_period() {
        let start = std::time::Instant::now();
        let mut f = Failures::default();
        let waits: Vec<_> = (0..6).map(|i| f.failed(start + BACKOFF_MAX * i)).collect();
        let ms: Vec<u128> = waits.iter().map(|(w, _)| w.as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000]);
        // Only the first of these six (5 s) is logged.
        let logged: Vec<_> = waits.iter().map(|(_, l)| *l).collect();
        assert_eq!(logged, [Some(0), None, None, None, None, None]);
        // The next line, a period after the first, counts the five left out.
        assert_eq!(f.failed(start + LOG_EVERY), (BACKOFF_MAX, Some(5)));
        f.succeeded();
        assert_eq!(f.failed(start + LOG_EVERY).0, BACKOFF_FIRST);
    }
}
