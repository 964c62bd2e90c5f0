//! Allocator tests: exact solvers against brute force on random seeded instances, budgets never
//! exceeded, monotonicity in the budget, ties and pins, infeasibility messages.

use mixq::alloc::{solve, solve_problem, Budget, Constraints, ExactMckp, Greedy, Highs, Pin, Problem, Resource, SolverKind, Tie};
use mixq::cost::{CostOption, CostTable, LayerCosts};
use mixq::util::SplitMix64 as Rng;

/// Relative tolerance when comparing objectives of different solvers.
const OBJ_TOL: f64 = 1e-7;

const FORMATS: [(&str, u64); 5] = [("int2", 2), ("int3", 3), ("int4", 4), ("int8", 8), ("fp32", 32)];

/// A random table: `n` layers, the first `k` formats; cost falls with bits (plus noise, so some
/// options are dominated and hulls are not trivial), sizes exact.
fn random_table(seed: u64, n: usize, k: usize) -> CostTable {
    let mut r = Rng(seed);
    let layers = (0..n)
        .map(|i| {
            let params = 100 + (r.next_u64() % 5000) as i64;
            let sens = r.next_f64() * 10.0;
            let macs = params as f64 * (1.0 + (r.next_u64() % 50) as f64);
            let options = FORMATS[..k]
                .iter()
                .map(|&(f, b)| {
                    let cost = if b == 32 { 0.0 } else { sens * 4f64.powi(-(b as i32)) * (0.5 + r.next_f64()) };
                    let bits = params as u64 * b + if b == 32 { 0 } else { 16 * 8 };
                    CostOption {
                        format: f.into(),
                        cost,
                        bytes: bits.div_ceil(8),
                        bits,
                        bops: macs * b as f64 * 32.0,
                        latency_us: Some(1.0 + r.next_f64() * b as f64),
                    }
                })
                .collect();
            LayerCosts { name: format!("layer{i}"), params, trace_per_param: None, options }
        })
        .collect();
    CostTable { layers }
}

/// Exhaustive optimum of a problem (None: infeasible).
fn brute(p: &Problem) -> Option<f64> {
    let mut choice = vec![0usize; p.groups.len()];
    let mut best: Option<f64> = None;
    loop {
        if p.feasible(&choice) {
            let c = p.cost(&choice);
            if best.is_none_or(|b| c < b) {
                best = Some(c);
            }
        }
        let mut i = 0;
        loop {
            if i == choice.len() {
                return best;
            }
            choice[i] += 1;
            if choice[i] < p.groups[i].options.len() {
                break;
            }
            choice[i] = 0;
            i += 1;
        }
    }
}

fn budgets(s: &[&str]) -> Vec<Budget> {
    s.iter().map(|b| b.parse().unwrap()).collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= OBJ_TOL * a.abs().max(b.abs()).max(1e-12)
}

#[test]
fn exact_and_highs_match_brute_force_one_budget() {
    for seed in 0..40u64 {
        let t = random_table(seed, 5 + (seed % 3) as usize, 4 + (seed % 2) as usize);
        let frac = 5 + (seed * 7) % 90;
        let c = Constraints { budgets: budgets(&[&format!("size={frac}%")]), ..Default::default() };
        let p = Problem::new(&t, &c).unwrap();
        let want = brute(&p).expect("relative budgets are feasible");
        let exact = solve_problem(&t, &p, &ExactMckp::default()).unwrap();
        let highs = solve_problem(&t, &p, &Highs::default()).unwrap();
        let greedy = solve_problem(&t, &p, &Greedy).unwrap();
        assert!(close(exact.objective, want), "seed {seed}: exact {} vs brute force {want}", exact.objective);
        assert!(close(highs.objective, want), "seed {seed}: highs {} vs brute force {want}", highs.objective);
        assert!(greedy.objective >= want - OBJ_TOL * want.abs(), "seed {seed}: greedy beat the optimum");
        assert!(greedy.bound <= want + OBJ_TOL * want.abs().max(1e-12), "seed {seed}: greedy bound {} above optimum {want}", greedy.bound);
        assert_eq!(exact.gap, 0.0, "seed {seed}");
        for a in [&exact, &highs, &greedy] {
            for b in &a.budgets {
                assert!(b.used <= b.limit * (1.0 + 1e-9), "seed {seed} {}: {} uses {} > {}", a.solver, b.budget, b.used, b.limit);
            }
        }
    }
}

#[test]
fn highs_matches_brute_force_with_three_budgets() {
    for seed in 100..125u64 {
        let t = random_table(seed, 6, 4);
        let c = Constraints {
            budgets: budgets(&[&format!("size={}%", 20 + seed % 60), &format!("bops={}%", 30 + seed % 50), "latency=70%"]),
            ..Default::default()
        };
        let p = Problem::new(&t, &c).unwrap();
        match (brute(&p), solve_problem(&t, &p, &Highs::default())) {
            (Some(want), Ok(got)) => {
                assert!(close(got.objective, want), "seed {seed}: {} vs {want}", got.objective);
                for b in &got.budgets {
                    assert!(b.used <= b.limit * (1.0 + 1e-9), "seed {seed}: {} exceeded", b.budget);
                }
            }
            (None, Err(e)) => assert!(e.to_string().contains("smallest achievable"), "{e}"),
            (want, got) => panic!("seed {seed}: brute force {want:?}, highs {got:?}"),
        }
    }
}

#[test]
fn more_budget_never_worse() {
    let t = random_table(7, 30, 5);
    for kind in [SolverKind::Exact, SolverKind::Highs] {
        let mut last = f64::INFINITY;
        for pct in (0..=100).step_by(10) {
            let c = Constraints { budgets: budgets(&[&format!("avg-bits={}", 2.1 + pct as f64 * 0.3)]), ..Default::default() };
            let a = solve(&t, &c, kind).unwrap();
            assert!(a.objective <= last * (1.0 + 1e-9) + 1e-15, "{kind:?}: objective rose from {last} to {} at {pct}", a.objective);
            last = a.objective;
        }
    }
}

#[test]
fn ties_and_pins_hold() {
    for seed in 200..215u64 {
        let t = random_table(seed, 7, 5);
        let c = Constraints {
            budgets: budgets(&["size=35%"]),
            ties: vec!["layer1,layer2".parse().unwrap(), Tie::Pattern("layer[56]".into())],
            pins: vec![Pin { pattern: "layer0".into(), format: "int8".into() }],
            ..Default::default()
        };
        let p = Problem::new(&t, &c).unwrap();
        let want = brute(&p);
        for kind in [SolverKind::Exact, SolverKind::Highs, SolverKind::Greedy] {
            let a = match solve(&t, &c, kind) {
                Ok(a) => a,
                Err(e) => {
                    assert!(want.is_none(), "seed {seed} {kind:?}: {e}");
                    continue;
                }
            };
            let f = |n: &str| a.layers.iter().find(|l| l.name == n).unwrap().format.clone();
            assert_eq!(f("layer0"), "int8", "seed {seed} {kind:?}: pin broken");
            assert_eq!(f("layer1"), f("layer2"), "seed {seed} {kind:?}: tie broken");
            assert_eq!(f("layer5"), f("layer6"), "seed {seed} {kind:?}: regex tie broken");
            if kind != SolverKind::Greedy {
                assert!(close(a.objective, want.unwrap()), "seed {seed} {kind:?}");
            }
        }
    }
}

#[test]
fn allowed_formats_hold() {
    let t = random_table(3, 8, 5);
    let c = Constraints { budgets: budgets(&["size=50%"]), allowed: vec!["layer[0-3]=int4,int8".parse().unwrap()], ..Default::default() };
    let a = solve(&t, &c, SolverKind::Auto).unwrap();
    for l in &a.layers[..4] {
        assert!(l.format == "int4" || l.format == "int8", "{} got {}", l.name, l.format);
    }
}

#[test]
fn infeasible_budget_states_the_minimum() {
    let t = random_table(11, 4, 4);
    let min_bytes: u64 = t.layers.iter().map(|l| l.options.iter().map(|o| o.bytes).min().unwrap()).sum();
    let c = Constraints { budgets: budgets(&[&format!("size={}B", min_bytes - 1)]), ..Default::default() };
    let e = solve(&t, &c, SolverKind::Exact).unwrap_err().to_string();
    let shown = mixq::cli::table::bytes(min_bytes);
    assert!(e.contains("smallest achievable") && e.contains(&shown), "{e} (expected {shown})");
    // Exactly the minimum is feasible.
    let c = Constraints { budgets: budgets(&[&format!("size={min_bytes}B")]), ..Default::default() };
    let a = solve(&t, &c, SolverKind::Exact).unwrap();
    assert_eq!(a.total_bytes(), min_bytes);
}

#[test]
fn budget_parsing() {
    let b: Budget = "size=2.1MB".parse().unwrap();
    assert_eq!(b.resource, Resource::Size);
    assert_eq!(b.limit, mixq::alloc::Limit::Absolute(2.1e6));
    assert_eq!("latency=3ms".parse::<Budget>().unwrap().limit, mixq::alloc::Limit::Absolute(3000.0));
    assert_eq!("bops=1.5G".parse::<Budget>().unwrap().limit, mixq::alloc::Limit::Absolute(1.5e9));
    assert_eq!("size=40%".parse::<Budget>().unwrap().limit, mixq::alloc::Limit::Relative(0.4));
    assert_eq!("size=1KiB".parse::<Budget>().unwrap().limit, mixq::alloc::Limit::Absolute(1024.0));
    for bad in ["size", "size=abc", "weight=3", "avg-bits=4ms", "size=140%", "size=-1MB"] {
        let e = bad.parse::<Budget>().unwrap_err().to_string();
        assert!(e.contains("RESOURCE=LIMIT"), "{bad}: {e}");
    }
}

#[test]
fn allocation_to_config_round_trips() {
    let t = random_table(5, 6, 5);
    let c = Constraints { budgets: budgets(&["avg-bits=4.5"]), ..Default::default() };
    let a = solve(&t, &c, SolverKind::Auto).unwrap();
    assert!(a.avg_bits().unwrap() <= 4.5 + 1e-12);
    let cfg = a.to_config(None).unwrap();
    let back = mixq::config::QuantConfig::from_json(&cfg.to_json(), std::path::Path::new("<test>")).unwrap();
    assert_eq!(back, cfg);
    for l in &a.layers {
        assert_eq!(back.layers[&l.name].spec().label(), l.format);
    }
    assert_eq!(back.provenance["solver"], "exact-mckp");
}

#[test]
fn exact_solves_large_instance_to_optimality() {
    // 2,000 layers × 5 formats: the exact solver proves optimality and HiGHS agrees.
    let t = random_table(42, 2000, 5);
    let c = Constraints { budgets: budgets(&["avg-bits=4.2"]), ..Default::default() };
    let p = Problem::new(&t, &c).unwrap();
    let exact = solve_problem(&t, &p, &ExactMckp::default()).unwrap();
    let highs = solve_problem(&t, &p, &Highs { rel_gap: 1e-9, ..Default::default() }).unwrap();
    assert_eq!(exact.gap, 0.0);
    assert!(exact.objective <= highs.objective * (1.0 + 1e-6), "exact {} highs {}", exact.objective, highs.objective);
    assert!(exact.objective >= highs.bound * (1.0 - 1e-6), "exact {} below the HiGHS bound {}", exact.objective, highs.bound);
}

#[test]
fn exact_matches_highs_on_synthetic_instances() {
    // The benchmark's generator at a test size, several budgets of either kind: the exact solver
    // proves optimality and lands on HiGHS's optimum (within HiGHS's own 1e-9 gap).
    for (seed, budget) in [(1, "size=30%"), (2, "size=5%"), (3, "size=72%"), (4, "avg-bits=4.25"), (5, "avg-bits=3.1"), (6, "size=99%")] {
        let t = mixq::cost::synthetic(seed, 300, 8);
        let c = Constraints { budgets: budgets(&[budget]), ..Default::default() };
        let p = Problem::new(&t, &c).unwrap();
        let exact = solve_problem(&t, &p, &ExactMckp::default()).unwrap();
        let highs = solve_problem(&t, &p, &Highs { rel_gap: 1e-9, ..Default::default() }).unwrap();
        assert_eq!(exact.gap, 0.0, "seed {seed} {budget}: {:?}", exact.note);
        assert!(
            exact.objective <= highs.objective * (1.0 + 1e-9),
            "seed {seed} {budget}: exact {} highs {}",
            exact.objective,
            highs.objective
        );
        assert!(
            exact.objective >= highs.bound * (1.0 - 1e-7),
            "seed {seed} {budget}: exact {} below the HiGHS bound {}",
            exact.objective,
            highs.bound
        );
        assert!(exact.budgets[0].used <= exact.budgets[0].limit);
    }
}

#[test]
fn exact_matches_brute_force_with_ties_in_costs_and_weights() {
    // Degenerate instances: integer costs and a few distinct weights, so many options and states
    // tie in cost, in weight or in both (dominance and fathoming must not drop the optimum).
    for seed in 200..260u64 {
        let mut r = Rng(seed);
        let n = 6 + (seed % 3) as usize;
        let layers = (0..n)
            .map(|i| {
                let options = (0..4)
                    .map(|b| {
                        let bytes = 10 * (1 + b as u64) + 10 * (r.next_u64() % 2);
                        CostOption {
                            format: FORMATS[b].0.into(),
                            cost: (r.next_u64() % 4) as f64,
                            bytes,
                            bits: bytes * 8,
                            bops: 1.0,
                            latency_us: None,
                        }
                    })
                    .collect();
                LayerCosts { name: format!("l{i}"), params: 100, trace_per_param: None, options }
            })
            .collect();
        let t = CostTable { layers };
        let frac = (seed * 13) % 101;
        let c = Constraints { budgets: budgets(&[&format!("size={frac}%")]), ..Default::default() };
        let p = Problem::new(&t, &c).unwrap();
        let want = brute(&p).expect("relative budgets are feasible");
        let exact = solve_problem(&t, &p, &ExactMckp::default()).unwrap();
        assert!(close(exact.objective, want), "seed {seed}: exact {} vs brute force {want}", exact.objective);
        assert_eq!(exact.gap, 0.0, "seed {seed}");
    }
}

#[test]
fn exact_state_limit_certifies_an_honest_gap() {
    // With room for a single state the dynamic program stops at once; the bound it reports must
    // still lie below the true optimum, and the note must say why the gap may be positive.
    let t = mixq::cost::synthetic(9, 400, 8);
    let c = Constraints { budgets: budgets(&["size=30%"]), ..Default::default() };
    let p = Problem::new(&t, &c).unwrap();
    let opt = solve_problem(&t, &p, &ExactMckp::default()).unwrap();
    assert_eq!(opt.gap, 0.0);
    let cut = solve_problem(&t, &p, &ExactMckp { state_limit: 1 }).unwrap();
    assert!(cut.objective >= opt.objective * (1.0 - 1e-12));
    assert!(cut.bound <= opt.objective * (1.0 + 1e-12), "bound {} above the optimum {}", cut.bound, opt.objective);
    if cut.gap > 0.0 {
        assert!(cut.note.as_deref().is_some_and(|n| n.contains("state limit")), "{:?}", cut.note);
    }
}

#[test]
fn highs_reduction_agrees_with_the_whole_program_on_three_budgets() {
    // Reduced-cost fixing against the LP prices must not cut off the optimum: the reduced solve
    // and HiGHS on the whole program agree, each within the other's certified bound.
    for seed in 300..306u64 {
        let t = mixq::cost::synthetic(seed, 120, 8);
        let bs = [format!("size={}%", 20 + seed % 50), format!("bops={}%", 25 + (seed * 7) % 50), "latency=45%".to_string()];
        let c = Constraints { budgets: budgets(&bs.iter().map(|s| s.as_str()).collect::<Vec<_>>()), ..Default::default() };
        let p = Problem::new(&t, &c).unwrap();
        let reduced = solve_problem(&t, &p, &Highs::default()).unwrap();
        let whole = solve_problem(&t, &p, &Highs { reduce: false, ..Default::default() }).unwrap();
        assert!(
            reduced.objective >= whole.bound * (1.0 - 1e-7),
            "seed {seed}: reduced {} below the whole bound {}",
            reduced.objective,
            whole.bound
        );
        assert!(
            whole.objective >= reduced.bound * (1.0 - 1e-7),
            "seed {seed}: whole {} below the reduced bound {}",
            whole.objective,
            reduced.bound
        );
        assert!(reduced.gap <= 1e-8, "seed {seed}: gap {}", reduced.gap);
        let loose = solve_problem(&t, &p, &Highs { rel_gap: 1e-4, ..Default::default() }).unwrap();
        assert!(loose.gap <= 1e-4 && loose.objective >= whole.bound * (1.0 - 1e-7), "seed {seed}: {loose:?}");
        for a in [&reduced, &loose] {
            for b in &a.budgets {
                assert!(b.used <= b.limit * (1.0 + 1e-9), "seed {seed}: {} exceeded", b.budget);
            }
        }
    }
}

#[test]
fn highs_whole_program_matches_brute_force() {
    // The default HiGHS solve settles one-budget and many multi-budget instances with the exact
    // MCKP solver before HiGHS runs; this keeps HiGHS itself cross-checked.
    for seed in 400..430u64 {
        let t = random_table(seed, 6, 4);
        let bs = if seed % 2 == 0 {
            vec![format!("size={}%", 5 + (seed * 7) % 90)]
        } else {
            vec![format!("size={}%", 20 + seed % 60), format!("bops={}%", 30 + seed % 50), "latency=60%".to_string()]
        };
        let c = Constraints { budgets: budgets(&bs.iter().map(|s| s.as_str()).collect::<Vec<_>>()), ..Default::default() };
        let p = Problem::new(&t, &c).unwrap();
        let whole = solve_problem(&t, &p, &Highs { reduce: false, ..Default::default() });
        let reduced = solve_problem(&t, &p, &Highs::default());
        match (brute(&p), whole, reduced) {
            (Some(want), Ok(a), Ok(b)) => {
                assert!(close(a.objective, want), "seed {seed}: whole {} vs {want}", a.objective);
                assert!(close(b.objective, want), "seed {seed}: reduced {} vs {want}", b.objective);
                assert!(b.bound <= want * (1.0 + OBJ_TOL) + 1e-12, "seed {seed}: bound {} above the optimum {want}", b.bound);
            }
            (None, Err(_), Err(_)) => {}
            (want, a, b) => panic!("seed {seed}: brute force {want:?}, whole {a:?}, reduced {b:?}"),
        }
    }
}
