//! `cargo xtask build`: the eBPF object (through agent/build.rs) and the agent.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::{
    cmd,
    setup::{self, EbpfToolchain},
};

pub const AGENT_BIN: &str = "mesh-redirect";
pub const EBPF_OBJECT: &str = "target/ebpf/bpfel-unknown-none/release/agent-ebpf";

/// The workspace root (xtask's manifest dir is `<root>/xtask`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// A `cargo` command for the host build, with the environment that makes
/// agent/build.rs build the eBPF object with `tc`.
pub fn cargo(tc: &EbpfToolchain) -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root())
        .env("AGENT_BUILD_EBPF", "1")
        .env("AGENT_EBPF_CARGO", &tc.cargo)
        .env("AGENT_EBPF_RUSTC", &tc.rustc)
        .env("AGENT_EBPF_BOOTSTRAP", if tc.bootstrap { "1" } else { "0" })
        .env(
            "AGENT_EBPF_LINKER_DIR",
            setup::bpf_linker_path().parent().expect("bin dir"),
        );
    c
}

/// Builds the agent (and so the eBPF object). Returns the agent binary.
pub fn build(tc: &EbpfToolchain, release: bool) -> Result<PathBuf> {
    eprintln!(
        "build: eBPF object agent-ebpf for bpfel-unknown-none with {}",
        tc.describe
    );
    let mut c = cargo(tc);
    c.args(["build", "--package", "agent", "--bin", AGENT_BIN]);
    if release {
        c.arg("--release");
    }
    cmd::run(&mut c)?;
    report_object()?;
    let bin = root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join(AGENT_BIN);
    eprintln!("build: agent binary {}", bin.display());
    if release {
        stage_dist(&bin)?;
    }
    Ok(bin)
}

/// The binary an image ships ([`DIST_BIN`]): the release build without its
/// debug information (kept in the release build for `perf` and the bench),
/// 9 MB instead of 53.
pub const DIST_BIN: &str = "target/dist/mesh-redirect";

fn stage_dist(bin: &Path) -> Result<()> {
    setup::ensure_packages(&[setup::Need::Dist])?;
    let dist = root().join(DIST_BIN);
    std::fs::create_dir_all(dist.parent().expect("a directory"))?;
    cmd::run(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(bin)
            .arg(&dist),
    )?;
    eprintln!("build: image binary {DIST_BIN} (debug information stripped)");
    Ok(())
}

fn report_object() -> Result<()> {
    let path = root().join(EBPF_OBJECT);
    let len = std::fs::metadata(&path)
        .with_context(|| format!("eBPF object {} missing after the build", path.display()))?
        .len();
    let sections = cmd::stdout_of(
        Command::new("llvm-objdump-22")
            .arg("--section-headers")
            .arg(&path),
    )
    .map(|out| {
        out.lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|s| {
                s.starts_with("cgroup/")
                    || s.starts_with("fexit/")
                    || ["sockops", "sk_msg", "sk_lookup"].contains(s)
            })
            .collect::<Vec<_>>()
            .join(" ")
    })
    .unwrap_or_default();
    eprintln!(
        "build: eBPF object {} ({len} bytes) programs in sections: {sections}",
        path.display()
    );
    Ok(())
}
