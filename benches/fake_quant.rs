//! Throughput of fake quantization (GB/s of FP32 weights read) for the main formats, on one
//! 4096×4096 weight: this is the inner loop of uniform baselines, measured ΔL and evaluation.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mixq::quant::{fake_quantize, Clipping, Format, Granularity, QuantSpec};
use tch::{Device, Kind, Tensor};

fn bench(c: &mut Criterion) {
    tch::manual_seed(0);
    let w = Tensor::randn([4096, 4096], (Kind::Float, Device::Cpu));
    let mut g = c.benchmark_group("fake_quantize_4096x4096");
    g.throughput(Throughput::Bytes((4096 * 4096 * 4) as u64));
    g.sample_size(10);
    let specs = [
        QuantSpec::new(Format::Int { bits: 8, signed: true }, Granularity::PerChannel),
        QuantSpec::new(Format::Int { bits: 4, signed: true }, Granularity::PerGroup(128)),
        QuantSpec::new(Format::Int { bits: 4, signed: false }, Granularity::PerGroup(128)),
        QuantSpec::new(Format::Fp8E4M3, Granularity::PerChannel),
        QuantSpec::new(Format::Fp4E2M1, Granularity::PerGroup(32)),
        QuantSpec::new(Format::Fp4E2M1, Granularity::PerGroup(16)),
        QuantSpec { clipping: Clipping::Mse, ..QuantSpec::new(Format::Int { bits: 4, signed: true }, Granularity::PerChannel) },
    ];
    for spec in specs {
        g.bench_function(spec.to_string(), |b| b.iter(|| fake_quantize(&w, &spec).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
