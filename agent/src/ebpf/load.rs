//! Loading the eBPF object: its globals, its maps (created, or adopted from
//! pins), and every program through the verifier. Nothing is attached.

use std::{
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
};

use agent_common::{KernelLayout, globals, maps as names};
use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupSock, CgroupSockAddr, CgroupSockopt, ProgramError, SkLookup, SkMsg, SockOps},
};

use super::{EbpfError, Hook, OBJECT, maps::DatapathMaps};

/// How the loader sets the object up.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// The programs' aya-log debug lines (off: they cost per event).
    pub debug_logs: bool,
    /// How much receive memory a short-circuited socket's reader may hold,
    /// in bytes, before senders to it use TCP.
    pub sockmap_queue_limit: u64,
    /// After how many short connections in a row to a destination new
    /// ones stay on plain TCP (0: never).
    pub short_conn_threshold: u32,
    /// The running kernel's layout and reader policy ([`super::kernel`],
    /// [`super::reads`]); without [`KernelLayout::VALID`] nothing is
    /// short-circuited.
    pub layout: KernelLayout,
    /// The cookie of the network namespace the object's sk_lookup serves
    /// (a pod's agent: its pod's; 0 for none).
    pub sk_lookup_netns: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            debug_logs: false,
            sockmap_queue_limit: globals::SOCKMAP_QUEUE_LIMIT_DEFAULT,
            short_conn_threshold: globals::SHORT_CONN_THRESHOLD_DEFAULT,
            layout: KernelLayout::default(),
            sk_lookup_netns: 0,
        }
    }
}

/// A loaded object: its programs, its maps, and where they are pinned.
pub(super) struct Loaded {
    pub ebpf: Ebpf,
    pub maps: DatapathMaps,
    /// The pin directory, and whether it held a datapath already (whose
    /// maps, with their entries, are ours now).
    pub pins: Option<(PathBuf, bool)>,
}

pub(super) fn program_err(name: &'static str) -> impl FnOnce(ProgramError) -> EbpfError {
    move |source| EbpfError::Program { name, source }
}

pub(super) fn program_mut<'a, P>(ebpf: &'a mut Ebpf, hook: Hook) -> Result<&'a mut P, EbpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let name = hook.program();
    ebpf.program_mut(name)
        .ok_or(EbpfError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(program_err(name))
}

/// Loads the maps and verifies every program. With `pin_dir`, the maps are
/// pinned there, or, if a datapath of the same layout is pinned there
/// already, adopted with their contents.
pub(super) fn load(opts: &LoadOptions, pin_dir: Option<&Path>) -> Result<Loaded, EbpfError> {
    if OBJECT.is_empty() {
        return Err(EbpfError::NoObject);
    }
    let pins = match pin_dir {
        Some(dir) => {
            let adopted = dir.join(names::NETNS_CONFIG).exists();
            crate::pins::create_dir(dir)?;
            Some((dir.to_owned(), adopted))
        }
        None => None,
    };
    let pin_paths = match &pins {
        Some((dir, _)) => pin_paths(dir)?,
        None => Vec::new(),
    };
    let mut loader = EbpfLoader::new();
    configure(&mut loader, opts, opts.debug_logs, &pin_paths);
    let mut ebpf = loader.load(OBJECT)?;
    set_served_netns(&mut ebpf, opts.sk_lookup_netns)?;
    for hook in Hook::ALL {
        load_program(&mut ebpf, hook)
            .map_err(|(name, source)| EbpfError::Program { name, source })?;
    }
    let maps = DatapathMaps::from_loaded(&mut ebpf)?;
    Ok(Loaded { ebpf, maps, pins })
}

/// Another instance of the sk_lookup program alone, serving the namespace
/// with cookie `netns` (in its own `SK_LOOKUP_NETNS`), on the other maps of
/// the datapath pinned in `pin_dir`
/// (an sk_lookup program cannot read its namespace's cookie: each served
/// namespace needs an instance of its own). Its other programs are not
/// loaded.
pub(super) fn sk_lookup_instance(
    opts: &LoadOptions,
    pin_dir: &Path,
    netns: u64,
) -> Result<Ebpf, EbpfError> {
    // Making a loader parses the kernel's BTF (megabytes, tens of
    // milliseconds), which sk_lookup does not even use (it reads nothing of
    // the kernel's structures): every instance comes from one loader.
    static LOADER: Mutex<Option<(PathBuf, EbpfLoader<'static>)>> = Mutex::new(None);
    let mut slot = LOADER.lock().unwrap_or_else(PoisonError::into_inner);
    if slot.as_ref().is_none_or(|(dir, _)| dir != pin_dir) {
        // Once per process (and pin directory): what the loader refers to.
        let opts: &'static LoadOptions = Box::leak(Box::new(*opts));
        let pins: &'static [(String, PathBuf)] = pin_paths(pin_dir)?.leak();
        let mut loader = EbpfLoader::new();
        configure(&mut loader, opts, false, pins);
        loader.btf(None);
        *slot = Some((pin_dir.to_owned(), loader));
    }
    let (_, loader) = slot.as_mut().expect("set above");
    let mut ebpf = loader.load(OBJECT)?;
    set_served_netns(&mut ebpf, netns)?;
    load_program(&mut ebpf, Hook::SkLookup)
        .map_err(|(name, source)| EbpfError::Program { name, source })?;
    Ok(ebpf)
}

/// Tells the object's sk_lookup which namespace it serves (its own map).
fn set_served_netns(ebpf: &mut Ebpf, netns: u64) -> Result<(), EbpfError> {
    let name = names::SK_LOOKUP_NETNS;
    let map = ebpf
        .map_mut(name)
        .ok_or(EbpfError::Missing { kind: "map", name })?;
    let mut a: aya::maps::Array<&mut aya::maps::MapData, u64> =
        aya::maps::Array::try_from(map).map_err(|source| EbpfError::Map { name, source })?;
    a.set(0, netns, 0)
        .map_err(|source| EbpfError::Map { name, source })
}

/// Where each of the object's maps is pinned in `dir`.
fn pin_paths(dir: &Path) -> Result<Vec<(String, PathBuf)>, EbpfError> {
    // Parsing the object takes long: its map names are read once.
    static NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let names = if let Some(n) = NAMES.get() {
        n
    } else {
        let parsed = crate::pins::pinned_map_names(OBJECT)?;
        NAMES.get_or_init(|| parsed)
    };
    Ok(names.iter().map(|n| (n.clone(), dir.join(n))).collect())
}

/// aya-log's levels, as the object's global takes them.
static WARN: u8 = aya_log::Level::Warn as u8;
static DEBUG: u8 = aya_log::Level::Debug as u8;

/// Sets the object's globals and where its maps are pinned.
fn configure<'a>(
    loader: &mut EbpfLoader<'a>,
    opts: &'a LoadOptions,
    debug_logs: bool,
    pin_paths: &'a [(String, PathBuf)],
) {
    let level = if debug_logs { &DEBUG } else { &WARN };
    loader.override_global(aya_log::LEVEL, level, false);
    loader.override_global(
        globals::SOCKMAP_QUEUE_LIMIT,
        &opts.sockmap_queue_limit,
        true,
    );
    loader.override_global(
        globals::SHORT_CONN_THRESHOLD,
        &opts.short_conn_threshold,
        true,
    );
    loader.override_global(globals::KERNEL_LAYOUT, &opts.layout, true);
    for (name, path) in pin_paths {
        loader.map_pin_path(name.as_str(), path.as_path());
    }
}

/// Loads (verifies) one program; the error keeps the program's name.
fn load_program(e: &mut Ebpf, hook: Hook) -> Result<(), (&'static str, ProgramError)> {
    let name = hook.program();
    let err = |e| (name, e);
    // Every entry point is in our object; a stub binary has none.
    let prog = e.program_mut(name).ok_or((name, ProgramError::NotLoaded))?;
    match hook {
        Hook::Connect4
        | Hook::Connect6
        | Hook::GetPeerName4
        | Hook::GetPeerName6
        | Hook::SendMsg4
        | Hook::SendMsg6
        | Hook::RecvMsg4
        | Hook::RecvMsg6 => <&mut CgroupSockAddr>::try_from(prog).map_err(err)?.load(),
        Hook::SockRelease => <&mut CgroupSock>::try_from(prog).map_err(err)?.load(),
        Hook::SockOps => <&mut SockOps>::try_from(prog).map_err(err)?.load(),
        Hook::SkMsg => <&mut SkMsg>::try_from(prog).map_err(err)?.load(),
        Hook::GetSockopt => <&mut CgroupSockopt>::try_from(prog).map_err(err)?.load(),
        Hook::SkLookup => <&mut SkLookup>::try_from(prog).map_err(err)?.load(),
    }
    .map_err(err)
}

/// A program loaded, or the gist of why not.
pub type Verdict = Result<(), String>;

/// The verifier's verdict on each of our programs on this kernel (the
/// object loaded on its own, nothing pinned or attached, all closed
/// again): what `doctor` shows, and what `--mode auto` decides on. The
/// object is loaded as `run` loads it, with the kernel's layout and every
/// path of the short-circuit on (the verifier skips code a read-only
/// global rules out).
pub fn verdicts() -> Result<Vec<(Hook, Verdict)>, EbpfError> {
    if OBJECT.is_empty() {
        return Err(EbpfError::NoObject);
    }
    let mut layout = super::kernel::layout().unwrap_or_else(|_| super::kernel::placeholder());
    layout.flags |= KernelLayout::VALID | KernelLayout::GUARD_BLOCKING;
    let mut loader = EbpfLoader::new();
    loader.override_global(globals::KERNEL_LAYOUT, &layout, true);
    let mut ebpf = loader.load(OBJECT)?;
    Ok(Hook::ALL
        .into_iter()
        .map(|hook| {
            let verdict = load_program(&mut ebpf, hook).map_err(|(name, e)| {
                verifier_verdict(&EbpfError::Program { name, source: e }.to_string())
            });
            (hook, verdict)
        })
        .collect())
}

/// The gist of a load error: its first line, and the verifier's reason (the
/// last line of its log that is not a statistic).
#[must_use]
pub fn verifier_verdict(error: &str) -> String {
    let first = error.lines().next().unwrap_or_default();
    let first = first
        .split(" Verifier output:")
        .next()
        .unwrap_or_default()
        .trim_end_matches('.');
    // The verifier's reason, if it gave one: the last telling line of its
    // log (empty when the kernel refused the load before verifying).
    let reason = error
        .split_once("Verifier output:")
        .map_or("", |(_, log)| log)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| {
            !l.is_empty()
                && !l.starts_with("verification time")
                && !l.starts_with("stack depth")
                && !l.starts_with("processed ")
        });
    match reason {
        Some(r) if !first.contains(r) => format!("{first}: {r}"),
        _ => first.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::verifier_verdict;

    #[test]
    fn verifier_verdict_names_the_program_and_the_reason() {
        let err = "eBPF program mesh_getsockopt: the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier output: 0: R1=ctx() R10=fp0\n60: (07) r9 += 24\nR9 pointer arithmetic on sock prohibited\nverification time 707 usec\nstack depth 80+0\n";
        assert_eq!(
            verifier_verdict(err),
            "eBPF program mesh_getsockopt: the BPF_PROG_LOAD syscall returned Permission denied (os error 13): R9 pointer arithmetic on sock prohibited"
        );
        assert_eq!(verifier_verdict("no object embedded"), "no object embedded");
        // Refused before the verifier ran: no reason to add.
        assert_eq!(
            verifier_verdict(
                "the BPF_PROG_LOAD syscall returned Operation not permitted (os error 1). Verifier output:"
            ),
            "the BPF_PROG_LOAD syscall returned Operation not permitted (os error 1)"
        );
    }
}
