//! Line plots as SVG, with no dependency: fronts, sweeps and the experiments' figures.
//!
//! A plot has one or two y axes (each [`Series`] names its side); an axis turns logarithmic when
//! its positive values span more than two decades, so a loss that falls from 1 to 1e-6 stays
//! readable.

use std::fmt::Write as _;

/// One line of a plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text (also the axis label).
    pub label: String,
    /// The points, by x.
    pub xy: Vec<(f64, f64)>,
    /// On the right-hand y axis (its own scale) instead of the left.
    pub right: bool,
    /// Drawn as a step function (the value holds until the next x), as the front of one budget is.
    pub step: bool,
    /// SVG colour, e.g. `#1f77b4`.
    pub color: &'static str,
}

/// A y axis: linear, or log-scaled when the positive values span more than two decades (zeros
/// are drawn at the floor).
struct Axis {
    log: bool,
    floor: f64,
    y0: f64,
    y1: f64,
}

impl Axis {
    fn new<'a>(ys: impl Iterator<Item = &'a f64> + Clone) -> Axis {
        let ymin_pos = ys.clone().copied().filter(|y| *y > 0.0).fold(f64::INFINITY, f64::min);
        let ymax = ys.clone().copied().fold(f64::NEG_INFINITY, f64::max);
        let ymin = ys.copied().fold(f64::INFINITY, f64::min);
        let log = ymin_pos.is_finite() && ymax / ymin_pos > 100.0;
        let floor = if log { ymin_pos / 2.0 } else { 0.0f64.min(ymin) };
        let mut a = Axis { log, floor, y0: 0.0, y1: 0.0 };
        a.y0 = a.f(floor);
        a.y1 = a.f(ymax.max(floor * 1.0001) + if log { 0.0 } else { 1e-300 });
        if !a.y1.is_finite() || a.y1 <= a.y0 {
            a.y1 = a.y0 + 1.0;
        }
        a
    }
    fn f(&self, y: f64) -> f64 {
        if self.log {
            y.max(self.floor).log10()
        } else {
            y
        }
    }
    /// The value at fraction t of the axis.
    fn at(&self, t: f64) -> f64 {
        let v = self.y0 + (self.y1 - self.y0) * t;
        if self.log {
            10f64.powf(v)
        } else {
            v
        }
    }
}

/// A line plot of one or two y axes (each series names its axis), with a legend, as a standalone
/// SVG document.
pub fn line_plot_svg(series: &[Series], xlabel: &str) -> String {
    let (w, h, m) = (720.0, 440.0, 80.0);
    let xs = || series.iter().flat_map(|s| s.xy.iter().map(|p| p.0));
    let xmin = xs().fold(f64::INFINITY, f64::min);
    let xmax = xs().fold(f64::NEG_INFINITY, f64::max);
    let left_ys: Vec<f64> = series.iter().filter(|s| !s.right).flat_map(|s| s.xy.iter().map(|p| p.1)).collect();
    let right_ys: Vec<f64> = series.iter().filter(|s| s.right).flat_map(|s| s.xy.iter().map(|p| p.1)).collect();
    let left = Axis::new(left_ys.iter());
    let right = (!right_ys.is_empty()).then(|| Axis::new(right_ys.iter()));
    let (x_lo, x_hi) = (m, w - m);
    let (y_lo, y_hi) = (h - m, m / 2.0 + 30.0);
    let sx = |x: f64| x_lo + (x - xmin) / (xmax - xmin).max(1e-300) * (x_hi - x_lo);
    let sy = |a: &Axis, y: f64| y_lo - (a.f(y) - a.y0) / (a.y1 - a.y0) * (y_lo - y_hi);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{x_lo}\" y1=\"{y_lo}\" x2=\"{x_hi}\" y2=\"{y_lo}\" stroke=\"black\"/>\n\
         <line x1=\"{x_lo}\" y1=\"{y_hi}\" x2=\"{x_lo}\" y2=\"{y_lo}\" stroke=\"black\"/>\n"
    );
    if right.is_some() {
        let _ = writeln!(s, "<line x1=\"{x_hi}\" y1=\"{y_hi}\" x2=\"{x_hi}\" y2=\"{y_lo}\" stroke=\"black\"/>");
    }
    for se in series {
        let axis = if se.right { right.as_ref().unwrap_or(&left) } else { &left };
        let mut pts: Vec<String> = Vec::new();
        for (i, &(x, y)) in se.xy.iter().enumerate() {
            if se.step && i > 0 {
                pts.push(format!("{:.1},{:.1}", sx(x), sy(axis, se.xy[i - 1].1)));
            }
            pts.push(format!("{:.1},{:.1}", sx(x), sy(axis, y)));
        }
        let _ = writeln!(s, "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>", se.color, pts.join(" "));
        if se.xy.len() <= 200 {
            for &(x, y) in &se.xy {
                let _ = writeln!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"/>", sx(x), sy(axis, y), se.color);
            }
        }
    }
    for k in 0..=4 {
        let t = k as f64 / 4.0;
        let x = xmin + (xmax - xmin) * t;
        let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>", sx(x), y_lo + 18.0, tick(x));
        let y = left.at(t);
        let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>", x_lo - 6.0, sy(&left, y) + 4.0, tick(y));
        if let Some(r) = &right {
            let y = r.at(t);
            let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"start\">{}</text>", x_hi + 6.0, sy(r, y) + 4.0, tick(y));
        }
    }
    let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>", w / 2.0, h - 20.0, esc(xlabel));
    let axis_label = |right: bool, a: &Axis| {
        let names: Vec<&str> = series.iter().filter(|s| s.right == right).map(|s| s.label.as_str()).collect();
        format!("{}{}", esc(&names.join(", ")), if a.log { " (log scale)" } else { "" })
    };
    let _ = writeln!(
        s,
        "<text x=\"18\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {:.1})\">{}</text>",
        (y_lo + y_hi) / 2.0,
        (y_lo + y_hi) / 2.0,
        axis_label(false, &left)
    );
    if let Some(r) = &right {
        let xr = w - 14.0;
        let _ = writeln!(
            s,
            "<text x=\"{xr}\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(90 {xr} {:.1})\">{}</text>",
            (y_lo + y_hi) / 2.0,
            (y_lo + y_hi) / 2.0,
            axis_label(true, r)
        );
    }
    // Legend.
    for (i, se) in series.iter().enumerate() {
        let y = 16.0 + 16.0 * i as f64;
        let side = if se.right { "right axis" } else { "left axis" };
        let _ = writeln!(
            s,
            "<line x1=\"{x_lo}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"{}\" stroke-width=\"2\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{} ({side})</text>",
            x_lo + 24.0,
            se.color,
            x_lo + 30.0,
            y + 4.0,
            esc(&se.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn tick(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-2) {
        format!("{v:.2e}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coords(svg: &str, color: &str) -> Vec<(f64, f64)> {
        let line = svg.lines().find(|l| l.starts_with("<polyline") && l.contains(color)).unwrap();
        let pts = line.split("points=\"").nth(1).unwrap().trim_end_matches("\"/>");
        pts.split(' ')
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn points_land_inside_the_axes_in_order() {
        let s = Series { label: "a <b>".into(), xy: vec![(0.0, 1.0), (1.0, 3.0), (2.0, 2.0)], right: false, step: false, color: "#111111" };
        let svg = line_plot_svg(&[s], "x & y");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &lt;b&gt;") && svg.contains("x &amp; y"), "labels are escaped");
        let p = coords(&svg, "#111111");
        assert_eq!(p.len(), 3);
        // x grows left to right; SVG y grows downwards, so the largest value is highest (smallest y).
        assert!(p[0].0 < p[1].0 && p[1].0 < p[2].0);
        assert!(p[1].1 < p[2].1 && p[2].1 < p[0].1);
        for (x, y) in p {
            assert!((80.0..=640.0).contains(&x) && (70.0..=360.0).contains(&y), "({x}, {y}) outside the plot area");
        }
    }

    #[test]
    fn steps_double_the_vertices_and_wide_ranges_go_log() {
        let s = Series { label: "s".into(), xy: vec![(0.0, 1.0), (1.0, 1e-3), (2.0, 1e-6)], right: false, step: true, color: "#222222" };
        let svg = line_plot_svg(&[s], "x");
        assert_eq!(coords(&svg, "#222222").len(), 5);
        assert!(svg.contains("(log scale)"));
        let r = Series { label: "r".into(), xy: vec![(0.0, 2.0), (2.0, 1.0)], right: true, step: false, color: "#333333" };
        let l = Series { label: "l".into(), xy: vec![(0.0, 5.0), (2.0, 6.0)], right: false, step: false, color: "#444444" };
        let svg = line_plot_svg(&[l, r], "x");
        assert!(svg.contains("r (right axis)") && svg.contains("l (left axis)") && !svg.contains("log scale"));
    }
}
