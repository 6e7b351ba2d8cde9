//! The Markdown report: setup, targets (met/missed), every cell's median
//! and spread per mode, the paired ratios, the datapath's own counters,
//! and every flag (sockmap fallbacks, errors, integrity failures).

use std::{
    fmt::Write as _,
    fs,
    path::PathBuf,
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{
    Cell, KIB, Measured, Mode, Plan, Sample, chart, out_dir, shown,
    stats::{self, Metric, Spread, Table},
};
use crate::cmd;

/// The raw numbers of a run, written next to its report.
#[derive(Serialize, Deserialize)]
pub struct Raw {
    pub plan: Plan,
    pub system: System,
    pub samples: Vec<Sample>,
}

/// What the report says about the machine.
#[derive(Clone, Serialize, Deserialize)]
pub struct System {
    started_utc: String,
    file_stamp: String,
    kernel: String,
    cpu_model: String,
    cpus: usize,
    haproxy: String,
    load_start: String,
    load_end: String,
    /// The busiest other processes over one second before the run.
    background: String,
    duration: Duration,
    /// Whose reads the sk_msg backpressure counts, per sockmap mode (from
    /// the agents' startup logs).
    #[serde(default)]
    backpressure: String,
}

impl System {
    pub fn read(plan: &Plan) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (date, time) = utc(now);
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                    .map(|(_, m)| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let haproxy = if plan.modes.iter().any(|m| m.haproxy()) {
            cmd::stdout_of(Command::new("haproxy").arg("-v"))
                .and_then(|v| v.lines().next().map(str::to_owned))
                .unwrap_or_else(|| "unknown".into())
        } else {
            "not run".into()
        };
        Self {
            started_utc: format!("{date} {time} UTC"),
            file_stamp: format!("{}-{}", date.replace('-', ""), time.replace(':', "")),
            kernel: cmd::stdout_of(Command::new("uname").arg("-r")).unwrap_or_default(),
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            haproxy,
            load_start: loadavg(),
            load_end: String::new(),
            background: background_load(),
            duration: Duration::ZERO,
            backpressure: String::new(),
        }
    }

    pub fn set_backpressure(&mut self, readers: String) {
        self.backpressure = readers;
    }

    pub fn finish(mut self, duration: Duration) -> Self {
        self.load_end = loadavg();
        self.duration = duration;
        self
    }
}

/// CPU time of every process (pid → (name, ticks)).
fn process_ticks() -> std::collections::HashMap<u32, (String, u64)> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.filter_map(Result::ok) {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((name, ticks)) = stat_cpu(&stat) else {
            continue;
        };
        out.insert(pid, (name.to_owned(), ticks));
    }
    out
}

/// The command name and utime + stime (fields 2, 14 and 15) of a
/// `/proc/PID/stat` line; the name is parenthesised and may hold spaces
/// and `)`.
pub(super) fn stat_cpu(stat: &str) -> Option<(&str, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    // After the name, the state is field 3: utime (14) is the 12th.
    let mut fields = stat[close + 1..].split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((&stat[open + 1..close], utime + stime))
}

/// The kernel's clock ticks per second (`/proc/PID/stat`'s unit).
#[expect(clippy::cast_precision_loss, reason = "a small constant")]
pub(super) fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// The processes that used the most CPU during one second, e.g.
/// "qemu-system-x86 1.52 CPUs, kworker/0:1 0.02 CPUs".
#[expect(
    clippy::cast_precision_loss,
    reason = "tick counts over a second are small"
)]
fn background_load() -> String {
    let before = process_ticks();
    std::thread::sleep(Duration::from_secs(1));
    let after = process_ticks();
    let hz = ticks_per_second();
    let mut busy: Vec<(f64, String)> = after
        .iter()
        .filter_map(|(pid, (name, t))| {
            let t0 = before.get(pid).map_or(0, |b| b.1);
            let cpus = t.saturating_sub(t0) as f64 / hz;
            (cpus >= 0.05).then(|| (cpus, name.clone()))
        })
        .collect();
    busy.sort_by(|a, b| b.0.total_cmp(&a.0));
    if busy.is_empty() {
        return "none above 0.05 CPU".into();
    }
    busy.iter()
        .take(4)
        .map(|(c, n)| format!("{n} {c:.2} CPUs"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// (YYYY-MM-DD, HH:MM:SS) of a UNIX time, in UTC.
fn utc(secs: u64) -> (String, String) {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        format!("{y:04}-{m:02}-{d:02}"),
        format!("{:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60),
    )
}

pub struct Written {
    pub markdown: PathBuf,
    pub chart: PathBuf,
    /// Targets and headline numbers, for the terminal.
    pub summary: String,
}

pub fn write(plan: &Plan, sys: &System, samples: &[Sample]) -> Result<Written> {
    let dir = out_dir();
    fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let stem = format!(
        "bench-{}{}",
        sys.file_stamp,
        if plan.quick { "-quick" } else { "" }
    );
    let md_path = dir.join(format!("{stem}.md"));
    let svg_path = dir.join(format!("{stem}.svg"));
    let json_path = dir.join(format!("{stem}.json"));
    let raw = Raw {
        plan: plan.clone(),
        system: sys.clone(),
        samples: samples.to_vec(),
    };
    fs::write(&json_path, serde_json::to_vec_pretty(&raw)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let table = Table::new(samples);
    chart::draw(&svg_path, plan, &table)?;

    let targets = targets(plan, &table);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# mesh-redirect bench{}: {}\n",
        if plan.quick {
            " (--quick smoke run)"
        } else {
            ""
        },
        sys.started_utc
    );
    if plan.quick {
        md.push_str(
            "A smoke run: cells are a fraction of a second and there are 2 rounds. It checks that \
             every cell produces numbers and the counters are consistent; its speeds mean nothing.\n\n",
        );
    }
    setup_section(&mut md, plan, sys);
    let spread_words = if plan.rounds as usize >= stats::IQR_FROM {
        "[25th–75th percentile]"
    } else {
        "[min–max]"
    };
    targets_intro(&mut md, spread_words);
    let targets_md = targets_table(&targets);
    md.push_str(&targets_md);
    md.push('\n');
    let results_md = results_table(plan, &table);
    let _ = write!(
        md,
        "## Results\n\nMedian {spread_words} over the rounds, per mode.\n\n{results_md}"
    );
    md.push_str(&backpressure_section(plan, &table, spread_words));
    let _ = write!(
        md,
        "\n## Ratios\n\nPer round, the two modes' numbers from the same round (seconds apart) are \
         divided; the median {spread_words} of those ratios. For latency, CPU and memory, below 1 \
         is better; for rates and throughput, above 1. M3/M2 isolates the sockmap \
         short-circuit (both use connect4, neither has NAT or conntrack); M2/M1 what leaving \
         iptables alone buys.\n\n",
    );
    let ratios_md = ratios_table(plan, &table);
    md.push_str(&ratios_md);
    md.push_str("\n## Datapath counters\n\n");
    md.push_str(&datapath_table(plan, &table));
    md.push_str(&proxy_ways_section(plan, &table));
    md.push_str("\n## Flags\n\n");
    md.push_str(&flags(plan, &table, samples));
    let _ = writeln!(
        md,
        "\n## Chart\n\n![ratios to M1]({})\n\nThroughput (top) and p99 latency (bottom) of each \
         mode relative to M1 in the same round: medians, and whiskers over the same spread as the \
         tables.",
        svg_path
            .file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into_owned())
    );
    fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    let summary = format!(
        "\n{}\n\n{targets_md}\n{ratios_md}",
        md.lines().next().unwrap_or_default()
    );
    eprintln!(
        "bench: wrote {}, {} and the raw numbers {}",
        shown(&md_path),
        shown(&svg_path),
        shown(&json_path)
    );
    Ok(Written {
        markdown: md_path,
        chart: svg_path,
        summary,
    })
}

/// The agent's default `--sockmap-queue-kib` (the bench does not pass it).
const SOCKMAP_QUEUE_KIB: u32 = 4096;

/// The Targets heading and how its verdicts are reached.
fn targets_intro(md: &mut String, spread_words: &str) {
    md.push_str("## Targets\n\n");
    let _ = write!(
        md,
        "Goals, not gates. A ratio target uses the median of the per-round ratios, shown with \
         its spread {spread_words}; \"spread straddles\" means that range crosses the target. \
         Rounds in which a sockmap mode fell back to TCP are left out of the ratios, and a target \
         whose candidate fell back or failed in any round is marked missed: neither is ever \
         counted as a win. A fallback is a round in which the sockmap redirected nothing, or \
         sent a message over TCP for no counted reason, or, with none passed, redirected fewer \
         messages than operations completed. Messages passed for the backpressure \
         (`msg_spilled`: the reader held more than the sockmap queue limit), the byte order \
         (`msg_gated`) or a blocking reader are not a fallback, nor are connections kept on \
         plain TCP because the last ones to their destination were all short \
         (`sockhash_skipped_short`, then only a message passed for no reason is one): that is \
         how the product behaves, and the round counts as a valid measurement of M3 or H3 (see \
         Backpressure and the share of bytes short-circuited in Datapath).\n\n",
    );
}

fn setup_section(md: &mut String, plan: &Plan, sys: &System) {
    let p = plan.placement;
    let _ = write!(
        md,
        "## Setup\n\n\
         - kernel `{}`, CPU {} × {}; load average {} at the start, {} at the end; busiest other \
         processes in the second before the run: {} (the machine is shared: compare ratios from \
         this run, not absolute times); {:.0} s in all\n\
         - placement (sched_setaffinity before exec): load client and upstream servers on CPU {}; \
         the proxy (the whole agent process, or HAProxy) on CPU {}; the orchestrator unpinned\n\
         - {} rounds{}; in each round every cell runs every mode back to back, the mode order \
         rotated by one per round\n\
         - built-in proxy: `--workers {}`, default relay buffer (64 KiB); HAProxy ({}): `nbthread 1`, \
         `mode tcp`, defaults otherwise (transparent via `SO_ORIGINAL_DST`: `server o 0.0.0.0:0`), \
         as uid/gid 1337 with `--proxy external --proxy-uid 1337 --proxy-gid 1337`\n\
         - sk_msg backpressure: the agent's default sockmap queue limit (`--sockmap-queue-kib \
         {SOCKMAP_QUEUE_KIB}`, not passed): a message whose reader holds more than {} MiB of \
         receive memory goes over TCP (`msg_spilled`), decided per message{}\n\
         - every mode has its own pod namespace and cgroup (10.99.N.1) and veth pair to one server \
         namespace (10.99.N.2); all agents and proxies stay up for the whole run; each agent lives \
         in a cgroup of its own; every namespace has `ip_local_port_range=10000 65000`, \
         `tcp_tw_reuse=1`\n\n",
        sys.kernel,
        sys.cpu_model,
        sys.cpus,
        sys.load_start,
        sys.load_end,
        sys.background,
        sys.duration.as_secs_f64(),
        p.app_cpu,
        p.proxy_cpu,
        plan.rounds,
        if plan.quick {
            ""
        } else {
            " after one short warm-up round that is not counted"
        },
        plan.proxy_workers,
        sys.haproxy,
        SOCKMAP_QUEUE_KIB / 1024,
        if sys.backpressure.is_empty() {
            String::new()
        } else {
            format!(
                "; how the kernel treats sockmap readers: {}",
                sys.backpressure
            )
        },
    );
    md.push_str("| mode | what |\n|---|---|\n");
    for m in &plan.modes {
        let _ = writeln!(md, "| {m} | {} |", m.describe());
    }
    let _ = write!(
        md,
        "\n| scenario | what (per mode per round) |\n|---|---|\n\
         | S1 | 1-byte request, 1-byte response on one persistent connection, closed loop, {} ms |\n\
         | S2 | HTTP/1.1 keep-alive, {} connections, {} requests/s on a fixed timetable for {} ms; \
         latency from the scheduled send time (no coordinated omission); CPU = client + proxy + \
         server on-CPU time (schedstat) per request |\n\
         | S4 | one connection per request (`Connection: close`, server closes), one at a time, \
         {} ms; latency = connect to close; conntrack counted after `conntrack -F` |\n\
         | S5 | upload through the proxy in 1, 16 and 128 KiB non-blocking writes for {} ms, then \
         half-close; until the sink's byte count (checked) |\n\
         | S6 | download of 1 MB ({} bodies) and 100 MB (1 body), one connection each, SHA-256 \
         checked; longest gap between two reads |\n\n",
        plan.s1_ms,
        plan.s2_conns,
        plan.s2_rate,
        plan.s2_ms,
        plan.s4_ms,
        plan.s5_ms,
        plan.s6_small_count
    );
}

/// "12.3", "0.052", "15300".
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a >= 0.001 {
        format!("{v:.3}")
    } else {
        format!("{v:.1e}")
    }
}

fn spread_text(s: Option<Spread>) -> String {
    s.map_or_else(
        || "–".into(),
        |s| {
            if s.n == 1 || s.hi - s.lo <= f64::EPSILON * s.hi.abs() {
                num(s.median)
            } else {
                format!("{} [{}–{}]", num(s.median), num(s.lo), num(s.hi))
            }
        },
    )
}

fn ratio_text(s: Option<Spread>) -> String {
    s.map_or_else(
        || "–".into(),
        |s| {
            if s.n == 1 {
                format!("{:.2}×", s.median)
            } else {
                format!("{:.2}× [{:.2}–{:.2}]", s.median, s.lo, s.hi)
            }
        },
    )
}

fn metric_label(m: &Metric) -> String {
    if m.unit.is_empty() || m.unit == "/s" {
        m.key.to_owned()
    } else {
        format!("{} ({})", m.key, m.unit)
    }
}

/// A table's heading row and rule: `cell`, `second`, then one right-aligned
/// column per name.
fn table_head(second: &str, columns: impl Iterator<Item = String>) -> String {
    let mut md = format!("| cell | {second} |");
    let mut rule = String::from("|---|---|");
    for c in columns {
        let _ = write!(md, " {c} |");
        rule.push_str("---:|");
    }
    md.push('\n');
    md.push_str(&rule);
    md.push('\n');
    md
}

fn results_table(plan: &Plan, t: &Table) -> String {
    let mut md = table_head("metric", plan.modes.iter().map(ToString::to_string));
    for &cell in &plan.cells {
        for metric in stats::metrics(cell) {
            let _ = write!(md, "| {} | {} |", cell.name(), metric_label(&metric));
            for &mode in &plan.modes {
                let _ = write!(md, " {} |", spread_text(t.spread(cell, mode, &metric)));
            }
            md.push('\n');
        }
    }
    md
}

/// The ratio columns: (numerator, denominator).
const RATIOS: [(Mode, Mode); 8] = [
    (Mode::M3, Mode::M1),
    (Mode::M3, Mode::M0),
    (Mode::M2, Mode::M1),
    (Mode::M3, Mode::M2),
    (Mode::M1, Mode::H1),
    (Mode::M3, Mode::H3),
    (Mode::H3, Mode::H1),
    (Mode::M1S, Mode::M1),
];

fn ratios_table(plan: &Plan, t: &Table) -> String {
    let cols: Vec<(Mode, Mode)> = RATIOS
        .into_iter()
        .filter(|(a, b)| plan.modes.contains(a) && plan.modes.contains(b))
        .collect();
    let mut md = table_head("metric", cols.iter().map(|(a, b)| format!("{a}/{b}")));
    for &cell in &plan.cells {
        for metric in stats::metrics(cell) {
            if [stats::LO.key, stats::CONNTRACK.key, stats::LATE.key].contains(&metric.key) {
                continue;
            }
            let better = if metric.higher_is_better {
                "↑"
            } else {
                "↓"
            };
            let _ = write!(
                md,
                "| {} | {} {better} |",
                cell.name(),
                metric_label(&metric)
            );
            for &(a, b) in &cols {
                let r = t.ratio(cell, a, b, &metric);
                let _ = write!(md, " {} |", ratio_text(r.spread));
            }
            md.push('\n');
        }
    }
    md
}

#[expect(
    clippy::cast_precision_loss,
    reason = "counter values are far below 2^52"
)]
fn datapath_table(plan: &Plan, t: &Table) -> String {
    let mut md = String::from(
        "From `mesh-redirect status --json --cgroup POD` before and after each cell (deltas; \
         median and spread over rounds); \"–\": no eBPF datapath serves the pod. \
         \"spilled\" counts the messages the backpressure sent over TCP because their reader \
         held more than the queue limit (`msg_spilled`), \"gated\" those sent over TCP to keep \
         the byte order (`msg_gated`), \"blocking\" those of a blocking reader or sender where \
         the kernel makes that unsafe (`msg_sender_blocking + msg_receiver_blocking`); all count \
         in `msg_passed`, and the round is a valid measurement. \"bytes short-circuited\" is \
         the share of the short-circuited sockets' bytes the sockmap moved (`bytes_redirected / \
         (bytes_redirected + bytes_passed)`). A sockmap round fell back to TCP if it redirected \
         nothing, or passed a message for no counted reason, or, with none passed, redirected \
         fewer messages than operations (unless connections were kept on TCP by design: \
         \"kept on TCP (short)\" counts the sockets left out of the short-circuit because \
         the last connections to their destination were all short, `sockhash_skipped_short`, \
         two per connection): counted in the last column and never as a win. lo \
         packets per op are the pod namespace's loopback packets per transaction, request, \
         connection or write (a passed message goes over lo).\n\n\
         | cell | mode | lo packets/op | connects redirected | msgs redirected/op | msgs passed | spilled | gated | blocking | bytes short-circuited | kept on TCP (short) | fell back (rounds) |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for &cell in &plan.cells {
        for &mode in &plan.modes {
            let lo = t.spread(cell, mode, &stats::LO);
            let conn = t.counter(cell, mode, |c, _| c.connect_redirected as f64);
            let red = t.counter(cell, mode, |c, m| {
                c.msg_redirected as f64 / m.client.ops.max(1) as f64
            });
            let passed = t.counter(cell, mode, |c, _| c.msg_passed as f64);
            let spilled = t.counter(cell, mode, |c, _| c.msg_spilled as f64);
            let gated = t.counter(cell, mode, |c, _| c.msg_gated as f64);
            let blocking = t.counter(cell, mode, |c, _| c.msg_blocking as f64);
            let kept = t.counter(cell, mode, |c, _| c.skipped_short as f64);
            let share =
                t.counter_some(cell, mode, |c| c.short_circuited_share().map(|s| s * 100.0));
            let fb = t.fallbacks(cell, mode);
            let sockmap_only = |v: String| if mode.sockmap() { v } else { "–".into() };
            let _ = writeln!(
                md,
                "| {} | {mode} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                cell.name(),
                spread_text(lo),
                spread_text(conn),
                spread_text(red),
                spread_text(passed),
                sockmap_only(spread_text(spilled)),
                sockmap_only(spread_text(gated)),
                sockmap_only(spread_text(blocking)),
                sockmap_only(
                    share.map_or_else(|| "–".into(), |s| format!("{} %", spread_text(Some(s))))
                ),
                sockmap_only(spread_text(kept)),
                sockmap_only(fb.to_string()),
            );
        }
    }
    md
}

/// How the built-in proxy moved each cell's connections (empty without a
/// mode it serves).
#[expect(
    clippy::cast_precision_loss,
    reason = "counter values are far below 2^52"
)]
fn proxy_ways_section(plan: &Plan, t: &Table) -> String {
    let modes: Vec<Mode> = plan
        .modes
        .iter()
        .copied()
        .filter(|m| m.builtin_proxy())
        .collect();
    if modes.is_empty() {
        return String::new();
    }
    let mut md = String::from(
        "\n## The built-in proxy's ways\n\n\
         From the agent's `/metrics` before and after each cell (deltas; median and spread over \
         rounds). Each connection has two ways, to the upstream and back. With `--splice` \
         (mode M1S), a way goes on through `splice(2)` once it has moved 256 KiB, and only out \
         of a socket that no SOCKHASH can hold (the app's loopback leg when no sockmap serves \
         the pod: iptables mode or `--no-sockmap`; never after a handover); every other way is \
         copied through the proxy (in a sockmap mode the app's leg is short-circuited in the \
         kernel and the proxy copies its upstream leg). Into the app's socket it is always \
         copied: spliced, a 100 MB download was slower and held more kernel memory. \
         \"ways copied\" is two per connection less those spliced (a connection reset before \
         its relay, e.g. its upstream refused, counts too).\n\n\
         | cell | mode | connections | ways spliced | ways copied |\n\
         |---|---|---:|---:|---:|\n",
    );
    for &cell in &plan.cells {
        for &mode in &modes {
            let _ = writeln!(
                md,
                "| {} | {mode} | {} | {} | {} |",
                cell.name(),
                spread_text(t.proxy_ways(cell, mode, |w| w.connections as f64)),
                spread_text(t.proxy_ways(cell, mode, |w| w.spliced as f64)),
                spread_text(t.proxy_ways(cell, mode, |w| w.copied() as f64)),
            );
        }
    }
    md
}

/// The Backpressure section (empty without a bulk cell).
fn backpressure_section(plan: &Plan, table: &Table, spread_words: &str) -> String {
    let mut md = String::new();
    let backpressure_md = backpressure_table(plan, table);
    if !backpressure_md.is_empty() {
        let _ = write!(
            md,
            "\n## Backpressure\n\nThe kernel does not bound a sockmap socket's ingress queue: \
             without a limit, a fast sender and a slow reader grow the kernel's TCP memory until \
             sends fail (before the agent had one, S5 16 and 128 KiB writes in M3 and H3 held \
             medians of 1.0–1.3 GiB and the client got ENOMEM). The agent sends a message over \
             TCP while its reader holds more than the queue limit ({} MiB) of receive memory. \
             The first row of each cell is the peak of the kernel's TCP memory \
             (`/proc/net/sockstat`, all namespaces, sampled every 10 ms, above its level before \
             the cell): median {spread_words} over the rounds, and the highest round; it stays \
             small if the limit holds. The second row counts the messages the backpressure \
             sent over TCP (`msg_spilled`), in all over the rounds, and in how many rounds: \
             that is the design, not a fallback.\n\n\
             {backpressure_md}",
            SOCKMAP_QUEUE_KIB / 1024
        );
    }
    md
}

/// Per bulk cell (those that record the kernel's TCP memory): its peak per
/// mode, and the messages the backpressure sent over TCP.
fn backpressure_table(plan: &Plan, t: &Table) -> String {
    let cells: Vec<Cell> = plan
        .cells
        .iter()
        .copied()
        .filter(|&c| {
            stats::metrics(c)
                .iter()
                .any(|m| m.key == stats::TCP_MEM.key)
        })
        .collect();
    if cells.is_empty() {
        return String::new();
    }
    let mut md = table_head("what", plan.modes.iter().map(ToString::to_string));
    for cell in cells {
        let _ = write!(
            md,
            "| {} | kernel TCP memory peak (MiB): median, highest |",
            cell.name()
        );
        for &mode in &plan.modes {
            let values = t.values(cell, mode, &stats::TCP_MEM);
            let max = values
                .iter()
                .copied()
                .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))));
            let _ = write!(
                md,
                " {}{} |",
                spread_text(stats::spread(&values)),
                max.map_or_else(String::new, |m| format!(", highest {}", num(m)))
            );
        }
        md.push('\n');
        let _ = write!(
            md,
            "| {} | messages spilled to TCP: in all (rounds) |",
            cell.name()
        );
        for &mode in &plan.modes {
            let measured = t.values(cell, mode, &stats::TCP_MEM).len();
            if mode.sockmap() {
                let (rounds, sockets) = t.spills(cell, mode);
                let _ = write!(md, " {sockets} ({rounds} of {measured}) |");
            } else {
                md.push_str(" – |");
            }
        }
        md.push('\n');
    }
    md
}

/// Kernel TCP memory (MiB, median over rounds) above which a cell is flagged.
const MEM_FLAG_MIB: f64 = 256.0;

fn flags(plan: &Plan, t: &Table, samples: &[Sample]) -> String {
    let mut lines = Vec::new();
    // Bytes piling up in the kernel: the sk_msg ingress queue is not
    // bounded by the receiver's buffers the way TCP is.
    for &cell in &plan.cells {
        if !stats::metrics(cell)
            .iter()
            .any(|m| m.key == stats::TCP_MEM.key)
        {
            continue;
        }
        let base = t
            .spread(cell, Mode::M1, &stats::TCP_MEM)
            .map_or_else(String::new, |s| format!(" (M1: {} MiB)", num(s.median)));
        for &mode in &plan.modes {
            if let Some(s) = t.spread(cell, mode, &stats::TCP_MEM)
                && s.median >= MEM_FLAG_MIB
            {
                lines.push(format!(
                    "- **no backpressure**: {} {mode}: the kernel held a median {} MiB (upper end of the spread {} MiB) of TCP memory during the cell{base}",
                    cell.name(),
                    num(s.median),
                    num(s.hi)
                ));
            }
        }
    }
    for s in samples {
        let where_ = format!("{} {} round {}", s.cell.name(), s.mode, s.round + 1);
        match &s.result {
            Err(e) => lines.push(format!("- error: {where_}: {e}")),
            Ok(m) => {
                if s.fell_back() {
                    let c = m.counters.unwrap_or_default();
                    lines.push(format!(
                        "- **sockmap fell back to TCP**: {where_}: msg_redirected {}, msg_passed {}, msg_spilled {}, {} ops",
                        c.msg_redirected, c.msg_passed, c.msg_spilled, m.client.ops
                    ));
                }
                if !m.client.integrity_ok {
                    lines.push(format!("- **integrity check failed**: {where_}"));
                }
                if matches!(s.cell, Cell::S4)
                    && !m.conntrack_flushed
                    && m.client.conntrack_after.is_some()
                {
                    lines.push(format!(
                        "- conntrack not flushed before {where_} (no `conntrack` tool): entries/conn is approximate"
                    ));
                }
            }
        }
    }
    for &cell in &plan.cells {
        for &mode in &plan.modes {
            let missing = (0..plan.rounds)
                .filter(|&r| t.sample(cell, mode, r).is_none())
                .count();
            if missing > 0 {
                lines.push(format!(
                    "- missing: {} {mode} in {missing} rounds",
                    cell.name()
                ));
            }
        }
    }
    let mut notes = Vec::new();
    for &cell in &plan.cells {
        for &mode in plan.modes.iter().filter(|m| m.sockmap()) {
            let (rounds, sockets) = t.spills(cell, mode);
            if rounds > 0 {
                let measured = (0..plan.rounds)
                    .filter(|&r| t.sample(cell, mode, r).is_some_and(|s| s.result.is_ok()))
                    .count();
                notes.push(format!(
                    "- backpressure sent {sockets} message(s) over TCP: {} {mode}, in {rounds} of \
                     {measured} rounds (by design: a reader held more than the queue limit; \
                     not a fallback, the rounds count)",
                    cell.name()
                ));
            }
        }
    }
    let mut out = if lines.is_empty() {
        "None: every cell of every round produced numbers, every hash matched, and no sockmap \
         mode fell back to TCP.\n"
            .to_owned()
    } else {
        lines.join("\n") + "\n"
    };
    if !notes.is_empty() {
        out.push_str("\nNotes (not flags):\n\n");
        out.push_str(&(notes.join("\n") + "\n"));
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Met,
    Missed,
    NotMeasured,
}

struct Target {
    goal: String,
    measured: String,
    verdict: Verdict,
    note: String,
}

fn targets_table(targets: &[Target]) -> String {
    let mut md = String::from("| target | measured | result |\n|---|---|---|\n");
    for t in targets {
        let v = match t.verdict {
            Verdict::Met => "**met**",
            Verdict::Missed => "**missed**",
            Verdict::NotMeasured => "not measured",
        };
        let note = if t.note.is_empty() {
            String::new()
        } else {
            format!(" ({})", t.note)
        };
        let _ = writeln!(md, "| {} | {} | {v}{note} |", t.goal, t.measured);
    }
    md
}

/// A ratio target: `pair.0 / pair.1` of `metric` in `cell` against
/// `bound` (`at_least`: ratio ≥ bound, else ratio ≤ bound).
struct RatioGoal {
    goal: String,
    cell: Cell,
    pair: (Mode, Mode),
    metric: Metric,
    bound: f64,
    at_least: bool,
}

fn ratio_target(table: &Table, plan: &Plan, g: RatioGoal) -> Target {
    let (num_mode, den_mode) = g.pair;
    if !plan.cells.contains(&g.cell)
        || !plan.modes.contains(&num_mode)
        || !plan.modes.contains(&den_mode)
    {
        return Target {
            goal: g.goal,
            measured: "–".into(),
            verdict: Verdict::NotMeasured,
            note: String::new(),
        };
    }
    let outcome = table.ratio(g.cell, num_mode, den_mode, &g.metric);
    let ratio = outcome.spread;
    let ok = |v: f64| {
        if g.at_least {
            v >= g.bound
        } else {
            v <= g.bound
        }
    };
    let (mut verdict, mut note) = match ratio {
        None => (Verdict::NotMeasured, String::new()),
        Some(s) if ok(s.median) => (
            Verdict::Met,
            if ok(s.lo) && ok(s.hi) {
                String::new()
            } else {
                "spread straddles".into()
            },
        ),
        Some(s) => (
            Verdict::Missed,
            if ok(s.lo) || ok(s.hi) {
                "spread straddles".into()
            } else {
                String::new()
            },
        ),
    };
    // A round in which the candidate fell back or failed is never a win.
    let mut why = Vec::new();
    if outcome.fell_back > 0 {
        why.push(format!(
            "sockmap fell back in {} round(s)",
            outcome.fell_back
        ));
    }
    if outcome.failed_num > 0 {
        why.push(format!(
            "{num_mode} failed in {} round(s), see Flags",
            outcome.failed_num
        ));
    }
    if !why.is_empty() {
        verdict = Verdict::Missed;
        if !note.is_empty() {
            why.push(note);
        }
        note = why.join("; ");
    }
    // Backpressure switches are the product working: counted, but said.
    let (spilled_rounds, _) = table.spills(g.cell, num_mode);
    if spilled_rounds > 0 {
        if !note.is_empty() {
            note.push_str("; ");
        }
        let _ = write!(
            note,
            "backpressure sent {num_mode} messages over TCP in {spilled_rounds} round(s), counted"
        );
    }
    Target {
        goal: g.goal,
        measured: format!("{num_mode}/{den_mode} = {}", ratio_text(ratio)),
        verdict,
        note,
    }
}

/// A target that every round of `mode` in `cell` has `metric` == 0.
fn zero_target(t: &Table, plan: &Plan, goal: String, cell: Cell, metric: &Metric) -> Target {
    let mode = Mode::M3;
    let values = t.values(cell, mode, metric);
    if values.is_empty() || !plan.modes.contains(&mode) {
        return Target {
            goal,
            measured: "–".into(),
            verdict: Verdict::NotMeasured,
            note: String::new(),
        };
    }
    let m1 = if plan.modes.contains(&Mode::M1) {
        format!(" (M1 {})", spread_text(t.spread(cell, Mode::M1, metric)))
    } else {
        String::new()
    };
    let fb = t.fallbacks(cell, mode);
    let failed = t.failures(cell, mode);
    let all_zero = values.iter().all(|&v| v == 0.0);
    Target {
        goal,
        measured: format!("M3 {}{m1}", spread_text(stats::spread(&values))),
        verdict: if all_zero && fb == 0 && failed == 0 {
            Verdict::Met
        } else {
            Verdict::Missed
        },
        note: if fb > 0 {
            format!("sockmap fell back in {fb} round(s)")
        } else if failed > 0 {
            format!("M3 failed in {failed} round(s), see Flags")
        } else if all_zero {
            String::new()
        } else {
            format!(
                "non-zero in {} of {} rounds",
                values.iter().filter(|&&v| v != 0.0).count(),
                values.len()
            )
        },
    }
}

/// Our proxy against HAProxy under one redirect: every throughput cell
/// (ratio ≥ 1) or every p99 (ratio ≤ 1).
fn peer_target(t: &Table, plan: &Plan, ours: Mode, peer: Mode, throughput: bool) -> Target {
    let redirect = if ours == Mode::M1 {
        "iptables"
    } else {
        "eBPF + sockmap"
    };
    let goal = format!(
        "our proxy ≥ HAProxy, {}, under {redirect} ({ours} vs {peer})",
        if throughput { "throughput" } else { "p99" }
    );
    if !plan.modes.contains(&ours) || !plan.modes.contains(&peer) {
        return Target {
            goal,
            measured: "–".into(),
            verdict: Verdict::NotMeasured,
            note: String::new(),
        };
    }
    let mut parts = Vec::new();
    let mut misses = Vec::new();
    let mut fell_back = 0;
    let mut failed = 0;
    for &cell in &plan.cells {
        let metric = match (throughput, cell) {
            // S2 runs at a fixed rate: its throughput is not a contest.
            (true, Cell::S2) => continue,
            (true, _) => stats::metrics(cell)[0],
            (false, Cell::S1 | Cell::S2 | Cell::S4) => stats::P99,
            (false, _) => continue,
        };
        let outcome = t.ratio(cell, ours, peer, &metric);
        fell_back += outcome.fell_back;
        failed += outcome.failed_num;
        let Some(r) = outcome.spread else { continue };
        let ok = if throughput {
            r.median >= 1.0
        } else {
            r.median <= 1.0
        };
        let short = short_cell(cell);
        parts.push(format!("{short} {:.2}×", r.median));
        if !ok {
            misses.push(short);
        }
    }
    let verdict = if parts.is_empty() {
        Verdict::NotMeasured
    } else if misses.is_empty() && fell_back == 0 && failed == 0 {
        Verdict::Met
    } else {
        Verdict::Missed
    };
    let mut notes = Vec::new();
    if !misses.is_empty() {
        notes.push(format!("behind in {}", misses.join(", ")));
    }
    if fell_back > 0 {
        notes.push(format!("sockmap fell back in {fell_back} round(s)"));
    }
    if failed > 0 {
        notes.push(format!("{ours} failed in {failed} round(s), see Flags"));
    }
    let note = notes.join("; ");
    Target {
        goal,
        measured: format!("{ours}/{peer}: {}", parts.join(", ")),
        verdict,
        note,
    }
}

fn short_cell(cell: Cell) -> String {
    match cell {
        Cell::S1 => "S1".into(),
        Cell::S2 => "S2".into(),
        Cell::S4 => "S4".into(),
        Cell::S5(w) => format!("S5 {}K", w / KIB),
        Cell::S6(b) => format!("S6 {}MB", b / super::MB),
    }
}

fn targets(plan: &Plan, t: &Table) -> Vec<Target> {
    let m31 = (Mode::M3, Mode::M1);
    let mut v = vec![
        zero_target(
            t,
            plan,
            "app↔proxy TCP segments (lo packets) per keep-alive request (S2): M3 = 0".into(),
            Cell::S2,
            &stats::LO,
        ),
        zero_target(
            t,
            plan,
            "conntrack entries per connection (S4): M3 = 0".into(),
            Cell::S4,
            &stats::CONNTRACK,
        ),
    ];
    let goal = |goal: String, cell, metric, bound, at_least| RatioGoal {
        goal,
        cell,
        pair: m31,
        metric,
        bound,
        at_least,
    };
    let mut goals = vec![
        goal(
            "S1: M3 ≥ 1.5× M1 transactions/s".into(),
            Cell::S1,
            stats::TPS,
            1.5,
            true,
        ),
        goal(
            format!("S2: M3 p99 ≤ 0.8× M1 at {} requests/s", plan.s2_rate),
            Cell::S2,
            stats::P99,
            0.8,
            false,
        ),
        goal(
            "S4: M3 ≥ 1.0× M1 connections/s".into(),
            Cell::S4,
            stats::CONNS,
            1.0,
            true,
        ),
        goal(
            "S4: M3 p99 ≤ 1.1× M1".into(),
            Cell::S4,
            stats::P99,
            1.1,
            false,
        ),
    ];
    for w in super::S5_SIZES {
        goals.push(goal(
            format!("S5 {} KiB writes: M3 ≥ 1.0× M1", w / KIB),
            Cell::S5(w),
            stats::GBITS,
            1.0,
            true,
        ));
    }
    goals.push(goal(
        "S5 128 KiB writes: M3 ≥ 1.5× M1".into(),
        Cell::S5(128 * KIB),
        stats::GBITS,
        1.5,
        true,
    ));
    v.extend(goals.into_iter().map(|g| ratio_target(t, plan, g)));
    for (ours, peer) in [(Mode::M1, Mode::H1), (Mode::M3, Mode::H3)] {
        v.push(peer_target(t, plan, ours, peer, true));
        v.push(peer_target(t, plan, ours, peer, false));
    }
    v
}

/// `--quick`'s assertions: every cell produced numbers, and the counters
/// say what each mode should. Returns what is wrong.
pub fn consistency(plan: &Plan, samples: &[Sample]) -> Vec<String> {
    let t = Table::new(samples);
    let mut problems = Vec::new();
    for &cell in &plan.cells {
        for &mode in &plan.modes {
            for round in 0..plan.rounds {
                let at = format!("{} {mode} round {}", cell.name(), round + 1);
                let Some(s) = t.sample(cell, mode, round) else {
                    problems.push(format!("{at}: no sample"));
                    continue;
                };
                let m = match &s.result {
                    Ok(m) => m,
                    Err(e) => {
                        problems.push(format!("{at}: {e}"));
                        continue;
                    }
                };
                problems.extend(
                    check_sample(cell, mode, m)
                        .into_iter()
                        .map(|p| format!("{at}: {p}")),
                );
            }
        }
    }
    problems
}

fn check_sample(cell: Cell, mode: Mode, m: &Measured) -> Vec<String> {
    let mut p = Vec::new();
    for metric in stats::metrics(cell) {
        match (metric.get)(m) {
            Some(v) if v.is_finite() => {}
            other => p.push(format!("{} is {other:?}", metric.key)),
        }
    }
    if m.client.ops == 0 {
        p.push("no operation completed".into());
    }
    if !m.client.integrity_ok {
        p.push("integrity check failed".into());
    }
    match (mode, m.counters) {
        (Mode::M0 | Mode::M1 | Mode::H1 | Mode::M1S, Some(_)) => {
            p.push("an eBPF datapath serves a mode that should have none".into());
        }
        (Mode::M0 | Mode::M1 | Mode::H1 | Mode::M1S, None) => {}
        (_, None) => p.push("no eBPF datapath counters".into()),
        (Mode::M2, Some(c)) => {
            if c.msg_redirected != 0 || c.msg_passed != 0 {
                p.push(format!(
                    "--no-sockmap but sk_msg counted (redirected {}, passed {})",
                    c.msg_redirected, c.msg_passed
                ));
            }
            if c.connect_redirected == 0 {
                p.push("connect4 redirected nothing".into());
            }
        }
        (_, Some(c)) => {
            // Passed messages are fine with a counted reason each.
            if c.msg_redirected == 0 || c.msg_passed > c.passed_for_a_reason() {
                p.push(format!(
                    "sockmap fell back (msg_redirected {}, msg_passed {}, msg_spilled {})",
                    c.msg_redirected, c.msg_passed, c.msg_spilled
                ));
            }
            if c.connect_redirected == 0 {
                p.push("connect4 redirected nothing".into());
            }
        }
    }
    if cell == Cell::S2 && matches!(mode, Mode::M1 | Mode::H1) && m.client.lo_tx_packets == 0 {
        p.push(
            "no loopback packets through an iptables-redirected proxy: the lo count is broken"
                .into(),
        );
    }
    p
}

#[cfg(test)]
mod tests {
    use super::{num, stat_cpu, utc};

    #[test]
    fn stat_cpu_is_utime_plus_stime_past_a_command_name_with_spaces() {
        let stat = "4242 (mesh (re)direct) S 1 4242 4242 0 -1 4194560 \
                    1525 0 0 0 17 23 0 0 20 0 112 0 9000 1000 2000";
        assert_eq!(stat_cpu(stat), Some(("mesh (re)direct", 40)));
        assert_eq!(stat_cpu("4242 (short) S 1"), None);
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), ("1970-01-01".into(), "00:00:00".into()));
        assert_eq!(utc(951_782_400), ("2000-02-29".into(), "00:00:00".into()));
        assert_eq!(utc(1_767_225_599), ("2025-12-31".into(), "23:59:59".into()));
    }

    #[test]
    fn numbers() {
        assert_eq!(num(0.0), "0");
        assert_eq!(num(15_321.4), "15321");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(1.234), "1.23");
        assert_eq!(num(0.0521), "0.052");
        assert_eq!(num(0.000_25), "2.5e-4");
    }
}
