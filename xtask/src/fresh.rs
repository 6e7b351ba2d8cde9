//! `cargo xtask fresh-machine`: proves the README's set-up and main job on a
//! machine that has nothing of ours.
//!
//! It builds a clean Debian bookworm root with debootstrap (from this
//! machine's Debian mirror), gives it this machine's apt sources but only
//! the package lists debootstrap fetched (bookworm's main suite: what a new
//! machine's stale lists offer is no better), copies in what the machine
//! image itself has beyond Debian (the rustup stable toolchain), clones the
//! repository inside and runs the README's main-job command there as root,
//! in a mount namespace of its own with /proc, /dev, /sys (so cgroup2 and
//! bpffs) and the host's resolver bound in. Nothing of the host's rust, apt
//! state, cargo registry or build is visible inside; when the command
//! exits, the namespace and its mounts go with it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{build, cmd, setup};

#[derive(Debug, Args)]
pub struct Options {
    /// The commit to clone and run (default: HEAD). Uncommitted changes
    /// are never included: a fresh machine gets a clean clone.
    #[arg(long, default_value = "HEAD")]
    rev: String,
    /// Keep the root under target/fresh-machine afterwards (default: removed).
    #[arg(long)]
    keep: bool,
}

/// What the machine image has from Debian besides the base system
/// (the machine description lists gcc, git and `CPython`; certificates
/// reach the registries).
const IMAGE_PACKAGES: &[&str] = &[
    "ca-certificates",
    "git",
    "gcc",
    "libc6-dev",
    "python3",
    "procps",
];

const SUITE: &str = "bookworm";

pub fn run(opts: &Options) -> Result<()> {
    if !cmd::is_root() {
        bail!("fresh-machine needs root (debootstrap, chroot, mounts)");
    }
    setup::ensure_packages(&[setup::Need::FreshMachine])?;
    let root = build::root();
    let rev = resolve_rev(&root, &opts.rev)?;
    let work = root.join("target/fresh-machine");
    let chroot = work.join("root");
    remove_root(&chroot)?;
    fs::create_dir_all(&work)?;

    let mirror = debian_mirror()?;
    eprintln!(
        "fresh-machine: debootstrap {SUITE} from {mirror} into {}",
        chroot.display()
    );
    cmd::run(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", IMAGE_PACKAGES.join(",")))
            .arg(SUITE)
            .arg(&chroot)
            .arg(&mirror),
    )?;
    copy_apt_sources(&chroot)?;
    copy_rustup(&chroot)?;
    copy_local_cas(&chroot)?;
    fs::copy("/etc/resolv.conf", chroot.join("etc/resolv.conf"))
        .context("copying /etc/resolv.conf into the fresh root")?;

    let checkout = chroot.join("root/mesh-redirect");
    cmd::run(
        Command::new("git")
            .args(["clone", "--quiet", "--no-local"])
            .arg(&root)
            .arg(&checkout),
    )?;
    cmd::run(
        Command::new("git")
            .arg("-C")
            .arg(&checkout)
            .args(["checkout", "--quiet", "--detach", &rev]),
    )?;
    let main_job = readme_main_job(&checkout.join("README.md"))?;
    eprintln!("fresh-machine: commit {rev}; the README's main job: {main_job}");

    let result = cmd::run(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-ec"])
            .arg(ENTER)
            .arg("enter")
            .arg(&chroot)
            .arg(&main_job),
    );
    if opts.keep {
        eprintln!("fresh-machine: root kept at {}", chroot.display());
    } else {
        remove_root(&chroot)?;
    }
    result.with_context(|| {
        format!("the README's main job `{main_job}` failed on a fresh machine (commit {rev})")
    })?;
    eprintln!("fresh-machine: `{main_job}` passed on a fresh {SUITE} root (commit {rev})");
    Ok(())
}

/// Run by `unshare` in the fresh root's own mount namespace: `$1` the root,
/// `$2` the command. The environment is a login's, nothing of ours.
const ENTER: &str = r#"
root="$1"; job="$2"
# The root must be a mount point of its own (`ip netns` re-marks / as a slave).
mount --bind "$root" "$root"
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount --rbind /sys "$root/sys"
mount -t tmpfs tmpfs "$root/run"
mount -t tmpfs tmpfs "$root/tmp"
exec chroot "$root" /usr/bin/env -i HOME=/root USER=root LOGNAME=root TERM=dumb \
    PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    sh -ec 'cd /root/mesh-redirect && exec '"$job"
"#;

/// The README's main-job command: the first indented `cargo xtask` line
/// after the paragraph that names the main job.
fn readme_main_job(readme: &Path) -> Result<String> {
    let text =
        fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    parse_main_job(&text)
        .with_context(|| format!("no indented `cargo xtask` command in {}", readme.display()))
}

fn parse_main_job(readme: &str) -> Option<String> {
    readme
        .lines()
        .skip_while(|l| !l.to_ascii_lowercase().contains("main job"))
        .filter_map(|l| l.strip_prefix("    "))
        .map(str::trim)
        .find(|l| l.starts_with("cargo xtask "))
        .map(str::to_owned)
}

fn resolve_rev(root: &Path, rev: &str) -> Result<String> {
    cmd::stdout_of(Command::new("git").arg("-C").arg(root).args([
        "rev-parse",
        "--verify",
        &format!("{rev}^{{commit}}"),
    ]))
    .with_context(|| format!("`{rev}` is not a commit of {}", root.display()))
}

/// The Debian mirror this machine's apt sources name.
pub fn debian_mirror() -> Result<String> {
    let sources = apt_source_files();
    for file in &sources {
        let text = fs::read_to_string(file)?;
        if let Some(uri) = text
            .split_whitespace()
            .find(|w| w.starts_with("http") && w.trim_end_matches('/').ends_with("/debian"))
        {
            return Ok(uri.to_owned());
        }
    }
    bail!("no Debian mirror (a URI ending in /debian) in {sources:?}")
}

/// This machine's apt sources files that name Debian suites.
fn apt_source_files() -> Vec<PathBuf> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.filter_map(|e| Some(e.ok()?.path())));
    }
    files.retain(|f| fs::read_to_string(f).is_ok_and(|t| t.contains("debian.org/debian")));
    files.sort();
    files
}

/// The machine's Debian sources, without the lists they would fetch: the
/// fresh root keeps debootstrap's lists until something refreshes them.
pub fn copy_apt_sources(chroot: &Path) -> Result<()> {
    let _ = fs::remove_file(chroot.join("etc/apt/sources.list"));
    for file in apt_source_files() {
        let rel = file.strip_prefix("/").expect("absolute");
        fs::copy(&file, chroot.join(rel)).with_context(|| format!("copying {}", file.display()))?;
        eprintln!("fresh-machine: apt sources {}", file.display());
    }
    Ok(())
}

/// The rustup stable toolchain, as the machine image has it: rustup and its
/// proxies in `~/.cargo/bin`, the stable toolchain, no registry, no nightly.
fn copy_rustup(chroot: &Path) -> Result<()> {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let rustup = cmd::stdout_of(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is not installed here: a fresh machine has the rustup stable toolchain")?;
    let stable = rustup
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .find(|t| t.starts_with("stable-"))
        .context("no rustup stable toolchain here")?
        .to_owned();
    let dest = chroot.join("root");
    fs::create_dir_all(dest.join(".rustup/toolchains"))?;
    fs::create_dir_all(dest.join(".cargo"))?;
    cmd::run(
        Command::new("cp")
            .arg("-a")
            .arg(home.join(".rustup/toolchains").join(&stable))
            .arg(dest.join(".rustup/toolchains")),
    )?;
    fs::write(
        dest.join(".rustup/settings.toml"),
        format!(
            "version = \"12\"\ndefault_toolchain = \"{stable}\"\nprofile = \"default\"\nauto_self_update = \"disable\"\n"
        ),
    )?;
    // rustup and its proxies only (cargo, rustc, ... link to it): whatever
    // else `cargo install` put here (bpf-linker) is not the image's.
    let bin = home.join(".cargo/bin");
    let dest_bin = dest.join(".cargo/bin");
    fs::create_dir_all(&dest_bin)?;
    for entry in fs::read_dir(&bin).with_context(|| format!("reading {}", bin.display()))? {
        let path = entry?.path();
        let name = path.file_name().expect("entry name");
        let is_rustup =
            name == "rustup" || fs::read_link(&path).is_ok_and(|t| t == Path::new("rustup"));
        if is_rustup {
            cmd::run(Command::new("cp").arg("-a").arg(&path).arg(&dest_bin))?;
        }
    }
    eprintln!("fresh-machine: rustup toolchain {stable} copied in");
    Ok(())
}

/// The certificate authorities the machine image adds to Debian's (the
/// registries are reached through them), made part of the root's bundle.
fn copy_local_cas(chroot: &Path) -> Result<()> {
    let dir = Path::new("/usr/local/share/ca-certificates");
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    let dest = chroot.join(dir.strip_prefix("/").expect("absolute"));
    fs::create_dir_all(&dest)?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "crt") {
            fs::copy(&path, dest.join(path.file_name().expect("name")))?;
            eprintln!("fresh-machine: local CA {}", path.display());
        }
    }
    cmd::run(
        Command::new("chroot")
            .arg(chroot)
            .arg("update-ca-certificates"),
    )
}

/// Removes a previous fresh root (nothing is mounted on it: its mounts
/// lived in a namespace that is gone).
fn remove_root(chroot: &Path) -> Result<()> {
    if chroot.exists() {
        fs::remove_dir_all(chroot).with_context(|| format!("removing {}", chroot.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_main_job;

    #[test]
    fn main_job_is_the_first_indented_xtask_command() {
        let readme = "# x\n\n    cargo xtask vm-test\n\nMain job:\n\n    cargo xtask demo\n\nTests:\n\n    cargo xtask test\n";
        assert_eq!(parse_main_job(readme).as_deref(), Some("cargo xtask demo"));
        assert_eq!(parse_main_job("no commands\n"), None);
    }
}
