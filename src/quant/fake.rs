//! Fake quantization (quantize then dequantize) of weights and activations with libtorch ops.
//!
//! The evaluator measures a quantized model by running the FP32 model on weights that went
//! through [`fake_quantize`]; the kernels must reproduce exactly those values from [`quantize`]'s
//! codes and scales. To make that hold by construction, [`fake_quantize`] and [`dequantize`]
//! apply one decode function to [`quantize`]'s codes (the fake path skips only their lossless
//! int32 round trip; the tests check the equality bit for bit), and the clipping search evaluates
//! every candidate ratio through the same encode/decode as the final quantization.
//!
//! Layout: a weight is viewed as `[out, inner]` ([`out_inner`]: a conv `[O, I/g, kh, kw]` becomes
//! `[O, I/g·kh·kw]`), then as `[G, group]`, one row per scale: `[1, out·inner]` per tensor,
//! `[out, inner]` per channel, `[out·inner/g, g]` per group (groups are consecutive along
//! `inner`). All work is whole-tensor libtorch ops on that view, on the weight's device; the only
//! Rust loop is over the clipping ratios.
//!
//! The numerics of each part live next door: element rounding in `grid.rs`, scale computation
//! and scale storage rounding in `scale.rs`.

use super::format::{out_inner, Clipping, Format, Granularity, QuantSpec, ScaleType};
use super::grid::{check_format, round_to_grid_};
use super::scale::{non_finite_error, Params, Scaler};
use crate::error::{Error, Result};
use tch::{Kind, Tensor};

/// Number of clipping ratios tried by [`Clipping::Mse`]: `1.00, 0.99, …, 0.50`.
pub const MSE_CLIP_CANDIDATES: usize = 51;
/// Step between two clipping ratios tried by [`Clipping::Mse`].
pub const MSE_CLIP_STEP: f64 = 0.01;

/// Integer (or FP code) representation of a quantized weight, for kernels and tests.
///
/// For the keep formats (bf16, fp16, fp32) the codes are the cast values as FP32 and the scale is
/// a single 1.
#[derive(Debug)]
pub struct Quantized {
    /// Codes, `[out, inner]`: integers for int formats (as int32; for asymmetric formats the
    /// stored unsigned code, zero point included), the FP32 grid values for FP formats.
    pub codes: Tensor,
    /// Scales, one per group: `[out, inner / g]` (per-tensor: `[1, 1]`, per-channel: `[out, 1]`), FP32
    /// values exactly representable in the spec's scale type (times the tensor scale for E4M3).
    pub scales: Tensor,
    /// Zero points (int32) for asymmetric int formats, same shape as `scales`: a weight dequantizes
    /// to `(code - zero_point) · scale`.
    pub zero_points: Option<Tensor>,
}

/// Quantizes then dequantizes `w` (out-channel first) under `spec`; returns an FP32 tensor of `w`'s shape.
///
/// Equal, bit for bit, to `dequantize(&quantize(w, spec)?, spec, &w.size())` (it skips only the
/// lossless int32 round trip of the codes). Errors: a group size that does not divide the inner
/// dimension ([`QuantSpec::check_fits`]), a non-floating-point `w` or one with NaN or infinity,
/// a scale that does not fit its storage type.
pub fn fake_quantize(w: &Tensor, spec: &QuantSpec) -> Result<Tensor> {
    tch::no_grad(|| fake_quantize_impl(w, spec, "weight"))
}

/// Quantizes `w` under `spec` into codes and scales.
pub fn quantize(w: &Tensor, spec: &QuantSpec) -> Result<Quantized> {
    tch::no_grad(|| quantize_impl(w, spec, "weight"))
}

/// Reconstructs the FP32 weight of `shape` from `q` (the inverse of [`quantize`] up to rounding):
/// `code · scale`, or `(code - zero_point) · scale` for asymmetric integers. Errors when the
/// tensors' shapes do not match `spec` and `shape`.
pub fn dequantize(q: &Quantized, spec: &QuantSpec, shape: &[i64]) -> Result<Tensor> {
    tch::no_grad(|| dequantize_impl(q, spec, shape))
}

/// Dynamic per-sample fake quantization of an activation `[N, ...]` to `format`.
///
/// Each sample (row of dim 0; a rank-1 tensor is `N` samples of one element) gets its own FP32
/// min–max scale, computed from the values themselves, as a dynamic-quantization kernel would. The
/// keep formats are plain casts. No gradient flows through the result.
pub fn fake_quantize_activation(x: &Tensor, format: Format) -> Result<Tensor> {
    tch::no_grad(|| {
        check_format(format)?;
        if x.dim() == 0 {
            return Err(Error::invalid(
                "activation shape",
                "[]",
                "activation quantization needs at least one dimension (the sample dimension)",
            ));
        }
        let shape = x.size();
        if x.numel() == 0 {
            return Ok(to_float(x, "activation")?.f_to_dtype(Kind::Float, false, true)?);
        }
        let x2 = x.f_reshape([shape[0], -1])?;
        let spec = QuantSpec { format, granularity: Granularity::PerChannel, scale: ScaleType::F32, clipping: Clipping::MinMax };
        Ok(fake_quantize_impl(&x2, &spec, "activation")?.f_reshape(shape.as_slice())?)
    })
}

fn fake_quantize_impl(w: &Tensor, spec: &QuantSpec, what: &str) -> Result<Tensor> {
    check_format(spec.format)?;
    let shape = w.size();
    spec.check_fits(what, &shape)?;
    let x = to_float(w, what)?;
    if spec.format.is_keep() {
        check_finite(&x, what)?;
        return keep_cast(&x, spec.format);
    }
    if x.numel() == 0 {
        return Ok(Tensor::f_zeros(shape.as_slice(), (Kind::Float, x.device()))?);
    }
    let (out, inner) = out_inner(&shape);
    let (gshape, _) = layout(spec.granularity, out, inner);
    let (codes, p) = quantize_groups(&x.f_reshape(gshape)?, spec, what)?;
    Ok(decode_(codes, &p)?.f_reshape(shape.as_slice())?)
}

/// The `[G, group]` view and the scale shape of a weight `[out, inner]`.
fn layout(granularity: Granularity, out: i64, inner: i64) -> ([i64; 2], [i64; 2]) {
    match granularity {
        Granularity::PerTensor => ([1, out * inner], [1, 1]),
        Granularity::PerChannel => ([out, inner], [out, 1]),
        Granularity::PerGroup(g) => {
            let g = i64::from(g.max(1));
            ([out * inner / g, g], [out, inner / g])
        }
    }
}

/// `w` as FP32 (no copy when it already is), after checking it is a floating-point tensor.
fn to_float(w: &Tensor, what: &str) -> Result<Tensor> {
    let kind = w.f_kind()?;
    if !matches!(kind, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16 | Kind::Float8e4m3fn | Kind::Float8e5m2) {
        return Err(Error::invalid(format!("{what} dtype"), format!("{kind:?}"), "quantization needs a floating-point tensor"));
    }
    Ok(w.f_to_kind(Kind::Float)?)
}

/// Errors when `x` holds NaN or infinity (one min/max reduction pass).
fn check_finite(x: &Tensor, what: &str) -> Result<()> {
    if x.numel() == 0 {
        return Ok(());
    }
    let (lo, hi) = x.f_aminmax(None::<i64>, false)?;
    if lo.f_double_value(&[])?.is_finite() && hi.f_double_value(&[])?.is_finite() {
        Ok(())
    } else {
        Err(non_finite_error(x, what))
    }
}

/// The keep formats: a round trip through the type, as a fresh FP32 tensor.
fn keep_cast(x: &Tensor, format: Format) -> Result<Tensor> {
    Ok(match format {
        Format::Bf16 => x.f_to_kind(Kind::BFloat16)?.f_to_kind(Kind::Float)?,
        Format::Fp16 => x.f_to_kind(Kind::Half)?.f_to_kind(Kind::Float)?,
        _ => x.f_to_dtype(Kind::Float, false, true)?,
    })
}

/// Codes (FP32, `[G, group]`) and parameters of the groups `xg` (`[G, group]`, FP32, not empty).
fn quantize_groups(xg: &Tensor, spec: &QuantSpec, what: &str) -> Result<(Tensor, Params)> {
    let scaler = Scaler::new(xg, spec.format, spec.scale, what)?;
    let p = choose_params(xg, &scaler, spec.format, spec.clipping)?;
    Ok((encode(xg, spec.format, &p)?, p))
}

fn quantize_impl(w: &Tensor, spec: &QuantSpec, what: &str) -> Result<Quantized> {
    check_format(spec.format)?;
    let shape = w.size();
    spec.check_fits(what, &shape)?;
    let x = to_float(w, what)?;
    let (out, inner) = out_inner(&shape);
    let dev = x.device();
    let is_int = !spec.format.is_float();
    if spec.format.is_keep() {
        check_finite(&x, what)?;
        let codes = keep_cast(&x, spec.format)?.f_reshape([out, inner])?;
        return Ok(Quantized { codes, scales: Tensor::f_ones([1, 1], (Kind::Float, dev))?, zero_points: None });
    }
    let (gshape, sshape) = layout(spec.granularity, out, inner);
    if x.numel() == 0 {
        let codes = Tensor::f_zeros([out, inner], (if is_int { Kind::Int } else { Kind::Float }, dev))?;
        let zero_points = if spec.format.has_zero_point() { Some(Tensor::f_zeros(sshape, (Kind::Int, dev))?) } else { None };
        return Ok(Quantized { codes, scales: Tensor::f_ones(sshape, (Kind::Float, dev))?, zero_points });
    }
    let (codes, p) = quantize_groups(&x.f_reshape(gshape)?, spec, what)?;
    let codes = codes.f_reshape([out, inner])?;
    let codes = if is_int { codes.f_to_kind(Kind::Int)? } else { codes };
    let zero_points = match &p.zero_point {
        Some(z) => Some(z.f_to_kind(Kind::Int)?.f_reshape(sshape)?),
        None => None,
    };
    Ok(Quantized { codes, scales: p.scale.f_reshape(sshape)?, zero_points })
}

fn dequantize_impl(q: &Quantized, spec: &QuantSpec, shape: &[i64]) -> Result<Tensor> {
    check_format(spec.format)?;
    spec.check_fits("weight", shape)?;
    let (out, inner) = out_inner(shape);
    let bad = |field: &str, got: Vec<i64>, want: [i64; 2]| {
        Error::invalid(
            format!("quantized {field} shape"),
            format!("{got:?}"),
            format!("expected {want:?} for a weight of shape {shape:?} under {spec}"),
        )
    };
    if q.codes.size() != [out, inner] {
        return Err(bad("codes", q.codes.size(), [out, inner]));
    }
    // A fresh FP32 copy of the codes: decoded in place below, never aliasing `q`.
    let codes = q.codes.f_to_dtype(Kind::Float, false, true)?;
    if spec.format.is_keep() {
        return Ok(codes.f_reshape(shape)?);
    }
    let (gshape, sshape) = layout(spec.granularity, out, inner);
    if q.scales.size() != sshape {
        return Err(bad("scales", q.scales.size(), sshape));
    }
    let zero_point = match (&q.zero_points, spec.format.has_zero_point()) {
        (Some(z), true) if z.size() == sshape => Some(z.f_to_kind(Kind::Float)?.f_reshape([-1, 1])?),
        (Some(z), true) => return Err(bad("zero points", z.size(), sshape)),
        (None, true) => {
            return Err(Error::invalid("quantized zero points", "none", format!("{} is asymmetric and needs zero points", spec.format)))
        }
        (Some(_), false) => {
            return Err(Error::invalid("quantized zero points", "present", format!("{} is symmetric and has no zero points", spec.format)))
        }
        (None, false) => None,
    };
    if codes.numel() == 0 {
        return Ok(codes.f_reshape(shape)?);
    }
    let p = Params { scale: q.scales.f_to_kind(Kind::Float)?.f_reshape([-1, 1])?, zero_point };
    Ok(decode_(codes.f_reshape(gshape)?, &p)?.f_reshape(shape)?)
}

/// The group parameters under `clipping`: min–max (ratio 1), or per group the ratio among
/// `1.00, 0.99, …, 0.50` with the least squared error (ties keep the larger ratio, so min–max is
/// kept unless a smaller ratio is strictly better). Each candidate goes through the same
/// encode/decode as the result; its squared error is summed in FP32 by libtorch's cascade
/// summation (relative error about 1e-7, far below the differences that matter, and an order of
/// magnitude cheaper than FP64 here).
fn choose_params(x: &Tensor, scaler: &Scaler, format: Format, clipping: Clipping) -> Result<Params> {
    let g = x.size()[0];
    let dev = x.device();
    let ones = Tensor::f_ones([g, 1], (Kind::Float, dev))?;
    if clipping == Clipping::MinMax {
        return scaler.params(&ones);
    }
    let mut best_err = Tensor::f_full([g, 1], f64::INFINITY, (Kind::Float, dev))?;
    let mut best_ratio = ones;
    for i in 0..MSE_CLIP_CANDIDATES {
        let r = 1.0 - i as f64 * MSE_CLIP_STEP;
        let ratio = Tensor::f_full([g, 1], r, (Kind::Float, dev))?;
        let p = scaler.params(&ratio)?;
        let mut d = decode_(encode(x, format, &p)?, &p)?;
        let _ = d.f_sub_(x)?;
        let _ = d.f_square_()?;
        let err = d.f_sum_dim_intlist([1i64].as_slice(), true, Kind::Float)?;
        let better = err.f_lt_tensor(&best_err)?;
        best_err = err.f_where_self(&better, &best_err)?;
        best_ratio = ratio.f_where_self(&better, &best_ratio)?;
    }
    scaler.params(&best_ratio)
}

/// Codes (FP32, fresh) of the groups `x` (`[G, group]`).
fn encode(x: &Tensor, format: Format, p: &Params) -> Result<Tensor> {
    round_to_grid_(x.f_div(&p.scale)?, format, p.zero_point.as_ref())
}

/// Values of the codes `c` (`[G, group]`, FP32), computed in place in `c`.
fn decode_(mut c: Tensor, p: &Params) -> Result<Tensor> {
    if let Some(z) = &p.zero_point {
        let _ = c.f_sub_(z)?;
    }
    let _ = c.f_mul_(&p.scale)?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(bits: u8, signed: bool) -> Format {
        Format::Int { bits, signed }
    }

    #[test]
    fn layouts() {
        assert_eq!(layout(Granularity::PerTensor, 4, 6), ([1, 24], [1, 1]));
        assert_eq!(layout(Granularity::PerChannel, 4, 6), ([4, 6], [4, 1]));
        assert_eq!(layout(Granularity::PerGroup(3), 4, 6), ([8, 3], [4, 2]));
    }

    #[test]
    fn conv_weight_keeps_its_shape_and_groups_run_along_inner() {
        // [O=2, I=2, 1, 2]: inner = 4; group 2 splits each row in two.
        let w = Tensor::from_slice(&[1.0f32, -1.0, 100.0, 50.0, 0.5, 0.25, 0.0, 0.0]).reshape([2, 2, 1, 2]);
        let spec = QuantSpec::new(int(8, true), Granularity::PerGroup(2));
        let q = quantize(&w, &spec).unwrap();
        assert_eq!(q.codes.size(), vec![2, 4]);
        assert_eq!(q.scales.size(), vec![2, 2]);
        let f = fake_quantize(&w, &spec).unwrap();
        assert_eq!(f.size(), w.size());
        // Group [1, -1] has its own scale 1/127, so both survive to within half a step.
        let v = Vec::<f32>::try_from(f.flatten(0, -1)).unwrap();
        assert!((v[0] - 1.0).abs() < 1e-3 && (v[1] + 1.0).abs() < 1e-3, "{v:?}");
        assert_eq!(&v[6..], &[0.0, 0.0]);
    }

    #[test]
    fn non_finite_and_non_float_inputs_are_errors() {
        let spec = QuantSpec::default();
        let w = Tensor::from_slice(&[1.0f32, f32::NAN, f32::INFINITY, 0.0]).reshape([2, 2]);
        let e = fake_quantize(&w, &spec).unwrap_err().to_string();
        assert!(e.contains("1 NaN") && e.contains("1 infinite"), "{e}");
        let e = fake_quantize(&Tensor::from_slice(&[1i64, 2]), &spec).unwrap_err().to_string();
        assert!(e.contains("floating-point"), "{e}");
        let bad = QuantSpec::new(int(9, true), Granularity::PerChannel);
        assert!(fake_quantize(&Tensor::ones([2, 2], (Kind::Float, tch::Device::Cpu)), &bad).is_err());
    }

    #[test]
    fn mse_search_can_pick_a_smaller_ratio() {
        // One outlier among small values: clipping it buys resolution for the rest.
        let mut v: Vec<f32> = (0..255).map(|i| ((i as f32) * 0.37).sin()).collect();
        v.push(1.8);
        let w = Tensor::from_slice(&v).reshape([1, 256]);
        let mm = QuantSpec::new(int(3, true), Granularity::PerChannel);
        let mse = QuantSpec { clipping: Clipping::Mse, ..mm };
        let e = |s: &QuantSpec| (fake_quantize(&w, s).unwrap() - &w).square().sum(Kind::Double).double_value(&[]);
        assert!(e(&mse) < e(&mm), "mse clipping {} vs min-max {}", e(&mse), e(&mm));
    }
}
