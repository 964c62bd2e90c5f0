//! The multiple-choice knapsack solvers for one budget: an exact branch-and-bound and the greedy
//! baseline, both built on the LP relaxation over each group's lower convex hull.
//!
//! The LP relaxation of a multiple-choice knapsack is solved greedily (Sinha–Zoltners): start every
//! group at its lightest option, and take hull increments in order of cost saved per unit of
//! resource until the budget is spent; the last increment taken fractionally gives the LP bound and
//! its slope the dual price λ. The exact solver then (1) rounds the LP down and fills the leftover
//! budget greedily for an incumbent z, (2) removes every option whose reduced cost
//! c + λw − min(c + λw) exceeds z − L(λ) — no solution using it can beat z — which leaves a small
//! core of groups with more than one option, and (3) branches over the core depth-first, pruning
//! each node with the LP bound of the groups still open. The result is optimal (gap 0) unless the
//! node limit is hit, in which case the root LP bound certifies the gap that is reported.

use super::problem::Problem;
use super::{Solution, Solver};
use crate::error::{Error, Result};

/// Exact multiple-choice knapsack branch-and-bound for problems with at most one budget.
#[derive(Debug, Clone)]
pub struct ExactMckp {
    /// Stop branching after this many nodes (the gap is then certified by the LP bound).
    pub node_limit: u64,
}

impl Default for ExactMckp {
    fn default() -> Self {
        ExactMckp { node_limit: 5_000_000 }
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
                    format!("the exact branch-and-bound handles one budget, this problem has {n}; use --solver highs"),
                ))
            }
        }
        let cap = p.budgets[0].limit;
        let (w, c) = weights_costs(p, 0);
        let hulls: Vec<Hull> = w.iter().zip(&c).map(|(w, c)| hull(w, c)).collect();
        let incs = increments(&w, &c, &hulls);
        let Some(root) = lp(&w, &c, &hulls, cap, &incs) else { return Ok(None) };
        let mut pos = root.pos.clone();
        fill(&mut pos, root.left, &incs);
        let mut best: Vec<usize> = pos.iter().zip(&hulls).map(|(&q, h)| h.idx[q]).collect();
        let mut best_cost = p.cost(&best);
        let lambda = root.lambda;
        // Lagrangian bound L(λ) and reduced costs.
        let mins: Vec<f64> =
            w.iter().zip(&c).map(|(w, c)| w.iter().zip(c).map(|(w, c)| c + lambda * w).fold(f64::INFINITY, f64::min)).collect();
        let l_lambda: f64 = mins.iter().sum::<f64>() - lambda * cap;
        let scale = best_cost.abs().max(root.value.abs()).max(1e-300);
        let eps = 1e-9 * scale;
        let slack = best_cost - l_lambda + eps;
        // Surviving options per group, by reduced cost.
        let mut core: Vec<usize> = Vec::new();
        let mut surv: Vec<Vec<usize>> = Vec::with_capacity(w.len());
        let mut fixed_w = 0.0;
        let mut fixed_c = 0.0;
        for g in 0..w.len() {
            let mut s: Vec<usize> = (0..w[g].len()).filter(|&j| c[g][j] + lambda * w[g][j] - mins[g] <= slack).collect();
            s.sort_by(|&a, &b| (c[g][a] + lambda * w[g][a]).total_cmp(&(c[g][b] + lambda * w[g][b])).then(w[g][a].total_cmp(&w[g][b])));
            if s.len() == 1 {
                fixed_w += w[g][s[0]];
                fixed_c += c[g][s[0]];
            } else {
                core.push(g);
            }
            surv.push(s);
        }
        let mut nodes = 0u64;
        let mut complete = true;
        if !core.is_empty() {
            // Core groups, most options first (branch on the hardest decisions near the root).
            core.sort_by_key(|&g| std::cmp::Reverse(surv[g].len()));
            let cw: Vec<Vec<f64>> = core.iter().map(|&g| surv[g].iter().map(|&j| w[g][j]).collect()).collect();
            let cc: Vec<Vec<f64>> = core.iter().map(|&g| surv[g].iter().map(|&j| c[g][j]).collect()).collect();
            let chulls: Vec<Hull> = cw.iter().zip(&cc).map(|(w, c)| hull(w, c)).collect();
            let cincs = increments(&cw, &cc, &chulls);
            // Suffix sums of the lightest weight, for the feasibility test.
            let minw: Vec<f64> = cw.iter().map(|w| w.iter().copied().fold(f64::INFINITY, f64::min)).collect();
            let mut suffix = vec![0.0; core.len() + 1];
            for d in (0..core.len()).rev() {
                suffix[d] = suffix[d + 1] + minw[d];
            }
            let mut search = Search {
                cw: &cw,
                cc: &cc,
                chulls: &chulls,
                cincs: &cincs,
                suffix: &suffix,
                best: best_cost - fixed_c,
                best_pick: None,
                pick: vec![0; core.len()],
                nodes: 0,
                limit: self.node_limit,
                eps,
            };
            search.dfs(0, cap - fixed_w, 0.0);
            nodes = search.nodes;
            complete = search.nodes < search.limit;
            if let Some(pick) = search.best_pick {
                for (d, &g) in core.iter().enumerate() {
                    best[g] = surv[g][pick[d]];
                }
                for g in 0..w.len() {
                    if surv[g].len() == 1 {
                        best[g] = surv[g][0];
                    }
                }
                best_cost = p.cost(&best);
            }
        }
        tracing::debug!(groups = w.len(), core = core.len(), nodes, lambda, "exact MCKP");
        let bound = if complete { best_cost } else { root.value };
        let note = (!complete).then(|| format!("node limit {} reached; gap certified by the LP bound", self.node_limit));
        Ok(Some(Solution { choice: best, bound, note }))
    }
}

struct Search<'a> {
    cw: &'a [Vec<f64>],
    cc: &'a [Vec<f64>],
    chulls: &'a [Hull],
    cincs: &'a [Inc],
    suffix: &'a [f64],
    best: f64,
    best_pick: Option<Vec<usize>>,
    pick: Vec<usize>,
    nodes: u64,
    limit: u64,
    eps: f64,
}

impl Search<'_> {
    /// LP bound of the groups at depth ≥ d with capacity `cap` (None: infeasible).
    fn bound(&self, d: usize, cap: f64) -> Option<f64> {
        let mut left = cap;
        let mut value = 0.0;
        for g in d..self.cw.len() {
            let j = self.chulls[g].idx[0];
            left -= self.cw[g][j];
            value += self.cc[g][j];
        }
        if left < -super::problem::tol(cap) {
            return None;
        }
        for inc in self.cincs {
            if inc.g < d {
                continue;
            }
            if inc.dw <= left {
                left -= inc.dw;
                value += inc.dc;
            } else {
                return Some(value + inc.dc * (left / inc.dw));
            }
        }
        Some(value)
    }

    fn dfs(&mut self, d: usize, cap: f64, cost: f64) {
        if self.nodes >= self.limit {
            return;
        }
        self.nodes += 1;
        if d == self.cw.len() {
            if cost < self.best - self.eps {
                self.best = cost;
                self.best_pick = Some(self.pick.clone());
            }
            return;
        }
        match self.bound(d, cap) {
            Some(b) if cost + b < self.best - self.eps => {}
            _ => return,
        }
        for j in 0..self.cw[d].len() {
            let (wj, cj) = (self.cw[d][j], self.cc[d][j]);
            if wj + self.suffix[d + 1] > cap + super::problem::tol(cap) {
                continue;
            }
            self.pick[d] = j;
            self.dfs(d + 1, cap - wj, cost + cj);
        }
    }
}
