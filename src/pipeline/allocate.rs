//! Costs + constraints → an allocation (nominal, or robust beside the nominal one) → a config
//! carrying its provenance.

use super::costs::Costs;
use crate::alloc::{compare_robust, solve, Allocation, Constraints, RobustComparison, SolverKind};
use crate::config::QuantConfig;
use crate::cost::CostTable;
use crate::error::Result;
use serde_json::json;

/// An allocation, the robust comparison when robust costs were solved, and its config.
#[derive(Debug, Clone)]
pub struct Allocated {
    /// The allocation written to the config (the robust one under robust costs).
    pub alloc: Allocation,
    /// Robust vs nominal, when robust costs were given.
    pub robust: Option<RobustComparison>,
    /// The config, with provenance.
    pub config: QuantConfig,
}

/// Solves `table` under `cons`; with `robust` = (z, upper-bound table), solves both and returns
/// the robust allocation with its comparison against the nominal one.
pub fn solve_nominal_or_robust(
    table: &CostTable,
    robust: Option<&(f64, CostTable)>,
    cons: &Constraints,
    solver: SolverKind,
) -> Result<(Allocation, Option<RobustComparison>)> {
    match robust {
        Some((z, rt)) => {
            let cmp = compare_robust(table, rt, *z, cons, solver)?;
            Ok((cmp.robust.clone(), Some(cmp)))
        }
        None => Ok((solve(table, cons, solver)?, None)),
    }
}

/// The provenance entry of a robust solution.
pub fn robust_provenance(c: &RobustComparison) -> serde_json::Value {
    json!({
        "z": c.z,
        "changed_layers": c.changed.len(),
        "changes": c.changed,
        "nominal_objective": c.nominal.objective,
        "robust_objective": c.robust.objective,
        "nominal_config_under_robust_costs": c.nominal_under_robust,
        "robust_config_under_nominal_costs": c.robust_under_nominal,
    })
}

/// Allocates over `costs` (robustly when they carry robust costs) and makes the config, whose
/// provenance records the costs' sources, `command` and the robust comparison.
pub fn allocate(costs: &Costs, cons: &Constraints, solver: SolverKind, command: &str) -> Result<Allocated> {
    let (alloc, robust) = solve_nominal_or_robust(&costs.table, costs.robust.as_ref(), cons, solver)?;
    let mut config = alloc.to_config(costs.model.clone())?;
    config.provenance.extend(costs.provenance.clone());
    config.provenance.insert("command".into(), json!(command));
    if let Some(cmp) = &robust {
        config.provenance.insert("robust".into(), robust_provenance(cmp));
    }
    Ok(Allocated { alloc, robust, config })
}
