//! Debian kernels for the VMs: resolved, downloaded and unpacked with apt's
//! ordinary clients, in an apt state of our own under `target/vm/apt`.
//!
//! The machine's apt configuration is neither read nor changed: our sources
//! list names bookworm (with its updates and security suites) and
//! bookworm-backports, the host's pins and lists play no part, and nothing
//! needs root. A kernel, once unpacked, is reused without asking the
//! registry again until `--refresh`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// A kernel series `vm-test --kernel` accepts, and where Debian ships it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Series {
    /// As given to `--kernel`: `6.1`.
    pub name: &'static str,
    /// The suite whose `linux-image-cloud-amd64` depends on this series.
    pub suite: &'static str,
    /// `APT::Default-Release` that makes that suite's metapackage the
    /// candidate (`None`: the highest version among the default suites).
    default_release: Option<&'static str>,
}

pub const SERIES: &[Series] = &[
    Series {
        name: "6.1",
        suite: "bookworm",
        default_release: None,
    },
    Series {
        name: "6.12",
        suite: "bookworm-backports",
        default_release: Some("bookworm-backports"),
    },
];

/// The metapackage that always depends on the suite's current cloud kernel
/// (`linux-image-6.1.0-<N>-cloud-amd64`, `linux-image-6.12.<P>+deb12-cloud-amd64`).
const META: &str = "linux-image-cloud-amd64";

const SOURCES: &str = "\
# Written by `cargo xtask vm-test`: where it finds the kernels it boots.
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

impl Series {
    pub fn parse(name: &str) -> Result<Self> {
        SERIES
            .iter()
            .find(|s| s.name == name)
            .copied()
            .with_context(|| {
                let known: Vec<_> = SERIES
                    .iter()
                    .map(|s| format!("{} ({})", s.name, s.suite))
                    .collect();
                format!(
                    "unknown kernel `{name}`; vm-test knows {}",
                    known.join(", ")
                )
            })
    }
}

/// An unpacked kernel package.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub series: Series,
    /// `linux-image-6.1.0-56-cloud-amd64`
    pub package: String,
    /// `6.1.192-2`
    pub version: String,
    /// `uname -r` of the guest: `6.1.0-56-cloud-amd64`
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` in the unpacked package, indexed by depmod.
    pub modules: PathBuf,
}

/// The apt state under `target/vm/apt`, updated at most once per run.
pub struct Apt {
    dir: PathBuf,
    updated: bool,
}

impl Apt {
    pub fn new(vm_dir: &Path) -> Result<Self> {
        let dir = vm_dir.join("apt");
        for sub in [
            "sources.list.d",
            "preferences.d",
            "lists/partial",
            "cache/archives/partial",
        ] {
            fs::create_dir_all(dir.join(sub))?;
        }
        fs::write(dir.join("sources.list.d/mesh-redirect-vm.sources"), SOURCES)?;
        Ok(Self {
            dir,
            updated: false,
        })
    }

    /// `program` (apt-get or apt-cache) confined to our sources and state.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        let d = |sub: &str| self.dir.join(sub).display().to_string();
        for (key, value) in [
            ("Dir::Etc::SourceList", "/dev/null".to_owned()),
            ("Dir::Etc::SourceParts", d("sources.list.d")),
            ("Dir::Etc::Preferences", "/dev/null".to_owned()),
            ("Dir::Etc::PreferencesParts", d("preferences.d")),
            ("Dir::State::Lists", d("lists")),
            ("Dir::Cache", d("cache")),
            ("Acquire::Languages", "none".to_owned()),
            // Our directories belong to whoever runs xtask, not to `_apt`.
            ("APT::Sandbox::User", "root".to_owned()),
        ] {
            c.arg("-o").arg(format!("{key}={value}"));
        }
        c
    }

    fn has_lists(&self) -> bool {
        fs::read_dir(self.dir.join("lists")).is_ok_and(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
    }

    fn update(&mut self) -> Result<()> {
        if !self.updated {
            eprintln!("vm-test: refreshing the Debian package lists for the guest kernels");
            cmd::run(self.command("apt-get").args(["-q", "update"]))?;
            self.updated = true;
        }
        Ok(())
    }

    /// The kernel package `linux-image-cloud-amd64` of `series`'s suite
    /// depends on, and its version.
    fn resolve(&self, series: Series) -> Result<(String, String)> {
        let mut depends = self.command("apt-cache");
        if let Some(release) = series.default_release {
            depends
                .arg("-o")
                .arg(format!("APT::Default-Release={release}"));
        }
        depends.args(["depends", META]);
        let out = cmd::stdout_of(&mut depends)
            .with_context(|| format!("{} failed", cmd::display(&depends)))?;
        let prefix = format!("linux-image-{}.", series.name);
        let package = out
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with(&prefix))
            .with_context(|| {
                format!(
                    "{META} in {} does not depend on a {prefix}* kernel:\n{out}",
                    series.suite
                )
            })?
            .to_owned();
        let policy = cmd::stdout_of(self.command("apt-cache").args(["policy", &package]))
            .unwrap_or_default();
        let version = policy
            .lines()
            .find_map(|l| l.trim().strip_prefix("Candidate: "))
            .unwrap_or("?")
            .to_owned();
        Ok((package, version))
    }

    /// Downloads `spec` (`package` or `package=version`) into `dir`;
    /// returns the .deb.
    fn download(&self, spec: &str, package: &str, dir: &Path) -> Result<PathBuf> {
        fs::create_dir_all(dir)?;
        cmd::run(
            self.command("apt-get")
                .current_dir(dir)
                .args(["-q", "download", spec]),
        )?;
        let prefix = format!("{package}_");
        let mut debs: Vec<_> = fs::read_dir(dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "deb")
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix))
            })
            .collect();
        debs.sort();
        debs.pop().with_context(|| {
            format!(
                "apt-get download left no {prefix}*.deb in {}",
                dir.display()
            )
        })
    }
}

/// The kernel of `series`, unpacked under `vm_dir/<series>/kernel`:
/// reused when present, otherwise resolved, downloaded and unpacked.
/// `refresh` asks the registry for the suite's current kernel first.
pub fn fetch(apt: &mut Apt, vm_dir: &Path, series: Series, refresh: bool) -> Result<Kernel> {
    let dir = vm_dir.join(series.name);
    let marker = dir.join("kernel.txt");
    let cached = fs::read_to_string(&marker)
        .ok()
        .and_then(|text| parse_marker(&text));
    if let (Some((package, version)), false) = (&cached, refresh) {
        match unpacked(series, &dir, package, version) {
            Ok(kernel) => return Ok(kernel),
            Err(err) => eprintln!("vm-test: {err:#}; fetching it again"),
        }
    }
    if refresh || !apt.has_lists() {
        apt.update()?;
    }
    let (package, version) = apt.resolve(series)?;
    if let Some((p, v)) = &cached
        && (p, v) == (&package, &version)
        && let Ok(kernel) = unpacked(series, &dir, &package, &version)
    {
        return Ok(kernel);
    }
    eprintln!(
        "vm-test: {}: Debian's {} kernel is {package} {version}",
        series.name, series.suite
    );
    let debs = vm_dir.join("debs");
    let deb = match apt.download(&package, &package, &debs) {
        Ok(deb) => deb,
        // The lists were older than the archive: the version they name is gone.
        Err(err) if !apt.updated => {
            eprintln!("vm-test: {err:#}; refreshing the lists and retrying");
            apt.update()?;
            return fetch(apt, vm_dir, series, true);
        }
        Err(err) => return Err(err),
    };
    unpack(&deb, &dir)?;
    fs::write(&marker, format!("{package} {version}\n"))?;
    // The unpacked tree is the cache; the package itself is not needed again.
    fs::remove_file(&deb)?;
    unpacked(series, &dir, &package, &version)
}

fn parse_marker(text: &str) -> Option<(String, String)> {
    let mut words = text.split_whitespace();
    Some((words.next()?.to_owned(), words.next()?.to_owned()))
}

/// Unpacks `deb` into `dir/kernel` (replacing what was there) and indexes
/// its modules, which the package leaves to its postinst.
fn unpack(deb: &Path, dir: &Path) -> Result<()> {
    let root = dir.join("kernel");
    let partial = dir.join("kernel.partial");
    for d in [&root, &partial] {
        if d.exists() {
            fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    fs::create_dir_all(&partial)?;
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&partial))?;
    let release = release_of(&partial)?;
    cmd::run(Command::new("depmod").arg("-b").arg(&partial).arg(&release))?;
    fs::rename(&partial, &root)?;
    Ok(())
}

/// The single `lib/modules/<release>` of an unpacked kernel package.
fn release_of(root: &Path) -> Result<String> {
    let modules = root.join("lib/modules");
    let mut releases: Vec<String> = fs::read_dir(&modules)
        .with_context(|| format!("reading {}", modules.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match releases.len() {
        1 => Ok(releases.remove(0)),
        _ => bail!(
            "expected one kernel release in {}, found {releases:?}",
            modules.display()
        ),
    }
}

fn unpacked(series: Series, dir: &Path, package: &str, version: &str) -> Result<Kernel> {
    let root = dir.join("kernel");
    let release = release_of(&root)?;
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    let modules = root.join("lib/modules").join(&release);
    if !vmlinuz.is_file() || !modules.join("modules.dep.bin").is_file() {
        bail!(
            "{} is incomplete (no vmlinuz or no module index)",
            root.display()
        );
    }
    Ok(Kernel {
        series,
        package: package.to_owned(),
        version: version.to_owned(),
        release,
        vmlinuz,
        modules,
    })
}

/// qemu from bookworm-backports (10.x), unpacked, not installed: the
/// system's qemu 7.2 mis-emulates CMPXCHG16B under TCG (6.12's SLUB fast
/// path ends in a double fault with garbage EFLAGS, one boot in eight), and
/// hiding CX16 from the guest instead breaks programs that need it (HAProxy:
/// "Illegal instruction"). Returns the binary and its data directory (for
/// `-L`), or `None` (with the reason printed) to fall back to the system's.
pub fn fetch_qemu(apt: &mut Apt, vm_dir: &Path, refresh: bool) -> Option<(PathBuf, PathBuf)> {
    match fetch_qemu_inner(apt, vm_dir, refresh) {
        Ok(found) => Some(found),
        Err(err) => {
            eprintln!(
                "vm-test: warning: no bookworm-backports qemu ({err:#}); using the system's, \
                 whose TCG can crash a 6.12 guest"
            );
            None
        }
    }
}

fn fetch_qemu_inner(apt: &mut Apt, vm_dir: &Path, refresh: bool) -> Result<(PathBuf, PathBuf)> {
    const PACKAGES: [&str; 2] = ["qemu-system-x86", "qemu-system-data"];
    let dir = vm_dir.join("qemu");
    let root = dir.join("root");
    let marker = dir.join("qemu.txt");
    let bin = root.join("usr/bin/qemu-system-x86_64");
    let data = root.join("usr/share/qemu");
    let works = |bin: &Path| {
        cmd::stdout_of(Command::new(bin).arg("--version"))
            .is_some_and(|v| v.starts_with("QEMU emulator"))
    };
    if !refresh && marker.is_file() && works(&bin) {
        return Ok((bin, data));
    }
    if refresh || !apt.has_lists() {
        apt.update()?;
    }
    let mut policy = apt.command("apt-cache");
    policy
        .args(["-o", "APT::Default-Release=bookworm-backports"])
        .args(["policy", PACKAGES[0]]);
    let version = cmd::stdout_of(&mut policy)
        .and_then(|out| {
            out.lines()
                .find_map(|l| l.trim().strip_prefix("Candidate: "))
                .map(str::to_owned)
        })
        .filter(|v| v != "(none)")
        .context("no qemu-system-x86 candidate in bookworm-backports")?;
    if fs::read_to_string(&marker).is_ok_and(|m| m.trim() == version) && works(&bin) {
        return Ok((bin, data));
    }
    eprintln!("vm-test: unpacking bookworm-backports' qemu {version} for the guests");
    let debs = vm_dir.join("debs");
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&root)?;
    for package in PACKAGES {
        let deb = apt.download(&format!("{package}={version}"), package, &debs)?;
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        fs::remove_file(&deb)?;
    }
    if !works(&bin) {
        let ldd = cmd::output(Command::new("ldd").arg(&bin))?;
        bail!(
            "{} does not run here:\n{}",
            bin.display(),
            String::from_utf8_lossy(&ldd.stdout)
        );
    }
    fs::write(&marker, format!("{version}\n"))?;
    Ok((bin, data))
}

#[cfg(test)]
mod tests {
    use super::{Series, parse_marker};

    #[test]
    fn series_names() {
        assert_eq!(Series::parse("6.1").unwrap().suite, "bookworm");
        assert_eq!(Series::parse("6.12").unwrap().suite, "bookworm-backports");
        let err = Series::parse("5.10").unwrap_err().to_string();
        assert!(err.contains("6.1 (bookworm)"), "{err}");
    }

    #[test]
    fn marker_round_trip() {
        assert_eq!(
            parse_marker("linux-image-6.1.0-56-cloud-amd64 6.1.192-2\n"),
            Some((
                "linux-image-6.1.0-56-cloud-amd64".to_owned(),
                "6.1.192-2".to_owned()
            ))
        );
        assert_eq!(parse_marker("half"), None);
    }
}
