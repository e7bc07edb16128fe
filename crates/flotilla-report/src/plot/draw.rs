//! Drawing: line charts and histograms as SVG strings (plotters), from chart specs the
//! renderers in `plot` prepare.

use super::{HEIGHT, MAX_BINS, NOTE_COLOR, WIDTH, integer_label, min_max, valid_range};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

pub(super) struct LineSpec {
    pub(super) label: String,
    pub(super) points: Vec<(f64, f64)>,
    pub(super) color: RGBColor,
}

pub(super) struct LineChart {
    pub(super) title: String,
    pub(super) x_desc: String,
    pub(super) y_desc: String,
    pub(super) x_range: (f64, f64),
    pub(super) y_range: (f64, f64),
    /// Label only whole-number ticks on the x axis.
    pub(super) integer_x: bool,
    pub(super) legend: bool,
    /// Drawn in the middle of the chart, e.g. to explain why it is empty.
    pub(super) note: Option<String>,
    pub(super) series: Vec<LineSpec>,
}

pub(super) struct HistSpec {
    pub(super) label: String,
    pub(super) values: Vec<f64>,
    pub(super) color: RGBColor,
}

pub(super) struct HistogramChart {
    pub(super) title: String,
    pub(super) x_desc: String,
    pub(super) y_desc: String,
    /// Drawn when no series has a finite value.
    pub(super) empty_note: String,
    pub(super) series: Vec<HistSpec>,
}

fn err_text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn draw_note(
    root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    note: &str,
) -> Result<(), String> {
    let style = ("sans-serif", 20)
        .into_font()
        .color(&NOTE_COLOR)
        .pos(Pos::new(HPos::Center, VPos::Center));
    root.draw(&Text::new(
        note.to_string(),
        ((WIDTH / 2) as i32, (HEIGHT / 2) as i32),
        style,
    ))
    .map_err(err_text)
}

pub(super) fn draw_line_chart(chart: &LineChart) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err_text)?;
        let mut ctx = ChartBuilder::on(&root)
            .caption(&chart.title, ("sans-serif", 24))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(
                chart.x_range.0..chart.x_range.1,
                chart.y_range.0..chart.y_range.1,
            )
            .map_err(err_text)?;

        let mut mesh = ctx.configure_mesh();
        mesh.x_desc(chart.x_desc.as_str())
            .y_desc(chart.y_desc.as_str())
            .light_line_style(RGBColor(235, 235, 235));
        if chart.integer_x {
            mesh.x_label_formatter(&integer_label);
        }
        mesh.draw().map_err(err_text)?;

        for series in &chart.series {
            let color = series.color;
            let points = series
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite());
            ctx.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(err_text)?
                .label(series.label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            // Markers make single evaluated rounds and sparse evaluation visible.
            ctx.draw_series(points.map(|p| Circle::new(p, 3, color.filled())))
                .map_err(err_text)?;
        }

        if chart.legend && !chart.series.is_empty() {
            ctx.configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 15))
                .draw()
                .map_err(err_text)?;
        }
        if let Some(note) = &chart.note {
            draw_note(&root, note)?;
        }
        root.present().map_err(err_text)?;
    }
    Ok(svg)
}

/// Common bins of all series of a histogram.
pub(super) struct Bins {
    pub(super) lo: f64,
    pub(super) width: f64,
    /// `counts[series][bin]`.
    pub(super) counts: Vec<Vec<u64>>,
}

impl Bins {
    fn new(series: &[HistSpec]) -> Option<Bins> {
        let (min, max) = min_max(series.iter().flat_map(|s| s.values.iter().copied()))?;
        let n_values = series
            .iter()
            .map(|s| s.values.iter().filter(|v| v.is_finite()).count())
            .max()
            .unwrap_or(0);
        let n_bins = ((n_values as f64).sqrt().ceil() as usize).clamp(1, MAX_BINS);

        let (lo, hi) = if valid_range(min, max) && (max - min) > 1e-9 * max.abs().max(min.abs()) {
            (min, max)
        } else {
            // All values (nearly) equal: centre them in a small range.
            let pad = (min.abs() * 0.05).max(0.5);
            let lo = if min >= 0.0 {
                (min - pad).max(0.0)
            } else {
                min - pad
            };
            (lo, max + pad)
        };
        if !valid_range(lo, hi) {
            return None;
        }
        let width = (hi - lo) / n_bins as f64;
        if !(width.is_finite() && width > 0.0) {
            return None;
        }

        let counts = series
            .iter()
            .map(|s| {
                let mut counts = vec![0_u64; n_bins];
                for v in s.values.iter().copied().filter(|v| v.is_finite()) {
                    let idx = ((v - lo) / width).floor();
                    let idx = if idx.is_finite() && idx > 0.0 {
                        (idx as usize).min(n_bins - 1)
                    } else {
                        0
                    };
                    counts[idx] += 1;
                }
                counts
            })
            .collect();
        Some(Bins { lo, width, counts })
    }

    fn n_bins(&self) -> usize {
        self.counts.first().map_or(0, Vec::len)
    }

    fn hi(&self) -> f64 {
        self.lo + self.width * self.n_bins() as f64
    }

    fn max_count(&self) -> u64 {
        self.counts
            .iter()
            .flat_map(|c| c.iter().copied())
            .max()
            .unwrap_or(0)
    }
}

pub(super) fn draw_histogram(chart: &HistogramChart) -> Result<String, String> {
    let bins = Bins::new(&chart.series);
    let (x_range, y_max) = match &bins {
        Some(b) => {
            let margin = 0.02 * (b.hi() - b.lo);
            let x = (b.lo - margin, b.hi() + margin);
            let x = if valid_range(x.0, x.1) {
                x
            } else {
                (b.lo, b.hi())
            };
            (x, (b.max_count() as f64 * 1.15).max(1.0))
        }
        None => ((0.0, 1.0), 1.0),
    };

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err_text)?;
        let mut ctx = ChartBuilder::on(&root)
            .caption(&chart.title, ("sans-serif", 24))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(x_range.0..x_range.1, 0.0..y_max)
            .map_err(err_text)?;
        ctx.configure_mesh()
            .x_desc(chart.x_desc.as_str())
            .y_desc(chart.y_desc.as_str())
            .y_label_formatter(&integer_label)
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(err_text)?;

        if let Some(bins) = &bins {
            let k = chart.series.len().max(1) as f64;
            let sub_width = bins.width / k;
            let gap = sub_width * 0.06;
            for (j, (series, counts)) in chart.series.iter().zip(&bins.counts).enumerate() {
                let color = series.color;
                let bars = counts
                    .iter()
                    .enumerate()
                    .filter(|&(_, &count)| count > 0)
                    .map(|(i, &count)| {
                        let x0 = bins.lo + i as f64 * bins.width + j as f64 * sub_width;
                        Rectangle::new(
                            [(x0 + gap, 0.0), (x0 + sub_width - gap, count as f64)],
                            color.mix(0.85).filled(),
                        )
                    })
                    .collect::<Vec<_>>();
                ctx.draw_series(bars)
                    .map_err(err_text)?
                    .label(series.label.as_str())
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.mix(0.85).filled())
                    });
            }
            if chart.series.len() > 1 {
                ctx.configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 15))
                    .draw()
                    .map_err(err_text)?;
            }
        } else {
            draw_note(&root, &chart.empty_note)?;
        }
        root.present().map_err(err_text)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIME_COLOR: RGBColor = RGBColor(44, 160, 44);

    #[test]
    fn equal_values_get_one_populated_bin() {
        let series = vec![HistSpec {
            label: "x".into(),
            values: vec![12.0; 9],
            color: TIME_COLOR,
        }];
        let bins = Bins::new(&series).expect("bins");
        assert!(bins.hi() > bins.lo);
        assert_eq!(bins.counts[0].iter().sum::<u64>(), 9);
        assert_eq!(bins.max_count(), 9);
    }

    #[test]
    fn max_value_falls_in_last_bin() {
        let series = vec![HistSpec {
            label: "x".into(),
            values: (0..=8).map(f64::from).chain([f64::NAN]).collect(),
            color: TIME_COLOR,
        }];
        let bins = Bins::new(&series).expect("bins");
        assert_eq!(bins.counts[0], [3, 3, 3]);
    }
}
