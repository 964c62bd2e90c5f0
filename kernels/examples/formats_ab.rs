//! Interleaved timing of the 8-bit kernels on one shape: W8 and FP8 E4M3 (`matmul`, FP32
//! activations), W8A8 (`matmul_w8a8`) and libtorch FP32, each timed once per round in turn so
//! that load on a shared machine hits all of them alike, each after an untimed 64 MiB read that
//! evicts the L3 (so all stream their weights from DRAM); prints the median and minimum over the
//! rounds, the speed-up over libtorch FP32 and a read-only roofline measured in the same run,
//! and the median CPU time of the process over the call (all threads, from
//! `/proc/self/task/*/schedstat`): on a loaded machine wall time mostly measures the other
//! processes, CPU time much less so (set `OMP_WAIT_POLICY=PASSIVE` so that libtorch's idle
//! OpenMP threads sleep rather than spin and count).
//! `MIXQ_AB_NO_FLUSH=1` skips the evicting read (decode throughput in cache).
//! Usage: `cargo run --release -p mixq-kernels --example formats_ab -- [N K M ROUNDS KERNELS]`
//! (defaults 4096 4096 1 41 w8,fp8,w8a8,fp4,torch-fp32; `torch-fp32` is always timed).
use mixq_kernels::{matmul, matmul_w8a8, random_weight, read_bytes, LibtorchOp, LibtorchWeight, WeightFormat};
use std::hint::black_box;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// CPU time of all threads of this process so far, in seconds.
fn cpu_s() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return 0.0 };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        * 1e-9
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |i: usize, d: usize| -> anyhow::Result<usize> { Ok(args.get(i).map(|s| s.parse()).transpose()?.unwrap_or(d)) };
    let (n, k, m, rounds) = (get(0, 4096)?, get(1, 4096)?, get(2, 1)?, get(3, 41)?);
    let list = args.get(4).cloned().unwrap_or_else(|| "w8,fp8,w8a8,fp4".into());
    let w8 = random_weight(WeightFormat::Int8 { asymmetric: false }, n, k, k, 1)?;
    let fp8 = random_weight(WeightFormat::Fp8E4M3, n, k, k, 1)?;
    let fp4 = random_weight(WeightFormat::Fp4E2M1, n, k, 32, 1)?;
    tch::manual_seed(0);
    let xt = Tensor::randn([m as i64, k as i64], (Kind::Float, Device::Cpu));
    let x: Vec<f32> = Vec::try_from(xt.view([-1]))?;
    let mut y = vec![0f32; m * n];
    let fp32 = LibtorchWeight::new(&w8, LibtorchOp::Fp32, Device::Cpu)?;
    let mut names = vec!["read-256MiB", "torch-fp32"];
    names.extend(list.split(',').filter(|s| ["w8", "fp8", "w8a8", "fp4"].contains(s)));
    let src = vec![1u8; 256 << 20];
    let flush = vec![2u8; 64 << 20];
    // MIXQ_AB_NO_FLUSH=1 leaves out the evicting read: small weights stay in cache, which
    // measures the decode throughput rather than the memory.
    let no_flush = std::env::var("MIXQ_AB_NO_FLUSH").is_ok();
    let mut t: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut c: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for round in 0..rounds + 2 {
        for ((name, ts), cs) in names.iter().zip(t.iter_mut()).zip(c.iter_mut()) {
            if *name != "read-256MiB" && !no_flush {
                black_box(read_bytes(&flush));
            }
            let c0 = cpu_s();
            let s = Instant::now();
            match *name {
                "read-256MiB" => drop(black_box(read_bytes(&src))),
                "torch-fp32" => drop(black_box(fp32.forward(&xt)?)),
                "w8" => matmul(black_box(&x), m, &w8, &mut y)?,
                "fp8" => matmul(black_box(&x), m, &fp8, &mut y)?,
                "fp4" => matmul(black_box(&x), m, &fp4, &mut y)?,
                _ => matmul_w8a8(black_box(&x), m, &w8, &mut y)?,
            }
            black_box(&y);
            if round >= 2 {
                ts.push(s.elapsed().as_secs_f64());
                cs.push(cpu_s() - c0);
            }
        }
    }
    for v in t.iter_mut().chain(c.iter_mut()) {
        v.sort_by(f64::total_cmp);
    }
    let (med, min) = (|v: &Vec<f64>| v[v.len() / 2], |v: &Vec<f64>| v[0]);
    let read = (256 << 20) as f64 / med(&t[0]) / 1e9;
    println!("{n}x{k} m={m}, {rounds} interleaved rounds, {} threads; read roofline {read:.1} GB/s", rayon::current_num_threads());
    for ((name, v), cv) in names.iter().zip(&t).zip(&c).skip(1) {
        let bytes = match *name {
            "torch-fp32" => 4 * n * k,
            "fp4" => fp4.bytes(),
            _ => w8.bytes(),
        };
        let gbs = bytes as f64 / med(v) / 1e9;
        println!(
            "{name:<11} median {:>8.3} ms {:>6.1} GB/s {:>4.0}% read {:>5.2}x fp32 | min {:>8.3} ms {:>5.2}x fp32 | cpu {:>8.3} ms",
            med(v) * 1e3,
            gbs,
            100.0 * gbs / read,
            med(&t[1]) / med(v),
            min(v) * 1e3,
            min(&t[1]) / min(v),
            med(cv) * 1e3,
        );
    }
    Ok(())
}
