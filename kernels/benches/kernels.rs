//! Kernel benchmarks: packed low-bit GEMV / GEMM against libtorch on the same shapes, with a
//! memory-copy roofline measured in the same run, then a summary table on stdout whose kernels
//! (and read-only roofline pass) are timed in interleaved rounds, ratios as medians of per-round
//! ratios (`MIXQ_BENCH_ROUNDS`, default 15; see `summary`).
//!
//! Shapes `N × K` (weight rows × inner) from real models: 768×768, 768×3072 (BERT/MiniLM),
//! 4096×4096, 4096×11008 (LLaMA-7B); `M` activation rows 1, 8, 32, 128. `MIXQ_BENCH_SET` picks
//! how many: `quick` (768×768 and 4096×4096 at M = 1 and 32), `default` (all shapes at M = 1;
//! 768×768 and 4096×4096 at all M; 768×3072 at M = 32), `full` (every shape at every M).
//! `MIXQ_BENCH_SUMMARY_ONLY=1` skips criterion and prints only the summary.
//!
//! Kernels: `w4` (int4, groups of 64, FP32 scales: 4.5 bits/weight, as ggml's q4_K), `w4a8` (the
//! same weight with W4A8-dynamic: activations quantized to int8 per block of 32, integer dot
//! products, as ggml's q4 × q8_0; a different result from `w4`, see `matmul_w4a8`), `w8` (int8
//! per channel), `fp8` (E4M3 per channel), `fp4` (E2M1, groups of 32), `w8a8` (int8 × int8 with
//! per-row activation quantization); libtorch `fp32` matmul, `_weight_int8pack_mm`,
//! `_weight_int4pack_mm_for_cpu` (the last two only at M ≤ 8: they take seconds at larger M).
//!
//! GB/s counts the bytes of the weight a kernel reads (codes + scales + zero points; FP32 for
//! libtorch fp32 and int8/int4pack's own storage), GFLOP/s is `2·M·N·K / t`. A GEMV streams its
//! weights once, so the roofline of the `% read` column is a read-only pass over 256 MiB, the
//! faster of one thread and all threads in each round (`read`, bytes summed per second); `memcpy`
//! of the same buffer (bytes copied per second) is printed beside it for reference. Every kernel cycles through copies of its weight (at least 128 MiB
//! in all), so weights come from DRAM on every call, never from the last call's cache.
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use mixq_kernels::{
    matmul, matmul_w4a8, matmul_w8a8, random_weight, read_bytes, read_bytes_all_threads, LibtorchOp, LibtorchWeight, PackedWeight,
    WeightFormat,
};
use std::hint::black_box;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const COPY_BYTES: usize = 256 << 20;

/// Each kernel cycles through copies of its weight totalling at least this many bytes, so that
/// every call reads its weight from DRAM as in a real model's forward pass, not from the 32 MiB
/// L3 that a single 4-bit 4096×4096 weight (9 MB) would otherwise stay in between calls.
const COLD_BYTES: usize = 128 << 20;

/// Whether this is a benchmark run (`cargo bench` passes `--bench`), not `cargo test
/// --all-targets` checking that each benchmark runs once.
fn benchmarking() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// How many copies of a `bytes`-byte weight [`COLD_BYTES`] needs (one when only testing).
fn copies(bytes: usize) -> usize {
    if benchmarking() {
        COLD_BYTES.div_ceil(bytes.max(1)).clamp(1, 4096)
    } else {
        1
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kernel {
    W4,
    W4A8,
    W8,
    Fp8,
    Fp4,
    W8A8,
    TorchFp32,
    TorchInt8,
    TorchInt4,
}

const KERNELS: [Kernel; 9] =
    [Kernel::W4, Kernel::W4A8, Kernel::W8, Kernel::Fp8, Kernel::Fp4, Kernel::W8A8, Kernel::TorchFp32, Kernel::TorchInt8, Kernel::TorchInt4];

impl Kernel {
    fn name(self) -> &'static str {
        match self {
            Kernel::W4 => "w4-g64",
            Kernel::W4A8 => "w4a8-g64",
            Kernel::W8 => "w8",
            Kernel::Fp8 => "fp8-e4m3",
            Kernel::Fp4 => "fp4-g32",
            Kernel::W8A8 => "w8a8",
            Kernel::TorchFp32 => "torch-fp32",
            Kernel::TorchInt8 => "torch-int8pack",
            Kernel::TorchInt4 => "torch-int4pack",
        }
    }
    fn runs_at(self, m: usize) -> bool {
        match self {
            Kernel::TorchInt8 | Kernel::TorchInt4 => m <= 8,
            _ => true,
        }
    }
}

fn cases() -> Vec<((usize, usize), usize)> {
    let set = std::env::var("MIXQ_BENCH_SET").unwrap_or_else(|_| "default".into());
    let all_shapes = [(768, 768), (768, 3072), (4096, 4096), (4096, 11008)];
    let all_m = [1, 8, 32, 128];
    let mut v = Vec::new();
    for s in all_shapes {
        for m in all_m {
            let keep = match set.as_str() {
                "full" => true,
                "quick" => (s == (768, 768) || s == (4096, 4096)) && (m == 1 || m == 32),
                _ => m == 1 || s == (768, 768) || s == (4096, 4096) || (s == (768, 3072) && m == 32),
            };
            if keep {
                v.push((s, m));
            }
        }
    }
    v
}

/// A prepared kernel: a closure that runs it once, and the weight bytes it reads.
struct Prepared {
    run: Box<dyn FnMut()>,
    bytes: usize,
}

fn prepare(kernel: Kernel, n: usize, k: usize, m: usize) -> Prepared {
    let int8 = WeightFormat::Int8 { asymmetric: false };
    let int4 = WeightFormat::Int4 { asymmetric: false };
    let weight = |f: WeightFormat, g: usize| -> PackedWeight { random_weight(f, n, k, g, 1).expect("random weight") };
    tch::manual_seed(0);
    let xt = Tensor::randn([m as i64, k as i64], (Kind::Float, Device::Cpu));
    let x: Vec<f32> = Vec::try_from(xt.view([-1])).expect("x");
    let native = |w: PackedWeight, kernel: Kernel| -> Prepared {
        let bytes = w.bytes();
        let ws = vec![w; copies(bytes)];
        let (x, mut y, mut i) = (x.clone(), vec![0f32; m * n], 0);
        Prepared {
            run: Box::new(move || {
                let w = &ws[i];
                i = (i + 1) % ws.len();
                match kernel {
                    Kernel::W8A8 => matmul_w8a8(black_box(&x), m, w, &mut y).expect("w8a8"),
                    Kernel::W4A8 => matmul_w4a8(black_box(&x), m, w, &mut y).expect("w4a8"),
                    _ => matmul(black_box(&x), m, w, &mut y).expect("matmul"),
                }
                black_box(&y);
            }),
            bytes,
        }
    };
    let torch = |w: PackedWeight, op: LibtorchOp, bytes: usize| -> Prepared {
        let lws: Vec<LibtorchWeight> =
            (0..copies(bytes)).map(|_| LibtorchWeight::new(&w, op, Device::Cpu).expect("libtorch weight")).collect();
        let (xt, mut i) = (xt.shallow_clone(), 0);
        Prepared {
            run: Box::new(move || {
                let lw = &lws[i];
                i = (i + 1) % lws.len();
                let _ = black_box(lw.forward(&xt).expect("libtorch op"));
            }),
            bytes,
        }
    };
    match kernel {
        Kernel::W4 | Kernel::W4A8 => native(weight(int4, 64), kernel),
        Kernel::W8 | Kernel::W8A8 => native(weight(int8, k), kernel),
        Kernel::Fp8 => native(weight(WeightFormat::Fp8E4M3, k), kernel),
        Kernel::Fp4 => native(weight(WeightFormat::Fp4E2M1, 32), kernel),
        Kernel::TorchFp32 => torch(weight(int8, k), LibtorchOp::Fp32, 4 * n * k),
        Kernel::TorchInt8 => torch(weight(int8, k), LibtorchOp::Int8Pack, n * k + 4 * n),
        // int4pack keeps 4-bit codes plus FP32 scale and zero per group of 64.
        Kernel::TorchInt4 => torch(weight(int4, 64), LibtorchOp::Int4Pack, n * k / 2 + 8 * n * (k / 64)),
    }
}

fn bench_kernels(c: &mut Criterion) {
    if std::env::var("MIXQ_BENCH_SUMMARY_ONLY").is_ok() {
        return;
    }
    let src = vec![1u8; COPY_BYTES];
    let mut dst = vec![0u8; COPY_BYTES];
    let mut g = c.benchmark_group("roofline");
    g.throughput(Throughput::Bytes(COPY_BYTES as u64));
    g.bench_function("copy-256MiB", |b| b.iter(|| copy(&src, &mut dst)));
    g.bench_function("read-256MiB", |b| b.iter(|| read_bytes(black_box(&src))));
    g.finish();
    drop((src, dst));
    for ((n, k), m) in cases() {
        let mut g = c.benchmark_group(format!("{n}x{k}/m{m}"));
        for kernel in KERNELS.into_iter().filter(|kn| kn.runs_at(m)) {
            let mut p = prepare(kernel, n, k, m);
            g.throughput(Throughput::Bytes(p.bytes as u64));
            g.bench_function(BenchmarkId::from_parameter(kernel.name()), |b| b.iter(&mut p.run));
        }
        g.finish();
    }
}

fn copy(src: &[u8], dst: &mut [u8]) {
    black_box(&mut *dst).copy_from_slice(black_box(src));
    black_box(dst);
}

/// Rounds of the summary (`MIXQ_BENCH_ROUNDS`, default 15).
fn rounds() -> usize {
    std::env::var("MIXQ_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).filter(|&r| r > 0).unwrap_or(15)
}

/// Mean time per call of `reps` back-to-back calls of `f`.
fn time_reps(f: &mut dyn FnMut(), reps: usize) -> f64 {
    let s = Instant::now();
    for _ in 0..reps {
        f();
    }
    s.elapsed().as_secs_f64() / reps as f64
}

fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// The summary table. This VM's memory bandwidth and CPU share drift by up to 2× within a
/// minute (other tenants), so kernels timed one after the other are compared under different
/// conditions. Here, per shape, every kernel and the read-only roofline pass are timed once per
/// round, in turn (the starting kernel rotates), for [`rounds`] rounds; a kernel's time is the
/// median over rounds, and its ratios (vs libtorch FP32, vs int4pack, % of the read roofline)
/// are medians of the per-round ratios, so slow phases of the machine hit both sides alike.
/// Each timing is the mean of enough back-to-back calls to fill about 20 ms (weights rotate
/// through their copies, so every call still reads DRAM).
fn summary() {
    let rounds = rounds();
    let src = vec![1u8; COPY_BYTES];
    let mut dst = vec![0u8; COPY_BYTES];
    let mut read_one = || {
        black_box(read_bytes(black_box(&src)));
    };
    let mut read_all = || {
        black_box(read_bytes_all_threads(black_box(&src)));
    };
    // The faster of a one-thread and an all-threads read of the 256 MiB, in bytes per second (on
    // this 2-core VM all threads were not faster than one: 20.8 against 26–27 GB/s medians,
    // 2026-11-29).
    let mut read_pass = || COPY_BYTES as f64 / time_reps(&mut read_one, 1).min(time_reps(&mut read_all, 1));
    read_pass();
    let copy_gbs = COPY_BYTES as f64 / median_of((0..5).map(|_| time_reps(&mut || copy(&src, &mut dst), 1)).collect()) / 1e9;
    drop(dst);
    println!(
        "\nmixq-kernels summary ({} threads; {rounds} interleaved rounds per shape; memcpy {copy_gbs:.1} GB/s copied; \
         % read = share of the faster of a one-thread and an all-threads read-only pass over 256 MiB timed in the same rounds)",
        rayon::current_num_threads()
    );
    println!(
        "{:<16} {:>11} {:>4} {:>10} {:>8} {:>9} {:>8} {:>10} {:>10}",
        "kernel", "N x K", "M", "time", "GB/s", "% read", "GFLOP/s", "vs fp32", "vs i4pack"
    );
    for ((n, k), m) in cases() {
        let mut prepared: Vec<(Kernel, Prepared, usize)> = KERNELS
            .into_iter()
            .filter(|kn| kn.runs_at(m))
            .map(|kernel| {
                let mut p = prepare(kernel, n, k, m);
                (p.run)();
                let once = time_reps(&mut p.run, 1);
                let reps = ((0.02 / once.max(1e-7)).ceil() as usize).clamp(1, 10_000);
                (kernel, p, reps)
            })
            .collect();
        let kinds = prepared.len();
        // times[r][i]: kernel i in round r; read[r]: bytes per second of the read pass.
        let mut times = vec![vec![f64::NAN; kinds]; rounds];
        let mut read = vec![f64::NAN; rounds];
        for r in 0..rounds {
            for step in 0..=kinds {
                let i = (r + step) % (kinds + 1);
                if i == kinds {
                    read[r] = read_pass();
                } else {
                    let (_, p, reps) = &mut prepared[i];
                    times[r][i] = time_reps(&mut p.run, *reps);
                }
            }
        }
        let index = |kn: Kernel| prepared.iter().position(|(k2, _, _)| *k2 == kn);
        let (fp32_i, i4_i) = (index(Kernel::TorchFp32), index(Kernel::TorchInt4));
        for (i, (kernel, p, _)) in prepared.iter().enumerate() {
            let per_round = |f: &dyn Fn(usize) -> f64| median_of((0..rounds).map(f).collect());
            let t = per_round(&|r| times[r][i]);
            let gbs = p.bytes as f64 / t / 1e9;
            let pct_read = per_round(&|r| 100.0 * p.bytes as f64 / times[r][i] / read[r]);
            let vs_fp32 = fp32_i.map_or(f64::NAN, |f| per_round(&|r| times[r][f] / times[r][i]));
            let vs_i4 = i4_i.map_or("-".to_string(), |f| format!("{:.1}x", per_round(&|r| times[r][f] / times[r][i])));
            println!(
                "{:<16} {:>11} {:>4} {:>8.3}ms {:>8.1} {:>8.0}% {:>8.1} {:>9.2}x {:>10}",
                kernel.name(),
                format!("{n}x{k}"),
                m,
                t * 1e3,
                gbs,
                pct_read,
                2.0 * (m * n * k) as f64 / t / 1e9,
                vs_fp32,
                vs_i4
            );
        }
        println!(
            "{:<16} {:>11} {:>4} read-only roofline in these rounds: median {:.1} GB/s (min {:.1}, max {:.1})",
            "",
            format!("{n}x{k}"),
            m,
            median_of(read.clone()) / 1e9,
            read.iter().cloned().fold(f64::INFINITY, f64::min) / 1e9,
            read.iter().cloned().fold(0.0, f64::max) / 1e9
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    targets = bench_kernels
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // `cargo test --all-targets` must not spend minutes on the summary.
    if benchmarking() {
        summary();
    }
}
