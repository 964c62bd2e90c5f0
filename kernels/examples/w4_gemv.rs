//! Interleaved A/B timing of the W4 GEMV kernels on one shape: the FP32-activation int4 kernel
//! (`matmul`), W4A8-dynamic (`matmul_w4a8`), libtorch FP32 and, optionally,
//! `_weight_int4pack_mm_for_cpu`, each timed once per round in turn so that load on a shared
//! machine hits all of them alike, each after an untimed 64 MiB read that evicts the L3 (so all
//! stream from DRAM); prints the median and minimum over the rounds and a read-only roofline
//! measured in the same run.
//! Usage: `cargo run --release -p mixq-kernels --example w4_gemv -- [N K M GROUP ROUNDS INT4PACK(0/1)]`
//! (defaults 4096 4096 1 64 41 1).
//! `MIXQ_AB_SKIP_READ=1`: no evicting reads (weights that fit stay cached between calls).
//! `MIXQ_AB_B2B=R`: each sample is the mean of R back-to-back calls of one kernel on one weight,
//! as ggml's `test-backend-ops perf` times (with `MIXQ_AB_SKIP_READ=1`, its protocol exactly:
//! what stays in L3 from the previous call of the same kernel is reused).
use mixq_kernels::{matmul, matmul_w4a8, random_weight, read_bytes, LibtorchOp, LibtorchWeight, WeightFormat};
use std::hint::black_box;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn main() -> anyhow::Result<()> {
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse()).collect::<Result<_, _>>()?;
    let get = |i: usize, d: usize| a.get(i).copied().unwrap_or(d);
    let (n, k, m, group, rounds, int4pack) = (get(0, 4096), get(1, 4096), get(2, 1), get(3, 64), get(4, 41), get(5, 1) != 0);
    let w4 = random_weight(WeightFormat::Int4 { asymmetric: false }, n, k, group, 1)?;
    let w4a = random_weight(WeightFormat::Int4 { asymmetric: true }, n, k, group, 1)?;
    tch::manual_seed(0);
    let xt = Tensor::randn([m as i64, k as i64], (Kind::Float, Device::Cpu));
    let x: Vec<f32> = Vec::try_from(xt.view([-1]))?;
    let mut y = vec![0f32; m * n];
    let fp32 = LibtorchWeight::new(&w4, LibtorchOp::Fp32, Device::Cpu)?;
    let i4p = if int4pack { Some(LibtorchWeight::new(&w4, LibtorchOp::Int4Pack, Device::Cpu)?) } else { None };
    let src = vec![1u8; 256 << 20];
    let mut names =
        vec!["read-256MiB", "w4 fp32-act (matmul)", "w4a8 (matmul_w4a8)", "w4-asym a8", "torch-fp32", "read w4 bytes, all thr."];
    if i4p.is_some() {
        names.push("torch-int4pack");
    }
    let mut t: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    // Before each kernel, an untimed read of 64 MiB (twice this VM's 32 MiB L3) so that every kernel
    // streams its weights from DRAM, even those small enough to stay in L3 between calls.
    // MIXQ_AB_SKIP_READ=1 leaves out both read passes, so small weights stay in cache.
    let skip_read = std::env::var("MIXQ_AB_SKIP_READ").is_ok();
    let flush = vec![2u8; 64 << 20];
    let b2b: usize = std::env::var("MIXQ_AB_B2B").ok().and_then(|v| v.parse().ok()).unwrap_or(1).max(1);
    for round in 0..rounds + 2 {
        for (idx, ts) in t.iter_mut().enumerate() {
            if idx == 0 && skip_read && round > 0 {
                ts.push(1.0);
                continue;
            }
            if idx > 0 && !skip_read {
                black_box(read_bytes(&flush));
            }
            let reps = if idx == 0 { 1 } else { b2b };
            let s = Instant::now();
            for _ in 0..reps {
                match idx {
                    0 => drop(black_box(read_bytes(&src))),
                    1 => matmul(black_box(&x), m, &w4, &mut y)?,
                    2 => matmul_w4a8(black_box(&x), m, &w4, &mut y)?,
                    3 => matmul_w4a8(black_box(&x), m, &w4a, &mut y)?,
                    4 => drop(black_box(fp32.forward(&xt)?)),
                    5 => drop(black_box(read_all_threads(&w4))),
                    _ => drop(black_box(i4p.as_ref().map(|l| l.forward(&xt)).transpose()?)),
                }
                black_box(&y);
            }
            if round >= 2 {
                ts.push(s.elapsed().as_secs_f64() / reps as f64);
            }
        }
    }
    let s = Instant::now();
    for _ in 0..100 {
        black_box(mixq_kernels::quantize_activations_blocks(black_box(&x), m, k)?);
    }
    println!("quantize_activations_blocks: {:.1} us", s.elapsed().as_secs_f64() * 1e4);
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let meds: Vec<f64> = t.iter_mut().map(med).collect();
    let mins: Vec<f64> = t.iter().map(|v| v[0]).collect();
    let read = (256 << 20) as f64 / meds[0] / 1e9;
    let bytes = [0, w4.bytes(), w4.bytes(), w4a.bytes(), 4 * n * k, w4.bytes(), n * k / 2 + 8 * n * (k / group)];
    println!(
        "{n}x{k} m={m} group {group}, {rounds} interleaved rounds of {b2b} back-to-back call(s) each, {} threads; read roofline {read:.1} GB/s",
        rayon::current_num_threads()
    );
    for (i, name) in names.iter().enumerate().skip(1) {
        let gbs = bytes[i] as f64 / meds[i] / 1e9;
        println!(
            "{name:<22} median {:>8.3} ms {:>6.1} GB/s {:>4.0}% read {:>6.2}x fp32 | min {:>8.3} ms {:>6.2}x fp32 {:>5.0}% read",
            meds[i] * 1e3,
            gbs,
            100.0 * gbs / read,
            meds[4] / meds[i],
            mins[i] * 1e3,
            mins[4] / mins[i],
            100.0 * bytes[i] as f64 / mins[i] / 1e9 / ((256 << 20) as f64 / mins[0] / 1e9)
        );
    }
    Ok(())
}

/// The roofline of this weight in this protocol: every byte the W4 kernels read (codes and
/// scales), summed as `u64` on all of rayon's threads, each thread a contiguous range as the
/// kernels' tasks.
fn read_all_threads(w: &mixq_kernels::PackedWeight) -> u64 {
    use rayon::prelude::*;
    let codes: u64 = w.data().par_chunks(64 << 10).map(read_bytes).reduce(|| 0, u64::wrapping_add);
    let scales: u64 = w
        .scales()
        .par_chunks(16 << 10)
        .map(|c| c.iter().map(|v| u64::from(v.to_bits())).fold(0, u64::wrapping_add))
        .reduce(|| 0, u64::wrapping_add);
    codes.wrapping_add(scales)
}
