//! The control socket: a root-only unix socket (directory 0700, socket 0600) that takes one
//! request a connection, `reload` or `detach`, and answers `ok <report>` or `error <reason>`
//! (which may span lines). Each connection is served by a task of its own, and a client that
//! sends nothing is dropped after `READ_TIMEOUT`.
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use super::DaemonError;
use super::reloader::Request;

/// How long a client has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

pub fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
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

/// Serves one connection: a reload waits for the reloader's answer; a detach tells the serve
/// loop.
pub async fn answer(
    stream: UnixStream,
    requests: mpsc::UnboundedSender<Request>,
    detach: mpsc::Sender<()>,
) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    match tokio::time::timeout(READ_TIMEOUT, BufReader::new(read).read_line(&mut line)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return,
        Err(_) => {
            let _ = write
                .write_all(format!("error no request within {READ_TIMEOUT:?}\n").as_bytes())
                .await;
            return;
        }
    }
    let reply = match line.trim() {
        "reload" => {
            let (tx, rx) = oneshot::channel();
            let _ = requests.send(Request::Reload {
                reply: Some(tx),
                automatic: false,
            });
            match rx.await {
                Ok(Ok(report)) => format!("ok {report}\n"),
                Ok(Err(e)) => format!("error {e}\n"),
                Err(_) => "error the daemon is stopping\n".to_owned(),
            }
        }
        "detach" => {
            let _ = detach.send(()).await;
            "ok detaching\n".to_owned()
        }
        other => format!("error unknown request '{other}' (expected: reload, detach)\n"),
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
