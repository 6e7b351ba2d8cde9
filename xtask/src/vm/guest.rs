//! What goes into a guest: the programs the tests run, the test binaries
//! and the agent, the kernel's modules, the init and the test plan.

use std::{
    env,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::{Case, debian::Kernel, initramfs::Image};
use crate::{
    cmd::{self, which},
    test,
};

/// Host programs the guest's init needs, looked up on `PATH` and copied with
/// their libraries; all are essential in Debian or installed by `setup`.
const INIT_PROGRAMS: &[&str] = &[
    "sh", "mount", "mkdir", "modprobe", "ip", "timeout", "grep", "sleep", "uname",
];

/// Host programs the tests and the agent run, copied the same way. One
/// missing on the host is left out with a warning: the tests that run it
/// fail in the guest as they would on the host.
const TEST_PROGRAMS: &[(&str, &str)] = &[
    ("sh", "the tests' shell snippets"),
    ("mount", "the doctor tests remount bpffs"),
    ("umount", "the doctor tests unmount bpffs"),
    ("unshare", "the doctor tests use a private mount namespace"),
    ("ip", "network namespaces and veth pairs"),
    ("ss", "tests wait for listening sockets"),
    ("sysctl", "tests tune the pod's TCP settings"),
    ("curl", "an HTTP client, as in the demo"),
    ("wget", "a conformance client"),
    ("getent", "the DNS tests resolve names through glibc"),
    ("haproxy", "a third-party transparent proxy"),
    ("cat", "shell snippets"),
    ("true", "a stand-in command in tests"),
    ("false", "a stand-in command in tests"),
];

/// The iptables REDIRECT mode and its tests call every variant: IPv4 and
/// IPv6, legacy and nft, rules, save and restore.
fn iptables_programs() -> Vec<String> {
    let mut names = Vec::new();
    for family in ["iptables", "ip6tables"] {
        for backend in ["", "-legacy", "-nft"] {
            for op in ["", "-save", "-restore"] {
                names.push(format!("{family}{backend}{op}"));
            }
        }
    }
    names
}

/// Host files the programs read, copied when present.
const DATA: &[&str] = &[
    // The iptables mode reads the pod's DNS servers from it.
    "/etc/resolv.conf",
    "/etc/protocols",
    "/etc/services",
    "/etc/ethertypes",
    "/etc/iproute2",
    // glibc's name service order (files, then dns) for the DNS tests.
    "/etc/nsswitch.conf",
    // iptables' match and target extensions, which it dlopen()s.
    "/usr/lib/x86_64-linux-gnu/xtables",
];

/// Programs the conformance suite runs that the guests go without, by
/// design: their cells are `n/a` in a guest (not a skip, which
/// `MESH_REDIRECT_NO_SKIP=1` fails). Node.js is 100 MB of binary, and the
/// suite's Node client has nothing of the kernel's to test that the
/// guest's Python, Rust, Java, Go and curl clients lack.
const GUEST_LACKS: &[&str] = &["node"];
/// Where the guest's tests learn it.
const GUEST_LACKS_ENV: &str = "MESH_REDIRECT_GUEST_LACKS";

const INIT: &str = include_str!("init.sh");

/// Environment variable the guest's tests may multiply their wall-clock
/// limits by (a stall of a second is nothing under software emulation).
pub const TIME_SCALE_ENV: &str = "MESH_REDIRECT_TIME_SCALE";

/// How the guest runs its tests.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Seconds one test may take before the init kills it.
    pub test_timeout_secs: u64,
    /// Exported as `MESH_REDIRECT_TIME_SCALE`.
    pub time_scale: u32,
}

/// Builds the initramfs for `kernel` into `out`; returns its size.
pub fn initramfs(
    kernel: &Kernel,
    agent: &Path,
    cases: &[Case],
    settings: Settings,
    work: &Path,
    out: &Path,
) -> Result<u64> {
    let mut image = Image::new();
    image.add_console();
    for dir in ["/proc", "/sys", "/run", "/root"] {
        image.add_dir(dir);
    }
    image.add_dir_mode("/tmp", 0o1777);
    image.add_host_path(Path::new("/var/run"))?;
    image.add_host_path(Path::new("/bin/sh"))?;
    image.add_libraries_of(Path::new("/bin/sh"))?;
    for program in INIT_PROGRAMS {
        let path = which(program).with_context(|| {
            format!("`{program}` is not on this host's PATH; the guest's init needs it")
        })?;
        image.add_host_path(&path)?;
        image.add_libraries_of(&path)?;
    }
    let iptables = iptables_programs();
    let programs = TEST_PROGRAMS.iter().copied().chain(
        iptables
            .iter()
            .map(|p| (p.as_str(), "the iptables REDIRECT mode")),
    );
    for (program, why) in programs {
        let Some(path) = which(program) else {
            eprintln!(
                "vm-test: warning: `{program}` is not on this host's PATH; the guest goes without ({why})"
            );
            continue;
        };
        image.add_host_path(&path)?;
        image.add_libraries_of(&path)?;
    }
    for data in DATA {
        let path = Path::new(data);
        if path.is_dir() {
            image.add_tree_as(path, path)?;
            for entry in fs::read_dir(path)? {
                image.add_libraries_of(&entry?.path())?;
            }
        } else if path.exists() {
            image.add_host_path(path)?;
        }
    }
    runtimes::add(&mut image, work)?;
    image.add_bytes("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644);
    image.add_bytes("/etc/group", "root:x:0:\n", 0o644);
    image.add_bytes("/etc/hosts", "127.0.0.1 localhost\n::1 localhost\n", 0o644);

    // The agent and the tests at their host paths (as `cargo xtask test`
    // runs them), without debug info: a fraction of the size, and panics
    // still name file and line.
    let agent = canonical(agent)?;
    let mut binaries: Vec<&Path> = vec![&agent];
    binaries.extend(cases.iter().map(|c| c.path.as_path()));
    binaries.sort();
    binaries.dedup();
    let stripped_dir = work.join("bin");
    fs::create_dir_all(&stripped_dir)?;
    for bin in binaries {
        let stripped = stripped_dir.join(bin.file_name().context("binary without a name")?);
        if !up_to_date(&stripped, bin) {
            cmd::run(
                Command::new("objcopy")
                    .arg("--strip-debug")
                    .arg(bin)
                    .arg(&stripped),
            )?;
        }
        image.add_file_as(bin, &stripped)?;
        image.add_libraries_of(bin)?;
    }

    image.add_tree_as(
        Path::new("/lib/modules").join(&kernel.release),
        &kernel.modules,
    )?;
    image.add_bytes("/init", INIT, 0o755);
    image.add_bytes("/vmtest/env", guest_env(&agent, settings), 0o644);
    image.add_bytes("/vmtest/plan", plan(cases)?, 0o644);
    image.write(out)
}

/// Shell assignments the init sources.
fn guest_env(agent: &Path, settings: Settings) -> String {
    let mut vars = vec![
        (test::AGENT_BIN_ENV.to_owned(), agent.display().to_string()),
        (
            "VMTEST_TIMEOUT".to_owned(),
            settings.test_timeout_secs.to_string(),
        ),
        (TIME_SCALE_ENV.to_owned(), settings.time_scale.to_string()),
        (GUEST_LACKS_ENV.to_owned(), GUEST_LACKS.join(",")),
    ];
    // What the host's test run would see: strict skips, heavy tests on or off.
    for passed in [test::NO_SKIP, "MESH_REDIRECT_HEAVY", "RUST_BACKTRACE"] {
        if let Ok(value) = env::var(passed) {
            vars.push((passed.to_owned(), value));
        }
    }
    let mut s = String::new();
    for (k, v) in vars {
        let _ = writeln!(s, "export {k}={}", shell_quote(&v));
    }
    s
}

/// One line per test: number, binary, exact test name (tab-separated).
fn plan(cases: &[Case]) -> Result<String> {
    let mut s = String::new();
    for (n, case) in cases.iter().enumerate() {
        let bin = case.path.to_str().context("non-UTF-8 test binary path")?;
        if bin.contains(['\t', '\n']) || case.name.contains(['\t', '\n']) {
            bail!("a tab or newline in {bin} {}", case.name);
        }
        let _ = writeln!(s, "{n}\t{bin}\t{}", case.name);
    }
    Ok(s)
}

pub fn canonical(path: &Path) -> Result<PathBuf> {
    fs::canonicalize(path).with_context(|| format!("{}", path.display()))
}

/// Whether `derived` was made from `source` as it is now.
fn up_to_date(derived: &Path, source: &Path) -> bool {
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    matches!((mtime(derived), mtime(source)), (Some(d), Some(s)) if d >= s)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{Settings, guest_env, iptables_programs, shell_quote};

    #[test]
    fn env_is_quoted_for_sh() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
        let settings = Settings {
            test_timeout_secs: 600,
            time_scale: 10,
        };
        let env = guest_env(Path::new("/t/mesh-redirect"), settings);
        assert!(env.contains("export MESH_REDIRECT_BIN='/t/mesh-redirect'\n"));
        assert!(env.contains("export VMTEST_TIMEOUT='600'\n"));
        assert!(env.contains("export MESH_REDIRECT_TIME_SCALE='10'\n"));
    }

    #[test]
    fn every_iptables_variant() {
        let names = iptables_programs();
        assert_eq!(names.len(), 18);
        for n in ["iptables", "ip6tables-legacy-restore", "iptables-nft-save"] {
            assert!(names.iter().any(|p| p == n), "{n}");
        }
    }

    #[test]
    fn the_init_is_a_shell_script() {
        assert!(super::INIT.starts_with("#!/bin/sh\n"));
    }
}

/// The language runtimes the tests' real clients run on: Debian's Python
/// with its standard library, and a Java runtime cut down by `jlink` to the
/// modules the Java clients use (the whole JDK is five times the size).
/// One missing on the host is left out with a warning, as a program is.
mod runtimes {
    use std::{
        fs,
        path::{Path, PathBuf},
        process::Command,
    };

    use anyhow::{Context as _, Result};

    use super::{Image, which};
    use crate::cmd;

    /// What the Java clients import.
    const JAVA_MODULES: &str = "java.base,java.net.http";
    /// Where the guest has the cut-down runtime (and `/usr/bin/java` points).
    const GUEST_JRE: &str = "/usr/lib/jvm/mesh-redirect-jre";
    /// Parts of Python's standard library no test imports.
    const PYTHON_SKIP: &[&str] = &[
        "test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
    ];

    pub fn add(image: &mut Image, work: &Path) -> Result<()> {
        python(image)?;
        java(image, work)
    }

    fn python(image: &mut Image) -> Result<()> {
        let python = Path::new("/usr/bin/python3");
        let Ok(real) = fs::canonicalize(python) else {
            eprintln!(
                "vm-test: warning: no {} on this host; the guest goes without (the tests' Python clients)",
                python.display()
            );
            return Ok(());
        };
        image.add_host_path(python)?;
        image.add_libraries_of(&real)?;
        let name = real
            .file_name()
            .context("python3 without a name")?
            .to_string_lossy()
            .into_owned();
        let stdlib = Path::new("/usr/lib").join(&name);
        add_tree_skipping(image, &stdlib, PYTHON_SKIP)
    }

    /// `source` at the same path, but for the top-level entries in `skip`;
    /// the libraries of every extension module.
    fn add_tree_skipping(image: &mut Image, source: &Path, skip: &[&str]) -> Result<()> {
        image.add_dir(source);
        for entry in fs::read_dir(source).with_context(|| format!("{}", source.display()))? {
            let entry = entry?;
            if skip.iter().any(|s| entry.file_name() == *s) {
                continue;
            }
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                image.add_tree_as(&path, &path)?;
            } else {
                image.add_host_path(&path)?;
            }
        }
        for so in files_ending(source, ".so")? {
            image.add_libraries_of(&so)?;
        }
        Ok(())
    }

    fn java(image: &mut Image, work: &Path) -> Result<()> {
        let Some(jlink) = which("jlink") else {
            eprintln!(
                "vm-test: warning: no jlink on this host; the guest goes without Java (the tests' JDK clients)"
            );
            return Ok(());
        };
        let jre = work.join("jre");
        let stamp = jre.join("modules-of-mesh-redirect");
        if fs::read_to_string(&stamp).ok().as_deref() != Some(JAVA_MODULES) {
            let _ = fs::remove_dir_all(&jre);
            cmd::run(
                Command::new(&jlink)
                    .args(["--add-modules", JAVA_MODULES])
                    .args(["--strip-debug", "--no-man-pages", "--no-header-files"])
                    .arg("--output")
                    .arg(&jre),
            )?;
            fs::write(&stamp, JAVA_MODULES)?;
        }
        image.add_tree_as(GUEST_JRE, &jre)?;
        image.add_libraries_of(&jre.join("bin/java"))?;
        let server = jre.join("lib/server");
        for so in files_ending(&jre.join("lib"), ".so")? {
            image.add_libraries_of_searching(&so, Some(&server))?;
        }
        image.add_symlink("/usr/bin/java", PathBuf::from(GUEST_JRE).join("bin/java"));
        Ok(())
    }

    /// Files under `dir` whose names end with `suffix`.
    fn files_ending(dir: &Path, suffix: &str) -> Result<Vec<PathBuf>> {
        let mut found = Vec::new();
        let mut todo = vec![dir.to_owned()];
        while let Some(d) = todo.pop() {
            for entry in fs::read_dir(&d).with_context(|| format!("{}", d.display()))? {
                let entry = entry?;
                let kind = entry.file_type()?;
                if kind.is_dir() {
                    todo.push(entry.path());
                } else if kind.is_file() && entry.file_name().to_string_lossy().ends_with(suffix) {
                    found.push(entry.path());
                }
            }
        }
        Ok(found)
    }
}
