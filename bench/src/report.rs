//! Output: the summary table printed at the end of a run, and SVG charts (plotters' SVG
//! backend only, no system fonts or libraries needed).

use std::{ops::Range, path::Path};

use plotters::{
    coord::{
        Shift,
        ranged1d::{AsRangedCoord, ValueFormatter},
    },
    prelude::*,
};

/// A two-column summary table.
#[derive(Debug, Default, Clone)]
pub struct Table {
    pub title: String,
    pub rows: Vec<(String, String)>,
}

impl Table {
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.rows.push((key.into(), value.into()));
        self
    }

    pub fn render(&self) -> String {
        let kw = self.rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let vw = self.rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
        let line = format!("+-{}-+-{}-+\n", "-".repeat(kw), "-".repeat(vw));
        let mut out = format!("{}\n{line}", self.title);
        for (k, v) in &self.rows {
            out += &format!("| {k:<kw$} | {v:>vw$} |\n");
        }
        out += &line;
        out
    }
}

/// One line on a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
        }
    }
}

/// How a panel's x axis is labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XAxis {
    Linear,
    /// x is "nines" (-log10(1 - q)); labels show the percentile.
    Nines,
}

/// One chart panel (panels stack vertically in one SVG).
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_y: bool,
    pub x_axis: XAxis,
    pub series: Vec<Series>,
}

impl Panel {
    pub fn new(title: impl Into<String>, x_label: &str, y_label: &str) -> Self {
        Self {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            log_y: false,
            x_axis: XAxis::Linear,
            series: Vec::new(),
        }
    }

    pub fn log_y(mut self) -> Self {
        self.log_y = true;
        self
    }

    pub fn nines(mut self) -> Self {
        self.x_axis = XAxis::Nines;
        self
    }

    pub fn with(mut self, s: Series) -> Self {
        self.series.push(s);
        self
    }
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

/// Percentile → "nines" (the x of a latency-by-percentile chart).
pub fn nines(percentile: f64) -> f64 {
    -(1.0 - percentile / 100.0).max(1e-9).log10()
}

fn nines_label(x: &f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    if p < 99.0 {
        format!("{p:.0}%")
    } else {
        // 99%, 99.9%, 99.99% ...
        let digits = (x.round() as usize).saturating_sub(2);
        format!("{p:.digits$}%")
    }
}

/// Writes panels as one SVG file.
pub fn write_svg(path: &Path, title: &str, panels: &[Panel]) -> anyhow::Result<()> {
    let panels: Vec<&Panel> = panels
        .iter()
        .filter(|p| p.series.iter().any(|s| !s.points.is_empty()))
        .collect();
    if panels.is_empty() {
        anyhow::bail!("nothing to chart");
    }
    let height = 40 + 330 * panels.len() as u32;
    let root = SVGBackend::new(path, (960, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(err)?;
    let areas = root.split_evenly((panels.len(), 1));
    for (area, panel) in areas.iter().zip(panels) {
        let pts = panel.series.iter().flat_map(|s| s.points.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        if panel.log_y {
            let lo = panel
                .series
                .iter()
                .flat_map(|s| s.points.iter().map(|p| p.1))
                .filter(|y| *y > 0.0)
                .fold(f64::MAX, f64::min);
            let lo = if lo == f64::MAX { 0.001 } else { lo / 1.5 };
            let hi = (y1 * 1.5).max(lo * 10.0);
            draw_panel(area, panel, x0..x1, (lo..hi).log_scale(), Some(lo))?;
        } else {
            let hi = if y1 <= 0.0 { 1.0 } else { y1 * 1.1 };
            draw_panel(area, panel, x0..x1, 0.0..hi, None)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("chart: {e}")
}

fn draw_panel<DB, Y>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    x: Range<f64>,
    y: Y,
    floor: Option<f64>,
) -> anyhow::Result<()>
where
    DB: DrawingBackend,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)
        .map_err(err)?;
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(panel.x_label.as_str())
        .y_desc(panel.y_label.as_str())
        .light_line_style(WHITE.mix(0.0));
    let x_fmt = |v: &f64| {
        if v.abs() >= 1e4 {
            crate::ui::si(*v)
        } else {
            format!("{v}")
        }
    };
    let y_fmt = |v: &f64| crate::ui::si(*v);
    if panel.x_axis == XAxis::Nines {
        mesh.x_label_formatter(&nines_label);
    } else {
        mesh.x_label_formatter(&x_fmt);
    }
    mesh.y_label_formatter(&y_fmt);
    mesh.draw().map_err(err)?;
    for (i, s) in panel.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let points: Vec<(f64, f64)> = s
            .points
            .iter()
            .map(|&(x, y)| (x, floor.map_or(y, |f| y.max(f))))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(err)?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns() {
        let mut t = Table::new("t");
        t.row("a", "1").row("long key", "12345");
        let r = t.render();
        assert!(r.contains("| a        |     1 |"), "{r}");
    }

    #[test]
    fn nines_labels() {
        assert_eq!(nines_label(&nines(90.0)), "90%");
        assert_eq!(nines_label(&nines(99.9)), "99.9%");
        assert_eq!(nines_label(&nines(50.0)), "50%");
    }

    #[test]
    fn writes_an_svg() {
        let dir = std::env::temp_dir().join(format!("parley-bench-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.svg");
        let panels = [
            Panel::new("throughput", "s", "msgs/s")
                .with(Series::new("a", vec![(0.0, 1.0), (1.0, 3.0)])),
            Panel::new("latency", "percentile", "ms")
                .log_y()
                .nines()
                .with(Series::new("b", vec![(0.0, 0.5), (3.0, 40.0)])),
        ];
        write_svg(&path, "test", &panels).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("throughput"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
