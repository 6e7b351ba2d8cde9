//! `cargo xtask conformance`: the conformance suite alone (the
//! `conformance` kernel test binary, as `cargo xtask test` runs it, with
//! `--nocapture` so its result lines reach us), then its table: a row per
//! client, scenario and direction, a column per proxy and redirect mode,
//! each cell `ok`, `n/a` (the client cannot express the scenario), or the
//! difference from what plain TCP gives.
//!
//! The binary prints, per cell and mode,
//! `CONFORMANCE<TAB>client<TAB>scenario<TAB>direction<TAB>proxy<TAB>mode<TAB>result`
//! and once per process `CONFORMANCE-AXES<TAB>axis<TAB>name<TAB>name...`,
//! the order of the rows and columns (the test crate owns the names).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    process::Stdio,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{build, cmd, setup, test};

/// The kernel test binary of the suite (`tests/tests/conformance.rs`).
const BINARY: &str = "conformance";
const MODES: [&str; 2] = ["ebpf", "iptables"];

pub fn run(filter: Option<&str>) -> Result<()> {
    let tc = setup::ensure(&[setup::Need::Tests, setup::Need::Clients, setup::Need::Demo])?;
    let agent = build::build(&tc, false)?;
    let binaries = test::kernel_test_binaries(&tc)?;
    let bin = binaries
        .iter()
        .find(|b| test::binary_name(b) == BINARY)
        .with_context(|| format!("no `{BINARY}` test binary among the kernel tests"))?;
    test::check_kernel_test_host()?;
    let mut c = test::kernel_test_command(bin, &agent, filter);
    c.arg("--nocapture")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("+ {}", cmd::display(&c));
    let started = Instant::now();
    let mut child = c
        .spawn()
        .with_context(|| format!("failed to start {}", bin.display()))?;
    let stdout = child.stdout.take().context("piped stdout")?;
    let stderr = child.stderr.take().context("piped stderr")?;
    // Both streams to our stderr as they come, a whole line at a time (the
    // binary writes its stderr unbuffered, in pieces).
    let echo = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            echo_line(&line);
        }
    });
    let mut report = Report::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading the conformance binary's output")?;
        echo_line(&line);
        report.add(&line);
    }
    let status = child.wait()?;
    let _ = echo.join();
    let elapsed = started.elapsed();
    print!("{}", report.table());
    let differences = report.differences();
    eprintln!(
        "conformance: {} cells, {} differ, in {:.0} s",
        report.results.len(),
        differences.len(),
        elapsed.as_secs_f64()
    );
    for d in &differences {
        eprintln!("  {d}");
    }
    if !status.success() {
        bail!("{} failed: {status}", bin.display());
    }
    if report.results.is_empty() {
        bail!("the conformance binary printed no result (filtered out, or not run as root?)");
    }
    Ok(())
}

/// `line` and a newline to stderr in one write.
fn echo_line(line: &str) {
    let _ = std::io::stderr()
        .lock()
        .write_all(format!("{line}\n").as_bytes());
}

/// A row: client, scenario, direction.
type Row = (String, String, String);
/// A column: proxy, mode.
type Column = (String, String);

/// What the binary printed.
#[derive(Debug, Default)]
struct Report {
    /// `clients`, `scenarios`, `directions`, `proxies`: the names in order.
    axes: BTreeMap<String, Vec<String>>,
    results: BTreeMap<(Row, Column), String>,
}

impl Report {
    /// Takes in one line of output (a result may follow libtest's
    /// `test NAME ... ` on the same line).
    fn add(&mut self, line: &str) {
        if let Some(at) = line.find("CONFORMANCE-AXES\t") {
            let mut f = line[at..].split('\t').skip(1);
            if let Some(axis) = f.next() {
                self.axes
                    .insert(axis.to_owned(), f.map(str::to_owned).collect());
            }
        } else if let Some(at) = line.find("CONFORMANCE\t") {
            let f: Vec<&str> = line[at..].splitn(7, '\t').skip(1).collect();
            if let [client, scenario, direction, proxy, mode, result] = f[..] {
                self.results.insert(
                    (
                        (client.into(), scenario.into(), direction.into()),
                        (proxy.into(), mode.into()),
                    ),
                    result.trim_end().to_owned(),
                );
            }
        }
    }

    /// Where `name` comes in `axis` (names the axes line lacks go last).
    fn rank(&self, axis: &str, name: &str) -> usize {
        self.axes
            .get(axis)
            .and_then(|names| names.iter().position(|n| n == name))
            .unwrap_or(usize::MAX)
    }

    fn rows(&self) -> Vec<Row> {
        let mut rows: Vec<Row> = self.results.keys().map(|(r, _)| r.clone()).collect();
        rows.sort_by_key(|(c, s, d)| {
            (
                self.rank("clients", c),
                c.clone(),
                self.rank("scenarios", s),
                s.clone(),
                self.rank("directions", d),
                d.clone(),
            )
        });
        rows.dedup();
        rows
    }

    fn columns(&self) -> Vec<Column> {
        let mut proxies: Vec<String> = self.results.keys().map(|(_, (p, _))| p.clone()).collect();
        proxies.sort_by_key(|p| (self.rank("proxies", p), p.clone()));
        proxies.dedup();
        proxies
            .into_iter()
            .flat_map(|p| MODES.map(|m| (p.clone(), m.to_owned())))
            .collect()
    }

    /// A Markdown table; `-` where the suite has no such cell (that client
    /// is not run through that proxy) or it was not run.
    fn table(&self) -> String {
        let columns = self.columns();
        let mut head = vec!["client".to_owned(), "scenario".into(), "dir".into()];
        head.extend(columns.iter().map(|(p, m)| format!("{p} {m}")));
        let mut lines = vec![head];
        for row in self.rows() {
            let mut line = vec![row.0.clone(), row.1.clone(), row.2.clone()];
            for column in &columns {
                let cell = self
                    .results
                    .get(&(row.clone(), column.clone()))
                    .map_or("-", String::as_str);
                line.push(cell.replace('|', "\\|"));
            }
            lines.push(line);
        }
        let widths: Vec<usize> = (0..lines[0].len())
            .map(|i| {
                lines
                    .iter()
                    .map(|l| l[i].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for (n, line) in lines.iter().enumerate() {
            out.push('|');
            for (cell, width) in line.iter().zip(&widths) {
                let _ = write!(out, " {cell:width$} |");
            }
            out.push('\n');
            if n == 0 {
                out.push('|');
                for width in &widths {
                    let _ = write!(out, "{}|", "-".repeat(width + 2));
                }
                out.push('\n');
            }
        }
        out
    }

    /// Every cell that is neither `ok` nor `n/a`, one line each.
    fn differences(&self) -> Vec<String> {
        self.results
            .iter()
            .filter(|(_, r)| *r != "ok" && *r != "n/a")
            .map(|(((c, s, d), (p, m)), r)| format!("{c} {s} {d} via {p} {m}: {r}"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::Report;

    #[test]
    fn table_orders_rows_and_columns_by_the_axes() {
        let mut r = Report::default();
        for line in [
            "CONFORMANCE-AXES\tclients\tpython\tcurl",
            "CONFORMANCE-AXES\tscenarios\tsmall\tdownload",
            "CONFORMANCE-AXES\tdirections\tout\tin",
            "CONFORMANCE-AXES\tproxies\tbuiltin\thaproxy",
            "test x ... CONFORMANCE\tcurl\tsmall\tout\thaproxy\tebpf\tok",
            "CONFORMANCE\tcurl\tsmall\tout\thaproxy\tiptables\tok",
            "CONFORMANCE\tcurl\tdownload\tin\tbuiltin\tebpf\ttruncated at 5 of 9 (clean EOF)",
            "CONFORMANCE\tcurl\tdownload\tin\tbuiltin\tiptables\tok",
            "CONFORMANCE\tpython\tsmall\tout\tbuiltin\tebpf\tn/a",
            "test result: ok.",
        ] {
            r.add(line);
        }
        let table = r.table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("| client "), "{table}");
        let builtin = lines[0].find("builtin ebpf").unwrap();
        assert!(builtin < lines[0].find("haproxy ebpf").unwrap(), "{table}");
        assert!(lines[2].starts_with("| python "), "{table}");
        assert!(lines[3].contains("curl   | small"), "{table}");
        assert!(lines[4].contains("download | in"), "{table}");
        assert!(lines[4].contains("truncated at 5 of 9"), "{table}");
        assert_eq!(lines.len(), 5, "{table}");
        assert_eq!(
            r.differences(),
            ["curl download in via builtin ebpf: truncated at 5 of 9 (clean EOF)"]
        );
    }
}
