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
//! - [`kernel`]: where the running kernel keeps the socket fields the
//!   programs read (from its BTF);
//! - [`reads`]: the start-up probe of how the kernel treats readers of
//!   sockets in a sockmap;
//! - `sys`: the few bpf(2) commands aya does not expose.
//!
//! [`Hook`] is the one table of our programs: name, attach type, target.

pub mod attach;
pub mod kernel;
pub mod load;
pub mod maps;
pub mod reads;
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
}

/// Our programs, in the order a connection meets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    Connect4,
    Connect6,
    SockOps,
    SkMsg,
    GetSockopt,
    GetPeerName4,
    GetPeerName6,
    SkLookup,
    SendMsg4,
    SendMsg6,
    RecvMsg4,
    RecvMsg6,
    SockRelease,
}

impl Hook {
    pub const ALL: [Self; 13] = [
        Self::Connect4,
        Self::Connect6,
        Self::SockOps,
        Self::SkMsg,
        Self::GetSockopt,
        Self::GetPeerName4,
        Self::GetPeerName6,
        Self::SkLookup,
        Self::SendMsg4,
        Self::SendMsg6,
        Self::RecvMsg4,
        Self::RecvMsg6,
        Self::SockRelease,
    ];

    /// The hooks of DNS capture, attached only with `--redirect-dns`.
    pub const DNS: [Self; 5] = [
        Self::SendMsg4,
        Self::SendMsg6,
        Self::RecvMsg4,
        Self::RecvMsg6,
        Self::SockRelease,
    ];

    /// The entry point's name (the kernel shows its first 15 characters).
    #[must_use]
    pub const fn program(self) -> &'static str {
        match self {
            Self::Connect4 => programs::CONNECT4,
            Self::Connect6 => programs::CONNECT6,
            Self::SockOps => programs::SOCKOPS,
            Self::SkMsg => programs::SK_MSG,
            Self::GetSockopt => programs::GETSOCKOPT,
            Self::GetPeerName4 => programs::GETPEERNAME4,
            Self::GetPeerName6 => programs::GETPEERNAME6,
            Self::SkLookup => programs::SK_LOOKUP,
            Self::SendMsg4 => programs::SENDMSG4,
            Self::SendMsg6 => programs::SENDMSG6,
            Self::RecvMsg4 => programs::RECVMSG4,
            Self::RecvMsg6 => programs::RECVMSG6,
            Self::SockRelease => programs::SOCK_RELEASE,
        }
    }

    /// The kernel's attach type.
    #[must_use]
    pub const fn attach_type(self) -> bpf_attach_type {
        use bpf_attach_type as at;
        match self {
            Self::Connect4 => at::BPF_CGROUP_INET4_CONNECT,
            Self::Connect6 => at::BPF_CGROUP_INET6_CONNECT,
            Self::SockOps => at::BPF_CGROUP_SOCK_OPS,
            Self::SkMsg => at::BPF_SK_MSG_VERDICT,
            Self::GetSockopt => at::BPF_CGROUP_GETSOCKOPT,
            Self::GetPeerName4 => at::BPF_CGROUP_INET4_GETPEERNAME,
            Self::GetPeerName6 => at::BPF_CGROUP_INET6_GETPEERNAME,
            Self::SkLookup => at::BPF_SK_LOOKUP,
            Self::SendMsg4 => at::BPF_CGROUP_UDP4_SENDMSG,
            Self::SendMsg6 => at::BPF_CGROUP_UDP6_SENDMSG,
            Self::RecvMsg4 => at::BPF_CGROUP_UDP4_RECVMSG,
            Self::RecvMsg6 => at::BPF_CGROUP_UDP6_RECVMSG,
            Self::SockRelease => at::BPF_CGROUP_INET_SOCK_RELEASE,
        }
    }

    #[must_use]
    pub const fn target(self) -> Target {
        match self {
            Self::SkMsg => Target::SocketMap,
            Self::SkLookup => Target::Netns,
            _ => Target::Cgroup,
        }
    }

    /// The hooks that attach to cgroups.
    pub fn cgroup_hooks() -> impl Iterator<Item = Self> {
        Self::ALL
            .into_iter()
            .filter(|h| h.target() == Target::Cgroup)
    }

    /// The cgroup hooks that go on the sockets' cgroups (the app's and the
    /// proxy's: both ends of a connection), not only the served one.
    #[must_use]
    pub const fn on_socket_cgroups(self) -> bool {
        matches!(self, Self::SockOps | Self::GetSockopt)
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
        assert_eq!(Hook::cgroup_hooks().count(), 11);
    }
}
