//! Installing and removing the istio-iptables rules in a network namespace.
//!
//! Every command is built by a `runner(program)` the caller passes: for the
//! CLI `std::process::Command::new`, for the agent
//! [`Netns::command`](crate::netns::Netns::command), which runs it inside
//! the served namespace.
//!
//! - [`install`] is idempotent: it reads the tables first (`iptables-save`)
//!   and compares what is there with what it would write, as istio's
//!   `VerifyIptablesState` does (the same `ISTIO_*` chains with the same
//!   number of rules, the same number of jumps into them from the built-in
//!   chains, every rule present per `iptables -C`). The same rules: nothing
//!   to do. Different ones: an error naming the difference, unless
//!   `reconcile`, which removes ours and installs the new ones. Nothing is
//!   written before that decision.
//! - Rules go in with `iptables-restore --noflush` (atomic per table, and
//!   per call with nft), IPv4 then IPv6; if anything fails, what was
//!   written is removed again.
//! - [`cleanup`] removes every `ISTIO_*` chain of the nat, mangle and raw
//!   tables and every jump into one, and nothing else, in one
//!   `iptables-restore` per family.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{self, Write as _},
    process::{Command, ExitStatus, Stdio},
};

use tracing::{debug, info};

use super::{
    backend::{Backend, FAMILIES, Family},
    istio::{self, Config, RestoreInput, Rule, is_builtin},
};

/// The tables whose `ISTIO_*` chains are ours.
const TABLES: [&str; 3] = ["nat", "mangle", "raw"];

/// What [`install`] did in one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The rules were written (there were none of ours).
    Applied,
    /// Different rules of ours were replaced (`reconcile`).
    Reconciled,
    /// The same rules were already there; nothing was written.
    Unchanged,
    /// Nothing to install in this family (IPv6 off) and nothing of ours there.
    NotRequested,
}

/// The result of [`install`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub backend: Backend,
    pub ipv4: Change,
    pub ipv6: Change,
    /// What was (or would have been) fed to `iptables-restore`.
    pub input: RestoreInput,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("running {program}: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("no usable iptables backend ({0})")]
    NoBackend(String),
    #[error(
        "different istio-iptables rules are already installed ({family}: {detail}); \
         pass --reconcile to replace them, or --cleanup-only to remove them"
    )]
    Conflict { family: Family, detail: String },
    #[error("{error}; removing the partial install failed too: {undo}")]
    Undo {
        error: Box<ApplyError>,
        undo: Box<ApplyError>,
    },
}

/// Runs `program args` (built by `runner`), feeding it `stdin`; its stdout,
/// or an error naming it and carrying its stderr.
fn run(
    runner: &dyn Fn(&str) -> Command,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, ApplyError> {
    let spawn_err = |source| ApplyError::Spawn {
        program: program.to_owned(),
        source,
    };
    let mut child = runner(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A restore that fails early closes its stdin: its exit status says why.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(ApplyError::Failed {
            program: std::iter::once(program)
                .chain(args.iter().copied())
                .collect::<Vec<_>>()
                .join(" "),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Picks the backend as istio does (`DetectIptablesVersion`): legacy if
/// `iptables-legacy-save` shows tables already (3 lines or more), else
/// nft if `iptables-nft-save` runs, else the plain binaries if
/// `iptables-save` runs. Read-only (istio also adds and deletes a probe
/// rule in the filter table; we do not write anything to choose).
pub fn detect_backend(runner: &dyn Fn(&str) -> Command) -> Result<Backend, ApplyError> {
    let mut failures = Vec::new();
    match run(runner, &Backend::Legacy.save(Family::Ipv4), &[], None) {
        Ok(out) if out.matches('\n').count() >= 3 => return Ok(Backend::Legacy),
        Ok(_) => {}
        Err(e) => failures.push(e.to_string()),
    }
    for backend in [Backend::Nft, Backend::Plain] {
        match run(runner, &backend.save(Family::Ipv4), &[], None) {
            Ok(_) => return Ok(backend),
            Err(e) => failures.push(e.to_string()),
        }
    }
    Err(ApplyError::NoBackend(failures.join("; ")))
}

/// `iptables-save` (all tables) of one family.
pub fn save(
    runner: &dyn Fn(&str) -> Command,
    backend: Backend,
    family: Family,
) -> Result<String, ApplyError> {
    run(runner, &backend.save(family), &[], None)
}

/// Feeds `input` to `iptables-restore --noflush` (IPv4, then IPv6 if
/// present), without looking at what is installed (`--force-apply`).
pub fn restore(
    runner: &dyn Fn(&str) -> Command,
    backend: Backend,
    input: &RestoreInput,
) -> Result<(), ApplyError> {
    restore_family(runner, backend, Family::Ipv4, &input.ipv4)?;
    if let Some(v6) = &input.ipv6 {
        restore_family(runner, backend, Family::Ipv6, v6)?;
    }
    Ok(())
}

fn restore_family(
    runner: &dyn Fn(&str) -> Command,
    backend: Backend,
    family: Family,
    input: &str,
) -> Result<(), ApplyError> {
    let mut args = vec!["--noflush"];
    args.extend(backend.wait());
    debug!(%family, %backend, input, "iptables-restore");
    run(runner, &backend.restore(family), &args, Some(input)).map(drop)
}

/// Whether a target is one of our chains.
fn is_istio(target: &str) -> bool {
    target.starts_with("ISTIO_")
}

/// The target of a saved rule's `-j`/`-g`, unquoted.
fn saved_target(line: &str) -> Option<&str> {
    let mut tokens = line.split_whitespace();
    while let Some(t) = tokens.next() {
        if matches!(t, "-j" | "--jump" | "-g" | "--goto") {
            return tokens
                .next()
                .map(|t| t.trim_matches(|c| c == '"' || c == '\''));
        }
    }
    None
}

/// Our part of one table as `iptables-save` shows it.
#[derive(Debug, Default)]
struct SavedTable {
    /// `ISTIO_*` chains and how many rules each holds.
    chains: BTreeMap<String, usize>,
    /// Rules of other chains jumping into an `ISTIO_*` chain: (chain, line).
    jumps: Vec<(String, String)>,
}

fn parse_save(text: &str) -> BTreeMap<String, SavedTable> {
    let mut tables: BTreeMap<String, SavedTable> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines().map(str::trim_end) {
        if let Some(name) = line.strip_prefix('*') {
            let name = name.trim().to_owned();
            tables.entry(name.clone()).or_default();
            current = Some(name);
            continue;
        }
        let Some(table) = current.as_ref().and_then(|t| tables.get_mut(t)) else {
            continue;
        };
        if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or_default();
            if is_istio(chain) {
                table.chains.entry(chain.to_owned()).or_default();
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            if is_istio(chain) {
                *table.chains.entry(chain.to_owned()).or_default() += 1;
            } else if saved_target(line).is_some_and(is_istio) {
                table.jumps.push((chain.to_owned(), line.to_owned()));
            }
        }
    }
    tables.retain(|name, _| TABLES.contains(&name.as_str()));
    tables
}

fn has_residue(saved: &BTreeMap<String, SavedTable>) -> bool {
    saved
        .values()
        .any(|t| !t.chains.is_empty() || !t.jumps.is_empty())
}

/// `iptables -t TABLE -C CHAIN SPEC`: whether the rule is there.
fn rule_present(
    runner: &dyn Fn(&str) -> Command,
    backend: Backend,
    family: Family,
    rule: &Rule,
) -> bool {
    let mut args = vec!["-t", rule.table, "-C", rule.chain.as_str()];
    args.extend(rule.spec().iter().map(String::as_str));
    args.extend(backend.wait());
    run(runner, &backend.iptables(family), &args, None).is_ok()
}

/// How one family's tables compare with what we would install.
#[derive(Debug)]
enum State {
    /// Nothing of ours.
    Clean,
    /// Exactly our rules.
    Same,
    /// Something of ours, but not these rules.
    Different(String),
}

fn compare(
    runner: &dyn Fn(&str) -> Command,
    backend: Backend,
    family: Family,
    saved: &BTreeMap<String, SavedTable>,
    rules: &[Rule],
) -> State {
    if !has_residue(saved) {
        return State::Clean;
    }
    let mut want_chains: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut want_jumps: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for r in rules {
        if !is_builtin(&r.chain) {
            *want_chains.entry((r.table, r.chain.as_str())).or_default() += 1;
        } else if r.jump_target().is_some_and(is_istio) {
            *want_jumps.entry((r.table, r.chain.as_str())).or_default() += 1;
        }
        if let Some(target) = r.jump_target().filter(|t| is_istio(t)) {
            want_chains.entry((r.table, target)).or_default();
        }
    }
    let mut have_chains: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut have_jumps: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (table, t) in saved {
        for (chain, n) in &t.chains {
            have_chains.insert((table.as_str(), chain.as_str()), *n);
        }
        for (chain, _) in &t.jumps {
            *have_jumps
                .entry((table.as_str(), chain.as_str()))
                .or_default() += 1;
        }
    }
    for ((table, chain), n) in &have_chains {
        match want_chains.get(&(*table, *chain)) {
            None => {
                return State::Different(format!(
                    "chain {chain} in table {table} is not ours to install"
                ));
            }
            Some(want) if want != n => {
                return State::Different(format!(
                    "chain {chain} in table {table} holds {n} rules, {want} expected"
                ));
            }
            Some(_) => {}
        }
    }
    if let Some((table, chain)) = want_chains.keys().find(|k| !have_chains.contains_key(*k)) {
        return State::Different(format!("chain {chain} is missing from table {table}"));
    }
    if have_jumps != want_jumps {
        return State::Different(format!(
            "jumps into ISTIO_* chains differ: found {have_jumps:?}, expected {want_jumps:?}"
        ));
    }
    if let Some(r) = rules
        .iter()
        .find(|r| !rule_present(runner, backend, family, r))
    {
        return State::Different(format!(
            "rule `{}` is missing from table {}",
            r.params.join(" "),
            r.table
        ));
    }
    State::Same
}

/// Installs the rules of `cfg` (see the module docs): nothing if they are
/// there already, an [`ApplyError::Conflict`] if different ones are and
/// not `reconcile`.
pub fn install(
    runner: &dyn Fn(&str) -> Command,
    cfg: &Config,
    backend: Backend,
    reconcile: bool,
) -> Result<Installed, ApplyError> {
    let rules = istio::rules(cfg);
    let input = istio::restore_input(cfg);
    let mut plan = Vec::new();
    for family in FAMILIES {
        let (family_rules, family_input) = match family {
            Family::Ipv4 => (rules.v4.as_slice(), Some(input.ipv4.as_str())),
            Family::Ipv6 => (rules.v6.as_slice(), input.ipv6.as_deref()),
        };
        let saved = match save(runner, backend, family) {
            Ok(text) => parse_save(&text),
            // No ip6tables here, and no IPv6 rules wanted: nothing to compare.
            Err(e) if family_input.is_none() => {
                debug!(%family, error = %e, "cannot read the tables; skipping");
                plan.push((family, family_rules, family_input, State::Clean));
                continue;
            }
            Err(e) => return Err(e),
        };
        let state = compare(runner, backend, family, &saved, family_rules);
        debug!(%family, ?state, "installed rules compared");
        if let State::Different(detail) = &state
            && !reconcile
        {
            return Err(ApplyError::Conflict {
                family,
                detail: detail.clone(),
            });
        }
        plan.push((family, family_rules, family_input, state));
    }

    let mut changes = Vec::new();
    let mut touched: Vec<Family> = Vec::new();
    for (family, family_rules, family_input, state) in plan {
        // Only families we write to are undone on failure.
        if matches!(
            (&state, family_input),
            (State::Clean, Some(_)) | (State::Different(_), _)
        ) {
            touched.push(family);
        }
        let step = || -> Result<Change, ApplyError> {
            Ok(match (state, family_input) {
                (State::Same, _) => Change::Unchanged,
                (State::Clean, None) => Change::NotRequested,
                (State::Clean, Some(text)) => {
                    restore_family(runner, backend, family, text)?;
                    Change::Applied
                }
                (State::Different(detail), text) => {
                    info!(%family, detail, "replacing different istio-iptables rules (reconcile)");
                    uninstall_family(runner, backend, family, family_rules)?;
                    if let Some(text) = text {
                        restore_family(runner, backend, family, text)?;
                    }
                    Change::Reconciled
                }
            })
        };
        match step() {
            Ok(change) => changes.push(change),
            Err(error) => {
                // iptables-restore is atomic per table (legacy) or per call
                // (nft): remove whatever of ours went in, in every family touched.
                for f in &touched {
                    let r = match f {
                        Family::Ipv4 => rules.v4.as_slice(),
                        Family::Ipv6 => rules.v6.as_slice(),
                    };
                    if let Err(undo) = uninstall_family(runner, backend, *f, r) {
                        return Err(ApplyError::Undo {
                            error: Box::new(error),
                            undo: Box::new(undo),
                        });
                    }
                }
                return Err(error);
            }
        }
    }
    Ok(Installed {
        backend,
        ipv4: changes.first().copied().unwrap_or(Change::NotRequested),
        ipv6: changes.get(1).copied().unwrap_or(Change::NotRequested),
        input,
    })
}

/// Removes every `ISTIO_*` chain of the nat, mangle and raw tables and
/// every jump into one, in both families, and nothing else. A family whose
/// tools cannot run (no ip6tables) is skipped.
pub fn cleanup(runner: &dyn Fn(&str) -> Command, backend: Backend) -> Result<(), ApplyError> {
    for family in FAMILIES {
        match uninstall_family(runner, backend, family, &[]) {
            Err(e @ (ApplyError::Failed { .. } | ApplyError::Spawn { .. }))
                if family == Family::Ipv6 =>
            {
                debug!(error = %e, "no IPv6 tables to clean");
            }
            other => other?,
        }
    }
    Ok(())
}

/// [`cleanup`], plus the rules `cfg` puts in built-in chains that are not
/// jumps into our chains (TPROXY marks, excluded interfaces' `RETURN`s)
/// where present: what `--cleanup-only` removes.
pub fn uninstall(
    runner: &dyn Fn(&str) -> Command,
    cfg: &Config,
    backend: Backend,
) -> Result<(), ApplyError> {
    // Built-in-chain rules of both families, whether IPv6 is on or not.
    let rules = istio::rules(&Config {
        enable_ipv6: true,
        ..cfg.clone()
    });
    for (family, r) in [(Family::Ipv4, &rules.v4), (Family::Ipv6, &rules.v6)] {
        match uninstall_family(runner, backend, family, r) {
            Err(e @ (ApplyError::Failed { .. } | ApplyError::Spawn { .. }))
                if family == Family::Ipv6 && !cfg.enable_ipv6 =>
            {
                debug!(error = %e, "no IPv6 tables to clean");
            }
            other => other?,
        }
    }
    Ok(())
}

/// Removes our chains and the jumps into them from one family, plus those
/// of `rules` that live in built-in chains and are present.
fn uninstall_family(
    runner: &dyn Fn(&str) -> Command,
    backend: Backend,
    family: Family,
    rules: &[Rule],
) -> Result<(), ApplyError> {
    let saved = parse_save(&save(runner, backend, family)?);
    let mut input = String::new();
    for (table, t) in &saved {
        let mut lines: Vec<String> = t
            .jumps
            .iter()
            .map(|(_, line)| format!("-D{}", &line[2..]))
            .collect();
        for r in rules.iter().filter(|r| {
            r.table == table.as_str()
                && is_builtin(&r.chain)
                && !r.jump_target().is_some_and(is_istio)
        }) {
            if rule_present(runner, backend, family, r) {
                lines.push(format!("-D {} {}", r.chain, r.spec().join(" ")));
            }
        }
        // Flush them all first: our chains jump to each other.
        lines.extend(t.chains.keys().map(|c| format!("-F {c}")));
        lines.extend(t.chains.keys().map(|c| format!("-X {c}")));
        if lines.is_empty() {
            continue;
        }
        let _ = writeln!(input, "*{table}");
        for line in lines {
            input.push_str(&line);
            input.push('\n');
        }
        input.push_str("COMMIT\n");
    }
    if input.is_empty() {
        return Ok(());
    }
    restore_family(runner, backend, family, &input)
}

/// istio's `ConfigureRoutes`: `::6/128` on lo when IPv6 is on, and in TPROXY
/// mode the policy route that delivers marked packets locally
/// (`ip rule add fwmark MARK lookup TABLE`, `ip route add local default dev
/// lo table TABLE`) per family. Idempotent: what exists is left alone.
pub fn configure_routes(runner: &dyn Fn(&str) -> Command, cfg: &Config) -> Result<(), ApplyError> {
    let exists = |e: &ApplyError| {
        matches!(e, ApplyError::Failed { stderr, .. }
            if stderr.contains("File exists") || stderr.contains("already assigned"))
    };
    let ignore_exists = |r: Result<String, ApplyError>| match r {
        Err(e) if exists(&e) => Ok(()),
        other => other.map(drop),
    };
    if cfg.enable_ipv6 {
        ignore_exists(run(
            runner,
            "ip",
            &["-6", "addr", "add", "::6/128", "dev", "lo"],
            None,
        ))?;
    }
    if !cfg.needs_tproxy_routes() {
        return Ok(());
    }
    let mark = cfg.inbound_tproxy_mark.to_string();
    let table = cfg.inbound_tproxy_route_table.to_string();
    let families: &[&str] = if cfg.enable_ipv6 {
        &["-4", "-6"]
    } else {
        &["-4"]
    };
    for fam in families {
        // `ip rule add` happily adds duplicates: look first.
        let rules = run(runner, "ip", &[fam, "rule", "show"], None)?;
        let wanted = format!("fwmark {:#x} lookup {table}", cfg.inbound_tproxy_mark);
        if !rules.lines().any(|l| l.trim_end().ends_with(&wanted)) {
            run(
                runner,
                "ip",
                &[fam, "rule", "add", "fwmark", &mark, "lookup", &table],
                None,
            )?;
        }
        ignore_exists(run(
            runner,
            "ip",
            &[
                fam, "route", "add", "local", "default", "dev", "lo", "table", &table,
            ],
            None,
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries() {
        assert_eq!(
            Backend::Legacy.restore(Family::Ipv6),
            "ip6tables-legacy-restore"
        );
        assert_eq!(Backend::Nft.save(Family::Ipv4), "iptables-nft-save");
        assert_eq!(Backend::Plain.iptables(Family::Ipv4), "iptables");
    }

    #[test]
    fn saved_state() {
        let text = "# Generated by iptables-save v1.8.9\n*nat\n:PREROUTING ACCEPT [0:0]\n\
            :OUTPUT ACCEPT [3:180]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n:KUBE-X - [0:0]\n\
            -A PREROUTING -i eth9 -j RETURN\n-A OUTPUT -j ISTIO_OUTPUT\n-A KUBE-X -j ISTIO_REDIRECT\n\
            -A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT\n-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n\
            COMMIT\n*filter\n:INPUT ACCEPT [0:0]\n:ISTIO_FILTER - [0:0]\nCOMMIT\n";
        let saved = parse_save(text);
        assert_eq!(saved.len(), 1, "only nat, mangle and raw are ours");
        let nat = &saved["nat"];
        assert_eq!(
            nat.chains
                .iter()
                .map(|(c, n)| (c.as_str(), *n))
                .collect::<Vec<_>>(),
            [("ISTIO_OUTPUT", 1), ("ISTIO_REDIRECT", 1)]
        );
        assert_eq!(
            nat.jumps
                .iter()
                .map(|(c, _)| c.as_str())
                .collect::<Vec<_>>(),
            ["OUTPUT", "KUBE-X"]
        );
        assert!(has_residue(&saved));
        assert!(!has_residue(&parse_save(
            "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j RETURN\nCOMMIT\n"
        )));
    }
}
