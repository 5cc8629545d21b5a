//! The pictures BENCHMARKS.md shows: SVG drawn with plotters, beside the report (`docs/bench/`),
//! their text left to the viewer's fonts.
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use plotters::prelude::*;

/// One line of a chart: its name and its points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.into(),
            points,
        }
    }
}

/// Where the pictures of the report at `out` go, and the path the report names them by.
pub fn place(out: &Path, file: &str) -> anyhow::Result<(PathBuf, String)> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join("docs/bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok((dir.join(file), format!("docs/bench/{file}")))
}

fn fail(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing: {e}")
}

/// Where a chart's legend goes: where its lines are not.
pub use plotters::chart::SeriesLabelPosition as Legend;

/// A chart of `series` against the number of rules, both axes logarithmic when `log_y`, else
/// the rules only.
pub fn by_rules(
    path: &Path,
    title: &str,
    y_desc: &str,
    series: &[Series],
    (log_y, legend): (bool, Legend),
) -> anyhow::Result<()> {
    let points = || series.iter().flat_map(|s| s.points.iter().copied());
    let x_min = points().map(|p| p.0).fold(f64::MAX, f64::min);
    let x_max = points().map(|p| p.0).fold(0.0, f64::max);
    let y_min = points().map(|p| p.1).fold(f64::MAX, f64::min);
    let y_max = points().map(|p| p.1).fold(0.0, f64::max);
    anyhow::ensure!(x_max > 0.0 && y_max > 0.0, "{title}: nothing to draw");
    let root = SVGBackend::new(path, (760, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(fail)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70);
    let x_range = (x_min / 1.5..x_max * 1.5).log_scale();
    let rules = |x: &f64| match *x {
        x if x >= 1e6 => format!("{}M", x / 1e6),
        x if x >= 1e3 => format!("{}k", x / 1e3),
        x => format!("{x}"),
    };
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("rules")
                .y_desc(y_desc)
                .x_label_formatter(&rules)
                .y_label_formatter(&|y| format!("{y:.0}"))
                .max_light_lines(1)
                .draw()
                .map_err(fail)?;
            for (i, s) in series.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))
                    .map_err(fail)?
                    .label(s.name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(fail)?;
            }
            chart
                .configure_series_labels()
                .position(legend.clone())
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .draw()
                .map_err(fail)?;
        }};
    }
    if log_y {
        draw!(
            builder
                .build_cartesian_2d(x_range, (y_min / 1.5..y_max * 1.5).log_scale())
                .map_err(fail)?
        );
    } else {
        draw!(
            builder
                .build_cartesian_2d(x_range, 0.0..y_max * 1.15)
                .map_err(fail)?
        );
    }
    root.present().map_err(fail)?;
    Ok(())
}

/// Horizontal bars, one a line, each with its value written beside it; the first bar is the
/// reference the others are read against.
pub fn bars(path: &Path, title: &str, x_desc: &str, bars: &[(String, f64)]) -> anyhow::Result<()> {
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max);
    anyhow::ensure!(max > 0.0, "{title}: nothing to draw");
    let height = 90 + 46 * bars.len() as u32;
    let root = SVGBackend::new(path, (760, height)).into_drawing_area();
    root.fill(&WHITE).map_err(fail)?;
    let n = bars.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(10)
        .build_cartesian_2d(0.0..max * 1.25, 0.0..n)
        .map_err(fail)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .disable_y_mesh()
        .disable_y_axis()
        .draw()
        .map_err(fail)?;
    for (i, (name, value)) in bars.iter().enumerate() {
        let y = n - i as f64 - 1.0;
        let color = if i == 0 {
            RGBColor(120, 120, 120).to_rgba()
        } else {
            Palette99::pick(i).to_rgba()
        };
        chart
            .draw_series([Rectangle::new(
                [(0.0, y + 0.15), (*value, y + 0.6)],
                color.mix(0.8).filled(),
            )])
            .map_err(fail)?;
        chart
            .draw_series([Text::new(
                format!("{name}: {value:.0}"),
                (max * 0.01, y + 0.9),
                ("sans-serif", 14).into_font(),
            )])
            .map_err(fail)?;
    }
    root.present().map_err(fail)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The charts are SVG with their titles, axis names, series and values in them.
    #[test]
    fn charts_name_what_they_show() {
        let dir = std::env::temp_dir().join(format!("tcpmgm-plots-{}", std::process::id()));
        let (path, link) = place(&dir.join("REPORT.md"), "t.svg").unwrap();
        assert_eq!(link, "docs/bench/t.svg");
        by_rules(
            &path,
            "Cold start",
            "ms",
            &[
                Series::new("flat", vec![(1e3, 80.0), (1e5, 200.0), (1e6, 1600.0)]),
                Series::new("nested", vec![(1e3, 90.0), (1e5, 210.0), (1e6, 1400.0)]),
            ],
            (true, Legend::UpperLeft),
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for text in [
            "<svg",
            "Cold start",
            "rules",
            "ms",
            "flat",
            "nested",
            "1M",
            "100k",
        ] {
            assert!(svg.contains(text), "{text} missing from {svg}");
        }
        bars(
            &path,
            "Rate",
            "connections/s",
            &[("no programs".into(), 100.0), ("tcpmgm".into(), 90.0)],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for text in ["Rate", "no programs: 100", "tcpmgm: 90", "connections/s"] {
            assert!(svg.contains(text), "{text} missing from {svg}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
