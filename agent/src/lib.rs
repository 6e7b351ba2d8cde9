//! mesh-redirect: an eBPF sockmap redirect agent for service-mesh sidecars.
//!
//! It captures a pod's outbound TCP connects with `cgroup/connect4`, answers
//! `SO_ORIGINAL_DST` with `cgroup/getsockopt` so unmodified proxies keep
//! working, and short-circuits the app↔proxy hop with a SOCKHASH and
//! `sk_msg`; iptables REDIRECT is the fallback.
//!
//! Where things live: [`capture`] (the redirect modes behind one
//! interface) over [`ebpf`] (the datapath: load, attach, maps, rules) and
//! [`iptables`] (istio's rules); [`proxy`] (the built-in proxy); [`run`]
//! (a run's arguments, plan and lifecycle); [`admin`] (metrics, readiness);
//! [`handoff`] (the control socket); [`node`] (one agent serving every
//! enrolled pod of a host); [`doctor`], [`status`], [`inspect`],
//! [`cleanup`], [`update_rules`] (the other commands).

pub mod admin;
pub mod caps;
pub mod capture;
pub mod cgroup;
pub mod cleanup;
pub mod config;
pub mod doctor;
pub mod ebpf;
pub mod handoff;
pub mod inspect;
pub mod iptables;
pub mod mounts;
pub mod netns;
pub mod node;
pub mod pins;
pub mod proxy;
pub mod rules;
pub mod run;
pub mod signals;
pub mod socket;
pub mod status;
pub mod update_rules;
