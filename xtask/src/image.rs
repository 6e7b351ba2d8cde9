//! `cargo xtask image`: the agent's OCI image, built offline.
//!
//! No registry is asked for anything: the base is Debian bookworm's minimal
//! system, made by debootstrap from this machine's Debian mirror with the
//! image's packages, brought up to the suite's security and point-release
//! updates (as the Dockerfile's `apt-get update` gets them), then slimmed
//! the way `debian:bookworm-slim` is (no
//! documentation but the copyright files, no manual pages, no locales, no
//! package lists). The release binary goes on top, and podman (in a store
//! of this command's own, under target/image) imports the root as one
//! layer and saves it as an OCI archive that `podman load` reads.
//!
//! The repository's `Dockerfile` builds the same layout from the registry's
//! `debian:bookworm-slim`; [`check_dockerfile`] fails the build when the two
//! no longer say the same (base suite, packages, binary path, entry point).
//!
//! The slimmed base is cached under target/image, keyed by suite, mirror and
//! packages: a rebuild after a code change only re-layers the binary.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use sha2::{Digest as _, Sha256};

use crate::{build, cmd, fresh, setup};

/// The Debian suite of the base (`debian:bookworm-slim` in the Dockerfile).
pub const SUITE: &str = "bookworm";
/// What the image adds to the minimal base, and why.
pub const PACKAGES: &[(&str, &str)] = &[
    (
        "iptables",
        "both backends: the fallback mode and the istio-init drop-in",
    ),
    ("iproute2", "the pod's addresses and routes"),
];
/// Where the agent binary lives in the image.
pub const BINARY: &str = "/usr/local/bin/mesh-redirect";
/// The image's `PATH` (`debian:bookworm-slim`'s).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// What the image runs with no arguments: the report of what this host's
/// kernel and iptables offer.
pub const CMD: &[&str] = &["doctor"];

/// The image's name, as the manifests under deploy/ refer to it.
#[must_use]
pub fn reference() -> String {
    format!("localhost/mesh-redirect:{}", env!("CARGO_PKG_VERSION"))
}

/// Where [`build_image`] writes the OCI archive.
#[must_use]
pub fn archive() -> PathBuf {
    build::root().join(format!(
        "target/image/mesh-redirect-{}.oci.tar",
        env!("CARGO_PKG_VERSION")
    ))
}

/// Builds the image (release binary included); returns the OCI archive.
pub fn run() -> Result<PathBuf> {
    let tc = setup::ensure(&[setup::Need::Image])?;
    build::build(&tc, true)?;
    build_image(&build::root().join(build::DIST_BIN))
}

/// The image around `agent` (a stripped release binary): the OCI archive's path.
pub fn build_image(agent: &Path) -> Result<PathBuf> {
    if !cmd::is_root() {
        bail!("image needs root (debootstrap, and podman's store)");
    }
    let root = build::root();
    check_dockerfile(&root.join("Dockerfile"))?;
    let work = root.join("target/image");
    fs::create_dir_all(&work)?;
    let base = ensure_base(&work)?;

    // The layer: the base, and the binary at its place.
    let top = work.join("top");
    remove_dir(&top)?;
    let bin = top.join(BINARY.trim_start_matches('/'));
    fs::create_dir_all(bin.parent().expect("a directory"))?;
    fs::copy(agent, &bin).with_context(|| format!("copying {}", agent.display()))?;
    let layer = work.join("layer.tar");
    cmd::run(
        Command::new("tar")
            .args(["--create", "--numeric-owner", "--file"])
            .arg(&layer)
            .arg("--directory")
            .arg(&base)
            .arg(".")
            .arg("--directory")
            .arg(&top)
            .arg(format!(".{BINARY}")),
    )?;

    let unpacked = fs::metadata(&layer)?.len();
    let reference = reference();
    let archive = work.join(format!(
        "mesh-redirect-{}.oci.tar",
        env!("CARGO_PKG_VERSION")
    ));
    let _ = fs::remove_file(&archive);
    let store = work.join("store");
    remove_dir(&store)?;
    let entrypoint = serde_json::to_string(&[BINARY])?;
    let command = serde_json::to_string(CMD)?;
    let result = podman(&store)
        .args(["import", "--quiet"])
        .args(["--change", &format!("ENTRYPOINT {entrypoint}")])
        .args(["--change", &format!("CMD {command}")])
        // As debian:bookworm-slim's configuration has it.
        .args(["--change", &format!("ENV PATH={PATH}")])
        .args(["--change", &format!("LABEL {}", labels())])
        .arg(&layer)
        .arg(&reference)
        .status()
        .context("starting podman import")
        .and_then(|s| {
            if s.success() {
                cmd::run(
                    podman(&store)
                        .args(["save", "--quiet", "--format", "oci-archive", "--output"])
                        .arg(&archive)
                        .arg(&reference),
                )
            } else {
                bail!("podman import {} failed: {s}", layer.display())
            }
        });
    // Only the store's own directories: `podman system reset` would also
    // remove the host's podman networks.
    remove_dir(&store)?;
    remove_dir(&top)?;
    let _ = fs::remove_file(&layer);
    result?;

    let size = fs::metadata(&archive)?.len();
    eprintln!(
        "image: {reference} in {} ({:.1} MiB, layers compressed; {:.1} MiB unpacked; `podman load -i` it)",
        archive.display(),
        mib(size),
        mib(unpacked)
    );
    Ok(archive)
}

/// The slimmed minimal base with [`PACKAGES`] and the suite's updates,
/// debootstrapped once per suite, mirror, package list, slimming and week
/// (so a base is never more than a week behind the security updates).
fn ensure_base(work: &Path) -> Result<PathBuf> {
    let mirror = fresh::debian_mirror()?;
    let names: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).collect();
    let week = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / (7 * 86_400));
    let key = Sha256::digest(format!(
        "{SUITE} {mirror} {} {SLIM} {SOURCES} {week}",
        names.join(",")
    ));
    let key = u64::from_be_bytes(key[..8].try_into().expect("8 bytes")) >> 16;
    let base = work.join(format!("base-{SUITE}-{key:012x}"));
    if base.join("etc/debian_version").exists() {
        eprintln!("image: base {} (cached)", base.display());
        return Ok(base);
    }
    let partial = work.join("base.partial");
    remove_dir(&partial)?;
    eprintln!(
        "image: debootstrap {SUITE} (minbase, {}) from {mirror}",
        names.join(", ")
    );
    cmd::run(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", names.join(",")))
            .arg(SUITE)
            .arg(&partial)
            .arg(&mirror),
    )?;
    update(&partial)?;
    slim(&partial)?;
    // An earlier base (other packages or mirror) is of no further use.
    for entry in fs::read_dir(work)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("base-") {
            remove_dir(&path)?;
        }
    }
    fs::rename(&partial, &base)?;
    Ok(base)
}

/// What `debian:bookworm-slim` leaves out (its dpkg path excludes), and
/// what no image keeps: package lists, caches, logs, debootstrap's leftovers.
/// The suite's security and point-release updates, from this machine's
/// apt sources (debootstrap fetches the main suite only), then the sources
/// `debian:bookworm-slim` has.
fn update(root: &Path) -> Result<()> {
    fresh::copy_apt_sources(root)?;
    fs::copy("/etc/resolv.conf", root.join("etc/resolv.conf"))
        .context("copying /etc/resolv.conf into the image's root")?;
    let upgraded = cmd::run(Command::new("chroot").arg(root).args([
        "/bin/sh",
        "-ec",
        "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -q",
    ]));
    for file in fs::read_dir(root.join("etc/apt/sources.list.d"))? {
        fs::remove_file(file?.path())?;
    }
    let _ = fs::remove_file(root.join("etc/apt/sources.list"));
    fs::write(root.join("etc/apt/sources.list.d/debian.sources"), SOURCES)?;
    upgraded
}

/// `debian:bookworm-slim`'s apt sources.
const SOURCES: &str = "Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

fn slim(root: &Path) -> Result<()> {
    cmd::run(
        Command::new("chroot")
            .arg(root)
            .args(["/bin/sh", "-ec", SLIM]),
    )
}

/// [`slim`]'s script, run in the root.
const SLIM: &str = r"
        cd /
        find usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
        find usr/share/doc -mindepth 1 -type d -empty -delete
        rm -rf usr/share/man/* usr/share/info/* usr/share/groff/* usr/share/lintian/* usr/share/linda/*
        find usr/share/locale -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
        rm -rf var/lib/apt/lists/* var/cache/apt/* var/cache/debconf/*-old var/log/* debootstrap
        rm -f etc/resolv.conf etc/hostname var/lib/dbus/machine-id
        : > etc/machine-id
    ";

/// Fails unless `path` (the Dockerfile) builds what [`build_image`] builds,
/// from a build context (`.dockerignore` beside it) that holds the binary.
pub fn check_dockerfile(path: &Path) -> Result<()> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut differences = dockerfile_differences(&text);
    let ignore = path.with_file_name(".dockerignore");
    let context = fs::read_to_string(&ignore).unwrap_or_default();
    let keep = format!("!{}", build::DIST_BIN);
    if !context.lines().any(|l| l.trim() == keep) {
        differences.push(format!(
            "{} does not keep {} in the build context (`{keep}`)",
            ignore.display(),
            build::DIST_BIN
        ));
    }
    if !differences.is_empty() {
        bail!(
            "{} no longer describes the image `cargo xtask image` builds: {}",
            path.display(),
            differences.join("; ")
        );
    }
    Ok(())
}

/// The image's labels, as `LABEL` says them.
fn labels() -> String {
    format!(
        "org.opencontainers.image.title=mesh-redirect org.opencontainers.image.version={}",
        env!("CARGO_PKG_VERSION")
    )
}

/// How a Dockerfile's text differs from the image's constants.
fn dockerfile_differences(text: &str) -> Vec<String> {
    // Instructions, continuation lines joined, comments left out.
    let mut instructions: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        let (part, continued) = match line.strip_suffix('\\') {
            Some(p) => (p.trim(), true),
            None => (line, false),
        };
        current.push_str(part);
        current.push(' ');
        if !continued {
            instructions.push(current.trim().to_owned());
            current.clear();
        }
    }
    let find = |word: &str| -> Vec<&str> {
        instructions
            .iter()
            .filter_map(|i| i.strip_prefix(word)?.strip_prefix(' '))
            .map(str::trim)
            .collect()
    };
    let mut differences: Vec<String> = instructions
        .iter()
        .filter_map(|i| i.split_whitespace().next())
        .filter(|w| !["FROM", "RUN", "COPY", "LABEL", "ENTRYPOINT", "CMD"].contains(w))
        .map(|w| format!("it has a {w}, the image none"))
        .collect();
    if find("RUN").len() != 1 {
        differences.push(format!(
            "it has {} RUN steps, the image one install",
            find("RUN").len()
        ));
    }
    if find("LABEL") != [labels().as_str()] {
        differences.push(format!(
            "its LABEL is {:?}, the image's {}",
            find("LABEL"),
            labels()
        ));
    }
    let want_from = format!("debian:{SUITE}-slim");
    if find("FROM") != [want_from.as_str()] {
        differences.push(format!(
            "its FROM is {:?}, the image's base {want_from}",
            find("FROM")
        ));
    }
    let mut installed: Vec<&str> = find("RUN")
        .iter()
        .flat_map(|r| r.split("&&"))
        .filter_map(|c| c.trim().strip_prefix("apt-get install"))
        .flat_map(str::split_whitespace)
        .filter(|w| !w.starts_with('-'))
        .collect();
    installed.sort_unstable();
    let mut want: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).collect();
    want.sort_unstable();
    if installed != want {
        differences.push(format!("it installs {installed:?}, the image {want:?}"));
    }
    let want_copy = format!("{} {BINARY}", build::DIST_BIN);
    if find("COPY") != [want_copy.as_str()] {
        differences.push(format!(
            "its COPY is {:?}, the image's {want_copy}",
            find("COPY")
        ));
    }
    let json = |v: &[&str]| serde_json::to_string(v).expect("strings");
    let entry: Vec<String> = find("ENTRYPOINT")
        .iter()
        .map(|e| e.replace(", ", ","))
        .collect();
    if entry != [json(&[BINARY])] {
        differences.push(format!(
            "its ENTRYPOINT is {entry:?}, the image's [\"{BINARY}\"]"
        ));
    }
    let command: Vec<String> = find("CMD").iter().map(|e| e.replace(", ", ",")).collect();
    if command != [json(CMD)] {
        differences.push(format!("its CMD is {command:?}, the image's {}", json(CMD)));
    }
    differences
}

/// podman with a store of its own under target/image.
fn podman(store: &Path) -> Command {
    let mut c = Command::new("podman");
    c.arg("--root")
        .arg(store.join("root"))
        .arg("--runroot")
        .arg(store.join("run"))
        .args(["--storage-driver", "vfs"]);
    c
}

fn remove_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

#[allow(clippy::cast_precision_loss)]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repositorys_dockerfile_describes_the_image() {
        let path = build::root().join("Dockerfile");
        assert_eq!(
            dockerfile_differences(&fs::read_to_string(path).unwrap()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_dockerfile_that_drifted_is_told_apart() {
        let text = "FROM debian:bookworm-slim\n\
                    RUN apt-get update \\\n && apt-get install -y --no-install-recommends iptables curl\n\
                    COPY target/dist/mesh-redirect /usr/bin/mesh-redirect\n\
                    ENTRYPOINT [\"/usr/local/bin/mesh-redirect\"]\nCMD [\"doctor\"]\n\
                    USER 1000\n";
        let d = dockerfile_differences(text);
        assert_eq!(d.len(), 4, "{d:?}");
        assert!(d[0].contains("USER"), "{d:?}");
        assert!(d[1].contains("LABEL"), "{d:?}");
        assert!(d[2].contains("\"curl\""), "{d:?}");
        assert!(d[3].contains("/usr/bin/mesh-redirect"), "{d:?}");
    }
}
