//! The compare charts as files: both parse (SVG as XML, PNG by a decoder), tick labels are round
//! numbers, the KLD axis is positive, and every piece of text lies inside the canvas.

use ggpt::chart::{self, HEIGHT, WIDTH};
use ggpt::compare::{charts, FormatRow, Setup};
use std::path::PathBuf;

/// The rows of docs/quality.md's table (tiny-gpt2 on its held-out text).
fn rows() -> Vec<FormatRow> {
    let row = |f: &str, mib: f64, bpw, ppl, err, kld, top| FormatRow {
        format: f.into(),
        file_bytes: (mib * 1048576.0) as u64,
        bits_per_weight: bpw,
        ppl,
        ppl_err: err,
        mean_kld: kld,
        same_top_pct: top,
        ..Default::default()
    };
    vec![
        row("F16", 36.31, 16.25, 29.3648, 0.5873, 0.0, 100.0),
        row("Q8_0", 20.59, 8.87, 29.3743, 0.5874, 0.000324, 98.87),
        row("Q6_K", 16.52, 6.96, 29.4403, 0.5893, 0.001744, 97.47),
        row("Q4_K_M", 15.63, 6.55, 29.5930, 0.5926, 0.007856, 94.69),
    ]
}

fn setup() -> Setup {
    Setup {
        model: "tiny-gpt2".into(),
        text: "models/tiny-gpt2/val.txt".into(),
        ..Default::default()
    }
}

fn out_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("charts");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A generous width estimate for DejaVu Sans (its widest common glyphs are ~0.7 em).
fn text_width(text: &str, font_size: f64) -> f64 {
    text.chars().count() as f64 * font_size * 0.62
}

struct SvgText {
    text: String,
    x: f64,
    y: f64,
    size: f64,
    anchor: String,
    rotated: bool,
}

fn texts(svg: &str) -> Vec<SvgText> {
    let doc = roxmltree::Document::parse(svg).expect("the SVG is well-formed XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(root.attribute("width"), Some(WIDTH.to_string().as_str()));
    assert_eq!(root.attribute("height"), Some(HEIGHT.to_string().as_str()));
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| SvgText {
            text: n.text().unwrap_or("").trim().to_string(),
            x: n.attribute("x").unwrap().parse().unwrap(),
            y: n.attribute("y").unwrap().parse().unwrap(),
            size: n.attribute("font-size").unwrap().parse().unwrap(),
            anchor: n.attribute("text-anchor").unwrap_or("start").to_string(),
            rotated: n
                .attribute("transform")
                .is_some_and(|t| t.contains("rotate")),
        })
        .collect()
}

fn check_inside(name: &str, svg: &str) {
    let (w, h) = (WIDTH as f64, HEIGHT as f64);
    for t in texts(svg) {
        assert!(
            t.x >= 0.0 && t.x <= w && t.y >= 0.0 && t.y <= h,
            "{name}: {:?} anchored at ({}, {}) outside {w}×{h}",
            t.text,
            t.x,
            t.y
        );
        let tw = text_width(&t.text, t.size);
        // A rotated (axis) label runs along y; its extent is checked on that axis.
        let (pos, limit) = if t.rotated { (t.y, h) } else { (t.x, w) };
        let (lo, hi) = match t.anchor.as_str() {
            "end" => (pos - tw, pos),
            "middle" => (pos - tw / 2.0, pos + tw / 2.0),
            _ => (pos, pos + tw),
        };
        assert!(
            lo >= 0.0 && hi <= limit,
            "{name}: {:?} spans {lo:.0}..{hi:.0}, outside 0..{limit}",
            t.text
        );
    }
}

/// The numeric tick labels of each axis: y ticks are right-aligned in one column, x ticks
/// centred in one row.
fn axes(svg: &str) -> (Vec<f64>, Vec<f64>) {
    let ts = texts(svg);
    let num = |t: &SvgText| t.text.parse::<f64>().ok();
    let x: Vec<f64> = ts
        .iter()
        .filter(|t| t.anchor == "middle" && !t.rotated)
        .filter_map(num)
        .collect();
    let y: Vec<f64> = ts
        .iter()
        .filter(|t| t.anchor == "end")
        .filter_map(num)
        .collect();
    (x, y)
}

fn is_125(step: f64) -> bool {
    let m = step / 10f64.powf(step.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().any(|x| (m - x).abs() < 1e-6)
}

/// Evenly spaced by a 1/2/5 × 10^k step, every tick a whole multiple of it.
fn check_linear(name: &str, ticks: &[f64]) {
    assert!(ticks.len() >= 3, "{name}: {ticks:?}");
    let step = ticks[1] - ticks[0];
    assert!(
        step > 0.0 && is_125(step),
        "{name}: step {step} in {ticks:?}"
    );
    for w in ticks.windows(2) {
        assert!(
            ((w[1] - w[0]) - step).abs() < step * 1e-6,
            "{name}: uneven {ticks:?}"
        );
    }
    for v in ticks {
        assert!(
            ((v / step) - (v / step).round()).abs() < 1e-6,
            "{name}: {v} in {ticks:?}"
        );
    }
}

#[test]
fn charts_parse_have_round_ticks_positive_log_axis_and_text_inside() {
    let (ppl, kld) = charts(&setup(), &rows());
    let dir = out_dir();
    for (name, c) in [("ppl_vs_size", &ppl), ("kld_vs_size", &kld)] {
        let svg = chart::svg(c).unwrap();
        let png = chart::png(c).unwrap();
        std::fs::write(dir.join(format!("{name}.svg")), &svg).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), &png).unwrap();

        check_inside(name, &svg);
        let all: Vec<String> = texts(&svg).into_iter().map(|t| t.text).collect();
        assert!(
            all.iter().any(|t| t.contains("tiny-gpt2")),
            "{name}: model not named: {all:?}"
        );
        assert!(
            all.iter().any(|t| t.contains("val.txt")),
            "{name}: text not named: {all:?}"
        );
        for p in &c.points {
            assert!(
                all.contains(&p.label),
                "{name}: label {:?} missing",
                p.label
            );
        }
        let (x, y) = axes(&svg);
        check_linear(name, &x);
        if c.log_y {
            // The KLD axis: logarithmic, every tick positive and 1, 2 or 5 × 10^k.
            assert!(y.len() >= 3, "{name}: {y:?}");
            assert!(y.iter().all(|v| *v > 0.0 && is_125(*v)), "{name}: {y:?}");
            assert!(y.windows(2).all(|w| w[1] != w[0]), "{name}: {y:?}");
        } else {
            check_linear(name, &y);
        }

        let decoder = png::Decoder::new(std::io::Cursor::new(&png));
        let mut reader = decoder.read_info().expect("the PNG parses");
        let info = reader.info();
        assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
        let mut buf = vec![0; reader.output_buffer_size()];
        reader.next_frame(&mut buf).unwrap();
        // Text and points were drawn: some dark pixels, mostly white.
        let dark = buf.chunks(3).filter(|p| p.iter().all(|&c| c < 100)).count();
        assert!(dark > 2000, "{name}: only {dark} dark pixels in the PNG");
    }
    // Every point of each chart is drawn; the KLD chart leaves out only F16 (KLD 0).
    assert!(chart::svg(&ppl).unwrap().matches("<circle").count() >= 4);
    assert_eq!(chart::svg(&kld).unwrap().matches("<circle").count(), 3);
}

#[test]
fn a_label_at_the_right_edge_is_not_clipped() {
    // The largest file has the longest label: it must be drawn left of its point.
    let mut r = rows();
    r[0].format = "F16 with a rather long format name".into();
    let (ppl, _) = charts(&setup(), &r);
    check_inside("long label", &chart::svg(&ppl).unwrap());
}
