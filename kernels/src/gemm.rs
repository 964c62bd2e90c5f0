//! Safe entry points of the CPU kernels: shape checks, instruction-set dispatch, threading.
//!
//! `y[m, n] = x[m, k] · W[n, k]ᵀ` with `x`, `y` row-major FP32 and `W` a [`PackedWeight`].
//! Work is split across rayon threads by blocks of weight rows (each task reads its rows once
//! and writes its own slice of a transposed output `yᵀ[n, m]`, so no two tasks share a cache
//! line of weights or outputs); `m > 1` results are transposed back at the end (`m · n`
//! floats, negligible next to the product) — except from `PANEL_M` rows on with AVX2, where
//! the broadcast kernel writes row-major output blocks per task of output columns. Calls below
//! `SERIAL_MACS` multiply-adds (`GEMM_SERIAL_MACS` for FP32 activations at `m > 1`) run their
//! tasks on the calling thread: rayon's hand-off costs more than a small layer's product.
//!
//! [`matmul_w4a8`] is a separate mode for int4 weights: it quantizes the activations to INT8 per
//! block of 32 and multiplies integers, trading the activation rounding for several times fewer
//! instructions per weight than decoding to FP32 (see the `avx2` module).
//!
//! Dispatch: [`Isa::Auto`] uses AVX2 + FMA when the CPU has them (checked once per call with
//! `is_x86_feature_detected!`, a cached lookup) and the weight's groups are whole 32-element
//! blocks (`group % 32 == 0`, or per channel); otherwise the portable scalar kernel, which gives
//! the same values up to FP32 summation order.

use crate::error::{shape, KernelError, Result};
use crate::pack::{PackedWeight, WeightFormat};
use rayon::prelude::*;

/// Instruction set of the CPU kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Isa {
    /// The best available for the weight (AVX2 + FMA when present, else scalar).
    #[default]
    Auto,
    /// Portable Rust, any CPU.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C (an error on CPUs without them).
    Avx2,
}

/// Whether the CPU running this process can use `isa`.
pub fn isa_available(isa: Isa) -> bool {
    match isa {
        Isa::Auto | Isa::Scalar => true,
        Isa::Avx2 => has_avx2(),
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}
#[cfg(not(target_arch = "x86_64"))]
fn has_avx2() -> bool {
    false
}

/// Rows of the weight per parallel task.
const ROWS: usize = 8;

/// Below this many multiply-adds per call (`m · n · k`) the tasks run one after another on the
/// calling thread: handing tasks to rayon's pool costs about 17 µs per call here (10 × 128 at
/// M = 1: 0.018 ms on the pool, under 1 µs serial; 64 × 576: 0.023 vs 0.005 ms), more than a small
/// layer's whole product. One thread decodes and multiplies about 10 multiply-adds per ns in
/// cache, so two threads win from about `2 · 17 µs · 10 / ns ≈ 340 k` on an idle machine; under
/// load (average 4, the other core busy) serial stayed as fast up to 1024 × 2048. 2^19 sits
/// between (`cargo run --release -p mixq-kernels --example latency -- N K M`, README).
const SERIAL_MACS: usize = 1 << 19;

/// Whether a call of `macs` multiply-adds runs on the calling thread (see [`SERIAL_MACS`]).
fn runs_serial(macs: usize) -> bool {
    macs < SERIAL_MACS || rayon::current_num_threads() == 1
}

/// [`SERIAL_MACS`] for the FP32-activation kernels at `m > 1`. Their calls of 2^19 to 2^21
/// multiply-adds (the demo CNN's 32 × 288 at M = 64, 64 × 576 at M = 16, 128 × 1152 at M = 4, each
/// 590 k) took 15–37 µs on one thread but a median of 38–100 µs on two (rayon's hand-off, with the
/// other core often busy: load average 1–2), in cache, 2026-11-29
/// (`cargo run --release -p mixq-kernels --example latency -- N K M`, interleaved with
/// `RAYON_NUM_THREADS=1`); from 128 × 1152 at M = 16 (2.4 M) two threads had the lower minimum
/// (51 against 82 µs) though not always the lower median.
const GEMM_SERIAL_MACS: usize = 1 << 21;

/// Whether an `m > 1` FP32-activation call of `macs` multiply-adds runs on the calling thread.
fn gemm_runs_serial(macs: usize) -> bool {
    macs < GEMM_SERIAL_MACS || rayon::current_num_threads() == 1
}

/// Runs `f(t, chunk)` for the consecutive `chunk`-long pieces of `out` (`t` the piece's index):
/// on rayon's pool, or on this thread when `macs <` [`SERIAL_MACS`] or the pool has one thread.
fn run_tasks<F>(out: &mut [f32], chunk: usize, macs: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Send + Sync,
{
    run_tasks_if(out, chunk, runs_serial(macs), f)
}

/// [`run_tasks`] with the choice made by the caller: on this thread when `serial`.
fn run_tasks_if<F>(out: &mut [f32], chunk: usize, serial: bool, f: F)
where
    F: Fn(usize, &mut [f32]) + Send + Sync,
{
    if serial {
        out.chunks_mut(chunk).enumerate().for_each(|(t, c)| f(t, c));
    } else {
        out.par_chunks_mut(chunk).enumerate().for_each(|(t, c)| f(t, c));
    }
}

/// `y = x · Wᵀ` (`x`: `[m, k]`, `y`: `[m, n]`, row-major FP32) with the best kernel available.
pub fn matmul(x: &[f32], m: usize, w: &PackedWeight, y: &mut [f32]) -> Result<()> {
    matmul_isa(x, m, w, y, Isa::Auto)
}

/// The kernel [`matmul`] would use for this weight on this CPU.
pub fn selected_isa(w: &PackedWeight, isa: Isa) -> Isa {
    let simd_ok = w.group.is_multiple_of(32) || w.group == w.k;
    match isa {
        Isa::Auto if has_avx2() && simd_ok => Isa::Avx2,
        Isa::Auto => Isa::Scalar,
        other => other,
    }
}

fn check_xy(x: &[f32], m: usize, k: usize, n: usize, y: &[f32]) -> Result<()> {
    if m == 0 {
        return Err(shape("m (activation rows)", "m > 0", m));
    }
    let (Some(mk), Some(mn)) = (m.checked_mul(k), m.checked_mul(n)) else {
        return Err(shape("m (activation rows)", "m · k and m · n within memory", m));
    };
    if x.len() != mk {
        return Err(shape("activations x", format!("{mk} values for [{m}, {k}]"), x.len()));
    }
    if y.len() != mn {
        return Err(shape("output y", format!("{} values for [{m}, {n}]", m * n), y.len()));
    }
    Ok(())
}

/// [`matmul`] with an explicit instruction set. `Isa::Avx2` is an error on a CPU without AVX2 +
/// FMA, or for a group size that is neither a multiple of 32 nor the whole row.
pub fn matmul_isa(x: &[f32], m: usize, w: &PackedWeight, y: &mut [f32], isa: Isa) -> Result<()> {
    check_xy(x, m, w.k, w.n, y)?;
    let isa = selected_isa(w, isa);
    if isa == Isa::Avx2 && !has_avx2() {
        return Err(KernelError::Unsupported("this CPU has no AVX2 + FMA; use Isa::Auto or Isa::Scalar".into()));
    }
    if isa == Isa::Avx2 && !(w.group.is_multiple_of(32) || w.group == w.k) {
        return Err(KernelError::Unsupported(format!(
            "the AVX2 kernels need groups of a multiple of 32 elements or per-channel scales; got group {} (use Isa::Auto)",
            w.group
        )));
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 && m >= PANEL_M {
        panel_matmul(x, m, w, y);
        return Ok(());
    }
    let mut yt = if m == 1 { Vec::new() } else { vec![0f32; m * w.n] };
    let out: &mut [f32] = if m == 1 { y } else { &mut yt };
    let macs = m.saturating_mul(w.n).saturating_mul(w.k);
    let serial = if m == 1 { runs_serial(macs) } else { gemm_runs_serial(macs) };
    run_tasks_if(out, ROWS * m, serial, |t, chunk| {
        let r0 = t * ROWS;
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                use crate::avx2::{rows, Fp4, Fp8, Int4, Int8};
                // SAFETY: AVX2 + FMA checked above; x.len() == m·k and y.len() == m·n checked;
                // the chunk covers rows r0 .. r0 + chunk.len()/m < n; the group condition holds.
                unsafe {
                    match w.format {
                        WeightFormat::Int4 { .. } => rows(&Int4(w), x, m, r0, chunk),
                        WeightFormat::Int8 { .. } => rows(&Int8(w), x, m, r0, chunk),
                        WeightFormat::Fp8E4M3 => rows(&Fp8(w), x, m, r0, chunk),
                        WeightFormat::Fp4E2M1 => rows(&Fp4(w), x, m, r0, chunk),
                    }
                }
            }
            _ => scalar_rows(w, x, m, r0, chunk),
        }
    });
    if m > 1 {
        transpose_out(&yt, m, w.n, y);
    }
    Ok(())
}

/// From this many activation rows on, the AVX2 weight-only kernel is `avx2::panels` (k-major
/// weight panels, broadcast register tiles, row-major output); below it `avx2::rows` (`gemv` at
/// `m = 1`, the 2 × 4 dot-product tile below). Measured on one thread, in cache, interleaved with the
/// old kernel (load average 1–1.7): `panels` was slower at M = 2 … 12 (768 × 768, M = 8: 236–270 µs
/// against 193–214 µs; 256 × 2304, M = 12: 265–298 against 247–264 µs; 4096 × 4096, M = 8:
/// 7.4–8.5 against 5.9–6.7 ms, minima), about even at M = 16 and faster from M = 24 on (see the
/// README's design notes): decoding into k-major panels costs more per weight than into rows.
const PANEL_M: usize = 16;
/// Output columns (weight rows) per parallel task of [`panel_matmul`]: a multiple of `avx2::NR`.
const PANEL_COLS: usize = 64;

/// `y = x · Wᵀ` by `avx2::panels`: on this thread straight into `y` when [`gemm_runs_serial`],
/// else per task of up to [`PANEL_COLS`] output columns (fewer when that leaves a thread idle) into its own row-major `[m, cols]` block of a
/// scratch buffer, copied into `y` row by row afterwards.
///
/// The caller has checked AVX2 + FMA + F16C, the shapes of `x` and `y` and the weight's group.
#[cfg(target_arch = "x86_64")]
fn panel_matmul(x: &[f32], m: usize, w: &PackedWeight, y: &mut [f32]) {
    use crate::avx2::{panels, Fp4, Fp8, Int4, Int8};
    let n = w.n;
    // SAFETY (both calls): AVX2 + FMA + F16C and the group condition checked by the caller;
    // x.len() == m·k; columns n0 .. n0 + nb < n, nb > 0; `out` holds m rows of stride ldy >= nb.
    let run = |n0: usize, nb: usize, out: &mut [f32], ldy: usize| unsafe {
        match w.format {
            WeightFormat::Int4 { .. } => panels(&Int4(w), x, m, n0, nb, out, ldy),
            WeightFormat::Int8 { .. } => panels(&Int8(w), x, m, n0, nb, out, ldy),
            WeightFormat::Fp8E4M3 => panels(&Fp8(w), x, m, n0, nb, out, ldy),
            WeightFormat::Fp4E2M1 => panels(&Fp4(w), x, m, n0, nb, out, ldy),
        }
    };
    let macs = m.saturating_mul(n).saturating_mul(w.k);
    let cols = n.div_ceil(rayon::current_num_threads()).next_multiple_of(crate::avx2::NR).min(PANEL_COLS);
    if gemm_runs_serial(macs) || cols >= n {
        run(0, n, y, n);
        return;
    }
    let mut blocks = vec![0f32; m * n];
    run_tasks_if(&mut blocks, cols * m, false, |t, chunk| run(t * cols, chunk.len() / m, chunk, chunk.len() / m));
    for (t, block) in blocks.chunks(cols * m).enumerate() {
        let nb = block.len() / m;
        for (yr, br) in y.chunks_exact_mut(n).zip(block.chunks_exact(nb)) {
            yr[t * cols..t * cols + nb].copy_from_slice(br);
        }
    }
}

/// Portable kernel: decode one row at a time into a buffer, then plain dot products.
fn scalar_rows(w: &PackedWeight, x: &[f32], m: usize, r0: usize, yt: &mut [f32]) {
    let k = w.k;
    let mut row = vec![0f32; k];
    for (j, out) in yt.chunks_exact_mut(m).enumerate() {
        let r = r0 + j;
        for (kk, v) in row.iter_mut().enumerate() {
            *v = w.value(r, kk);
        }
        for (i, o) in out.iter_mut().enumerate() {
            *o = dot(&x[i * k..(i + 1) * k], &row);
        }
    }
}

/// Dot product with eight partial sums (vectorisable by the compiler without fast-math).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, at) = a.split_at(a.len() / 8 * 8);
    let (bc, bt) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + at.iter().zip(bt).map(|(x, y)| x * y).sum::<f32>()
}

/// Activations quantized dynamically per row for [`matmul_w8a8`]: `x ≈ q · scale`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedActivations {
    /// Codes `[m, k]` in `-127..=127` (symmetric; −128 unused so `maddubs` cannot overflow).
    pub codes: Vec<i8>,
    /// One FP32 scale per row: `amax / 127` (1 for an all-zero row).
    pub scales: Vec<f32>,
}

/// Per-row symmetric INT8 quantization of `x` (`[m, k]`): `round_ties_even(x / (amax/127))`.
/// Errors on a shape mismatch or a non-finite value.
pub fn quantize_activations(x: &[f32], m: usize, k: usize) -> Result<QuantizedActivations> {
    quantize_activations_isa(x, m, k, Isa::Auto)
}

fn quantize_activations_isa(x: &[f32], m: usize, k: usize, isa: Isa) -> Result<QuantizedActivations> {
    if m == 0 || k == 0 || m.checked_mul(k) != Some(x.len()) {
        return Err(shape("activations x", format!("m · k values for [{m}, {k}] (m, k > 0)"), x.len()));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(shape("activations x", "finite values", format!("{} at index {i}", x[i])));
    }
    let mut codes = vec![0i8; m * k];
    let mut scales = vec![1f32; m];
    let use_avx2 = isa != Isa::Scalar && has_avx2();
    for ((row, q), s) in x.chunks_exact(k).zip(codes.chunks_exact_mut(k)).zip(scales.iter_mut()) {
        #[cfg(target_arch = "x86_64")]
        if use_avx2 {
            // SAFETY: AVX2 + FMA checked by has_avx2(); q.len() == row.len() == k.
            *s = unsafe { crate::avx2::quantize_row_avx2(row, q) };
            continue;
        }
        let _ = use_avx2;
        let amax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        if amax > 0.0 {
            *s = amax / 127.0;
        }
        for (c, v) in q.iter_mut().zip(row) {
            *c = (v / *s).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
    }
    Ok(QuantizedActivations { codes, scales })
}

/// W8A8: `y = x · Wᵀ` with `x` quantized per row to INT8 ([`quantize_activations`]), INT8 ×
/// INT8 → INT32 products, and `y = acc · x_scale · w_scale` in FP32. `W` must be symmetric
/// `int8` with per-channel scales (the INT32 sum needs one scale per row).
pub fn matmul_w8a8(x: &[f32], m: usize, w: &PackedWeight, y: &mut [f32]) -> Result<()> {
    matmul_w8a8_isa(x, m, w, y, Isa::Auto)
}

/// [`matmul_w8a8`] with an explicit instruction set.
pub fn matmul_w8a8_isa(x: &[f32], m: usize, w: &PackedWeight, y: &mut [f32], isa: Isa) -> Result<()> {
    if w.format != (WeightFormat::Int8 { asymmetric: false }) || w.group != w.k {
        return Err(KernelError::Unsupported(format!(
            "W8A8 needs a symmetric int8 weight with per-channel scales; got {} with group {} of {}",
            w.format, w.group, w.k
        )));
    }
    check_xy(x, m, w.k, w.n, y)?;
    let use_avx2 = match isa {
        Isa::Auto => has_avx2(),
        Isa::Avx2 if has_avx2() => true,
        Isa::Avx2 => return Err(KernelError::Unsupported("this CPU has no AVX2; use Isa::Auto or Isa::Scalar".into())),
        Isa::Scalar => false,
    };
    let xq = quantize_activations_isa(x, m, w.k, if use_avx2 { Isa::Avx2 } else { Isa::Scalar })?;
    let mut yt = vec![0f32; m * w.n];
    #[cfg(target_arch = "x86_64")]
    if use_avx2 && m >= W8A8_PANEL_M {
        w8a8_panels(w, &xq, m, &mut yt);
    } else {
        w8a8_small_m(w, &xq, m, use_avx2, &mut yt);
    }
    #[cfg(not(target_arch = "x86_64"))]
    w8a8_small_m(w, &xq, m, use_avx2, &mut yt);
    transpose_out(&yt, m, w.n, y);
    Ok(())
}

/// `yt[n, m]` (the tasks' transposed output) → `y[m, n]`, in blocks of 16 output columns (one
/// cache line of `y` per row): the plain column-by-column scatter (stride `n · 4` bytes) took
/// about a tenth of a W8A8 call at 4096 × 4096, M = 128.
fn transpose_out(yt: &[f32], m: usize, n: usize, y: &mut [f32]) {
    for r0 in (0..n).step_by(16) {
        let rb = 16.min(n - r0);
        let block = &yt[r0 * m..(r0 + rb) * m];
        for (i, yr) in y.chunks_exact_mut(n).enumerate() {
            for (jj, v) in yr[r0..r0 + rb].iter_mut().enumerate() {
                *v = block[jj * m + i];
            }
        }
    }
}

/// From this many activation rows on, W8A8 on AVX2 widens both operands to INT16 panels and
/// runs `avx2::i16_rows`' 2 × 4 register tile; below it, the `maddubs` kernel on the raw bytes
/// (`avx2::i8_rows`), which needs no extra pass over the weight.
const W8A8_PANEL_M: usize = 4;
/// Weight rows per parallel task of the W8A8 panel kernel: each task streams the whole INT16
/// activation matrix once per chunk of [`W8A8_KC`], so more rows per task mean less L3 traffic.
const W8A8_PANEL_ROWS: usize = 64;
/// Weight rows per L1-resident panel.
const W8A8_PANEL: usize = 16;
/// Inner elements per W8A8 chunk (a multiple of 16): a 4-row register tile's weights, 4 × 1024 ×
/// 2 B = 8 KiB, stay in L1 while all activation tiles stream past from L2 (128 rows × 1024 × 2 B
/// = 256 KiB at M = 128). Measured at 4096 × 4096, M = 128 (one thread, load average about 1):
/// 512 → 2048 about 8 % faster with the old unpacked activations; 1024 and 2048 even after
/// `pack_x_i16`; 1024 keeps the activation chunk in L2 for larger M.
const W8A8_KC: usize = 1024;

/// The W8A8 result of one output: the exact INT32 sum times `x_scale · w_scale`.
fn w8a8_out(acc: i32, sx: f32, sw: f32) -> f32 {
    acc as f32 * (sx * sw)
}

/// W8A8 for small `m`: per task of [`ROWS`] weight rows, the `maddubs` kernel on the raw bytes
/// (AVX2) or scalar INT32 sums, into `yt[n, m]`.
fn w8a8_small_m(w: &PackedWeight, xq: &QuantizedActivations, m: usize, use_avx2: bool, yt: &mut [f32]) {
    let k = w.k;
    run_tasks(yt, ROWS * m, m.saturating_mul(w.n).saturating_mul(k), |t, chunk| {
        let r0 = t * ROWS;
        let nb = chunk.len() / m;
        let mut acc = vec![0i32; nb * m];
        let k32 = if use_avx2 { k / 32 * 32 } else { 0 };
        #[cfg(target_arch = "x86_64")]
        if use_avx2 {
            const KC8: usize = 1024;
            let mut k0 = 0;
            while k0 < k32 {
                let kc = KC8.min(k32 - k0);
                // SAFETY: AVX2 checked by the caller; xq.codes.len() == m·k; rows r0..r0+nb < n
                // with stride k in w.data; k0 + kc <= k; acc.len() == nb·m.
                unsafe { crate::avx2::i8_rows(&w.data, &xq.codes, k, m, r0, nb, k0, kc, &mut acc) };
                k0 += kc;
            }
        }
        for j in 0..nb {
            let wr = &w.data[(r0 + j) * k..(r0 + j + 1) * k];
            for i in 0..m {
                let xr = &xq.codes[i * k..(i + 1) * k];
                let tail: i32 = (k32..k).map(|t| i32::from(wr[t] as i8) * i32::from(xr[t])).sum();
                acc[j * m + i] += tail;
            }
        }
        for j in 0..nb {
            for i in 0..m {
                chunk[j * m + i] = w8a8_out(acc[j * m + i], xq.scales[i], w.scales[r0 + j]);
            }
        }
    });
}

/// W8A8 for `m >=` [`W8A8_PANEL_M`] on AVX2: the activation codes widened to INT16 once per
/// call and laid out for the register tile ([`pack_x_i16`]); per task of [`W8A8_PANEL_ROWS`] weight rows and per chunk of [`W8A8_KC`] elements, the
/// weight rows widened into an L1-resident panel (amortised over all `m` rows), then
/// `avx2::i16_rows`; the `k % 16` tail in scalar INT32. Same INT32 sums, same FP32 output
/// expression as the other kernels, so bit-identical results.
#[cfg(target_arch = "x86_64")]
fn w8a8_panels(w: &PackedWeight, xq: &QuantizedActivations, m: usize, yt: &mut [f32]) {
    use crate::avx2::{i16_rows, pack_panel_i16};
    let k = w.k;
    let k16 = k / 16 * 16;
    let xpack = pack_x_i16(&xq.codes, m, k);
    run_tasks(yt, W8A8_PANEL_ROWS * m, m.saturating_mul(w.n).saturating_mul(k), |t, chunk| {
        let r0 = t * W8A8_PANEL_ROWS;
        let nb = chunk.len() / m;
        let mut acc8 = vec![0i32; 8 * nb * m];
        let mut panel = vec![0i16; nb.min(W8A8_PANEL) * W8A8_KC];
        let mut k0 = 0;
        while k0 < k16 {
            let kc = W8A8_KC.min(k16 - k0);
            let xc = &xpack[k0 * m..(k0 + kc) * m];
            // The activation chunk (m · kc INT16, packed) stays in L2 while the task's rows go
            // through it one panel of W8A8_PANEL rows (4-row tiles, each L1-resident) at a time.
            for p0 in (0..nb).step_by(W8A8_PANEL) {
                let pn = (nb - p0).min(W8A8_PANEL);
                // SAFETY: the caller checked AVX2; kc is a multiple of 16; rows r0 + p0 ..
                // r0 + p0 + pn < n exist with stride k, k0 + kc <= k; panel.len() >= pn · kc.
                unsafe { pack_panel_i16(&w.data, k, r0 + p0, pn, k0, kc, &mut panel) };
                let acc = &mut acc8[8 * p0 * m..8 * (p0 + pn) * m];
                // SAFETY: the caller checked AVX2; kc is a multiple of 16; the panel holds
                // pn · kc values laid out as i16_rows reads them (tiles of W8A8_NR rows, the
                // last shorter); xc is the chunk's m · kc values in pack_x_i16's layout;
                // acc.len() == 8 · pn · m.
                unsafe { i16_rows(&panel, pn, kc, xc, m, acc) };
            }
            k0 += kc;
        }
        for j in 0..nb {
            let wr = &w.data[(r0 + j) * k..(r0 + j + 1) * k];
            for i in 0..m {
                let xr = &xq.codes[i * k..(i + 1) * k];
                let lanes: i32 = acc8[8 * (j * m + i)..][..8].iter().sum();
                let tail: i32 = (k16..k).map(|t| i32::from(wr[t] as i8) * i32::from(xr[t])).sum();
                chunk[j * m + i] = w8a8_out(lanes + tail, xq.scales[i], w.scales[r0 + j]);
            }
        }
    });
}

/// The activation codes `[m, k]` widened to INT16 in `avx2::i16_rows`' layout, `m · k16` values
/// (`k16 = k / 16 · 16`): per chunk of [`W8A8_KC`] elements (`kc` wide, at offset `k0 · m`), per
/// tile of `W8A8_MR` rows (`mr` rows, the last may be shorter, at `+ i · kc`), per step `s` of 16
/// elements at `+ s · mr · 16`, row `ii` of the tile at `+ 16 ii`: one sequential stream per tile.
#[cfg(target_arch = "x86_64")]
fn pack_x_i16(codes: &[i8], m: usize, k: usize) -> Vec<i16> {
    use crate::avx2::W8A8_MR;
    let k16 = k / 16 * 16;
    let mut out = Vec::with_capacity(m * k16);
    let mut k0 = 0;
    while k0 < k16 {
        let kc = W8A8_KC.min(k16 - k0);
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(W8A8_MR);
            for s in (0..kc).step_by(16) {
                for ii in 0..mr {
                    let row = &codes[(i + ii) * k + k0 + s..][..16];
                    out.extend(row.iter().map(|&c| i16::from(c)));
                }
            }
            i += mr;
        }
        k0 += kc;
    }
    out
}

/// Elements per activation block of [`matmul_w4a8`]: one FP32 scale per 32 activations, as
/// ggml's `q8_0`, the same blocks as the 4-bit weight layout.
pub const ACT_BLOCK: usize = 32;

/// Activations quantized dynamically per block of [`ACT_BLOCK`] for [`matmul_w4a8`]:
/// `x[i, t] ≈ codes[i, t] · scales[i, t / 32]`.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockQuantizedActivations {
    /// Inner dimension `k` of each row.
    pub k: usize,
    /// Codes `[m, k]` in `-127..=127`.
    pub codes: Vec<i8>,
    /// Scales `[m, ⌈k / 32⌉]`: `amax / 127` of the block (1 for an all-zero block).
    pub scales: Vec<f32>,
}

impl BlockQuantizedActivations {
    /// The activations the W4A8 kernels multiply, `codes · scale` in FP32 (`[m, k]`).
    pub fn dequantize(&self) -> Vec<f32> {
        let kb = self.k.div_ceil(ACT_BLOCK);
        self.codes.iter().enumerate().map(|(i, &c)| f32::from(c) * self.scales[i / self.k * kb + i % self.k / ACT_BLOCK]).collect()
    }
}

/// Quantizes one row block by block: `scale = amax / 127`, `code = round_ties_even(x / scale)`.
/// The portable reference of `avx2::quantize_blocks_avx2`, which must give the same codes.
pub(crate) fn quantize_blocks(x: &[f32], codes: &mut [i8], scales: &mut [f32]) {
    for ((xb, qb), s) in x.chunks(ACT_BLOCK).zip(codes.chunks_mut(ACT_BLOCK)).zip(scales.iter_mut()) {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        *s = if d > 0.0 { d } else { 1.0 };
        for (c, v) in qb.iter_mut().zip(xb) {
            *c = (v / *s).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
    }
}

/// Block-wise symmetric INT8 quantization of `x` (`[m, k]`) for [`matmul_w4a8`]: per block of
/// [`ACT_BLOCK`] elements (the last block of a row may be shorter) `scale = amax / 127`,
/// `code = round_ties_even(x / scale)`. The same codes on every instruction set. Errors on a
/// shape mismatch or a non-finite value.
pub fn quantize_activations_blocks(x: &[f32], m: usize, k: usize) -> Result<BlockQuantizedActivations> {
    quantize_activations_blocks_isa(x, m, k, Isa::Auto)
}

fn quantize_activations_blocks_isa(x: &[f32], m: usize, k: usize, isa: Isa) -> Result<BlockQuantizedActivations> {
    if m == 0 || k == 0 || m.checked_mul(k) != Some(x.len()) {
        return Err(shape("activations x", format!("m · k values for [{m}, {k}] (m, k > 0)"), x.len()));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(shape("activations x", "finite values", format!("{} at index {i}", x[i])));
    }
    let kb = k.div_ceil(ACT_BLOCK);
    let mut codes = vec![0i8; m * k];
    let mut scales = vec![1f32; m * kb];
    let use_avx2 = isa != Isa::Scalar && has_avx2();
    for ((xr, qr), sr) in x.chunks_exact(k).zip(codes.chunks_exact_mut(k)).zip(scales.chunks_exact_mut(kb)) {
        #[cfg(target_arch = "x86_64")]
        if use_avx2 {
            // SAFETY: AVX2 + FMA checked by has_avx2().
            unsafe { crate::avx2::quantize_blocks_avx2(xr, qr, sr) };
            continue;
        }
        let _ = use_avx2;
        quantize_blocks(xr, qr, sr);
    }
    Ok(BlockQuantizedActivations { k, codes, scales })
}

/// One activation row laid out for the AVX2 W4A8 kernel (see `avx2::W4a8Row`).
#[cfg(target_arch = "x86_64")]
struct W4a8Prepared {
    xq: Vec<i8>,
    xs8: Vec<f32>,
    gsum: Vec<f32>,
}

/// Blocks per weight group (`usize::MAX` for one group per row).
fn blocks_per_group(w: &PackedWeight) -> usize {
    if w.group == w.k {
        usize::MAX
    } else {
        w.group / ACT_BLOCK
    }
}

/// `Σ_{b in g} scale(b) · Σ codes(b)` per weight group of one activation row.
fn group_sums(codes: &[i8], scales: &[f32], w: &PackedWeight) -> Vec<f32> {
    let bpg = blocks_per_group(w);
    let mut gsum = vec![0f32; w.groups_per_row()];
    for (b, (qb, s)) in codes.chunks(ACT_BLOCK).zip(scales).enumerate() {
        let q: i32 = qb.iter().map(|&c| i32::from(c)).sum();
        gsum[if bpg == usize::MAX { 0 } else { b / bpg }] += s * q as f32;
    }
    gsum
}

#[cfg(target_arch = "x86_64")]
fn prepare_w4a8(codes: &[i8], scales: &[f32], w: &PackedWeight) -> W4a8Prepared {
    let kb = scales.len();
    let pairs = kb.div_ceil(2);
    let mut xq = vec![0i8; 64 * pairs];
    let mut xs8 = vec![0f32; 8 * pairs];
    for (b, (qb, &s)) in codes.chunks(ACT_BLOCK).zip(scales).enumerate() {
        let (p, h) = (b / 2, b % 2);
        // Elements 0..16 of the block, then 16..32 (a short last block fills what it has).
        for (half, c) in qb.chunks(16).enumerate() {
            let o = 64 * p + 32 * half + 16 * h;
            xq[o..o + c.len()].copy_from_slice(c);
        }
        xs8[8 * p + 4 * h..8 * p + 4 * h + 4].fill(s);
    }
    W4a8Prepared { xq, xs8, gsum: group_sums(codes, scales, w) }
}

/// W4A8-dynamic: `y = x · Wᵀ` for an int4 weight (symmetric or asymmetric) with the activations
/// quantized on the fly to INT8 per block of 32 ([`quantize_activations_blocks`]), as ggml's
/// `q4 × q8_0` dot product: exact integer dot products inside each block (AVX2 `maddubs` on the
/// raw nibbles; the zero point is one precomputed `Σ codes` term per group), one FP32 multiply
/// by `scale_x · scale_w` per block. **Not** the same result as [`matmul`]: the activations are
/// rounded to 8 bits (error at most `scale_x / 2` per element); the result equals, up to FP32
/// summation order, the FP32 product of [`BlockQuantizedActivations::dequantize`] and
/// [`PackedWeight::dequantize`]. Needs `group % 32 == 0` or per-channel scales.
pub fn matmul_w4a8(x: &[f32], m: usize, w: &PackedWeight, y: &mut [f32]) -> Result<()> {
    matmul_w4a8_isa(x, m, w, y, Isa::Auto)
}

/// [`matmul_w4a8`] with an explicit instruction set.
pub fn matmul_w4a8_isa(x: &[f32], m: usize, w: &PackedWeight, y: &mut [f32], isa: Isa) -> Result<()> {
    if !matches!(w.format, WeightFormat::Int4 { .. }) || !(w.group.is_multiple_of(ACT_BLOCK) || w.group == w.k) {
        return Err(KernelError::Unsupported(format!(
            "W4A8 needs an int4 weight with groups of a multiple of 32 or per-channel scales; got {} with group {} of {} \
             (use matmul for FP32 activations)",
            w.format, w.group, w.k
        )));
    }
    check_xy(x, m, w.k, w.n, y)?;
    let use_avx2 = match isa {
        Isa::Auto => has_avx2(),
        Isa::Avx2 if has_avx2() => true,
        Isa::Avx2 => return Err(KernelError::Unsupported("this CPU has no AVX2 + FMA; use Isa::Auto or Isa::Scalar".into())),
        Isa::Scalar => false,
    };
    let xq = quantize_activations_blocks_isa(x, m, w.k, if use_avx2 { Isa::Avx2 } else { Isa::Scalar })?;
    let (k, kb) = (w.k, w.k.div_ceil(ACT_BLOCK));
    let mut yt = if m == 1 { Vec::new() } else { vec![0f32; m * w.n] };
    let out: &mut [f32] = if m == 1 { y } else { &mut yt };
    #[cfg(target_arch = "x86_64")]
    if use_avx2 {
        use crate::avx2::{w4a8_rows, PairGroups, W4a8Row};
        let prep: Vec<W4a8Prepared> =
            (0..m).map(|i| prepare_w4a8(&xq.codes[i * k..(i + 1) * k], &xq.scales[i * kb..(i + 1) * kb], w)).collect();
        let rows: Vec<W4a8Row> = prep.iter().map(|p| W4a8Row { xq: &p.xq, xs8: &p.xs8, gsum: &p.gsum }).collect();
        let mode = match blocks_per_group(w) {
            usize::MAX => PairGroups::PerGroup { pairs: usize::MAX },
            b if b % 2 == 0 => PairGroups::PerGroup { pairs: b / 2 },
            b => PairGroups::PerBlock { blocks: b },
        };
        run_tasks(out, ROWS * m, m.saturating_mul(w.n).saturating_mul(k), |t, chunk| {
            // SAFETY: AVX2 + FMA checked; w is int4 with group % 32 == 0 or per channel, and mode
            // follows from its group; rows were prepared for w; the chunk covers rows
            // r0 .. r0 + chunk.len() / m < n, m values each.
            unsafe { w4a8_rows(w, &rows, mode, t * ROWS, chunk) }
        });
    }
    if !use_avx2 {
        run_tasks(out, ROWS * m, m.saturating_mul(w.n).saturating_mul(k), |t, chunk| scalar_w4a8_rows(w, &xq, m, t * ROWS, chunk));
    }
    if m > 1 {
        transpose_out(&yt, m, w.n, y);
    }
    Ok(())
}

/// Portable W4A8: per block, the exact integer `Σ (code - zero) · q`, times `scale_w · scale_x`.
fn scalar_w4a8_rows(w: &PackedWeight, xq: &BlockQuantizedActivations, m: usize, r0: usize, yt: &mut [f32]) {
    let (k, kb) = (w.k, w.k.div_ceil(ACT_BLOCK));
    for (j, out) in yt.chunks_exact_mut(m).enumerate() {
        let r = r0 + j;
        for (i, o) in out.iter_mut().enumerate() {
            let mut acc = 0f32;
            for b in 0..kb {
                let g = b * ACT_BLOCK / w.group;
                let z = w.zero(r, g);
                let dot: i32 =
                    (b * ACT_BLOCK..k.min((b + 1) * ACT_BLOCK)).map(|t| (w.raw(r, t) - z) * i32::from(xq.codes[i * k + t])).sum();
                acc += w.scales[r * w.groups_per_row() + g] * xq.scales[i * kb + b] * dot as f32;
            }
            *o = acc;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 and portable block quantizers give the same codes and scales, bit for bit: ties
    /// (`x / scale` exactly halfway), all-zero and subnormal blocks, a tail block.
    #[test]
    fn block_quantization_is_the_same_on_every_isa() {
        if !has_avx2() {
            return;
        }
        let k = 32 * 5 + 7;
        let mut x: Vec<f32> = (0..2 * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.0173).collect();
        // Block 1: ties at scale 1 (amax 127): 0.5, 1.5, 2.5, -0.5.
        x[32] = 127.0;
        x[33..37].copy_from_slice(&[0.5, 1.5, 2.5, -0.5]);
        x[64..96].fill(0.0);
        x[96..128].fill(1e-40);
        x[128] = 1e-42;
        let a = quantize_activations_blocks_isa(&x, 2, k, Isa::Scalar).unwrap();
        let b = quantize_activations_blocks_isa(&x, 2, k, Isa::Avx2).unwrap();
        assert_eq!(a, b);
        assert_eq!(&a.codes[33..37], &[0, 2, 2, 0]);
        assert_eq!(a.scales[2], 1.0);
    }

    /// The AVX2 and portable per-row quantizers (W8A8) give the same codes and scales, bit for
    /// bit: ties, an all-zero row, subnormal rows, rows with a tail (k not a multiple of 32).
    #[test]
    fn row_quantization_is_the_same_on_every_isa() {
        if !has_avx2() {
            return;
        }
        for k in [1usize, 31, 32, 77, 4096 + 5] {
            let mut x: Vec<f32> = (0..5 * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.0173).collect();
            x[k..2 * k].fill(0.0);
            x[2 * k..3 * k].fill(1e-40);
            x[3 * k] = 127.0;
            if k > 5 {
                x[3 * k + 1..3 * k + 5].copy_from_slice(&[0.5, 1.5, 2.5, -0.5]);
            }
            x[5 * k - 1] = -3000.0;
            let a = quantize_activations_isa(&x, 5, k, Isa::Scalar).unwrap();
            let b = quantize_activations_isa(&x, 5, k, Isa::Avx2).unwrap();
            assert_eq!(a, b, "k = {k}");
            if k > 5 {
                assert_eq!(&a.codes[3 * k + 1..3 * k + 5], &[0, 2, 2, 0]);
            }
            assert_eq!(a.scales[1], 1.0);
        }
    }
}
