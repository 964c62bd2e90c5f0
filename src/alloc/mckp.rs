//! The multiple-choice knapsack solvers for one budget: an exact solver and the greedy baseline,
//! both built on the LP relaxation over each group's lower convex hull.
//!
//! The LP relaxation of a multiple-choice knapsack is solved greedily (Sinha–Zoltners): start every
//! group at its lightest option, and take hull increments in order of cost saved per unit of
//! resource until the budget is spent; the last increment taken fractionally gives the LP bound and
//! its slope the dual price λ. The exact solver then follows Pisinger's minimal core algorithm
//! (EJOR 83, 1995), a dynamic program over a small core: (1) the LP rounded down is the base
//! solution (every group at a minimizer of c + λw) and the LP rounded down plus a greedy fill of the
//! leftover budget the incumbent z; (2) every option whose reduced cost c + λw − min(c + λw)
//! exceeds z − L(λ) is removed (no solution using it beats z), which leaves a core of groups with
//! alternatives; (3) the core groups are added one at a time, those whose alternatives are closest
//! to the price λ first, to a list of states (Δweight, Δcost against the base, the other groups at
//! their base option). Dominated states are dropped, and a state is fathomed when a bound on every
//! completion, Δcost plus the cheapest rate at which the groups still open can use its slack or
//! repair its excess, cannot beat z. Weights and costs stay real numbers: nothing is discretized.
//! The result is optimal up to floating-point rounding (gap 0) unless the state limit is hit, and
//! then the least bound of the live states certifies the gap that is reported.

use super::problem::Problem;
use super::{Solution, Solver};
use crate::error::{Error, Result};

/// Exact multiple-choice knapsack solver for problems with at most one budget.
#[derive(Debug, Clone)]
pub struct ExactMckp {
    /// Stop the dynamic programming when more states than this are alive (the gap is then
    /// certified by the least bound of the live states).
    pub state_limit: usize,
}

impl Default for ExactMckp {
    fn default() -> Self {
        ExactMckp { state_limit: 1_000_000 }
    }
}

/// Greedy baseline: LP relaxation rounded down, then the leftover budget filled by efficiency.
/// With several budgets it walks hull increments of a scalarized resource (Σ res / limit) and takes
/// an increment only if every budget still holds; its bound is the best single-budget LP bound.
#[derive(Debug, Clone, Default)]
pub struct Greedy;

/// One group's lower convex hull: option indices, lightest first, costs strictly decreasing.
struct Hull {
    idx: Vec<usize>,
}

fn hull(w: &[f64], c: &[f64]) -> Hull {
    let mut order: Vec<usize> = (0..w.len()).collect();
    order.sort_by(|&a, &b| w[a].total_cmp(&w[b]).then(c[a].total_cmp(&c[b])).then(a.cmp(&b)));
    let mut pts: Vec<usize> = Vec::new();
    for &i in &order {
        if pts.last().is_none_or(|&l| c[i] < c[l]) {
            if pts.last().is_some_and(|&l| w[l] == w[i]) {
                continue;
            }
            pts.push(i);
        }
    }
    let mut h: Vec<usize> = Vec::new();
    for &p in &pts {
        while h.len() >= 2 {
            let (a, b) = (h[h.len() - 2], h[h.len() - 1]);
            // Efficiency (cost saved per unit resource) must strictly decrease along the hull.
            let e_ab = (c[a] - c[b]) / (w[b] - w[a]);
            let e_bp = (c[b] - c[p]) / (w[p] - w[b]);
            if e_ab <= e_bp {
                h.pop();
            } else {
                break;
            }
        }
        h.push(p);
    }
    Hull { idx: h }
}

/// An increment from hull position `pos` to `pos + 1` of group `g`.
#[derive(Clone, Copy)]
struct Inc {
    g: usize,
    pos: usize,
    dw: f64,
    dc: f64,
    eff: f64,
}

/// LP relaxation result.
struct Lp {
    /// LP optimum.
    value: f64,
    /// Dual price of the budget.
    lambda: f64,
    /// Integer rounding of the LP (hull position per group, increments fully taken).
    pos: Vec<usize>,
    /// Budget left after the rounded-down solution.
    left: f64,
}

/// Greedy LP over the given groups' hulls, weights `w[g][j]`, costs `c[g][j]`, capacity `cap`.
/// Returns None when even the lightest options do not fit.
fn lp(w: &[Vec<f64>], c: &[Vec<f64>], hulls: &[Hull], cap: f64, incs: &[Inc]) -> Option<Lp> {
    let mut left = cap;
    let mut value = 0.0;
    for (g, h) in hulls.iter().enumerate() {
        left -= w[g][h.idx[0]];
        value += c[g][h.idx[0]];
    }
    if left < -super::problem::tol(cap) {
        return None;
    }
    left = left.max(0.0);
    let mut pos = vec![0; hulls.len()];
    let mut lambda = 0.0;
    let mut lp_value = value;
    let mut broke = false;
    for inc in incs {
        if inc.dw <= left {
            left -= inc.dw;
            value += inc.dc;
            pos[inc.g] = inc.pos + 1;
        } else {
            lambda = inc.eff;
            lp_value = value + inc.dc * (left / inc.dw);
            broke = true;
            break;
        }
    }
    if !broke {
        lp_value = value;
    }
    Some(Lp { value: lp_value, lambda, pos, left })
}

fn increments(w: &[Vec<f64>], c: &[Vec<f64>], hulls: &[Hull]) -> Vec<Inc> {
    let mut incs = Vec::new();
    for (g, h) in hulls.iter().enumerate() {
        for p in 0..h.idx.len().saturating_sub(1) {
            let (a, b) = (h.idx[p], h.idx[p + 1]);
            let dw = w[g][b] - w[g][a];
            let dc = c[g][b] - c[g][a];
            incs.push(Inc { g, pos: p, dw, dc, eff: -dc / dw });
        }
    }
    incs.sort_by(|x, y| y.eff.total_cmp(&x.eff).then(x.g.cmp(&y.g)).then(x.pos.cmp(&y.pos)));
    incs
}

/// Greedy fill after the LP break: keep walking increments, taking those that still fit and
/// continue their group's chain.
fn fill(pos: &mut [usize], mut left: f64, incs: &[Inc]) {
    for inc in incs {
        if pos[inc.g] == inc.pos && inc.dw <= left {
            left -= inc.dw;
            pos[inc.g] += 1;
        }
    }
}

fn no_budget(p: &Problem) -> Solution {
    let choice: Vec<usize> = p
        .groups
        .iter()
        .map(|g| (0..g.options.len()).min_by(|&a, &b| g.options[a].cost.total_cmp(&g.options[b].cost)).unwrap_or(0))
        .collect();
    let obj = p.cost(&choice);
    Solution { choice, bound: obj, note: None }
}

fn weights_costs(p: &Problem, k: usize) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let w = p.groups.iter().map(|g| g.options.iter().map(|o| o.res[k]).collect()).collect();
    let c = p.groups.iter().map(|g| g.options.iter().map(|o| o.cost).collect()).collect();
    (w, c)
}

/// The LP bound of `p` with only budget `k` kept (a valid lower bound for the whole problem).
pub(crate) fn lp_bound(p: &Problem, k: usize) -> Option<f64> {
    let (w, c) = weights_costs(p, k);
    let hulls: Vec<Hull> = w.iter().zip(&c).map(|(w, c)| hull(w, c)).collect();
    let incs = increments(&w, &c, &hulls);
    lp(&w, &c, &hulls, p.budgets[k].limit, &incs).map(|l| l.value)
}

impl Solver for Greedy {
    fn name(&self) -> &'static str {
        "greedy"
    }

    fn solve(&self, p: &Problem) -> Result<Option<Solution>> {
        if p.budgets.is_empty() {
            return Ok(Some(no_budget(p)));
        }
        // Scalarized weight: Σ_k res_k / limit_k.
        let nb = p.budgets.len();
        let w: Vec<Vec<f64>> = p
            .groups
            .iter()
            .map(|g| g.options.iter().map(|o| (0..nb).map(|k| o.res[k] / p.budgets[k].limit.max(1e-300)).sum()).collect())
            .collect();
        let c: Vec<Vec<f64>> = p.groups.iter().map(|g| g.options.iter().map(|o| o.cost).collect()).collect();
        let hulls: Vec<Hull> = w.iter().zip(&c).map(|(w, c)| hull(w, c)).collect();
        let incs = increments(&w, &c, &hulls);
        let mut pos = vec![0usize; hulls.len()];
        let choice_of = |pos: &[usize]| -> Vec<usize> { pos.iter().zip(&hulls).map(|(&q, h)| h.idx[q]).collect() };
        let mut used: Vec<f64> = (0..nb).map(|k| p.usage(&choice_of(&pos), k)).collect();
        if (0..nb).any(|k| used[k] > p.budgets[k].limit + super::problem::tol(p.budgets[k].limit)) {
            if p.budgets.len() == 1 {
                return Ok(None);
            }
            return Err(Error::invalid(
                "solver",
                "greedy",
                "the greedy baseline found no feasible starting point for these budgets; use --solver highs",
            ));
        }
        for inc in &incs {
            if pos[inc.g] != inc.pos {
                continue;
            }
            let g = &p.groups[inc.g];
            let (a, b) = (&g.options[hulls[inc.g].idx[inc.pos]], &g.options[hulls[inc.g].idx[inc.pos + 1]]);
            let fits = (0..nb).all(|k| used[k] - a.res[k] + b.res[k] <= p.budgets[k].limit + super::problem::tol(p.budgets[k].limit));
            if fits {
                for (k, u) in used.iter_mut().enumerate() {
                    *u += b.res[k] - a.res[k];
                }
                pos[inc.g] += 1;
            }
        }
        let choice = choice_of(&pos);
        let bound = (0..nb).filter_map(|k| lp_bound(p, k)).fold(f64::NEG_INFINITY, f64::max);
        Ok(Some(Solution { choice, bound, note: None }))
    }
}

impl Solver for ExactMckp {
    fn name(&self) -> &'static str {
        "exact-mckp"
    }

    fn solve(&self, p: &Problem) -> Result<Option<Solution>> {
        match p.budgets.len() {
            0 => return Ok(Some(no_budget(p))),
            1 => {}
            n => {
                return Err(Error::invalid(
                    "solver",
                    "exact",
                    format!("the exact solver handles one budget, this problem has {n}; use --solver highs"),
                ))
            }
        }
        let cap = p.budgets[0].limit;
        let (w, c) = weights_costs(p, 0);
        let hulls: Vec<Hull> = w.iter().zip(&c).map(|(w, c)| hull(w, c)).collect();
        let incs = increments(&w, &c, &hulls);
        let Some(root) = lp(&w, &c, &hulls, cap, &incs) else { return Ok(None) };
        let lambda = root.lambda.max(0.0);
        // Base solution: the LP rounded down (every group at a minimizer of c + λw).
        let base: Vec<usize> = root.pos.iter().zip(&hulls).map(|(&q, h)| h.idx[q]).collect();
        let mut pos = root.pos.clone();
        fill(&mut pos, root.left, &incs);
        let greedy: Vec<usize> = pos.iter().zip(&hulls).map(|(&q, h)| h.idx[q]).collect();
        // Lagrangian bound L(λ) = Σ_g min_j (c + λw) − λ·cap, a lower bound for every λ ≥ 0.
        let mins: Vec<f64> =
            w.iter().zip(&c).map(|(w, c)| w.iter().zip(c).map(|(w, c)| c + lambda * w).fold(f64::INFINITY, f64::min)).collect();
        let l_lambda: f64 = mins.iter().sum::<f64>() - lambda * cap;
        let c0: f64 = base.iter().enumerate().map(|(g, &j)| c[g][j]).sum();
        let w0: f64 = base.iter().enumerate().map(|(g, &j)| w[g][j]).sum();
        let slack = cap - w0;
        let wtol = super::problem::tol(cap);
        let greedy_cost = p.cost(&greedy);
        let eps = 1e-12 * greedy_cost.abs().max(root.value.abs()).max(1e-300);
        // Reduced-cost fixing: an option whose reduced cost exceeds z − L(λ) is in no solution
        // better than the incumbent z. The core is every group with an alternative left.
        let gap_abs = greedy_cost - l_lambda + eps;
        let mut core: Vec<CoreGroup> = Vec::new();
        for g in 0..w.len() {
            let b = base[g];
            let mut opts = Vec::new();
            let (mut mu, mut nu) = (f64::INFINITY, f64::INFINITY);
            for j in 0..w[g].len() {
                let r = (c[g][j] + lambda * w[g][j] - mins[g]).max(0.0);
                let dw = w[g][j] - w[g][b];
                if j == b || r > gap_abs || dw == 0.0 {
                    continue;
                }
                if dw < 0.0 {
                    mu = mu.min(r / -dw);
                } else {
                    nu = nu.min(r / dw);
                }
                opts.push((j as u32, dw, c[g][j] - c[g][b]));
            }
            if !opts.is_empty() {
                core.push(CoreGroup { g: g as u32, opts, key: mu.min(nu), mu, nu });
            }
        }
        // Groups whose alternatives are closest to the LP price first: the bound of the groups
        // still open then tightens fastest (Pisinger's core expansion, minus the lazy sorting).
        core.sort_by(|a, b| a.key.total_cmp(&b.key).then(a.g.cmp(&b.g)));
        let n = core.len();
        let (mut mu_suf, mut nu_suf) = (vec![f64::INFINITY; n + 1], vec![f64::INFINITY; n + 1]);
        for d in (0..n).rev() {
            mu_suf[d] = mu_suf[d + 1].min(core[d].mu);
            nu_suf[d] = nu_suf[d + 1].min(core[d].nu);
        }
        // Dynamic programming over the core, one group at a time. A state is a partial choice over
        // the groups processed so far, the others at their base option: Δweight and Δcost against
        // the base solution. States dominated in both are dropped; a state whose bound cannot beat
        // the incumbent is fathomed. Every feasible state is a complete solution (incumbent update).
        let mut best_dc = greedy_cost - c0;
        let mut best_node: Option<u32> = None;
        let mut arena: Vec<Step> = Vec::new();
        let mut states = vec![State { dw: 0.0, dc: 0.0, node: NIL }];
        let mut next: Vec<State> = Vec::new();
        let mut shifted: Vec<State> = Vec::new();
        let mut merged: Vec<State> = Vec::new();
        let mut peak = 1usize;
        let mut stopped: Option<f64> = None;
        for d in 0..n {
            let (mu, nu) = (mu_suf[d + 1], nu_suf[d + 1].min(lambda));
            let bound = |s: &State| {
                let u = slack - s.dw;
                if u >= -wtol {
                    s.dc - (lambda - nu) * u.max(0.0)
                } else if mu.is_finite() {
                    s.dc + (mu + lambda) * -u
                } else {
                    f64::INFINITY
                }
            };
            let cg = &core[d];
            // The base option keeps every state as it is; each alternative shifts the sorted list.
            next.clear();
            next.extend(states.iter().copied().filter(|s| bound(s) < best_dc - eps));
            for &(j, dw, dc) in &cg.opts {
                shifted.clear();
                for s in &states {
                    let t = State { dw: s.dw + dw, dc: s.dc + dc, node: NIL };
                    if bound(&t) < best_dc - eps {
                        arena.push(Step { parent: s.node, g: cg.g, j });
                        let node = (arena.len() - 1) as u32;
                        shifted.push(State { node, ..t });
                    }
                }
                merge_pareto(&next, &shifted, &mut merged);
                std::mem::swap(&mut next, &mut merged);
            }
            // Incumbent update from feasible states, then fathoming against the new incumbent.
            for s in &next {
                if s.dw <= slack + wtol && s.dc < best_dc - eps {
                    best_dc = s.dc;
                    best_node = Some(s.node);
                }
            }
            states.clear();
            states.extend(next.iter().copied().filter(|s| bound(s) < best_dc - eps));
            peak = peak.max(states.len());
            if states.is_empty() {
                break;
            }
            if states.len() > self.state_limit || arena.len() > 16 * self.state_limit {
                // Out of room: every solution better than the incumbent extends a live state.
                let lb = states.iter().map(bound).fold(best_dc, f64::min);
                stopped = Some(c0 + lb.min(best_dc));
                break;
            }
        }
        let mut best = base;
        match best_node {
            Some(mut node) => {
                while node != NIL {
                    let s = arena[node as usize];
                    best[s.g as usize] = s.j as usize;
                    node = s.parent;
                }
            }
            None => best = greedy,
        }
        let best_cost = p.cost(&best);
        tracing::debug!(groups = w.len(), core = n, peak_states = peak, steps = arena.len(), lambda, "exact MCKP");
        let bound = match stopped {
            None => best_cost,
            Some(lb) => lb.max(l_lambda).max(root.value).min(best_cost),
        };
        let note = stopped.map(|_| format!("state limit {} reached; gap certified by the bound of the live states", self.state_limit));
        Ok(Some(Solution { choice: best, bound, note }))
    }
}

const NIL: u32 = u32::MAX;

/// A core group: its alternatives to the base option (option, Δweight, Δcost) and the least
/// reduced cost per unit of weight of its lighter (μ) and heavier (ν) alternatives.
struct CoreGroup {
    g: u32,
    opts: Vec<(u32, f64, f64)>,
    key: f64,
    mu: f64,
    nu: f64,
}

/// A dynamic-programming state: Δweight and Δcost against the base solution, and the last step
/// of its partial choice in the arena (NIL: all base options).
#[derive(Clone, Copy)]
struct State {
    dw: f64,
    dc: f64,
    node: u32,
}

/// One non-base choice of a state's history: group `g` takes option `j`, then `parent`'s steps.
#[derive(Clone, Copy)]
struct Step {
    parent: u32,
    g: u32,
    j: u32,
}

/// Merges two lists sorted by Δweight into `out`, keeping only states that no other state beats or
/// equals in both Δweight and Δcost (the Pareto frontier, sorted by Δweight, Δcost decreasing).
fn merge_pareto(a: &[State], b: &[State], out: &mut Vec<State>) {
    out.clear();
    let (mut i, mut k) = (0, 0);
    let mut last = f64::INFINITY;
    while i < a.len() || k < b.len() {
        let s = if k == b.len() || (i < a.len() && (a[i].dw, a[i].dc) <= (b[k].dw, b[k].dc)) {
            i += 1;
            a[i - 1]
        } else {
            k += 1;
            b[k - 1]
        };
        if s.dc < last {
            last = s.dc;
            out.push(s);
        }
    }
}
