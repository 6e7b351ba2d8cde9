//! `doctor` against the real kernel: every probe of the eBPF mode passes on
//! a supported kernel, a missing helper is reported as missing, the bpffs
//! state is told as it is, and a bad `--cgroup` is named as the fault.

use std::process::Command;

use agent::doctor::{self, Mode};
use aya::{programs::ProgramType, sys::BpfHelper};
use tests::{agent_bin, require_root, shell_quote};

/// Runs `doctor --json` in a private mount namespace after `setup` (shell),
/// so the host's own mounts stay as they are.
fn doctor_json_in_mount_ns(setup: &str) -> (serde_json::Value, i32) {
    let bin = shell_quote(&agent_bin().to_string_lossy());
    let inner = format!("mount --make-rprivate / && {setup} && exec {bin} doctor --json");
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &inner])
        .output()
        .unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json gave no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (json, out.status.code().unwrap_or(-1))
}

fn probe<'a>(report: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    report["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .unwrap_or_else(|| panic!("no probe {id}"))
}

#[test]
fn ebpf_mode_is_usable_on_this_kernel() {
    require_root!();
    let report = doctor::run(&doctor::Options::default());
    let failed: Vec<_> = report
        .probes
        .iter()
        .filter(|p| !p.ok && p.needed_by.contains(&Mode::Ebpf))
        .map(|p| format!("{}: {}", p.name, p.detail))
        .collect();
    assert!(
        failed.is_empty(),
        "eBPF probes failed: {failed:?}\n{}",
        report.render()
    );
    assert!(report.usable(Mode::Ebpf));
    assert!(report.usable(Mode::Iptables), "{}", report.render());
    // Every probe row is ✓: what no mode needs is listed after the modes
    // when missing, never as a failed probe.
    let text = report.render();
    let table = text.split("\n\n").next().unwrap_or_default();
    assert!(
        !table.is_empty() && table.lines().all(|l| l.starts_with('✓')),
        "{text}"
    );
    let (json, code) = doctor_json_in_mount_ns("true");
    assert_eq!(code, 0, "doctor exit code");
    assert_eq!(json["modes"][0]["mode"], "ebpf");
    assert_eq!(json["modes"][0]["usable"], true);
}

#[test]
fn a_helper_a_program_type_cannot_call_is_reported_missing() {
    require_root!();
    // bpf_msg_redirect_hash exists, but not for socket filters.
    let (ok, detail) = doctor::helper_probe(
        ProgramType::SocketFilter,
        BpfHelper::BPF_FUNC_msg_redirect_hash,
    );
    assert!(!ok, "{detail}");
    assert!(detail.contains("not available"), "{detail}");
    // A helper id no kernel knows.
    let (ok, _) = doctor::helper_probe(ProgramType::SkMsg, BpfHelper::__BPF_FUNC_MAX_ID);
    assert!(!ok);
    // And one it does.
    let (ok, detail) =
        doctor::helper_probe(ProgramType::SkMsg, BpfHelper::BPF_FUNC_msg_redirect_hash);
    assert!(ok, "{detail}");
}

#[test]
fn bpffs_state_is_reported_as_it_is() {
    require_root!();
    let unmount = "{ umount -l /sys/fs/bpf 2>/dev/null; true; }";
    let (r, code) = doctor_json_in_mount_ns(unmount);
    let p = probe(&r, "mount.bpffs");
    assert_eq!(p["ok"], true, "root can mount it: {p}");
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("not mounted; `run` will mount it"),
        "{p}"
    );
    assert_eq!(code, 0);

    let (r, _) = doctor_json_in_mount_ns(&format!("{unmount} && mount -t bpf bpf /sys/fs/bpf"));
    let p = probe(&r, "mount.bpffs");
    assert_eq!(p["ok"], true, "{p}");
    assert_eq!(p["detail"], "/sys/fs/bpf");

    let (r, _) =
        doctor_json_in_mount_ns(&format!("{unmount} && mount -t bpf -o ro bpf /sys/fs/bpf"));
    let p = probe(&r, "mount.bpffs");
    assert_eq!(p["ok"], false, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("read-only"), "{p}");
}

#[test]
fn doctor_names_a_cgroup_path_that_is_not_cgroup2() {
    let out = Command::new(agent_bin())
        .args(["doctor", "--cgroup", "/proc/self"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--cgroup") && err.contains("/proc/self"),
        "{err}"
    );
    let out = Command::new(agent_bin())
        .args(["doctor", "--cgroup", "/nonexistent/cg"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cg"));
}

/// The start-up probe of sockmap readers measures this kernel (the same
/// answer twice), `doctor` reports it, and an agent follows it: blocking
/// sockets stay on plain TCP exactly where a blocking read in a sockmap
/// was seen to return EAGAIN.
#[test]
fn the_sockmap_reader_probe_decides_which_sockets_are_short_circuited() {
    require_root!();
    let first = agent::ebpf::reads::probe().expect("probe");
    let second = agent::ebpf::reads::probe().expect("probe");
    assert_eq!(first, second, "the probe is stable");
    let (json, code) = doctor_json_in_mount_ns("true");
    assert_eq!(code, 0);
    let row = probe(&json, "sockmap.reads");
    assert_eq!(row["ok"], first.ingress_charged, "{row}");
    assert_eq!(row["detail"], first.describe(), "{row}");
    let topo = tests::topology::Topology::new();
    let agent = topo.run_agent(
        tests::RedirectMode::Ebpf,
        tests::topology::Placement::Outside,
        &[],
    );
    let expected = if first.blocking_reads_fail() {
        "nonblocking"
    } else {
        "all"
    };
    assert_eq!(agent.short_circuits(), expected, "{first:?}");
}
