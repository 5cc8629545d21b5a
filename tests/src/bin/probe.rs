//! A test peer that joins a cgroup and a network namespace, then opens the connections it is
//! told on stdin and reports what a user would check on each socket.
//!
//! Input lines:
//! - `serve LISTEN`: listen on LISTEN (kept open; the kernel completes handshakes unaccepted).
//! - `pair LISTEN CONNECT [BIND] [ka]`: listen on LISTEN (kept open for later lines), connect to
//!   CONNECT from BIND, accept, and report both sockets. `ka`: the application itself turns
//!   SO_KEEPALIVE on, on the listening socket and on the client before connect().
//! - `profiles LISTEN CONNECT [BIND]`: open a pair, and report what tcpmgm's application API
//!   (`tcpmgm_common::client`) says of each socket, from the pins in `TCPMGM_TEST_PIN_DIR`.
//! - `hold-pair LISTEN CONNECT [BIND]`: open a pair and keep both sockets (`id=N`); `ping N`
//!   moves a byte each way on it; `closed N` tells which ends are no longer established;
//!   `opts N` reports both ends' options; `app-opts N KEEPALIVE IDLE` sets SO_KEEPALIVE and
//!   TCP_KEEPIDLE on both ends as an application would after connect() and accept(), then
//!   reports both ends' options.
//! - `connect CONNECT BIND|- WAIT_MS`: non-blocking connect, wait up to WAIT_MS, report.
//! - `hold CONNECT [USER_TIMEOUT_MS]`: connect (optionally setting TCP_USER_TIMEOUT itself),
//!   report, then read a line (the test cuts the network meanwhile), send data, wait 1 s and
//!   report whether the connection survived.
//!
//! - `dial CONNECT [USER_TIMEOUT_MS]`: connect (blocking) and keep the socket (`id=N`, or
//!   `errno=E`); `take LISTEN` accepts one connection on a listener of `serve` and keeps it
//!   (`id=N`). Kept sockets: `send N` writes 100 bytes, `close N` closes it, `abort N` closes it
//!   with SO_LINGER 0 (a reset), `state N` reports its TCP state.
//!
//! Output: one line per input line, `key=value` words.
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use clap::Parser;
use socket2::{Domain, Socket, Type};

#[derive(Parser)]
struct Args {
    /// Network namespace to join (a /var/run/netns path).
    #[arg(long)]
    netns: Option<String>,
    /// Cgroup directory to join.
    #[arg(long)]
    cgroup: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(cg) = &args.cgroup {
        std::fs::write(format!("{cg}/cgroup.procs"), std::process::id().to_string())?;
    }
    if let Some(ns) = &args.netns {
        // The probe has one thread: the whole process moves.
        tcpmgm::netns::enter(std::path::Path::new(ns))?;
    }
    let mut listeners: HashMap<SocketAddr, TcpListener> = HashMap::new();
    let mut held: Vec<(Socket, Socket)> = Vec::new();
    let mut accepted: Vec<Vec<std::net::TcpStream>> = Vec::new();
    let mut kept: Vec<Option<Socket>> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut out = std::io::stdout();
    while let Some(line) = lines.next() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            ["serve", listen] => {
                listen_on(&mut listeners, listen.parse()?, false)?;
                "listening=1".to_owned()
            }
            ["pair", listen, connect, rest @ ..] => {
                let bind = rest.iter().find_map(|w| w.parse::<SocketAddr>().ok());
                let ka = rest.contains(&"ka");
                pair(&mut listeners, listen.parse()?, connect.parse()?, bind, ka)?
            }
            ["profiles", listen, connect, rest @ ..] => {
                let bind = rest.first().map(|b| b.parse()).transpose()?;
                profiles(&mut listeners, listen.parse()?, connect.parse()?, bind)?
            }
            ["hold-pair", listen, connect, rest @ ..] => {
                let bind = rest.first().map(|b| b.parse()).transpose()?;
                listen_on(&mut listeners, listen.parse()?, false)?;
                let client = open(connect.parse()?, bind, false, None)?;
                let (server, _) = listeners[&listen.parse::<SocketAddr>()?].accept()?;
                held.push((client, Socket::from(server)));
                format!("id={}", held.len() - 1)
            }
            ["accept", listen, count] => {
                // Accepts and keeps `count` connections (for benchmarks that need many).
                let l = std::net::TcpListener::bind(listen.parse::<SocketAddr>()?)?;
                let mut kept = Vec::new();
                for _ in 0..count.parse::<usize>()? {
                    kept.push(l.accept()?.0);
                }
                let n = kept.len();
                accepted.push(kept);
                format!("accepted={n}")
            }
            ["ping", id] => {
                let (c, s) = &held[id.parse::<usize>()?];
                let mut b = [0u8; 1];
                let ok = (c.send(b"x").is_ok() && std::io::Read::read(&mut &*s, &mut b).is_ok())
                    && (s.send(b"y").is_ok() && std::io::Read::read(&mut &*c, &mut b).is_ok());
                format!("ok={}", u8::from(ok))
            }
            ["profile", id] => {
                let (c, _) = &held[id.parse::<usize>()?];
                let pins = std::env::var("TCPMGM_TEST_PIN_DIR")?;
                let api = tcpmgm_common::client::SocketRecords::open(std::path::Path::new(&pins))?;
                match api.profile(c)? {
                    None => "client_rule=0".to_owned(),
                    Some(p) => format!("client_profile={}", serde_json::to_string(&p)?),
                }
            }
            ["opts", id] => {
                let (c, s) = &held[id.parse::<usize>()?];
                format!("{} {}", report("client", c), report("server", s))
            }
            ["app-opts", id, keepalive, idle] => {
                // What a SIP server does with its own settings after accept() and connect().
                let (c, s) = &held[id.parse::<usize>()?];
                let (keepalive, idle) = (keepalive.parse::<i32>()?, idle.parse::<i32>()?);
                for sock in [c, s] {
                    setsockopt(sock, libc::SOL_SOCKET, libc::SO_KEEPALIVE, keepalive)?;
                    setsockopt(sock, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle)?;
                }
                format!("{} {}", report("client", c), report("server", s))
            }
            ["closed", id] => {
                let (c, s) = &held[id.parse::<usize>()?];
                format!(
                    "client_closed={} server_closed={}",
                    u8::from(tcp_state(c) != 1),
                    u8::from(tcp_state(s) != 1)
                )
            }
            // `count` connects to `connect` as fast as they go: how many were refused (EPERM)
            // and how many got through.
            ["storm", connect, count] => {
                let to: std::net::SocketAddr = connect.parse()?;
                let (mut refused, mut connected) = (0, 0);
                for _ in 0..count.parse::<usize>()? {
                    match std::net::TcpStream::connect(to) {
                        Ok(_) => connected += 1,
                        Err(e) if e.raw_os_error() == Some(libc::EPERM) => refused += 1,
                        Err(_) => {}
                    }
                }
                format!("refused={refused} connected={connected}")
            }
            ["connect", connect, bind, wait] => {
                connect_wait(connect.parse()?, parse_bind(bind)?, wait.parse()?)?
            }
            ["hold", connect, rest @ ..] => {
                let user_timeout = rest.first().map(|t| t.parse::<i32>()).transpose()?;
                let s = match open(connect.parse()?, None, false, user_timeout) {
                    Ok(s) => s,
                    Err(e) => {
                        writeln!(out, "errno={}", e.raw_os_error().unwrap_or(-1))?;
                        continue;
                    }
                };
                writeln!(out, "{}", report("client", &s))?;
                out.flush()?;
                let _ = lines.next();
                let _ = (&s).write_all(&[0u8; 100]);
                std::thread::sleep(Duration::from_millis(1000));
                format!(
                    "alive={} so_error={}",
                    tcp_state(&s) == 1,
                    s.take_error()?
                        .map_or(0, |e| e.raw_os_error().unwrap_or(-1))
                )
            }
            ["dial", connect, rest @ ..] => {
                let user_timeout = rest.first().map(|t| t.parse::<i32>()).transpose()?;
                match open(connect.parse()?, None, false, user_timeout) {
                    Ok(s) => {
                        kept.push(Some(s));
                        format!("id={}", kept.len() - 1)
                    }
                    Err(e) => format!("errno={}", e.raw_os_error().unwrap_or(-1)),
                }
            }
            ["take", listen] => {
                let (s, _) = listeners[&listen.parse::<SocketAddr>()?].accept()?;
                kept.push(Some(Socket::from(s)));
                format!("id={}", kept.len() - 1)
            }
            ["send", id] => {
                let s = kept[id.parse::<usize>()?].as_ref().expect("not closed");
                format!("sent={}", u8::from((&*s).write_all(&[0u8; 100]).is_ok()))
            }
            ["close", id] => {
                drop(kept[id.parse::<usize>()?].take());
                "closed=1".to_owned()
            }
            ["abort", id] => {
                let s = kept[id.parse::<usize>()?].take().expect("not closed");
                s.set_linger(Some(Duration::ZERO))?;
                drop(s);
                "aborted=1".to_owned()
            }
            ["state", id] => {
                let s = kept[id.parse::<usize>()?].as_ref().expect("not closed");
                format!("state={}", tcp_state(s))
            }
            _ => format!("bad_input=1 line={}", line.replace(' ', "_")),
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}

fn parse_bind(s: &str) -> anyhow::Result<Option<SocketAddr>> {
    Ok(if s == "-" { None } else { Some(s.parse()?) })
}

fn open(
    connect: SocketAddr,
    bind: Option<SocketAddr>,
    keepalive: bool,
    user_timeout_ms: Option<i32>,
) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(connect), Type::STREAM, None)?;
    if let Some(b) = bind {
        s.bind(&b.into())?;
    }
    s.set_keepalive(keepalive)?;
    if let Some(ms) = user_timeout_ms {
        s.set_tcp_user_timeout(Some(Duration::from_millis(ms as u64)))?;
    }
    s.connect(&connect.into())?;
    Ok(s)
}

fn listen_on(
    listeners: &mut HashMap<SocketAddr, TcpListener>,
    listen: SocketAddr,
    keepalive: bool,
) -> anyhow::Result<()> {
    if let std::collections::hash_map::Entry::Vacant(slot) = listeners.entry(listen) {
        let s = Socket::new(Domain::for_address(listen), Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        if listen.is_ipv6() {
            s.set_only_v6(false)?;
        }
        s.set_keepalive(keepalive)?;
        s.bind(&listen.into())?;
        s.listen(64)?;
        slot.insert(s.into());
    }
    Ok(())
}

fn pair(
    listeners: &mut HashMap<SocketAddr, TcpListener>,
    listen: SocketAddr,
    connect: SocketAddr,
    bind: Option<SocketAddr>,
    keepalive: bool,
) -> anyhow::Result<String> {
    listen_on(listeners, listen, keepalive)?;
    let client = match open(connect, bind, keepalive, None) {
        Ok(c) => c,
        Err(e) => return Ok(format!("errno={}", e.raw_os_error().unwrap_or(-1))),
    };
    let (server, _) = listeners[&listen].accept()?;
    let local = client.local_addr()?.as_socket().expect("inet");
    Ok(format!(
        "client_port={} {} {}",
        local.port(),
        report("client", &client),
        report("server", &Socket::from(server))
    ))
}

/// Opens a pair and reports what the application-side API says of both sockets.
fn profiles(
    listeners: &mut HashMap<SocketAddr, TcpListener>,
    listen: SocketAddr,
    connect: SocketAddr,
    bind: Option<SocketAddr>,
) -> anyhow::Result<String> {
    listen_on(listeners, listen, false)?;
    let client = open(connect, bind, false, None)?;
    let (server, _) = listeners[&listen].accept()?;
    let pins = std::env::var("TCPMGM_TEST_PIN_DIR")?;
    let api = tcpmgm_common::client::SocketRecords::open(std::path::Path::new(&pins))?;
    let mut out = Vec::new();
    for (side, profile) in [
        ("client", api.profile(&client)?),
        ("server", api.profile(&server)?),
    ] {
        match profile {
            None => out.push(format!("{side}_rule=0")),
            Some(p) => {
                let attrs: Vec<String> = p.attrs.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                out.push(format!(
                    "{side}_rule={} {side}_read_timeout={} {side}_send_threshold={} {side}_alias_mode={} {side}_idle={} {side}_attrs={}",
                    p.rule_id,
                    p.msg_read_timeout_s,
                    p.send_threshold_us,
                    p.alias_mode,
                    p.keepidle,
                    if attrs.is_empty() { "-".to_owned() } else { attrs.join(",") }
                ));
            }
        }
    }
    Ok(out.join(" "))
}

fn connect_wait(
    connect: SocketAddr,
    bind: Option<SocketAddr>,
    wait_ms: u64,
) -> anyhow::Result<String> {
    let s = Socket::new(Domain::for_address(connect), Type::STREAM, None)?;
    if let Some(b) = bind {
        s.bind(&b.into())?;
    }
    s.set_nonblocking(true)?;
    let start = Instant::now();
    match s.connect(&connect.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => {
            return Ok(format!(
                "errno={} ms={}",
                e.raw_os_error().unwrap_or(-1),
                start.elapsed().as_millis()
            ));
        }
    }
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, wait_ms as i32) };
    let ms = start.elapsed().as_millis();
    if n == 0 {
        return Ok(format!("pending=1 ms={ms}"));
    }
    match s.take_error()? {
        Some(e) => Ok(format!("errno={} ms={ms}", e.raw_os_error().unwrap_or(-1))),
        None => Ok(format!("connected ms={ms} {}", report("client", &s))),
    }
}

/// An int option, as an application sets it; an error is the test's failure.
fn setsockopt(s: &Socket, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: an int option from an int.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn getsockopt(s: &Socket, level: i32, name: i32) -> i32 {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int-sized option into an int.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 { v } else { -1 }
}

fn tcp_state(s: &Socket) -> u8 {
    // SAFETY: tcp_info is plain integers, for which all zeroes is a value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel fills at most `len` bytes of the tcp_info.
    unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    info.tcpi_state
}

fn report(side: &str, s: &Socket) -> String {
    let tcp = libc::IPPROTO_TCP;
    format!(
        "{side}_keepalive={} {side}_idle={} {side}_intvl={} {side}_cnt={} {side}_user_timeout={}",
        getsockopt(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE),
        getsockopt(s, tcp, libc::TCP_KEEPIDLE),
        getsockopt(s, tcp, libc::TCP_KEEPINTVL),
        getsockopt(s, tcp, libc::TCP_KEEPCNT),
        getsockopt(s, tcp, libc::TCP_USER_TIMEOUT),
    )
}
