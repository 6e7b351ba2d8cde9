//! mesh-redirect: an eBPF sockmap redirect agent for service-mesh sidecars.
//!
//! It captures a pod's outbound TCP connects with `cgroup/connect4`, answers
//! `SO_ORIGINAL_DST` with `cgroup/getsockopt` so unmodified proxies keep
//! working, and short-circuits the app↔proxy hop with a SOCKHASH and
//! `sk_msg`; iptables REDIRECT is the fallback.

pub mod admin;
pub mod bpf_sys;
pub mod caps;
pub mod cgroup;
pub mod cleanup;
pub mod config;
pub mod control;
pub mod doctor;
pub mod ebpf;
pub mod handoff;
pub mod inspect;
pub mod iptables;
pub mod mounts;
pub mod netns;
pub mod pins;
pub mod proxy;
pub mod rules;
pub mod run;
pub mod socket;
pub mod status;
