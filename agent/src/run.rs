//! `run`: capture a network namespace's TCP for the processes of a cgroup,
//! outbound and inbound, and (by default) run the proxy that receives it.
//!
//! [`args`] are the settings (flags and `--config` file), [`plan`] checks
//! them against the host before anything is attached or written and picks
//! the mode, [`lifecycle`] runs: take over or bind, prepare capture, start
//! the proxy, install, serve, drain, tear down.

pub mod args;
pub mod lifecycle;
pub mod plan;

pub use self::{
    args::{ProxyKind, RunArgs},
    lifecycle::run,
    plan::Plan,
};
