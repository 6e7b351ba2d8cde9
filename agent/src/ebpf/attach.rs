//! A loaded [`Datapath`] and what it attached: links on cgroups and the
//! served netns, the sk_msg program on the SOCKHASH, and
//! their pins.
//!
//! Unpinned, dropping the datapath detaches everything and frees the maps.
//! Pinned, maps and links live in the pin directory and outlive the
//! process: dropping it leaves them running (for a successor to adopt, or
//! for the pods while the agent restarts); [`Datapath::teardown`] removes
//! them. An agent that finds an earlier agent's pins of the same map
//! layout adopts them: the maps keep their entries and every hook runs
//! *this* agent's programs from then on (links updated in place, sk_msg
//! replaced), so an upgrade that changes only a program never
//! keeps the old one attached.

use std::{
    fs::File,
    io,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, SkLookup, SkMsg, SockOps,
        links::{FdLink, PinnedLink},
        loaded_programs,
        sk_msg::SkMsgLink,
    },
};
use serde::Serialize;

use super::{
    EbpfError, Hook, Target,
    load::{self, LoadOptions, program_err, program_mut},
    maps::DatapathMaps,
    sys,
};

/// A cgroup link always lets other programs run on the same hook (the
/// kernel attaches links multi-attach; it wants no flag for it).
const CGROUP_LINK: CgroupAttachMode = CgroupAttachMode::Single;

/// Holding it keeps an unpinned link attached.
#[derive(Debug)]
enum LinkHandle {
    Aya(#[allow(dead_code)] FdLink),
    Pinned(#[allow(dead_code)] PinnedLink),
    /// Created or opened with a raw bpf(2) call (see `sys`).
    Raw(#[allow(dead_code)] OwnedFd),
}

/// The pin name of sk_lookup's link on one namespace.
fn sk_lookup_link_name(netns_cookie: u64) -> String {
    format!("link-{}-netns-{netns_cookie}", Hook::SkLookup.program())
}

/// One hook's bpf_link.
#[derive(Debug)]
pub struct AttachedLink {
    pub hook: Hook,
    /// Its pin name (in the pin directory, if the datapath is pinned).
    pub name: String,
    /// Where it is attached, for messages and `status`.
    pub target: PathBuf,
    /// Pinned by an earlier agent, and now running our program.
    pub adopted: bool,
    _handle: LinkHandle,
}

/// The loaded object, its maps, and what it attached.
pub struct Datapath {
    /// What it was loaded with (an sk_lookup instance of another
    /// namespace gets the same).
    opts: LoadOptions,
    ebpf: Ebpf,
    maps: DatapathMaps,
    /// The pin directory, and whether an earlier agent's datapath was adopted.
    pins: Option<(PathBuf, bool)>,
    links: Vec<AttachedLink>,
    /// Link pin names this datapath created or adopted.
    claimed: Vec<String>,
    /// Dropped (detached) at teardown; left in place otherwise (a pinned
    /// map keeps it for the next agent).
    sk_msg: Option<SkMsgLink>,
}

fn link_err(hook: Hook, target: &Path) -> impl Fn(io::Error) -> EbpfError + '_ {
    move |source| EbpfError::Link {
        hook: hook.program(),
        target: target.to_owned(),
        source,
    }
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl Datapath {
    /// Loads the maps (pinned in `pin_dir`, or adopted from there) and
    /// verifies every program.
    pub fn load(opts: &LoadOptions, pin_dir: Option<&Path>) -> Result<Self, EbpfError> {
        let loaded = load::load(opts, pin_dir)?;
        Ok(Self {
            opts: *opts,
            ebpf: loaded.ebpf,
            maps: loaded.maps,
            pins: loaded.pins,
            links: Vec::new(),
            claimed: Vec::new(),
            sk_msg: None,
        })
    }

    #[must_use]
    pub fn maps(&self) -> &DatapathMaps {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut DatapathMaps {
        &mut self.maps
    }

    /// Whether an earlier agent's maps (and links) were adopted.
    #[must_use]
    pub fn adopted(&self) -> bool {
        self.pins.as_ref().is_some_and(|(_, adopted)| *adopted)
    }

    #[must_use]
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(|(dir, _)| dir.as_path())
    }

    #[must_use]
    pub fn links(&self) -> &[AttachedLink] {
        &self.links
    }

    /// Starts forwarding the programs' aya-log records to `log` (and so to
    /// tracing). The caller polls the returned logger's fd and flushes it.
    pub fn take_logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, EbpfError> {
        Ok(aya_log::EbpfLogger::init(&mut self.ebpf)?)
    }

    /// Attaches `hook` to `target` (a cgroup or netns) with a bpf_link,
    /// pinned as `pin_name` ([`link_program`]).
    fn attach_link(
        &mut self,
        hook: Hook,
        target: BorrowedFd<'_>,
        target_path: &Path,
        pin_name: &str,
    ) -> Result<(), EbpfError> {
        let pin = self.pin_dir().map(|d| d.join(pin_name));
        self.claimed.push(pin_name.to_owned());
        let link = link_program(
            &mut self.ebpf,
            hook,
            target,
            target_path,
            pin_name,
            pin.as_deref(),
        )?;
        self.links.push(link);
        Ok(())
    }
    /// Attaches a cgroup hook to the cgroup at `path`.
    pub fn attach_cgroup(&mut self, hook: Hook, path: &Path) -> Result<(), EbpfError> {
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(hook.target(), Target::Cgroup, "{hook:?}");
        let io_err = |source| EbpfError::Io {
            path: path.to_owned(),
            source,
        };
        let cgroup = File::open(path).map_err(io_err)?;
        let ino = cgroup.metadata().map_err(io_err)?.ino();
        self.attach_link(
            hook,
            cgroup.as_fd(),
            path,
            &format!("link-{}-cgroup-{ino}", hook.program()),
        )
    }

    /// Attaches the sk_lookup program to a network namespace (its cookie
    /// `netns_cookie`), once: attaching it there again changes nothing.
    pub fn attach_sk_lookup(
        &mut self,
        netns: &crate::netns::Netns,
        netns_cookie: u64,
    ) -> Result<(), EbpfError> {
        let hook = Hook::SkLookup;
        let name = sk_lookup_link_name(netns_cookie);
        if self.claimed.contains(&name) {
            return Ok(());
        }
        // The namespace whose cookie the caller read, not whatever its path names now.
        if netns_cookie == self.opts.sk_lookup_netns {
            return self.attach_link(hook, netns.as_fd(), netns.path(), &name);
        }
        // Another namespace: an instance of its own, on our maps. Its
        // pinned link holds it; nothing of it stays open here (a node agent
        // serves many namespaces).
        let dir = self.pin_dir().ok_or(EbpfError::Missing {
            kind: "pin directory",
            name: "for an sk_lookup instance per namespace (node mode pins its datapath)",
        })?;
        let pin = dir.join(&name);
        let mut instance = load::sk_lookup_instance(&self.opts, dir, netns_cookie)?;
        drop(link_program(
            &mut instance,
            hook,
            netns.as_fd(),
            netns.path(),
            &name,
            Some(&pin),
        )?);
        self.claimed.push(name);
        Ok(())
    }

    /// Detaches the sk_lookup program from the namespace with this cookie
    /// (and removes its pin); nothing to do where it is not attached.
    pub fn detach_sk_lookup(&mut self, netns_cookie: u64) -> Result<(), EbpfError> {
        let name = sk_lookup_link_name(netns_cookie);
        self.links.retain(|l| l.name != name);
        self.claimed.retain(|c| *c != name);
        if let Some(pin) = self.pin_dir().map(|d| d.join(&name)) {
            match std::fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(EbpfError::Io { path: pin, source }),
            }
        }
        Ok(())
    }

    /// Attaches the sk_msg program to the SOCKHASH. This replaces whatever
    /// program an earlier agent attached there (sockets already in the map
    /// keep the program they were inserted with).
    pub fn attach_sk_msg(&mut self) -> Result<(), EbpfError> {
        let hook = Hook::SkMsg;
        let name = hook.program();
        let sockets = self.maps.sockets()?;
        let p = program_mut::<SkMsg>(&mut self.ebpf, hook)?;
        let id = p.attach(sockets.fd()).map_err(program_err(name))?;
        self.sk_msg = Some(p.take_link(id).map_err(program_err(name))?);
        Ok(())
    }

    /// Removes pinned links an earlier agent left that this one did not
    /// claim (a hook it attaches elsewhere now, e.g. because the agent runs
    /// in another cgroup): otherwise both would run. Call after attaching.
    pub fn prune_unclaimed_links(&mut self) -> Result<Vec<PathBuf>, EbpfError> {
        let Some(dir) = self.pin_dir() else {
            return Ok(Vec::new());
        };
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| EbpfError::Io { path, source }
        };
        let mut removed = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("link-") && !self.claimed.contains(&name) {
                std::fs::remove_file(e.path()).map_err(io_err(&e.path()))?;
                removed.push(e.path());
            }
        }
        Ok(removed)
    }

    /// Removes everything: links detach, pins go, the maps are freed once
    /// nothing holds them. (Dropping an unpinned datapath does the same.)
    pub fn teardown(mut self) -> Result<(), EbpfError> {
        // Detaches the sk_msg program (the map is about to go anyway).
        drop(self.sk_msg.take());
        if let Some((dir, _)) = self.pins.take() {
            crate::pins::remove_instance(&dir)?;
        }
        Ok(())
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        // Pinned and not torn down: the SOCKHASH lives on, and so must its
        // sk_msg program (the next agent replaces it).
        if self.pins.is_some()
            && let Some(link) = self.sk_msg.take()
        {
            std::mem::forget(link);
        }
    }
}

/// A program attached to a cgroup or netns, as the kernel reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AttachedProgram {
    pub hook: &'static str,
    pub id: u32,
    pub name: String,
    /// One of ours (by program name).
    pub ours: bool,
}

/// Every program attached to `target` (a cgroup, netns or socket-map
/// descriptor) on `hooks` (ours and others').
pub fn attached(
    target: &impl std::os::fd::AsFd,
    hooks: impl IntoIterator<Item = Hook>,
) -> io::Result<Vec<AttachedProgram>> {
    let names: Vec<(u32, String)> = loaded_programs()
        .filter_map(Result::ok)
        .map(|p| (p.id(), p.name_as_str().unwrap_or_default().to_owned()))
        .collect();
    let mut out = Vec::new();
    for hook in hooks {
        for id in sys::prog_query(target, hook.attach_type() as u32)? {
            let name = names
                .iter()
                .find(|(i, _)| *i == id)
                .map(|(_, n)| n.clone())
                .unwrap_or_default();
            out.push(AttachedProgram {
                hook: hook.program(),
                id,
                ours: Hook::by_kernel_name(&name) == Some(hook),
                name,
            });
        }
    }
    Ok(out)
}

/// Every program attached to the cgroup at `path` on our cgroup hooks.
pub fn attached_to_cgroup(path: &Path) -> io::Result<Vec<AttachedProgram>> {
    attached(&File::open(path)?, Hook::cgroup_hooks())
}

impl DatapathMaps {
    /// The programs attached to the SOCKHASH (the sk_msg verdict).
    pub fn attached_to_sockets(&self) -> Result<Vec<AttachedProgram>, EbpfError> {
        let sockets = self.sockets()?;
        attached(sockets.fd(), [Hook::SkMsg]).map_err(|source| EbpfError::Io {
            path: agent_common::maps::SOCKETS.into(),
            source,
        })
    }
}

impl Datapath {
    /// The programs attached to the SOCKHASH (the sk_msg verdict).
    pub fn attached_to_sockets(&self) -> Result<Vec<AttachedProgram>, EbpfError> {
        self.maps.attached_to_sockets()
    }
}

fn program_fd(ebpf: &Ebpf, hook: Hook) -> Result<std::os::fd::BorrowedFd<'_>, EbpfError> {
    let name = hook.program();
    let prog = ebpf.program(name).ok_or(EbpfError::Missing {
        kind: "program",
        name,
    })?;
    Ok(prog.fd().map_err(program_err(name))?.as_fd())
}

/// Attaches `ebpf`'s `hook` program to `target` (a cgroup or netns) with a
/// bpf_link, which never replaces another tool's program, pinned at `pin`:
/// an earlier agent's link pinned there gets this program instead
/// (atomically: no moment without the hook, never two of ours).
fn link_program(
    ebpf: &mut Ebpf,
    hook: Hook,
    target: BorrowedFd<'_>,
    target_path: &Path,
    pin_name: &str,
    pin: Option<&Path>,
) -> Result<AttachedLink, EbpfError> {
    let err = link_err(hook, target_path);
    if let Some(pin) = pin.filter(|p| p.exists()) {
        let fd = sys::obj_get(pin).map_err(&err)?;
        sys::link_update(&fd, &program_fd(ebpf, hook)?).map_err(&err)?;
        return Ok(AttachedLink {
            hook,
            name: pin_name.to_owned(),
            target: target_path.to_owned(),
            adopted: true,
            _handle: LinkHandle::Raw(fd),
        });
    }
    let handle = match new_link(ebpf, hook, target)? {
        Ok(link) => match pin {
            Some(path) => LinkHandle::Pinned(link.pin(path).map_err(other).map_err(&err)?),
            None => LinkHandle::Aya(link),
        },
        Err(fd) => {
            if let Some(path) = pin {
                sys::obj_pin(&fd, path).map_err(&err)?;
            }
            LinkHandle::Raw(fd)
        }
    };
    Ok(AttachedLink {
        hook,
        name: pin_name.to_owned(),
        target: target_path.to_owned(),
        adopted: false,
        _handle: handle,
    })
}

/// A new link of `hook` on `target`: aya's, or (`Err`) a raw one where
/// aya's link type cannot be pinned (cgroup sockopt, aya 0.14).
fn new_link(
    e: &mut Ebpf,
    hook: Hook,
    target: BorrowedFd<'_>,
) -> Result<Result<FdLink, OwnedFd>, EbpfError> {
    let name = hook.program();
    let fd_link = |r: Result<FdLink, aya::programs::links::LinkError>| {
        r.map_err(|e| EbpfError::Link {
            hook: name,
            target: PathBuf::from("cgroup"),
            source: other(e),
        })
    };
    Ok(Ok(match hook {
        Hook::Connect4
        | Hook::Connect6
        | Hook::GetPeerName4
        | Hook::GetPeerName6
        | Hook::SendMsg4
        | Hook::SendMsg6
        | Hook::RecvMsg4
        | Hook::RecvMsg6 => {
            let p = program_mut::<CgroupSockAddr>(e, hook)?;
            let id = p.attach(target, CGROUP_LINK).map_err(program_err(name))?;
            fd_link(p.take_link(id).map_err(program_err(name))?.try_into())?
        }
        Hook::SockRelease => {
            let p = program_mut::<CgroupSock>(e, hook)?;
            let id = p.attach(target, CGROUP_LINK).map_err(program_err(name))?;
            fd_link(p.take_link(id).map_err(program_err(name))?.try_into())?
        }
        Hook::SockOps => {
            let p = program_mut::<SockOps>(e, hook)?;
            let id = p.attach(target, CGROUP_LINK).map_err(program_err(name))?;
            fd_link(p.take_link(id).map_err(program_err(name))?.try_into())?
        }
        Hook::SkLookup => {
            let p = program_mut::<SkLookup>(e, hook)?;
            let id = p.attach(target).map_err(program_err(name))?;
            p.take_link(id).map_err(program_err(name))?.into()
        }
        Hook::GetSockopt => {
            let prog = program_fd(e, hook)?;
            let fd = sys::link_create(&prog, &target, hook.attach_type() as u32)
                .map_err(link_err(hook, Path::new("cgroup")))?;
            return Ok(Err(fd));
        }
        Hook::SkMsg => unreachable!("{hook:?} has no cgroup or netns link"),
    }))
}
