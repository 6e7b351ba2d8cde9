//! `mesh-redirect iptables`: the istio-iptables command, from flags to
//! rules in the kernel.

use std::process::Command;

use anyhow::{Context as _, bail};
use tracing::{debug, info, warn};

use super::{
    apply,
    istio::{Config, IstioIptablesArgs, restore_input},
};
use crate::netns::Netns;

/// `mesh-redirect iptables`: what istio-iptables does. Validates
/// everything, then prints (`--dry-run`), removes (`--cleanup-only`) or
/// installs the rules (idempotently; `--reconcile` replaces different
/// ones), then the TPROXY routes.
pub fn main(args: &IstioIptablesArgs) -> anyhow::Result<()> {
    if args.run_validation == Some(true) {
        bail!(
            "--run-validation (istio's post-install validation) is not supported by mesh-redirect"
        );
    }
    if args.cni_mode == Some(true) {
        debug!("--cni-mode has no effect: commands always run inside the target namespace");
    }
    let netns = if args.network_namespace.is_empty() {
        None
    } else {
        Some(Netns::open(args.network_namespace.as_ref()).context("--network-namespace")?)
    };
    let runner = |program: &str| match &netns {
        Some(ns) => ns.command(program),
        None => Command::new(program),
    };
    let cfg = Config::from_pod(args, &runner)?;
    if cfg.redirect_dns && !cfg.dns_capture_enabled() {
        warn!(
            "REDIRECT_DNS is set, but CAPTURE_ALL_DNS is false, and no DNS servers provided. DNS capture disabled."
        );
    }
    debug!(?cfg, "istio-iptables configuration");
    let input = restore_input(&cfg);
    if args.dry_run == Some(true) {
        if args.cleanup_only != Some(true) {
            print!("{input}");
        }
        return Ok(());
    }
    if args.skip_rule_apply == Some(true) {
        info!("--skip-rule-apply: nothing applied");
        return Ok(());
    }
    let backend = match args.iptables_backend {
        Some(b) => b,
        None => apply::detect_backend(&runner)?,
    };
    info!(backend = %backend, "iptables backend");
    if args.cleanup_only == Some(true) {
        apply::uninstall(&runner, &cfg, backend)?;
        info!("removed the istio-iptables rules");
        return Ok(());
    }
    if args.force_apply == Some(true) {
        apply::restore(&runner, backend, &input)?;
    } else {
        let installed = apply::install(&runner, &cfg, backend, args.reconcile == Some(true))?;
        info!(ipv4 = ?installed.ipv4, ipv6 = ?installed.ipv6, "istio-iptables rules");
    }
    apply::configure_routes(&runner, &cfg)?;
    Ok(())
}
