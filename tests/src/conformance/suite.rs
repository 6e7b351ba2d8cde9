//! The order of the suite's work. Each libtest test is one cell, both
//! modes; but a scenario's cells run together: the first test of a
//! (proxy, direction, scenario) to run runs that scenario for every client
//! whose test this process will run (libtest's own `--list`, with this
//! process's filters, says which), in both modes at once, and keeps the
//! results for the tests that follow. A test run alone (as the qemu guests
//! run each) runs only its own cell.
//!
//! The pods (one per mode and proxy) are made on first use and dropped
//! as soon as no test still to come needs them.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    panic::{self, AssertUnwindSafe},
    path::PathBuf,
    process::Command,
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use super::{
    Cell, Client, Direction, Observation, Proxy, Scenario,
    content::Content,
    fixture::{Batch, Fixture},
    judge,
};
use crate::RedirectMode;

/// A test function of the table in `tests/tests/conformance.rs`: its name
/// (rstest's module for its cases), its proxy and client, the scenarios
/// it runs (each in both directions). The other scenarios are `n/a`.
#[derive(Debug, Clone, Copy)]
pub struct TestFn {
    pub name: &'static str,
    pub proxy: Proxy,
    pub client: Client,
    pub scenarios: &'static [Scenario],
}

/// A known reproduction: a cell the table names, with what it reproduces.
#[derive(Debug, Clone, Copy)]
pub struct Known {
    pub tag: &'static str,
    pub cell: Cell,
    pub what: &'static str,
}

const MODES: [RedirectMode; 2] = [RedirectMode::Ebpf, RedirectMode::Iptables];

type BatchKey = (Proxy, Direction, Scenario);

fn batch_of(cell: Cell) -> BatchKey {
    (cell.proxy, cell.direction, cell.scenario)
}

/// A cell's outcome in one mode, and the observation it was judged on.
#[derive(Debug, Clone)]
struct Outcome {
    result: Result<(), String>,
    observation: Observation,
    server_errors: Vec<String>,
}

struct Suite {
    /// The cells whose tests this process runs.
    plan: BTreeSet<Cell>,
    content: Arc<Content>,
    results: HashMap<(Cell, RedirectMode), Outcome>,
    done: HashSet<BatchKey>,
    fixtures: HashMap<(Proxy, RedirectMode), Fixture>,
    home: PathBuf,
}

static SUITE: Mutex<Option<Suite>> = Mutex::new(None);

/// Why `cell` cannot run here, if it cannot (its test skips, saying so).
#[must_use]
pub fn unavailable(cell: Cell) -> Option<String> {
    if cell.proxy == Proxy::Haproxy
        && let Err(why) = super::runners::on_path("haproxy")
    {
        return Some(why);
    }
    cell.client.unavailable()
}

/// The programs a `cargo xtask vm-test` guest goes without by design
/// (comma-separated), set by xtask: their cells are `n/a` there.
pub const GUEST_LACKS_ENV: &str = "MESH_REDIRECT_GUEST_LACKS";

/// Why `cell` cannot run in this VM guest by design, if so: a program it
/// needs is one the guest goes without.
#[must_use]
pub fn lacking_by_design(cell: Cell) -> Option<String> {
    let lacks = std::env::var(GUEST_LACKS_ENV).ok()?;
    let haproxy = (cell.proxy == Proxy::Haproxy).then_some("haproxy");
    [cell.client.program(), haproxy]
        .into_iter()
        .flatten()
        .find(|p| lacks.split(',').any(|l| l.trim() == *p))
        .map(|p| format!("the VM guest has no {p}"))
}

/// Prints `cell`'s line for both modes with the same `result` (a cell
/// that could not run).
pub fn report(cell: Cell, result: &str) {
    for mode in MODES {
        println!("{}", cell.line(mode, result));
    }
}

/// Runs `cell` in both modes (with the rest of its scenario, see the
/// module's docs), prints its lines (and the `n/a` lines of its row, if it
/// is the row's first test), and fails if either mode differs from the
/// expectation.
///
/// # Panics
/// With the differences, when there are any.
pub fn check(cell: Cell, tests: &'static [TestFn], known: &'static [Known]) {
    let mut guard = SUITE.lock().unwrap_or_else(PoisonError::into_inner);
    let suite = guard.get_or_insert_with(|| Suite::new(tests, cell));
    if let Some(name) = std::thread::current().name()
        && name.contains("::")
    {
        assert_eq!(
            parse_name(name, tests),
            Some(cell),
            "test {name} does not name its cell: the table and the test names disagree"
        );
    }
    suite.plan.insert(cell);
    let key = batch_of(cell);
    if !suite.done.contains(&key) {
        let started = Instant::now();
        let ran = panic::catch_unwind(AssertUnwindSafe(|| suite.run_batch(key)));
        if let Err(e) = ran {
            // Nothing of a broken batch may stay behind: agents, pods.
            suite.fixtures.clear();
            panic::resume_unwind(e);
        }
        eprintln!(
            "conformance: {} {} via {}: {:.1} s",
            key.2.name(),
            key.1.name(),
            key.0.name(),
            started.elapsed().as_secs_f64()
        );
        suite.release_fixtures();
    }

    let row = tests
        .iter()
        .find(|t| t.proxy == cell.proxy && t.client == cell.client)
        .expect("the cell's test is in the table");
    if cell.direction == Direction::Outbound && row.scenarios.first() == Some(&cell.scenario) {
        for scenario in Scenario::ALL {
            if row.scenarios.contains(&scenario) {
                continue;
            }
            for direction in Direction::ALL {
                let na = Cell {
                    scenario,
                    direction,
                    ..cell
                };
                for mode in MODES {
                    println!("{}", na.line(mode, "n/a"));
                }
            }
        }
    }
    let tag = known.iter().find(|k| k.cell == cell);
    if let Some(k) = tag {
        println!(
            "CONFORMANCE-KNOWN\t{}\t{}\t{}\t{}\t{}\t{}",
            k.tag,
            cell.client.name(),
            cell.scenario.name(),
            cell.direction.name(),
            cell.proxy.name(),
            k.what
        );
    }
    let mut differences = Vec::new();
    for mode in MODES {
        let outcome = &suite.results[&(cell, mode)];
        let text = match &outcome.result {
            Ok(()) => "ok".to_owned(),
            Err(d) => d.clone(),
        };
        println!("{}", cell.line(mode, &text));
        eprintln!(
            "{cell} {}: {:?}; server errors: {:?}",
            mode.arg(),
            outcome.observation,
            outcome.server_errors
        );
        if let Err(d) = &outcome.result {
            differences.push(format!("{}: {d}", mode.arg()));
        }
    }
    drop(guard);
    if !differences.is_empty() {
        let tag = tag.map(|k| format!(" (known reproduction {}: {})", k.tag, k.what));
        panic!(
            "{cell}: {}{}",
            differences.join("; "),
            tag.unwrap_or_default()
        );
    }
}

impl Suite {
    fn new(tests: &'static [TestFn], first: Cell) -> Self {
        let plan: BTreeSet<Cell> = selected_tests()
            .map(|names| names.iter().filter_map(|n| parse_name(n, tests)).collect())
            .unwrap_or_default();
        let largest = plan
            .iter()
            .chain([&first])
            .map(|c| c.scenario.size())
            .max()
            .unwrap_or(0);
        eprintln!(
            "conformance: {} cells planned in this process",
            plan.len().max(1)
        );
        for line in super::axes_lines() {
            println!("{line}");
        }
        // Written now, while nothing else runs: a client program written
        // while another thread forks cannot be run (ETXTBSY) until that
        // child has exec'd.
        super::runners::prepare();
        Self {
            plan,
            content: Arc::new(Content::new(largest)),
            results: HashMap::new(),
            done: HashSet::new(),
            fixtures: HashMap::new(),
            home: agent::cgroup::own().expect("the test process's cgroup"),
        }
    }

    /// The clients of a batch: every planned cell of it that can run here.
    fn clients(&self, key: BatchKey) -> Vec<Client> {
        self.plan
            .iter()
            .filter(|c| batch_of(**c) == key && super::suite::unavailable(**c).is_none())
            .map(|c| c.client)
            .collect()
    }

    fn run_batch(&mut self, key: BatchKey) {
        let (proxy, direction, scenario) = key;
        let clients = self.clients(key);
        for mode in MODES {
            if !self.fixtures.contains_key(&(proxy, mode)) {
                let f = Fixture::new(mode, proxy, &self.content, &self.home);
                self.fixtures.insert((proxy, mode), f);
            }
        }
        // Computed before the clients start, not by the first to finish.
        let _ = self.content.expected_sha256(scenario);
        let content = &self.content;
        let fixtures = &self.fixtures;
        let by_mode: Vec<(RedirectMode, Batch)> = std::thread::scope(|s| {
            let running: Vec<_> = MODES
                .iter()
                .map(|&mode| {
                    let fixture = &fixtures[&(proxy, mode)];
                    let clients = &clients;
                    s.spawn(move || {
                        (
                            mode,
                            fixture.run_batch(scenario, direction, clients, content),
                        )
                    })
                })
                .collect();
            running
                .into_iter()
                .map(|h| h.join().expect("a mode's batch"))
                .collect()
        });
        let want = self
            .content
            .expected(scenario)
            .map_or(0, |b| b.len() as u64);
        for (mode, batch) in by_mode {
            if let Some(s) = batch.short_circuit {
                eprintln!(
                    "conformance: {} {} via {} in eBPF mode: {} sockets short-circuited, \
                     {} left to TCP as blocking, {} messages redirected",
                    scenario.name(),
                    direction.name(),
                    proxy.name(),
                    s.inserted,
                    s.refused_blocking,
                    s.redirected
                );
            }
            for (client, observation, record) in batch.cells {
                let cell = Cell {
                    client,
                    scenario,
                    direction,
                    proxy,
                };
                let result = judge(cell, &observation, want, &record);
                self.results.insert(
                    (cell, mode),
                    Outcome {
                        result,
                        observation,
                        server_errors: record.errors.clone(),
                    },
                );
            }
        }
        self.done.insert(key);
    }

    /// Drops the pods no batch still to run needs.
    fn release_fixtures(&mut self) {
        let needed: HashSet<Proxy> = self
            .plan
            .iter()
            .filter(|c| !self.done.contains(&batch_of(**c)) && unavailable(**c).is_none())
            .map(|c| c.proxy)
            .collect();
        self.fixtures.retain(|(proxy, _), _| needed.contains(proxy));
    }
}

/// `fn_name::scenario_N_Scenario__X::direction_N_Direction__Y`, the
/// names rstest gives the table's tests, as a cell.
fn parse_name(name: &str, tests: &[TestFn]) -> Option<Cell> {
    let mut segments = name.split("::");
    let test = segments.next()?;
    let row = tests.iter().find(|t| t.name == test)?;
    let (mut scenario, mut direction) = (None, None);
    for segment in segments {
        let variant = segment.rsplit("__").next()?;
        if segment.starts_with("scenario_") {
            scenario = Scenario::ALL
                .into_iter()
                .find(|s| format!("{s:?}") == variant);
        } else if segment.starts_with("direction_") {
            direction = Direction::ALL
                .into_iter()
                .find(|d| format!("{d:?}") == variant);
        }
    }
    Some(Cell {
        client: row.client,
        scenario: scenario?,
        direction: direction?,
        proxy: row.proxy,
    })
}

/// The tests this process will run: libtest's `--list` of this binary with
/// this process's own filters (`None` if that cannot be asked).
fn selected_tests() -> Option<Vec<String>> {
    let exe = std::env::current_exe().ok()?;
    let mut args = Vec::new();
    let mut given = std::env::args().skip(1);
    while let Some(a) = given.next() {
        match a.as_str() {
            "--exact" | "--ignored" | "--include-ignored" => args.push(a),
            "--skip" => {
                args.push(a);
                args.extend(given.next());
            }
            // Options with a value that says nothing of the selection.
            "--test-threads" | "--format" | "--logfile" | "--color" | "-Z" | "--shuffle-seed" => {
                given.next();
            }
            _ if a.starts_with("--skip=") => args.push(a),
            _ if a.starts_with('-') => {}
            _ => args.push(a),
        }
    }
    let out = Command::new(exe)
        .args(&args)
        .args(["--list", "--format", "terse"])
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_suffix(": test"))
            .map(str::to_owned)
            .collect()
    })
}
