//! `cargo xtask vm-test`: the kernel integration tests inside qemu guests
//! booted with Debian's kernels (bookworm's 6.1, bookworm-backports' 6.12).
//!
//! Each guest boots from an initramfs that holds its whole userland: the
//! host's own `sh`, `ip`, `iptables*`, `curl`, ... with their libraries, the
//! agent and the test binaries at their host paths, and the kernel's
//! modules, loaded on demand. Nothing is shared with the host while a test
//! runs, so a guest sees exactly what its kernel offers. A small init
//! (`vm/init.sh`) mounts proc, sys, devtmpfs, bpffs and cgroup2, runs
//! `mesh-redirect doctor`, then every test in a process of its own and
//! reports on a serial port that xtask reads; the kernel's console goes to
//! `target/vm/<kernel>/console.log`.
//!
//! The guests run under bookworm-backports' qemu (unpacked under
//! `target/vm/qemu`, see `debian::fetch_qemu`), with software emulation
//! unless a short probe shows KVM works.

mod debian;
mod guest;
mod initramfs;
mod qemu;

use std::{
    fmt, fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::Command,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use debian::Series;
use qemu::Accel;

use crate::{
    build, cmd, setup,
    test::{self, binary_name},
};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Kernel series to boot, repeatable: 6.1 (bookworm), 6.12
    /// (bookworm-backports). Default: both.
    #[arg(long = "kernel", value_name = "SERIES")]
    kernels: Vec<String>,
    /// Only tests whose `binary::test` name contains one of these.
    filters: Vec<String>,
    /// Leave out tests whose `binary::test` name contains this (repeatable).
    #[arg(long, value_name = "PATTERN")]
    skip: Vec<String>,
    /// Ask Debian for the suites' current kernels instead of reusing the
    /// ones unpacked under target/vm.
    #[arg(long)]
    refresh: bool,
    /// How qemu runs the guests.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    accel: Accel,
    /// Seconds one test may run in the guest before it is killed.
    #[arg(long, value_name = "SECS", default_value_t = 900)]
    test_timeout: u64,
}

/// Seconds a guest may take from power-on to its first report.
const BOOT_TIMEOUT: Duration = Duration::from_mins(5);

/// One test of one binary.
#[derive(Debug, Clone)]
pub struct Case {
    /// `datapath` (the binary's name without cargo's hash).
    pub binary: String,
    /// The binary, canonical: the guest has it at the same path.
    pub path: PathBuf,
    /// The name libtest knows it by: `bulk_64_mib_each_way_is_byte_exact::write_size_1_1024`.
    pub name: String,
}

impl Case {
    fn full_name(&self) -> String {
        format!("{}::{}", self.binary, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Passed,
    Skipped(String),
    Failed(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Passed => f.write_str("ok"),
            Self::Skipped(why) => write!(f, "skipped: {why}"),
            Self::Failed(why) => write!(f, "FAILED ({why})"),
        }
    }
}

#[derive(Debug, Default)]
struct Tally {
    passed: usize,
    failed: usize,
    skipped: usize,
}

impl Tally {
    fn add(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Passed => self.passed += 1,
            Outcome::Skipped(_) => self.skipped += 1,
            Outcome::Failed(_) => self.failed += 1,
        }
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }
}

/// What one kernel did.
struct KernelRun {
    label: String,
    tally: Tally,
    /// Why the run as a whole failed (no boot, a crash, a hang), if it did.
    fault: Option<String>,
    took: Duration,
}

pub fn run(opts: &Options) -> Result<()> {
    let mut series: Vec<Series> = Vec::new();
    for name in &opts.kernels {
        let s = Series::parse(name)?;
        if !series.contains(&s) {
            series.push(s);
        }
    }
    if series.is_empty() {
        series = debian::SERIES.to_vec();
    }
    let tc = setup::ensure(&[
        setup::Need::Tests,
        setup::Need::Clients,
        setup::Need::Demo,
        setup::Need::Vm,
    ])?;
    let agent = build::build(&tc, false)?;
    let binaries = test::kernel_test_binaries(&tc)?;
    let cases = select(list_cases(&binaries)?, &opts.filters, &opts.skip);
    if cases.is_empty() {
        bail!("no kernel test matches the filters");
    }
    let vm_dir = build::root().join("target/vm");
    let mut apt = debian::Apt::new(&vm_dir)?;
    let kernels = series
        .iter()
        .map(|s| debian::fetch(&mut apt, &vm_dir, *s, opts.refresh))
        .collect::<Result<Vec<_>>>()?;
    let vmm = qemu::Vmm::new(debian::fetch_qemu(&mut apt, &vm_dir, opts.refresh));
    let accel = qemu::choose(
        &vmm,
        opts.accel,
        &kernels[0].vmlinuz,
        &vm_dir.join("kvm-probe.log"),
    );
    let settings = guest::Settings {
        test_timeout_secs: opts.test_timeout,
        time_scale: time_scale(accel)?,
    };
    eprintln!(
        "vm-test: {} tests on {} kernels, {} with {}; {}={} {}={}",
        cases.len(),
        kernels.len(),
        accel.name(),
        vmm.version(),
        test::NO_SKIP,
        std::env::var(test::NO_SKIP).unwrap_or_default(),
        guest::TIME_SCALE_ENV,
        settings.time_scale,
    );
    // Every image before the first boot: all kernels test the same binaries
    // even if a build replaces them meanwhile.
    for kernel in &kernels {
        let initrd = vm_dir.join(kernel.series.name).join("initramfs.cpio");
        let size = guest::initramfs(kernel, &agent, &cases, settings, &vm_dir, &initrd)?;
        eprintln!(
            "vm-test: {}: {} {} ({}), initramfs {} MiB",
            kernel.series.name,
            kernel.package,
            kernel.version,
            kernel.release,
            size >> 20
        );
    }

    let width = kernels
        .iter()
        .map(|k| k.series.name.len())
        .max()
        .unwrap_or(0);
    let mut runs = Vec::new();
    for kernel in &kernels {
        let work = vm_dir.join(kernel.series.name);
        let label = format!("{:<width$}", kernel.series.name);
        runs.push(run_kernel(
            &vmm, kernel, accel, &label, &cases, &work, opts,
        )?);
    }

    summarize(&runs, &kernels, &vm_dir)
}

/// A line per kernel, the closing count, and an error if anything failed.
fn summarize(runs: &[KernelRun], kernels: &[debian::Kernel], vm_dir: &Path) -> Result<()> {
    println!();
    let mut total = Tally::default();
    for (run, kernel) in runs.iter().zip(kernels) {
        let fault = run
            .fault
            .as_ref()
            .map(|f| format!("; {f}"))
            .unwrap_or_default();
        println!(
            "{} {}: {} in {}{fault}",
            run.label,
            kernel.release,
            run.tally,
            minutes(run.took)
        );
        total.passed += run.tally.passed;
        total.failed += run.tally.failed;
        total.skipped += run.tally.skipped;
    }
    println!("vm-test: {total}");
    let failed: Vec<_> = runs
        .iter()
        .filter(|r| r.tally.failed > 0 || r.fault.is_some())
        .map(|r| r.label.trim())
        .collect();
    if !failed.is_empty() {
        bail!(
            "kernel tests failed on {} (logs under {})",
            failed.join(", "),
            vm_dir.display()
        );
    }
    Ok(())
}

/// `MESH_REDIRECT_TIME_SCALE` for the guest: the host's if set, else 10
/// under software emulation (64 MiB through the datapath takes a minute or
/// two there, and a reader can stall for seconds), 1 under KVM.
fn time_scale(accel: Accel) -> Result<u32> {
    match std::env::var(guest::TIME_SCALE_ENV) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{}={v} is not a number", guest::TIME_SCALE_ENV)),
        Err(_) if accel == Accel::Kvm => Ok(1),
        Err(_) => Ok(10),
    }
}

/// Every test of every binary, as `--list` names them (run on the host:
/// listing needs neither root nor the guest's kernel).
fn list_cases(binaries: &[PathBuf]) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    for bin in binaries {
        let out = cmd::output(Command::new(bin).args(["--list", "--format", "terse"]))?;
        if !out.status.success() {
            bail!("{} --list failed: {}", bin.display(), out.status);
        }
        let path = guest::canonical(bin)?;
        let binary = binary_name(&path);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.strip_suffix(": test") {
                cases.push(Case {
                    binary: binary.clone(),
                    path: path.clone(),
                    name: name.to_owned(),
                });
            }
        }
    }
    Ok(cases)
}

fn select(cases: Vec<Case>, filters: &[String], skip: &[String]) -> Vec<Case> {
    cases
        .into_iter()
        .filter(|c| {
            let name = c.full_name();
            (filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
                && !skip.iter().any(|s| name.contains(s.as_str()))
        })
        .collect()
}

/// A line the guest's init sent on ttyS1 (see vm/init.sh).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Report<'a> {
    Ready(&'a str),
    Doctor(&'a str),
    Start(usize),
    Skip(&'a str),
    NotRun,
    End(usize, i32),
    Done,
    Output(&'a str),
    Other(&'a str),
}

fn parse_report(line: &str) -> Report<'_> {
    if let Some(out) = line.strip_prefix("| ") {
        return Report::Output(out);
    }
    if line == "|" {
        return Report::Output("");
    }
    let Some(rest) = line.strip_prefix("VMTEST ") else {
        return Report::Other(line);
    };
    let (word, arg) = rest.split_once(' ').unwrap_or((rest, ""));
    let mut nums = arg.split(' ').map(str::parse::<i64>);
    let mut num = || nums.next().and_then(Result::ok);
    match word {
        "READY" => Report::Ready(arg),
        "DOCTOR" => Report::Doctor(arg),
        "START" => num()
            .and_then(|n| usize::try_from(n).ok())
            .map_or(Report::Other(line), Report::Start),
        "SKIP" => Report::Skip(arg),
        "NOTRUN" => Report::NotRun,
        "END" => match (num(), num()) {
            (Some(n), Some(rc)) => match (usize::try_from(n), i32::try_from(rc)) {
                (Ok(n), Ok(rc)) => Report::End(n, rc),
                _ => Report::Other(line),
            },
            _ => Report::Other(line),
        },
        "DONE" => Report::Done,
        _ => Report::Other(line),
    }
}

/// Boots `kernel`, prints a line per test as the guest reports it, and
/// keeps the guest's report in `work/tests.log`.
fn run_kernel(
    vmm: &qemu::Vmm,
    kernel: &debian::Kernel,
    accel: Accel,
    label: &str,
    cases: &[Case],
    work: &Path,
    opts: &Options,
) -> Result<KernelRun> {
    let console_log = work.join("console.log");
    let mut log = fs::File::create(work.join("tests.log"))?;
    let start = Instant::now();
    let mut guest = qemu::start(
        vmm,
        accel,
        &kernel.vmlinuz,
        &work.join("initramfs.cpio"),
        &console_log,
    )?;
    let stdout = guest.0.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        // Bytes, not `lines()`: a test may print anything, and a reader
        // that stopped at invalid UTF-8 would leave qemu blocked on a full pipe.
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
            buf.clear();
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut session = Session::new(label, accel, cases, opts.test_timeout);
    let mut fault = None;
    let silence = Duration::from_secs(opts.test_timeout) + Duration::from_mins(1);
    loop {
        let limit = if session.phase == Phase::Booting {
            BOOT_TIMEOUT
        } else {
            silence
        };
        let line = match rx.recv_timeout(limit) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                fault = Some(format!(
                    "the guest said nothing for {} (see {})",
                    minutes(limit),
                    console_log.display()
                ));
                let _ = guest.0.kill();
                break;
            }
        };
        writeln!(log, "{line}")?;
        session.handle(parse_report(&line), start);
    }
    let status = guest.0.wait()?;
    session.unfinished();
    if fault.is_none() && session.phase != Phase::Done {
        fault = Some(if session.phase == Phase::Booting {
            format!("the guest did not boot ({status})")
        } else {
            format!("the guest stopped before the end ({status})")
        });
    }
    let problems = qemu::kernel_problems(&console_log);
    if !problems.is_empty() || fault.is_some() {
        println!(
            "{label} kernel log ({}): {} problem lines",
            console_log.display(),
            problems.len()
        );
        for p in problems.iter().take(12) {
            println!("{label}   {p}");
        }
    }
    Ok(KernelRun {
        label: label.to_owned(),
        tally: session.tally,
        fault,
        took: start.elapsed(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Booting,
    /// Output lines belong to the doctor's report.
    Doctor,
    Tests,
    Done,
}

/// The state of one guest's report, read line by line.
struct Session<'a> {
    label: &'a str,
    accel: Accel,
    cases: &'a [Case],
    test_timeout: u64,
    phase: Phase,
    /// The test running, and since when.
    current: Option<(usize, Instant)>,
    output: Vec<String>,
    skip: Option<String>,
    not_run: bool,
    finished: Vec<bool>,
    tally: Tally,
}

impl<'a> Session<'a> {
    fn new(label: &'a str, accel: Accel, cases: &'a [Case], test_timeout: u64) -> Self {
        Self {
            label,
            accel,
            cases,
            test_timeout,
            phase: Phase::Booting,
            current: None,
            output: Vec::new(),
            skip: None,
            not_run: false,
            finished: vec![false; cases.len()],
            tally: Tally::default(),
        }
    }

    fn handle(&mut self, report: Report<'_>, boot: Instant) {
        let label = self.label;
        match report {
            Report::Ready(release) => {
                self.phase = Phase::Tests;
                println!(
                    "{label} booted {release} in {:.1} s ({})",
                    boot.elapsed().as_secs_f64(),
                    self.accel.name()
                );
            }
            Report::Doctor(rc) => {
                self.phase = Phase::Doctor;
                println!("{label} mesh-redirect doctor (exit {rc}):");
            }
            // What this kernel lacks shows as ✗ (needed) or – (optional)
            // in the doctor's report; how it treats sockmap readers decides
            // which sockets the short-circuit carries.
            Report::Output(text) if self.phase == Phase::Doctor => {
                if text.starts_with('✗')
                    || text.starts_with('–')
                    || text.starts_with("mode ")
                    || text.contains("sockmap readers")
                {
                    println!("{label}   {text}");
                }
            }
            Report::Output(text) => self.output.push(text.to_owned()),
            Report::Start(n) => {
                self.phase = Phase::Tests;
                self.current = Some((n, Instant::now()));
                self.output.clear();
                (self.skip, self.not_run) = (None, false);
            }
            Report::Skip(why) => self.skip = Some(why.to_owned()),
            Report::NotRun => self.not_run = true,
            Report::End(n, rc) => self.end(n, rc),
            Report::Done => self.phase = Phase::Done,
            Report::Other(_) => {}
        }
    }

    fn end(&mut self, n: usize, rc: i32) {
        let took = self
            .current
            .take()
            .map(|(_, t)| t.elapsed())
            .unwrap_or_default();
        let Some(case) = self.cases.get(n) else {
            return;
        };
        let outcome = match (rc, self.skip.take(), self.not_run) {
            (124 | 137, _, _) => Outcome::Failed(format!(
                "killed after {} s, the test timeout",
                self.test_timeout
            )),
            (0, _, true) => Outcome::Failed("libtest ran no test by that name".into()),
            (0, Some(why), _) => Outcome::Skipped(why),
            (0, None, _) => Outcome::Passed,
            (rc, _, _) => Outcome::Failed(format!("exit {rc}")),
        };
        println!(
            "{} {} ... {outcome} [{:.1} s]",
            self.label,
            case.full_name(),
            took.as_secs_f64()
        );
        if matches!(outcome, Outcome::Failed(_)) {
            print_tail(self.label, &self.output);
        }
        self.tally.add(&outcome);
        self.finished[n] = true;
    }

    /// Counts every test the guest did not finish as failed.
    fn unfinished(&mut self) {
        if let Some((n, _)) = self.current.take() {
            println!(
                "{} {} ... FAILED (the guest stopped during this test)",
                self.label,
                self.cases[n].full_name()
            );
            print_tail(self.label, &self.output);
        }
        let left = self.finished.iter().filter(|f| !**f).count();
        if left > 0 {
            println!("{} {left} tests not run: the guest stopped", self.label);
        }
        self.tally.failed += left;
    }
}

fn print_tail(label: &str, output: &[String]) {
    const TAIL: usize = 40;
    if output.len() > TAIL {
        println!("{label}   ... ({} lines before)", output.len() - TAIL);
    }
    for line in &output[output.len().saturating_sub(TAIL)..] {
        println!("{label}   | {line}");
    }
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::{Case, Report, binary_name, parse_report, select};

    #[test]
    fn binary_names_lose_cargos_hash() {
        assert_eq!(
            binary_name(Path::new("/t/deps/datapath-8264ecea13435704")),
            "datapath"
        );
        assert_eq!(binary_name(Path::new("/t/deps/my-tool")), "my-tool");
    }

    #[test]
    fn reports() {
        assert_eq!(parse_report("VMTEST START 3"), Report::Start(3));
        assert_eq!(parse_report("VMTEST END 3 101"), Report::End(3, 101));
        assert_eq!(
            parse_report("VMTEST SKIP no sk_msg here"),
            Report::Skip("no sk_msg here")
        );
        assert_eq!(
            parse_report("VMTEST READY 6.1.0-56-cloud-amd64"),
            Report::Ready("6.1.0-56-cloud-amd64")
        );
        assert_eq!(
            parse_report("| test x ... ok"),
            Report::Output("test x ... ok")
        );
        assert_eq!(parse_report("VMTEST END x"), Report::Other("VMTEST END x"));
        assert_eq!(parse_report("random"), Report::Other("random"));
    }

    #[test]
    fn filters_match_binary_and_test() {
        let case = |binary: &str, name: &str| Case {
            binary: binary.into(),
            path: PathBuf::from("/x"),
            name: name.into(),
        };
        let cases = vec![
            case("attach", "a"),
            case("datapath", "bulk::x"),
            case("datapath", "y"),
        ];
        let names = |v: Vec<Case>| v.iter().map(Case::full_name).collect::<Vec<_>>();
        assert_eq!(names(select(cases.clone(), &[], &[])).len(), 3);
        assert_eq!(
            names(select(
                cases.clone(),
                &["datapath::".into()],
                &["bulk".into()]
            )),
            ["datapath::y"]
        );
        assert_eq!(
            names(select(cases, &["attach".into(), "bulk".into()], &[])),
            ["attach::a", "datapath::bulk::x"]
        );
    }
}
