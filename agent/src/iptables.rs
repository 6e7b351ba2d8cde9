//! istio-iptables, reimplemented: its rules for a configuration
//! ([`istio`]: flags, configuration, rule generation), installing and
//! removing them in a namespace ([`apply`], on a [`backend`]), and its
//! command line ([`cli`]). The agent's iptables capture mode
//! (in the capture module) installs the same rules.

pub mod apply;
pub mod backend;
pub mod cli;
pub mod istio;
