//! The SVG chart: every mode relative to M1 (iptables + built-in proxy) in
//! the same round, throughput on top, p99 latency and CPU below; bars are
//! medians of the per-round ratios, whiskers their interquartile range
//! (min–max below 5 rounds).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use super::{
    Cell, Mode, Plan,
    stats::{self, Metric, Table},
};

const WIDTH: u32 = 1280;
const LEGEND_HEIGHT: u32 = 70;
const PANEL_HEIGHT: u32 = 470;

fn color(m: Mode) -> RGBColor {
    match m {
        Mode::M0 => RGBColor(150, 150, 150),
        Mode::M1 => RGBColor(0, 0, 0),
        Mode::M2 => RGBColor(240, 150, 40),
        Mode::M3 => RGBColor(30, 100, 200),
        Mode::H1 => RGBColor(150, 210, 140),
        Mode::H3 => RGBColor(40, 150, 70),
        Mode::M1S => RGBColor(120, 60, 60),
    }
}

struct Item {
    label: String,
    cell: Cell,
    metric: Metric,
}

pub fn draw(path: &Path, plan: &Plan, t: &Table) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, (WIDTH, LEGEND_HEIGHT + 2 * PANEL_HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (legend_area, panels) = root.split_vertically(LEGEND_HEIGHT);
    let (top, bottom) = panels.split_vertically(PANEL_HEIGHT);
    legend(&legend_area, plan).map_err(|e| err(&e))?;
    let mut throughput = Vec::new();
    let mut latency = Vec::new();
    for &cell in &plan.cells {
        let short = short_label(cell);
        match cell {
            Cell::S2 => {
                latency.push(Item {
                    label: format!("{short} p99"),
                    cell,
                    metric: stats::P99,
                });
                latency.push(Item {
                    label: format!("{short} CPU/req"),
                    cell,
                    metric: stats::CPU,
                });
            }
            Cell::S1 | Cell::S4 => {
                throughput.push(Item {
                    label: short.clone(),
                    cell,
                    metric: stats::metrics(cell)[0],
                });
                latency.push(Item {
                    label: format!("{short} p99"),
                    cell,
                    metric: stats::P99,
                });
            }
            Cell::S5(_) | Cell::S6(_) => throughput.push(Item {
                label: short,
                cell,
                metric: stats::GBITS,
            }),
        }
    }
    panel(
        &root,
        &top,
        "Throughput (higher is better)",
        &throughput,
        plan,
        t,
    )
    .map_err(|e| err(&e))?;
    panel(
        &root,
        &bottom,
        "p99 latency and CPU per request (lower is better)",
        &latency,
        plan,
        t,
    )
    .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn short_label(cell: Cell) -> String {
    match cell {
        Cell::S1 => "S1 1B RR".into(),
        Cell::S2 => "S2".into(),
        Cell::S4 => "S4 conn/req".into(),
        Cell::S5(w) => format!("S5 {}K", w / super::KIB),
        Cell::S6(b) => format!("S6 {}MB", b / super::MB),
    }
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// The modes drawn relative to M1: every one but M1.
fn against_m1(plan: &Plan) -> Vec<Mode> {
    plan.modes
        .iter()
        .copied()
        .filter(|&m| m != Mode::M1)
        .collect()
}

/// The modes and their colours, in two columns above the panels.
fn legend(area: &Area<'_>, plan: &Plan) -> Result<(), Box<dyn std::error::Error>> {
    let font = ("sans-serif", 14).into_font();
    let modes = against_m1(plan);
    area.draw(&Text::new(
        "Each bar: median over rounds of (mode / M1 in the same round); whisker: 25th–75th percentile (min–max below 5 rounds); log scale, 1× = M1 (iptables + built-in proxy)",
        (20, 6),
        font.clone(),
    ))?;
    for (i, m) in modes.iter().enumerate() {
        let (col, row) = (
            i32::try_from(i % 3).unwrap_or(0),
            i32::try_from(i / 3).unwrap_or(0),
        );
        let (x, y) = (20 + col * 420, 28 + row * 20);
        area.draw(&Rectangle::new(
            [(x, y + 2), (x + 14, y + 14)],
            color(*m).filled(),
        ))?;
        area.draw(&Text::new(
            format!("{m}: {}", m.describe().replace('`', "")),
            (x + 20, y),
            ("sans-serif", 13).into_font(),
        ))?;
    }
    Ok(())
}

#[expect(clippy::cast_precision_loss, reason = "a handful of bars and modes")]
fn panel(
    root: &Area<'_>,
    area: &Area<'_>,
    title: &str,
    items: &[Item],
    plan: &Plan,
    table: &Table,
) -> Result<(), Box<dyn std::error::Error>> {
    let modes = against_m1(plan);
    if items.is_empty() || modes.is_empty() || !plan.modes.contains(&Mode::M1) {
        area.draw(&Text::new(
            format!("{title}: nothing to compare with M1"),
            (20, 20),
            ("sans-serif", 18),
        ))?;
        return Ok(());
    }
    // (item, mode) → (median, min, max) of the per-round ratio to M1.
    let bars: Vec<Vec<Option<(f64, f64, f64)>>> = items
        .iter()
        .map(|it| {
            modes
                .iter()
                .map(|&m| {
                    table
                        .ratio(it.cell, m, Mode::M1, &it.metric)
                        .spread
                        .map(|s| (s.median, s.lo, s.hi))
                        .filter(|b| b.1 > 0.0)
                })
                .collect()
        })
        .collect();
    let all = || bars.iter().flatten().flatten();
    let hi = all().map(|b| b.2).fold(2.0_f64, f64::max).min(64.0) * 1.3;
    let lo = all().map(|b| b.1).fold(0.5_f64, f64::min).max(1.0 / 64.0) / 1.3;
    let clamp = |v: f64| v.clamp(lo, hi);
    let n_items = items.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..n_items, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .x_labels(0)
        .light_line_style(TRANSPARENT)
        .y_desc("ratio to M1 (log scale)")
        .y_label_formatter(&|v| {
            if *v >= 1.0 {
                format!("{v:.0}×")
            } else {
                format!("{v:.2}×")
            }
        })
        .draw()?;
    let bar_w = 0.8 / modes.len() as f64;
    for (j, &m) in modes.iter().enumerate() {
        let c = color(m);
        let x0 = |i: usize| i as f64 + 0.1 + j as f64 * bar_w;
        // Bars grow from 1× (M1) up or down to the median ratio.
        chart.draw_series(bars.iter().enumerate().filter_map(|(i, b)| {
            let (med, _, _) = b[j]?;
            Some(Rectangle::new(
                [(x0(i), 1.0), (x0(i) + bar_w * 0.9, clamp(med))],
                c.filled(),
            ))
        }))?;
        chart.draw_series(bars.iter().enumerate().filter_map(|(i, b)| {
            let (_, min, max) = b[j]?;
            let xm = x0(i) + bar_w * 0.45;
            Some(PathElement::new(
                vec![(xm, clamp(min)), (xm, clamp(max))],
                BLACK.stroke_width(1),
            ))
        }))?;
        let label_style = TextStyle::from(("sans-serif", 10).into_font())
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        chart.draw_series(bars.iter().enumerate().filter_map(|(i, b)| {
            let (med, _, max) = b[j]?;
            let xm = x0(i) + bar_w * 0.45;
            Some(Text::new(
                format!("{med:.2}"),
                (xm, clamp(max.max(med).max(1.0)) * 1.04),
                label_style.clone(),
            ))
        }))?;
    }
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(0.0, 1.0), (n_items, 1.0)],
        BLACK.stroke_width(2),
    )))?;
    let style =
        TextStyle::from(("sans-serif", 14).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (i, it) in items.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64 + 0.5, lo));
        root.draw(&Text::new(it.label.clone(), (x, y + 8), style.clone()))?;
    }
    Ok(())
}
