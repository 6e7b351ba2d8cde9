//! Medians, spreads and paired ratios over rounds.

use std::collections::BTreeMap;

use super::{Cell, Measured, Mode, Sample};

/// A metric of a cell, derived from what was measured.
#[derive(Clone, Copy)]
pub struct Metric {
    pub key: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    pub get: fn(&Measured) -> Option<f64>,
}

#[expect(
    clippy::cast_precision_loss,
    reason = "counts and byte totals are far below 2^52"
)]
fn per_op(v: u64, m: &Measured) -> Option<f64> {
    (m.client.ops > 0).then(|| v as f64 / m.client.ops as f64)
}

#[expect(
    clippy::cast_precision_loss,
    reason = "counts and byte totals are far below 2^52"
)]
fn rate(m: &Measured) -> Option<f64> {
    (m.client.elapsed_s > 0.0).then(|| m.client.ops as f64 / m.client.elapsed_s)
}

#[expect(
    clippy::cast_precision_loss,
    reason = "counts and byte totals are far below 2^52"
)]
fn gbits(m: &Measured) -> Option<f64> {
    (m.client.elapsed_s > 0.0).then(|| m.client.bytes as f64 * 8.0 / m.client.elapsed_s / 1e9)
}

fn p50(m: &Measured) -> Option<f64> {
    m.client.latency.map(|l| l.p50)
}
fn p99(m: &Measured) -> Option<f64> {
    m.client.latency.map(|l| l.p99)
}
fn p999(m: &Measured) -> Option<f64> {
    m.client.latency.map(|l| l.p999)
}
fn lo_per_op(m: &Measured) -> Option<f64> {
    per_op(m.client.lo_tx_packets, m)
}
fn conntrack_per_conn(m: &Measured) -> Option<f64> {
    let (b, a) = (m.client.conntrack_before?, m.client.conntrack_after?);
    per_op(a.saturating_sub(b), m)
}
fn cpu_total_us(m: &Measured) -> Option<f64> {
    per_op(m.client.cpu_ns + m.proxy_cpu_ns + m.server_cpu_ns, m).map(|ns| ns / 1000.0)
}
fn cpu_proxy_us(m: &Measured) -> Option<f64> {
    per_op(m.proxy_cpu_ns, m).map(|ns| ns / 1000.0)
}
#[expect(clippy::unnecessary_wraps, reason = "the shape of every metric getter")]
fn stall_ms(m: &Measured) -> Option<f64> {
    Some(m.client.longest_stall_us / 1000.0)
}
#[expect(clippy::cast_precision_loss, reason = "KiB counts are far below 2^52")]
#[expect(clippy::unnecessary_wraps, reason = "the shape of every metric getter")]
fn tcp_mem_mib(m: &Measured) -> Option<f64> {
    Some(m.tcp_mem_peak_kib as f64 / 1024.0)
}
fn late_share(m: &Measured) -> Option<f64> {
    per_op(m.client.late_sends, m).map(|v| v * 100.0)
}

const fn metric(
    key: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    get: fn(&Measured) -> Option<f64>,
) -> Metric {
    Metric {
        key,
        unit,
        higher_is_better,
        get,
    }
}

pub const TPS: Metric = metric("transactions/s", "/s", true, rate);
pub const REQS: Metric = metric("requests/s achieved", "/s", true, rate);
pub const CONNS: Metric = metric("connections/s", "/s", true, rate);
pub const GBITS: Metric = metric("throughput", "Gbit/s", true, gbits);
pub const P50: Metric = metric("p50", "µs", false, p50);
pub const P99: Metric = metric("p99", "µs", false, p99);
pub const P999: Metric = metric("p99.9", "µs", false, p999);
pub const LO: Metric = metric("lo packets/op", "", false, lo_per_op);
pub const CONNTRACK: Metric = metric("conntrack entries/conn", "", false, conntrack_per_conn);
pub const CPU: Metric = metric("CPU/request (all)", "µs", false, cpu_total_us);
pub const CPU_PROXY: Metric = metric("CPU/request (proxy)", "µs", false, cpu_proxy_us);
pub const STALL: Metric = metric("longest stall", "ms", false, stall_ms);
pub const TCP_MEM: Metric = metric("kernel TCP memory peak", "MiB", false, tcp_mem_mib);
pub const LATE: Metric = metric("sent late (>1 ms)", "%", false, late_share);

/// The metrics reported for a cell, headline first.
pub fn metrics(cell: Cell) -> Vec<Metric> {
    match cell {
        Cell::S1 => vec![TPS, P50, P99, P999, LO],
        Cell::S2 => vec![P50, P99, P999, REQS, CPU, CPU_PROXY, LO, LATE],
        Cell::S4 => vec![CONNS, P50, P99, P999, LO, CONNTRACK],
        Cell::S5(_) => vec![GBITS, TCP_MEM],
        Cell::S6(_) => vec![GBITS, STALL, TCP_MEM],
    }
}

/// Rounds at or above which the spread shown is the interquartile range
/// (below: min–max, as quartiles of a handful of values mean little).
pub const IQR_FROM: usize = 5;

/// The median of some rounds and their spread.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    pub median: f64,
    /// The spread shown: 25th–75th percentile with at least [`IQR_FROM`]
    /// values, else min–max.
    pub lo: f64,
    pub hi: f64,
    pub n: usize,
}

/// The q-quantile of sorted values, interpolated linearly.
#[expect(clippy::cast_precision_loss, reason = "a handful of rounds")]
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "an index within the slice"
)]
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (i, frac) = (pos.floor() as usize, pos.fract());
    match sorted.get(i + 1) {
        Some(next) => sorted[i] + (next - sorted[i]) * frac,
        None => sorted[i],
    }
}

pub fn spread(values: &[f64]) -> Option<Spread> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let (lo, hi) = if n >= IQR_FROM {
        (quantile(&v, 0.25), quantile(&v, 0.75))
    } else {
        (v[0], v[n - 1])
    };
    Some(Spread {
        median: quantile(&v, 0.5),
        lo,
        hi,
        n,
    })
}

/// A paired ratio over rounds, and the rounds it could not use.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ratio {
    pub spread: Option<Spread>,
    /// Rounds left out because a sockmap mode fell back to TCP.
    pub fell_back: usize,
    /// Rounds in which the numerator's or the denominator's cell failed.
    pub failed_num: usize,
    pub failed_den: usize,
}

/// Samples indexed by (cell, mode, round).
pub struct Table<'a> {
    by: BTreeMap<(Cell, Mode, u32), &'a Sample>,
}

impl<'a> Table<'a> {
    pub fn new(samples: &'a [Sample]) -> Self {
        Self {
            by: samples
                .iter()
                .map(|s| ((s.cell, s.mode, s.round), s))
                .collect(),
        }
    }

    pub fn sample(&self, cell: Cell, mode: Mode, round: u32) -> Option<&'a Sample> {
        self.by.get(&(cell, mode, round)).copied()
    }

    fn rounds(&self) -> impl Iterator<Item = u32> + '_ {
        let mut r: Vec<u32> = self.by.keys().map(|k| k.2).collect();
        r.sort_unstable();
        r.dedup();
        r.into_iter()
    }

    /// Per-round values of a metric (rounds that failed are left out).
    pub fn values(&self, cell: Cell, mode: Mode, metric: &Metric) -> Vec<f64> {
        self.rounds()
            .filter_map(|r| self.value(cell, mode, r, metric))
            .collect()
    }

    fn value(&self, cell: Cell, mode: Mode, round: u32, metric: &Metric) -> Option<f64> {
        let s = self.sample(cell, mode, round)?;
        (metric.get)(s.result.as_ref().ok()?)
    }

    pub fn spread(&self, cell: Cell, mode: Mode, metric: &Metric) -> Option<Spread> {
        spread(&self.values(cell, mode, metric))
    }

    /// `a / b` per round (the two ran within seconds of each other), over
    /// the rounds where both produced a number and neither fell back from
    /// the sockmap; and how many rounds were left out, and why.
    pub fn ratio(&self, cell: Cell, a: Mode, b: Mode, metric: &Metric) -> Ratio {
        let mut v = Vec::new();
        let mut out = Ratio::default();
        for r in self.rounds() {
            let (Some(sa), Some(sb)) = (self.sample(cell, a, r), self.sample(cell, b, r)) else {
                continue;
            };
            out.failed_num += usize::from(sa.result.is_err());
            out.failed_den += usize::from(sb.result.is_err());
            if sa.fell_back() || sb.fell_back() {
                out.fell_back += 1;
                continue;
            }
            if let (Some(x), Some(y)) = (
                self.value(cell, a, r, metric),
                self.value(cell, b, r, metric),
            ) && y > 0.0
            {
                v.push(x / y);
            }
        }
        out.spread = spread(&v);
        out
    }

    /// Rounds of `cell` in which `mode` fell back from the sockmap.
    pub fn fallbacks(&self, cell: Cell, mode: Mode) -> usize {
        self.rounds()
            .filter(|&r| self.sample(cell, mode, r).is_some_and(Sample::fell_back))
            .count()
    }

    /// Rounds of `cell` in which the backpressure switched at least one
    /// of `mode`'s sockets to TCP, and how many sockets in all.
    pub fn spills(&self, cell: Cell, mode: Mode) -> (usize, u64) {
        self.rounds()
            .filter_map(|r| self.sample(cell, mode, r))
            .map(Sample::spilled)
            .filter(|&n| n > 0)
            .fold((0, 0), |(rounds, sockets), n| (rounds + 1, sockets + n))
    }

    /// Rounds of `cell` in which `mode` failed (no numbers).
    pub fn failures(&self, cell: Cell, mode: Mode) -> usize {
        self.rounds()
            .filter(|&r| {
                self.sample(cell, mode, r)
                    .is_some_and(|s| s.result.is_err())
            })
            .count()
    }

    /// A datapath counter (derived per cell) over rounds.
    pub fn counter(
        &self,
        cell: Cell,
        mode: Mode,
        get: fn(&super::Counters, &Measured) -> f64,
    ) -> Option<Spread> {
        self.over_rounds(cell, mode, |m| Some(get(m.counters.as_ref()?, m)))
    }

    /// A built-in proxy counter (derived per cell) over rounds.
    pub fn proxy_ways(
        &self,
        cell: Cell,
        mode: Mode,
        get: fn(&super::ProxyWays) -> f64,
    ) -> Option<Spread> {
        self.over_rounds(cell, mode, |m| Some(get(m.proxy.as_ref()?)))
    }

    /// [`Self::counter`] over the rounds where `get` has a value.
    pub fn counter_some(
        &self,
        cell: Cell,
        mode: Mode,
        get: fn(&super::Counters) -> Option<f64>,
    ) -> Option<Spread> {
        self.over_rounds(cell, mode, |m| get(m.counters.as_ref()?))
    }

    /// What `get` derives from each round's measurement of `cell` in
    /// `mode`, over the rounds that measured it and where it has a value.
    fn over_rounds(
        &self,
        cell: Cell,
        mode: Mode,
        get: impl Fn(&Measured) -> Option<f64>,
    ) -> Option<Spread> {
        let v: Vec<f64> = self
            .rounds()
            .filter_map(|r| get(self.sample(cell, mode, r)?.result.as_ref().ok()?))
            .collect();
        spread(&v)
    }
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn median_and_range() {
        let s = spread(&[3.0, 1.0, 2.0]).unwrap();
        assert!((s.median - 2.0).abs() < 1e-9);
        assert!((s.lo - 1.0).abs() < 1e-9 && (s.hi - 3.0).abs() < 1e-9);
        let s = spread(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert!((s.median - 2.5).abs() < 1e-9);
        assert!(
            (s.lo - 1.0).abs() < 1e-9 && (s.hi - 4.0).abs() < 1e-9,
            "min–max below 5"
        );
        let s = spread(&[5.0, 1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!((s.median - 3.0).abs() < 1e-9);
        assert!(
            (s.lo - 2.0).abs() < 1e-9 && (s.hi - 4.0).abs() < 1e-9,
            "IQR from 5"
        );
        assert!(spread(&[]).is_none());
        assert!(spread(&[f64::NAN]).is_none());
    }
}
