//! The agent's metrics: registered once, each component as a collector
//! with typed label sets, read at each scrape from the component's own
//! state (the agent's handle on the datapath's maps, the proxy's counters,
//! which move as bytes do).

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, RwLock, atomic::Ordering::Relaxed},
};

use agent_common::Counter;
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric as _, LabelValueEncoder,
    },
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use super::Readiness;
use crate::{
    capture::Mode,
    ebpf::{DatapathMaps, maps::Counters},
    proxy::{self, Direction},
};

/// Registers every component's metrics.
pub fn register(
    registry: &mut Registry,
    agent: Agent,
    datapath: Option<DatapathMaps>,
    proxies: Option<Proxies>,
) {
    registry.register_collector(Box::new(agent));
    if let Some(maps) = datapath {
        registry.register_collector(Box::new(Datapath(maps)));
    }
    if let Some(proxies) = proxies {
        registry.register_collector(Box::new(Proxy(proxies)));
    }
}

/// A node agent's pods as its metrics see them, by netns cookie: the
/// `pod` label (`namespace/name`, else `netns:<cookie>`) and the built-in
/// proxy's counters (none: the pod runs its own proxy). The node agent
/// updates it as pods come and go, so the series are bounded by the pods
/// enrolled.
pub type NodePods = Arc<RwLock<BTreeMap<u64, (String, Option<Arc<proxy::Stats>>)>>>;

/// Whose proxy counters are reported.
#[derive(Debug)]
pub enum Proxies {
    /// The one proxy of an agent serving one pod: no `pod` label.
    One(Arc<proxy::Stats>),
    /// A node agent's, one per pod, labelled `pod`.
    Pods(NodePods),
}

/// No label for the one pod an agent serves, `pod` for a node agent's.
type PodLabel = Vec<(&'static str, String)>;

impl Proxies {
    fn each(&self) -> Vec<(PodLabel, Arc<proxy::Stats>)> {
        match self {
            Self::One(s) => vec![(Vec::new(), Arc::clone(s))],
            Self::Pods(pods) => pods
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .values()
                .filter_map(|(pod, s)| Some((vec![("pod", pod.clone())], Arc::clone(s.as_ref()?))))
                .collect(),
        }
    }
}

/// A node agent's pods, by how each is proxied.
#[derive(Debug)]
pub struct Node(pub NodePods);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProxyKindLabels {
    proxy: &'static str,
}

impl Collector for Node {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (mut builtin, mut own) = (0, 0);
        for (_, stats) in self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
        {
            match stats {
                Some(_) => builtin += 1,
                None => own += 1,
            }
        }
        gauges(
            &mut e,
            "mesh_redirect_node_pods",
            "Pods the node agent serves, by proxy (builtin: the agent's; external: the pod's own)",
            &[
                (ProxyKindLabels { proxy: "builtin" }, builtin),
                (ProxyKindLabels { proxy: "external" }, own),
            ],
        )
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.name(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultFamilyLabels {
    result: &'static str,
    family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    direction: Direction,
    family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    direction: Direction,
    flow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    mode: &'static str,
    fail_policy: &'static str,
    version: &'static str,
}

/// A counter family, one series per label set.
fn counters<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(L, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// A gauge family, one series per label set.
fn gauges<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(L, i64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The agent itself: mode, fail policy, readiness.
#[derive(Debug)]
pub struct Agent {
    pub mode: Mode,
    pub fail_open: bool,
    pub ready: Arc<Readiness>,
}

impl Collector for Agent {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let info = InfoLabels {
            mode: self.mode.name(),
            fail_policy: if self.fail_open { "open" } else { "closed" },
            version: env!("CARGO_PKG_VERSION"),
        };
        gauges(
            &mut e,
            "mesh_redirect_info",
            "The agent: redirect mode, fail policy, version",
            &[(info, 1)],
        )?;
        gauge(
            &mut e,
            "mesh_redirect_ready",
            "1 when /ready answers 200",
            i64::from(self.ready.not_ready().is_empty()),
        )?;
        gauge(
            &mut e,
            "mesh_redirect_fail_open",
            "1 when connections go direct while no proxy listens",
            i64::from(self.fail_open),
        )?;
        let (resident, descriptors) = own_footprint();
        gauge(
            &mut e,
            "mesh_redirect_resident_memory_bytes",
            "The agent's resident memory",
            to_i64(resident),
        )?;
        gauge(
            &mut e,
            "mesh_redirect_open_descriptors",
            "Descriptors the agent holds, in every table: the process's and each proxy worker's own",
            to_i64(descriptors),
        )
    }
}

/// This process's resident bytes and open descriptors (see [`footprint`]).
fn own_footprint() -> (u64, u64) {
    footprint(Path::new("/proc/self"))
}

/// The resident bytes and open descriptors of the agent process whose
/// `/proc` directory is `proc`, each proxy worker's own descriptor table
/// (see `proxy::worker`) counted too. What cannot be read counts 0.
#[must_use]
pub fn footprint(proc: &Path) -> (u64, u64) {
    let count = |dir: &Path| std::fs::read_dir(dir).map_or(0, |d| d.count() as u64);
    let resident = std::fs::read_to_string(proc.join("status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    let workers: u64 = std::fs::read_dir(proc.join("task")).map_or(0, |tasks| {
        tasks
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.starts_with("proxy-"))
            })
            .map(|t| count(&t.path().join("fd")))
            .sum()
    });
    (resident, count(&proc.join("fd")) + workers)
}

/// The datapath's counters and map usage, from the agent's own handle on
/// its maps.
#[derive(Debug)]
struct Datapath(DatapathMaps);

impl Collector for Datapath {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (Ok(c), Ok(usage)) = (self.0.counters(), self.0.usage()) else {
            // The maps are the agent's own: unreadable only if the kernel
            // is in trouble; the other components still report.
            return Ok(());
        };
        capture_metrics(&mut e, &c)?;
        dns_metrics(&mut e, &c)?;
        let events: Vec<_> = c
            .iter()
            .map(|(counter, v)| {
                (
                    EventLabels {
                        event: counter.name(),
                    },
                    v,
                )
            })
            .collect();
        counters(
            &mut e,
            "mesh_redirect_datapath_events",
            "Every datapath counter, by name",
            &events,
        )?;
        let entries: Vec<_> = usage
            .iter()
            .map(|m| (MapLabels { map: m.name }, to_i64(m.entries as u64)))
            .collect();
        gauges(
            &mut e,
            "mesh_redirect_map_entries",
            "Entries held by each bounded map",
            &entries,
        )?;
        let capacity: Vec<_> = usage
            .iter()
            .map(|m| (MapLabels { map: m.name }, i64::from(m.capacity)))
            .collect();
        gauges(
            &mut e,
            "mesh_redirect_map_capacity",
            "Capacity of each bounded map",
            &capacity,
        )
    }
}

/// What the datapath captured, left alone and answered, per family.
fn capture_metrics(e: &mut DescriptorEncoder, c: &Counters) -> Result<(), std::fmt::Error> {
    let dir = |direction| DirectionLabels { direction };
    let path = |direction, family| PathLabels { direction, family };
    counters(
        e,
        "mesh_redirect_redirects",
        "Connections captured by the datapath, by direction and address family \
             (ipv4_mapped: an IPv4 destination through an AF_INET6 socket)",
        &[
            (
                path(Direction::Outbound, "ipv4"),
                c.get(Counter::ConnectRedirected),
            ),
            (
                path(Direction::Outbound, "ipv4_mapped"),
                c.get(Counter::ConnectRedirectedMapped),
            ),
            (
                path(Direction::Outbound, "ipv6"),
                c.get(Counter::ConnectRedirected6),
            ),
            (
                path(Direction::Inbound, "ipv4"),
                c.get(Counter::InboundSteered),
            ),
            (
                path(Direction::Inbound, "ipv6"),
                c.get(Counter::InboundSteered6),
            ),
        ],
    )?;
    counters(
        e,
        "mesh_redirect_bypassed",
        "Connections the datapath left alone by rule (an exempt identity, an excluded \
             address or port), by direction and address family (v4-mapped counts as ipv4)",
        &[
            (
                path(Direction::Outbound, "ipv4"),
                c.get(Counter::ConnectBypassed),
            ),
            (
                path(Direction::Outbound, "ipv6"),
                c.get(Counter::ConnectBypassed6),
            ),
            (
                path(Direction::Inbound, "ipv4"),
                c.get(Counter::InboundBypassed),
            ),
            (
                path(Direction::Inbound, "ipv6"),
                c.get(Counter::InboundBypassed6),
            ),
        ],
    )?;
    counters(
        e,
        "mesh_redirect_sk_msg",
        "sk_msg verdicts: redirected to the peer socket, or passed over TCP",
        &[
            (
                VerdictLabels {
                    verdict: "redirected",
                },
                c.get(Counter::MsgRedirected),
            ),
            (
                VerdictLabels { verdict: "passed" },
                c.get(Counter::MsgPassed),
            ),
        ],
    )?;
    let asked = |result, family| ResultFamilyLabels { result, family };
    counters(
        e,
        "mesh_redirect_getsockopt",
        "The original destination asked of the datapath (SO_ORIGINAL_DST for ipv4, \
             IP6T_SO_ORIGINAL_DST for ipv6): answered, or missed (a socket it does not know)",
        &[
            (
                asked("answered", "ipv4"),
                c.get(Counter::GetsockoptAnswered),
            ),
            (
                asked("answered", "ipv6"),
                c.get(Counter::GetsockoptAnswered6),
            ),
            (asked("missed", "ipv4"), c.get(Counter::GetsockoptMissed)),
            (asked("missed", "ipv6"), c.get(Counter::GetsockoptMissed6)),
        ],
    )?;
    counters(
        e,
        "mesh_redirect_fail_open_passed",
        "Connections that went direct because no proxy listened (fail open)",
        &[
            (dir(Direction::Outbound), c.get(Counter::ConnectFailOpen)),
            (dir(Direction::Inbound), c.get(Counter::InboundFailOpen)),
        ],
    )?;
    Ok(())
}

/// DNS capture's counters.
fn dns_metrics(e: &mut DescriptorEncoder, c: &Counters) -> Result<(), std::fmt::Error> {
    counters(
        e,
        "mesh_redirect_dns",
        "DNS capture: queries sent to the DNS proxy, replies shown as the resolver's, \
             the DNS proxy's own queries left alone, queries that could not be recorded \
             (sent to the resolver directly)",
        &[
            (
                EventLabels {
                    event: "redirected",
                },
                c.get(Counter::DnsRedirected),
            ),
            (
                EventLabels {
                    event: "reply_restored",
                },
                c.get(Counter::DnsReplyRestored),
            ),
            (
                EventLabels { event: "bypassed" },
                c.get(Counter::DnsBypassed),
            ),
            (
                EventLabels {
                    event: "store_failed",
                },
                c.get(Counter::DnsStoreFailed),
            ),
        ],
    )
}

/// The built-in proxies' counters.
#[derive(Debug)]
struct Proxy(Proxies);

/// The proxy's error counters, by kind (the metric's `kind` label).
pub(super) fn proxy_errors(p: &proxy::Stats) -> [(&'static str, u64); 7] {
    [
        ("upstream_refused", p.upstream_refused.load(Relaxed)),
        ("upstream_timeout", p.upstream_timeout.load(Relaxed)),
        ("upstream_reset", p.upstream_reset.load(Relaxed)),
        ("client_reset", p.client_reset.load(Relaxed)),
        ("orig_dst_missing", p.orig_dst_missing.load(Relaxed)),
        ("idle_timeout", p.idle_closed.load(Relaxed)),
        ("max_connections", p.rejected_max_connections.load(Relaxed)),
    ]
}

impl Collector for Proxy {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let proxies = self.0.each();
        let per_dir = |f: &dyn Fn(&proxy::DirectionStats) -> u64| {
            let mut series = Vec::new();
            for (pod, p) in &proxies {
                for &direction in &Direction::ALL {
                    series.push((
                        (pod.clone(), DirectionLabels { direction }),
                        f(p.direction(direction)),
                    ));
                }
            }
            series
        };
        let open: Vec<_> = per_dir(&|d| d.connections_open.load(Relaxed))
            .into_iter()
            .map(|(l, v)| (l, to_i64(v)))
            .collect();
        gauges(
            &mut e,
            "mesh_redirect_proxy_connections_open",
            "Proxied connections open, by direction",
            &open,
        )?;
        counters(
            &mut e,
            "mesh_redirect_proxy_connections",
            "Proxied connections accepted, by direction",
            &per_dir(&|d| d.connections_total.load(Relaxed)),
        )?;
        let mut bytes = Vec::new();
        for (pod, p) in &proxies {
            for direction in Direction::ALL {
                let s = p.direction(direction);
                for (flow, v) in [
                    ("to_upstream", s.bytes_to_upstream.load(Relaxed)),
                    ("to_client", s.bytes_to_client.load(Relaxed)),
                ] {
                    bytes.push(((pod.clone(), FlowLabels { direction, flow }), v));
                }
            }
        }
        counters(
            &mut e,
            "mesh_redirect_proxy_bytes",
            "Bytes relayed, by direction and flow (counted as they move)",
            &bytes,
        )?;
        counters(
            &mut e,
            "mesh_redirect_proxy_spliced",
            "Ways of proxied connections (client to upstream, or back) that turned bulk and \
             went on through splice(2), by direction",
            &per_dir(&|d| d.spliced.load(Relaxed)),
        )?;
        let errors: Vec<_> = proxies
            .iter()
            .flat_map(|(pod, p)| {
                proxy_errors(p)
                    .into_iter()
                    .map(|(kind, v)| ((pod.clone(), KindLabels { kind }), v))
            })
            .collect();
        counters(
            &mut e,
            "mesh_redirect_proxy_errors",
            "Connections that ended in an error, by kind",
            &errors,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::AdminState;

    #[test]
    fn metrics_carry_the_agent_and_proxy_numbers() {
        let counts = Arc::new(proxy::Stats::default());
        counts
            .direction(Direction::Inbound)
            .bytes_to_client
            .store(42, Relaxed);
        counts.upstream_refused.store(3, Relaxed);
        let state = AdminState::new(
            Mode::Ebpf,
            false,
            Arc::new(Readiness::default()),
            Some(Arc::clone(&counts)),
            None,
        );
        let text = state.metrics_text();
        for line in [
            "mesh_redirect_proxy_bytes_total{direction=\"inbound\",flow=\"to_client\"} 42",
            "mesh_redirect_proxy_errors_total{kind=\"upstream_refused\"} 3",
            "mesh_redirect_ready 0",
            "mesh_redirect_info{mode=\"ebpf\",fail_policy=\"closed\",version=",
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
        // Registered once: a later scrape shows later numbers.
        counts
            .direction(Direction::Inbound)
            .bytes_to_client
            .store(50, Relaxed);
        assert!(state.metrics_text().contains(
            "mesh_redirect_proxy_bytes_total{direction=\"inbound\",flow=\"to_client\"} 50"
        ));
        assert!(!text.contains("sk_msg"), "no datapath, no datapath metrics");
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok())
        };
        assert!(value("mesh_redirect_resident_memory_bytes").is_some_and(|v| v > 1 << 20));
        assert!(value("mesh_redirect_open_descriptors").is_some_and(|v| v >= 3));
    }

    #[test]
    fn a_node_agents_metrics_label_each_pods_proxy() {
        let a = Arc::new(proxy::Stats::default());
        a.direction(Direction::Outbound)
            .connections_total
            .store(7, Relaxed);
        let pods: NodePods = Arc::default();
        pods.write()
            .unwrap()
            .insert(1, ("default/a".into(), Some(Arc::clone(&a))));
        pods.write().unwrap().insert(2, ("netns:2".into(), None));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Node(Arc::clone(&pods))));
        register(
            &mut registry,
            Agent {
                mode: Mode::Ebpf,
                fail_open: false,
                ready: Arc::default(),
            },
            None,
            Some(Proxies::Pods(Arc::clone(&pods))),
        );
        let text = || {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
            out
        };
        let now = text();
        for line in [
            "mesh_redirect_proxy_connections_total{pod=\"default/a\",direction=\"outbound\"} 7",
            "mesh_redirect_node_pods{proxy=\"builtin\"} 1",
            "mesh_redirect_node_pods{proxy=\"external\"} 1",
        ] {
            assert!(now.contains(line), "missing `{line}` in:\n{now}");
        }
        assert!(
            !now.contains("netns:2"),
            "a pod's own proxy has no proxy series"
        );
        pods.write().unwrap().remove(&1);
        assert!(!text().contains("default/a"), "a gone pod's series go");
    }
}
