//! The eBPF datapath, seen from userspace:
//!
//! - [`load`]: the object, its globals, and the verifier's verdict on each
//!   program;
//! - [`attach`]: the loaded [`Datapath`]: links on cgroups, the netns and
//!   the socket map, pins, adoption of an earlier agent's pins, teardown;
//! - [`maps`]: one typed view of the maps, [`DatapathMaps`], opened from a
//!   loaded object, from pins, or from a running program: every reader and
//!   writer of the maps (run, `rules`, `status`, the admin server, the
//!   proxy) goes through it;
//! - [`rules`]: the capture rules as map entries;
//! - `sys`: the few bpf(2) commands aya does not expose.
//!
//! [`Hook`] is the one table of our programs: name, attach type, target.

pub mod attach;
pub mod load;
pub mod maps;
pub mod rules;
mod sys;

use std::path::PathBuf;

use agent_common::programs;
use aya_obj::generated::bpf_attach_type;

pub use self::{
    attach::{AttachedLink, Datapath},
    load::{LoadOptions, verifier_verdict},
    maps::{DatapathMaps, MapUsage},
};

/// The eBPF object built by `agent/build.rs` (empty when built without it).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "this binary was built without its eBPF object: build it with `cargo xtask build` (plain `cargo build` writes an empty stub)"
    )]
    NoObject,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("aya-log: {0}")]
    Log(#[from] aya_log::Error),
    #[error("attaching {hook} to {target}: {source}")]
    Link {
        hook: &'static str,
        target: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pins(#[from] crate::pins::PinError),
}

/// What a hook's program attaches to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A cgroup2 directory (its processes' sockets).
    Cgroup,
    /// A network namespace.
    Netns,
    /// The SOCKHASH (its sockets' sends).
    SocketMap,
    /// A kernel function (tracing).
    Kernel,
}

/// Our programs, in the order a connection meets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    Connect4,
    SockOps,
    SkMsg,
    Recvmsg,
    GetSockopt,
    GetPeerName4,
    SkLookup,
}

impl Hook {
    pub const ALL: [Self; 7] = [
        Self::Connect4,
        Self::SockOps,
        Self::SkMsg,
        Self::Recvmsg,
        Self::GetSockopt,
        Self::GetPeerName4,
        Self::SkLookup,
    ];

    /// The entry point's name (the kernel shows its first 15 characters).
    #[must_use]
    pub const fn program(self) -> &'static str {
        match self {
            Self::Connect4 => programs::CONNECT4,
            Self::SockOps => programs::SOCKOPS,
            Self::SkMsg => programs::SK_MSG,
            Self::Recvmsg => programs::RECVMSG,
            Self::GetSockopt => programs::GETSOCKOPT,
            Self::GetPeerName4 => programs::GETPEERNAME4,
            Self::SkLookup => programs::SK_LOOKUP,
        }
    }

    /// The kernel's attach type.
    #[must_use]
    pub const fn attach_type(self) -> bpf_attach_type {
        match self {
            Self::Connect4 => bpf_attach_type::BPF_CGROUP_INET4_CONNECT,
            Self::SockOps => bpf_attach_type::BPF_CGROUP_SOCK_OPS,
            Self::SkMsg => bpf_attach_type::BPF_SK_MSG_VERDICT,
            Self::Recvmsg => bpf_attach_type::BPF_TRACE_FEXIT,
            Self::GetSockopt => bpf_attach_type::BPF_CGROUP_GETSOCKOPT,
            Self::GetPeerName4 => bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME,
            Self::SkLookup => bpf_attach_type::BPF_SK_LOOKUP,
        }
    }

    #[must_use]
    pub const fn target(self) -> Target {
        match self {
            Self::Connect4 | Self::SockOps | Self::GetSockopt | Self::GetPeerName4 => {
                Target::Cgroup
            }
            Self::SkMsg => Target::SocketMap,
            Self::Recvmsg => Target::Kernel,
            Self::SkLookup => Target::Netns,
        }
    }

    /// The hooks that attach to cgroups.
    pub fn cgroup_hooks() -> impl Iterator<Item = Self> {
        Self::ALL
            .into_iter()
            .filter(|h| h.target() == Target::Cgroup)
    }

    /// The hook whose program has this (kernel, so possibly truncated) name.
    #[must_use]
    pub fn by_kernel_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|h| maps::kernel_name_matches(h.program(), name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hook_is_found_by_its_kernel_name() {
        for hook in Hook::ALL {
            let kernel: String = hook.program().chars().take(15).collect();
            assert_eq!(Hook::by_kernel_name(&kernel), Some(hook), "{hook:?}");
        }
        assert_eq!(Hook::by_kernel_name("mesh_other"), None);
        assert_eq!(Hook::cgroup_hooks().count(), 4);
    }
}
