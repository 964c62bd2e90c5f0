//! Packed weight layouts and their exact pack / unpack / dequantize.
//!
//! A weight is `W[n, k]` (output rows, inner dimension), quantized in groups of `group`
//! consecutive elements along `k` (`group = k` is per-channel), one FP32 scale per group
//! (`scales[n, k / group]`) and, for asymmetric integers, one zero point per group. The input is
//! what a quantizer produces — integer codes or FP grid values, plus scales — so this crate does
//! not depend on `mixq`; `mixq::quant::quantize` output packs as is.
//!
//! Scales stay FP32 whatever the quantizer's storage type (f16, E8M0, E4M3·tensor scale): every
//! such scale is an FP32 value, so FP32 is exact for all of them, and the dequantized value
//! `(code - zero) · scale` is one FP32 multiplication of the same operands fake quantization
//! multiplies — equal bit for bit. (Narrower scale storage would save 0.25–0.5 bit per weight at
//! group 64–128; it is a later optimisation.)
//!
//! Layouts (row-major over `n`, each row padded to its own stride):
//! - **4-bit** (`Int4`, `Fp4E2M1`): each row is split into blocks of 32 elements stored in 16
//!   bytes; byte `j` of a block holds element `j` in its low nibble and element `j + 16` in its
//!   high nibble (as ggml's `q4_0`), so one 16-byte load and two mask/shift ops give 32 elements
//!   in order. The last block of a row is zero-padded. Int4 nibbles are unsigned: symmetric
//!   codes `-8..=7` are stored as `code + 8` with the implicit zero point 8, asymmetric codes
//!   `0..=15` as they are with a stored zero point (0..=15) per group. FP4 nibbles are E2M1
//!   codes: bit 3 the sign, bits 0..=2 the index into [`FP4_E2M1_VALUES`].
//! - **8-bit** (`Int8`, `Fp8E4M3`): one byte per element, row stride `k`. Int8 stores symmetric
//!   codes as `i8`; asymmetric codes `c` in `0..=255` with zero point `z` are stored as
//!   `c - 128` with zero point `z - 128` (same difference, so the same value). FP8 stores the
//!   E4M3 (`float8_e4m3fn`) bit pattern.

use crate::error::{shape, KernelError, Result};

/// The non-negative FP4 E2M1 values in code order (codes 8..=15 are the negatives).
pub const FP4_E2M1_VALUES: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
/// Elements per block of the 4-bit layouts.
pub const NIBBLE_BLOCK: usize = 32;
/// Bytes per block of the 4-bit layouts.
pub const NIBBLE_BLOCK_BYTES: usize = 16;

/// Storage format of a packed weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// 4-bit integers, two per byte; `asymmetric` adds a zero point per group.
    Int4 {
        /// Codes `0..=15` with a stored zero point (else `-8..=7`).
        asymmetric: bool,
    },
    /// 8-bit integers; `asymmetric` adds a zero point per group.
    Int8 {
        /// Codes `0..=255` with a stored zero point (else `-128..=127`).
        asymmetric: bool,
    },
    /// FP8 E4M3 (`float8_e4m3fn`: no infinities, max 448), one byte per element.
    Fp8E4M3,
    /// FP4 E2M1 (values 0, ±0.5 … ±6), two per byte.
    Fp4E2M1,
}

impl WeightFormat {
    /// Bits per element of the codes (scales and zero points not counted).
    pub fn bits(self) -> usize {
        match self {
            WeightFormat::Int4 { .. } | WeightFormat::Fp4E2M1 => 4,
            WeightFormat::Int8 { .. } | WeightFormat::Fp8E4M3 => 8,
        }
    }

    /// The name mixq uses for the format (`int4`, `int4-asym`, `int8`, `fp8-e4m3`, `fp4-e2m1`).
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Int4 { asymmetric: false } => "int4",
            WeightFormat::Int4 { asymmetric: true } => "int4-asym",
            WeightFormat::Int8 { asymmetric: false } => "int8",
            WeightFormat::Int8 { asymmetric: true } => "int8-asym",
            WeightFormat::Fp8E4M3 => "fp8-e4m3",
            WeightFormat::Fp4E2M1 => "fp4-e2m1",
        }
    }

    /// Whether the codes are integers (packed from `i32` codes) rather than FP grid values.
    pub fn is_int(self) -> bool {
        matches!(self, WeightFormat::Int4 { .. } | WeightFormat::Int8 { .. })
    }

    /// Whether the format stores a zero point per group.
    pub fn has_zero_point(self) -> bool {
        matches!(self, WeightFormat::Int4 { asymmetric: true } | WeightFormat::Int8 { asymmetric: true })
    }

    /// Bytes of one packed row of `k` elements.
    pub fn row_bytes(self, k: usize) -> usize {
        match self.bits() {
            4 => k.div_ceil(NIBBLE_BLOCK) * NIBBLE_BLOCK_BYTES,
            _ => k,
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A packed low-bit weight `W[n, k]` with FP32 group scales (see the module docs for the layout).
#[derive(Clone, Debug, PartialEq)]
pub struct PackedWeight {
    pub(crate) format: WeightFormat,
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) group: usize,
    pub(crate) data: Vec<u8>,
    pub(crate) scales: Vec<f32>,
    /// Stored zero points (asymmetric formats only), one byte per group, `[n, k / group]`:
    /// `0..=15` for int4, the `i8` bit pattern of `z - 128` for int8.
    pub(crate) zeros: Option<Vec<u8>>,
}

/// Byte offset and nibble (0 low, 1 high) of element `kk` in a 4-bit row.
#[inline]
pub(crate) fn nibble_pos(kk: usize) -> (usize, u32) {
    let (b, i) = (kk / NIBBLE_BLOCK, kk % NIBBLE_BLOCK);
    (b * NIBBLE_BLOCK_BYTES + i % NIBBLE_BLOCK_BYTES, (i / NIBBLE_BLOCK_BYTES) as u32)
}

/// The E4M3 (`float8_e4m3fn`) value of a byte, exactly. 0x7F / 0xFF (NaN) decode to NaN.
#[inline]
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = i32::from((b >> 3) & 0x0F);
    let m = f32::from(b & 0x07);
    if b & 0x7F == 0x7F {
        return f32::NAN;
    }
    if e == 0 {
        sign * m * (1.0 / 512.0)
    } else {
        sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

/// The E4M3 byte of `v` when `v` is exactly an E4M3 value (not NaN), else `None`.
pub fn f32_to_e4m3_exact(v: f32) -> Option<u8> {
    if !v.is_finite() || v.abs() > 448.0 {
        return None;
    }
    let sign = if v.is_sign_negative() { 0x80u8 } else { 0 };
    let a = v.abs();
    // Find the code by the exponent, then check the round trip.
    let code = if a < 1.0 / 64.0 {
        // subnormal range (and zero): a = m / 512
        let m = a * 512.0;
        if m.fract() != 0.0 || m > 7.0 {
            return None;
        }
        m as u8
    } else {
        let e = a.log2().floor() as i32;
        let e = if 2f32.powi(e) > a {
            e - 1
        } else if 2f32.powi(e + 1) <= a {
            e + 1
        } else {
            e
        };
        let m = (a / 2f32.powi(e) - 1.0) * 8.0;
        if m.fract() != 0.0 || !(0.0..8.0).contains(&m) || !(-6..=8).contains(&e) {
            return None;
        }
        (((e + 7) as u8) << 3) | m as u8
    };
    let b = sign | code;
    (e4m3_to_f32(b).to_bits() == v.to_bits()).then_some(b)
}

/// The FP4 E2M1 value of a nibble code.
#[inline]
pub fn e2m1_to_f32(code: u8) -> f32 {
    let v = FP4_E2M1_VALUES[usize::from(code & 7)];
    if code & 8 != 0 {
        -v
    } else {
        v
    }
}

/// The FP4 E2M1 nibble of `v` when `v` is exactly an E2M1 value, else `None`.
pub fn f32_to_e2m1_exact(v: f32) -> Option<u8> {
    let idx = FP4_E2M1_VALUES.iter().position(|&g| g == v.abs())? as u8;
    Some(if v.is_sign_negative() { idx | 8 } else { idx })
}

impl PackedWeight {
    /// Format of the codes.
    pub fn format(&self) -> WeightFormat {
        self.format
    }
    /// Output rows `n`.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Inner dimension `k`.
    pub fn k(&self) -> usize {
        self.k
    }
    /// Elements per scale group along `k` (`k` for per-channel).
    pub fn group(&self) -> usize {
        self.group
    }
    /// The FP32 scales, `[n, k / group]` row-major.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    /// The packed codes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
    /// Bytes per packed row.
    pub fn row_bytes(&self) -> usize {
        self.format.row_bytes(self.k)
    }
    /// Groups per row.
    pub fn groups_per_row(&self) -> usize {
        self.k / self.group
    }
    /// Bytes a kernel reads for the whole weight: codes, scales (4 bytes each) and zero points.
    pub fn bytes(&self) -> usize {
        self.data.len() + 4 * self.scales.len() + self.zeros.as_ref().map_or(0, Vec::len)
    }

    /// Packs integer codes `[n, k]` (row-major; `i32` as `mixq::quant::quantize` returns them)
    /// with scales `[n, k / group]` and, for asymmetric formats, zero points of the scales' shape.
    /// Codes must lie in `-8..=7` / `-128..=127` (symmetric) or `0..=15` / `0..=255`
    /// (asymmetric); zero points in the asymmetric code range.
    pub fn pack_int(format: WeightFormat, codes: &[i32], scales: &[f32], zero_points: Option<&[i32]>, n: usize, k: usize) -> Result<Self> {
        let (bits, asym) = match format {
            WeightFormat::Int4 { asymmetric } => (4, asymmetric),
            WeightFormat::Int8 { asymmetric } => (8, asymmetric),
            _ => return Err(KernelError::Unsupported(format!("pack_int packs int4/int8; use pack_float for {format}"))),
        };
        let group = check_common(codes.len(), scales, n, k)?;
        let (lo, hi) = if asym { (0, (1 << bits) - 1) } else { (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) };
        let rule = match (bits, asym) {
            (4, false) => "int4 codes are -8..=7",
            (4, true) => "int4-asym codes are 0..=15",
            (_, false) => "int8 codes are -128..=127",
            _ => "int8-asym codes are 0..=255",
        };
        if let Some(i) = codes.iter().position(|c| !(lo..=hi).contains(c)) {
            return Err(KernelError::Code { format: format.name(), index: i, value: codes[i].to_string(), rule });
        }
        let zeros = match (asym, zero_points) {
            (true, Some(z)) => {
                if z.len() != scales.len() {
                    return Err(shape("zero points", format!("{} values (one per scale)", scales.len()), z.len()));
                }
                if let Some(i) = z.iter().position(|c| !(lo..=hi).contains(c)) {
                    return Err(KernelError::Code { format: format.name(), index: i, value: format!("zero point {}", z[i]), rule });
                }
                Some(z.iter().map(|&z| if bits == 4 { z as u8 } else { (z - 128) as i8 as u8 }).collect())
            }
            (true, None) => return Err(KernelError::Unsupported(format!("{format} needs zero points"))),
            (false, Some(_)) => return Err(KernelError::Unsupported(format!("{format} is symmetric and takes no zero points"))),
            (false, None) => None,
        };
        let rb = format.row_bytes(k);
        let mut data = vec![0u8; n * rb];
        for (r, row) in codes.chunks_exact(k.max(1)).enumerate().take(n) {
            let out = &mut data[r * rb..(r + 1) * rb];
            for (kk, &c) in row.iter().enumerate() {
                if bits == 4 {
                    let u = if asym { c } else { c + 8 } as u8;
                    let (byte, nib) = nibble_pos(kk);
                    out[byte] |= u << (4 * nib);
                } else {
                    out[kk] = if asym { (c - 128) as i8 as u8 } else { c as i8 as u8 };
                }
            }
        }
        Ok(PackedWeight { format, n, k, group, data, scales: scales.to_vec(), zeros })
    }

    /// Packs FP grid values `[n, k]` (FP32, as `mixq::quant::quantize` returns them for FP
    /// formats) with scales `[n, k / group]`. Every value must be exactly representable in the
    /// format (E4M3: at most 448 in magnitude).
    pub fn pack_float(format: WeightFormat, values: &[f32], scales: &[f32], n: usize, k: usize) -> Result<Self> {
        let group = check_common(values.len(), scales, n, k)?;
        let rb = format.row_bytes(k);
        let mut data = vec![0u8; n * rb];
        for (r, row) in values.chunks_exact(k.max(1)).enumerate().take(n) {
            let out = &mut data[r * rb..(r + 1) * rb];
            for (kk, &v) in row.iter().enumerate() {
                let bad = |rule| KernelError::Code { format: format.name(), index: r * k + kk, value: v.to_string(), rule };
                match format {
                    WeightFormat::Fp8E4M3 => out[kk] = f32_to_e4m3_exact(v).ok_or_else(|| bad("an E4M3 value, |v| <= 448"))?,
                    WeightFormat::Fp4E2M1 => {
                        let c = f32_to_e2m1_exact(v).ok_or_else(|| bad("0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6"))?;
                        let (byte, nib) = nibble_pos(kk);
                        out[byte] |= c << (4 * nib);
                    }
                    _ => return Err(KernelError::Unsupported(format!("pack_float packs fp8-e4m3/fp4-e2m1; use pack_int for {format}"))),
                }
            }
        }
        Ok(PackedWeight { format, n, k, group, data, scales: scales.to_vec(), zeros: None })
    }

    /// The integer codes `[n, k]` and zero points back, as given to [`PackedWeight::pack_int`]
    /// (exact round trip). Errors for FP formats.
    pub fn unpack_int(&self) -> Result<(Vec<i32>, Option<Vec<i32>>)> {
        let (bits, asym) = match self.format {
            WeightFormat::Int4 { asymmetric } => (4, asymmetric),
            WeightFormat::Int8 { asymmetric } => (8, asymmetric),
            f => return Err(KernelError::Unsupported(format!("unpack_int of {f}; use unpack_float"))),
        };
        let mut codes = Vec::with_capacity(self.n * self.k);
        for r in 0..self.n {
            for kk in 0..self.k {
                let u = self.raw(r, kk);
                codes.push(match (bits, asym) {
                    (4, false) => u - 8,
                    (4, true) => u,
                    (_, false) => u,
                    _ => u + 128,
                });
            }
        }
        let zeros =
            self.zeros.as_ref().map(|z| z.iter().map(|&b| if bits == 4 { i32::from(b) } else { i32::from(b as i8) + 128 }).collect());
        Ok((codes, zeros))
    }

    /// The FP grid values `[n, k]` back, as given to [`PackedWeight::pack_float`] (exact, signs of
    /// zeros included). Errors for integer formats.
    pub fn unpack_float(&self) -> Result<Vec<f32>> {
        if self.format.is_int() {
            return Err(KernelError::Unsupported(format!("unpack_float of {}; use unpack_int", self.format)));
        }
        Ok((0..self.n).flat_map(|r| (0..self.k).map(move |kk| (r, kk))).map(|(r, kk)| self.grid_value(r, kk)).collect())
    }

    /// The dequantized weight `[n, k]`: `(code - zero) · scale` in FP32 — the values fake
    /// quantization produces, bit for bit.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n * self.k);
        for r in 0..self.n {
            out.extend((0..self.k).map(|kk| self.value(r, kk)));
        }
        out
    }

    /// Raw stored code of element (r, kk): the unsigned nibble for 4-bit formats, the `i8` value
    /// for int8, the byte for FP8.
    #[inline]
    pub(crate) fn raw(&self, r: usize, kk: usize) -> i32 {
        let row = &self.data[r * self.row_bytes()..];
        match self.format.bits() {
            4 => {
                let (byte, nib) = nibble_pos(kk);
                i32::from((row[byte] >> (4 * nib)) & 0x0F)
            }
            _ if self.format == WeightFormat::Fp8E4M3 => i32::from(row[kk]),
            _ => i32::from(row[kk] as i8),
        }
    }

    /// The stored zero point of group `g` of row `r` in the stored code domain.
    #[inline]
    pub(crate) fn zero(&self, r: usize, g: usize) -> i32 {
        match (&self.zeros, self.format) {
            (Some(z), WeightFormat::Int4 { .. }) => i32::from(z[r * self.groups_per_row() + g]),
            (Some(z), _) => i32::from(z[r * self.groups_per_row() + g] as i8),
            (None, WeightFormat::Int4 { .. }) => 8,
            (None, _) => 0,
        }
    }

    /// FP grid value of element (r, kk) (FP formats).
    #[inline]
    fn grid_value(&self, r: usize, kk: usize) -> f32 {
        let u = self.raw(r, kk) as u8;
        match self.format {
            WeightFormat::Fp8E4M3 => e4m3_to_f32(u),
            _ => e2m1_to_f32(u),
        }
    }

    /// Exact dequantized value of element (r, kk).
    #[inline]
    pub(crate) fn value(&self, r: usize, kk: usize) -> f32 {
        let g = kk / self.group;
        let s = self.scales[r * self.groups_per_row() + g];
        if self.format.is_int() {
            (self.raw(r, kk) - self.zero(r, g)) as f32 * s
        } else {
            self.grid_value(r, kk) * s
        }
    }
}

/// Checks the code count and scales against `[n, k]`; returns the group size.
fn check_common(len: usize, scales: &[f32], n: usize, k: usize) -> Result<usize> {
    if n == 0 || k == 0 {
        return Err(shape("weight shape", "n > 0 and k > 0", format!("[{n}, {k}]")));
    }
    if len != n * k {
        return Err(shape("codes", format!("{} values for [{n}, {k}]", n * k), len));
    }
    if !scales.len().is_multiple_of(n) || scales.is_empty() {
        return Err(shape("scales", format!("[{n}, groups] (a multiple of {n} values)"), scales.len()));
    }
    let per_row = scales.len() / n;
    if !k.is_multiple_of(per_row) {
        return Err(KernelError::Group { scales_per_row: per_row, k });
    }
    if let Some(i) = scales.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(KernelError::Scale { index: i, value: scales[i] });
    }
    Ok(k / per_row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_codes_round_trip() {
        for b in 0..=255u8 {
            if b & 0x7F == 0x7F {
                continue;
            }
            let v = e4m3_to_f32(b);
            assert_eq!(f32_to_e4m3_exact(v), Some(b), "byte {b:#x} value {v}");
        }
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 1.0 / 512.0);
        assert_eq!(f32_to_e4m3_exact(0.3), None);
        assert_eq!(f32_to_e4m3_exact(480.0), None);
    }

    #[test]
    fn int4_round_trip_and_layout() {
        let (n, k) = (3, 40);
        let codes: Vec<i32> = (0..n * k).map(|i| (i as i32 * 7) % 16 - 8).collect();
        let scales = vec![0.5f32; n * 5];
        let w = PackedWeight::pack_int(WeightFormat::Int4 { asymmetric: false }, &codes, &scales, None, n, k).unwrap();
        assert_eq!(w.row_bytes(), 32);
        assert_eq!(w.group(), 8);
        assert_eq!(w.unpack_int().unwrap().0, codes);
        // element 16 of a row sits in the high nibble of byte 0
        assert_eq!(i32::from(w.data[0] >> 4) - 8, codes[16]);
        let d = w.dequantize();
        assert!(d.iter().zip(&codes).all(|(v, c)| *v == *c as f32 * 0.5));
    }

    #[test]
    fn int8_asym_round_trip() {
        let (n, k) = (2, 6);
        let codes: Vec<i32> = vec![0, 255, 7, 128, 129, 3, 9, 8, 7, 6, 5, 4];
        let z = vec![128, 3];
        let w = PackedWeight::pack_int(WeightFormat::Int8 { asymmetric: true }, &codes, &[1.0, 2.0], Some(&z), n, k).unwrap();
        let (c, zz) = w.unpack_int().unwrap();
        assert_eq!(c, codes);
        assert_eq!(zz.unwrap(), z);
        assert_eq!(w.dequantize()[1], 127.0);
        assert_eq!(w.dequantize()[6], 12.0);
    }

    #[test]
    fn fp4_round_trip() {
        let vals: Vec<f32> = (0..64u8).map(|i| e2m1_to_f32(i % 16)).collect();
        let w = PackedWeight::pack_float(WeightFormat::Fp4E2M1, &vals, &[1.0, 0.25], 1, 64).unwrap();
        let back = w.unpack_float().unwrap();
        assert!(back.iter().zip(&vals).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let f = WeightFormat::Int4 { asymmetric: false };
        assert!(matches!(PackedWeight::pack_int(f, &[8, 0], &[1.0], None, 1, 2), Err(KernelError::Code { .. })));
        assert!(matches!(PackedWeight::pack_int(f, &[0; 6], &[1.0; 4], None, 1, 6), Err(KernelError::Group { .. })));
        assert!(matches!(PackedWeight::pack_int(f, &[0; 6], &[0.0], None, 1, 6), Err(KernelError::Scale { .. })));
        assert!(matches!(PackedWeight::pack_int(f, &[0; 5], &[1.0], None, 1, 6), Err(KernelError::Shape { .. })));
        assert!(PackedWeight::pack_float(WeightFormat::Fp4E2M1, &[2.5], &[1.0], 1, 1).is_err());
    }
}
