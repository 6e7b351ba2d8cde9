//! Project automation: `cargo xtask <command>`.

mod bench;
mod build;
mod cmd;
mod conformance;
mod demo;
mod fresh;
mod host;
mod image;
mod layering;
mod manifests;
mod setup;
mod test;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test, demo and benchmark the mesh-redirect agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the eBPF build, tests, demo, bench and vm-test need
    /// (idempotent; every other command installs its own part implicitly).
    Setup,
    /// Build the eBPF object and the agent (release).
    Build,
    /// fmt, clippy, unit tests, then the kernel integration tests as root.
    Test {
        /// Only kernel tests whose name contains this.
        filter: Option<String>,
        /// Skip fmt, clippy and unit tests (while iterating on kernel tests).
        #[arg(long)]
        kernel_only: bool,
    },
    /// The conformance suite alone: real clients and servers through the
    /// agent in eBPF and iptables mode, as root; then a table (rows client,
    /// scenario, direction; columns proxy, mode).
    Conformance {
        /// Only cells whose test name contains this.
        filter: Option<String>,
    },
    /// The main job: two throwaway network namespaces, an HTTP server in
    /// one, the agent serving the other, curl through it, a table.
    Demo,
    /// Benchmark every redirect mode (and HAProxy) against each other,
    /// interleaved, on fixed CPUs; a Markdown report and an SVG chart
    /// under target/bench/.
    Bench(bench::Options),
    /// The kernel integration tests inside qemu guests booted with Debian's
    /// kernels (default: 6.1 and 6.12).
    VmTest(vm::Options),
    /// Prove the README's set-up and main job from nothing: a clean Debian
    /// root (debootstrap), a clean clone, the README's command inside.
    FreshMachine(fresh::Options),
    /// Lint the Kubernetes manifests under deploy/ and validate them
    /// against a current Kubernetes release's schemas (also part of `test`).
    Manifests,
    /// The agent's OCI image, built offline (Debian packages from the
    /// registry, no image pull) into target/image/, for `podman load`.
    Image,
    /// Build, then run the agent with these arguments (e.g. `doctor`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // The chain, without anyhow's backtrace (RUST_BACKTRACE is often set).
            eprintln!("xtask: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Setup => {
            use setup::Need;
            setup::ensure(&[
                Need::Tests,
                Need::Clients,
                Need::Demo,
                Need::Bench,
                Need::Vm,
                Need::FreshMachine,
                Need::Manifests,
                Need::Image,
                Need::Dist,
            ])?;
            eprintln!("setup: everything is in place");
        }
        Command::Build => {
            let tc = setup::ensure(&[])?;
            build::build(&tc, true)?;
        }
        Command::Test {
            filter,
            kernel_only,
        } => test::run(filter.as_deref(), kernel_only)?,
        Command::Conformance { filter } => conformance::run(filter.as_deref())?,
        Command::Demo => demo::run()?,
        Command::Bench(opts) => bench::run(&opts)?,
        Command::VmTest(opts) => vm::run(&opts)?,
        Command::FreshMachine(opts) => fresh::run(&opts)?,
        Command::Manifests => manifests::run()?,
        Command::Image => {
            image::run()?;
        }
        Command::Run { args } => {
            let tc = setup::ensure(&[])?;
            let bin = build::build(&tc, true)?;
            let status = std::process::Command::new(bin).args(args).status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
    }
    Ok(())
}
