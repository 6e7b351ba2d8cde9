//! `doctor`: probe the running kernel and host for everything the redirect
//! modes need, one row per probe, then say which modes are usable.
//!
//! Every probe asks the kernel itself (loading a minimal program, creating a
//! map, attaching a link to a throwaway cgroup); nothing is read off `uname`,
//! because distributions backport.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};
use serde::Serialize;

pub use crate::capture::Mode;
use crate::{
    caps, cgroup,
    ebpf::{Datapath, Hook, LoadOptions, load},
    mounts,
};

/// One probe's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// Stable identifier, e.g. `prog.sk_msg`.
    pub id: String,
    pub name: String,
    pub ok: bool,
    pub detail: String,
    /// Modes that cannot work without this.
    pub needed_by: Vec<Mode>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub probes: Vec<Probe>,
    pub modes: Vec<ModeStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModeStatus {
    pub mode: Mode,
    pub usable: bool,
    /// Names of the failed probes this mode needs.
    pub missing: Vec<String>,
}

impl Report {
    #[must_use]
    pub fn usable(&self, mode: Mode) -> bool {
        self.modes.iter().any(|m| m.mode == mode && m.usable)
    }

    #[must_use]
    pub fn any_usable(&self) -> bool {
        self.modes.iter().any(|m| m.usable)
    }

    /// Why no mode is usable: what each lacks.
    #[must_use]
    pub fn why_unusable(&self) -> String {
        let missing: Vec<String> = self
            .modes
            .iter()
            .map(|m| format!("{}: {}", m.mode.name(), m.missing.join(", ")))
            .collect();
        format!("no redirect mode is usable ({})", missing.join("; "))
    }

    /// A copy where the probe `id` failed (tests prove the mode fallback).
    #[must_use]
    pub fn with_failed(mut self, id: &str, why: &str) -> Self {
        for p in &mut self.probes {
            if p.id == id {
                p.ok = false;
                why.clone_into(&mut p.detail);
            }
        }
        self.modes = modes(&self.probes);
        self
    }

    /// Human-readable table.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        let width = self
            .probes
            .iter()
            .map(|p| p.name.chars().count())
            .max()
            .unwrap_or(0);
        // A missing thing no mode needs (one iptables backend of two, an
        // optional program) is not a failure: listed after the modes.
        let optional_missing = |p: &&Probe| !p.ok && p.needed_by.is_empty();
        for p in self.probes.iter().filter(|p| !optional_missing(p)) {
            let mark = if p.ok { "✓" } else { "✗" };
            let pad = width - p.name.chars().count();
            let _ = writeln!(out, "{mark} {}{}  {}", p.name, " ".repeat(pad), p.detail);
        }
        out.push('\n');
        for m in &self.modes {
            if m.usable {
                let _ = writeln!(out, "mode {:<8} usable", m.mode.name());
            } else {
                let _ = writeln!(
                    out,
                    "mode {:<8} NOT usable: missing {}",
                    m.mode.name(),
                    m.missing.join(", ")
                );
            }
        }
        let optional: Vec<&Probe> = self.probes.iter().filter(optional_missing).collect();
        if !optional.is_empty() {
            out.push_str("\nnot here, and no mode needs it:\n");
            for p in optional {
                let _ = writeln!(out, "– {}: {}", p.name, p.detail);
            }
        }
        out
    }
}

/// What the probes need to know about the host.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The cgroup the agent would serve (checked to be a cgroup2 directory).
    pub cgroup: Option<PathBuf>,
    /// DNS capture is asked for: its hooks (`sendmsg`, `recvmsg`, `sock_release`)
    /// are needed by the eBPF mode too. Without it they are shown, but no
    /// mode needs them.
    pub dns: bool,
}

const EBPF: &[Mode] = &[Mode::Ebpf];
const BOTH: &[Mode] = &[Mode::Ebpf, Mode::Iptables];

/// Runs every probe.
#[must_use]
pub fn run(opts: &Options) -> Report {
    let caps = caps::effective();
    let mut probes = vec![caps_probe(caps.as_ref())];
    probes.extend(program_probes());
    let r = is_map_supported(MapType::SockHash);
    probes.push(Probe::new(
        "map.sockhash",
        "SOCKHASH map",
        r.as_ref().is_ok_and(|ok| *ok),
        match r {
            Ok(true) => "supported".to_owned(),
            Ok(false) => "not supported".to_owned(),
            Err(e) => e.to_string(),
        },
        EBPF,
    ));
    probes.extend(helper_probes());
    probes.extend(object_probes(opts.dns));
    probes.extend(short_circuit_probes());

    let mounts = mounts::read_mounts().unwrap_or_default();
    let cg2 = mounts::cgroup2(&mounts).map(|m| m.mount_point.clone());
    probes.push(Probe::new(
        "mount.cgroup2",
        "cgroup2 mount",
        cg2.is_some(),
        cg2.as_ref().map_or_else(
            || "not mounted (see /proc/self/mountinfo)".to_owned(),
            |p| p.display().to_string(),
        ),
        EBPF,
    ));
    probes.push(cgroup_link_probe(cg2.as_deref()));
    if let Some(path) = &opts.cgroup {
        let r = cgroup::validate(path);
        probes.push(Probe::new(
            "cgroup.served",
            "served cgroup",
            r.is_ok(),
            r.map_or_else(
                |e| e.to_string(),
                |p| format!("{} is a cgroup2 directory", p.display()),
            ),
            EBPF,
        ));
    }
    let can_mount = caps.as_ref().is_ok_and(|c| c.has(caps::CAP_SYS_ADMIN));
    probes.push(bpffs_probe(&mounts, can_mount));
    let backends: Vec<Probe> = [
        ("iptables.legacy", "iptables-legacy"),
        ("iptables.nft", "iptables-nft"),
    ]
    .into_iter()
    .map(|(id, bin)| {
        let (ok, detail) = iptables_probe(bin);
        Probe::new(id, &format!("{bin} nat table"), ok, detail, &[])
    })
    .collect();
    // Either backend will do: neither is required while the other works;
    // with neither, both are what the iptables mode lacks (✗ rows).
    let none = !backends.iter().any(|p| p.ok);
    probes.extend(backends.into_iter().map(|mut p| {
        if none {
            p.needed_by = vec![Mode::Iptables];
        }
        p
    }));
    let modes = modes(&probes);
    Report { probes, modes }
}

fn caps_probe(caps: Result<&caps::CapSet, &std::io::Error>) -> Probe {
    match caps {
        Ok(c) => Probe::new(
            "caps",
            "capabilities",
            c.can_bpf() && c.has(caps::CAP_NET_ADMIN),
            if c.held().is_empty() {
                "none of CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN held (run as root)".to_owned()
            } else {
                format!("held: {}", c.held().join(", "))
            },
            BOTH,
        ),
        Err(err) => Probe::new("caps", "capabilities", false, err.to_string(), BOTH),
    }
}

/// Each program type we use (the attach types within each are proven by
/// loading our own programs: see [`object_probes`]).
fn program_probes() -> Vec<Probe> {
    [
        (
            "prog.cgroup_sock_addr",
            "cgroup sock_addr programs",
            ProgramType::CgroupSockAddr,
        ),
        ("prog.sock_ops", "sock_ops programs", ProgramType::SockOps),
        ("prog.sk_msg", "sk_msg programs", ProgramType::SkMsg),
        (
            "prog.cgroup_sockopt",
            "cgroup sockopt programs",
            ProgramType::CgroupSockopt,
        ),
        (
            "prog.sk_lookup",
            "sk_lookup programs",
            ProgramType::SkLookup,
        ),
    ]
    .into_iter()
    .map(|(id, name, ptype)| {
        let (ok, detail) = match is_program_supported(ptype) {
            Ok(true) => (true, "loads".to_owned()),
            Ok(false) => (false, "not supported by this kernel".to_owned()),
            Err(e) => (false, e.to_string()),
        };
        Probe::new(id, name, ok, detail, EBPF)
    })
    .collect()
}

/// Each helper, in each program type that calls it.
fn helper_probes() -> Vec<Probe> {
    const NETNS_COOKIE: BpfHelper = BpfHelper::BPF_FUNC_get_netns_cookie;
    const SOCKET_COOKIE: BpfHelper = BpfHelper::BPF_FUNC_get_socket_cookie;
    const MSG_REDIRECT_HASH: BpfHelper = BpfHelper::BPF_FUNC_msg_redirect_hash;
    const SK_STORAGE_GET: BpfHelper = BpfHelper::BPF_FUNC_sk_storage_get;
    const SOCK_HASH_UPDATE: BpfHelper = BpfHelper::BPF_FUNC_sock_hash_update;
    use ProgramType::{CgroupSockAddr, CgroupSockopt, SkMsg, SockOps};
    [
        (
            "helper.socket_cookie.connect4",
            "bpf_get_socket_cookie in connect4",
            SOCKET_COOKIE,
            CgroupSockAddr,
        ),
        (
            "helper.socket_cookie.sock_ops",
            "bpf_get_socket_cookie in sock_ops",
            SOCKET_COOKIE,
            SockOps,
        ),
        (
            "helper.netns_cookie.connect4",
            "bpf_get_netns_cookie in connect4",
            NETNS_COOKIE,
            CgroupSockAddr,
        ),
        (
            "helper.netns_cookie.sock_ops",
            "bpf_get_netns_cookie in sock_ops",
            NETNS_COOKIE,
            SockOps,
        ),
        (
            "helper.netns_cookie.sk_msg",
            "bpf_get_netns_cookie in sk_msg",
            NETNS_COOKIE,
            SkMsg,
        ),
        (
            "helper.netns_cookie.getsockopt",
            "bpf_get_netns_cookie in getsockopt",
            NETNS_COOKIE,
            CgroupSockopt,
        ),
        (
            "helper.sock_hash_update",
            "bpf_sock_hash_update in sock_ops",
            SOCK_HASH_UPDATE,
            SockOps,
        ),
        (
            "helper.msg_redirect_hash",
            "bpf_msg_redirect_hash in sk_msg",
            MSG_REDIRECT_HASH,
            SkMsg,
        ),
        (
            "helper.sk_storage.sock_ops",
            "bpf_sk_storage_get in sock_ops",
            SK_STORAGE_GET,
            SockOps,
        ),
        (
            "helper.sk_storage.sk_msg",
            "bpf_sk_storage_get in sk_msg",
            SK_STORAGE_GET,
            SkMsg,
        ),
    ]
    .into_iter()
    .map(|(id, name, helper, ptype)| {
        let (ok, detail) = helper_probe(ptype, helper);
        Probe::new(id, name, ok, detail, EBPF)
    })
    .collect()
}

/// Whether `helper` is callable from `ptype` programs (aya loads a program
/// that calls it and reads the verifier's verdict, libbpf's method).
#[must_use]
pub fn helper_probe(ptype: ProgramType, helper: BpfHelper) -> (bool, String) {
    match is_helper_supported(ptype, helper) {
        Ok(true) => (true, "available".to_owned()),
        Ok(false) => (false, "not available to this program type".to_owned()),
        Err(e) => (false, format!("probe failed: {e}")),
    }
}

/// Loads our own eBPF object, each program through the verifier (nothing
/// attached, all closed again): the probes above say the hooks exist, these
/// say this kernel's verifier accepts our programs (6.1's is stricter than
/// later ones about pointer arithmetic, for one).
fn object_probes(dns: bool) -> Vec<Probe> {
    let verdicts = match load::verdicts() {
        Ok(v) => v,
        Err(e) => {
            return vec![Probe::new(
                "object.load",
                "our eBPF object loads",
                false,
                load::verifier_verdict(&e.to_string()),
                EBPF,
            )];
        }
    };
    verdicts
        .into_iter()
        .map(|(hook, verdict)| {
            let optional = Hook::DNS.contains(&hook) && !dns;
            let name = if Hook::DNS.contains(&hook) {
                format!("our {} passes the verifier (DNS capture)", hook.program())
            } else {
                format!("our {} passes the verifier", hook.program())
            };
            let detail = match &verdict {
                Ok(()) => "loaded (not attached)".to_owned(),
                Err(why) => why.clone(),
            };
            Probe::new(
                &format!("object.{}", hook.program()),
                &name,
                verdict.is_ok(),
                detail,
                if optional { &[] } else { EBPF },
            )
        })
        .collect()
}

/// What the sockmap short-circuit needs of the running kernel: its socket
/// fields in the BTF, and readers it can bound, measured on a socket pair
/// of our own (and whether blocking readers must stay on TCP). No mode
/// needs it: without it captured connections use plain loopback TCP.
fn short_circuit_probes() -> Vec<Probe> {
    let layout = crate::ebpf::kernel::layout();
    let mut probes = vec![Probe::new(
        "kernel.layout",
        "socket fields in the kernel's BTF (short-circuit)",
        layout.is_ok(),
        layout.map_or_else(|e| e.to_string(), |_| "found".to_owned()),
        &[],
    )];
    let reads = crate::ebpf::reads::probe();
    probes.push(Probe::new(
        "sockmap.reads",
        "sockmap readers bounded (short-circuit)",
        reads.as_ref().is_ok_and(|r| r.ingress_charged),
        reads.map_or_else(|e| e.to_string(), |r| r.describe()),
        &[],
    ));
    probes
}

/// Attaches our connect4 program with a bpf_link, asks the kernel what is
/// attached, and removes it: on a throwaway child cgroup, or, where the
/// cgroup2 root cannot take one (a container's read-only view of it, a
/// root directory of mode 0555 without `CAP_DAC_OVERRIDE`), on the agent's
/// own cgroup for that moment (the program, with empty maps of its own,
/// lets every connect through).
fn cgroup_link_probe(cg2: Option<&Path>) -> Probe {
    let name = "bpf_link on cgroups";
    let probe = |ok, detail| Probe::new("link.cgroup", name, ok, detail, EBPF);
    let Some(root) = cg2 else {
        return probe(false, "no cgroup2 mount to probe with".into());
    };
    let child = root.join(format!("mesh-redirect-probe-{}", std::process::id()));
    let (dir, made, on) = match fs::create_dir(&child) {
        Ok(()) => (child, true, String::new()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
            ) =>
        {
            match crate::cgroup::own() {
                Ok(own) => (
                    own,
                    false,
                    format!(
                        " (on the agent's own cgroup: cannot create one under {}: {e})",
                        root.display()
                    ),
                ),
                Err(own) => {
                    return probe(
                        false,
                        format!(
                            "cannot create probe cgroup {}: {e}; no own cgroup: {own}",
                            child.display()
                        ),
                    );
                }
            }
        }
        Err(e) => {
            return probe(
                false,
                format!("cannot create probe cgroup {}: {e}", child.display()),
            );
        }
    };
    let ours = |dir: &Path| -> Result<usize, String> {
        let seen = crate::inspect::attached(dir).map_err(|e| format!("BPF_PROG_QUERY: {e}"))?;
        Ok(seen.iter().filter(|p| p.ours).count())
    };
    let result = (|| -> Result<String, String> {
        let before = ours(&dir)?;
        let mut dp = Datapath::load(&LoadOptions::default(), None).map_err(|e| e.to_string())?;
        dp.attach_cgroup(Hook::Connect4, &dir)
            .map_err(|e| e.to_string())?;
        let seen = ours(&dir)?;
        drop(dp);
        if seen == before + 1 {
            Ok(format!("link created and seen by BPF_PROG_QUERY{on}"))
        } else {
            Err(format!(
                "query saw {seen} of our programs attached, expected {}{on}",
                before + 1
            ))
        }
    })();
    if made {
        let _ = fs::remove_dir(&dir);
    }
    match result {
        Ok(d) => probe(true, d),
        Err(d) => probe(false, d),
    }
}

fn bpffs_probe(mounts: &[mounts::Mount], can_mount: bool) -> Probe {
    let name = "bpffs mount";
    let default = Path::new(mounts::DEFAULT_BPFFS);
    match mounts::bpffs_at(mounts, default) {
        Some(m) if m.read_only => Probe::new(
            "mount.bpffs",
            name,
            false,
            format!(
                "{} is mounted read-only: pins cannot be written",
                default.display()
            ),
            &[Mode::Ebpf],
        ),
        Some(_) => Probe::new(
            "mount.bpffs",
            name,
            true,
            default.display().to_string(),
            &[Mode::Ebpf],
        ),
        None if can_mount => Probe::new(
            "mount.bpffs",
            name,
            true,
            format!(
                "not mounted; `run` will mount it at {} (CAP_SYS_ADMIN held)",
                default.display()
            ),
            &[Mode::Ebpf],
        ),
        None => Probe::new(
            "mount.bpffs",
            name,
            false,
            format!(
                "not mounted, and `run` cannot mount it at {} without CAP_SYS_ADMIN",
                default.display()
            ),
            &[Mode::Ebpf],
        ),
    }
}

fn short(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_owned()
}

fn iptables_probe(bin: &str) -> (bool, String) {
    match Command::new(bin).args(["-w", "-t", "nat", "-S"]).output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (false, "not installed".into()),
        Err(e) => (false, e.to_string()),
        Ok(out) if out.status.success() => {
            let rules = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("-A"))
                .count();
            (true, format!("nat table readable ({rules} rules)"))
        }
        Ok(out) => (false, short(String::from_utf8_lossy(&out.stderr).trim())),
    }
}

fn modes(probes: &[Probe]) -> Vec<ModeStatus> {
    let status = |mode: Mode| {
        let missing: Vec<String> = probes
            .iter()
            .filter(|p| !p.ok && p.needed_by.contains(&mode))
            .map(|p| p.name.clone())
            .collect();
        ModeStatus {
            mode,
            usable: missing.is_empty(),
            missing,
        }
    };
    let ebpf = status(Mode::Ebpf);
    let mut iptables = status(Mode::Iptables);
    if !probes.iter().any(|p| p.id.starts_with("iptables.") && p.ok) {
        iptables.usable = false;
        iptables
            .missing
            .push("an iptables backend with a nat table (iptables-legacy or iptables-nft)".into());
    }
    vec![ebpf, iptables]
}

impl Probe {
    fn new(id: &str, name: &str, ok: bool, detail: String, needed_by: &[Mode]) -> Self {
        Self {
            id: id.to_owned(),
            name: name.to_owned(),
            ok,
            detail,
            needed_by: needed_by.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(id: &str, ok: bool, needed: &[Mode]) -> Probe {
        Probe::new(id, id, ok, String::new(), needed)
    }

    #[test]
    fn mode_needs_its_probes_and_one_iptables_backend() {
        let probes = vec![
            probe("prog.sk_msg", true, &[Mode::Ebpf]),
            probe("caps", true, &[Mode::Ebpf, Mode::Iptables]),
            probe("iptables.legacy", false, &[]),
            probe("iptables.nft", true, &[]),
        ];
        let m = modes(&probes);
        assert!(m.iter().all(|s| s.usable));
        let report = Report { probes, modes: m }.with_failed("prog.sk_msg", "pretend");
        assert!(!report.usable(Mode::Ebpf));
        assert!(report.usable(Mode::Iptables));
        assert_eq!(report.modes[0].missing, vec!["prog.sk_msg".to_owned()]);
    }

    #[test]
    fn no_iptables_backend() {
        let probes = vec![
            probe("iptables.legacy", false, &[]),
            probe("iptables.nft", false, &[]),
        ];
        let m = modes(&probes);
        assert!(m[0].usable);
        assert!(!m[1].usable);
    }

    #[test]
    fn render_marks_rows() {
        let probes = vec![
            probe("a", true, &[]),
            probe("bb", false, &[Mode::Ebpf]),
            probe("opt", false, &[]),
        ];
        let r = Report {
            modes: modes(&probes),
            probes,
        };
        let text = r.render();
        assert!(text.contains("✓ a "));
        assert!(text.contains("✗ bb"));
        assert!(
            text.contains("\nnot here, and no mode needs it:\n– opt: "),
            "optional and missing: {text}"
        );
        assert!(!text.contains("✗ opt") && !text.contains("✓ opt"), "{text}");
        assert!(text.contains("mode ebpf     NOT usable: missing bb"));
    }
}
