//! A small self-contained SVG scatter chart: quality against size, one labelled point per format.
//! Written by hand (no plotting dependency): axes, ticks, points and labels.

use std::fmt::Write as _;

/// One labelled point.
pub struct Point {
    pub label: String,
    pub x: f64,
    pub y: f64,
}

/// Render `points` as an SVG document. Axis ranges are padded around the data.
pub fn scatter_svg(title: &str, x_label: &str, y_label: &str, points: &[Point]) -> String {
    let (w, h) = (720.0, 440.0);
    let (left, right, top, bottom) = (80.0, 30.0, 50.0, 60.0);
    let finite: Vec<&Point> = points
        .iter()
        .filter(|p| p.x.is_finite() && p.y.is_finite())
        .collect();
    let range = |vals: Vec<f64>| -> (f64, f64) {
        let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if !lo.is_finite() {
            return (0.0, 1.0);
        }
        let span = if hi > lo { hi - lo } else { lo.abs().max(1.0) };
        (lo - 0.1 * span, hi + 0.1 * span)
    };
    let (x0, x1) = range(finite.iter().map(|p| p.x).collect());
    let (y0, y1) = range(finite.iter().map(|p| p.y).collect());
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let py = |y: f64| h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        w / 2.0,
        escape(title)
    );
    // Axes.
    let _ = writeln!(
        s,
        r#"<path d="M{left},{top} V{} H{}" stroke="black" fill="none"/>"#,
        h - bottom,
        w - right
    );
    for i in 0..=5 {
        let fx = x0 + (x1 - x0) * i as f64 / 5.0;
        let fy = y0 + (y1 - y0) * i as f64 / 5.0;
        let _ = writeln!(
            s,
            r##"<line x1="{0}" y1="{1}" x2="{0}" y2="{2}" stroke="#ddd"/><text x="{0}" y="{3}" text-anchor="middle">{4}</text>"##,
            px(fx),
            top,
            h - bottom,
            h - bottom + 18.0,
            tick(fx)
        );
        let _ = writeln!(
            s,
            r##"<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="#ddd"/><text x="{3}" y="{4}" text-anchor="end">{5}</text>"##,
            left,
            py(fy),
            w - right,
            left - 6.0,
            py(fy) + 4.0,
            tick(fy)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (left + w - right) / 2.0,
        h - 18.0,
        escape(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="20" y="{0}" text-anchor="middle" transform="rotate(-90 20 {0})">{1}</text>"#,
        (top + h - bottom) / 2.0,
        escape(y_label)
    );
    for p in &finite {
        let _ = writeln!(
            s,
            r##"<circle cx="{0:.1}" cy="{1:.1}" r="6" fill="#1f77b4"/><text x="{2:.1}" y="{3:.1}">{4}</text>"##,
            px(p.x),
            py(p.y),
            px(p.x) + 9.0,
            py(p.y) - 8.0,
            escape(&p.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn tick(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(0.01..100_000.0).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_point_and_escapes_labels() {
        let pts = vec![
            Point {
                label: "F16".into(),
                x: 16.0,
                y: 29.4,
            },
            Point {
                label: "Q4_K_M <4>".into(),
                x: 5.4,
                y: 31.0,
            },
            Point {
                label: "nan".into(),
                x: f64::NAN,
                y: 1.0,
            },
        ];
        let svg = scatter_svg("t", "bpw", "PPL", &pts);
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("Q4_K_M &lt;4&gt;"));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }
}
