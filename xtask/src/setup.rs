//! `cargo xtask setup`: detect, and install when missing, everything the
//! eBPF build and the kernel tests need.
//!
//! The recipe is the one in TOOLCHAIN.md: `-Z build-std=core` for
//! `bpfel-unknown-none` needs a compiler whose standard library sources are
//! installed. A rustup nightly with `rust-src` is used where one exists (a
//! developer's machine); otherwise Debian's `rustc-web`/`cargo-web`/
//! `rust-web-src`, whose sources match `/usr/bin/rustc` exactly. `bpf-linker`
//! must be built against the same LLVM major version as that compiler.
//!
//! Every step checks first and changes nothing when its piece is present.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{self, stdout_of};

/// The compiler xtask uses for the eBPF crate.
#[derive(Debug, Clone)]
pub struct EbpfToolchain {
    /// Human description printed in logs.
    pub describe: String,
    pub cargo: PathBuf,
    pub rustc: PathBuf,
    /// `RUSTC_BOOTSTRAP=1` is needed for `-Z build-std` on a stable-channel compiler.
    pub bootstrap: bool,
    pub llvm_major: u32,
}

/// What a caller needs besides the eBPF toolchain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// iptables (legacy and nft), iproute2: the kernel integration tests.
    Tests,
    /// curl, the demo's HTTP client.
    Demo,
    /// HAProxy, the peer proxy `bench` compares against.
    Bench,
    /// qemu and kmod for `vm-test` (it writes its initramfs itself).
    Vm,
}

impl Need {
    fn packages(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Tests => &[
                (
                    "iptables",
                    "kernel tests exercise the iptables REDIRECT mode",
                ),
                (
                    "iproute2",
                    "kernel tests create network namespaces and veth pairs",
                ),
                (
                    "haproxy",
                    "kernel tests use it as a third-party transparent proxy",
                ),
            ],
            Self::Demo => &[("curl", "the demo's HTTP client")],
            Self::Bench => &[
                ("haproxy", "the peer proxy the benchmark compares against"),
                (
                    "conntrack",
                    "the benchmark empties a pod's conntrack table before counting its entries",
                ),
            ],
            Self::Vm => &[
                ("qemu-system-x86", "vm-test boots Debian kernels under qemu"),
                (
                    "kmod",
                    "vm-test indexes the guest kernel's modules (depmod); the guest loads them (modprobe)",
                ),
            ],
        }
    }
}

const DEBIAN_RUST: [&str; 3] = ["rustc-web", "cargo-web", "rust-web-src"];
const DEBIAN_RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library";

/// Ensures the eBPF toolchain (and what `needs` asks for) is present,
/// installing what is missing. Returns the toolchain to build with.
pub fn ensure(needs: &[Need]) -> Result<EbpfToolchain> {
    let toolchain = ensure_compiler()?;
    ensure_bpf_linker(&toolchain)?;
    let pkgs: Vec<(&str, &str)> = needs
        .iter()
        .flat_map(|n| n.packages().iter().copied())
        .collect();
    apt_ensure(&pkgs)?;
    Ok(toolchain)
}

fn ensure_compiler() -> Result<EbpfToolchain> {
    if let Some(tc) = rustup_nightly_with_src() {
        eprintln!(
            "setup: eBPF compiler: {} (rustup nightly with rust-src)",
            tc.describe
        );
        return Ok(tc);
    }
    let why = "no rustup nightly with rust-src here; Debian's rustc-web ships \
               the compiler with its exact std sources for -Z build-std";
    apt_ensure(&DEBIAN_RUST.map(|p| (p, why)))?;
    let rustc = PathBuf::from("/usr/bin/rustc");
    let cargo = PathBuf::from("/usr/bin/cargo");
    if !Path::new(DEBIAN_RUST_SRC).is_dir() {
        bail!("{DEBIAN_RUST_SRC} is missing although rust-web-src is installed");
    }
    let llvm_major = llvm_major(&rustc)?;
    let version = stdout_of(Command::new(&rustc).arg("-V")).unwrap_or_default();
    Ok(EbpfToolchain {
        describe: format!(
            "{version} at {} (Debian rustc-web, LLVM {llvm_major})",
            rustc.display()
        ),
        cargo,
        rustc,
        bootstrap: true,
        llvm_major,
    })
}

fn rustup_nightly_with_src() -> Option<EbpfToolchain> {
    let installed =
        stdout_of(Command::new("rustup").args(["+nightly", "component", "list", "--installed"]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        return None;
    }
    let rustc = PathBuf::from(stdout_of(
        Command::new("rustup").args(["+nightly", "which", "rustc"]),
    )?);
    let cargo = PathBuf::from(stdout_of(
        Command::new("rustup").args(["+nightly", "which", "cargo"]),
    )?);
    let llvm_major = llvm_major(&rustc).ok()?;
    let version = stdout_of(Command::new(&rustc).arg("-V"))?;
    Some(EbpfToolchain {
        describe: format!("{version} (LLVM {llvm_major})"),
        cargo,
        rustc,
        bootstrap: false,
        llvm_major,
    })
}

/// The LLVM major version a rustc was built with (`rustc -vV`).
fn llvm_major(rustc: &Path) -> Result<u32> {
    let vv = stdout_of(Command::new(rustc).arg("-vV"))
        .with_context(|| format!("{} -vV failed", rustc.display()))?;
    parse_llvm_major(&vv).with_context(|| format!("no LLVM version in `{} -vV`", rustc.display()))
}

fn parse_llvm_major(vv: &str) -> Option<u32> {
    vv.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
}

/// Where `cargo install` puts binaries.
fn cargo_bin_dir() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

pub fn bpf_linker_path() -> PathBuf {
    cargo_bin_dir().join("bpf-linker")
}

/// The LLVM major a bpf-linker binary is dynamically linked against.
fn linked_llvm_major(bin: &Path) -> Option<u32> {
    let ldd = stdout_of(Command::new("ldd").arg(bin))?;
    ldd.lines().find_map(|l| {
        let l = l.trim();
        let rest = l.strip_prefix("libLLVM")?;
        // libLLVM.so.22.1 or libLLVM-22.so
        let digits: String = rest
            .trim_start_matches(['.', '-'])
            .trim_start_matches("so.")
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    })
}

fn ensure_bpf_linker(tc: &EbpfToolchain) -> Result<()> {
    let major = tc.llvm_major;
    let bin = bpf_linker_path();
    if bin.exists() {
        match linked_llvm_major(&bin) {
            Some(m) if m == major => {
                eprintln!("setup: bpf-linker: {} (LLVM {m})", bin.display());
                return Ok(());
            }
            Some(m) => eprintln!(
                "setup: bpf-linker at {} uses LLVM {m}, the eBPF compiler uses LLVM {major}: rebuilding",
                bin.display()
            ),
            None => eprintln!(
                "setup: bpf-linker at {} is not linked against a shared LLVM we can check: rebuilding against LLVM {major}",
                bin.display()
            ),
        }
    }
    let llvm_dev = format!("llvm-{major}-dev");
    let polly_dev = format!("libpolly-{major}-dev");
    let why = "bpf-linker links against the LLVM the eBPF compiler was built with";
    apt_ensure(&[(llvm_dev.as_str(), why), (polly_dev.as_str(), why)])?;
    eprintln!("setup: installing bpf-linker built against LLVM {major} (about a minute)");
    let mut install = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    install
        .env("LLVM_PREFIX", format!("/usr/lib/llvm-{major}"))
        .args([
            "install",
            "bpf-linker",
            "--force",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"));
    // Build with the host toolchain, whatever overrides an outer cargo set.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        install.env_remove(var);
    }
    cmd::run(&mut install)?;
    match linked_llvm_major(&bin) {
        Some(m) if m == major => Ok(()),
        other => bail!(
            "bpf-linker was installed at {} but links LLVM {other:?}, expected {major}",
            bin.display()
        ),
    }
}

fn dpkg_installed(pkg: &str) -> bool {
    stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s == "install ok installed")
}

/// Installs the Debian packages among `pkgs` that are missing, saying why.
fn apt_ensure(pkgs: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<_> = pkgs.iter().filter(|(p, _)| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (p, why) in &missing {
        eprintln!("setup: installing Debian package {p}: {why}");
    }
    let names: Vec<&str> = missing.iter().map(|(p, _)| *p).collect();
    if !cmd::is_root() {
        bail!(
            "missing Debian packages {}; run as root or install them: apt-get install -y {}",
            names.join(", "),
            names.join(" ")
        );
    }
    let install = || {
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&names);
        cmd::run(&mut c)
    };
    if install().is_err() {
        eprintln!("setup: apt-get install failed; refreshing the package lists and retrying");
        cmd::run(Command::new("apt-get").arg("update"))?;
        install()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_llvm_major;

    #[test]
    fn llvm_major_from_rustc_vv() {
        let vv = "rustc 1.96.0 (abc 2026-05-01)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: 1.96.0\nLLVM version: 22.1.8\n";
        assert_eq!(parse_llvm_major(vv), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0\n"), None);
    }
}
