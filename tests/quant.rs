//! Integration tests of the quantization numerics (`mixq::quant`): exact round trips of every
//! representable value, error bounds per format, relations between formats, granularities and
//! clipping rules, agreement with libtorch's FP8 casts, storage accounting, and error handling.
//!
//! Test data comes from a seeded generator written here (not libtorch's global RNG), so every run
//! and every test thread sees the same numbers.

use anyhow::Result;
use mixq::quant::{
    dequantize, fake_quantize, fake_quantize_activation, quantize, Clipping, Format, Granularity, QuantSpec, Quantized, ScaleType,
    FP4_E2M1_VALUES,
};
use tch::{Device, Kind, Tensor};

/// Integer formats round to nearest without clipping under min–max: error ≤ half a step.
const INT_MAX_ERR_STEPS: f64 = 0.5;
/// An f16 scale is rounded to nearest, so it may be up to 2^-11 (relative) below `range / grid_max`;
/// asymmetric grids are also shifted by the zero point's rounding (half a step), so their top
/// element may clip by a further `grid_max · 2^-11` steps.
const F16_SCALE_REL: f64 = 1.0 / 2048.0;
/// Each extra integer bit from 3 bits up must buy at least this much SQNR on Gaussian weights
/// (the ideal uniform quantizer gains 6.02 dB per bit).
const MIN_DB_PER_BIT: f64 = 5.0;
/// Relative slack for FP32 arithmetic in the error bounds (divisions and products of the scale).
const FP32_SLACK: f64 = 1e-6;
/// FP8 E4M3 (3 mantissa bits): relative error ≤ 2^-4 on normals; absolute ≤ 2^-10 · scale on subnormals.
const FP8_E4M3_REL: f64 = 1.0 / 16.0;
const FP8_E4M3_SUBNORMAL_ABS: f64 = 1.0 / 1024.0;
/// FP8 E5M2 (2 mantissa bits): relative error ≤ 2^-3 on normals; absolute ≤ 2^-17 · scale on subnormals.
const FP8_E5M2_REL: f64 = 1.0 / 8.0;
const FP8_E5M2_SUBNORMAL_ABS: f64 = 1.0 / 131_072.0;
/// FP4 E2M1 (1 mantissa bit): relative error ≤ 2^-2 from 1 up; absolute ≤ 0.25 · scale below 1.
const FP4_REL: f64 = 0.25;
const FP4_SUBNORMAL_ABS: f64 = 0.25;
/// The clipping search sums each candidate's squared error in FP32 (relative error about 1e-7),
/// so its choice can be worse than min–max by at most about this much, relative.
const MSE_SEARCH_SLACK: f64 = 1e-5;
/// NVFP4 two-level scales are FP32 products `e · s_t`, generally not the exact power of two a
/// grid was built with: values on the grid come back within this relative error (codes exactly).
const NVFP4_SCALE_REL: f64 = 1e-6;

// ---------------------------------------------------------------- helpers

/// Deterministic standard normal samples (mixq's SplitMix64, not libtorch's shared generator).
fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    mixq::util::SplitMix64(seed).normals(n, 1.0)
}

fn tensor(v: &[f32], shape: &[i64]) -> Tensor {
    Tensor::from_slice(v).reshape(shape)
}

fn gaussian_tensor(shape: &[i64], seed: u64) -> Tensor {
    let n: i64 = shape.iter().product();
    tensor(&gaussian(n as usize, seed), shape)
}

/// Gaussian weights with heavy tails: a few large outliers per row.
fn heavy_tailed(shape: &[i64], seed: u64) -> Tensor {
    let n: i64 = shape.iter().product();
    let mut v = gaussian(n as usize, seed);
    for (i, x) in v.iter_mut().enumerate() {
        if i % 97 == 13 {
            *x *= 8.0;
        }
    }
    tensor(&v, shape)
}

fn vecf(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

fn sq_err(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).square().sum(Kind::Double).double_value(&[])
}

fn sqnr_db(w: &Tensor, q: &Tensor) -> f64 {
    let s = w.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[]);
    10.0 * (s / sq_err(w, q)).log10()
}

fn rmse(a: &Tensor, b: &Tensor) -> f64 {
    (sq_err(a, b) / a.numel().max(1) as f64).sqrt()
}

/// Exact equality, reporting the first differing index with its value and the expected one.
fn assert_exact(got: &Tensor, want: &Tensor, ctx: &str) {
    assert_eq!(got.size(), want.size(), "{ctx}: shape");
    let (g, w) = (vecf(got), vecf(want));
    if let Some(i) = (0..g.len()).find(|&i| g[i] != w[i]) {
        panic!("{ctx}: index {i}: got {}, expected {} (RMSE over the tensor {:e})", g[i], w[i], rmse(got, want));
    }
}

/// Scales expanded to one per element of the `[out, inner]` view.
fn per_element(scales: &Tensor, out: i64, inner: i64) -> Tensor {
    let s = scales.to_kind(Kind::Float);
    let (so, si) = (s.size()[0], s.size()[1]);
    s.reshape([so, si, 1]).expand([so, si, inner / si], false).reshape([so, inner]).expand([out, inner], false)
}

fn int(bits: u8, signed: bool) -> Format {
    Format::Int { bits, signed }
}

fn spec(format: Format, granularity: Granularity, scale: ScaleType, clipping: Clipping) -> QuantSpec {
    QuantSpec { format, granularity, scale, clipping }
}

fn quantized_formats() -> Vec<Format> {
    Format::all().into_iter().filter(|f| !f.is_keep()).collect()
}

// ---------------------------------------------------------------- exact round trips

/// A weight built from every code of the grid times a power of two comes back unchanged, for
/// every integer width, symmetric and asymmetric, per tensor / channel / group, f32 / f16 / e8m0
/// scales, min–max and MSE clipping. (Symmetric: the codes `-(2^(b-1)-1) ..= 2^(b-1)-1`; the
/// extra negative code `-2^(b-1)` is reached only when clipping.)
#[test]
fn int_grid_values_round_trip_exactly() -> Result<()> {
    for bits in 2u8..=8 {
        for signed in [true, false] {
            let f = int(bits, signed);
            let qmax = f.grid_max() as i64;
            let codes: Vec<i64> = if signed { (-qmax..=qmax).collect() } else { (0..=qmax).collect() };
            let n = codes.len() as i64;
            // Row r: two groups of all codes (the second reversed), zero point z_r, scale 2^k_r.
            let rows: [(i64, i32); 4] = [(0, -3), (qmax / 3, 0), (qmax / 2, 2), (qmax, -7)];
            for gran in [Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup(n as u32)] {
                let mut v = Vec::new();
                for (r, &(z, k)) in rows.iter().enumerate() {
                    // Per tensor: one scale and zero point for all rows.
                    let (z, k) = if gran == Granularity::PerTensor { rows[1] } else { (z, k) };
                    let z = if signed { 0 } else { z };
                    let s = 2f32.powi(k);
                    let mut row: Vec<f32> = codes.iter().map(|&c| (c - z) as f32 * s).collect();
                    let mut rev = row.clone();
                    rev.reverse();
                    if r % 2 == 1 {
                        std::mem::swap(&mut row, &mut rev);
                    }
                    v.extend(row);
                    v.extend(rev);
                }
                let w = tensor(&v, &[4, 2 * n]);
                let mut scales = vec![ScaleType::F32, ScaleType::F16];
                if signed {
                    scales.push(ScaleType::E8M0);
                }
                for st in scales {
                    for clip in [Clipping::MinMax, Clipping::Mse] {
                        let sp = spec(f, gran, st, clip);
                        assert_exact(&fake_quantize(&w, &sp)?, &w, &format!("{sp} ({st}, {clip})"));
                    }
                }
            }
        }
    }
    Ok(())
}

/// All finite values of a float8 dtype, from its 256 bit patterns.
fn fp8_values(kind: Kind) -> Vec<f32> {
    let bytes: Vec<u8> = (0..=255u8).collect();
    let all = vecf(&Tensor::from_slice(&bytes).view_dtype(kind).to_kind(Kind::Float));
    all.into_iter().filter(|x| x.is_finite()).collect()
}

#[test]
fn fp8_every_finite_value_round_trips_exactly() -> Result<()> {
    for (f, kind, count) in [(Format::Fp8E4M3, Kind::Float8e4m3fn, 254i64), (Format::Fp8E5M2, Kind::Float8e5m2, 248)] {
        let vals = fp8_values(kind);
        assert_eq!(vals.len() as i64, count, "{f}: finite bit patterns");
        for k in [0, -5, 3] {
            let s = 2f32.powi(k);
            let mut v: Vec<f32> = vals.iter().map(|x| x * s).collect();
            v.extend(vals.iter().rev().map(|x| x * s));
            let w = tensor(&v, &[2, count]);
            for gran in [Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup(count as u32)] {
                for st in [ScaleType::F32, ScaleType::F16, ScaleType::E8M0] {
                    let sp = spec(f, gran, st, Clipping::MinMax);
                    assert_exact(&fake_quantize(&w, &sp)?, &w, &format!("{sp} scale 2^{k}"));
                    let q = quantize(&w, &sp)?;
                    assert_exact(&q.codes, &(&w / f64::from(s)), &format!("{sp} codes"));
                    assert!(vecf(&q.scales).iter().all(|&x| x == s), "{sp}: scales {:?}, expected {s}", vecf(&q.scales));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn fp4_every_value_round_trips() -> Result<()> {
    let mut vals: Vec<f32> = FP4_E2M1_VALUES.to_vec();
    vals.extend(FP4_E2M1_VALUES.iter().map(|x| -x));
    for k in [0, -4, 5] {
        let s = 2f32.powi(k);
        // Rows of 32: the 16 values, then reversed; every 16-group holds ±6.
        let mut v = Vec::new();
        for _ in 0..4 {
            v.extend(vals.iter().map(|x| x * s));
            v.extend(vals.iter().rev().map(|x| x * s));
        }
        let w = tensor(&v, &[4, 32]);
        // MX (e8m0, group 32), f16 per channel, e8m0 per tensor: the scale is exactly 2^k.
        for sp in [
            QuantSpec::new(Format::Fp4E2M1, Granularity::PerGroup(32)),
            spec(Format::Fp4E2M1, Granularity::PerChannel, ScaleType::F16, Clipping::MinMax),
            QuantSpec::new(Format::Fp4E2M1, Granularity::PerTensor),
        ] {
            assert_exact(&fake_quantize(&w, &sp)?, &w, &format!("{sp} scale 2^{k}"));
        }
        // NV (e4m3 two-level, group 16): codes exact, values within the FP32 rounding of e · s_t.
        let nv = QuantSpec::new(Format::Fp4E2M1, Granularity::PerGroup(16));
        assert_eq!(nv.scale, ScaleType::E4M3);
        let q = quantize(&w, &nv)?;
        assert_exact(&q.codes, &(&w / f64::from(s)), &format!("{nv} codes, scale 2^{k}"));
        let f = fake_quantize(&w, &nv)?;
        let (g, e) = (vecf(&f), vecf(&w));
        for i in 0..g.len() {
            let tol = NVFP4_SCALE_REL * f64::from(e[i].abs());
            assert!(f64::from((g[i] - e[i]).abs()) <= tol, "{nv}: index {i}: got {}, expected {} ± {tol:e}", g[i], e[i]);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- agreement with libtorch

#[test]
fn fp8_equals_the_libtorch_cast() -> Result<()> {
    let w = heavy_tailed(&[48, 96], 7);
    for (f, kind, max) in [(Format::Fp8E4M3, Kind::Float8e4m3fn, 448.0), (Format::Fp8E5M2, Kind::Float8e5m2, 57344.0)] {
        for (gran, gshape) in [(Granularity::PerChannel, [48i64, 96]), (Granularity::PerGroup(32), [144, 32])] {
            for st in [ScaleType::F32, ScaleType::F16] {
                let sp = spec(f, gran, st, Clipping::MinMax);
                let q = quantize(&w, &sp)?;
                let wg = w.reshape(gshape);
                let want_scale = wg.abs().amax([1], true) / max;
                let want_scale = if st == ScaleType::F16 { want_scale.to_kind(Kind::Half).to_kind(Kind::Float) } else { want_scale };
                assert_exact(&q.scales.reshape([-1, 1]), &want_scale, &format!("{sp} scales"));
                let want_codes = (&wg / &want_scale).clamp(-max, max).to_kind(kind).to_kind(Kind::Float);
                assert_exact(&q.codes.reshape(gshape), &want_codes, &format!("{sp} codes vs torch cast"));
                assert_exact(&fake_quantize(&w, &sp)?, &(want_codes * want_scale).reshape([48, 96]), &format!("{sp} values"));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- error bounds

#[test]
fn int_error_is_at_most_half_a_step() -> Result<()> {
    let w = heavy_tailed(&[32, 128], 11);
    for bits in 2u8..=8 {
        for signed in [true, false] {
            for gran in [Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup(32)] {
                for st in [ScaleType::F32, ScaleType::F16] {
                    let sp = spec(int(bits, signed), gran, st, Clipping::MinMax);
                    let q = quantize(&w, &sp)?;
                    let f = dequantize(&q, &sp, &w.size())?;
                    let s = vecf(&per_element(&q.scales, 32, 128));
                    let (g, e) = (vecf(&f), vecf(&w));
                    let extra_steps = if !signed && st == ScaleType::F16 { sp.format.grid_max() * F16_SCALE_REL } else { 0.0 };
                    for i in 0..g.len() {
                        let err = f64::from((g[i] - e[i]).abs());
                        let steps = INT_MAX_ERR_STEPS + extra_steps;
                        let tol = steps * f64::from(s[i]) * (1.0 + FP32_SLACK) + FP32_SLACK * f64::from(e[i].abs());
                        assert!(err <= tol, "{sp}: index {i}: value {}, expected {} (error {err:e} > tolerance {tol:e})", g[i], e[i]);
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn float_formats_meet_their_relative_bounds() -> Result<()> {
    let w = heavy_tailed(&[32, 128], 12);
    let cases = [
        (Format::Fp8E4M3, FP8_E4M3_REL, FP8_E4M3_SUBNORMAL_ABS),
        (Format::Fp8E5M2, FP8_E5M2_REL, FP8_E5M2_SUBNORMAL_ABS),
        (Format::Fp4E2M1, FP4_REL, FP4_SUBNORMAL_ABS),
    ];
    for (f, rel, sub) in cases {
        for gran in [Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup(16), Granularity::PerGroup(32)] {
            for st in [f.default_scale(gran), ScaleType::F32, ScaleType::E8M0, ScaleType::E4M3] {
                let sp = spec(f, gran, st, Clipping::MinMax);
                let q = quantize(&w, &sp)?;
                let fq = dequantize(&q, &sp, &w.size())?;
                let s = vecf(&per_element(&q.scales, 32, 128));
                let (g, e) = (vecf(&fq), vecf(&w));
                for i in 0..g.len() {
                    let err = f64::from((g[i] - e[i]).abs());
                    let tol = (rel * f64::from(e[i].abs())).max(sub * f64::from(s[i])) * (1.0 + FP32_SLACK);
                    assert!(err <= tol, "{sp} ({st}): index {i}: value {}, expected {} (error {err:e} > tolerance {tol:e})", g[i], e[i]);
                }
                eprintln!("{sp} ({st}): SQNR {:.2} dB", sqnr_db(&w, &fq));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- relations

#[test]
fn int_error_decreases_strictly_with_bits() -> Result<()> {
    let w = gaussian_tensor(&[128, 256], 3);
    for signed in [true, false] {
        for gran in [Granularity::PerChannel, Granularity::PerGroup(64), Granularity::PerTensor] {
            let mut prev: Option<(u8, f64)> = None;
            for bits in 2u8..=8 {
                let sp = QuantSpec::new(int(bits, signed), gran);
                let db = sqnr_db(&w, &fake_quantize(&w, &sp)?);
                eprintln!("{sp}: SQNR {db:.2} dB");
                if let Some((pb, pdb)) = prev {
                    assert!(db > pdb, "{sp}: SQNR {db:.3} dB is not above {pdb:.3} dB at {pb} bits");
                    if pb >= 3 {
                        assert!(
                            db - pdb >= MIN_DB_PER_BIT,
                            "{sp}: SQNR {db:.3} dB gains less than {MIN_DB_PER_BIT} dB over {pdb:.3} dB at {pb} bits"
                        );
                    }
                }
                prev = Some((bits, db));
            }
        }
    }
    Ok(())
}

/// Rows of one pattern scaled by powers of two: under per-channel scales each row is an exact
/// scaled copy of the first, and every per-tensor grid point inside a row's range is also a
/// per-channel grid point, so per-channel error is never larger, element by element.
#[test]
fn per_channel_is_never_worse_than_per_tensor() -> Result<()> {
    let pattern = gaussian(256, 5);
    for (shifts, scale_types) in [
        (vec![0, -3, -6, -9, -12, -18], vec![ScaleType::F32, ScaleType::E8M0]),
        (vec![0, -2, -4, -6], vec![ScaleType::F16, ScaleType::E4M3]),
    ] {
        let mut v = Vec::new();
        for &k in &shifts {
            v.extend(pattern.iter().map(|x| x * 2f32.powi(k)));
        }
        let w = tensor(&v, &[shifts.len() as i64, 256]);
        for f in quantized_formats() {
            for &st in &scale_types {
                let ch = spec(f, Granularity::PerChannel, st, Clipping::MinMax);
                let te = spec(f, Granularity::PerTensor, st, Clipping::MinMax);
                if ch.check_fits("w", &w.size()).is_err() {
                    continue;
                }
                let ec = vecf(&(fake_quantize(&w, &ch)? - &w).abs());
                let et = vecf(&(fake_quantize(&w, &te)? - &w).abs());
                // Element by element only where the argument holds exactly: not for zero points
                // (their rounding shifts each grid) nor for E5M2 with f16 scales (its scale,
                // about 5e-5, is an f16 subnormal, so scaling rows by 2^k does not commute).
                let e5m2_f16 = f == Format::Fp8E5M2 && st == ScaleType::F16;
                let pointwise = !(f.has_zero_point() || e5m2_f16);
                for i in 0..ec.len() {
                    assert!(!pointwise || ec[i] <= et[i], "{ch} ({st}): index {i}: per-channel error {:e} > per-tensor {:e}", ec[i], et[i]);
                }
                let (sc, stt) =
                    (ec.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>(), et.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>());
                // (Equal where every row stays in the normal range under both, e.g. FP8 E5M2.)
                assert!(sc <= stt, "{ch} ({st}): per-channel squared error {sc:e} above per-tensor {stt:e}");
            }
        }
    }
    // Integer formats on Gaussian rows of very different ranges: per-group ≤ per-channel ≤
    // per-tensor in total. (For FP formats the error is nearly scale-invariant, so away from
    // subnormals per-channel and per-tensor differ only by chance; the construction above covers them.)
    let mut v = gaussian(64 * 256, 9);
    for (r, row) in v.chunks_mut(256).enumerate() {
        let s = 10f32.powf(-3.0 * r as f32 / 63.0);
        row.iter_mut().for_each(|x| *x *= s);
    }
    let w = tensor(&v, &[64, 256]);
    for f in quantized_formats().into_iter().filter(|f| !f.is_float()) {
        let e = |g: Granularity| -> Result<f64> { Ok(sq_err(&fake_quantize(&w, &spec(f, g, ScaleType::F32, Clipping::MinMax))?, &w)) };
        let (t, c, g) = (e(Granularity::PerTensor)?, e(Granularity::PerChannel)?, e(Granularity::PerGroup(32))?);
        eprintln!("{f}: squared error tensor {t:.4e}, channel {c:.4e}, group:32 {g:.4e}");
        assert!(c <= t, "{f}: per-channel squared error {c:e} > per-tensor {t:e}");
        assert!(g <= c, "{f}: group:32 squared error {g:e} > per-channel {c:e}");
    }
    Ok(())
}

#[test]
fn mse_clipping_is_never_worse_than_min_max() -> Result<()> {
    let w = heavy_tailed(&[24, 64], 21);
    for f in quantized_formats() {
        for gran in [Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup(16), Granularity::PerGroup(32)] {
            for st in [f.default_scale(gran), ScaleType::F32, ScaleType::E8M0, ScaleType::E4M3] {
                let mm = spec(f, gran, st, Clipping::MinMax);
                if mm.check_fits("w", &w.size()).is_err() {
                    continue;
                }
                let mse = spec(f, gran, st, Clipping::Mse);
                let (a, b) = (sq_err(&fake_quantize(&w, &mse)?, &w), sq_err(&fake_quantize(&w, &mm)?, &w));
                assert!(a <= b * (1.0 + MSE_SEARCH_SLACK), "{mse} ({st}): squared error {a:e} > min-max {b:e}");
            }
        }
    }
    // On heavy tails the search must actually help at low bit widths.
    for f in [int(3, true), int(4, true), int(4, false), Format::Fp4E2M1] {
        let mm = spec(f, Granularity::PerChannel, ScaleType::F32, Clipping::MinMax);
        let mse = QuantSpec { clipping: Clipping::Mse, ..mm };
        let (a, b) = (sqnr_db(&w, &fake_quantize(&w, &mse)?), sqnr_db(&w, &fake_quantize(&w, &mm)?));
        eprintln!("{f}: SQNR min-max {b:.2} dB, mse {a:.2} dB");
        assert!(a > b, "{mse}: SQNR {a:.3} dB not above min-max {b:.3} dB");
    }
    Ok(())
}

// ---------------------------------------------------------------- quantize / dequantize

#[test]
fn dequantize_of_quantize_equals_fake_quantize() -> Result<()> {
    let w = heavy_tailed(&[8, 4, 4, 4], 31);
    for f in Format::all() {
        for gran in [Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup(16), Granularity::PerGroup(32)] {
            for st in [ScaleType::F32, ScaleType::F16, ScaleType::E8M0, ScaleType::E4M3] {
                for clip in [Clipping::MinMax, Clipping::Mse] {
                    let sp = spec(f, gran, st, clip);
                    if sp.check_fits("w", &w.size()).is_err() {
                        assert!(fake_quantize(&w, &sp).is_err() && quantize(&w, &sp).is_err(), "{sp} ({st}) should be rejected");
                        continue;
                    }
                    let q = quantize(&w, &sp)?;
                    let fq = fake_quantize(&w, &sp)?;
                    assert_eq!(fq.kind(), Kind::Float);
                    assert_exact(&dequantize(&q, &sp, &w.size())?, &fq, &format!("{sp} ({st}, {clip})"));
                    assert_eq!(q.codes.size(), vec![8, 64], "{sp}: codes shape");
                    let want_kind = if f.is_float() { Kind::Float } else { Kind::Int };
                    assert_eq!(q.codes.kind(), want_kind, "{sp}: codes dtype");
                    assert_eq!(q.zero_points.is_some(), f.has_zero_point(), "{sp}: zero points");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn storage_bits_match_the_quantized_tensors() -> Result<()> {
    let shape = [16i64, 2, 4, 8];
    let w = gaussian_tensor(&shape, 41);
    for f in quantized_formats() {
        for gran in [Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup(16), Granularity::PerGroup(32)] {
            let sp = QuantSpec::new(f, gran);
            let q = quantize(&w, &sp)?;
            let mut bits = q.codes.numel() as u64 * u64::from(f.bits()) + q.scales.numel() as u64 * u64::from(sp.scale.bits());
            if let Some(z) = &q.zero_points {
                bits += z.numel() as u64 * u64::from(f.bits());
            }
            if sp.scale == ScaleType::E4M3 {
                bits += 32;
            }
            assert_eq!(bits, sp.storage_bits(&shape), "{sp}: storage bits");
            assert_eq!(q.scales.numel() as i64, gran.num_scales(&shape), "{sp}: number of scales");
        }
    }
    // Effective bits: more element bits, a zero point, or smaller groups all cost more.
    for gran in [Granularity::PerChannel, Granularity::PerGroup(32)] {
        for bits in 2u8..8 {
            let lo = QuantSpec::new(int(bits, true), gran).effective_bits(&shape);
            assert!(lo < QuantSpec::new(int(bits + 1, true), gran).effective_bits(&shape));
            assert!(lo < QuantSpec::new(int(bits, false), gran).effective_bits(&shape));
        }
    }
    let eb = |g: u32| QuantSpec::new(int(4, true), Granularity::PerGroup(g)).effective_bits(&shape);
    assert!(eb(16) > eb(32) && eb(32) > QuantSpec::new(int(4, true), Granularity::PerChannel).effective_bits(&shape));
    assert!(
        QuantSpec::new(Format::Fp4E2M1, Granularity::PerGroup(16)).effective_bits(&shape)
            > QuantSpec::new(Format::Fp4E2M1, Granularity::PerGroup(32)).effective_bits(&shape)
    );
    Ok(())
}

#[test]
fn scales_are_representable_in_their_storage_type() -> Result<()> {
    let w = heavy_tailed(&[16, 64], 51);
    let amax = |g: i64| w.reshape([-1, g]).abs().amax([1], true);
    // E8M0: powers of two, at least amax / grid_max (so nothing clips).
    for f in [Format::Fp4E2M1, Format::Fp8E4M3, int(4, true)] {
        let sp = spec(f, Granularity::PerGroup(32), ScaleType::E8M0, Clipping::MinMax);
        let q = quantize(&w, &sp)?;
        let s = q.scales.reshape([-1, 1]);
        let (m, _) = s.frexp();
        assert!(vecf(&m).iter().all(|&x| x == 0.5), "{sp}: scales are not powers of two: {:?}", vecf(&s));
        let need = amax(32) / f.grid_max();
        assert!(s.ge_tensor(&need).all().int64_value(&[]) == 1, "{sp}: a scale is below amax / grid_max");
        assert!(vecf(&q.codes).iter().all(|c| f64::from(c.abs()) <= f.grid_max()));
    }
    // F16: unchanged by a round trip through half.
    let sp = QuantSpec::new(int(4, true), Granularity::PerGroup(16));
    let s = quantize(&w, &sp)?.scales;
    assert_exact(&s.to_kind(Kind::Half).to_kind(Kind::Float), &s, "f16 scales");
    // E4M3 (two-level): scale / s_t is an FP8 E4M3 value, s_t = amax / (448 · 6).
    let sp = QuantSpec::new(Format::Fp4E2M1, Granularity::PerGroup(16));
    let s = quantize(&w, &sp)?.scales;
    let st = (w.abs().max().double_value(&[]) / (448.0 * 6.0)) as f32;
    let e = &s / f64::from(st);
    let e8 = e.to_kind(Kind::Float8e4m3fn).to_kind(Kind::Float);
    let (a, b) = (vecf(&e), vecf(&e8));
    for i in 0..a.len() {
        assert!(
            (a[i] - b[i]).abs() <= 1e-6 * a[i].abs(),
            "e4m3 scale {i}: {} / s_t = {} is not an e4m3 value ({})",
            vecf(&s)[i],
            a[i],
            b[i]
        );
    }
    assert!(a.iter().cloned().fold(0.0f32, f32::max) <= 448.0);
    // F32: exactly amax / grid_max.
    let sp = spec(int(8, true), Granularity::PerChannel, ScaleType::F32, Clipping::MinMax);
    assert_exact(&quantize(&w, &sp)?.scales, &(w.abs().amax([1], true) / 127.0), "f32 scales");
    Ok(())
}

// ---------------------------------------------------------------- edge cases and errors

#[test]
fn zero_weights_and_zero_groups_come_back_as_exact_zeros() -> Result<()> {
    let zeros = Tensor::zeros([4, 32], (Kind::Float, Device::Cpu));
    let mut v = gaussian(4 * 32, 61);
    v[..32].iter_mut().for_each(|x| *x = 0.0); // a zero row
    v[64..80].iter_mut().for_each(|x| *x = 0.0); // a zero group of 16
    let mixed = tensor(&v, &[4, 32]);
    for f in Format::all() {
        for gran in [Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup(16)] {
            for st in [ScaleType::F32, ScaleType::F16, ScaleType::E8M0, ScaleType::E4M3] {
                for clip in [Clipping::MinMax, Clipping::Mse] {
                    let sp = spec(f, gran, st, clip);
                    if sp.check_fits("w", &[4, 32]).is_err() {
                        continue;
                    }
                    assert_exact(&fake_quantize(&zeros, &sp)?, &zeros, &format!("{sp} ({st}) of zeros"));
                    let fq = fake_quantize(&mixed, &sp)?;
                    let got = vecf(&fq);
                    assert!(got[..32].iter().all(|&x| x == 0.0), "{sp} ({st}): zero row not zero: {:?}", &got[..32]);
                    assert!(got[64..80].iter().all(|&x| x == 0.0), "{sp} ({st}): zero group not zero");
                    assert!(got.iter().all(|x| x.is_finite()), "{sp} ({st}): non-finite output");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn non_finite_values_are_clear_errors() {
    let w = tensor(&[1.0, f32::NAN, 2.0, 3.0], &[2, 2]);
    for sp in [
        QuantSpec::default(),
        QuantSpec::new(Format::Fp8E4M3, Granularity::PerTensor),
        QuantSpec::new(Format::Fp4E2M1, Granularity::PerGroup(2)),
    ] {
        let e = fake_quantize(&w, &sp).unwrap_err().to_string();
        assert!(e.contains("NaN") && e.contains("weight"), "{sp}: {e}");
    }
    let x = tensor(&[1.0, f32::INFINITY], &[2]);
    let e = fake_quantize_activation(&x, int(8, true)).unwrap_err().to_string();
    assert!(e.contains("infinite") && e.contains("activation"), "{e}");
}

#[test]
fn group_size_must_divide_the_inner_dimension() -> Result<()> {
    let sp = QuantSpec::new(int(4, true), Granularity::PerGroup(32));
    let w = gaussian_tensor(&[16, 1, 3, 3], 71);
    for e in [fake_quantize(&w, &sp).unwrap_err(), quantize(&w, &sp).err().unwrap()] {
        let e = e.to_string();
        assert!(e.contains("does not divide") && e.contains('9'), "{e}");
    }
    // A conv weight whose I·kh·kw = 4·4·4 = 64 splits into groups of 32 along the inner dimension.
    let w = gaussian_tensor(&[8, 4, 4, 4], 72);
    let fq = fake_quantize(&w, &sp)?;
    assert_eq!(fq.size(), w.size());
    assert_eq!(quantize(&w, &sp)?.scales.size(), vec![8, 2]);
    Ok(())
}

#[test]
fn dequantize_rejects_mismatched_tensors() -> Result<()> {
    let w = gaussian_tensor(&[8, 32], 81);
    let sp = QuantSpec::new(int(4, false), Granularity::PerGroup(16));
    let q = quantize(&w, &sp)?;
    let wrong_codes = Quantized {
        codes: q.codes.reshape([16, 16]),
        scales: q.scales.shallow_clone(),
        zero_points: q.zero_points.as_ref().map(|z| z.shallow_clone()),
    };
    assert!(dequantize(&wrong_codes, &sp, &[8, 32]).unwrap_err().to_string().contains("codes shape"));
    let wrong_scales = Quantized {
        codes: q.codes.shallow_clone(),
        scales: q.scales.reshape([-1, 1]),
        zero_points: q.zero_points.as_ref().map(|z| z.shallow_clone()),
    };
    assert!(dequantize(&wrong_scales, &sp, &[8, 32]).unwrap_err().to_string().contains("scales shape"));
    let no_zp = Quantized { codes: q.codes.shallow_clone(), scales: q.scales.shallow_clone(), zero_points: None };
    assert!(dequantize(&no_zp, &sp, &[8, 32]).unwrap_err().to_string().contains("zero points"));
    Ok(())
}

#[test]
fn any_float_dtype_in_fp32_out() -> Result<()> {
    let w = gaussian_tensor(&[6, 8], 91);
    let sp = QuantSpec::new(int(4, true), Granularity::PerChannel);
    let want = fake_quantize(&w, &sp)?;
    for kind in [Kind::Double, Kind::Half, Kind::BFloat16] {
        let wk = w.to_kind(kind);
        let fq = fake_quantize(&wk, &sp)?;
        assert_eq!(fq.kind(), Kind::Float);
        assert_exact(&fq, &fake_quantize(&wk.to_kind(Kind::Float), &sp)?, &format!("{kind:?} input"));
    }
    assert_exact(&fake_quantize(&w.to_kind(Kind::Double), &sp)?, &want, "f64 input");
    // Keep formats: casts, and fp32 is the identity (a copy, not an alias).
    assert_exact(&fake_quantize(&w, &QuantSpec::keep())?, &w, "fp32 keep");
    assert_exact(
        &fake_quantize(&w, &QuantSpec::new(Format::Bf16, Granularity::PerTensor))?,
        &w.to_kind(Kind::BFloat16).to_kind(Kind::Float),
        "bf16",
    );
    assert_exact(
        &fake_quantize(&w, &QuantSpec::new(Format::Fp16, Granularity::PerTensor))?,
        &w.to_kind(Kind::Half).to_kind(Kind::Float),
        "fp16",
    );
    let mut k = fake_quantize(&w, &QuantSpec::keep())?;
    let _ = k.fill_(0.0);
    assert!(vecf(&w).iter().any(|&x| x != 0.0), "fp32 keep aliases its input");
    Ok(())
}

// ---------------------------------------------------------------- activations

#[test]
fn activation_scales_are_per_sample() -> Result<()> {
    let a = gaussian_tensor(&[1, 3, 4, 4], 101);
    let b = gaussian_tensor(&[1, 3, 4, 4], 102) * 1000.0;
    let batch = Tensor::cat(&[&a, &b], 0);
    for f in quantized_formats().into_iter().chain([Format::Bf16, Format::Fp16, Format::Fp32]) {
        let fb = fake_quantize_activation(&batch, f)?;
        assert_eq!(fb.size(), batch.size());
        assert_exact(&fb.narrow(0, 0, 1), &fake_quantize_activation(&a, f)?, &format!("{f}: sample 0 alone"));
        assert_exact(&fb.narrow(0, 1, 1), &fake_quantize_activation(&b, f)?, &format!("{f}: sample 1 alone"));
    }
    // Int8: each sample's error is at most half of its own step amax / 127.
    let f8 = fake_quantize_activation(&batch, int(8, true))?;
    for (i, x) in [&a, &b].iter().enumerate() {
        let step = x.abs().max().double_value(&[]) / 127.0;
        let err = (f8.narrow(0, i as i64, 1) - *x).abs().max().double_value(&[]);
        assert!(err <= INT_MAX_ERR_STEPS * step * (1.0 + FP32_SLACK), "sample {i}: max error {err:e} > half step {:e}", step / 2.0);
    }
    Ok(())
}

#[test]
fn activations_of_any_rank() -> Result<()> {
    for shape in [vec![5i64], vec![5, 7], vec![2, 3, 4], vec![2, 3, 4, 5], vec![0, 3]] {
        let x = gaussian_tensor(&shape, 111);
        for f in [int(4, true), int(8, false), Format::Fp8E4M3, Format::Fp4E2M1, Format::Bf16] {
            let y = fake_quantize_activation(&x, f)?;
            assert_eq!(y.size(), shape, "{f}");
            assert_eq!(y.kind(), Kind::Float);
        }
    }
    assert!(fake_quantize_activation(&Tensor::from(1.0f32), int(8, true)).is_err());
    Ok(())
}

/// Throughput on a 4096×4096 weight (run with `--ignored --nocapture`; prints, asserts nothing).
#[test]
#[ignore]
fn throughput_of_fake_quantization() -> Result<()> {
    let w = gaussian_tensor(&[4096, 4096], 1);
    let gb = (4096.0 * 4096.0 * 4.0) / 1e9;
    for sp in [
        QuantSpec::new(int(8, true), Granularity::PerChannel),
        QuantSpec::new(int(4, true), Granularity::PerGroup(128)),
        QuantSpec::new(int(4, false), Granularity::PerGroup(128)),
        QuantSpec::new(Format::Fp8E4M3, Granularity::PerChannel),
        QuantSpec::new(Format::Fp4E2M1, Granularity::PerGroup(32)),
        QuantSpec::new(Format::Fp4E2M1, Granularity::PerGroup(16)),
        QuantSpec { clipping: Clipping::Mse, ..QuantSpec::new(int(4, true), Granularity::PerGroup(128)) },
    ] {
        let t = std::time::Instant::now();
        let _ = fake_quantize(&w, &sp)?;
        let s = t.elapsed().as_secs_f64();
        eprintln!("{sp}: {:.1} ms, {:.2} GB/s", s * 1e3, gb / s);
    }
    Ok(())
}
