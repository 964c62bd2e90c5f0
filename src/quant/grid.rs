//! Rounding of already scaled values onto each format's element grid.
//!
//! Every function here takes `y = x / scale` (FP32) and returns the grid value it rounds to, as
//! FP32: integer codes for the integer formats (so that a caller can turn them into `int32`
//! losslessly), the representable values themselves for the floating-point formats. Keeping the
//! codes in FP32 while searching lets the clipping search and the final quantization share one
//! code path, so the error the search minimises is exactly the error of the result.
//!
//! Rounding rules, all round-to-nearest with ties to even, as in the specs the kernels follow:
//! - integers: `torch.round` (ties to even), then a clamp to the grid;
//! - FP8: libtorch's own `float8_e4m3fn` / `float8_e5m2` casts, after a clamp to the format's
//!   largest finite value (so the result is bit-exact with libtorch by construction, and
//!   out-of-range values saturate instead of turning into NaN or infinity);
//! - FP4 E2M1: no libtorch dtype to cast through, so the rounding is written out: on each binade
//!   the grid is evenly spaced (step 0.5 below 2, 1 on `[2, 4)`, 2 on `[4, 6]`), so rounding
//!   `y / step` to the nearest even integer and multiplying back rounds to the nearest grid value
//!   with ties going to the value whose code (mantissa bit) is even, as the OCP MX specification
//!   prescribes for conversions (roundTiesToEven). Values beyond 6 saturate to 6.

use super::format::Format;
use crate::error::{Error, Result};
use tch::{Kind, Tensor};

/// The non-negative FP4 E2M1 values, in code order (code 0..=7; codes 8..=15 are the negatives).
pub const FP4_E2M1_VALUES: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// Checks that `format` is one mixq can compute with (integers need 2 to 8 bits).
pub(crate) fn check_format(format: Format) -> Result<()> {
    match format {
        Format::Int { bits, .. } if !(2..=8).contains(&bits) => Err(Error::invalid(
            "format",
            format!("int{bits}"),
            "integer formats have 2 to 8 bits; valid formats: int2..int8, int2-asym..int8-asym, fp8-e4m3, fp8-e5m2, fp4-e2m1, bf16, fp16, fp32",
        )),
        _ => Ok(()),
    }
}

/// The integer grid `[lo, hi]` of an integer format: `-2^(b-1) ..= 2^(b-1)-1` (symmetric) or
/// `0 ..= 2^b-1` (asymmetric). `None` for the floating-point formats.
pub(crate) fn int_range(format: Format) -> Option<(f64, f64)> {
    match format {
        Format::Int { bits, signed: true } => {
            let half = f64::from(1u32 << (bits.clamp(2, 8) - 1));
            Some((-half, half - 1.0))
        }
        Format::Int { bits, signed: false } => Some((0.0, f64::from((1u32 << bits.clamp(2, 8)) - 1))),
        _ => None,
    }
}

/// The libtorch dtype of an FP8 format.
fn fp8_kind(format: Format) -> Option<Kind> {
    match format {
        Format::Fp8E4M3 => Some(Kind::Float8e4m3fn),
        Format::Fp8E5M2 => Some(Kind::Float8e5m2),
        _ => None,
    }
}

/// Rounds `y` (FP32, already divided by the scale) onto `format`'s grid, in place where it can
/// (`y` is a fresh temporary owned by the caller; in-place ops spare libtorch an allocation and a
/// page-faulting first touch per step, which on large weights costs as much as the arithmetic).
/// For asymmetric integers `zero_point` (FP32 holding integers, broadcastable to `y`) is added
/// before the clamp, so the result is the stored code `clamp(round(y) + z, 0, 2^b-1)`.
pub(crate) fn round_to_grid_(mut y: Tensor, format: Format, zero_point: Option<&Tensor>) -> Result<Tensor> {
    if let Some((lo, hi)) = int_range(format) {
        let _ = y.f_round_()?;
        if let Some(z) = zero_point {
            let _ = y.f_add_(z)?;
        }
        let _ = y.f_clamp_(lo, hi)?;
        return Ok(y);
    }
    if let Some(kind) = fp8_kind(format) {
        let m = format.grid_max();
        let _ = y.f_clamp_(-m, m)?;
        return Ok(y.f_to_kind(kind)?.f_to_kind(Kind::Float)?);
    }
    match format {
        Format::Fp4E2M1 => fp4_round(&y),
        // Keep formats never reach here (they have no scale); a plain cast is their "grid".
        Format::Bf16 => Ok(y.f_to_kind(Kind::BFloat16)?.f_to_kind(Kind::Float)?),
        Format::Fp16 => Ok(y.f_to_kind(Kind::Half)?.f_to_kind(Kind::Float)?),
        _ => Ok(y),
    }
}

/// Rounds to the nearest FP4 E2M1 value, ties to the even code, saturating at ±6.
fn fp4_round(y: &Tensor) -> Result<Tensor> {
    let mut a = y.f_abs()?;
    let _ = a.f_clamp_(0.0, Format::Fp4E2M1.grid_max())?;
    // Step of the grid on the binade of `a`: 0.5 on [0, 2), 1 on [2, 4), 2 on [4, 6].
    let upper = Tensor::f_where_scalar(&a.f_lt(4.0)?, 1.0, 2.0)?;
    let step = Tensor::f_where_scalarself(&a.f_lt(2.0)?, 0.5, &upper)?;
    let _ = a.f_div_(&step)?.f_round_()?;
    let _ = a.f_mul_(&step)?;
    let _ = a.f_copysign_(y)?;
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v)
    }

    fn vec(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
    }

    #[test]
    fn fp4_values_are_fixed_points() {
        let mut v: Vec<f32> = FP4_E2M1_VALUES.to_vec();
        v.extend(FP4_E2M1_VALUES.iter().map(|x| -x));
        let got = vec(&round_to_grid_(t(&v), Format::Fp4E2M1, None).unwrap());
        assert_eq!(got, v);
    }

    #[test]
    fn fp4_ties_go_to_the_even_code() {
        // Midpoints between neighbours (code of the lower value, code of the upper value) and
        // the value with the even code.
        let cases = [(0.25f32, 0.0f32), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0)];
        for (x, want) in cases {
            for s in [1.0f32, -1.0] {
                let got = vec(&round_to_grid_(t(&[s * x]), Format::Fp4E2M1, None).unwrap())[0];
                assert_eq!(got, s * want, "fp4 round of tie {}: got {got}, expected {}", s * x, s * want);
            }
        }
    }

    #[test]
    fn fp4_rounds_to_nearest_and_saturates() {
        let cases =
            [(0.24f32, 0.0f32), (0.26, 0.5), (2.49, 2.0), (2.51, 3.0), (4.99, 4.0), (5.01, 6.0), (7.0, 6.0), (1e30, 6.0), (-100.0, -6.0)];
        for (x, want) in cases {
            let got = vec(&round_to_grid_(t(&[x]), Format::Fp4E2M1, None).unwrap())[0];
            assert_eq!(got, want, "fp4 round of {x}: got {got}, expected {want}");
        }
    }

    #[test]
    fn int_codes_round_half_even_and_clamp() {
        let f = Format::Int { bits: 4, signed: true };
        let got = vec(&round_to_grid_(t(&[0.5, 1.5, -2.5, 7.4, 9.0, -8.6, -100.0]), f, None).unwrap());
        assert_eq!(got, vec![0.0, 2.0, -2.0, 7.0, 7.0, -8.0, -8.0]);
        let f = Format::Int { bits: 3, signed: false };
        let z = t(&[2.0]);
        let got = vec(&round_to_grid_(t(&[-3.0, -2.0, 0.0, 4.6, 9.0]), f, Some(&z)).unwrap());
        assert_eq!(got, vec![0.0, 0.0, 2.0, 7.0, 7.0]);
    }

    #[test]
    fn fp8_saturates_instead_of_nan() {
        let got = vec(&round_to_grid_(t(&[1e6, -1e6, 470.0]), Format::Fp8E4M3, None).unwrap());
        assert_eq!(got, vec![448.0, -448.0, 448.0]);
        let got = vec(&round_to_grid_(t(&[1e9, -61440.0]), Format::Fp8E5M2, None).unwrap());
        assert_eq!(got, vec![57344.0, -57344.0]);
    }

    #[test]
    fn int_ranges() {
        assert_eq!(int_range(Format::Int { bits: 2, signed: true }), Some((-2.0, 1.0)));
        assert_eq!(int_range(Format::Int { bits: 8, signed: true }), Some((-128.0, 127.0)));
        assert_eq!(int_range(Format::Int { bits: 8, signed: false }), Some((0.0, 255.0)));
        assert_eq!(int_range(Format::Fp8E4M3), None);
        assert!(check_format(Format::Int { bits: 9, signed: true }).is_err());
        assert!(check_format(Format::Int { bits: 1, signed: false }).is_err());
        assert!(check_format(Format::Int { bits: 2, signed: false }).is_ok());
    }
}
