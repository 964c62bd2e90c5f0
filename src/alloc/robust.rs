//! Robust allocation: how much the answer depends on the noise of the sensitivities.
//!
//! A Hutchinson trace is an estimate with a standard error; a layer whose trace is uncertain may
//! be more sensitive than its mean says. The robust mode solves over a second cost table whose
//! traces are upper confidence bounds, Tr + z·s.e. (built by
//! [`CostTable::build_nominal_and_robust`](crate::cost::CostTable::build_nominal_and_robust)), and
//! [`compare`] reports what that changes: which layers get another format, and each solution's
//! objective under both tables. Because every robust cost is at least its nominal cost, the robust
//! optimum is at least the nominal one, and each solution is the best under its own table — the
//! four numbers say how much protection the robust choice buys and what it costs nominally.

use super::{solve_problem, Allocation, Constraints, Problem, SolverKind};
use crate::cost::CostTable;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// A layer whose format differs between the nominal and the robust allocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FormatChange {
    /// Layer name.
    pub layer: String,
    /// Format of the nominal allocation.
    pub nominal: String,
    /// Format of the robust allocation.
    pub robust: String,
}

/// The nominal and the robust allocation of one problem, side by side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RobustComparison {
    /// The z of the upper bounds (trace + z·s.e.).
    pub z: f64,
    /// The optimum under the nominal costs.
    pub nominal: Allocation,
    /// The optimum under the robust (upper-bound) costs.
    pub robust: Allocation,
    /// Layers whose format differs, in table order.
    pub changed: Vec<FormatChange>,
    /// Σ Ω of the nominal allocation under the robust costs.
    pub nominal_under_robust: f64,
    /// Σ Ω of the robust allocation under the nominal costs.
    pub robust_under_nominal: f64,
}

impl Allocation {
    /// Σ Ω of this allocation's formats under another table with the same layers and labels.
    pub fn cost_under(&self, table: &CostTable) -> Result<f64> {
        let mut sum = 0.0;
        for l in &self.layers {
            let layer = table.layer(&l.name)?;
            let o = layer.option(&l.format).ok_or_else(|| {
                Error::invalid(format!("format of layer `{}`", l.name), &l.format, "the other cost table has no such option for this layer")
            })?;
            sum += o.cost;
        }
        Ok(sum)
    }
}

/// Compares two solved allocations (nominal, robust) of the same constraints.
pub fn compare_allocations(
    nominal_table: &CostTable,
    robust_table: &CostTable,
    z: f64,
    nominal: Allocation,
    robust: Allocation,
) -> Result<RobustComparison> {
    let changed = nominal
        .layers
        .iter()
        .zip(&robust.layers)
        .filter(|(n, r)| n.format != r.format)
        .map(|(n, r)| FormatChange { layer: n.name.clone(), nominal: n.format.clone(), robust: r.format.clone() })
        .collect();
    let nominal_under_robust = nominal.cost_under(robust_table)?;
    let robust_under_nominal = robust.cost_under(nominal_table)?;
    Ok(RobustComparison { z, nominal, robust, changed, nominal_under_robust, robust_under_nominal })
}

/// Solves `constraints` over the nominal and the robust table with the same solver and compares
/// the two optima. The tables must list the same layers and options (only costs differ).
pub fn compare(
    nominal_table: &CostTable,
    robust_table: &CostTable,
    z: f64,
    constraints: &Constraints,
    kind: SolverKind,
) -> Result<RobustComparison> {
    let pn = Problem::new(nominal_table, constraints)?;
    let pr = Problem::new(robust_table, constraints)?;
    let solver = kind.solver(pn.budgets.len());
    let nominal = solve_problem(nominal_table, &pn, solver.as_ref())?;
    let robust = solve_problem(robust_table, &pr, solver.as_ref())?;
    compare_allocations(nominal_table, robust_table, z, nominal, robust)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::{CostOption, LayerCosts};
    use crate::util::SplitMix64;

    /// A nominal table and an upper-bound one: each layer's costs scaled by 1 + z·(relative s.e.).
    fn tables(seed: u64, n: usize, z: f64) -> (CostTable, CostTable) {
        let mut r = SplitMix64(seed);
        let mut nominal = Vec::new();
        let mut robust = Vec::new();
        for i in 0..n {
            let params = 64 + (r.next_u64() % 1000) as i64;
            let sens = r.next_f64() * 3.0;
            let rel_se = r.next_f64() * 0.8;
            let mut on = Vec::new();
            let mut or = Vec::new();
            for b in [2u64, 3, 4, 8, 32] {
                let bits = params as u64 * b + if b == 32 { 0 } else { 256 };
                let cost = if b == 32 { 0.0 } else { sens * 4f64.powi(-(b as i32)) * (0.5 + r.next_f64()) };
                let o = CostOption {
                    format: if b == 32 { "fp32".into() } else { format!("int{b}") },
                    cost,
                    bytes: bits.div_ceil(8),
                    bits,
                    bops: 0.0,
                    latency_us: None,
                };
                or.push(CostOption { cost: cost * (1.0 + z * rel_se), ..o.clone() });
                on.push(o);
            }
            nominal.push(LayerCosts { name: format!("l{i}"), params, trace_per_param: None, options: on });
            robust.push(LayerCosts { name: format!("l{i}"), params, trace_per_param: None, options: or });
        }
        (CostTable { layers: nominal }, CostTable { layers: robust })
    }

    #[test]
    fn robust_objective_bounds() {
        let mut any_change = false;
        for seed in 0..20u64 {
            let (tn, tr) = tables(seed, 12, 1.96);
            for budget in ["avg-bits=3.5", "size=30%", "avg-bits=5"] {
                let c = Constraints { budgets: vec![budget.parse().unwrap()], ..Default::default() };
                let cmp = compare(&tn, &tr, 1.96, &c, SolverKind::Exact).unwrap();
                let eps = 1e-9 * cmp.robust.objective.abs().max(1e-12);
                // Every robust cost ≥ its nominal cost, so the robust optimum ≥ the nominal one ...
                assert!(cmp.robust.objective >= cmp.nominal.objective - eps);
                // ... each optimum is the best under its own table ...
                assert!(cmp.nominal_under_robust >= cmp.robust.objective - eps);
                assert!(cmp.robust_under_nominal >= cmp.nominal.objective - eps);
                // ... and the nominal config under robust costs is at least its nominal objective.
                assert!(cmp.nominal_under_robust >= cmp.nominal.objective - eps);
                assert_eq!(cmp.changed.is_empty(), cmp.nominal.layers.iter().zip(&cmp.robust.layers).all(|(a, b)| a.format == b.format));
                assert!((cmp.robust.cost_under(&tr).unwrap() - cmp.robust.objective).abs() <= eps);
                any_change |= !cmp.changed.is_empty();
            }
        }
        assert!(any_change, "the upper bounds never changed a format on 60 instances");
    }

    #[test]
    fn z_zero_changes_nothing() {
        let (tn, tr) = tables(4, 10, 0.0);
        let c = Constraints { budgets: vec!["avg-bits=4".parse().unwrap()], ..Default::default() };
        let cmp = compare(&tn, &tr, 0.0, &c, SolverKind::Auto).unwrap();
        assert!(cmp.changed.is_empty());
        assert_eq!(cmp.robust.objective, cmp.nominal.objective);
    }

    #[test]
    fn cost_under_names_a_missing_option() {
        let (tn, _) = tables(2, 3, 1.0);
        let c = Constraints { budgets: vec!["avg-bits=8".parse().unwrap()], ..Default::default() };
        let a = super::super::solve(&tn, &c, SolverKind::Auto).unwrap();
        let mut other = tn.clone();
        for l in &mut other.layers {
            l.options.retain(|o| o.format == "int2");
        }
        let e = a.cost_under(&other).unwrap_err().to_string();
        assert!(e.contains("no such option"), "{e}");
    }
}
