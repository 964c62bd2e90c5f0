//! `mixq pareto`: sweep one budget from the smallest to the largest configuration and write the
//! predicted front (CSV, optionally an SVG plot).

use super::allocate::{constraints, costs, ConstraintArgs, CostArgs};
use crate::alloc::{solve_problem, Budget, Limit, Problem, Resource, SolverKind};
use anyhow::{bail, Result};
use clap::Args;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

/// `mixq pareto`.
#[derive(Args, Debug)]
pub struct ParetoArgs {
    #[command(flatten)]
    pub(crate) cost: CostArgs,
    #[command(flatten)]
    pub(crate) constraints: ConstraintArgs,
    /// The swept resource: size, avg-bits, bops, latency.
    #[arg(long, default_value = "avg-bits")]
    pub sweep: String,
    /// Number of points, evenly spaced from the smallest to the largest configuration.
    #[arg(long, default_value_t = 20)]
    pub points: usize,
    /// Further fixed budgets held at every point (repeatable).
    #[arg(long = "budget")]
    pub budgets: Vec<String>,
    /// Solver: auto (exact for one budget, HiGHS otherwise), exact, highs, greedy.
    #[arg(long, value_enum, default_value_t = SolverKind::Auto)]
    pub solver: SolverKind,
    /// Write the front as CSV here.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Also draw the front as an SVG.
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

/// One point of the front.
struct Point {
    fraction: f64,
    limit: f64,
    used: f64,
    objective: f64,
    gap: f64,
    bytes: u64,
    avg_bits: Option<f64>,
    mix: String,
}

/// Runs `mixq pareto`.
pub fn run(a: ParetoArgs) -> Result<()> {
    if a.points < 2 {
        bail!("--points must be at least 2");
    }
    let resource = match format!("{}=0", a.sweep).parse::<Budget>() {
        Ok(b) => b.resource,
        Err(_) => bail!("--sweep `{}`: choose size, avg-bits, bops or latency", a.sweep),
    };
    let c = costs(&a.cost)?;
    let mut cons = constraints(&a.constraints, &a.budgets)?;
    cons.budgets.insert(0, Budget { resource, limit: Limit::Relative(0.0) });
    let params = c.table.total_params();
    let mut points = Vec::new();
    for i in 0..a.points {
        let fraction = i as f64 / (a.points - 1) as f64;
        cons.budgets[0].limit = Limit::Relative(fraction);
        let p = Problem::new(&c.table, &cons)?;
        let solver = a.solver.solver(p.budgets.len());
        let alloc = match solve_problem(&c.table, &p, solver.as_ref()) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("point {i} ({:.1}%): {e}", 100.0 * fraction);
                continue;
            }
        };
        let mut mix: BTreeMap<&str, usize> = BTreeMap::new();
        for l in &alloc.layers {
            *mix.entry(l.format.as_str()).or_default() += 1;
        }
        points.push(Point {
            fraction,
            limit: alloc.budgets[0].limit,
            used: alloc.budgets[0].used,
            objective: alloc.objective,
            gap: alloc.gap,
            bytes: alloc.total_bytes(),
            avg_bits: alloc.avg_bits(),
            mix: mix.iter().map(|(f, n)| format!("{f}:{n}")).collect::<Vec<_>>().join(" "),
        });
    }
    let unit = |x: f64| if resource == Resource::AvgBits { x / params.max(1) as f64 } else { x };
    let mut csv =
        format!("point,fraction,{r}_limit,{r}_used,objective,gap,bytes,avg_bits,formats\n", r = resource.to_string().replace('-', "_"));
    for (i, p) in points.iter().enumerate() {
        let _ = writeln!(
            csv,
            "{i},{},{},{},{},{},{},{},{}",
            p.fraction,
            unit(p.limit),
            unit(p.used),
            p.objective,
            p.gap,
            p.bytes,
            p.avg_bits.map(|b| b.to_string()).unwrap_or_default(),
            p.mix
        );
    }
    crate::util::write_atomic(&a.output, csv.as_bytes())?;
    println!("{} points of the {} front written to {}", points.len(), resource, a.output.display());
    for p in &points {
        println!("  {:>6.1}%  {:<22} Σ Ω = {:.4e}  {}", 100.0 * p.fraction, resource.display(p.used, params), p.objective, p.mix);
    }
    if let Some(svg) = &a.svg {
        let xy: Vec<(f64, f64)> = points.iter().map(|p| (unit(p.used), p.objective)).collect();
        let label = match resource {
            Resource::Size => "size (bytes)",
            Resource::AvgBits => "average bits per weight",
            Resource::Bops => "BOPs per sample",
            Resource::Latency => "latency (µs)",
        };
        crate::util::write_atomic(svg, plot_svg(&xy, label, "predicted Σ Ω").as_bytes())?;
        println!("plot written to {}", svg.display());
    }
    Ok(())
}

/// A minimal line plot (log-scaled y when the values span more than two decades).
fn plot_svg(xy: &[(f64, f64)], xlabel: &str, ylabel: &str) -> String {
    let (w, h, m) = (640.0, 420.0, 70.0);
    let xmin = xy.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let xmax = xy.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let pos: Vec<f64> = xy.iter().map(|p| p.1).filter(|y| *y > 0.0).collect();
    let ymin_pos = pos.iter().copied().fold(f64::INFINITY, f64::min);
    let ymax = xy.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let log = ymin_pos.is_finite() && ymax / ymin_pos > 100.0;
    let floor = if log { ymin_pos / 2.0 } else { 0.0f64.min(xy.iter().map(|p| p.1).fold(f64::INFINITY, f64::min)) };
    let fy = |y: f64| if log { y.max(floor).log10() } else { y };
    let (y0, y1) = (fy(floor), fy(ymax.max(floor * 1.0001) + if log { 0.0 } else { 1e-300 }));
    let sx = |x: f64| m + (x - xmin) / (xmax - xmin).max(1e-300) * (w - 1.5 * m);
    let sy = |y: f64| h - m - (fy(y) - y0) / (y1 - y0).max(1e-300) * (h - 1.5 * m);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{m}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n<line x1=\"{m}\" y1=\"{t}\" x2=\"{m}\" y2=\"{b}\" stroke=\"black\"/>\n",
        b = h - m,
        r = w - m / 2.0,
        t = m / 2.0
    );
    let pts: Vec<String> = xy.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
    let _ = writeln!(s, "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>", pts.join(" "));
    for &(x, y) in xy {
        let _ = writeln!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#1f77b4\"/>", sx(x), sy(y));
    }
    for k in 0..=4 {
        let x = xmin + (xmax - xmin) * k as f64 / 4.0;
        let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>", sx(x), h - m + 18.0, tick(x));
        let yv = y0 + (y1 - y0) * k as f64 / 4.0;
        let y = if log { 10f64.powf(yv) } else { yv };
        let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>", m - 6.0, sy(y) + 4.0, tick(y));
    }
    let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{xlabel}</text>", w / 2.0, h - 20.0);
    let _ = writeln!(
        s,
        "<text x=\"16\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {:.1})\">{ylabel}{}</text>",
        h / 2.0,
        h / 2.0,
        if log { " (log scale)" } else { "" }
    );
    s.push_str("</svg>\n");
    s
}

fn tick(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-2) {
        format!("{v:.2e}")
    } else {
        format!("{v:.2}")
    }
}
