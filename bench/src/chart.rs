//! One PNG chart per workload: a panel per headline metric, a bar per path at its median with a whisker
//! from min to max. Text is drawn with plotters' ab_glyph renderer from DejaVu Sans read from a file
//! (Debian's fonts-dejavu-core, which `cargo xtask bench` installs), so no fontconfig or FreeType is
//! involved and a fresh Debian machine draws the same charts.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use plotters::coord::Shift;
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::FontStyle;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::Workload;
use crate::proxy::PathKind;
use crate::report::{Record, fmt_num};

/// DejaVu Sans (Bitstream Vera licence, free to use and redistribute), from fonts-dejavu-core.
pub const FONT_FILE: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// The family name the charts ask plotters for.
const FAMILY: &str = "sans-serif";

/// The metrics charted per workload: (workload, metric, panel title).
const PANELS: &[(Workload, &str, &str)] = &[
    (
        Workload::Bulk,
        "mb_s",
        "throughput each way (higher is better)",
    ),
    (
        Workload::Paced,
        "cpu_s_per_gb",
        "machine CPU per GB (lower is better)",
    ),
    (
        Workload::Paced,
        "proxy_cpu_s_per_gb",
        "proxy CPU per GB (lower is better)",
    ),
    (Workload::Rpc, "req_s", "requests/s (higher is better)"),
    (Workload::Rpc, "p99_us", "p99 latency (lower is better)"),
    (
        Workload::Connect,
        "conn_s",
        "connections/s (higher is better)",
    ),
    (
        Workload::Idle,
        "rss_kib_per_flow",
        "proxy RSS per flow (lower is better)",
    ),
    (
        Workload::Idle,
        "kernel_kib_per_flow",
        "kernel memory per flow (lower is better)",
    ),
];

/// Registers the font once; an error says which package provides it.
fn ensure_font() -> Result<()> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let bytes = std::fs::read(FONT_FILE).map_err(|e| {
            format!(
                "read the chart font {FONT_FILE}: {e} (apt-get install fonts-dejavu-core, or run \
                 `cargo xtask bench`, which installs it)"
            )
        })?;
        // plotters keeps the font for the life of the process; one leaked copy (~750 KiB) per process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FAMILY, FontStyle::Normal, bytes)
            .map_err(|_| format!("{FONT_FILE} is not a font ab_glyph can read"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

fn color(path: &str) -> RGBColor {
    match path {
        "direct" => RGBColor(140, 140, 140),
        "sockmap" => RGBColor(31, 119, 180),
        "userspace" => RGBColor(120, 180, 230),
        "haproxy" => RGBColor(255, 127, 14),
        "nginx" => RGBColor(44, 160, 44),
        _ => RGBColor(148, 103, 189),
    }
}

/// Writes `<dir>/<workload>.png` for every workload with data; returns the files written.
pub fn write_all(
    dir: &Path,
    records: &[Record],
    paths: &[PathKind],
    workloads: &[Workload],
    subtitle: &str,
) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for &wl in workloads {
        let file = dir.join(format!("{}.png", wl.as_str()));
        if draw(&file, wl, records, paths, subtitle)? {
            written.push(file);
        }
    }
    Ok(written)
}

/// Draws one workload's chart; false (and no file) when no record of it has data.
pub fn draw(
    file: &Path,
    wl: Workload,
    records: &[Record],
    paths: &[PathKind],
    subtitle: &str,
) -> Result<bool> {
    let panels: Vec<(&str, &str, Vec<&Record>)> = PANELS
        .iter()
        .filter(|(w, _, _)| *w == wl)
        .map(|&(_, metric, title)| {
            let rows = paths
                .iter()
                .filter_map(|p| {
                    records.iter().find(|r| {
                        r.path == p.as_str() && r.workload == wl.as_str() && r.metric == metric
                    })
                })
                .collect::<Vec<_>>();
            (metric, title, rows)
        })
        .filter(|(_, _, rows)| !rows.is_empty())
        .collect();
    if panels.is_empty() {
        return Ok(false);
    }
    ensure_font()?;
    // A single panel is wider than its share of two: the figure's title has to fit above it.
    let (w, h) = ((460 * panels.len() as u32).max(600), 400);
    let root = BitMapBackend::new(file, (w, h)).into_drawing_area();
    let plot = || -> Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        let title = format!("{} — median, whiskers min to max ({subtitle})", wl.as_str());
        let body = root.titled(&title, (FAMILY, 18))?;
        for (area, (metric, title, rows)) in
            body.split_evenly((1, panels.len())).iter().zip(&panels)
        {
            panel(area, metric, title, rows)?;
        }
        root.present()?;
        Ok(())
    };
    if let Err(e) = plot() {
        bail!("draw {}: {e}", file.display());
    }
    let size = std::fs::metadata(file)
        .with_context(|| format!("the chart {} was not written", file.display()))?
        .len();
    anyhow::ensure!(size > 0, "the chart {} is empty", file.display());
    Ok(true)
}

fn panel<'a>(
    area: &DrawingArea<BitMapBackend<'a>, Shift>,
    metric: &str,
    title: &str,
    rows: &[&Record],
) -> Result<(), Box<dyn std::error::Error + 'a>> {
    let top = rows
        .iter()
        .map(|r| r.max.max(r.median))
        .fold(0.0f64, f64::max);
    let bottom = rows
        .iter()
        .map(|r| r.min.min(r.median))
        .fold(0.0f64, f64::min);
    // Room above the tallest whisker for its value label; a flat zero chart still gets a scale.
    let top = if top > 0.0 { top * 1.18 } else { 1.0 };
    let bottom = if bottom < 0.0 { bottom * 1.18 } else { 0.0 };
    // Axis labels with as many decimals as the scale needs (not per label, which reads unevenly).
    let decimals = if top >= 50.0 {
        0
    } else if top >= 5.0 {
        1
    } else {
        2
    };
    let unit = rows.first().map_or("", |r| r.unit.as_str()).to_string();
    let names: Vec<String> = rows.iter().map(|r| r.path.clone()).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, 15))
        .margin(12)
        .x_label_area_size(28)
        .y_label_area_size(62)
        // plotters' integer ranges include their end: 0..n-1 gives one segment per row (0..n
        // left an empty slot on the right).
        .build_cartesian_2d(
            (0..rows.len().saturating_sub(1)).into_segmented(),
            bottom..top,
        )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                names.get(*i).cloned().unwrap_or_default()
            }
            SegmentValue::Last => String::new(),
        })
        .y_desc(format!("{metric} ({unit})"))
        .y_label_formatter(&|v| format!("{v:.*}", decimals))
        .label_style((FAMILY, 13))
        .axis_desc_style((FAMILY, 13))
        .draw()?;
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (
                    if i + 1 == rows.len() {
                        SegmentValue::Last
                    } else {
                        SegmentValue::Exact(i + 1)
                    },
                    r.median,
                ),
            ],
            color(&r.path).filled(),
        );
        bar.set_margin(0, 0, 14, 14);
        bar
    }))?;
    // Whiskers: a line from min to max with a cap (pixel offsets around the anchor) at each end.
    let whisker = BLACK.stroke_width(2);
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        PathElement::new(
            vec![
                (SegmentValue::CenterOf(i), r.min),
                (SegmentValue::CenterOf(i), r.max),
            ],
            whisker,
        )
    }))?;
    chart.draw_series(rows.iter().enumerate().flat_map(|(i, r)| {
        [r.min, r.max].map(|y| {
            EmptyElement::at((SegmentValue::CenterOf(i), y))
                + PathElement::new(vec![(-8, 0), (8, 0)], whisker)
        })
    }))?;
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        EmptyElement::at((SegmentValue::CenterOf(i), r.max.max(r.median)))
            + Text::new(
                fmt_num(r.median),
                (0, -4),
                (FAMILY, 13)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
            )
    }))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(path: &str, wl: &str, metric: &str, med: f64, min: f64, max: f64) -> Record {
        Record {
            path: path.into(),
            workload: wl.into(),
            metric: metric.into(),
            median: med,
            min,
            max,
            unit: "MB/s".into(),
            runs: 3,
        }
    }

    #[test]
    fn writes_a_valid_png_per_workload_with_data() {
        let dir = tempfile::tempdir().expect("temp dir");
        let records = vec![
            rec("direct", "bulk", "mb_s", 324.0, 320.0, 345.0),
            rec("sockmap", "bulk", "mb_s", 83.0, 80.0, 93.0),
            rec("haproxy", "bulk", "mb_s", 273.0, 270.0, 277.0),
            rec("sockmap", "idle", "rss_kib_per_flow", 1.5, 1.2, 1.9),
            rec("sockmap", "idle", "kernel_kib_per_flow", 9.0, 8.0, 10.0),
            rec("direct", "idle", "kernel_kib_per_flow", -0.5, -1.0, 4.0),
        ];
        let written = write_all(
            dir.path(),
            &records,
            &crate::proxy::ALL_PATHS,
            &crate::ALL_WORKLOADS,
            "unit test",
        )
        .expect("charts drawn");
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["bulk.png", "idle.png"], "only workloads with data");
        for f in &written {
            let bytes = std::fs::read(f).expect("chart readable");
            assert!(
                bytes.len() > 1000,
                "{} is {} bytes",
                f.display(),
                bytes.len()
            );
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
            // IHDR: width and height as written (two panels for idle).
            let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
            let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
            assert_eq!(h, 400);
            assert!(w == 600 || w == 920, "width {w}");
        }
        assert!(!dir.path().join("paced.png").exists());
    }
}
