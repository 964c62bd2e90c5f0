//! The general solver: a 0/1 integer program through good_lp with the HiGHS backend, for any set
//! of budgets. One binary x_gj per group and option, Σ_j x_gj = 1 per group, Σ res_k·x ≤ limit_k
//! per budget, minimize Σ cost·x. Costs are scaled to mean magnitude 1 before HiGHS sees them so
//! that its absolute tolerances mean the same for Ω ≈ 1e-6 as for Ω ≈ 1e3.
//!
//! HiGHS alone spends seconds on a few thousand layers, almost all of it closing a gap of 1e-4
//! over options that cannot be optimal. So the solver first solves each budget alone with the
//! exact multiple-choice knapsack solver (milliseconds): every such optimum is a lower bound, and
//! when one of them keeps all the budgets it is the answer, proven optimal. Otherwise it solves
//! the LP relaxation, takes its budget prices λ_k, and computes each option's reduced cost
//! r = c + Σ λ_k·res_k − min_j(…) and the Lagrangian bound L(λ) (a lower bound for any λ ≥ 0). Every solution costs at least L + Σ r of its
//! options, so a solution that uses an option with r > t − L costs more than t: the integer program
//! restricted to the options with r ≤ t − L contains every solution cheaper than t. HiGHS solves
//! that small program; if its answer costs at most t it is the answer of the whole problem, with
//! HiGHS's bound as the certificate. Otherwise its answer becomes the threshold t (or, when the
//! restricted program is infeasible, t grows), which takes at most a few rounds. The gap reported
//! is the proven relative gap of the whole problem.

use super::mckp::ExactMckp;
use super::problem::{Group, GroupOption, Problem};
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
    /// Restrict the integer program by reduced-cost fixing against the LP prices first (exact;
    /// `false` hands HiGHS the whole program).
    pub reduce: bool,
}

impl Default for Highs {
    fn default() -> Self {
        Highs { rel_gap: 1e-9, time_limit_s: 600.0, threads: 1, reduce: true }
    }
}

/// The first threshold t = L + FIRST_MARGIN·|L|; each infeasible round multiplies the margin by 8.
const FIRST_MARGIN: f64 = 1e-4;

/// What HiGHS returned for one (restricted or relaxed) program.
struct Run {
    /// Option per group (integer runs) or None when infeasible.
    choice: Option<Vec<usize>>,
    /// HiGHS's relative MIP gap of its answer.
    gap: f64,
    /// HiGHS status, for notes.
    status: String,
    /// Column values (LP runs).
    cols: Vec<f64>,
    /// Row duals of the budget rows, in original units of cost per unit of resource.
    duals: Vec<f64>,
}

impl Highs {
    /// Builds and solves the program over the options `keep[g][j]` (all when None); `integer`
    /// false solves the LP relaxation. No MIP start is passed: with one, HiGHS 1.16.0 returned a suboptimal answer marked optimal on a 300-layer instance.
    fn run(&self, p: &Problem, keep: Option<&[Vec<bool>]>, integer: bool) -> Result<Run> {
        let kept = |g: usize, j: usize| keep.is_none_or(|k| k[g][j]);
        let n_opts: usize = p.groups.iter().map(|g| g.options.len()).sum();
        let mean = p.groups.iter().flat_map(|g| g.options.iter().map(|o| o.cost.abs())).sum::<f64>() / n_opts.max(1) as f64;
        let scale = if mean > 0.0 && mean.is_finite() { 1.0 / mean } else { 1.0 };
        let mut vars = ProblemVariables::new();
        // Column of each kept option.
        let mut x: Vec<Vec<Option<Variable>>> = Vec::with_capacity(p.groups.len());
        let mut cols_of: Vec<(usize, usize)> = Vec::new();
        for (g, grp) in p.groups.iter().enumerate() {
            let mut xs = Vec::with_capacity(grp.options.len());
            for j in 0..grp.options.len() {
                if kept(g, j) {
                    let v = if integer { variable().binary() } else { variable().min(0.0).max(1.0) };
                    xs.push(Some(vars.add(v)));
                    cols_of.push((g, j));
                } else {
                    xs.push(None);
                }
            }
            x.push(xs);
        }
        let mut objective = Expression::with_capacity(cols_of.len());
        for &(g, j) in &cols_of {
            objective.add_mul(p.groups[g].options[j].cost * scale, x[g][j].expect("kept"));
        }
        let mut model = vars.minimise(objective).using(good_lp::highs);
        for xs in &x {
            let mut e = Expression::with_capacity(xs.len());
            for v in xs.iter().flatten() {
                e.add_mul(1.0, *v);
            }
            model.add_constraint(e.eq(1.0));
        }
        let mut units = Vec::with_capacity(p.budgets.len());
        for (k, b) in p.budgets.iter().enumerate() {
            // Rows in units of the limit keep HiGHS's feasibility tolerance relative.
            let unit = if b.limit.abs() > 0.0 { b.limit.abs() } else { 1.0 };
            units.push(unit);
            let mut e = Expression::with_capacity(cols_of.len());
            for &(g, j) in &cols_of {
                let r = p.groups[g].options[j].res[k];
                if r != 0.0 {
                    e.add_mul(r / unit, x[g][j].expect("kept"));
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
        if !integer {
            // The relaxation is a few thousand rows of one kind; dual simplex without presolve is
            // the fastest on it (measured on the 2,000-layer benchmark).
            hm.set_option("presolve", "off");
            hm.set_option("simplex_strategy", 1);
        }
        if integer && keep.is_some() {
            // HiGHS 1.16.0's presolve returned suboptimal answers marked optimal (gap 0) on
            // restricted programs of the 300-layer synthetic tests; without it they are right.
            hm.set_option("presolve", "off");
        }
        let solved = hm.try_solve().map_err(|e| Error::invalid("solver", "highs", format!("HiGHS failed: {e:?}")))?;
        let status = format!("{:?}", solved.status());
        let sol = solved.get_solution();
        let mut run = Run { choice: None, gap: f64::INFINITY, status: status.clone(), cols: Vec::new(), duals: Vec::new() };
        if status.contains("Infeasible") {
            return Ok(run);
        }
        let cols = sol.columns();
        if cols.len() != cols_of.len() {
            return Err(Error::invalid("solver", "highs", format!("HiGHS status {status}")));
        }
        if !integer {
            let rows = sol.dual_rows();
            let ng = p.groups.len();
            // Prices of the budget rows in original units (|dual|: every λ ≥ 0 gives a valid bound,
            // whatever sign convention the duals follow).
            run.duals = (0..p.budgets.len()).map(|k| rows.get(ng + k).map_or(0.0, |y| y.abs() / (units[k] * scale))).collect();
            let mut full = vec![0.0; n_opts];
            let offsets: Vec<usize> = p.groups.iter().scan(0, |s, g| Some(std::mem::replace(s, *s + g.options.len()))).collect();
            for (c, &(g, j)) in cols_of.iter().enumerate() {
                full[offsets[g] + j] = cols[c];
            }
            run.cols = full;
            return Ok(run);
        }
        let mut choice = vec![usize::MAX; p.groups.len()];
        let mut best = vec![f64::NEG_INFINITY; p.groups.len()];
        for (c, &(g, j)) in cols_of.iter().enumerate() {
            if cols[c] > best[g] {
                best[g] = cols[c];
                choice[g] = j;
            }
        }
        if best.iter().any(|&b| b < 0.5) {
            return Err(Error::invalid("solver", "highs", format!("HiGHS status {status}: no integer solution found")));
        }
        let gap = solved.mip_gap();
        run.gap = if gap.is_finite() { gap.max(0.0) } else { f64::INFINITY };
        run.choice = Some(choice);
        Ok(run)
    }

    /// The whole program at once (no reduction).
    fn solve_whole(&self, p: &Problem) -> Result<Option<Solution>> {
        let run = self.run(p, None, true)?;
        let Some(choice) = run.choice else { return Ok(None) };
        let obj = p.cost(&choice);
        let bound = if run.gap.is_finite() { obj - run.gap * obj.abs() } else { f64::NEG_INFINITY };
        let note = (!run.status.contains("Optimal")).then(|| format!("HiGHS stopped with status {}", run.status));
        Ok(Some(Solution { choice, bound, note }))
    }
}

impl Solver for Highs {
    fn name(&self) -> &'static str {
        "highs"
    }

    fn solve(&self, p: &Problem) -> Result<Option<Solution>> {
        if !self.reduce || p.budgets.is_empty() {
            return self.solve_whole(p);
        }
        // Each budget alone is a relaxation the exact MCKP solver settles in milliseconds: the best
        // of their optima is a lower bound, and one whose answer keeps every budget is optimal.
        let mut relax_lb = f64::NEG_INFINITY;
        let mut incumbent: Option<(f64, Vec<usize>)> = None;
        for k in 0..p.budgets.len() {
            let Some(sol) = ExactMckp::default().solve(&only_budget(p, k))? else { return Ok(None) };
            relax_lb = relax_lb.max(sol.bound);
            if p.feasible(&sol.choice) {
                let z = p.cost(&sol.choice);
                if incumbent.as_ref().is_none_or(|(b, _)| z < *b) {
                    incumbent = Some((z, sol.choice));
                }
            }
        }
        if let Some((z, choice)) = &incumbent {
            if z - relax_lb <= self.rel_gap * z.abs() {
                tracing::debug!(relax_lb, z, "highs: a one-budget optimum keeps every budget");
                return Ok(Some(Solution { choice: choice.clone(), bound: relax_lb.min(*z), note: None }));
            }
        }
        let lp = self.run(p, None, false)?;
        if lp.cols.is_empty() {
            return Ok(None);
        }
        // Lagrangian bound and reduced costs at the LP prices.
        let lam = &lp.duals;
        let priced: Vec<Vec<f64>> = p
            .groups
            .iter()
            .map(|g| g.options.iter().map(|o| o.cost + o.res.iter().zip(lam).map(|(r, l)| r * l).sum::<f64>()).collect())
            .collect();
        let mins: Vec<f64> = priced.iter().map(|v| v.iter().copied().fold(f64::INFINITY, f64::min)).collect();
        let l_lambda = mins.iter().sum::<f64>() - p.budgets.iter().zip(lam).map(|(b, l)| b.limit * l).sum::<f64>();
        if !l_lambda.is_finite() {
            return self.solve_whole(p);
        }
        // The best proven lower bound so far (L(λ) fixes options, `lower` certifies answers).
        let lower = l_lambda.max(relax_lb);
        let mag = l_lambda.abs().max(p.groups.iter().flat_map(|g| g.options.iter().map(|o| o.cost.abs())).fold(0.0, f64::max) * 1e-6);
        let eps = 1e-9 * mag.max(1e-300);
        // An incumbent from the LP: its rounding, repaired and filled greedily. When it is already
        // within the requested gap of L(λ), it is the answer and L(λ) its certificate.
        let mut start = round_lp(p, &lp.cols);
        if let Some((z, choice)) = incumbent {
            if start.as_ref().is_none_or(|s| z < p.cost(s)) {
                start = Some(choice);
            }
        }
        if let Some(choice) = &start {
            let z = p.cost(choice);
            if z - lower <= self.rel_gap * z.abs() {
                tracing::debug!(lower, z, "highs: incumbent within the requested gap");
                return Ok(Some(Solution { choice: choice.clone(), bound: lower.min(z), note: None }));
            }
        }
        let mut margin = FIRST_MARGIN * mag.max(1e-300);
        let mut threshold = match &start {
            Some(choice) => p.cost(choice),
            None => l_lambda + margin,
        };
        for round in 0.. {
            let keep: Vec<Vec<bool>> =
                priced.iter().zip(&mins).map(|(v, &m)| v.iter().map(|&x| x - m <= threshold - l_lambda + eps).collect()).collect();
            let all = keep.iter().all(|k| k.iter().all(|&b| b));
            if all {
                // Nothing left to remove: the restricted program is the whole program.
                let mut s = match self.run(p, None, true)? {
                    Run { choice: Some(choice), gap, status, .. } => (choice, gap, status),
                    _ => return Ok(None),
                };
                let obj = p.cost(&s.0);
                let bound = if s.1.is_finite() { (obj - s.1 * obj.abs()).max(lower).min(obj) } else { lower.min(obj) };
                let note = (!s.2.contains("Optimal")).then(|| format!("HiGHS stopped with status {}", std::mem::take(&mut s.2)));
                return Ok(Some(Solution { choice: s.0, bound, note }));
            }
            let run = self.run(p, Some(&keep), true)?;
            // The better of HiGHS's answer and the incumbent (HiGHS may stop on a worse one at its gap).
            let found = match (run.choice, start.take()) {
                (Some(a), Some(b)) => Some(if p.cost(&b) < p.cost(&a) { b } else { a }),
                (a, b) => a.or(b),
            };
            match found {
                Some(choice) => {
                    let obj = p.cost(&choice);
                    if obj <= threshold + eps {
                        // Every solution outside the restricted program costs more than the threshold.
                        let restricted = if run.gap.is_finite() { obj - run.gap * obj.abs() } else { f64::NEG_INFINITY };
                        let bound = restricted.min(threshold).max(lower).min(obj);
                        let kept = keep.iter().flatten().filter(|&&b| b).count();
                        tracing::debug!(round, kept, l_lambda, threshold, obj, "highs with reduced-cost fixing");
                        let note = (!run.status.contains("Optimal")).then(|| format!("HiGHS stopped with status {}", run.status));
                        return Ok(Some(Solution { choice, bound, note }));
                    }
                    // A real solution: everything cheaper than it lies within its threshold.
                    threshold = obj;
                    start = Some(choice);
                }
                None => {
                    margin *= 8.0;
                    threshold = l_lambda + margin;
                }
            }
        }
        unreachable!("the loop returns once every option is kept")
    }
}

/// `p` with budget `k` only (a relaxation of `p`).
fn only_budget(p: &Problem, k: usize) -> Problem {
    let groups = p
        .groups
        .iter()
        .map(|g| Group {
            layers: g.layers.clone(),
            options: g
                .options
                .iter()
                .map(|o| GroupOption { format: o.format.clone(), cost: o.cost, res: vec![o.res[k]], option_index: o.option_index.clone() })
                .collect(),
        })
        .collect();
    Problem { groups, budgets: vec![p.budgets[k].clone()] }
}

/// A feasible choice near the LP solution `cols` (one value per option, groups in order): each
/// group takes its largest option, budgets over their limit are repaired by the moves that save
/// the most of them per unit of cost, and the budget left is spent by the moves that save the most
/// cost per unit of budget. None when the repair fails.
fn round_lp(p: &Problem, cols: &[f64]) -> Option<Vec<usize>> {
    let nb = p.budgets.len();
    let limit: Vec<f64> = p.budgets.iter().map(|b| b.limit + super::problem::tol(b.limit)).collect();
    let unit: Vec<f64> = p.budgets.iter().map(|b| b.limit.abs().max(1e-300)).collect();
    let mut choice = Vec::with_capacity(p.groups.len());
    let mut i = 0;
    for g in &p.groups {
        let v = &cols[i..i + g.options.len()];
        choice.push((0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b]).then(b.cmp(&a))).unwrap_or(0));
        i += g.options.len();
    }
    let mut used: Vec<f64> = (0..nb).map(|k| p.usage(&choice, k)).collect();
    // Repair: while a budget is exceeded, take the move with the least cost per unit of excess removed.
    for _ in 0..p.groups.len() + 1 {
        let over: Vec<bool> = (0..nb).map(|k| used[k] > limit[k]).collect();
        if !over.iter().any(|&o| o) {
            break;
        }
        let mut best: Option<(f64, usize, usize)> = None;
        for (g, grp) in p.groups.iter().enumerate() {
            let cur = &grp.options[choice[g]];
            for (j, o) in grp.options.iter().enumerate() {
                let mut gain = 0.0;
                let mut ok = true;
                for k in 0..nb {
                    let d = o.res[k] - cur.res[k];
                    if over[k] {
                        gain -= d.max(-(used[k] - limit[k])) / unit[k];
                    } else if used[k] + d > limit[k] {
                        ok = false;
                    }
                }
                if ok && gain > 0.0 {
                    let rate = (o.cost - cur.cost) / gain;
                    if best.is_none_or(|b| rate < b.0) {
                        best = Some((rate, g, j));
                    }
                }
            }
        }
        let (_, g, j) = best?;
        for (k, u) in used.iter_mut().enumerate() {
            *u += p.groups[g].options[j].res[k] - p.groups[g].options[choice[g]].res[k];
        }
        choice[g] = j;
    }
    if (0..nb).any(|k| used[k] > limit[k]) {
        return None;
    }
    // Fill: take cost-saving moves that fit, most saving per unit of scaled resource first.
    for _ in 0..p.groups.len() {
        let mut best: Option<(f64, usize, usize)> = None;
        for (g, grp) in p.groups.iter().enumerate() {
            let cur = &grp.options[choice[g]];
            for (j, o) in grp.options.iter().enumerate() {
                let save = cur.cost - o.cost;
                if save <= 0.0 || (0..nb).any(|k| used[k] + o.res[k] - cur.res[k] > limit[k]) {
                    continue;
                }
                let spend: f64 = (0..nb).map(|k| ((o.res[k] - cur.res[k]) / unit[k]).max(0.0)).sum();
                let rate = save / spend.max(1e-300);
                if best.is_none_or(|b| rate > b.0) {
                    best = Some((rate, g, j));
                }
            }
        }
        let Some((_, g, j)) = best else { break };
        for (k, u) in used.iter_mut().enumerate() {
            *u += p.groups[g].options[j].res[k] - p.groups[g].options[choice[g]].res[k];
        }
        choice[g] = j;
    }
    Some(choice)
}
