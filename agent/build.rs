//! Builds the eBPF object when xtask asks (`AGENT_BUILD_EBPF=1`), and
//! otherwise writes an empty stub so `cargo check`/`clippy` need no BPF
//! toolchain. xtask passes the toolchain it set up: `AGENT_EBPF_CARGO`,
//! `AGENT_EBPF_RUSTC`, `AGENT_EBPF_BOOTSTRAP` (1 for a stable-channel
//! compiler), `AGENT_EBPF_LINKER_DIR` (where bpf-linker is).

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// Where the nested eBPF build leaves its object, relative to the workspace.
const BUILT_OBJECT: &str = "target/ebpf/bpfel-unknown-none/release/agent-ebpf";

fn main() -> Result<()> {
    for var in [
        "AGENT_BUILD_EBPF",
        "AGENT_EBPF_CARGO",
        "AGENT_EBPF_RUSTC",
        "AGENT_EBPF_BOOTSTRAP",
        "AGENT_EBPF_LINKER_DIR",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR")?).join("agent-ebpf.o");
    if env::var("AGENT_BUILD_EBPF").as_deref() != Ok("1") {
        fs::write(&out, b"").context("writing the eBPF stub")?;
        return Ok(());
    }
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.parent().context("workspace root")?.to_owned();
    for dir in [
        "agent-ebpf/src",
        "agent-ebpf/Cargo.toml",
        "agent-common/src",
        "agent-common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    let object = build(&root)?;
    fs::copy(&object, &out).with_context(|| format!("copying {}", object.display()))?;
    Ok(())
}

fn build(root: &Path) -> Result<PathBuf> {
    let var = |name: &str| {
        env::var_os(name)
            .with_context(|| format!("{name} not set: build through `cargo xtask build`"))
    };
    let cargo = var("AGENT_EBPF_CARGO")?;
    let rustc = var("AGENT_EBPF_RUSTC")?;
    let target_dir = root.join("target").join("ebpf");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root)
        .args([
            "build",
            "--locked",
            "--package",
            "agent-ebpf",
            "--bins",
            "--release",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC", &rustc)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                "--cfg=bpf_target_arch=\"x86_64\"",
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
            ]
            .join("\x1f"),
        );
    // The outer cargo's settings are for the host build, not this one.
    for v in [
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(v);
    }
    if env::var("AGENT_EBPF_BOOTSTRAP").as_deref() == Ok("1") {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    if let Some(dir) = env::var_os("AGENT_EBPF_LINKER_DIR") {
        let mut path = dir;
        path.push(":");
        path.push(env::var_os("PATH").unwrap_or_default());
        cmd.env("PATH", path);
    }
    let status = cmd
        .status()
        .with_context(|| format!("running {}", Path::new(&cargo).display()))?;
    if !status.success() {
        bail!(
            "building agent-ebpf failed ({status}); run `cargo xtask setup` if the toolchain is missing"
        );
    }
    let object = root.join(BUILT_OBJECT);
    if !object.is_file() {
        bail!("{} was not produced", object.display());
    }
    Ok(object)
}
