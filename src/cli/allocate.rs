//! `mixq allocate`: sensitivity report (or a user cost table) + budgets → QuantConfig.

use super::args::{ConstraintArgs, CostArgs, SolverArg};
use super::render;
use crate::pipeline::allocate::allocate;
use crate::pipeline::costs::{costs, Costs};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// `mixq allocate`.
#[derive(Args, Debug)]
pub struct AllocateArgs {
    #[command(flatten)]
    pub(crate) cost: CostArgs,
    #[command(flatten)]
    pub(crate) constraints: ConstraintArgs,
    /// Budget (repeatable): `size=2.1MB`, `avg-bits=4.5`, `bops=1.2G`, `latency=3ms`, or relative
    /// between the smallest and largest configuration: `size=40%`.
    #[arg(long = "budget", required = true)]
    pub budgets: Vec<String>,
    /// Solver: auto (exact for one budget, HiGHS otherwise), exact, highs, greedy.
    #[arg(long, value_enum, default_value_t = SolverArg::Auto)]
    pub solver: SolverArg,
    /// Write the QuantConfig (JSON) here, atomically.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Print the allocation as JSON on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// The cost table of `a`, written to `--write-cost-table` when asked.
pub fn load_costs(a: &CostArgs) -> Result<Costs> {
    let (source, settings) = a.source_and_settings()?;
    let c = costs(&source, &settings)?;
    if let Some(out) = &a.write_cost_table {
        c.table.save(out)?;
        eprintln!("cost table written to {}", out.display());
    }
    Ok(c)
}

/// Runs `mixq allocate`.
pub fn run(a: AllocateArgs) -> Result<()> {
    let c = load_costs(&a.cost)?;
    let cons = a.constraints.with_budgets(&a.budgets)?;
    let out = allocate(&c, &cons, a.solver.into(), &super::args::command_line())?;
    if let Some(path) = &a.output {
        out.config.save(path)?;
    }
    if a.json {
        match &out.robust {
            Some(cmp) => println!("{}", serde_json::to_string_pretty(cmp)?),
            None => println!("{}", serde_json::to_string_pretty(&out.alloc)?),
        }
    } else {
        print!("{}", render::allocation(&out.alloc));
        if let Some(cmp) = &out.robust {
            println!();
            print!("{}", render::robust(cmp));
        }
        if let Some(path) = &a.output {
            println!("config written to {}", path.display());
        }
    }
    Ok(())
}
