//! Prometheus metrics (`--metrics ADDR:PORT`, path /metrics, Prometheus's text format): read at
//! each scrape from what `tcpmgm status` reads too, the daemon's state file and the pinned maps,
//! so the endpoint never waits on the reloader. Counters are the kernel's own per-rule counts, which reloads do not
//! reset.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

use axum::http::header;
use axum::response::IntoResponse;
use prometheus::{Encoder as _, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::config::MetricsRules;
use crate::daemon::status::DaemonState;
use crate::kernel::SOCKETS_PIN;
use crate::policy::rule::{LocalMatch, Proto, Rule};

/// What a scrape reads: the daemon's record (beside its control socket) and its pins.
#[derive(Clone)]
pub struct Sources {
    pub control: PathBuf,
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
    /// The network namespace of the cgroup's sockets, when not the daemon's own.
    pub netns: Option<PathBuf>,
    /// Which per-rule series a scrape carries.
    pub rules: MetricsRules,
    /// The rules in force, for `tcpmgm_rule_info`.
    pub book: RuleBook,
}

/// The match side of each rule in force, for `tcpmgm_rule_info`: set by the daemon at its
/// start and at each reload that succeeds, read at each scrape. The profiles are left out
/// (the counters say what a rule did; the table says what it sets).
#[derive(Clone, Default)]
pub struct RuleBook(Arc<RwLock<Arc<Vec<RuleKey>>>>);

/// A rule's match keys.
struct RuleKey {
    id: u32,
    priority: i32,
    proto: Option<Proto>,
    remote: Option<ipnet::IpNet>,
    remote_port: u16,
    local: Option<LocalMatch>,
    local_port: u16,
}

impl RuleBook {
    pub fn set(&self, rules: &[Rule]) {
        let mut keys: Vec<RuleKey> = rules
            .iter()
            .map(|r| RuleKey {
                id: r.id,
                priority: r.priority,
                proto: r.proto,
                remote: r.remote,
                remote_port: r.remote_port,
                local: r.local.clone(),
                local_port: r.local_port,
            })
            .collect();
        keys.sort_unstable_by_key(|k| k.id);
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
    }

    fn get(&self) -> Arc<Vec<RuleKey>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl RuleKey {
    /// The labels of `tcpmgm_rule_info` but cgroup: rule_id, proto, remote, local, priority,
    /// in the table's words ("any" where a column matches anything).
    fn labels(&self) -> [String; 5] {
        let side = |net: Option<String>, port: u16| match (net, port) {
            (None, 0) => "any".to_owned(),
            (None, p) => format!("any port {p}"),
            (Some(n), 0) => n,
            (Some(n), p) => format!("{n} port {p}"),
        };
        let local = self.local.as_ref().map(LocalMatch::to_string);
        [
            self.id.to_string(),
            self.proto
                .map_or_else(|| "any".to_owned(), |p| p.to_string()),
            side(self.remote.map(|n| n.to_string()), self.remote_port),
            side(local, self.local_port),
            self.priority.to_string(),
        ]
    }
}

/// Serves the metrics until the task is dropped. Fails at once when the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    sources: Sources,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    // The address bound: with port 0, the port the kernel chose.
    let addr = listener.local_addr()?;
    tracing::info!("Prometheus metrics on http://{addr}/metrics");
    let sources = Arc::new(sources);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let sources = sources.clone();
            async move {
                // The pins and sock_diag are read with blocking calls.
                let text = tokio::task::spawn_blocking(move || render(&sources))
                    .await
                    .unwrap_or_else(|e| format!("# the scrape failed: {e}\n"));
                ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response()
            }
        }),
    );
    Ok(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics endpoint: {e}");
        }
    })
}

/// Registers a family of metrics, by the labels `labels`.
fn family<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    make: impl FnOnce(Opts, &[&str]) -> prometheus::Result<M>,
    name: &str,
    help: &str,
    labels: &[&str],
) -> M {
    let metric = make(Opts::new(name, help), labels).expect("a valid metric definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("each name registered once");
    metric
}

/// The scrape's text, in Prometheus's text format.
pub fn render(sources: &Sources) -> String {
    let cgroup = sources.cgroup.display().to_string();
    let registry = Registry::new_custom(Some("tcpmgm".into()), None).expect("a valid prefix");
    let rule = |name: &str, help: &str| {
        family(
            &registry,
            IntCounterVec::new,
            name,
            help,
            &["cgroup", "rule_id"],
        )
    };
    let counters = [
        rule(
            "rule_sockets_matched_total",
            "Sockets the rule was chosen for (accepted or opened; refused connects included).",
        ),
        rule(
            "rule_connects_refused_total",
            "connect() calls refused by the rule's no_new_conn.",
        ),
        rule(
            "rule_connects_would_refuse_total",
            "connect() calls the rule's no_new_conn would have refused (audit mode).",
        ),
        rule(
            "rule_slow_sends_total",
            "Sends slower than the rule's send_threshold.",
        ),
        rule(
            "rule_idle_closes_total",
            "Idle connections closed by the rule's con_lifetime.",
        ),
        rule(
            "rule_idle_would_close_total",
            "Idle connections con_lifetime would have closed (audit mode).",
        ),
        rule(
            "rule_setsockopt_failures_total",
            "Socket options the kernel refused to set for the rule.",
        ),
        rule(
            "rule_app_overrides_prevented_total",
            "Application setsockopt() calls that would have changed an option the rule sets.",
        ),
    ];
    family(
        &registry,
        IntGaugeVec::new,
        "build_info",
        "The tcpmgm that serves these metrics: its version, the commit it was built from and \
         the SHA-256 (first 12 hex digits) of its eBPF object. Always 1.",
        &["version", "commit", "ebpf_sha256"],
    )
    .with_label_values(&[
        env!("CARGO_PKG_VERSION"),
        env!("TCPMGM_COMMIT"),
        env!("TCPMGM_EBPF_SHA256"),
    ])
    .set(1);
    let ended = family(
        &registry,
        IntCounterVec::new,
        "rule_connections_ended_total",
        "Connections of the rule that ended, by how: closed, reset, keepalive, timeout, \
         connect_timeout, lifetime, connect_failed, local_abort, or aborted where the kernel \
         cannot tell reset, keepalive and local_abort apart (see tcpmgm features).",
        &["cgroup", "rule_id", "outcome"],
    );
    let mut lifetimes = Vec::new();
    // The rules to show: with nonzero, those with counts (their statistics walked whole, a
    // cost in what the rules did) that are in force (in the book); with all, every rule in
    // force as the pinned ranks list them.
    let book = sources.book.get();
    let shown = match sources.rules {
        MetricsRules::None => Ok(Vec::new()),
        MetricsRules::Nonzero => crate::kernel::counted(&sources.pin_dir).map(|counted| {
            let mut rules: Vec<_> = counted
                .into_values()
                .filter(|r| book.binary_search_by_key(&r.id, |k| k.id).is_ok())
                .collect();
            rules.sort_unstable_by_key(|r| r.id);
            rules
        }),
        MetricsRules::All => crate::kernel::inspect(&sources.pin_dir).map(|p| p.rules),
    };
    match shown {
        Ok(rules) => {
            let all = sources.rules == MetricsRules::All;
            let info = family(
                &registry,
                IntGaugeVec::new,
                "rule_info",
                "A rule in force, by its match keys as the table gives them; always 1. Shown for \
                 the rules whose counters are (with --metrics-rules all, for every rule).",
                &["cgroup", "rule_id", "proto", "remote", "local", "priority"],
            );
            for r in &rules {
                let id = r.id.to_string();
                let values = r.values();
                for (counter, value) in counters.iter().zip(values) {
                    if all || value != 0 {
                        counter.with_label_values(&[&cgroup, &id]).inc_by(value);
                    }
                }
                for (outcome, &n) in &r.ended {
                    if all || n != 0 {
                        ended
                            .with_label_values(&[cgroup.as_str(), &id, outcome])
                            .inc_by(n);
                    }
                }
                if all || r.ends() != 0 {
                    lifetimes.push(lifetime_histogram(&cgroup, &id, r));
                }
                let shown = all || values.iter().any(|&v| v != 0) || r.ends() != 0;
                if let (true, Ok(at)) = (shown, book.binary_search_by_key(&r.id, |k| k.id)) {
                    let [id, proto, remote, local, priority] = book[at].labels();
                    info.with_label_values(&[&cgroup, &id, &proto, &remote, &local, &priority])
                        .set(1);
                }
            }
        }
        Err(e) => tracing::warn!("metrics: reading the pins: {e}"),
    }
    registry
        .register(Box::new(Lifetimes::new(lifetimes)))
        .expect("each name registered once");
    let gauge = |name: &str, help: &str, value: i64| {
        family(&registry, IntGaugeVec::new, name, help, &["cgroup"])
            .with_label_values(&[&cgroup])
            .set(value);
    };
    if let Some(s) = DaemonState::read(&sources.control) {
        gauge(
            "audit_mode",
            "1 when the daemon decides and counts but enforces nothing.",
            i64::from(s.audit),
        );
        let reloads = family(
            &registry,
            IntCounterVec::new,
            "reloads_total",
            "Reloads of the rule table since the daemon started, by result.",
            &["cgroup", "result"],
        );
        reloads
            .with_label_values(&[&cgroup, "ok"])
            .inc_by(s.reloads_ok);
        reloads
            .with_label_values(&[&cgroup, "failed"])
            .inc_by(s.reloads_failed);
        let last = s.last_reload.as_ref();
        gauge(
            "last_reload_success",
            "1 when the last reload succeeded (or none was tried since the start, whose load \
             succeeded), 0 when it failed and the previous rule set stays in force.",
            i64::from(last.is_none_or(|r| r.ok)),
        );
        family(
            &registry,
            prometheus::GaugeVec::new,
            "last_reload_duration_seconds",
            "How long the last reload took.",
            &["cgroup"],
        )
        .with_label_values(&[&cgroup])
        .set(last.map_or(0.0, |r| r.ms as f64 / 1000.0));
        gauge(
            "last_reload_timestamp_seconds",
            "When the last reload ended (Unix time; 0: none since the start).",
            last.map_or(0, |r| r.at as i64),
        );
        gauge(
            "generation",
            "The rule set in force (1 at the start, one more each reload).",
            s.generation as i64,
        );
        gauge("rules", "Rules in the rule set in force.", s.rules as i64);
    }
    match crate::kernel::hooks_attached(&sources.pin_dir, &sources.cgroup) {
        Ok(n) => gauge(
            "policy_attached",
            "1 when every hook of tcpmgm's is attached to the cgroup, as its pinned links show in \
             the kernel; 0 when one is missing or holds another cgroup (the governed one was \
             removed, say).",
            i64::from(n == crate::kernel::HOOKS.len()),
        ),
        Err(e) => tracing::warn!("metrics: reading the links: {e}"),
    }
    match governed_sockets(sources) {
        Ok(n) => gauge(
            "governed_sockets",
            "TCP sockets of the cgroup that a rule governs.",
            n as i64,
        ),
        Err(e) => tracing::warn!("metrics: counting the governed sockets: {e}"),
    }
    let mut text = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut text) {
        return format!("# encoding the metrics failed: {e}\n");
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// The cgroup's sockets with a rule, from sock_diag in the sockets' network namespace.
fn governed_sockets(sources: &Sources) -> std::io::Result<usize> {
    let count =
        || -> std::io::Result<usize> {
            Ok(crate::kernel::socket::connections(
                &sources.cgroup,
                &sources.pin_dir.join(SOCKETS_PIN),
            )?
            .iter()
            .filter(|c| c.profile.is_some())
            .count())
        };
    crate::netns::run_in(sources.netns.as_deref(), count)
}

/// The rules' connection lifetimes, one histogram a rule, from the buckets the programs count
/// (`tcpmgm_common::Outcomes::lived`): a collector of its own, as the prometheus crate's
/// histograms only observe.
struct Lifetimes {
    desc: prometheus::core::Desc,
    metrics: Vec<prometheus::proto::Metric>,
}

const LIFETIME_NAME: &str = "rule_connection_lifetime_seconds";
const LIFETIME_HELP: &str =
    "How long the rule's connections lived, from connect() or accept() to their end.";

impl Lifetimes {
    fn new(metrics: Vec<prometheus::proto::Metric>) -> Lifetimes {
        Lifetimes {
            desc: prometheus::core::Desc::new(
                LIFETIME_NAME.into(),
                LIFETIME_HELP.into(),
                vec!["cgroup".into(), "rule_id".into()],
                std::collections::HashMap::new(),
            )
            .expect("a valid metric definition"),
            metrics,
        }
    }
}

impl prometheus::core::Collector for Lifetimes {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        if self.metrics.is_empty() {
            return Vec::new();
        }
        let mut family = prometheus::proto::MetricFamily::default();
        family.set_name(LIFETIME_NAME.into());
        family.set_help(LIFETIME_HELP.into());
        family.set_field_type(prometheus::proto::MetricType::HISTOGRAM);
        family.set_metric(self.metrics.clone());
        vec![family]
    }
}

/// One rule's lifetime histogram.
fn lifetime_histogram(
    cgroup: &str,
    id: &str,
    r: &crate::kernel::RuleCount,
) -> prometheus::proto::Metric {
    use prometheus::proto::{Bucket, Histogram, LabelPair, Metric};
    let label = |name: &str, value: &str| {
        let mut l = LabelPair::default();
        l.set_name(name.into());
        l.set_value(value.into());
        l
    };
    let mut h = Histogram::default();
    let mut buckets = Vec::new();
    let mut count = 0;
    for &(seconds, at_most) in &r.lived_at_most_s {
        count = at_most;
        if seconds == u64::MAX {
            // +Inf: the count itself.
            continue;
        }
        let mut b = Bucket::default();
        b.set_upper_bound(seconds as f64);
        b.set_cumulative_count(at_most);
        buckets.push(b);
    }
    h.set_bucket(buckets);
    h.set_sample_count(count);
    h.set_sample_sum(r.lived_ms as f64 / 1000.0);
    let mut m = Metric::default();
    m.set_label(vec![label("cgroup", cgroup), label("rule_id", id)]);
    m.set_histogram(h);
    m
}
