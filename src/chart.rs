//! Scatter charts of quality against size, drawn with `plotters` as SVG and PNG: one labelled
//! point per format, optional vertical error bars, the points no smaller file beats joined by a
//! line (the size/quality frontier), a linear or logarithmic y axis, and tick values that are
//! round numbers (1, 2 or 5 × 10^k steps). Text is laid out and, in the PNG, drawn with the
//! bundled DejaVu Sans (assets/fonts), so no system font library is needed; labels are placed
//! where they fit inside the canvas.

use plotters::coord::combinators::LogCoord;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::sync::Once;

/// The chart font, registered with plotters under [`FONT`].
static FONT_BYTES: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
/// The family name the SVG asks for (DejaVu Sans where installed, else the viewer's sans-serif).
const FONT: &str = "DejaVu Sans, sans-serif";
/// Canvas size in pixels (SVG user units and PNG pixels alike).
pub const WIDTH: u32 = 900;
pub const HEIGHT: u32 = 560;

/// Why a chart could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("the bundled chart font could not be read")]
    Font,
    #[error("drawing the chart: {0}")]
    Draw(String),
    #[error("encoding the PNG: {0}")]
    Png(String),
}

/// One labelled point, with an optional ± error on y.
#[derive(Clone, Debug)]
pub struct Point {
    pub label: String,
    pub x: f64,
    pub y: f64,
    pub y_err: Option<f64>,
}

/// What to draw.
#[derive(Clone, Debug)]
pub struct Chart {
    pub title: String,
    /// A smaller second line under the title (the text measured on, what is left out).
    pub subtitle: String,
    pub x_label: String,
    pub y_label: String,
    /// A logarithmic y axis; points with y ≤ 0 cannot be placed and are left out.
    pub log_y: bool,
    pub points: Vec<Point>,
}

fn register_font() -> Result<(), ChartError> {
    static ONCE: Once = Once::new();
    let mut ok = true;
    ONCE.call_once(|| {
        ok = plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok();
    });
    if ok {
        Ok(())
    } else {
        Err(ChartError::Font)
    }
}

/// The chart as an SVG document.
pub fn svg(chart: &Chart) -> Result<String, ChartError> {
    register_font()?;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, chart)?;
        root.present().map_err(draw_err)?;
    }
    Ok(out)
}

/// The chart as a PNG file's bytes (8-bit RGB).
pub fn png(chart: &Chart) -> Result<Vec<u8>, ChartError> {
    register_font()?;
    let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, chart)?;
        root.present().map_err(draw_err)?;
    }
    let mut bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut bytes, WIDTH, HEIGHT);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let png_err = |e: png::EncodingError| ChartError::Png(e.to_string());
    let mut w = enc.write_header().map_err(png_err)?;
    w.write_image_data(&rgb).map_err(png_err)?;
    w.finish().map_err(png_err)?;
    Ok(bytes)
}

fn draw_err<E: std::fmt::Display>(e: E) -> ChartError {
    ChartError::Draw(e.to_string())
}

/// Evenly spaced round ticks covering `[lo, hi]`: a step of 1, 2 or 5 × 10^k giving about
/// `target` intervals, and the axis range widened to the enclosing ticks.
pub fn linear_ticks(lo: f64, hi: f64, target: usize) -> (f64, f64, Vec<f64>) {
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.05 };
        (lo - pad, hi + pad)
    };
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let mult = if norm < 1.5 {
        1.0
    } else if norm < 3.5 {
        2.0
    } else if norm < 7.5 {
        5.0
    } else {
        10.0
    };
    let step = mult * mag;
    let k0 = (lo / step).floor() as i64;
    let k1 = (hi / step).ceil() as i64;
    let ticks: Vec<f64> = (k0..=k1)
        .map(|k| round_to_step(k as f64 * step, step))
        .collect();
    (ticks[0], ticks[ticks.len() - 1], ticks)
}

/// `v` with the float noise of `k × step` removed (0.30000000000000004 → 0.3).
fn round_to_step(v: f64, step: f64) -> f64 {
    let decimals = (-step.log10().floor()).max(0.0) as i32 + 1;
    let f = 10f64.powi(decimals);
    (v * f).round() / f
}

/// Ticks for a logarithmic axis over positive `[lo, hi]`: 1, 2 and 5 × 10^k when the range
/// spans at most three decades, powers of ten otherwise; the range widened to enclosing ticks.
pub fn log_ticks(lo: f64, hi: f64) -> (f64, f64, Vec<f64>) {
    let (lo, hi) = (lo.max(f64::MIN_POSITIVE), hi.max(lo));
    let e0 = lo.log10().floor() as i32;
    let e1 = hi.log10().ceil() as i32;
    let mantissas: &[f64] = if e1 - e0 <= 3 {
        &[1.0, 2.0, 5.0]
    } else {
        &[1.0]
    };
    let mut all = Vec::new();
    for e in e0..=e1 {
        for &m in mantissas {
            all.push(m * 10f64.powi(e));
        }
    }
    // The tightest enclosing ticks, then every tick in between.
    let start = all
        .iter()
        .rev()
        .find(|&&t| t <= lo * (1.0 + 1e-12))
        .copied()
        .unwrap_or(all[0]);
    let end = all
        .iter()
        .find(|&&t| t >= hi * (1.0 - 1e-12))
        .copied()
        .unwrap_or(all[all.len() - 1]);
    let (start, end) = if end > start {
        (start, end)
    } else {
        (start, start * 10.0)
    };
    let ticks: Vec<f64> = all
        .into_iter()
        .filter(|&t| t >= start && t <= end)
        .collect();
    (start, end, ticks)
}

/// The ticks of a linear axis printed with the same number of decimals (those of the step).
fn axis_label(v: f64, ticks: &[f64]) -> String {
    match ticks {
        [a, b, ..] if b > a => {
            let d = (-(b - a).log10().floor()).max(0.0) as usize;
            if d <= 6 {
                return format!("{v:.d$}");
            }
            tick_label(v)
        }
        _ => tick_label(v),
    }
}

/// A tick label: plain decimals for ordinary magnitudes, `5e-5` style below 0.0001.
pub fn tick_label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-4..1e6).contains(&a) {
        let e = a.log10().floor() as i32;
        let m = v / 10f64.powi(e);
        let m = (m * 1e6).round() / 1e6;
        return format!("{m}e{e}");
    }
    // Shortest decimal that round-trips the (already rounded) value.
    let s = format!("{:.6}", v);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// Indices of the points on the size/quality frontier (lower y is better): sorted by x, the
/// points that beat every point at or below their size.
pub fn frontier(points: &[Point]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..points.len()).collect();
    idx.sort_by(|&a, &b| {
        points[a]
            .x
            .total_cmp(&points[b].x)
            .then(points[a].y.total_cmp(&points[b].y))
    });
    let mut best = f64::INFINITY;
    idx.into_iter()
        .filter(|&i| {
            let keep = points[i].y < best;
            if keep {
                best = points[i].y;
            }
            keep
        })
        .collect()
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    chart: &Chart,
) -> Result<(), ChartError> {
    root.fill(&WHITE).map_err(draw_err)?;
    let pts: Vec<Point> = chart
        .points
        .iter()
        .filter(|p| p.x.is_finite() && p.y.is_finite() && (!chart.log_y || p.y > 0.0))
        .cloned()
        .collect();
    let (xmin, xmax) = bounds(pts.iter().map(|p| p.x));
    let (ymin, ymax) = bounds(pts.iter().flat_map(|p| {
        let e = p.y_err.filter(|e| e.is_finite()).unwrap_or(0.0);
        [p.y - e, p.y + e]
    }));
    // Room on the x axis for the labels beside the outermost points.
    let xpad = (xmax - xmin).max(xmax.abs() * 0.05).max(1e-9) * 0.08;
    let (x0, x1, xticks) = linear_ticks((xmin - xpad).max(0.0), xmax + xpad, 6);
    if chart.log_y {
        let (lo, hi) = if pts.is_empty() {
            (1e-3, 1.0)
        } else {
            (ymin, ymax)
        };
        let (y0, y1, yticks) = log_ticks(lo, hi);
        let y = Ticked(LogCoord::from((y0..y1).log_scale()), yticks, true);
        draw_with(
            root,
            chart,
            &pts,
            Ticked::<RangedCoordf64>((x0..x1).into(), xticks, false),
            y,
        )
    } else {
        let ypad = (ymax - ymin).max(ymax.abs() * 0.01).max(1e-9) * 0.08;
        let (y0, y1, yticks) = linear_ticks(ymin - ypad, ymax + ypad, 6);
        draw_with(
            root,
            chart,
            &pts,
            Ticked::<RangedCoordf64>((x0..x1).into(), xticks, false),
            Ticked::<RangedCoordf64>((y0..y1).into(), yticks, false),
        )
    }
}

/// An axis with exactly the given tick values (plotters' own key points are not always round).
/// The flag marks a logarithmic axis (labels printed one by one, not with shared decimals).
struct Ticked<R>(R, Vec<f64>, bool);

impl<R> Ticked<R> {
    fn labeller(&self) -> Ticked<()> {
        Ticked((), self.1.clone(), self.2)
    }

    fn label(&self, v: f64) -> String {
        if self.2 {
            tick_label(v)
        } else {
            axis_label(v, &self.1)
        }
    }
}

impl<R: Ranged<ValueType = f64>> Ranged for Ticked<R> {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;
    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.0.map(value, limit)
    }
    fn key_points<H: KeyPointHint>(&self, _hint: H) -> Vec<f64> {
        self.1.clone()
    }
    fn range(&self) -> std::ops::Range<f64> {
        self.0.range()
    }
    fn axis_pixel_range(&self, limit: (i32, i32)) -> std::ops::Range<i32> {
        self.0.axis_pixel_range(limit)
    }
}

fn bounds(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo.is_finite() {
        (lo, hi)
    } else {
        (0.0, 1.0)
    }
}

fn draw_with<DB, XR, YR>(
    root: &DrawingArea<DB, Shift>,
    chart: &Chart,
    pts: &[Point],
    x: Ticked<XR>,
    y: Ticked<YR>,
) -> Result<(), ChartError>
where
    DB: DrawingBackend,
    XR: Ranged<ValueType = f64>,
    YR: Ranged<ValueType = f64>,
{
    let (xl, yl) = (x.labeller(), y.labeller());
    let xfmt = |v: &f64| xl.label(*v);
    let yfmt = |v: &f64| yl.label(*v);
    let (w, h) = root.dim_in_pixel();
    let axis = TextStyle::from((FONT, 18).into_font()).color(&BLACK);
    let label = TextStyle::from((FONT, 17).into_font()).color(&BLACK);

    // Title and subtitle, centred; shrunk until they fit the width.
    let top = fit_centered(root, &chart.title, 26.0, BLACK, 10, w)?;
    let top = fit_centered(
        root,
        &chart.subtitle,
        18.0,
        RGBColor(80, 80, 80),
        top + 4,
        w,
    )?;
    let area = root.margin(top + 10, 10, 10, 28);

    let mut cc = ChartBuilder::on(&area)
        .x_label_area_size(52)
        .y_label_area_size(78)
        .build_cartesian_2d(x, y)
        .map_err(draw_err)?;
    cc.configure_mesh()
        .x_desc(chart.x_label.as_str())
        .y_desc(chart.y_label.as_str())
        .axis_desc_style(axis.clone())
        .label_style(axis)
        .x_label_formatter(&xfmt)
        .y_label_formatter(&yfmt)
        .bold_line_style(RGBColor(220, 220, 220))
        .light_line_style(TRANSPARENT)
        .draw()
        .map_err(draw_err)?;

    let blue = RGBColor(31, 119, 180);
    // The frontier line under the points.
    let front = frontier(pts);
    cc.draw_series(LineSeries::new(
        front.iter().map(|&i| (pts[i].x, pts[i].y)),
        blue.stroke_width(2),
    ))
    .map_err(draw_err)?;
    cc.draw_series(pts.iter().filter_map(|p| {
        p.y_err
            .filter(|e| e.is_finite() && *e > 0.0)
            .map(|e| ErrorBar::new_vertical(p.x, p.y - e, p.y, p.y + e, BLACK.stroke_width(1), 10))
    }))
    .map_err(draw_err)?;
    cc.draw_series(pts.iter().enumerate().map(|(i, p)| {
        let on = front.contains(&i);
        Circle::new(
            (p.x, p.y),
            6,
            if on {
                blue.filled()
            } else {
                blue.stroke_width(2)
            },
        )
    }))
    .map_err(draw_err)?;

    // Labels in canvas pixels: beside each point where the text fits inside the plot and
    // overlaps no earlier label.
    let plot = cc.plotting_area();
    let (px_range, py_range) = plot.get_pixel_range();
    let mut placed: Vec<(i32, i32, i32, i32)> = Vec::new();
    for p in pts {
        let (cx, cy) = cc.backend_coord(&(p.x, p.y));
        let (tw, th) = root
            .estimate_text_size(&p.label, &label)
            .map_err(draw_err)?;
        let (tw, th) = (tw as i32, th as i32);
        let candidates = [
            (cx + 10, cy - 10 - th),
            (cx + 10, cy + 10),
            (cx - 10 - tw, cy - 10 - th),
            (cx - 10 - tw, cy + 10),
            (cx - tw / 2, cy - 14 - th),
            (cx - tw / 2, cy + 14),
        ];
        let fits = |&(x, y): &(i32, i32)| {
            x >= px_range.start
                && x + tw <= px_range.end
                && y >= py_range.start
                && y + th <= py_range.end
        };
        let free = |&(x, y): &(i32, i32)| {
            placed
                .iter()
                .all(|&(a, b, c, d)| x + tw <= a || x >= c || y + th <= b || y >= d)
        };
        let (x, y) = candidates
            .iter()
            .copied()
            .find(|c| fits(c) && free(c))
            .or_else(|| candidates.iter().copied().find(fits))
            .unwrap_or((
                cx.clamp(0, (w as i32 - tw).max(0)),
                cy.clamp(0, (h as i32 - th).max(0)),
            ));
        placed.push((x, y, x + tw, y + th));
        root.draw(&Text::new(
            p.label.clone(),
            (x, y),
            label.pos(Pos::new(HPos::Left, VPos::Top)),
        ))
        .map_err(draw_err)?;
    }
    Ok(())
}

/// Draw `text` centred at `y`, shrinking the font until it fits `width` with a margin;
/// returns the y below it.
fn fit_centered<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    text: &str,
    mut size: f64,
    color: RGBColor,
    y: i32,
    width: u32,
) -> Result<i32, ChartError> {
    if text.is_empty() {
        return Ok(y);
    }
    loop {
        let style = TextStyle::from((FONT, size).into_font()).color(&color);
        let (tw, th) = root.estimate_text_size(text, &style).map_err(draw_err)?;
        if tw + 40 <= width || size <= 8.0 {
            root.draw(&Text::new(
                text.to_string(),
                (width as i32 / 2, y),
                style.pos(Pos::new(HPos::Center, VPos::Top)),
            ))
            .map_err(draw_err)?;
            return Ok(y + th as i32);
        }
        size -= 1.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_ticks_are_round_steps_covering_the_data() {
        for (lo, hi) in [
            (13.566, 23.489),
            (0.0, 1.0),
            (29.1, 29.4),
            (5.4, 16.0),
            (-3.0, 7.0),
            (1e-5, 4e-4),
            (100.0, 100.0),
        ] {
            let (a, b, t) = linear_ticks(lo, hi, 6);
            assert!(a <= lo && b >= hi, "{lo}..{hi} → {a}..{b}");
            assert!(t.len() >= 2 && t.len() <= 13, "{t:?}");
            let step = t[1] - t[0];
            let mag = 10f64.powf(step.log10().floor());
            let m = step / mag;
            assert!(
                [1.0, 2.0, 5.0, 10.0].iter().any(|x| (m - x).abs() < 1e-9),
                "step {step} of {t:?}"
            );
            for v in &t {
                assert!(
                    ((v / step) - (v / step).round()).abs() < 1e-6,
                    "{v} in {t:?}"
                );
                // The printed label is the exact round value.
                let printed: f64 = tick_label(*v).parse().unwrap();
                assert!(
                    (printed - v).abs() <= step * 1e-9,
                    "{v} → {}",
                    tick_label(*v)
                );
            }
        }
    }

    #[test]
    fn log_ticks_are_positive_one_two_five_decades() {
        for (lo, hi) in [(1.3e-4, 4.4e-3), (2e-5, 0.9), (0.02, 0.021), (1e-9, 1.0)] {
            let (a, b, t) = log_ticks(lo, hi);
            assert!(
                a > 0.0 && a <= lo && b >= hi && b > a,
                "{lo}..{hi} → {a}..{b}"
            );
            assert!(t.len() >= 2, "{t:?}");
            for v in &t {
                let e = v.log10().floor();
                let m = v / 10f64.powf(e);
                assert!([1.0, 2.0, 5.0].iter().any(|x| (m - x).abs() < 1e-9), "{v}");
            }
        }
        assert_eq!(tick_label(5e-5), "5e-5");
        assert_eq!(tick_label(5e-4), "0.0005");
        assert_eq!(axis_label(30.0, &[29.8, 30.0]), "30.0");
        assert_eq!(tick_label(0.002), "0.002");
        assert_eq!(tick_label(30.0), "30");
        assert_eq!(tick_label(0.30000000000000004), "0.3");
    }

    #[test]
    fn frontier_keeps_points_no_smaller_file_beats() {
        let p = |x, y| Point {
            label: String::new(),
            x,
            y,
            y_err: None,
        };
        let pts = vec![p(40.0, 29.0), p(10.0, 33.0), p(20.0, 35.0), p(25.0, 29.5)];
        assert_eq!(frontier(&pts), vec![1, 3, 0]);
    }
}
