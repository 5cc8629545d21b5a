//! The test harness: each test gets a sandbox of its own (a child cgroup, a network namespace
//! and a bpffs pin directory) that is removed when it is dropped, failing test or not. Sockets
//! are opened by `tcpmgm-probe` processes that join the sandbox's cgroup and namespace, so tests
//! running in parallel never share a cgroup.
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use tcpmgm::kernel::Enforcer;
use tcpmgm::policy::compile::{Enforcement, Policy, compile_with};
use tcpmgm::policy::listener::Listeners;
use tcpmgm::policy::rule::{Cell, Row, Rule, validate_rows};
use tcpmgm::system;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs a command, panicking with its output when it fails.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the kernel tests load BPF programs and need root: run them with `cargo xtask test` as root"
    );
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "tcpmgm-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        sh(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip("link set lo up");
        ns
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &str) -> String {
        sh(Command::new("ip")
            .args(["-n", &self.name])
            .args(args.split_whitespace()))
    }

    /// Adds addresses to the namespace's loopback.
    pub fn add_local(&self, addrs: &[&str]) {
        for a in addrs {
            if a.contains(':') {
                self.ip(&format!("addr add {a}/128 dev lo nodad"));
            } else {
                self.ip(&format!("addr add {a}/32 dev lo"));
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// tcpmgm's programs, one per hook.
pub const PROGRAMS: [&str; 4] = [
    tcpmgm_common::names::SOCK_OPS,
    tcpmgm_common::names::CONNECT4,
    tcpmgm_common::names::CONNECT6,
    tcpmgm_common::names::SETSOCKOPT,
];

/// Asserts that a `bpftool cgroup show` listing holds exactly one tcpmgm program per hook.
pub fn assert_one_program_per_hook(listing: &str) {
    for p in PROGRAMS {
        assert_eq!(listing.matches(p).count(), 1, "{p}: {listing}");
    }
    assert_eq!(
        listing.matches("tcpmgm_").count(),
        PROGRAMS.len(),
        "{listing}"
    );
}

/// A cgroup, a network namespace and a pin directory of the test's own.
pub struct Sandbox {
    pub cgroup: PathBuf,
    pub netns: Netns,
    pub pin_dir: PathBuf,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    pub fn new() -> Sandbox {
        require_root();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("tcpmgm-test-{}-{n}", std::process::id());
        let cgroup = system::cgroup2_root().expect("cgroup2").join(&name);
        std::fs::create_dir(&cgroup).unwrap_or_else(|e| panic!("mkdir {}: {e}", cgroup.display()));
        let pin_dir = system::bpffs().expect("bpffs").join(&name);
        Sandbox {
            cgroup,
            netns: Netns::new("t"),
            pin_dir,
        }
    }

    /// Compiles and attaches rules to this sandbox's cgroup.
    pub fn enforce(&self, rules: Vec<Rule>, listeners: &Listeners) -> (Policy, Enforcer) {
        self.enforce_with(rules, listeners, Enforcement::default())
    }

    /// Compiles and attaches rules to this sandbox's cgroup, enforced as `enforcement` says.
    pub fn enforce_with(
        &self,
        rules: Vec<Rule>,
        listeners: &Listeners,
        enforcement: Enforcement,
    ) -> (Policy, Enforcer) {
        let hz = system::kernel_hz().expect("HZ");
        let policy = compile_with(rules, listeners, hz, enforcement).expect("compile");
        let enforcer = Enforcer::attach(&policy, &self.cgroup, &self.pin_dir).expect("attach");
        (policy, enforcer)
    }

    /// A probe inside this sandbox's cgroup and namespace (told the sandbox's pin directory).
    pub fn probe(&self) -> Probe {
        Probe::spawn_with_pins(Some(&self.cgroup), &self.netns.path(), Some(&self.pin_dir))
    }

    /// A probe in a child cgroup `name` of the sandbox's (made here, removed with the sandbox),
    /// in the sandbox's namespace.
    pub fn probe_in_child(&self, name: &str) -> Probe {
        let child = self.cgroup.join(name);
        std::fs::create_dir_all(&child)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", child.display()));
        Probe::spawn_with_pins(Some(&child), &self.netns.path(), Some(&self.pin_dir))
    }

    /// What `tcpmgm status` prints for the sandbox's cgroup, with its daemon's control socket
    /// `control`: its `--json` report, parsed.
    pub fn status_json(&self, control: &Path) -> serde_json::Value {
        serde_json::from_str(&self.status(control, true)).expect("status JSON")
    }

    /// What `tcpmgm status [--json]` prints for the sandbox's cgroup (see `status_json`).
    pub fn status(&self, control: &Path, json: bool) -> String {
        let mut cmd = Command::new(binary("tcpmgm"));
        cmd.arg("status");
        if json {
            cmd.arg("--json");
        }
        sh(cmd
            .arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--control")
            .arg(control))
    }

    /// What `tcpmgm conns --json` lists for the sandbox's cgroup (and those below it).
    pub fn conns(&self) -> serde_json::Value {
        let out = sh(Command::new(binary("tcpmgm"))
            .args(["conns", "--json", "--cgroup"])
            .arg(&self.cgroup)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--netns")
            .arg(self.netns.path()));
        serde_json::from_str(&out).expect("conns --json")
    }

    /// What `bpftool cgroup show` lists for the sandbox's cgroup.
    pub fn attached_programs(&self) -> String {
        sh(Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&self.cgroup))
    }
}

/// Namespace A (the sandbox's, in the cgroup) joined to namespace B by a veth pair. B owns
/// 192.0.2.2; 192.0.2.3 resolves to a MAC nobody has, so SYNs to it vanish. The same over IPv6:
/// 2001:db8:2::1, ::2 and the silent ::3. Returns B and A's veth device.
pub fn two_hosts(sb: &Sandbox) -> (Netns, String) {
    let b = Netns::new("b");
    let n = b.name.rsplit('-').next().unwrap().to_owned();
    let (va, vb) = (
        format!("tva{}x{n}", std::process::id() % 100_000),
        format!("tvb{n}"),
    );
    sb.netns.ip(&format!(
        "link add {va} type veth peer name {vb} netns {}",
        b.name
    ));
    sb.netns.ip(&format!("addr add 192.0.2.1/24 dev {va}"));
    sb.netns.ip(&format!("link set {va} up"));
    b.ip(&format!("addr add 192.0.2.2/24 dev {vb}"));
    b.ip(&format!("link set {vb} up"));
    sb.netns.ip(&format!(
        "neigh replace 192.0.2.3 lladdr 02:00:00:00:00:99 dev {va} nud permanent"
    ));
    // The same over IPv6 (no duplicate address detection, so the addresses serve at once).
    sb.netns
        .ip(&format!("-6 addr add 2001:db8:2::1/64 dev {va} nodad"));
    b.ip(&format!("-6 addr add 2001:db8:2::2/64 dev {vb} nodad"));
    sb.netns.ip(&format!(
        "-6 neigh replace 2001:db8:2::3 lladdr 02:00:00:00:00:99 dev {va} nud permanent"
    ));
    (b, va)
}

/// `ss -tnoe` in the sandbox's namespace, for the sockets with port `port` on either side.
pub fn ss(sb: &Sandbox, port: u16) -> String {
    sh(Command::new("nsenter")
        .arg(format!("--net={}", sb.netns.path()))
        .args(["ss", "-tnoe", "state", "established"])
        .arg(format!("( sport = :{port} or dport = :{port} )")))
}

/// GET /metrics from a daemon's metrics endpoint: the body.
pub fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).expect("the metrics endpoint");
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    body.to_owned()
}

/// The value of one sample of a scrape, by its name and labels as printed.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Asserts the value of each series of a scrape (names and labels as printed, e.g.
/// `tcpmgm_rules{cgroup="/sys/fs/cgroup/x"}`).
pub fn assert_samples(metrics: &str, expected: &[(String, f64)]) {
    for (series, value) in expected {
        assert_eq!(
            sample(metrics, series),
            Some(*value),
            "{series} in the scrape:\n{metrics}"
        );
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        // Processes that just exited may take a moment to leave the cgroup; child cgroups
        // (probe_in_child) go first.
        for _ in 0..50 {
            for child in std::fs::read_dir(&self.cgroup)
                .into_iter()
                .flatten()
                .flatten()
            {
                if child.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(child.path());
                }
            }
            if std::fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("could not remove {}", self.cgroup.display());
    }
}

/// The path of a binary of the same build (target/<profile>/NAME), from a test executable
/// (target/<profile>/deps/...) or from a binary beside it.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("target/<profile>");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target/<profile>/deps");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run the tests with `cargo xtask test`",
        path.display()
    );
    path
}

/// A running `tcpmgm-probe`; killed (by its pid) if still running when dropped.
pub struct Probe {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// One reply line of the probe, as key=value pairs.
#[derive(Debug, Clone)]
pub struct Reply(pub HashMap<String, String>);

impl Reply {
    pub fn get(&self, key: &str) -> i64 {
        self.0
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in {:?}", self.0))
            .parse()
            .unwrap_or_else(|_| panic!("{key} is not a number in {:?}", self.0))
    }

    pub fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// (keepalive, idle, intvl, cnt) of one side.
    pub fn keepalive(&self, side: &str) -> (i64, i64, i64, i64) {
        (
            self.get(&format!("{side}_keepalive")),
            self.get(&format!("{side}_idle")),
            self.get(&format!("{side}_intvl")),
            self.get(&format!("{side}_cnt")),
        )
    }
}

impl Probe {
    pub fn spawn(cgroup: Option<&Path>, netns: &str) -> Probe {
        Probe::spawn_with_pins(cgroup, netns, None)
    }

    fn spawn_with_pins(cgroup: Option<&Path>, netns: &str, pins: Option<&Path>) -> Probe {
        let mut cmd = Command::new(env_probe());
        if let Some(p) = pins {
            cmd.env("TCPMGM_TEST_PIN_DIR", p);
        }
        if let Some(cg) = cgroup {
            cmd.arg("--cgroup").arg(cg);
        }
        cmd.args(["--netns", netns]);
        Probe::start(cmd)
    }

    /// A probe started by `cmd` (which must run `tcpmgm-probe` with its stdin and stdout, e.g.
    /// through `systemd-run --pipe`).
    pub fn start(mut cmd: Command) -> Probe {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn probe");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Probe {
            child,
            stdin,
            stdout,
        }
    }

    /// Sends one line and reads one reply line.
    pub fn ask(&mut self, line: &str) -> Reply {
        writeln!(self.stdin, "{line}").expect("write to probe");
        self.stdin.flush().expect("flush");
        let mut reply = String::new();
        self.stdout.read_line(&mut reply).expect("read from probe");
        assert!(!reply.is_empty(), "the probe exited on '{line}'");
        let map = reply
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Reply(map)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn env_probe() -> PathBuf {
    binary("tcpmgm-probe")
}

/// A table row from (column, value) pairs; values that parse as integers become integers.
pub fn row(id: i64, cols: &[(&str, &str)]) -> Row {
    cols.iter()
        .fold(Row::default().with("id", Cell::Int(id)), |r, (c, v)| {
            r.with(
                c,
                v.parse::<i64>()
                    .map_or_else(|_| Cell::Text((*v).to_owned()), Cell::Int),
            )
        })
}

/// Validates rows, failing the test on any fault.
pub fn rules(rows: &[Row], listeners: &Listeners) -> Vec<Rule> {
    let (rules, errors) = validate_rows(rows, listeners);
    assert!(errors.is_empty(), "{errors:?}");
    rules
}

/// The outcome of comparing the kernel with the reference matcher over many connections.
#[derive(Debug, Default)]
pub struct Comparison {
    pub disagreements: Vec<String>,
    pub decisions: usize,
    pub refused: usize,
    pub unmatched: usize,
    /// Distinct rule ids that won a decision.
    pub winners: std::collections::BTreeSet<u32>,
}

impl Comparison {
    pub fn add(&mut self, other: Comparison) {
        self.disagreements.extend(other.disagreements);
        self.decisions += other.decisions;
        self.refused += other.refused;
        self.unmatched += other.unmatched;
        self.winners.extend(other.winners);
    }
}

/// What a socket should show: the winner's keepidle, or the system default without a rule.
/// The rule sets these tests compare give every rule keepalive=1 and its own keepidle.
pub fn idle_of(winner: Option<&Rule>) -> (i64, i64) {
    winner.map_or((0, 7200), |r| (1, i64::from(r.profile.keepidle)))
}

/// `rules` in the reference matcher's match order (`matcher::sort`), for `compare_with_reference`.
pub fn in_match_order(mut rules: Vec<Rule>) -> Vec<Rule> {
    tcpmgm::policy::matcher::sort(&mut rules);
    rules
}

/// Opens each (server, client bind) connection with `probe` and checks both sockets against the
/// reference matcher's decisions over `sorted` (the table's valid rules, `in_match_order`): EPERM where the
/// outbound winner has no_new_conn, otherwise each side's keepalive and keepidle.
pub fn compare_with_reference(
    probe: &mut Probe,
    listeners: &Listeners,
    sorted: &[Rule],
    pairs: &[(std::net::SocketAddr, std::net::SocketAddr)],
) -> Comparison {
    use tcpmgm::policy::listener::Direction;
    use tcpmgm::policy::matcher::first_match;
    let mut c = Comparison::default();
    for &(server, bind) in pairs {
        let reply = probe.ask(&format!("pair {server} {server} {bind}"));
        let out = first_match(
            sorted,
            &listeners.lookup(Direction::Outbound, server, Some(bind)),
        );
        c.decisions += 1;
        c.winners.extend(out.map(|r| r.id));
        if let Some(rule) = out.filter(|r| r.profile.no_new_conn) {
            c.refused += 1;
            if reply.0.get("errno").map(String::as_str) != Some("1") {
                c.disagreements.push(format!(
                    "{bind} -> {server}: expected EPERM (rule {}), got {reply:?}",
                    rule.id
                ));
            }
            continue;
        }
        if reply.has("errno") {
            c.disagreements.push(format!(
                "{bind} -> {server}: expected a connection (rule {:?}), got {reply:?}",
                out.map(|r| r.id)
            ));
            continue;
        }
        let client = std::net::SocketAddr::new(bind.ip(), reply.get("client_port") as u16);
        let inbound = first_match(
            sorted,
            &listeners.lookup(Direction::Inbound, client, Some(server)),
        );
        c.decisions += 1;
        c.winners.extend(inbound.map(|r| r.id));
        c.unmatched += usize::from(out.is_none()) + usize::from(inbound.is_none());
        for (side, winner) in [("client", out), ("server", inbound)] {
            let got = (
                reply.get(&format!("{side}_keepalive")),
                reply.get(&format!("{side}_idle")),
            );
            let want = idle_of(winner);
            if got != want {
                c.disagreements.push(format!(
                    "{bind} -> {server} {side}: kernel (keepalive, idle) {got:?}, reference {want:?} (rule {:?})",
                    winner.map(|r| r.id)
                ));
            }
        }
    }
    c
}

/// A `tcpmgm run` started for a sandbox, killed (by its pid) when dropped, even when the test
/// fails. Its log is drained in the background so it never blocks on a full pipe.
pub struct Daemon {
    child: Child,
    pub control: PathBuf,
    /// The log lines up to "reload with SIGHUP", the end of its start-up.
    pub startup_log: String,
    /// Every log line after the start-up.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The thread that fills `log`; it ends at the end of the daemon's stderr.
    reader: std::thread::JoinHandle<()>,
}

impl Daemon {
    pub fn start(sb: &Sandbox, db: &str, control: PathBuf) -> Daemon {
        Daemon::start_with(sb, db, control, &[])
    }

    pub fn start_with(sb: &Sandbox, db: &str, control: PathBuf, extra: &[&str]) -> Daemon {
        let args: Vec<&str> = ["--db", db]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        Daemon::start_args(sb, control, &args)
    }

    /// `tcpmgm run ARGS` on the sandbox's cgroup and pins (the rule source among the ARGS).
    pub fn start_args(sb: &Sandbox, control: PathBuf, args: &[&str]) -> Daemon {
        Daemon::start_env(sb, control, args, &[])
    }

    /// `start_args` with environment variables of the daemon's own (`TCPMGM_FAULT`, say).
    pub fn start_env(
        sb: &Sandbox,
        control: PathBuf,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        Daemon::start_in(sb, control, args, env, None)
    }

    /// `start_env`, the daemon first moving itself into the cgroup whose `cgroup.procs` is
    /// `procs` (a memory-limited one, say).
    pub fn start_in(
        sb: &Sandbox,
        control: PathBuf,
        args: &[&str],
        env: &[(&str, &str)],
        procs: Option<&Path>,
    ) -> Daemon {
        let mut cmd = match procs {
            Some(procs) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", "echo $$ > \"$0\" && exec \"$@\""])
                    .arg(procs)
                    .arg(binary("tcpmgm"));
                sh
            }
            None => Command::new(binary("tcpmgm")),
        };
        let mut child = cmd
            .envs(env.iter().copied())
            .arg("run")
            .args(args)
            .arg("--cgroup")
            .arg(&sb.cgroup)
            .arg("--pin-dir")
            .arg(&sb.pin_dir)
            .arg("--control")
            .arg(&control)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn tcpmgm run");
        let mut log = BufReader::new(child.stderr.take().expect("stderr"));
        let mut seen = String::new();
        while !seen.contains("reload with SIGHUP") {
            let mut line = String::new();
            if log.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tcpmgm run exited: {seen}");
            }
            seen.push_str(&line);
        }
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in log.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Daemon {
            child,
            control,
            startup_log: seen,
            log: lines,
            reader,
        }
    }

    /// The metrics endpoint's address, as its start-up log names it (`--metrics ADDR:0` takes a
    /// free port).
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.startup_log
            .split("Prometheus metrics on http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no metrics address in {}", self.startup_log))
    }

    /// The daemon's process id, to read what /proc shows of it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `tcpmgm reload --control ...`: (exit code, stdout + stderr).
    pub fn reload(&self) -> (i32, String) {
        self.reload_with(&[])
    }

    /// `tcpmgm reload --control ... ARGS`: (exit code, stdout + stderr).
    pub fn reload_with(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(binary("tcpmgm"))
            .arg("reload")
            .arg("--control")
            .arg(&self.control)
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    /// `tcpmgm status --json` for this daemon's sandbox (its first entry).
    pub fn status(&self, sb: &Sandbox) -> serde_json::Value {
        let out = sh(Command::new(binary("tcpmgm"))
            .args(["status", "--json", "--cgroup"])
            .arg(&sb.cgroup)
            .arg("--pin-dir")
            .arg(&sb.pin_dir)
            .arg("--control")
            .arg(&self.control));
        let mut all: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        all[0].take()
    }

    /// Waits up to `limit` for the daemon to exit: its exit status, or None if it still runs.
    /// After an exit, `log` holds every line the daemon wrote (the reader has reached the end
    /// of its stderr, or `limit` has passed).
    pub fn wait_exit(&mut self, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                while !self.reader.is_finished() && start.elapsed() < limit {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                return Some(st);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }

    /// The log lines since the start that contain `text`.
    pub fn logged(&self, text: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(text))
            .count()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The databases the rule tests run against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MariaDb,
}

/// A database of the test's own, with OpenSIPS's tables made by `tcpmgm db init`'s code; dropped
/// (or its file removed) when the value is.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    admin: Option<String>,
    name: String,
}

impl TestDb {
    pub async fn new(
        backend: Backend,
        version: tcpmgm::policy::source::TableVersion,
        sql: &str,
    ) -> TestDb {
        Self::with_table(backend, version, &Default::default(), sql).await
    }

    /// A database whose rule table is called `table`.
    pub async fn with_table(
        backend: Backend,
        version: tcpmgm::policy::source::TableVersion,
        table: &tcpmgm::policy::source::TableName,
        sql: &str,
    ) -> TestDb {
        let name = format!(
            "tcpmgm_t_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let env = |var: &str| {
            std::env::var(var).unwrap_or_else(|_| {
                panic!("{var} is not set: run the tests with `cargo xtask test`, which starts PostgreSQL and MariaDB")
            })
        };
        let (url, admin) = match backend {
            Backend::Sqlite => {
                let dir = std::env::temp_dir().join(&name);
                std::fs::create_dir_all(&dir).unwrap();
                (format!("sqlite://{}", dir.join("rules.db").display()), None)
            }
            Backend::Postgres => {
                let admin = env("TCPMGM_TEST_POSTGRES");
                let base = admin
                    .rsplit_once('/')
                    .expect("postgres://.../db")
                    .0
                    .to_owned();
                (format!("{base}/{name}"), Some(admin))
            }
            Backend::MariaDb => {
                let admin = env("TCPMGM_TEST_MYSQL");
                (
                    format!("{}/{name}", admin.trim_end_matches('/')),
                    Some(admin),
                )
            }
        };
        if let Some(admin) = &admin {
            sqlx::any::install_default_drivers();
            let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(admin)
                .await
                .expect("admin connection");
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .expect("CREATE DATABASE");
        }
        let db = TestDb {
            backend,
            url,
            admin,
            name,
        };
        let source = tcpmgm::policy::source::Source::open_table(&db.url, true, table)
            .await
            .expect("open");
        assert!(source.init(version).await.expect("init"));
        source.execute_script(sql).await.expect("the test's SQL");
        db
    }

    /// Runs SQL on the database.
    pub async fn sql(&self, sql: &str) {
        run_sql(&self.url, sql).await;
    }
}

/// Runs the test's SQL on the database at `url`.
pub async fn run_sql(url: &str, sql: &str) {
    let source = tcpmgm::policy::source::Source::open(url, false)
        .await
        .expect("open");
    source.execute_script(sql).await.expect("the test's SQL");
}

impl Drop for TestDb {
    fn drop(&mut self) {
        match &self.admin {
            None => {
                let _ = std::fs::remove_dir_all(std::env::temp_dir().join(&self.name));
            }
            Some(admin) => {
                let (admin, name, backend) = (admin.clone(), self.name.clone(), self.backend);
                // Drop runs inside the test's runtime: use a thread with a runtime of its own.
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async {
                        let Ok(mut conn) =
                            <sqlx::AnyConnection as sqlx::Connection>::connect(&admin).await
                        else {
                            return;
                        };
                        let force = if backend == Backend::Postgres {
                            " WITH (FORCE)"
                        } else {
                            ""
                        };
                        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}{force}"))
                            .execute(&mut conn)
                            .await;
                    });
                })
                .join();
            }
        }
    }
}

/// Runs the `tcpmgm` command: (exit code, stdout, stderr).
pub fn tcpmgm(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary("tcpmgm"))
        .args(args)
        .output()
        .expect("run tcpmgm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A scratch directory of the test's own, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("tcpmgm-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// Writes `text` to the file `name` in it; its path.
    pub fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A control socket path of the sandbox's own, for a daemon.
pub fn control_socket(sb: &Sandbox) -> PathBuf {
    std::env::temp_dir().join(format!(
        "{}.sock",
        sb.cgroup.file_name().expect("named").to_string_lossy()
    ))
}

/// Opens the next loopback pair (port `port + 1`) and returns the client's keepidle.
pub fn next_idle(probe: &mut Probe, port: &mut u16) -> i64 {
    *port += 1;
    probe
        .ask(&format!("pair 127.0.0.1:{port} 127.0.0.1:{port}"))
        .get("client_idle")
}

/// Opens connections until one shows keepidle `want`, for at most `limit`: the time it took.
pub fn wait_for_idle(
    probe: &mut Probe,
    port: &mut u16,
    want: i64,
    limit: std::time::Duration,
) -> Option<std::time::Duration> {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if next_idle(probe, port) == want {
            return Some(start.elapsed());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    None
}

/// Runs bpftool's `commands` (a line each, as `bpftool` takes them after its options) in one
/// `bpftool -j batch` process (a process each would take seconds apiece in a TCG guest): each
/// command's JSON output, in order. Every command must succeed.
pub fn bpftool_batch(commands: &[String]) -> Vec<serde_json::Value> {
    if commands.is_empty() {
        return Vec::new();
    }
    static BATCHES: AtomicU32 = AtomicU32::new(0);
    let file = std::env::temp_dir().join(format!(
        "tcpmgm-{}-{}.bpftool-batch",
        std::process::id(),
        BATCHES.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&file, commands.join("\n") + "\n").unwrap();
    let out = Command::new("bpftool")
        .args(["-j", "batch", "file"])
        .arg(&file)
        .output()
        .expect("bpftool");
    let _ = std::fs::remove_file(&file);
    // bpftool of Debian 11 reports an error at the batch file's end, and exits 1, after every
    // command's output: the outputs are what counts. A command that fails has an error for
    // its output.
    let results: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool -j batch: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let results: Vec<serde_json::Value> = results
        .into_iter()
        .filter(|r| r.get("command").is_some())
        .collect();
    // bpftool stops at the first command that fails: its error says why the rest are missing.
    if let Some(failed) = results.iter().find(|r| r["output"].get("error").is_some()) {
        panic!("bpftool batch: {failed}");
    }
    assert_eq!(
        results.len(),
        commands.len(),
        "bpftool batch of {commands:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    commands
        .iter()
        .zip(results)
        .map(|(command, mut result)| {
            // Each result echoes its command, as words: it must be the one sent in its place.
            let echoed = match &result["command"] {
                serde_json::Value::Array(words) => words
                    .iter()
                    .map(|w| w.as_str().unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join(" "),
                other => other.as_str().unwrap_or_default().to_owned(),
            };
            assert_eq!(&echoed, command, "bpftool batch answered out of order");
            result["output"].take()
        })
        .collect()
}

/// What the kernel and bpffs hold for a sandbox: the programs attached to its cgroup (ids
/// included) and every pin with the id of the object it holds. Equal snapshots mean nothing
/// was changed.
pub fn snapshot(sb: &Sandbox) -> String {
    // bpftool 7.1 answers `cgroup show` within a batch with EBADF: a process of its own.
    let mut out = sh(Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&sb.cgroup));
    let Ok(entries) = std::fs::read_dir(&sb.pin_dir) else {
        return out + "(no pin directory)";
    };
    let mut pins: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    pins.sort();
    let commands: Vec<String> = pins
        .iter()
        .map(|pin| {
            let kind = if pin.starts_with("TCPMGM_LINK_") {
                "link"
            } else if pin.starts_with("TCPMGM_PROG_") {
                "prog"
            } else {
                "map"
            };
            format!("{kind} show pinned {}", sb.pin_dir.join(pin).display())
        })
        .collect();
    for (pin, shown) in pins.iter().zip(bpftool_batch(&commands)) {
        out.push_str(&format!("\n{pin} {}", shown["id"]));
    }
    out
}

/// The keepidle of a new loopback connection (port `port + 1`) made from the sandbox's cgroup.
pub fn idle_in(sb: &Sandbox, port: &mut u16) -> i64 {
    *port += 1;
    sb.probe()
        .ask(&format!("pair 127.0.0.1:{port} 127.0.0.1:{port}"))
        .get("client_idle")
}

/// Runs `tcpmgm ARGS` (with `env`), which must fail without panicking within two minutes:
/// its stderr.
pub fn refused(args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> String {
    let mut child = Command::new(binary("tcpmgm"))
        .envs(env.iter().copied())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tcpmgm");
    let mut err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut log = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut log);
        log
    });
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tcpmgm {args:?} did not stop");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let log = reader.join().expect("stderr reader");
    assert!(
        !status.success() && status.code() != Some(101),
        "tcpmgm {args:?}: {status}: {log}"
    );
    log
}

/// Waits up to `limit` for a daemon log line containing `text`.
pub fn wait_logged(daemon: &Daemon, text: &str, limit: std::time::Duration) -> bool {
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if daemon.logged(text) > 0 {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

/// xorshift64*: small, deterministic, good enough to spread a random test's choices.
pub struct Rng(pub u64);

impl Rng {
    /// Seeded from `TCPMGM_SEED=<n>` (to replay a run), else from the clock; the seed is
    /// printed, for the replay.
    pub fn seeded() -> (u64, Rng) {
        let seed: u64 = std::env::var("TCPMGM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("TCPMGM_SEED={seed}");
        (seed, Rng(seed | 1))
    }

    pub fn word(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.word() >> 33) as usize % n
    }

    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())]
    }
}

/// A child process killed (by its pid) and reaped when dropped, even when the test fails: for
/// tests that drive a `tcpmgm run` themselves rather than through `Daemon`.
pub struct Spawned(pub Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
