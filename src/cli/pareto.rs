//! `mixq pareto`: the predicted front of one budget — sampled at evenly spaced budgets, or every
//! exact breakpoint (`--breakpoints`) — as CSV and SVG, optionally with robust costs (`--robust`)
//! and with each point's config evaluated on data (`--eval`).

use super::allocate::{constraints, costs, ConstraintArgs, CostArgs};
use super::table::Table;
use super::{metrics_row, progress};
use crate::alloc::{breakpoints, compare_allocations, solve_problem, Allocation, Budget, Limit, Problem, Resource, SolverKind};
use crate::eval::{self, Metrics, Reference, SizeReport};
use crate::model::data::Dataset;
use crate::model::QuantModel;
use anyhow::{bail, Context, Result};
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
    /// Instead of evenly spaced budgets, every exact breakpoint of the front: each distinct optimal
    /// allocation as the budget grows, with the least resource that reaches it (--points is
    /// ignored).
    #[arg(long)]
    pub breakpoints: bool,
    /// With --breakpoints: stop after this many breakpoints (the ones with the most resource).
    #[arg(long, default_value_t = 2000)]
    pub max_breakpoints: usize,
    /// Evaluate every point's config on --eval-data (accuracy, loss, KL vs FP32, agreement) and
    /// plot the measured KL beside the predicted Σ Ω.
    #[arg(long)]
    pub eval: bool,
    /// Data for --eval: `digits[:split]`, `.safetensors`, `X.npy[,Y.npy]`.
    #[arg(long, default_value = "digits:test")]
    pub eval_data: String,
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
    alloc: Allocation,
    mix: String,
    /// Under --robust: Σ nominal Ω of this config, the nominal optimum at the same budget, and the
    /// number of layers whose format differs from that nominal optimum.
    robust: Option<(f64, f64, usize)>,
    /// Under --eval: the measured quality.
    measured: Option<(Metrics, SizeReport)>,
}

fn mix(alloc: &Allocation) -> String {
    let mut mix: BTreeMap<&str, usize> = BTreeMap::new();
    for l in &alloc.layers {
        *mix.entry(l.format.as_str()).or_default() += 1;
    }
    mix.iter().map(|(f, n)| format!("{f}:{n}")).collect::<Vec<_>>().join(" ")
}

/// Runs `mixq pareto`.
pub fn run(a: ParetoArgs) -> Result<()> {
    if a.points < 2 && !a.breakpoints {
        bail!("--points must be at least 2");
    }
    let resource = match format!("{}=0", a.sweep).parse::<Budget>() {
        Ok(b) => b.resource,
        Err(_) => bail!("--sweep `{}`: choose size, avg-bits, bops or latency", a.sweep),
    };
    let mut c = costs(&a.cost)?;
    let mut cons = constraints(&a.constraints, &a.budgets)?;
    cons.budgets.insert(0, Budget { resource, limit: Limit::Relative(1.0) });
    // The table solved: the robust one under --robust.
    let table = c.robust.as_ref().map(|(_, t)| t).unwrap_or(&c.table);
    let params = table.total_params();
    let problem = Problem::new(table, &cons)?;
    let solver = a.solver.solver(problem.budgets.len());
    let (min, max) = (problem.budgets[0].min, problem.budgets[0].max);
    let fraction_of = |used: f64| if max > min { (used - min) / (max - min) } else { 0.0 };
    let mut points = Vec::new();
    if a.breakpoints {
        let front = breakpoints(table, &problem, 0, solver.as_ref(), a.max_breakpoints)?;
        if !front.complete {
            eprintln!(
                "warning: the front has more than {} breakpoints; these are the {} with the most {resource} \
                 (raise --max-breakpoints, or sample it with --points)",
                a.max_breakpoints, a.max_breakpoints
            );
        }
        if front.max_gap > crate::alloc::front::SAME_OBJECTIVE_RTOL {
            eprintln!("warning: a solve stopped with gap {:.2e}; the breakpoints are not all certified", front.max_gap);
        }
        eprintln!("{} breakpoints from {} solves", front.points.len(), front.solves);
        for alloc in front.points {
            let used = alloc.budgets[0].used;
            points.push(Point { fraction: fraction_of(used), limit: used, mix: mix(&alloc), alloc, robust: None, measured: None });
        }
    } else {
        let mut p = problem.clone();
        for i in 0..a.points {
            let fraction = i as f64 / (a.points - 1) as f64;
            p.budgets[0].limit = min + fraction * (max - min);
            match solve_problem(table, &p, solver.as_ref()) {
                Ok(alloc) => {
                    points.push(Point { fraction, limit: p.budgets[0].limit, mix: mix(&alloc), alloc, robust: None, measured: None })
                }
                Err(e) => eprintln!("point {i} ({:.1}%): {e}", 100.0 * fraction),
            }
        }
    }
    if let Some((z, rt)) = &c.robust {
        let mut pn = Problem::new(&c.table, &cons)?;
        for pt in &mut points {
            pn.budgets[0].limit = pt.limit;
            let nominal = solve_problem(&c.table, &pn, solver.as_ref())?;
            let cmp = compare_allocations(&c.table, rt, *z, nominal, pt.alloc.clone())?;
            pt.robust = Some((cmp.robust_under_nominal, cmp.nominal.objective, cmp.changed.len()));
        }
    }
    let mut fp32 = None;
    if a.eval {
        let model: Box<dyn QuantModel> = match c.loaded.take() {
            Some(m) => m,
            None => match &c.model {
                Some(m) => super::load(&super::ModelArgs { model: m.name.clone(), data: a.eval_data.clone() })?.0,
                None => bail!("--eval needs a model: give --sens REPORT.json (its model) or --model with --cost-table"),
            },
        };
        let data = Dataset::load(&a.eval_data).with_context(|| format!("loading data `{}`", a.eval_data))?.into_kind(model.input_kind())?;
        data.check_for(model.as_ref())?;
        let reference = Reference::compute(model.as_ref(), &data)?;
        let base = eval::evaluate(model.as_ref(), &data, &reference)?;
        let bar = progress::bar(points.len() as u64, "evaluating");
        for pt in &mut points {
            bar.set_message(format!("{:.1}%", 100.0 * pt.fraction));
            let cfg = pt.alloc.to_config(None)?;
            let (r, size) = eval::evaluate_config(model.as_ref(), &data, &reference, &cfg)
                .with_context(|| format!("evaluating the point at {}", resource.display(pt.alloc.budgets[0].used, params)))?;
            pt.measured = Some((r, size));
            bar.inc(1);
        }
        bar.finish_and_clear();
        eprintln!("evaluated {} configs on {} ({} samples)", points.len(), data.name, data.len());
        fp32 = Some((base, data.name.clone()));
    }

    let unit = |x: f64| if resource == Resource::AvgBits { x / params.max(1) as f64 } else { x };
    let r = resource.to_string().replace('-', "_");
    let mut csv = format!("point,fraction,{r}_limit,{r}_used,objective,gap,bytes,avg_bits,formats");
    if c.robust.is_some() {
        csv.push_str(",objective_nominal_costs,nominal_optimum,changed_layers");
    }
    if a.eval {
        csv.push_str(",accuracy,loss,loss_increase,kl,agreement");
    }
    csv.push('\n');
    let base_loss = fp32.as_ref().map(|(b, _)| b.loss).unwrap_or(0.0);
    for (i, p) in points.iter().enumerate() {
        let _ = write!(
            csv,
            "{i},{},{},{},{},{},{},{},{}",
            p.fraction,
            unit(p.limit),
            unit(p.alloc.budgets[0].used),
            p.alloc.objective,
            p.alloc.gap,
            p.alloc.total_bytes(),
            p.alloc.avg_bits().map(|b| b.to_string()).unwrap_or_default(),
            p.mix
        );
        if let Some((on, no, ch)) = p.robust {
            let _ = write!(csv, ",{on},{no},{ch}");
        }
        if let Some((m, _)) = &p.measured {
            let acc = m.accuracy.map(|x| x.to_string()).unwrap_or_default();
            let _ = write!(csv, ",{acc},{},{},{},{}", m.loss, m.loss - base_loss, m.kl, m.agreement);
        }
        csv.push('\n');
    }
    crate::util::write_atomic(&a.output, csv.as_bytes())?;
    let what = if a.breakpoints { "breakpoints" } else { "points" };
    let costs_kind = match &c.robust {
        Some((z, _)) => format!(" (robust costs: Tr + {z}·s.e.)"),
        None => String::new(),
    };
    println!("{} {what} of the {resource} front{costs_kind} written to {}", points.len(), a.output.display());
    // At most 25 lines on the terminal, evenly spread, first and last included.
    let shown: Vec<usize> = if points.len() <= 25 {
        (0..points.len()).collect()
    } else {
        let mut v: Vec<usize> = (0..25).map(|k| k * (points.len() - 1) / 24).collect();
        v.dedup();
        v
    };
    for &i in &shown {
        let p = &points[i];
        let mut line = format!(
            "  {i:>4}  {:>6.1}%  {:<18} Σ Ω = {:.4e}",
            100.0 * p.fraction,
            resource.display(p.alloc.budgets[0].used, params),
            p.alloc.objective
        );
        if let Some((_, no, ch)) = p.robust {
            let _ = write!(line, "  nominal {no:.4e}, {ch:>2} changed");
        }
        let _ = write!(line, "  {}", p.mix);
        println!("{line}");
    }
    if shown.len() < points.len() {
        println!("  ({} of {} rows shown; all are in the CSV)", shown.len(), points.len());
    }
    if let Some((base, name)) = &fp32 {
        println!();
        println!(
            "Measured on {name} (FP32: loss {:.4}{}):",
            base.loss,
            base.accuracy.map(|x| format!(", accuracy {:.2} %", 100.0 * x)).unwrap_or_default()
        );
        let mut t = Table::new(
            &["point", "bits/w", "size", "Σ Ω", "accuracy", "loss", "KL(FP32‖Q)", "agreement"],
            &[true, true, true, true, true, true, true, true],
        );
        for &i in &shown {
            let p = &points[i];
            if let Some((m, size)) = &p.measured {
                let row = metrics_row(String::new(), m, size);
                t.row(vec![
                    i.to_string(),
                    row[1].clone(),
                    row[2].clone(),
                    format!("{:.3e}", p.alloc.objective),
                    row[3].clone(),
                    row[4].clone(),
                    row[5].clone(),
                    row[6].clone(),
                ]);
            }
        }
        print!("{}", t.render("  "));
    }
    if let Some(svg) = &a.svg {
        let xlabel = match resource {
            Resource::Size => "size (bytes)",
            Resource::AvgBits => "average bits per weight",
            Resource::Bops => "BOPs per sample",
            Resource::Latency => "latency (µs)",
        };
        let x: Vec<f64> = points.iter().map(|p| unit(p.alloc.budgets[0].used)).collect();
        let mut series = vec![Series {
            label: if c.robust.is_some() { "predicted Σ Ω (robust costs)".into() } else { "predicted Σ Ω".into() },
            xy: x.iter().zip(&points).map(|(&x, p)| (x, p.alloc.objective)).collect(),
            right: false,
            step: a.breakpoints,
            color: "#1f77b4",
        }];
        if c.robust.is_some() {
            series.push(Series {
                label: "nominal optimum Σ Ω".into(),
                xy: x.iter().zip(&points).filter_map(|(&x, p)| p.robust.map(|(_, no, _)| (x, no))).collect(),
                right: false,
                step: false,
                color: "#2ca02c",
            });
        }
        if a.eval {
            series.push(Series {
                label: "measured KL(FP32‖Q)".into(),
                xy: x.iter().zip(&points).filter_map(|(&x, p)| p.measured.map(|(m, _)| (x, m.kl))).collect(),
                right: true,
                step: false,
                color: "#d62728",
            });
        }
        crate::util::write_atomic(svg, plot_svg(&series, xlabel).as_bytes())?;
        println!("plot written to {}", svg.display());
    }
    Ok(())
}

/// One line of a plot.
struct Series {
    label: String,
    xy: Vec<(f64, f64)>,
    /// On the right-hand y axis (its own scale) instead of the left.
    right: bool,
    /// Drawn as a step function (the value holds until the next x), as the front of one budget is.
    step: bool,
    color: &'static str,
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

/// A line plot of one or two y axes (each series names its axis), with a legend.
fn plot_svg(series: &[Series], xlabel: &str) -> String {
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
