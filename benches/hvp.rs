//! Throughput of curvature–vector products on the demo CNN (digits-resnet, 306,720 weights):
//! one product at a time, and four probes sharing each batch's forward pass and first backward
//! (what the trace estimators do). Untrained weights: the cost does not depend on the values.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mixq::model::data::Dataset;
use mixq::model::zoo::DigitsResNet;
use mixq::sensitivity::{stats::rademacher, Curvature, HvpEngine};

fn bench(c: &mut Criterion) {
    let model = DigitsResNet::untrained();
    let data = Dataset::digits("calib").expect("embedded digits").take(256);
    let mut g = c.benchmark_group("hvp_digits_resnet_256_samples");
    g.sample_size(10);
    for curvature in [Curvature::Hessian, Curvature::Ggn] {
        let engine = HvpEngine::new(&model, &data, 256, curvature).expect("engine");
        let shapes = engine.shapes();
        let probes: Vec<_> = (0..4).map(|i| rademacher(&shapes, 0, 1, i)).collect();
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("{curvature}/1 probe"), |b| b.iter(|| engine.hvp(&probes[0]).expect("hvp")));
        g.throughput(Throughput::Elements(4));
        g.bench_function(format!("{curvature}/4 probes per pass"), |b| b.iter(|| engine.hvp_many(&probes).expect("hvp")));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
