//! The exact Pareto front of one budget: every distinct optimal allocation as that budget grows.
//!
//! For a fixed problem, the optimal objective as a function of one budget's limit B,
//! f(B) = min { Σ Ω : Σ res ≤ B, other budgets held }, is a non-increasing step function: it only
//! changes where some configuration's resource use is reached. A sweep over evenly spaced budgets
//! samples it and misses steps between samples; [`breakpoints`] enumerates every step instead.
//!
//! The walk goes downwards from the largest budget. Solving at B gives a configuration using
//! u ≤ B with objective f(B); solving again at B′ = u − ε (ε: one unit when every option's resource
//! is a whole number — bytes, bits, BOPs — else a few times the solvers' relative feasibility
//! tolerance) gives the best configuration strictly below u. If its objective equals f(B) it is the
//! same step reached with less resource and replaces the previous point; otherwise it starts the
//! next step. Every point kept is therefore the least-resource configuration of its objective
//! level, and each point's objective is the solver's optimum at its own budget. The walk needs one
//! or a few solves per breakpoint and stops when the budget drops below the smallest achievable
//! value (or the other budgets make it infeasible), or after `max_points` breakpoints. Steps
//! closer than ε in resource, or whose objectives differ by less than [`SAME_OBJECTIVE_RTOL`]
//! relative, are merged: they are below what the solvers resolve.

use super::problem::{tol, Problem};
use super::{solve_problem, Allocation, Solver};
use crate::cost::CostTable;
use crate::error::{Error, Result};

/// Objectives within this relative difference are the same step of the front (the exact solver
/// prunes at 1e-9 relative, HiGHS runs at a 1e-9 relative MIP gap).
pub const SAME_OBJECTIVE_RTOL: f64 = 1e-9;

/// The breakpoints of one budget's front, least resource first.
#[derive(Debug, Clone)]
pub struct Front {
    /// Index of the swept budget in the problem's budgets.
    pub budget: usize,
    /// One allocation per step: resource strictly increasing, objective strictly decreasing.
    /// Each is the least-resource configuration reaching its objective.
    pub points: Vec<Allocation>,
    /// False when the walk stopped at `max_points`: then `points` are the steps with the most
    /// resource, and the front continues below the first of them.
    pub complete: bool,
    /// Solver calls made.
    pub solves: usize,
    /// The largest certified gap among the solves (0 when every point is proven optimal).
    pub max_gap: f64,
}

/// Whether every option's amount of budget `k` is a whole number (so the next smaller total is one
/// unit below).
fn integral(p: &Problem, k: usize) -> bool {
    p.groups.iter().all(|g| g.options.iter().all(|o| o.res[k].fract() == 0.0 && o.res[k].abs() < 2f64.powi(52)))
}

/// The step below a total of `u`: one unit for whole-number resources, and always more than the
/// solvers' feasibility tolerance so that the next solve is strictly below `u`.
fn step(u: f64, unit: f64) -> f64 {
    unit.max(4.0 * tol(u))
}

fn same(a: f64, b: f64) -> bool {
    (a - b).abs() <= SAME_OBJECTIVE_RTOL * a.abs().max(b.abs()).max(f64::MIN_POSITIVE)
}

/// Enumerates the breakpoints of budget `k` of `problem` (its limit is ignored: the walk starts at
/// the largest configuration). Other budgets, ties, pins and allowed formats hold at every point.
/// Errors: what `solve_problem` returns at the largest budget (e.g. [`Error::Infeasible`] when the
/// other budgets cannot be met), or a `max_points` of 0.
pub fn breakpoints(table: &CostTable, problem: &Problem, k: usize, solver: &dyn Solver, max_points: usize) -> Result<Front> {
    if k >= problem.budgets.len() {
        return Err(Error::invalid("swept budget", k.to_string(), format!("the problem has {} budgets", problem.budgets.len())));
    }
    if max_points == 0 {
        return Err(Error::invalid("max breakpoints", "0", "ask for at least one breakpoint"));
    }
    let mut p = problem.clone();
    p.budgets[k].limit = p.budgets[k].max;
    let unit = if integral(&p, k) { 1.0 } else { 0.0 };
    let min = p.budgets[k].min;
    let mut points: Vec<Allocation> = Vec::new();
    let mut solves = 0;
    let mut max_gap: f64 = 0.0;
    let mut complete = true;
    loop {
        let alloc = match solve_problem(table, &p, solver) {
            Ok(a) => a,
            Err(Error::Infeasible { .. }) if !points.is_empty() => break,
            Err(e) => return Err(e),
        };
        solves += 1;
        max_gap = max_gap.max(alloc.gap);
        let u = alloc.budgets[k].used;
        let same_step = points.last().is_some_and(|last| same(last.objective, alloc.objective) || alloc.objective < last.objective);
        if same_step {
            // The same step with less resource (or, with an inexact solver, a better one): keep the
            // configuration that uses less.
            *points.last_mut().expect("same_step implies a last point") = alloc;
        } else if points.len() == max_points {
            complete = false;
            break;
        } else {
            points.push(alloc);
        }
        let next = u - step(u, unit);
        if next < min - tol(min) {
            break;
        }
        p.budgets[k].limit = next;
    }
    points.reverse();
    Ok(Front { budget: k, points, complete, solves, max_gap })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::{Budget, Constraints, ExactMckp, Highs, Limit, Resource};
    use crate::cost::{CostOption, LayerCosts};
    use crate::util::SplitMix64;

    fn table(seed: u64, n: usize) -> CostTable {
        let mut r = SplitMix64(seed);
        let layers = (0..n)
            .map(|i| {
                let params = 50 + (r.next_u64() % 500) as i64;
                let sens = r.next_f64() * 5.0;
                let options = [2u64, 3, 4, 8, 32]
                    .iter()
                    .map(|&b| {
                        let bits = params as u64 * b + if b == 32 { 0 } else { 128 };
                        CostOption {
                            format: if b == 32 { "fp32".into() } else { format!("int{b}") },
                            cost: if b == 32 { 0.0 } else { sens * 4f64.powi(-(b as i32)) * (0.5 + r.next_f64()) },
                            bytes: bits.div_ceil(8),
                            bits,
                            bops: params as f64 * b as f64 * 32.0,
                            latency_us: Some(0.3 + r.next_f64() * b as f64),
                        }
                    })
                    .collect();
                LayerCosts { name: format!("l{i}"), params, trace_per_param: None, options }
            })
            .collect();
        CostTable { layers }
    }

    /// The front by brute force: every configuration's (resource, cost), then the least resource
    /// of each strictly better objective level.
    fn brute_front(p: &Problem, k: usize) -> Vec<(f64, f64)> {
        let mut all = Vec::new();
        let mut choice = vec![0usize; p.groups.len()];
        'outer: loop {
            let others_ok =
                (0..p.budgets.len()).filter(|&j| j != k).all(|j| p.usage(&choice, j) <= p.budgets[j].limit + tol(p.budgets[j].limit));
            if others_ok {
                all.push((p.usage(&choice, k), p.cost(&choice)));
            }
            for (c, g) in choice.iter_mut().zip(&p.groups) {
                *c += 1;
                if *c < g.options.len() {
                    continue 'outer;
                }
                *c = 0;
            }
            break;
        }
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
        let mut front: Vec<(f64, f64)> = Vec::new();
        for (u, c) in all {
            if front.last().is_none_or(|&(_, lc)| c < lc && !same(c, lc)) {
                front.push((u, c));
            }
        }
        front
    }

    fn problem(t: &CostTable, budgets: &[&str]) -> Problem {
        let c = Constraints { budgets: budgets.iter().map(|b| b.parse().unwrap()).collect(), ..Default::default() };
        Problem::new(t, &c).unwrap()
    }

    #[test]
    fn breakpoints_match_brute_force() {
        for seed in 0..12u64 {
            let t = table(seed, 4 + (seed % 3) as usize);
            for sweep in ["size=100%", "avg-bits=100%", "latency=100%"] {
                let p = problem(&t, &[sweep]);
                let f = breakpoints(&t, &p, 0, &ExactMckp::default(), 10_000).unwrap();
                assert!(f.complete && f.max_gap == 0.0);
                let want = brute_front(&p, 0);
                let got: Vec<(f64, f64)> = f.points.iter().map(|a| (a.budgets[0].used, a.objective)).collect();
                assert_eq!(got.len(), want.len(), "seed {seed} {sweep}: {got:?} vs {want:?}");
                for ((gu, gc), (wu, wc)) in got.iter().zip(&want) {
                    assert!(
                        (gu - wu).abs() <= 1e-9 * wu.abs().max(1.0) && same(*gc, *wc),
                        "seed {seed} {sweep}: ({gu}, {gc}) vs ({wu}, {wc})"
                    );
                }
            }
        }
    }

    #[test]
    fn breakpoints_are_strict_and_optimal_at_their_budget() {
        let t = table(7, 9);
        let p = problem(&t, &["size=100%"]);
        let f = breakpoints(&t, &p, 0, &ExactMckp::default(), 10_000).unwrap();
        assert!(f.points.len() > 10, "{}", f.points.len());
        for w in f.points.windows(2) {
            assert!(w[1].budgets[0].used > w[0].budgets[0].used);
            assert!(w[1].objective < w[0].objective);
        }
        for (i, a) in f.points.iter().enumerate() {
            // Optimal at its own budget (HiGHS cross-checks the exact solver) ...
            let mut q = p.clone();
            q.budgets[0].limit = a.budgets[0].used;
            let h = solve_problem(&t, &q, &Highs::default()).unwrap();
            assert!((h.objective - a.objective).abs() <= 1e-7 * a.objective.abs().max(1e-12), "{} vs {}", h.objective, a.objective);
            // ... and one byte less gives the previous step (or nothing at the first).
            q.budgets[0].limit = a.budgets[0].used - 1.0;
            match solve_problem(&t, &q, &ExactMckp::default()) {
                Ok(b) => assert!(i > 0 && same(b.objective, f.points[i - 1].objective)),
                Err(Error::Infeasible { .. }) => assert_eq!(i, 0),
                Err(e) => panic!("{e}"),
            }
        }
        // The first point is the smallest model, the last the best objective.
        assert_eq!(f.points[0].budgets[0].used, p.budgets[0].min);
        let best: f64 = t.layers.iter().map(|l| l.options.iter().map(|o| o.cost).fold(f64::INFINITY, f64::min)).sum();
        assert!(same(f.points.last().unwrap().objective, best));
    }

    #[test]
    fn other_budgets_hold_and_cap_is_reported() {
        let t = table(3, 7);
        let c = Constraints {
            budgets: vec![Budget { resource: Resource::Size, limit: Limit::Relative(1.0) }, "latency=60%".parse().unwrap()],
            ..Default::default()
        };
        let p = Problem::new(&t, &c).unwrap();
        let f = breakpoints(&t, &p, 0, &Highs::default(), 10_000).unwrap();
        let want = brute_front(&p, 0);
        assert_eq!(f.points.len(), want.len());
        for a in &f.points {
            assert!(a.budgets[1].used <= a.budgets[1].limit * (1.0 + 1e-9));
        }
        let capped = breakpoints(&t, &p, 0, &Highs::default(), 3).unwrap();
        assert!(!capped.complete);
        assert_eq!(capped.points.len(), 3);
        let n = f.points.len();
        for (a, b) in capped.points.iter().zip(&f.points[n - 3..]) {
            assert!(same(a.objective, b.objective) && a.budgets[0].used == b.budgets[0].used);
        }
    }

    #[test]
    fn infeasible_other_budget_is_an_error() {
        let t = table(1, 4);
        let p = problem(&t, &["size=100%", "avg-bits=100%"]);
        let mut q = p.clone();
        q.budgets[1].limit = q.budgets[1].min * 0.5;
        let e = breakpoints(&t, &q, 0, &Highs::default(), 100).unwrap_err();
        assert!(matches!(e, Error::Infeasible { .. }), "{e}");
    }
}
