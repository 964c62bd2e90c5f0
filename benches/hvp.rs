//! Throughput of curvature–vector products.
//!
//! - `hvp_digits_resnet_256_samples`: the demo CNN (digits-resnet, 306,720 weights), one product
//!   at a time and four probes sharing each batch's forward pass and first backward (what the
//!   trace estimators do). Untrained weights: the cost does not depend on the values.
//! - `hvp_tiny_cnn_fixture_179_samples`: the TorchScript fixture `tests/fixtures/tiny_cnn.pt`
//!   (6,152 weights) on digits:calib, the model and batch of the PyHessian cross-check in
//!   `experiments/pyhessian/`, so the per-product time compares with PyTorch's on the same work:
//!   1 probe per pass ↔ a full PyTorch product (forward, backward, double backward); many probes
//!   per pass ↔ PyHessian's product on its cached gradient (double backward only).
//!
//! Both first call `mixq::util::tune_allocator`, as the `mixq` binary does.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mixq::model::data::Dataset;
use mixq::model::torchscript::TorchScriptModel;
use mixq::model::zoo::DigitsResNet;
use mixq::sensitivity::{stats::rademacher, Curvature, HvpEngine};
use std::path::Path;

fn digits_resnet(c: &mut Criterion) {
    mixq::util::tune_allocator(); // as the `mixq` binary does
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

fn tiny_cnn_fixture(c: &mut Criterion) {
    mixq::util::tune_allocator(); // as the `mixq` binary does
    let data = Dataset::digits("calib").expect("embedded digits");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_cnn.pt");
    let model = TorchScriptModel::load(&path, &data.x.narrow(0, 0, 8)).expect("fixture");
    let engine = HvpEngine::new(&model, &data, 256, Curvature::Hessian).expect("engine");
    let shapes = engine.shapes();
    let probes: Vec<_> = (0..16).map(|i| rademacher(&shapes, 0, 1, i)).collect();
    let mut g = c.benchmark_group("hvp_tiny_cnn_fixture_179_samples");
    g.sample_size(30);
    for k in [1usize, 4, 16] {
        g.throughput(Throughput::Elements(k as u64));
        g.bench_function(format!("hessian/{k} probes per pass"), |b| b.iter(|| engine.hvp_many(&probes[..k]).expect("hvp")));
    }
    g.finish();
}

criterion_group!(benches, digits_resnet, tiny_cnn_fixture);
criterion_main!(benches);
