//! One chart kind: lines and/or stacked areas over steps, with an optional right-hand axis.

use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

/// DejaVu Sans (see the module doc of `plot`).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Named (step, value) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// What one PNG shows.
pub struct Chart {
    pub title: String,
    pub y_label: String,
    /// Drawn as lines on the left axis.
    pub lines: Vec<Series>,
    /// Drawn stacked, first at the bottom, on the left axis.
    pub stacked: Vec<Series>,
    /// Drawn as a dashed line on the right axis.
    pub secondary: Option<Series>,
}

const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The file is compiled in and known to parse; a failure here is a broken build.
        if plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            panic!("assets/fonts/DejaVuSans.ttf is not a font");
        }
    });
}

/// Each stacked series' values added to those below it, by step.
fn cumulative(stacked: &[Series]) -> Vec<Series> {
    let mut steps: Vec<f64> = stacked
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    steps.sort_by(f64::total_cmp);
    steps.dedup();
    let mut below = vec![0.0; steps.len()];
    stacked
        .iter()
        .map(|s| {
            for (i, &x) in steps.iter().enumerate() {
                below[i] += s.points.iter().find(|p| p.0 == x).map_or(0.0, |p| p.1);
            }
            Series {
                name: s.name.clone(),
                points: steps.iter().copied().zip(below.iter().copied()).collect(),
            }
        })
        .collect()
}

/// Decimals that tell ticks over `span` apart.
fn decimals(span: f64) -> usize {
    match span {
        s if s >= 20.0 => 0,
        s if s >= 2.0 => 1,
        s if s >= 0.2 => 2,
        _ => 3,
    }
}

fn range(values: impl Iterator<Item = f64>, from_zero: bool) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let lo = if from_zero { lo.min(0.0) } else { lo };
    let pad = ((hi - lo) * 0.08).max(hi.abs() * 0.05).max(1e-12);
    (if from_zero { lo } else { lo - pad })..hi + pad
}

impl Chart {
    /// Draws the chart into a 1000×560 PNG at `path`.
    pub fn draw(&self, path: &Path) -> Result<(), String> {
        register_font();
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let stacked = cumulative(&self.stacked);
        let all = || {
            self.lines
                .iter()
                .chain(&stacked)
                .chain(&self.secondary)
                .flat_map(|s| s.points.iter())
        };
        let mut x = range(all().map(|p| p.0), false);
        if x.end - x.start < 2.0 {
            x = (x.start - 1.0)..(x.end + 1.0);
        }
        // Loss is read against its own range; bytes and milliseconds against zero.
        let y = range(
            self.lines
                .iter()
                .chain(&stacked)
                .flat_map(|s| s.points.iter().map(|p| p.1)),
            !self.stacked.is_empty() || self.title.starts_with("memory"),
        );
        let y_span = y.end - y.start;
        let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(&self.title, ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(72)
            .right_y_label_area_size(if self.secondary.is_some() { 84 } else { 0 });
        let mut chart = builder
            .build_cartesian_2d(x.clone(), y)
            .map_err(|x| e(&x))?
            .set_secondary_coord(
                x,
                range(
                    self.secondary
                        .iter()
                        .flat_map(|s| s.points.iter().map(|p| p.1)),
                    true,
                ),
            );
        let decimals = decimals(y_span);
        chart
            .configure_mesh()
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.decimals$}"))
            .x_desc("step")
            .y_desc(&self.y_label)
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 17))
            .draw()
            .map_err(|x| e(&x))?;
        let mut colour = COLOURS.iter().cycle();
        let legend = |c: RGBColor| {
            move |(x, y): (i32, i32)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], c.filled())
        };
        // Top of the stack first, so each lower band is drawn over the one above it.
        let bands: Vec<(Series, RGBColor)> = stacked
            .into_iter()
            .map(|s| (s, *colour.next().expect("cycle")))
            .collect();
        for (s, c) in bands.iter().rev() {
            chart
                .draw_series(AreaSeries::new(s.points.clone(), 0.0, c.filled()).border_style(BLACK))
                .map_err(|x| e(&x))?
                .label(&s.name)
                .legend(legend(*c));
        }
        for s in &self.lines {
            let c = *colour.next().expect("cycle");
            chart
                .draw_series(LineSeries::new(s.points.clone(), c.stroke_width(2)))
                .map_err(|x| e(&x))?
                .label(&s.name)
                .legend(legend(c));
        }
        if let Some(s) = &self.secondary {
            let c = RGBColor(90, 90, 90);
            chart
                .configure_secondary_axes()
                .y_desc(format!("{} (right axis)", s.name))
                .y_label_formatter(&|v| format!("{v:.1e}"))
                .label_style(("sans-serif", 15))
                .axis_desc_style(("sans-serif", 17))
                .draw()
                .map_err(|x| e(&x))?;
            chart
                .draw_secondary_series(DashedLineSeries::new(
                    s.points.clone(),
                    6,
                    4,
                    c.stroke_width(2),
                ))
                .map_err(|x| e(&x))?
                .label(format!("{} (right axis)", s.name))
                .legend(legend(c));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(&x))?;
        root.present().map_err(|x| e(&x))
    }
}
