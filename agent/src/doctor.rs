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

use serde::Serialize;

use crate::{
    bpf_sys::{self, attach_type as at, map_type, prog_type as pt},
    caps, cgroup, mounts,
};

/// A redirect mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Ebpf,
    Iptables,
}

impl Mode {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Iptables => "iptables",
        }
    }
}

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
}

/// Helper ids (`enum bpf_func_id`).
mod helper {
    pub const SOCKET_COOKIE: i32 = 46;
    pub const SOCK_HASH_UPDATE: i32 = 70;
    pub const MSG_REDIRECT_HASH: i32 = 71;
    pub const SK_STORAGE_GET: i32 = 107;
    pub const NETNS_COOKIE: i32 = 122;
}

const EBPF: &[Mode] = &[Mode::Ebpf];
const BOTH: &[Mode] = &[Mode::Ebpf, Mode::Iptables];

/// Runs every probe.
#[must_use]
pub fn run(opts: &Options) -> Report {
    let caps = caps::effective();
    let mut probes = vec![caps_probe(caps.as_ref())];
    probes.extend(program_probes());
    let r = bpf_sys::create_map(map_type::SOCKHASH, 24, 4, 1);
    probes.push(Probe::new(
        "map.sockhash",
        "SOCKHASH map",
        r.is_ok(),
        r.map_or_else(|e| e.to_string(), |_| "created".to_owned()),
        EBPF,
    ));
    probes.extend(helper_probes());
    probes.extend(object_probes());

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

/// Each program type, loaded for the attach type we use it with.
fn program_probes() -> Vec<Probe> {
    [
        (
            "prog.connect4",
            "cgroup sock_addr (connect4)",
            pt::CGROUP_SOCK_ADDR,
            at::CGROUP_INET4_CONNECT,
        ),
        (
            "prog.getpeername4",
            "cgroup sock_addr (getpeername4)",
            pt::CGROUP_SOCK_ADDR,
            at::CGROUP_INET4_GETPEERNAME,
        ),
        ("prog.sock_ops", "sock_ops", pt::SOCK_OPS, 0),
        ("prog.sk_msg", "sk_msg", pt::SK_MSG, 0),
        (
            "prog.getsockopt",
            "cgroup sockopt (getsockopt)",
            pt::CGROUP_SOCKOPT,
            at::CGROUP_GETSOCKOPT,
        ),
        ("prog.sk_lookup", "sk_lookup", pt::SK_LOOKUP, at::SK_LOOKUP),
    ]
    .into_iter()
    .map(|(id, name, ptype, attach)| {
        let r = bpf_sys::load_probe_program(ptype, attach, None, 1);
        let ok = r.is_ok();
        let detail = r.map_or_else(|e| short(&e.to_string()), |_| "loads".to_owned());
        Probe::new(id, name, ok, detail, EBPF)
    })
    .collect()
}

/// Each helper, in each program type that calls it.
fn helper_probes() -> Vec<Probe> {
    use helper::{
        MSG_REDIRECT_HASH, NETNS_COOKIE, SK_STORAGE_GET, SOCK_HASH_UPDATE, SOCKET_COOKIE,
    };
    let connect4 = (pt::CGROUP_SOCK_ADDR, at::CGROUP_INET4_CONNECT);
    let sock_ops = (pt::SOCK_OPS, 0);
    let sk_msg = (pt::SK_MSG, 0);
    let getsockopt = (pt::CGROUP_SOCKOPT, at::CGROUP_GETSOCKOPT);
    [
        (
            "helper.socket_cookie.connect4",
            "bpf_get_socket_cookie in connect4",
            SOCKET_COOKIE,
            connect4,
        ),
        (
            "helper.socket_cookie.sock_ops",
            "bpf_get_socket_cookie in sock_ops",
            SOCKET_COOKIE,
            sock_ops,
        ),
        (
            "helper.netns_cookie.connect4",
            "bpf_get_netns_cookie in connect4",
            NETNS_COOKIE,
            connect4,
        ),
        (
            "helper.netns_cookie.sock_ops",
            "bpf_get_netns_cookie in sock_ops",
            NETNS_COOKIE,
            sock_ops,
        ),
        (
            "helper.netns_cookie.sk_msg",
            "bpf_get_netns_cookie in sk_msg",
            NETNS_COOKIE,
            sk_msg,
        ),
        (
            "helper.netns_cookie.getsockopt",
            "bpf_get_netns_cookie in getsockopt",
            NETNS_COOKIE,
            getsockopt,
        ),
        (
            "helper.sock_hash_update",
            "bpf_sock_hash_update in sock_ops",
            SOCK_HASH_UPDATE,
            sock_ops,
        ),
        (
            "helper.msg_redirect_hash",
            "bpf_msg_redirect_hash in sk_msg",
            MSG_REDIRECT_HASH,
            sk_msg,
        ),
        (
            "helper.sk_storage.sock_ops",
            "bpf_sk_storage_get in sock_ops",
            SK_STORAGE_GET,
            sock_ops,
        ),
        (
            "helper.sk_storage.sk_msg",
            "bpf_sk_storage_get in sk_msg",
            SK_STORAGE_GET,
            sk_msg,
        ),
    ]
    .into_iter()
    .map(|(id, name, helper, (ptype, attach))| {
        let (ok, detail) = helper_probe(ptype, attach, helper);
        Probe::new(id, name, ok, detail, EBPF)
    })
    .collect()
}

/// Loads our own eBPF object (maps and programs, nothing attached, all
/// closed again): the probes above say the hooks exist, this says this
/// kernel's verifier accepts our programs (6.1's is stricter than later
/// ones about pointer arithmetic, for one).
fn object_probes() -> [Probe; 2] {
    let r = crate::ebpf::Datapath::load(&crate::ebpf::LoadOptions::default(), None);
    let backpressure = match &r {
        Ok(dp) => Probe::new(
            "prog.fexit_recvmsg",
            "fexit on tcp_bpf_recvmsg (short-circuit backpressure)",
            dp.backpressure().is_ok(),
            dp.backpressure().map_or_else(
                |why| {
                    format!(
                        "{why}; instead the built-in proxy reports its reads, and other readers get the queue limit short-circuited per connection and direction"
                    )
                },
                |()| "loaded".to_owned(),
            ),
            &[],
        ),
        Err(_) => Probe::new(
            "prog.fexit_recvmsg",
            "fexit on tcp_bpf_recvmsg (short-circuit backpressure)",
            false,
            "our object did not load".to_owned(),
            &[],
        ),
    };
    let object = Probe::new(
        "object.load",
        "our programs pass the verifier",
        r.is_ok(),
        r.map_or_else(
            |e| verifier_verdict(&e.to_string()),
            |_| "loaded (not attached)".to_owned(),
        ),
        EBPF,
    );
    [object, backpressure]
}

/// The gist of a load error: its first line, and the verifier's reason (the
/// last line of its log that is not a statistic).
pub(crate) fn verifier_verdict(error: &str) -> String {
    let first = short(error);
    let first = first
        .split(" Verifier output:")
        .next()
        .unwrap_or_default()
        .trim_end_matches('.');
    // The verifier's reason, if it gave one: the last telling line of its
    // log (empty when the kernel refused the load before verifying).
    let reason = error
        .split_once("Verifier output:")
        .map_or("", |(_, log)| log)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| {
            !l.is_empty()
                && !l.starts_with("verification time")
                && !l.starts_with("stack depth")
                && !l.starts_with("processed ")
        });
    match reason {
        Some(r) if !first.contains(r) => format!("{first}: {r}"),
        _ => first.to_owned(),
    }
}

fn short(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_owned()
}

/// Whether `helper` is callable from `ptype` programs: loads a program that
/// calls it and reads the verifier's verdict (libbpf's method).
#[must_use]
pub fn helper_probe(ptype: u32, attach: u32, helper: i32) -> (bool, String) {
    match bpf_sys::load_probe_program(ptype, attach, Some(helper), 1) {
        Ok(_) => (true, "available".to_owned()),
        Err(e) => {
            const UNKNOWN: [&str; 3] = [
                "invalid func ",
                "unknown func ",
                "program of this type cannot use helper ",
            ];
            if UNKNOWN.iter().any(|u| e.log.contains(u)) {
                (
                    false,
                    format!("not available to this program type: {}", short(&e.log)),
                )
            } else if e.log.is_empty() {
                (false, format!("probe failed: {}", e.source))
            } else {
                // The verifier got past the call (it rejected the arguments of
                // our minimal program): the helper exists for this type.
                (true, "available".to_owned())
            }
        }
    }
}

/// Attaches a pass-through connect4 program to a throwaway child cgroup via
/// bpf_link, asks the kernel what is attached, and removes both.
fn cgroup_link_probe(cg2: Option<&Path>) -> Probe {
    let name = "bpf_link on cgroups";
    let needed = &[Mode::Ebpf][..];
    let Some(root) = cg2 else {
        return Probe::new(
            "link.cgroup",
            name,
            false,
            "no cgroup2 mount to probe with".into(),
            needed,
        );
    };
    let dir = root.join(format!("mesh-redirect-probe-{}", std::process::id()));
    if let Err(e) = fs::create_dir(&dir) {
        return Probe::new(
            "link.cgroup",
            name,
            false,
            format!("cannot create probe cgroup {}: {e}", dir.display()),
            needed,
        );
    }
    let result = (|| -> Result<String, String> {
        let prog =
            bpf_sys::load_probe_program(pt::CGROUP_SOCK_ADDR, at::CGROUP_INET4_CONNECT, None, 1)
                .map_err(|e| e.to_string())?;
        let cg = fs::File::open(&dir).map_err(|e| e.to_string())?;
        let link = bpf_sys::link_create(&prog, &cg, at::CGROUP_INET4_CONNECT)
            .map_err(|e| format!("BPF_LINK_CREATE: {e}"))?;
        let n = bpf_sys::prog_query(&cg, at::CGROUP_INET4_CONNECT)
            .map_err(|e| format!("BPF_PROG_QUERY: {e}"))?
            .len();
        drop(link);
        if n == 1 {
            Ok("link created and seen by BPF_PROG_QUERY".into())
        } else {
            Err(format!("query saw {n} programs, expected 1"))
        }
    })();
    let _ = fs::remove_dir(&dir);
    match result {
        Ok(d) => Probe::new("link.cgroup", name, true, d, needed),
        Err(d) => Probe::new("link.cgroup", name, false, d, needed),
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
    fn verifier_verdict_names_the_program_and_the_reason() {
        let err = "eBPF program mesh_getsockopt: the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier output: 0: R1=ctx() R10=fp0\n60: (07) r9 += 24\nR9 pointer arithmetic on sock prohibited\nverification time 707 usec\nstack depth 80+0\n";
        assert_eq!(
            verifier_verdict(err),
            "eBPF program mesh_getsockopt: the BPF_PROG_LOAD syscall returned Permission denied (os error 13): R9 pointer arithmetic on sock prohibited"
        );
        assert_eq!(verifier_verdict("no object embedded"), "no object embedded");
        // Refused before the verifier ran: no reason to add.
        assert_eq!(
            verifier_verdict(
                "the BPF_PROG_LOAD syscall returned Operation not permitted (os error 1). Verifier output:"
            ),
            "the BPF_PROG_LOAD syscall returned Operation not permitted (os error 1)"
        );
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
