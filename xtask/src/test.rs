//! `cargo xtask test`: formatting, clippy, unit tests, the Kubernetes
//! manifests, then the kernel integration tests as root, one at a time.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, bail};

use crate::{
    build, cmd,
    setup::{self, EbpfToolchain},
};

/// Environment variable that turns a kernel test's skip into a failure.
pub const NO_SKIP: &str = "MESH_REDIRECT_NO_SKIP";
/// Where kernel tests find the agent binary.
pub const AGENT_BIN_ENV: &str = "MESH_REDIRECT_BIN";
/// Where kernel tests find the agent's image (an OCI archive).
pub const AGENT_IMAGE_ENV: &str = "MESH_REDIRECT_IMAGE";

pub fn run(filter: Option<&str>, kernel_only: bool) -> Result<()> {
    let tc = setup::ensure(&[setup::Need::Tests, setup::Need::Clients, setup::Need::Demo])?;
    if !kernel_only {
        crate::layering::check(&build::root().join("agent/src"))?;
        let fmt = ["fmt", "--all", "--check"];
        cmd::run(Command::new("cargo").current_dir(build::root()).args(fmt))?;
        let clippy = [
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ];
        cmd::run(build::cargo(&tc).args(clippy))?;
        cmd::run(build::cargo(&tc).args(["test", "--workspace", "--exclude", "tests"]))?;
        crate::manifests::run()?;
    }
    // The image tests run the image an operator gets (the release build);
    // its base is cached under target/image after the first time. A run
    // for some tests only (a filter) uses the image built last, if any.
    let image = if filter.is_none() {
        setup::ensure_packages(&[setup::Need::Image])?;
        build::build(&tc, true)?;
        Some(crate::image::build_image(
            &build::root().join(build::DIST_BIN),
        )?)
    } else {
        Some(crate::image::archive()).filter(|a| a.is_file())
    };
    let agent = build::build(&tc, false)?;
    let binaries = kernel_test_binaries(&tc)?;
    run_kernel_tests(&binaries, &agent, image.as_deref(), filter)
}

/// Builds the kernel integration test binaries; returns their paths.
pub fn kernel_test_binaries(tc: &EbpfToolchain) -> Result<Vec<PathBuf>> {
    let out = cmd::output(build::cargo(tc).args([
        "test",
        "--package",
        "tests",
        "--tests",
        "--no-run",
        "--message-format=json",
    ]))?;
    if !out.status.success() {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        bail!("building the kernel tests failed");
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["profile"]["test"] == true
            && msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
            && let Some(exe) = msg["executable"].as_str()
        {
            bins.push(PathBuf::from(exe));
        }
    }
    bins.sort();
    if bins.is_empty() {
        bail!("no kernel test binaries were built");
    }
    Ok(bins)
}

/// `datapath-8264ecea13435704` -> `datapath`
pub fn binary_name(path: &Path) -> String {
    let file = path.file_name().unwrap_or_default().to_string_lossy();
    match file.rsplit_once('-') {
        Some((name, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            name.to_owned()
        }
        _ => file.into_owned(),
    }
}

/// Fails unless root; says whether a skip is a failure in this run.
pub fn check_kernel_test_host() -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "the kernel integration tests need root (they create network namespaces, cgroups and attach eBPF programs)"
        );
    }
    let strict = std::env::var(NO_SKIP).is_ok_and(|v| v == "1");
    eprintln!(
        "kernel tests: {NO_SKIP}={} ({})",
        u8::from(strict),
        if strict {
            "a skipped test fails"
        } else {
            "tests may skip with a reason"
        }
    );
    Ok(())
}

/// A kernel test binary's command line: directly (no cargo), one test at
/// a time, the agent given, only the tests matching `filter`.
pub fn kernel_test_command(bin: &Path, agent: &Path, filter: Option<&str>) -> Command {
    let mut c = Command::new(bin);
    c.arg("--test-threads=1").env(AGENT_BIN_ENV, agent);
    if let Some(f) = filter {
        c.arg(f);
    }
    c
}

/// Runs each test binary directly (no cargo), as root, one test at a time;
/// `image` is the agent's image for the tests that run it.
pub fn run_kernel_tests(
    binaries: &[PathBuf],
    agent: &Path,
    image: Option<&Path>,
    filter: Option<&str>,
) -> Result<()> {
    check_kernel_test_host()?;
    let mut failed = Vec::new();
    for bin in binaries {
        let name = bin.file_name().and_then(|n| n.to_str()).unwrap_or("?");
        eprintln!("kernel tests: {name} (as root, --test-threads=1)");
        let mut c = kernel_test_command(bin, agent, filter);
        if let Some(image) = image {
            c.env(AGENT_IMAGE_ENV, image);
        }
        if cmd::run(&mut c).is_err() {
            failed.push(name.to_owned());
        }
    }
    if !failed.is_empty() {
        bail!("kernel tests failed: {}", failed.join(", "));
    }
    eprintln!(
        "kernel tests: all passed ({} binaries; agent {})",
        binaries.len(),
        agent.display()
    );
    Ok(())
}
