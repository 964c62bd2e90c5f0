//! `mixq pareto`: the predicted front of one budget — sampled at evenly spaced budgets, or every
//! exact breakpoint (`--breakpoints`) — as CSV and SVG, optionally with robust costs (`--robust`)
//! and with each point's config evaluated on data (`--eval`).

use super::args::{ConstraintArgs, CostArgs, ModelArgs, SolverArg};
use super::render::metrics_row;
use super::table::Table;
use crate::alloc::Budget;
use crate::model::QuantModel;
use crate::pipeline::pareto::{pareto_front, Sampling};
use anyhow::{bail, Result};
use clap::Args;
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
    /// Data for --eval: `digits[:split]`, `.safetensors`, `X.npy[,Y.npy]`, `stdlib-text…`
    /// (default: the model's test data, `digits:test`).
    #[arg(long)]
    pub eval_data: Option<String>,
    /// Further fixed budgets held at every point (repeatable).
    #[arg(long = "budget")]
    pub budgets: Vec<String>,
    /// Solver: auto (exact for one budget, HiGHS otherwise), exact, highs, greedy.
    #[arg(long, value_enum, default_value_t = SolverArg::Auto)]
    pub solver: SolverArg,
    /// Write the front as CSV here.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Also draw the front as an SVG.
    #[arg(long)]
    pub svg: Option<PathBuf>,
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
    let mut c = super::allocate::load_costs(&a.cost)?;
    let cons = a.constraints.with_budgets(&a.budgets)?;
    let sampling = if a.breakpoints { Sampling::Breakpoints(a.max_breakpoints) } else { Sampling::Points(a.points) };
    let mut front = pareto_front(&c.table, c.robust.as_ref(), &cons, resource, sampling, a.solver.into())?;
    if a.breakpoints {
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
    }
    for (i, fraction, e) in &front.failed {
        eprintln!("point {i} ({:.1}%): {e}", 100.0 * fraction);
    }
    if a.eval {
        let model: Box<dyn QuantModel> = match c.loaded.take() {
            Some(m) => m,
            None => match &c.model {
                Some(m) => super::args::load(&ModelArgs { model: m.name.clone(), data: a.eval_data.clone() }, "test")?.0,
                None => bail!("--eval needs a model: give --sens REPORT.json (its model) or --model with --cost-table"),
            },
        };
        let data =
            crate::pipeline::load_data_for(&crate::pipeline::data_spec(model.name(), a.eval_data.as_deref(), "test"), model.as_ref())?;
        let bar = super::progress::bar(front.points.len() as u64, "evaluating");
        front.measure(model.as_ref(), &data, &mut |pt| {
            bar.set_message(format!("{:.1}%", 100.0 * pt.fraction));
            bar.inc(1);
        })?;
        bar.finish_and_clear();
        eprintln!("evaluated {} configs on {} ({} samples)", front.points.len(), data.name, data.len());
    }
    crate::util::write_atomic(&a.output, front.to_csv().as_bytes())?;
    let what = if a.breakpoints { "breakpoints" } else { "points" };
    let costs_kind = match &front.robust_z {
        Some(z) => format!(" (robust costs: Tr + {z}·s.e.)"),
        None => String::new(),
    };
    let points = &front.points;
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
            resource.display(p.alloc.budgets[0].used, front.params),
            p.alloc.objective
        );
        if let Some(rp) = p.robust {
            let _ = write!(line, "  nominal {:.4e}, {:>2} changed", rp.nominal_optimum, rp.changed_layers);
        }
        let _ = write!(line, "  {}", p.mix());
        println!("{line}");
    }
    if shown.len() < points.len() {
        println!("  ({} of {} rows shown; all are in the CSV)", shown.len(), points.len());
    }
    if let Some((base, name)) = &front.fp32 {
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
        let (series, xlabel) = front.series();
        crate::util::write_atomic(svg, crate::plot::line_plot_svg(&series, xlabel).as_bytes())?;
        println!("plot written to {}", svg.display());
    }
    Ok(())
}
