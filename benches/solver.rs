//! Allocator benchmarks on seeded synthetic tables (`mixq::cost::synthetic`):
//! 2,000 layers × 8 formats with one size budget (exact B&B, target ≤ 20 ms) and with three budgets
//! (HiGHS, target ≤ 1 s), and 10,000 layers with one budget (exact; certified gap ≤ 0.1 %).

use criterion::{criterion_group, criterion_main, Criterion};
use mixq::alloc::{solve_problem, Constraints, ExactMckp, Greedy, Highs, Problem};
use mixq::cost::synthetic;
use std::hint::black_box;
use std::time::Duration;

fn problem(layers: usize, budgets: &[&str]) -> (mixq::cost::CostTable, Problem) {
    let t = synthetic(1, layers, 8);
    let c = Constraints { budgets: budgets.iter().map(|b| b.parse().unwrap()).collect(), ..Default::default() };
    let p = Problem::new(&t, &c).unwrap();
    (t, p)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("solver");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    let (t, p) = problem(2000, &["size=30%"]);
    let a = solve_problem(&t, &p, &ExactMckp::default()).unwrap();
    eprintln!("2000×8, one budget: exact objective {:.6e}, gap {:.2e}", a.objective, a.gap);
    g.bench_function("exact_2000x8_size", |b| b.iter(|| black_box(solve_problem(&t, &p, &ExactMckp::default()).unwrap())));
    g.bench_function("greedy_2000x8_size", |b| b.iter(|| black_box(solve_problem(&t, &p, &Greedy).unwrap())));
    g.bench_function("highs_2000x8_size", |b| b.iter(|| black_box(solve_problem(&t, &p, &Highs::default()).unwrap())));
    let (t3, p3) = problem(2000, &["size=30%", "bops=35%", "latency=40%"]);
    let a3 = solve_problem(&t3, &p3, &Highs { rel_gap: 1e-4, ..Default::default() }).unwrap();
    eprintln!("2000×8, three budgets: highs objective {:.6e}, gap {:.2e}", a3.objective, a3.gap);
    g.bench_function("highs_2000x8_three_budgets", |b| {
        b.iter(|| black_box(solve_problem(&t3, &p3, &Highs { rel_gap: 1e-4, ..Default::default() }).unwrap()))
    });
    let (t10, p10) = problem(10_000, &["avg-bits=4.25"]);
    let a10 = solve_problem(&t10, &p10, &ExactMckp::default()).unwrap();
    eprintln!("10000×8, one budget: exact objective {:.6e}, gap {:.2e}", a10.objective, a10.gap);
    assert!(a10.gap <= 1e-3);
    g.bench_function("exact_10000x8_avg_bits", |b| b.iter(|| black_box(solve_problem(&t10, &p10, &ExactMckp::default()).unwrap())));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
