//! Scales and zero points: the range of each scale group, and the rounding of each scale to its
//! storage type.
//!
//! Weights arrive here already viewed as `[G, group]`: one row per scale group. A [`Scaler`] is
//! built once per weight (the ranges, the groups that are entirely zero, the per-tensor scale of
//! two-level scaling) and then asked for [`Params`] at a clipping ratio per group; the clipping
//! search in `fake.rs` asks for many ratios, the final quantization for the chosen one, through
//! the same code, so the error the search minimises is exactly the error of the result.
//!
//! Storage rounding (the fake quantization must use the scale the kernels will read back):
//! - `F32`: as computed; `F16`: rounded to nearest through `Kind::Half` (a scale beyond 65504 is
//!   an error that says to use f32 scales; one that underflows to zero becomes the smallest
//!   positive half, `2^-24`, so a group with tiny but nonzero weights is not wiped out);
//! - `E8M0`: the power of two `2^ceil(log2(range / grid_max))`, i.e. rounded *up*, so no element
//!   of the group exceeds the grid and nothing clips. (The OCP MX specification derives the
//!   shared exponent as `floor(log2(amax)) - emax_elem`, which can push the largest element above
//!   the grid, where it saturates; rounding up trades at most a factor two of resolution for never
//!   clipping, and is exact on weights that already sit on a power-of-two grid.) The exponent is
//!   held in `[-126, 127]`, the normal FP32 powers of two;
//! - `E4M3`: two-level (NVFP4 style): an FP32 tensor scale `s_t = amax_tensor / (448 · grid_max)`
//!   (at least `2^-126`), and per group the FP8 E4M3 value `e` nearest to
//!   `(range_group / grid_max) / s_t` (at least the smallest subnormal `2^-9`); the effective
//!   scale is `e · s_t` in FP32.
//!
//! A group whose range is zero (all elements zero) gets the scale "one" of its storage type (1,
//! or `s_t` for E4M3) and zero point 0: its codes are 0 and it dequantizes to exact zeros.

use super::format::{Format, ScaleType};
use super::grid::int_range;
use crate::error::{Error, Result};
use tch::{Kind, Tensor};

/// Largest finite FP8 E4M3 value: the top of the per-group scale range of two-level scaling.
pub(crate) const E4M3_MAX: f64 = 448.0;
/// Smallest positive FP8 E4M3 value (subnormal).
pub(crate) const E4M3_MIN_POSITIVE: f64 = 1.0 / 512.0;
/// Smallest positive IEEE half value (subnormal).
pub(crate) const F16_MIN_POSITIVE: f64 = 1.0 / 16_777_216.0;
/// Largest finite IEEE half value.
pub(crate) const F16_MAX: f64 = 65504.0;
/// Smallest normal FP32 power of two; the floor of E8M0 scales and of two-level tensor scales.
pub(crate) const F32_MIN_NORMAL: f64 = 1.175_494_350_822_287_5e-38;
/// Exponent range of E8M0 scales as produced here (the normal FP32 powers of two).
const E8M0_EXP_MIN: i64 = -126;
const E8M0_EXP_MAX: i64 = 127;

/// Scale and zero point of every group, `[G, 1]` each, FP32.
pub(crate) struct Params {
    /// Effective scale (for E4M3: group scale times tensor scale), positive and finite.
    pub scale: Tensor,
    /// Integer zero point held in FP32, for asymmetric integer formats.
    pub zero_point: Option<Tensor>,
}

/// The range of each group.
enum Range {
    /// Largest magnitude, `[G, 1]`.
    Sym { amax: Tensor },
    /// `min(min, 0)` and `max(max, 0)`, `[G, 1]` each: zero always lies in the range.
    Asym { lo: Tensor, hi: Tensor },
}

/// Everything about a weight's groups that does not depend on the clipping ratio.
pub(crate) struct Scaler {
    format: Format,
    scale_type: ScaleType,
    range: Range,
    /// `[G, 1]` bool: the group has a nonzero range.
    nonzero: Tensor,
    /// The FP32 tensor scale of two-level (E4M3) scaling.
    tensor_scale: Option<f64>,
    /// What is being quantized, for error messages.
    what: String,
}

impl Scaler {
    /// Ranges of the groups of `x` (`[G, group]`, FP32, not empty). One min/max reduction pass
    /// over `x`, which also detects NaN and infinity (they propagate into the ranges): those are
    /// an error naming `what`.
    pub fn new(x: &Tensor, format: Format, scale_type: ScaleType, what: &str) -> Result<Self> {
        let (lo, hi) = x.f_aminmax(1, true)?;
        if !all_true(&lo.f_isfinite()?)? || !all_true(&hi.f_isfinite()?)? {
            return Err(non_finite_error(x, what));
        }
        let (range, nonzero) = if format.has_zero_point() {
            let lo = lo.f_clamp_max(0.0)?;
            let hi = hi.f_clamp_min(0.0)?;
            let nonzero = hi.f_gt_tensor(&lo)?;
            (Range::Asym { lo, hi }, nonzero)
        } else {
            let amax = lo.f_neg()?.f_maximum(&hi)?;
            let nonzero = amax.f_gt(0.0)?;
            (Range::Sym { amax }, nonzero)
        };
        let tensor_scale = if scale_type == ScaleType::E4M3 {
            let amax_t = lo.f_abs()?.f_maximum(&hi.f_abs()?)?.f_max()?.f_double_value(&[])?;
            // Rounded to FP32, the type it is stored in.
            let s = (amax_t / (E4M3_MAX * format.grid_max())) as f32;
            Some(f64::from(s).max(F32_MIN_NORMAL))
        } else {
            None
        };
        Ok(Scaler { format, scale_type, range, nonzero, tensor_scale, what: what.to_string() })
    }

    /// The FP32 tensor scale of two-level (E4M3) scaling, `None` for the other scale types.
    #[cfg(test)]
    pub fn tensor_scale(&self) -> Option<f64> {
        self.tensor_scale
    }

    /// Scales (and zero points) with each group's range shrunk by `ratio` (`[G, 1]`, FP32, in
    /// `(0, 1]`).
    pub fn params(&self, ratio: &Tensor) -> Result<Params> {
        let gm = self.format.grid_max();
        let (raw, lo) = match &self.range {
            Range::Sym { amax } => (amax.f_mul(ratio)?.f_div_scalar(gm)?, None),
            Range::Asym { lo, hi } => {
                let lo = lo.f_mul(ratio)?;
                (hi.f_mul(ratio)?.f_sub(&lo)?.f_div_scalar(gm)?, Some(lo))
            }
        };
        if !all_true(&raw.f_isfinite()?)? {
            return Err(Error::invalid(
                self.what.clone(),
                format!("range up to {:e}", max_abs(&raw)? * gm),
                "the range of a scale group overflows FP32; the values are too large to quantize",
            ));
        }
        let rounded = self.round_scale(&raw)?;
        let unit = self.tensor_scale.unwrap_or(1.0);
        let scale = rounded.f_where_scalarother(&self.nonzero, unit)?;
        let zero_point = match (lo, int_range(self.format)) {
            (Some(lo), Some((qmin, qmax))) => Some(lo.f_neg()?.f_div(&scale)?.f_round()?.f_clamp(qmin, qmax)?),
            _ => None,
        };
        Ok(Params { scale, zero_point })
    }

    /// Rounds positive raw scales to the storage type (zero groups are replaced by the caller).
    fn round_scale(&self, raw: &Tensor) -> Result<Tensor> {
        Ok(match self.scale_type {
            ScaleType::F32 => raw.f_where_scalarother(&raw.f_gt(0.0)?, f64::from(f32::from_bits(1)))?,
            ScaleType::F16 => {
                let h = raw.f_to_kind(Kind::Half)?.f_to_kind(Kind::Float)?;
                if !all_true(&h.f_isfinite()?)? {
                    return Err(Error::invalid(
                        format!("scale type of {}", self.what),
                        "f16",
                        format!(
                            "a scale of {:e} does not fit in f16 (largest {F16_MAX}); use f32 scales for values this large",
                            max_abs(raw)?
                        ),
                    ));
                }
                h.f_clamp_min(F16_MIN_POSITIVE)?
            }
            ScaleType::E8M0 => pow2_ceil(raw)?,
            ScaleType::E4M3 => {
                let st = self.tensor_scale.unwrap_or(1.0);
                let e = raw
                    .f_div_scalar(st)?
                    .f_clamp(0.0, E4M3_MAX)?
                    .f_to_kind(Kind::Float8e4m3fn)?
                    .f_to_kind(Kind::Float)?
                    .f_clamp_min(E4M3_MIN_POSITIVE)?;
                e.f_mul_scalar(st)?
            }
        })
    }
}

/// `2^ceil(log2(v))` for positive finite FP32 `v`, exactly (through `frexp` and the FP32 bit
/// pattern, not `log2`/`exp2`, whose last-bit errors would misplace exact powers of two), with
/// the exponent clamped to `[-126, 127]`.
pub(crate) fn pow2_ceil(v: &Tensor) -> Result<Tensor> {
    // v = m · 2^e with m in [0.5, 1): ceil(log2 v) = e - 1 when m = 0.5 (v is a power of two), e otherwise.
    let (m, e) = v.f_frexp()?;
    let e = e.f_to_kind(Kind::Int)?;
    let k = e.f_sub_scalar(1)?.f_where_self(&m.f_eq(0.5)?, &e)?.f_clamp(E8M0_EXP_MIN, E8M0_EXP_MAX)?;
    // Biased exponent in the FP32 exponent field, zero mantissa: exactly 2^k.
    let bits = k.f_add_scalar(127)?.f_mul_scalar(1i64 << 23)?.f_to_kind(Kind::Int)?;
    Ok(bits.f_view_dtype(Kind::Float)?)
}

/// The error for a tensor with NaN or infinite values, with their counts.
pub(crate) fn non_finite_error(x: &Tensor, what: &str) -> Error {
    let count = |t: std::result::Result<Tensor, tch::TchError>| {
        t.and_then(|t| t.f_sum(Kind::Int64)).and_then(|t| t.f_int64_value(&[])).map(|n| n.to_string()).unwrap_or_else(|_| "some".into())
    };
    Error::invalid(
        what,
        format!("tensor of shape {:?}", x.size()),
        format!("contains {} NaN and {} infinite values; quantization needs finite values", count(x.f_isnan()), count(x.f_isinf())),
    )
}

/// True when every element of a bool tensor is true (an empty tensor counts as all true).
pub(crate) fn all_true(t: &Tensor) -> Result<bool> {
    Ok(t.f_all()?.f_int64_value(&[])? != 0)
}

/// Largest magnitude of a tensor, as f64 (0 for an empty tensor).
fn max_abs(t: &Tensor) -> Result<f64> {
    if t.numel() == 0 {
        return Ok(0.0);
    }
    Ok(t.f_abs()?.f_nan_to_num(None, None, None)?.f_max()?.f_double_value(&[])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vec(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
    }

    #[test]
    fn pow2_ceil_is_exact() {
        let v = Tensor::from_slice(&[1.0f32, 0.5, 0.75, 1.000_000_1, 3.0, 4.0, 1e-40, 1e30, 6.0 / 6.0, 0.015_625]);
        let got = vec(&pow2_ceil(&v).unwrap());
        let want = [1.0f32, 0.5, 1.0, 2.0, 4.0, 4.0, f32::from_bits(1 << 23), 2f32.powi(100), 1.0, 0.015_625];
        for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
            assert_eq!(g, w, "pow2_ceil index {i}: value {}, got {g}, expected {w}", vec(&v)[i]);
        }
    }

    #[test]
    fn zero_groups_get_unit_scale_and_zero_point() {
        let x = Tensor::from_slice(&[0.0f32, 0.0, 1.25, -2.5]).reshape([2, 2]);
        for st in [ScaleType::F32, ScaleType::F16] {
            let s = Scaler::new(&x, Format::Int { bits: 4, signed: false }, st, "weight").unwrap();
            let p = s.params(&Tensor::ones([2, 1], (Kind::Float, tch::Device::Cpu))).unwrap();
            assert_eq!(vec(&p.scale), vec![1.0, 0.25]);
            assert_eq!(vec(&p.zero_point.unwrap()), vec![0.0, 10.0]);
        }
    }

    #[test]
    fn tiny_groups_keep_a_positive_scale() {
        let x = Tensor::from_slice(&[1e-30f32, 0.0]).reshape([1, 2]);
        for st in [ScaleType::F32, ScaleType::F16, ScaleType::E8M0, ScaleType::E4M3] {
            let s = Scaler::new(&x, Format::Int { bits: 8, signed: true }, st, "weight").unwrap();
            let p = s.params(&Tensor::ones([1, 1], (Kind::Float, tch::Device::Cpu))).unwrap();
            let v = vec(&p.scale)[0];
            assert!(v > 0.0 && v.is_finite(), "{st}: scale {v}");
        }
    }

    #[test]
    fn f16_overflow_is_a_clear_error() {
        let x = Tensor::from_slice(&[1e8f32, 0.0]).reshape([1, 2]);
        let s = Scaler::new(&x, Format::Int { bits: 4, signed: true }, ScaleType::F16, "weight").unwrap();
        let e = s.params(&Tensor::ones([1, 1], (Kind::Float, tch::Device::Cpu))).err().unwrap().to_string();
        assert!(e.contains("f16") && e.contains("f32"), "{e}");
    }

    #[test]
    fn e4m3_group_scales_are_fp8_values_times_the_tensor_scale() {
        let x = Tensor::from_slice(&[6.0f32, 1.0, 0.3, 0.01, 0.0, 0.0]).reshape([3, 2]);
        let s = Scaler::new(&x, Format::Fp4E2M1, ScaleType::E4M3, "weight").unwrap();
        let st = s.tensor_scale().unwrap();
        assert_eq!(st as f32, (6.0f64 / (448.0 * 6.0)) as f32);
        let p = s.params(&Tensor::ones([3, 1], (Kind::Float, tch::Device::Cpu))).unwrap();
        let sc = vec(&p.scale);
        assert_eq!(sc[0], (448.0 * st) as f32);
        let e = sc[1] as f64 / st;
        let e8 = Tensor::from_slice(&[e as f32]).to_kind(Kind::Float8e4m3fn).to_kind(Kind::Float);
        assert!((vec(&e8)[0] as f64 - e).abs() <= 1e-6 * e, "group scale / tensor scale {e} is not an E4M3 value");
        assert_eq!(sc[2], st as f32, "zero group gets e = 1");
    }
}
