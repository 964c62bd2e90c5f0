//! Bit-width allocation: choose one format per layer so that the predicted loss increase Σ Ω is
//! minimal and every budget holds.
//!
//! The problem is a multiple-choice knapsack (one budget) or a multiple-choice integer program
//! (several). Three solvers sit behind one [`Solver`] trait so they can be swapped and
//! cross-checked: [`ExactMckp`] (branch-and-bound with LP / convex-hull bounds, one budget,
//! milliseconds for thousands of layers), [`Highs`] (0/1 ILP through good_lp + HiGHS, any set of
//! budgets) and [`Greedy`] (the baseline the others are measured against). Constraints — tie
//! groups, pins, allowed formats — are applied once when the [`Problem`] is built, so they hold
//! whichever solver runs. Every [`Allocation`] carries its own certificate: objective, proven
//! lower bound and gap, each budget's use and limit, solver and time. When no configuration fits,
//! the answer is [`Error::Infeasible`] with each budget's limit and smallest achievable value.
//!
//! [`breakpoints`] enumerates the exact steps of one budget's Pareto front (every distinct optimal
//! allocation as the budget grows), and [`robust`] compares the nominal optimum with the optimum
//! over upper-confidence-bound costs.
//!
//! ```no_run
//! # fn main() -> mixq::Result<()> {
//! use mixq::alloc::{solve, Constraints, SolverKind};
//! use mixq::cost::CostTable;
//! let table = CostTable::load(std::path::Path::new("costs.csv"))?;
//! let constraints = Constraints { budgets: vec!["avg-bits=4.5".parse()?], ..Default::default() };
//! let alloc = solve(&table, &constraints, SolverKind::Auto)?;
//! let config = alloc.to_config(None)?;
//! # Ok(()) }
//! ```

pub mod budget;
pub mod front;
mod ilp;
mod mckp;
pub mod problem;
pub mod robust;

pub use budget::{Budget, Limit, ResolvedBudget, Resource, Shortfall};
pub use front::{breakpoints, Front};
pub use ilp::Highs;
pub use mckp::{ExactMckp, Greedy};
pub use problem::{Allow, Constraints, Group, GroupOption, Pin, Problem, Tie};
pub use robust::{compare as compare_robust, compare_allocations, FormatChange, RobustComparison};

use crate::config::{LayerSetting, ModelRef, QuantConfig};
use crate::cost::CostTable;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Instant;

/// A solver's raw answer: one option index per group of the [`Problem`], and a proven lower bound
/// on the optimal objective.
#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    /// Option index per group.
    pub choice: Vec<usize>,
    /// A proven lower bound on the optimum (equal to the objective when optimal).
    pub bound: f64,
    /// Anything the user should know (node or time limit reached).
    pub note: Option<String>,
}

/// A solver over [`Problem`]s.
pub trait Solver {
    /// Short name for reports (`exact-mckp`, `highs`, `greedy`).
    fn name(&self) -> &'static str;
    /// Solves `p`; `Ok(None)` when no choice satisfies every budget.
    fn solve(&self, p: &Problem) -> Result<Option<Solution>>;
}

/// Which solver [`solve`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SolverKind {
    /// Exact branch-and-bound with one budget (or none), HiGHS otherwise.
    #[default]
    Auto,
    /// Exact multiple-choice knapsack branch-and-bound (at most one budget).
    Exact,
    /// 0/1 ILP through good_lp + HiGHS (any budgets).
    Highs,
    /// Greedy / LP-rounding baseline.
    Greedy,
}

impl SolverKind {
    /// The solver for a problem with `budgets` budgets.
    pub fn solver(self, budgets: usize) -> Box<dyn Solver> {
        match self {
            SolverKind::Auto if budgets <= 1 => Box::new(ExactMckp::default()),
            SolverKind::Auto | SolverKind::Highs => Box::new(Highs::default()),
            SolverKind::Exact => Box::new(ExactMckp::default()),
            SolverKind::Greedy => Box::new(Greedy),
        }
    }
}

/// The format chosen for one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerChoice {
    /// Layer name.
    pub name: String,
    /// Number of weights.
    pub params: i64,
    /// Tr(H)/n, when the costs came from Hessian traces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_per_param: Option<f64>,
    /// Chosen format label.
    pub format: String,
    /// Ω of the choice.
    pub cost: f64,
    /// Storage bytes.
    pub bytes: u64,
    /// Storage bits.
    pub bits: u64,
    /// BOPs per sample.
    pub bops: f64,
    /// Latency, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<f64>,
}

/// How much of one budget an allocation uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetUse {
    /// The budget as given.
    pub budget: String,
    /// The resource.
    pub resource: Resource,
    /// Amount used, in the solver's additive unit (bytes, bits, BOPs, µs).
    pub used: f64,
    /// The limit in the same unit.
    pub limit: f64,
    /// The least any allowed configuration uses.
    pub min: f64,
    /// The most any allowed configuration uses.
    pub max: f64,
    /// `used` for people (e.g. `4.503 bits/w`).
    pub used_display: String,
    /// `limit` for people.
    pub limit_display: String,
}

/// A solved allocation with its certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Allocation {
    /// Per-layer choices, in the table's layer order.
    pub layers: Vec<LayerChoice>,
    /// Σ Ω of the choices.
    pub objective: f64,
    /// Proven lower bound on the optimal Σ Ω.
    pub bound: f64,
    /// Proven relative gap (objective − bound) / |objective| (0 when proven optimal).
    pub gap: f64,
    /// Each budget's use and limit.
    pub budgets: Vec<BudgetUse>,
    /// Solver name.
    pub solver: String,
    /// Solver wall time in seconds (problem building excluded).
    pub time_s: f64,
    /// Solver notes (limits reached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Allocation {
    /// Total storage bytes.
    pub fn total_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.bytes).sum()
    }

    /// Average storage bits per weight (None when the table has no parameter counts).
    pub fn avg_bits(&self) -> Option<f64> {
        let p: i64 = self.layers.iter().map(|l| l.params).sum();
        (p > 0).then(|| self.layers.iter().map(|l| l.bits).sum::<u64>() as f64 / p as f64)
    }

    /// The allocation as a QuantConfig v1: every layer named explicitly, `fp32` as the default,
    /// and provenance with the budgets, objective, bound, gap, solver and time. Fails when a
    /// chosen label (from a user table) is not a mixq format.
    pub fn to_config(&self, model: Option<ModelRef>) -> Result<QuantConfig> {
        let mut cfg = QuantConfig::uniform(LayerSetting::default());
        cfg.model = model;
        for l in &self.layers {
            let (spec, act) = crate::cost::parse_option(&l.format).map_err(|e| {
                Error::invalid(format!("format of layer `{}`", l.name), &l.format, format!("cannot be written as a quant config: {e}"))
            })?;
            // fp32 inputs are the model's own: no activation quantizer.
            let setting = LayerSetting { activation: act.filter(|f| *f != crate::quant::Format::Fp32), ..LayerSetting::weight(spec) };
            cfg.layers.insert(l.name.clone(), setting);
        }
        cfg.provenance.insert("tool".into(), json!(format!("mixq {}", env!("CARGO_PKG_VERSION"))));
        cfg.provenance.insert("solver".into(), json!(self.solver));
        cfg.provenance.insert("objective".into(), json!(self.objective));
        cfg.provenance.insert("bound".into(), json!(self.bound));
        cfg.provenance.insert("gap".into(), json!(self.gap));
        cfg.provenance.insert(
            "budgets".into(),
            json!(self.budgets.iter().map(|b| json!({"budget": b.budget, "used": b.used, "limit": b.limit})).collect::<Vec<_>>()),
        );
        Ok(cfg)
    }
}

/// Builds the [`Problem`] and solves it. Infeasible budgets give an error stating the smallest
/// achievable value of each budget.
pub fn solve(table: &CostTable, constraints: &Constraints, kind: SolverKind) -> Result<Allocation> {
    let problem = Problem::new(table, constraints)?;
    let solver = kind.solver(problem.budgets.len());
    solve_problem(table, &problem, solver.as_ref())
}

/// Solves an already-built problem with `solver` (for cross-checks and sweeps).
pub fn solve_problem(table: &CostTable, problem: &Problem, solver: &dyn Solver) -> Result<Allocation> {
    let t0 = Instant::now();
    let sol = solver.solve(problem)?;
    let time_s = t0.elapsed().as_secs_f64();
    let sol = sol.ok_or_else(|| problem.infeasible(table, Some("each budget is reachable alone but not all at once")))?;
    if !problem.feasible(&sol.choice) {
        return Err(Error::invalid(
            "solver",
            solver.name(),
            "the solver returned a choice that exceeds a budget (numerical trouble); try another --solver",
        ));
    }
    let params = table.total_params();
    let mut layers: Vec<Option<LayerChoice>> = vec![None; table.layers.len()];
    for (g, &j) in problem.groups.iter().zip(&sol.choice) {
        let opt = &g.options[j];
        for (&li, &oi) in g.layers.iter().zip(&opt.option_index) {
            let l = &table.layers[li];
            let o = &l.options[oi];
            layers[li] = Some(LayerChoice {
                name: l.name.clone(),
                params: l.params,
                trace_per_param: l.trace_per_param,
                format: o.format.clone(),
                cost: o.cost,
                bytes: o.bytes,
                bits: o.bits,
                bops: o.bops,
                latency_us: o.latency_us,
            });
        }
    }
    let layers: Vec<LayerChoice> = layers.into_iter().map(|l| l.expect("every layer belongs to exactly one group")).collect();
    let objective = problem.cost(&sol.choice);
    let bound = sol.bound.min(objective);
    let gap = if objective.abs() > 0.0 { ((objective - bound) / objective.abs()).max(0.0) } else { 0.0 };
    let budgets = problem
        .budgets
        .iter()
        .enumerate()
        .map(|(k, b)| {
            let used = problem.usage(&sol.choice, k);
            BudgetUse {
                budget: b.budget.to_string(),
                resource: b.budget.resource,
                used,
                limit: b.limit,
                min: b.min,
                max: b.max,
                used_display: b.budget.resource.display(used, params),
                limit_display: b.budget.resource.display(b.limit, params),
            }
        })
        .collect();
    Ok(Allocation { layers, objective, bound, gap, budgets, solver: solver.name().to_string(), time_s, note: sol.note })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::{synthetic, CostOption, LayerCosts};

    #[test]
    fn infeasibility_is_typed_and_states_each_minimum() {
        let t = synthetic(1, 5, 3);
        let c = Constraints { budgets: vec!["avg-bits=1".parse().unwrap(), "size=100%".parse().unwrap()], ..Default::default() };
        match solve(&t, &c, SolverKind::Auto) {
            Err(e @ Error::Infeasible { .. }) => {
                let msg = e.to_string();
                let Error::Infeasible { budgets, joint } = e else { unreachable!() };
                assert_eq!(budgets.len(), 2);
                assert!(budgets[0].below_min() && !budgets[1].below_min() && joint.is_none());
                let min_bits: u64 = t.layers.iter().map(|l| l.options.iter().map(|o| o.bits).min().unwrap()).sum();
                assert_eq!(budgets[0].min, min_bits as f64);
                assert!(msg.contains("avg-bits limit 1.000 bits/w is below the smallest achievable"), "{msg}");
            }
            other => panic!("expected Error::Infeasible, got {other:?}"),
        }
    }

    #[test]
    fn jointly_infeasible_budgets_say_so() {
        // One layer: small and slow, or large and fast.
        let o = |format: &str, bytes: u64, latency: f64| CostOption {
            format: format.into(),
            cost: 1.0,
            bytes,
            bits: bytes * 8,
            bops: 0.0,
            latency_us: Some(latency),
        };
        let t = CostTable {
            layers: vec![LayerCosts {
                name: "fc".into(),
                params: 0,
                trace_per_param: None,
                options: vec![o("int2", 10, 100.0), o("int8", 100, 10.0)],
            }],
        };
        let c = Constraints { budgets: vec!["size=50B".parse().unwrap(), "latency=50us".parse().unwrap()], ..Default::default() };
        let e = solve(&t, &c, SolverKind::Highs).unwrap_err();
        let msg = e.to_string();
        match e {
            Error::Infeasible { budgets, joint } => {
                assert!(budgets.iter().all(|b| !b.below_min()) && joint.is_some(), "{msg}");
                assert!(msg.contains("within reach of the smallest achievable 10 B") && msg.contains("not all at once"), "{msg}");
            }
            other => panic!("expected Error::Infeasible, got {other:?}"),
        }
    }
}
