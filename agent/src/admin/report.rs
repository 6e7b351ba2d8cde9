//! What a running agent tells `status` over its control socket: the
//! numbers only the process knows (the kernel's are read from the maps).

use std::{collections::BTreeMap, sync::atomic::Ordering::Relaxed};

use serde::{Deserialize, Serialize};

use super::{AdminState, metrics::proxy_errors};
use crate::proxy::Direction;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    pub pid: u32,
    pub mode: String,
    pub fail_policy: String,
    /// Why `/ready` is not 200; empty when ready.
    pub not_ready: Vec<String>,
    /// The built-in proxy (none with an external proxy).
    pub proxy: Option<ProxyReport>,
}

/// The built-in proxy's counters, keyed as the metrics' labels are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyReport {
    /// By direction.
    pub connections_open: BTreeMap<String, u64>,
    /// By direction.
    pub connections_total: BTreeMap<String, u64>,
    /// By `direction/flow` (`outbound/to_upstream`...).
    pub bytes: BTreeMap<String, u64>,
    /// By kind.
    pub errors: BTreeMap<String, u64>,
}

impl AdminState {
    #[must_use]
    pub fn report(&self) -> AgentReport {
        let proxy = self.proxy.as_ref().map(|p| {
            let mut r = ProxyReport::default();
            for d in Direction::ALL {
                let s = p.direction(d);
                let name = d.name().to_owned();
                r.connections_open
                    .insert(name.clone(), s.connections_open.load(Relaxed));
                r.connections_total
                    .insert(name.clone(), s.connections_total.load(Relaxed));
                r.bytes.insert(
                    format!("{name}/to_upstream"),
                    s.bytes_to_upstream.load(Relaxed),
                );
                r.bytes
                    .insert(format!("{name}/to_client"), s.bytes_to_client.load(Relaxed));
            }
            r.errors = proxy_errors(p)
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            r
        });
        AgentReport {
            pid: std::process::id(),
            mode: self.mode.name().to_owned(),
            fail_policy: self.fail_policy().to_owned(),
            not_ready: self
                .ready
                .not_ready()
                .into_iter()
                .map(str::to_owned)
                .collect(),
            proxy,
        }
    }
}
