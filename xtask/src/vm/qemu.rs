//! Booting a guest with qemu: software emulation (TCG) unless a short boot
//! shows that KVM works here (nested KVM often hangs or aborts).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::cmd;

/// The system's qemu, when bookworm-backports' cannot be had.
const SYSTEM_QEMU: &str = "qemu-system-x86_64";
const MEMORY: &str = "2G";
const CPUS: &str = "2";
/// How long a KVM boot may take to reach the kernel's "no root" panic.
const KVM_PROBE: Duration = Duration::from_secs(10);

/// The qemu that runs the guests: a binary, and the directory of its
/// option ROMs (`-L`) when it is not the system's.
#[derive(Debug, Clone)]
pub struct Vmm {
    bin: PathBuf,
    data: Option<PathBuf>,
}

impl Vmm {
    pub fn new(unpacked: Option<(PathBuf, PathBuf)>) -> Self {
        match unpacked {
            Some((bin, data)) => Self {
                bin,
                data: Some(data),
            },
            None => Self {
                bin: SYSTEM_QEMU.into(),
                data: None,
            },
        }
    }

    pub fn version(&self) -> String {
        cmd::stdout_of(Command::new(&self.bin).arg("--version"))
            .and_then(|v| v.lines().next().map(str::to_owned))
            .unwrap_or_else(|| self.bin.display().to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM if a short probe boot works, TCG otherwise.
    Auto,
    /// Software emulation: slow, works everywhere.
    Tcg,
    /// Hardware virtualisation.
    Kvm,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Tcg => "tcg",
            Self::Kvm => "kvm",
        }
    }
}

/// Decides `Auto`: boots `vmlinuz` under KVM with no root filesystem, which
/// ends in a panic within a second or two when KVM works. The probe's
/// console and qemu's complaints go to `log` and `log.err`.
pub fn choose(vmm: &Vmm, accel: Accel, vmlinuz: &Path, log: &Path) -> Accel {
    if accel != Accel::Auto {
        return accel;
    }
    match probe_kvm(vmm, vmlinuz, log) {
        Ok(took) => {
            eprintln!("vm-test: KVM works here (a probe boot took {took:.1?}): using it");
            Accel::Kvm
        }
        Err(why) => {
            eprintln!("vm-test: KVM unusable ({why}): using software emulation (TCG)");
            Accel::Tcg
        }
    }
}

fn probe_kvm(vmm: &Vmm, vmlinuz: &Path, log: &Path) -> Result<Duration, String> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?;
    let err_log = log.with_extension("err");
    let stderr = fs::File::create(&err_log).map_err(|e| format!("{}: {e}", err_log.display()))?;
    let start = Instant::now();
    let mut child = command(vmm, Accel::Kvm, vmlinuz, None, "512M", "1")
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("{}: {e}", vmm.bin.display()))?;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if start.elapsed() > KVM_PROBE {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("a probe boot did not finish in {KVM_PROBE:?}"));
        }
        thread::sleep(Duration::from_millis(50));
    };
    let console = fs::read_to_string(log).unwrap_or_default();
    if status.success() && console.contains("Kernel panic") {
        return Ok(start.elapsed());
    }
    let err = fs::read_to_string(&err_log).unwrap_or_default();
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no message");
    Err(format!("a probe boot failed ({status}): {last}"))
}

/// qemu with the machine, the kernel and (if any) the initramfs; no
/// devices but the serial ports the caller adds.
fn command(
    vmm: &Vmm,
    accel: Accel,
    vmlinuz: &Path,
    initramfs: Option<&Path>,
    memory: &str,
    cpus: &str,
) -> Command {
    let mut c = Command::new(&vmm.bin);
    if let Some(data) = &vmm.data {
        c.arg("-L").arg(data);
    }
    let (accel, cpu) = match accel {
        Accel::Kvm => ("kvm", "host"),
        Accel::Auto | Accel::Tcg => ("tcg", "max"),
    };
    c.args(["-accel", accel, "-cpu", cpu, "-m", memory, "-smp", cpus])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(vmlinuz);
    if let Some(initramfs) = initramfs {
        c.arg("-initrd").arg(initramfs);
    }
    c
}

/// Starts the guest: the kernel's console (ttyS0) to `console_log`, the
/// init's report (ttyS1) on the child's stdout.
pub fn start(
    vmm: &Vmm,
    accel: Accel,
    vmlinuz: &Path,
    initramfs: &Path,
    console_log: &Path,
) -> Result<Guest> {
    let mut c = command(vmm, accel, vmlinuz, Some(initramfs), MEMORY, CPUS);
    c.arg("-serial")
        .arg(format!("file:{}", console_log.display()))
        .args(["-serial", "stdio"])
        // loglevel=5 keeps kernel warnings (and worse) in the console log.
        .args(["-append", "console=ttyS0 loglevel=5 panic=-1 rdinit=/init"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    eprintln!("+ {}", cmd::display(&c));
    c.spawn()
        .map(Guest)
        .with_context(|| format!("starting {}", vmm.bin.display()))
}

/// A running qemu, killed if dropped before it ended by itself (an error
/// or a panic in xtask leaves no guest behind).
pub struct Guest(pub Child);

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The lines of a kernel console log that tell of a kernel problem.
pub fn kernel_problems(console_log: &Path) -> Vec<String> {
    const SIGNS: [&str; 7] = [
        "BUG:",
        "WARNING:",
        "Oops",
        "Kernel panic",
        "general protection fault",
        "Out of memory",
        "hung_task",
    ];
    let text = fs::read(console_log).unwrap_or_default();
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| SIGNS.iter().any(|s| l.contains(s)))
        .map(|l| l.trim_end_matches('\r').to_owned())
        .collect()
}
