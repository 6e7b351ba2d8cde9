//! The `mesh-redirect` command line: parses, then hands each command to its
//! module.

use std::{path::PathBuf, process::ExitCode};

use agent::{
    cleanup, doctor, handoff::DEFAULT_CONTROL_DIR, mounts::DEFAULT_BPFFS, run::RunArgs, status,
};
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use serde::Serialize;

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
    Run(Box<RunArgs>),
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
        #[arg(long, value_name = "PATH", default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Where running agents' control sockets are.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_DIR)]
        control_dir: PathBuf,
    },
    /// Node mode: one agent serving every pod enrolled with it (`enroll`,
    /// or the CNI plugin), each with its own proxy inside its namespace.
    Node(Box<agent::node::NodeArgs>),
    /// The CNI plugin (also run as `mesh-redirect-cni`): `CNI_COMMAND` and
    /// friends in the environment, the network configuration on stdin.
    Cni,
    /// Put the CNI plugin in place on this node (copied into the CNI bin
    /// directory, chained last in the network configuration), or take it
    /// away (`--uninstall`), as istio-cni's install-cni.
    InstallCni(agent::node::install::InstallArgs),
    /// Ask the node agent to serve a pod (idempotent).
    Enroll {
        #[command(flatten)]
        pod: Box<agent::node::api::EnrollArgs>,
        #[arg(long, value_name = "PATH", default_value = agent::node::api::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Print JSON instead of a line.
        #[arg(long)]
        json: bool,
    },
    /// Ask the node agent to stop serving a pod; an unknown one is not an
    /// error.
    Unenroll {
        #[arg(long, value_name = "PATH", required_unless_present = "container_id")]
        netns: Option<PathBuf>,
        #[arg(long, value_name = "ID")]
        container_id: Option<String>,
        #[arg(long, value_name = "PATH", default_value = agent::node::api::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Print JSON instead of a line.
        #[arg(long)]
        json: bool,
    },
    /// The pods the node agent serves, with their counters.
    Pods {
        #[arg(long, value_name = "PATH", default_value = agent::node::api::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A drop-in for istio-iptables: the same flags, defaults and
    /// environment variables, the same iptables-restore input. Also called
    /// `istio-iptables`, as istio's injector calls its init container's
    /// command.
    #[command(visible_alias = "istio-iptables")]
    Iptables(Box<agent::iptables::istio::IstioIptablesArgs>),
    /// Remove what a crashed agent left: pinned datapaths (their links
    /// detach) whose agent no longer answers, and our iptables rules; never
    /// anything that is not ours.
    Cleanup {
        /// The bpffs mount the pins are under.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Where running agents' control sockets are.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_DIR)]
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
    /// Show or change the capture rules of a running capture, at once and
    /// without a restart: each list given replaces the current one.
    Rules {
        /// Ask the agent serving this network namespace (either mode).
        #[arg(long, value_name = "PATH", conflicts_with = "cgroup")]
        netns: Option<PathBuf>,
        /// Change the eBPF datapath attached to this cgroup2 directory
        /// through its maps (default: the cgroup2 root); works while its
        /// agent is down.
        #[arg(long, value_name = "PATH")]
        cgroup: Option<PathBuf>,
        /// Where running agents' control sockets are.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_DIR)]
        control_dir: PathBuf,
        #[command(flatten)]
        rules: agent::rules::RuleArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // Run by a container runtime as a CNI plugin: no arguments, the
    // protocol in the environment and on stdin.
    let argv0 = std::env::args_os().next().map(PathBuf::from);
    if argv0
        .as_deref()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "mesh-redirect-cni")
    {
        return cni();
    }
    init_tracing();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Doctor { json, cgroup } => run_doctor(json, cgroup),
        Command::Run(args) => {
            let run = matches
                .subcommand_matches("run")
                .expect("the run subcommand");
            match RunArgs::resolve(*args, run) {
                Ok(args) => report(agent::run::run(&args)),
                Err(err) => {
                    eprintln!("error: {err}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Rules {
            netns,
            cgroup,
            control_dir,
            rules,
            json,
        } => report(
            agent::update_rules::run(netns.as_deref(), cgroup.as_deref(), &control_dir, &rules)
                .map(|r| print(&r, json, agent::rules::CaptureRules::render)),
        ),
        Command::Iptables(args) => report(agent::iptables::cli::main(&args)),
        Command::Node(args) => report(agent::node::run(&args)),
        Command::InstallCni(args) => report(
            agent::node::install::run(&args)
                .map(|_| ())
                .map_err(Into::into),
        ),
        Command::Cni => cni(),
        Command::Enroll { pod, socket, json } => ask_node(
            &socket,
            &agent::node::api::Request::Enroll(Box::new(pod.enrollment())),
            json,
        ),
        Command::Unenroll {
            netns,
            container_id,
            socket,
            json,
        } => ask_node(
            &socket,
            &agent::node::api::Request::Unenroll(agent::node::api::PodRef {
                netns,
                container_id,
            }),
            json,
        ),
        Command::Pods { socket, json } => ask_node(&socket, &agent::node::api::Request::Pods, json),
        Command::Cleanup {
            bpffs,
            control_dir,
            netns,
            force,
            json,
        } => report(
            cleanup::run(&bpffs, &control_dir, &netns, force)
                .map(|r| print(&r, json, cleanup::Report::render)),
        ),
        Command::Status {
            cgroup,
            json,
            bpffs,
            control_dir,
        } => report(
            status::collect(cgroup.as_deref(), &bpffs, &control_dir)
                .map(|s| print(&s, json, status::Status::render)),
        ),
    }
}

/// One CNI command: its result (or error result) on stdout.
fn cni() -> ExitCode {
    let env = agent::node::cni::Env::from_process();
    let (out, failed) = agent::node::cni::main(&env, &mut std::io::stdin());
    println!("{out}");
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Sends one request to the node agent and prints its answer.
fn ask_node(socket: &std::path::Path, request: &agent::node::api::Request, json: bool) -> ExitCode {
    report(
        agent::node::api::ask(socket, request)
            .map(|a| print(&a, json, agent::node::api::Answer::render))
            .map_err(anyhow::Error::from),
    )
}

/// Prints `value` as JSON, or as its table.
fn print<T: Serialize>(value: &T, json: bool, render: fn(&T) -> String) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("reports serialize")
        );
    } else {
        print!("{}", render(value));
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
    let report = doctor::run(&doctor::Options { cgroup, dns: false });
    print(&report, json, doctor::Report::render);
    if report.any_usable() {
        ExitCode::SUCCESS
    } else {
        eprintln!("error: {}", report.why_unusable());
        ExitCode::FAILURE
    }
}
