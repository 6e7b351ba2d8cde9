//! `cargo xtask setup`: detect, and install when missing, everything the
//! eBPF build and the kernel tests need.
//!
//! The recipe is the one in TOOLCHAIN.md: `-Z build-std=core` for
//! `bpfel-unknown-none` needs a compiler whose standard library sources are
//! installed. A rustup nightly with `rust-src` is used where one exists (a
//! developer's machine); otherwise Debian's `rustc-web`/`cargo-web`/
//! `rust-web-src`, whose sources match `/usr/bin/rustc` exactly. `bpf-linker`
//! must be built against the same LLVM major version as that compiler, and
//! the pinned bpf-linker supports only some LLVM majors: a compiler with
//! another one is not fit, whatever apt calls its newest.
//!
//! Every step checks first and changes nothing when its piece is present.
//! Before its first install, setup refreshes the package lists once: a new
//! machine's lists are the image's, where bookworm offers rustc-web 1.85
//! (LLVM 19) and the current 1.96 (LLVM 22) is in bookworm-security. When
//! even the refreshed lists have nothing fit, it fails naming what it found
//! and what it needs.

use std::{
    env,
    ops::RangeInclusive,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
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
    /// The real clients' runtimes the kernel tests run (Python, the JDK,
    /// Go, Node.js, wget, HAProxy).
    Clients,
    /// curl, the demo's HTTP client.
    Demo,
    /// HAProxy, the peer proxy `bench` compares against.
    Bench,
    /// qemu and kmod for `vm-test` (it writes its initramfs itself).
    Vm,
    /// debootstrap for `fresh-machine`.
    FreshMachine,
    /// yamllint, and Python's venv for kubernetes-validate: `manifests`.
    Manifests,
    /// debootstrap and podman for `image`.
    Image,
    /// objcopy for the release build's image binary (target/dist).
    Dist,
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
                (
                    "podman",
                    "node tests make pods with a real container runtime",
                ),
                (
                    "containernetworking-plugins",
                    "podman's CNI backend: the bridge plugin ours is chained after",
                ),
                (
                    "runc",
                    "podman's OCI runtime on a hybrid cgroup host (crun refuses one)",
                ),
                (
                    "catatonit",
                    "the init of podman's locally built pause image (podman only recommends it)",
                ),
                (
                    "busybox-static",
                    "the node tests' container image, built offline from it and curl",
                ),
                ("curl", "the container image's HTTP client"),
            ],
            Self::Clients => &[
                (
                    "python3",
                    "kernel tests run Python clients and a DNS server",
                ),
                (
                    "openjdk-17-jdk-headless",
                    "kernel tests run JDK clients (javac builds them, jlink cuts a runtime for the VM guests)",
                ),
                (
                    "golang-go",
                    "the conformance suite's Go client (net/http, built by tests/build.rs)",
                ),
                ("wget", "the conformance suite runs wget as a client"),
                (
                    "haproxy",
                    "the conformance suite runs clients through HAProxy",
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
            Self::FreshMachine => &[(
                "debootstrap",
                "fresh-machine builds a clean Debian root to run the README's commands in",
            )],
            Self::Manifests => &[
                (
                    "yamllint",
                    "`manifests` lints the Kubernetes manifests under deploy/",
                ),
                (
                    "python3-venv",
                    "`manifests` installs kubernetes-validate (PyPI) in a virtualenv",
                ),
            ],
            Self::Dist => &[(
                "binutils",
                "objcopy strips the release binary an image ships (target/dist)",
            )],
            Self::Image => &[
                (
                    "debootstrap",
                    "`image` builds the image's Debian base from the package registry",
                ),
                (
                    "podman",
                    "`image` imports the root as a layer and saves the OCI archive",
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

/// The bpf-linker release setup installs, and the LLVM majors it has a
/// cargo feature for (`llvm-21` .. `llvm-23`): the eBPF compiler must be
/// built with one of them.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM: RangeInclusive<u32> = 21..=23;
/// The oldest compiler the workspace builds with (its `rust-version`).
const MIN_RUSTC: (u32, u32) = (1, 87);

/// Ensures the eBPF toolchain (and what `needs` asks for) is present,
/// installing what is missing. Returns the toolchain to build with.
pub fn ensure(needs: &[Need]) -> Result<EbpfToolchain> {
    let toolchain = ensure_compiler()?;
    ensure_bpf_linker(&toolchain)?;
    ensure_packages(needs)?;
    Ok(toolchain)
}

/// Installs the Debian packages `needs` asks for (no eBPF toolchain).
pub fn ensure_packages(needs: &[Need]) -> Result<()> {
    let mut pkgs: Vec<(&str, &str)> = Vec::new();
    for pkg in needs.iter().flat_map(|n| n.packages()) {
        if !pkgs.iter().any(|(p, _)| *p == pkg.0) {
            pkgs.push(*pkg);
        }
    }
    // Any Node.js on PATH will do (NodeSource's, nvm's); Debian's otherwise.
    if needs.contains(&Need::Clients) && cmd::which("node").is_none() {
        pkgs.push(("nodejs", "the conformance suite's Node.js client (http)"));
    }
    apt_ensure(&pkgs)
}

/// Why a compiler cannot build the eBPF crate, or `None` when it can.
fn unfit(version: (u32, u32), llvm_major: u32) -> Option<String> {
    if version < MIN_RUSTC {
        return Some(format!(
            "the workspace needs rustc {}.{} or later",
            MIN_RUSTC.0, MIN_RUSTC.1
        ));
    }
    (!BPF_LINKER_LLVM.contains(&llvm_major)).then(|| {
        format!(
            "bpf-linker {BPF_LINKER_VERSION} supports LLVM {}-{} only",
            BPF_LINKER_LLVM.start(),
            BPF_LINKER_LLVM.end()
        )
    })
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
    if let Some(tc) = debian_rust()? {
        return Ok(tc);
    }
    // Missing, or too old for bpf-linker: a new machine's package lists are
    // the image's, so ask the registry for its current ones first.
    refresh_lists()?;
    apt_install(&DEBIAN_RUST.map(|p| (p, why)))?;
    if let Some(tc) = debian_rust()? {
        return Ok(tc);
    }
    let found = stdout_of(Command::new("/usr/bin/rustc").arg("-vV")).unwrap_or_default();
    bail!(
        "the package registry offers no fit eBPF compiler: after `apt-get update`, Debian's \
         rustc-web is {} ({}), and the eBPF build needs rustc {}.{}+ built with LLVM {}-{} \
         (what bpf-linker {BPF_LINKER_VERSION} supports) with its std sources; add a suite \
         that has it (bookworm-security has rustc-web 1.96 with LLVM 22) or install a rustup \
         nightly with rust-src",
        deb_version("rustc-web").unwrap_or_else(|| "not installable".into()),
        found
            .lines()
            .find(|l| l.starts_with("LLVM"))
            .unwrap_or("no LLVM version"),
        MIN_RUSTC.0,
        MIN_RUSTC.1,
        BPF_LINKER_LLVM.start(),
        BPF_LINKER_LLVM.end()
    )
}

/// Debian's rustc-web, if it is installed, complete and fit for the eBPF
/// build; `None` (after saying why) when it must be installed or upgraded.
fn debian_rust() -> Result<Option<EbpfToolchain>> {
    let versions = DEBIAN_RUST.map(deb_version);
    let [Some(rustc_web), _, _] = &versions else {
        return Ok(None);
    };
    if let Some((pkg, v)) = DEBIAN_RUST
        .iter()
        .zip(&versions)
        .find(|(_, v)| v.as_ref() != Some(rustc_web))
    {
        eprintln!(
            "setup: Debian's {pkg} is {}, rustc-web {rustc_web}: they must match",
            v.as_deref().unwrap_or("missing")
        );
        return Ok(None);
    }
    let rustc = PathBuf::from("/usr/bin/rustc");
    let cargo = PathBuf::from("/usr/bin/cargo");
    if !Path::new(DEBIAN_RUST_SRC).is_dir() {
        bail!("{DEBIAN_RUST_SRC} is missing although rust-web-src {rustc_web} is installed");
    }
    let vv = stdout_of(Command::new(&rustc).arg("-vV"))
        .with_context(|| format!("{} -vV failed", rustc.display()))?;
    let (Some(version), Some(llvm_major)) = (parse_release(&vv), parse_llvm_major(&vv)) else {
        bail!(
            "no release or LLVM version in `{} -vV`:\n{vv}",
            rustc.display()
        );
    };
    if let Some(why) = unfit(version, llvm_major) {
        eprintln!(
            "setup: Debian's rustc-web {rustc_web} (rustc {}.{}, LLVM {llvm_major}) is not fit: {why}",
            version.0, version.1
        );
        return Ok(None);
    }
    Ok(Some(EbpfToolchain {
        describe: format!(
            "rustc {}.{} at {} (Debian rustc-web {rustc_web}, LLVM {llvm_major})",
            version.0,
            version.1,
            rustc.display()
        ),
        cargo,
        rustc,
        bootstrap: true,
        llvm_major,
    }))
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
    let vv = stdout_of(Command::new(&rustc).arg("-vV"))?;
    let llvm_major = parse_llvm_major(&vv)?;
    if let Some(why) = unfit(parse_release(&vv)?, llvm_major) {
        eprintln!("setup: rustup nightly (LLVM {llvm_major}) is not fit for the eBPF build: {why}");
        return None;
    }
    let version = stdout_of(Command::new(&rustc).arg("-V"))?;
    Some(EbpfToolchain {
        describe: format!("{version} (LLVM {llvm_major})"),
        cargo,
        rustc,
        bootstrap: false,
        llvm_major,
    })
}

/// `(major, minor)` of a rustc, from the `release:` line of `rustc -vV`.
fn parse_release(vv: &str) -> Option<(u32, u32)> {
    let release = vv.lines().find_map(|l| l.strip_prefix("release: "))?;
    let mut parts = release.split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
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
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
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

/// The installed version of a Debian package.
fn deb_version(pkg: &str) -> Option<String> {
    dpkg_installed(pkg)
        .then(|| stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Version}", pkg])))
        .flatten()
}

/// Whether this process already ran `apt-get update`.
static LISTS_REFRESHED: AtomicBool = AtomicBool::new(false);

/// `apt-get update`, once per run: a new machine's package lists are the
/// image's and offer old versions (or none) of what is needed.
fn refresh_lists() -> Result<()> {
    if LISTS_REFRESHED.load(Ordering::Relaxed) {
        return Ok(());
    }
    require_root("refresh the package lists (apt-get update)")?;
    eprintln!("setup: refreshing the package lists before installing");
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .arg("update"),
    )?;
    LISTS_REFRESHED.store(true, Ordering::Relaxed);
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    if cmd::is_root() {
        Ok(())
    } else {
        bail!("setup needs root to {what}")
    }
}

/// Installs the Debian packages among `pkgs` that are missing, saying why.
fn apt_ensure(pkgs: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<_> = pkgs
        .iter()
        .copied()
        .filter(|(p, _)| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !cmd::is_root() {
        let names: Vec<&str> = missing.iter().map(|(p, _)| *p).collect();
        bail!(
            "missing Debian packages {}; run as root or install them: apt-get install -y {}",
            names.join(", "),
            names.join(" ")
        );
    }
    refresh_lists()?;
    apt_install(&missing)
}

/// `apt-get install` (which also upgrades what is installed) of `pkgs`,
/// against lists [`refresh_lists`] made current.
fn apt_install(pkgs: &[(&str, &str)]) -> Result<()> {
    require_root("install Debian packages")?;
    for (p, why) in pkgs {
        eprintln!("setup: installing Debian package {p}: {why}");
    }
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(pkgs.iter().map(|(p, _)| p)),
    )
}

#[cfg(test)]
mod tests {
    use super::{parse_llvm_major, parse_release, unfit};

    #[test]
    fn llvm_major_from_rustc_vv() {
        let vv = "rustc 1.96.0 (abc 2026-05-01)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: 1.96.0\nLLVM version: 22.1.8\n";
        assert_eq!(parse_llvm_major(vv), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0\n"), None);
        assert_eq!(parse_release(vv), Some((1, 96)));
        assert_eq!(parse_release("release: 1.97.0-nightly\n"), Some((1, 97)));
    }

    #[test]
    fn fitness_names_what_is_missing() {
        // Debian bookworm's rustc-web 1.85 (LLVM 19): what a stale list offers.
        assert!(unfit((1, 85), 19).is_some_and(|w| w.contains("1.87")));
        assert!(unfit((1, 90), 19).is_some_and(|w| w.contains("LLVM 21-23")));
        assert_eq!(unfit((1, 96), 22), None);
    }
}
