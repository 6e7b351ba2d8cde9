//! The `mesh-redirect` command line.

use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use agent::config;
use agent::doctor;
use clap::{CommandFactory as _, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mesh-redirect",
    version,
    about = "eBPF sockmap redirect agent for service-mesh sidecars"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Probe this kernel and host: which hooks, maps, helpers, mounts,
    /// iptables backends and capabilities are there, and which redirect
    /// modes are usable.
    Doctor {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also check that this is a cgroup2 directory the agent could serve.
        #[arg(long, value_name = "PATH")]
        cgroup: Option<PathBuf>,
    },
    /// Capture a network namespace's TCP (outbound, and inbound unless
    /// `--no-inbound`) for a cgroup's processes and run the proxy that
    /// receives it, or serve an external one. On SIGTERM/SIGINT it drains,
    /// then detaches and unpins everything it attached.
    #[command(args_override_self = true)]
    Run(Box<agent::run::RunArgs>),
    /// What is attached to a cgroup and what the datapath's maps hold, read
    /// from the kernel.
    Status {
        /// cgroup2 directory (default: the cgroup2 root).
        #[arg(long, value_name = "PATH")]
        cgroup: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The bpffs mount pins are under.
        #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        /// Where running agents' control sockets are.
        #[arg(long, value_name = "PATH", default_value = "/run/mesh-redirect")]
        control_dir: PathBuf,
    },
    /// A drop-in for istio-iptables: the same flags, defaults and
    /// environment variables, the same iptables-restore input.
    Iptables(Box<agent::iptables::istio::IstioIptablesArgs>),
    /// Remove what a crashed agent left: pinned datapaths (their links
    /// detach) whose agent no longer answers, and our iptables rules; never
    /// anything that is not ours.
    Cleanup {
        /// The bpffs mount the pins are under.
        #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        /// Where running agents' control sockets are.
        #[arg(long, value_name = "PATH", default_value = "/run/mesh-redirect")]
        control_dir: PathBuf,
        /// Network namespaces to clean iptables rules from (repeatable;
        /// default: this one).
        #[arg(long, value_name = "PATH")]
        netns: Vec<PathBuf>,
        /// Also remove pins of agents that still answer.
        #[arg(long)]
        force: bool,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Show or change the capture rules of a running eBPF datapath, at once
    /// and without a restart: each list given replaces the current one.
    Rules {
        /// cgroup2 directory the datapath serves (default: the cgroup2 root).
        #[arg(long, value_name = "PATH")]
        cgroup: Option<PathBuf>,
        #[command(flatten)]
        rules: agent::rules::RuleArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    init_tracing();
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Doctor { json, cgroup } => run_doctor(json, cgroup),
        Command::Rules {
            cgroup,
            rules,
            json,
        } => report(
            agent::control::update_rules(cgroup.as_deref(), &rules).map(|r| print_rules(&r, json)),
        ),
        Command::Run(args) => report(agent::run::run(&args)),
        Command::Iptables(args) => report(agent::iptables::istio::main(&args)),
        Command::Cleanup {
            bpffs,
            control_dir,
            netns,
            force,
            json,
        } => report(
            agent::cleanup::run(&bpffs, &control_dir, &netns, force).map(|r| {
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&r).expect("report serializes")
                    );
                    return;
                }
                for p in &r.removed {
                    println!("removed pins {}", p.display());
                }
                for p in &r.live {
                    println!(
                        "left pins {} (its agent is running; stop it, or --force)",
                        p.display()
                    );
                }
                for p in &r.iptables_removed {
                    println!("removed our iptables rules in {}", p.display());
                }
                for p in &r.iptables_not_ours {
                    println!(
                        "left ISTIO chains in {} (not installed by mesh-redirect)",
                        p.display()
                    );
                }
                if r.removed.is_empty() && r.iptables_removed.is_empty() {
                    println!("nothing of ours to remove");
                }
            }),
        ),
        Command::Status {
            cgroup,
            json,
            bpffs,
            control_dir,
        } => report(
            agent::status::collect(cgroup.as_deref(), &bpffs, &control_dir).map(|s| {
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&s).expect("status serializes")
                    );
                } else {
                    print!("{}", s.render());
                }
            }),
        ),
    }
}

/// The command line, with `run --config FILE` expanded into the flags the
/// file sets (before the command line's own, which override them).
fn parse_args() -> Result<Cli, config::ConfigError> {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "run") {
        let cli = Cli::command();
        let flags: Vec<config::Flag> = cli
            .find_subcommand("run")
            .expect("run is a subcommand")
            .get_arguments()
            .filter_map(|a| {
                a.get_long().map(|long| config::Flag {
                    long: long.to_owned(),
                    takes_value: a.get_action().takes_values(),
                })
            })
            .collect();
        let rest = args.split_off(2);
        let expanded = config::expand(rest, &flags)?;
        if let Some(path) = &expanded.file {
            // The file's values on their own first, so that a bad one is
            // reported as the file's.
            let alone = args
                .iter()
                .cloned()
                .chain(expanded.from_file.iter().cloned());
            if let Err(e) = Cli::try_parse_from(alone) {
                return Err(config::ConfigError::Rejected {
                    path: path.clone(),
                    message: e
                        .render()
                        .to_string()
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .trim_start_matches("error: ")
                        .to_owned(),
                });
            }
        }
        args.extend(expanded.words());
    }
    Ok(Cli::parse_from(args))
}

/// `rules`' answer: the lists now in force.
fn print_rules(r: &agent::rules::CaptureRules, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).expect("rules serialize")
        );
    } else {
        println!("outbound include (-i): {}", r.outbound_include_cidrs);
        println!(
            "outbound exclude (-x): {}",
            agent::rules::Selection::Some(r.outbound_exclude_cidrs.clone())
        );
        println!(
            "outbound ports include (-q): {}",
            agent::rules::Selection::Some(r.outbound_include_ports.clone())
        );
        println!(
            "outbound ports exclude (-o): {}",
            agent::rules::Selection::Some(r.outbound_exclude_ports.clone())
        );
        println!("inbound ports include (-b): {}", r.inbound_include_ports);
        println!(
            "inbound ports exclude (-d): {}",
            agent::rules::Selection::Some(r.inbound_exclude_ports.clone())
        );
    }
}

/// Prints an error with its causes and turns it into an exit code.
fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run_doctor(json: bool, cgroup: Option<PathBuf>) -> ExitCode {
    // A bad --cgroup is the user's input at fault: say so first and stop.
    if let Some(path) = &cgroup
        && let Err(err) = agent::cgroup::validate(path)
    {
        eprintln!("error: --cgroup: {err}");
        return ExitCode::from(2);
    }
    let report = doctor::run(&doctor::Options { cgroup });
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else {
        print!("{}", report.render());
    }
    if report.any_usable() {
        ExitCode::SUCCESS
    } else {
        let missing: Vec<String> = report
            .modes
            .iter()
            .map(|m| format!("{}: {}", m.mode.name(), m.missing.join(", ")))
            .collect();
        eprintln!("error: no redirect mode is usable ({})", missing.join("; "));
        ExitCode::FAILURE
    }
}
