//! The general solver: a 0/1 integer program through good_lp with the HiGHS backend, for any set
//! of budgets. One binary x_gj per group and option, Σ_j x_gj = 1 per group, Σ res_k·x ≤ limit_k
//! per budget, minimize Σ cost·x. Costs are scaled to mean magnitude 1 before HiGHS sees them so
//! that its absolute tolerances mean the same for Ω ≈ 1e-6 as for Ω ≈ 1e3; the gap reported is
//! HiGHS's proven relative MIP gap.

use super::problem::Problem;
use super::{Solution, Solver};
use crate::error::{Error, Result};
use good_lp::{variable, Expression, ProblemVariables, SolverModel, Variable};

/// HiGHS through good_lp.
#[derive(Debug, Clone)]
pub struct Highs {
    /// Relative MIP gap at which HiGHS stops (1e-9: optimal up to rounding).
    pub rel_gap: f64,
    /// Time limit in seconds.
    pub time_limit_s: f64,
    /// HiGHS threads (1 keeps results reproducible).
    pub threads: u32,
}

impl Default for Highs {
    fn default() -> Self {
        Highs { rel_gap: 1e-9, time_limit_s: 600.0, threads: 1 }
    }
}

impl Solver for Highs {
    fn name(&self) -> &'static str {
        "highs"
    }

    fn solve(&self, p: &Problem) -> Result<Option<Solution>> {
        let n_opts: usize = p.groups.iter().map(|g| g.options.len()).sum();
        let mean = p.groups.iter().flat_map(|g| g.options.iter().map(|o| o.cost.abs())).sum::<f64>() / n_opts.max(1) as f64;
        let scale = if mean > 0.0 && mean.is_finite() { 1.0 / mean } else { 1.0 };
        let mut vars = ProblemVariables::new();
        let x: Vec<Vec<Variable>> = p.groups.iter().map(|g| g.options.iter().map(|_| vars.add(variable().binary())).collect()).collect();
        let mut objective = Expression::with_capacity(n_opts);
        for (g, xs) in p.groups.iter().zip(&x) {
            for (o, &v) in g.options.iter().zip(xs) {
                objective.add_mul(o.cost * scale, v);
            }
        }
        let mut model = vars.minimise(objective).using(good_lp::highs);
        for xs in &x {
            let mut e = Expression::with_capacity(xs.len());
            for &v in xs {
                e.add_mul(1.0, v);
            }
            model.add_constraint(e.eq(1.0));
        }
        for (k, b) in p.budgets.iter().enumerate() {
            // Rows in units of the limit keep HiGHS's feasibility tolerance relative.
            let unit = if b.limit.abs() > 0.0 { b.limit.abs() } else { 1.0 };
            let mut e = Expression::with_capacity(n_opts);
            for (g, xs) in p.groups.iter().zip(&x) {
                for (o, &v) in g.options.iter().zip(xs) {
                    if o.res[k] != 0.0 {
                        e.add_mul(o.res[k] / unit, v);
                    }
                }
            }
            model.add_constraint(e.leq(b.limit / unit));
        }
        let mut hm = model.try_into_inner().map_err(|e| Error::invalid("solver", "highs", format!("could not build the model: {e}")))?;
        hm.make_quiet();
        hm.set_option("mip_rel_gap", self.rel_gap);
        hm.set_option("mip_abs_gap", 0.0);
        hm.set_option("time_limit", self.time_limit_s);
        hm.set_option("threads", self.threads as i32);
        hm.set_option("mip_feasibility_tolerance", 1e-9);
        hm.set_option("primal_feasibility_tolerance", 1e-9);
        let solved = hm.try_solve().map_err(|e| Error::invalid("solver", "highs", format!("HiGHS failed: {e:?}")))?;
        let status = format!("{:?}", solved.status());
        let sol = solved.get_solution();
        let cols = sol.columns();
        if status.contains("Infeasible") {
            return Ok(None);
        }
        if cols.len() != n_opts {
            return Err(Error::invalid("solver", "highs", format!("HiGHS status {status}")));
        }
        let mut choice = Vec::with_capacity(p.groups.len());
        let mut i = 0;
        for g in &p.groups {
            let vals = &cols[i..i + g.options.len()];
            let j = (0..vals.len()).max_by(|&a, &b| vals[a].total_cmp(&vals[b])).unwrap_or(0);
            if vals[j] < 0.5 {
                return Err(Error::invalid("solver", "highs", format!("HiGHS status {status}: no integer solution found")));
            }
            choice.push(j);
            i += g.options.len();
        }
        let obj = p.cost(&choice);
        let gap = solved.mip_gap();
        let gap = if gap.is_finite() { gap.max(0.0) } else { f64::INFINITY };
        let bound = if gap.is_finite() { obj - gap * obj.abs() } else { f64::NEG_INFINITY };
        let note = (!status.contains("Optimal")).then(|| format!("HiGHS stopped with status {status}"));
        Ok(Some(Solution { choice, bound, note }))
    }
}
