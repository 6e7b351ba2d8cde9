//! A run from start to end: take over from the agent serving the namespace
//! (or bind afresh), prepare capture, start the proxy, install capture,
//! serve until a signal or a handover, then drain and tear down (or leave
//! everything to the successor).

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use super::{
    args::RunArgs,
    plan::{Plan, choose_mode},
};
use crate::{
    admin::{self, AdminHandle, AdminState, Readiness},
    capture::{Capture, Mode, ebpf::pin_dir},
    handoff::{self, ControlServer, PendingHandover, Requests, Served, Successor},
    proxy::{Listeners, ProxyHandle},
    rules::{CaptureRules, RuleArgs},
    signals::Signals,
};

/// Why the agent stops.
enum Stop {
    Signal(&'static str),
    /// A new agent took the listeners: leave pins and rules to it.
    HandedOver,
}

/// Runs until SIGTERM or SIGINT (or a handover), then undoes what it set up.
pub fn run(args: &RunArgs) -> Result<()> {
    // Signals are caught from the very start: one that arrives while we set
    // up (or right after the ready line) still ends in a clean teardown.
    let rt = crate::proxy::worker::main_runtime()?;
    let signals = {
        let _rt = rt.enter();
        Signals::new()?
    };
    let plan = Plan::new(args)?;
    let settings = &plan.capture;
    if let Some(p) = &plan.proxy {
        crate::proxy::worker::raise_fd_limit(p);
    }
    let mode = choose_mode(args.mode, &plan, &args.pretend_missing)?;
    let pins = (mode == Mode::Ebpf && !args.no_pin)
        .then(|| pin_dir(&args.bpffs, settings.netns_cookie))
        .transpose()
        .context("--bpffs")?;
    plan.log_bypass();

    // The listeners: taken over from the agent running for this namespace
    // (which serves on until we confirm, below), or bound afresh before
    // anything is attached (a port in use fails here, with nothing to undo).
    let control_path = handoff::control_path(&args.control_dir, settings.netns_cookie);
    let mut taken = handoff::take_over(
        &control_path,
        plan.proxy.as_ref().map(|c| c.outbound_port),
        plan.proxy.as_ref().and_then(|c| c.inbound_port),
    )?;
    let took_over = taken.is_some();
    let listeners = listeners(
        taken.as_mut().and_then(|t| t.listeners.take()),
        &plan,
        &settings.netns,
    )?;
    let admin_listener = (!args.no_admin)
        .then(|| admin::bind(&settings.netns, args.admin))
        .transpose()?;
    // Our own handle on the listening sockets: for the SOCKMAP and for a
    // handover to whoever replaces us.
    let kept = listeners.as_ref().map(Listeners::try_clone).transpose()?;
    let ready = Arc::new(Readiness::default());
    // Capture is prepared (the eBPF object loaded and verified, nothing
    // attached) before the proxy starts: a kernel that refuses it stops us
    // before anything listens.
    let mut capture = Capture::prepare(mode, settings, pins.clone())?;
    // Taking over, the old agent accepts until we confirm: our proxy starts
    // once capture is in place, so a step that fails before that loses no
    // connection we accepted.
    let mut listeners = listeners;
    let mut proxy = if took_over {
        None
    } else {
        start_proxy(&plan, listeners.take(), mode, took_over)?
    };
    let proxy_listeners: Vec<&std::net::TcpListener> = kept
        .iter()
        .flat_map(|l| l.outbound.iter().chain(&l.inbound))
        .collect();
    capture.install(settings, &proxy_listeners)?;
    if took_over {
        proxy = start_proxy(&plan, listeners.take(), mode, took_over)?;
    }
    ready.set_listeners();
    ready.set_capture();
    let state = Arc::new(AdminState::new(
        mode,
        settings.fail_open,
        Arc::clone(&ready),
        proxy.as_ref().map(|p| Arc::clone(&p.stats)),
        capture
            .maps()
            .map(crate::ebpf::DatapathMaps::reopen)
            .transpose()?,
    ));
    let _admin = admin_listener
        .map(|l| AdminHandle::start(l, Arc::clone(&state)))
        .transpose()?;
    let mut control = ControlServer::bind(&control_path)?;
    if let Some(t) = taken {
        confirm(t);
    }
    info!(
        mode = mode.name(),
        netns = %settings.netns.path().display(),
        cgroup = %settings.cgroup.display(),
        outbound_port = settings.outbound_port,
        inbound_port = settings.inbound.then_some(settings.inbound_port),
        sockmap = mode == Mode::Ebpf && settings.sockmap,
        short_circuits = capture.short_circuits(),
        proxy = if proxy.is_some() { "builtin" } else { "external" },
        fail = if settings.fail_open { "open" } else { "closed" },
        pinned = pins.is_some(),
        took_over,
        "mesh-redirect ready"
    );

    let logger = capture.logger()?;
    let mut agent = Agent {
        plan: &plan,
        capture: &mut capture,
        state: &state,
    };
    let stop = rt.block_on(wait(
        signals,
        logger,
        &mut control,
        kept.as_ref(),
        proxy.as_ref(),
        &mut agent,
    ));
    ready.set_draining();
    shut_down(args, &plan, stop, capture, proxy, kept)
}

/// The built-in proxy on `listeners`, if there is one. It may splice out of
/// the app's legs only if none can be in a SOCKHASH: no short-circuit, and
/// no agent we `took_over` whose datapath may still put them in one.
fn start_proxy(
    plan: &Plan,
    listeners: Option<Listeners>,
    mode: Mode,
    took_over: bool,
) -> Result<Option<ProxyHandle>> {
    let no_sockhash = !took_over && (mode == Mode::Iptables || !plan.capture.sockmap);
    Ok(match (plan.proxy.clone(), listeners) {
        (Some(mut config), Some(l)) => {
            let asked = config.splice_from_app.load(Ordering::Relaxed);
            if asked && !no_sockhash {
                tracing::info!(
                    "--splice: not where the app's sockets may be in a SOCKHASH (a short-circuit, or a predecessor's); copying"
                );
            }
            config.splice_from_app = Arc::new((asked && no_sockhash).into());
            Some(ProxyHandle::start(&plan.capture.netns, config, l)?)
        }
        _ => None,
    })
}

/// Tells the agent we replace that we serve now (it stops accepting and
/// exits); if it is gone already, we serve alone anyway.
fn confirm(taken: handoff::Takeover) {
    if let Err(e) = taken.confirm() {
        warn!(error = %e, "telling the agent we replace that we serve now");
    }
}

/// The proxy's listeners: those taken over (an older agent may have had
/// fewer, e.g. no IPv6: the rest are bound), or bound afresh.
fn listeners(
    taken: Option<Listeners>,
    plan: &Plan,
    netns: &crate::netns::Netns,
) -> Result<Option<Listeners>> {
    Ok(match (taken, &plan.proxy) {
        (Some(mut l), Some(c)) => {
            l.bind_missing(netns, c)?;
            Some(l)
        }
        (Some(l), None) => Some(l),
        (None, Some(c)) => Some(Listeners::bind(netns, c)?),
        (None, None) => None,
    })
}

/// What the control socket asks of a running agent.
struct Agent<'a> {
    plan: &'a Plan,
    capture: &'a mut Capture,
    state: &'a AdminState,
}

impl Requests for Agent<'_> {
    fn stats(&self) -> String {
        serde_json::to_string(&self.state.report()).unwrap_or_default()
    }

    fn rules(&mut self, args: &RuleArgs) -> Result<CaptureRules, String> {
        let current = self
            .capture
            .rules(&self.plan.capture)
            .map_err(|e| e.to_string())?;
        let wanted = args.apply_to(&current).map_err(|e| e.to_string())?;
        self.capture
            .update_rules(&self.plan.capture, &wanted)
            .map_err(|e| format!("{e:#}"))?;
        info!(rules = %serde_json::to_string(&wanted).unwrap_or_default(), "capture rules changed");
        Ok(wanted)
    }
}

/// Stops accepting, drains, then tears down (or, after a handover, leaves
/// everything to the successor).
fn shut_down(
    args: &RunArgs,
    plan: &Plan,
    stop: Result<Stop>,
    capture: Capture,
    proxy: Option<ProxyHandle>,
    kept: Option<Listeners>,
) -> Result<()> {
    if let Some(p) = &proxy {
        p.stop_accepting();
    }
    let handed_over = matches!(stop, Ok(Stop::HandedOver));
    if !handed_over {
        // Nobody takes our listening sockets: close them, so new connects
        // are refused (fail closed) or go direct (fail open) while we drain.
        drop(kept);
    }
    if let Some(p) = &proxy {
        let deadline = Instant::now() + Duration::from_secs(args.drain_timeout_secs);
        let left = p.drain(deadline);
        if left > 0 {
            warn!(
                connections = left,
                "drain deadline passed: closing the connections still open"
            );
        }
    }
    if handed_over {
        info!("handed over to a new agent: leaving the datapath, rules and listeners to it");
        capture.leave();
    } else {
        capture.teardown(&plan.capture);
    }
    if let Some(p) = proxy {
        p.stop();
    }
    match stop? {
        Stop::Signal(name) => info!(signal = name, "detached and stopped"),
        Stop::HandedOver => info!("stopped after the handover"),
    }
    Ok(())
}

/// Forwards the programs' aya-log records and answers the control socket
/// until a signal or a handover.
async fn wait(
    mut signals: Signals,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    control: &mut ControlServer,
    listeners: Option<&Listeners>,
    proxy: Option<&ProxyHandle>,
    agent: &mut dyn Requests,
) -> Result<Stop> {
    let mut logs = match logger {
        // SAFETY: the logger owns its ring buffer's fd and keeps it open, and
        // unchanged, for as long as it lives inside the AsyncFd.
        Some(l) => Some(
            unsafe { AsyncFd::register_with_interest(l, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("watching the eBPF log ring buffer: {e}"))?,
        ),
        None => None,
    };
    let mut control_fd = watch_control(control)?;
    // A successor that has our listeners and is getting ready.
    let mut pending: Option<(PendingHandover, AsyncFd<std::os::unix::net::UnixStream>)> = None;
    // A signal that came while a successor was getting ready: it gets this
    // long to say whether it serves.
    let mut stopping: Option<(&'static str, tokio::time::Instant)> = None;
    let stop = loop {
        tokio::select! {
            name = signals.recv() => if let Some(s) = signalled(name, pending.is_some(), &mut stopping) { break s },
            () = tokio::time::sleep_until(stopping.map_or_else(tokio::time::Instant::now, |(_, at)| at)), if stopping.is_some() => {
                warn!("the new agent did not say it was ready in time: leaving everything to it");
                control.handed_over();
                break Stop::HandedOver;
            }
            guard = control_fd.readable() => {
                guard?.clear_ready();
                // With an external proxy there are no sockets to hand over,
                // but a successor still takes the pins over. Every
                // connection waiting is answered.
                let mut handed_over = false;
                loop {
                    match control.serve_one(listeners, agent, pending.is_some()) {
                        Ok(Served::Idle) => break,
                        Ok(Served::Answered) => {}
                        Ok(Served::HandedOver) => {
                            if let Some(proxy) = proxy {
                                proxy.stop_splicing();
                            }
                            handed_over = true;
                            break;
                        }
                        Ok(Served::Pending(p)) => {
                            info!("a new agent has the listeners and is getting ready: serving on until it is");
                            if let Some(proxy) = proxy {
                                proxy.stop_splicing();
                            }
                            // SAFETY: an owned clone of the connection, open and
                            // unchanged for as long as the AsyncFd owns it.
                            let fd = unsafe {
                                AsyncFd::register_with_interest(
                                    p.stream().try_clone()?,
                                    tokio::io::Interest::READABLE,
                                )
                            }
                            .map_err(|e| anyhow::anyhow!("watching the new agent: {e}"))?;
                            pending = Some((p, fd));
                        }
                        Err(e) => {
                            warn!(error = %e, "control request failed");
                            break;
                        }
                    }
                }
                if handed_over {
                    break Stop::HandedOver;
                }
            }
            guard = async { pending.as_ref().expect("guarded by the if").1.readable().await }, if pending.is_some() => {
                guard?.clear_ready();
                let (p, _) = pending.as_mut().expect("guarded by the if");
                match p.poll() {
                    Successor::Preparing => {}
                    Successor::Ready => {
                        control.handed_over();
                        break Stop::HandedOver;
                    }
                    Successor::GaveUp => {
                        pending = None;
                        if let Some((name, _)) = stopping {
                            warn!(signal = name, "the new agent went away before it was ready: stopping as the signal asked");
                            break Stop::Signal(name);
                        }
                        warn!("the new agent went away before it was ready: serving on");
                        match control.rebind() {
                            Ok(()) => control_fd = watch_control(control)?,
                            Err(e) => warn!(error = %e, "listening on the control socket again"),
                        }
                    }
                }
            }
            guard = async { logs.as_mut().expect("guarded by the if").readable_mut().await }, if logs.is_some() => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        }
    };
    if let Some(l) = logs.as_mut() {
        l.get_mut().flush();
    }
    info!(
        reason = match stop {
            Stop::Signal(s) => s,
            Stop::HandedOver => "handover",
        },
        "shutting down"
    );
    Ok(stop)
}

/// How long a successor that is getting ready may take to say so once we
/// are asked to stop.
const SUCCESSOR_GRACE: Duration = Duration::from_secs(30);

/// A signal: the stop it means now, or `None` while a successor gets ready
/// (then `stopping` says since when; tearing down would pull the datapath
/// from under it).
fn signalled(
    name: &'static str,
    pending: bool,
    stopping: &mut Option<(&'static str, tokio::time::Instant)>,
) -> Option<Stop> {
    if !pending {
        return Some(Stop::Signal(name));
    }
    if stopping.is_none() {
        info!(
            signal = name,
            "a new agent is taking over: waiting for it before stopping"
        );
        *stopping = Some((name, tokio::time::Instant::now() + SUCCESSOR_GRACE));
    }
    None
}

/// Readiness of the control socket (`serve_one` accepts on the original).
fn watch_control(control: &ControlServer) -> Result<AsyncFd<std::os::unix::net::UnixListener>> {
    // SAFETY: the clone is an owned listener whose fd stays open, unchanged,
    // for as long as the AsyncFd owns it.
    unsafe { AsyncFd::register(control.listener().try_clone()?) }
        .map_err(|e| anyhow::anyhow!("watching the control socket: {e}"))
}
