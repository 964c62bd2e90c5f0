//! x86-64 AVX2 + FMA kernels (selected at run time with `is_x86_feature_detected!`).
//!
//! Every function here is `unsafe` and `#[target_feature(enable = "avx2,fma")]`: callers (only
//! `gemm.rs`) have checked the CPU features, the shapes and the buffer lengths first.
//!
//! Weight-only kernels with FP32 activations decode 32 weights at a time into four `__m256` of
//! exact dequantized values, `(code - zero) · scale` (one FP32 multiply, as the reference), and
//! FMA them against the activations:
//! - `m == 1` (GEMV): decode and FMA fused, four independent accumulators per row and scale
//!   group over unscaled codes, the group's scale applied once per group; the kernel streams the
//!   packed weight once, so its speed is the decode throughput or the memory bandwidth,
//!   whichever is lower; a software prefetch [`PF_GEMV`] bytes ahead keeps DRAM requests in
//!   flight while the core decodes (as the W4A8 kernel's `PF_W4A8`).
//! - `1 < m < 16` (`rows`): per task of up to [`ROWS`] weight rows and per chunk of [`KC`] inner
//!   elements, the rows are decoded once into an L1-resident buffer, then a 2 × 4 register tile
//!   (two activation rows × four weight rows, eight accumulators) runs over it for all `m`:
//!   decoding is amortised over `m`, the activation chunk is reused by the four rows from L1.
//! - `m >= 16` (`panels`, the classic broadcast GEMM): per chunk of [`KCP`] inner elements and
//!   panel of [`NR`] = 16 weight rows, the rows are decoded into a k-major panel (8 × 8
//!   transposes), then 6 × 16 register tiles (12 accumulators; per element two panel loads, six
//!   broadcasts, twelve FMAs) write straight into the row-major output, no horizontal sums.
//!   Decoding into a panel costs more per weight than into rows (the transposes), so below
//!   16 rows `rows` is faster (`gemm::PANEL_M`).
//!
//! W8A8 (`gemm::matmul_w8a8`): `i8_rows` (`sign` + `maddubs` + `madd` on the raw bytes) for
//! `m` below a few rows; from there on `i16_rows`, a 2 × 4 `vpmaddwd` register tile over INT16
//! panels widened once per call (`pack_panel_i16`), and `quantize_row_avx2` for the activations.
//!
//! W4A8-dynamic (`w4a8_rows`, for `gemm::matmul_w4a8`): int4 weights against activations
//! quantized to INT8 per block of 32, exact integer dot products with `maddubs`, one FP32
//! multiply-add per block pair (see `pair_dot` and `W4a8Row`).
//!
//! Blocks of 32 never straddle a scale group when `group % 32 == 0` or `group == k` (per
//! channel); `gemm.rs` sends other group sizes to the scalar kernel.
#![allow(unsafe_op_in_unsafe_fn)]
// Register tiles index several arrays (accumulators, weights, activations) by the same
// counters; iterator chains over them would hide the tile shape.
#![allow(clippy::needless_range_loop)]

use crate::pack::{PackedWeight, NIBBLE_BLOCK, NIBBLE_BLOCK_BYTES};
use std::arch::x86_64::*;

/// Weight rows per parallel task.
pub(crate) const ROWS: usize = 8;
/// Inner elements decoded per chunk in the `m > 1` kernel (a multiple of 32; 8 rows × 512 × 4 B = 16 KiB).
pub(crate) const KC: usize = 512;

/// Decodes block `b` (elements `32b .. 32b+32`) of row `r` into exact dequantized values.
pub(crate) trait Block: Sync {
    /// Block `b` of the row starting at `row` before scaling: exact FP32 values `v` such that the
    /// dequantized value is `v · (scale · FACTOR)` with the same rounding as `value · scale`
    /// (`FACTOR` a power of two: the real products are equal), `z` the (stored-domain) zero point
    /// of its group.
    ///
    /// # Safety
    /// AVX2, FMA and F16C are available; `row` is the start of a packed row and `32(b+1) <= k`.
    unsafe fn block_raw(&self, row: *const u8, b: usize, z: i32) -> [__m256; 4];
    /// The power of two the scale is multiplied by for [`Block::block_raw`]'s values.
    const FACTOR: f32;
    /// Packed bytes per block of 32 elements (16 for the 4-bit formats, 32 for the 8-bit ones).
    const BLOCK_BYTES: usize;
    /// Block `b` of the row starting at `row`, with the scale and (stored-domain) zero point of
    /// its group: exact dequantized values.
    ///
    /// # Safety
    /// As [`Block::block_raw`].
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block(&self, row: *const u8, b: usize, s: f32, z: i32) -> [__m256; 4] {
        let sv = _mm256_set1_ps(s * Self::FACTOR);
        let mut v = self.block_raw(row, b, z);
        for x in v.iter_mut() {
            *x = _mm256_mul_ps(*x, sv);
        }
        v
    }
    /// The packed weight.
    fn w(&self) -> &PackedWeight;
}

/// Walks the scale groups of one row block by block without a division per block: integer
/// division costs tens of cycles, as much as decoding a whole block.
struct GroupWalk<'a> {
    w: &'a PackedWeight,
    r: usize,
    g: usize,
    left: usize,
    per_group: usize,
    s: f32,
    z: i32,
}

impl<'a> GroupWalk<'a> {
    /// Positioned before block `b0` of row `r`.
    #[inline]
    fn new(w: &'a PackedWeight, r: usize, b0: usize) -> Self {
        let per_group = if w.group == w.k { usize::MAX } else { w.group / NIBBLE_BLOCK };
        let g = if per_group == usize::MAX { 0 } else { (b0 / per_group).min(w.groups_per_row() - 1) };
        let left = if per_group == usize::MAX { usize::MAX } else { per_group - b0 % per_group };
        let gi = r * w.groups_per_row() + g;
        GroupWalk { w, r, g, left, per_group, s: w.scales[gi], z: w.zero(r, g) }
    }
    /// Scale and zero point of the next block.
    #[inline]
    fn next(&mut self) -> (f32, i32) {
        if self.left == 0 {
            self.g += 1;
            self.left = self.per_group;
            self.s = self.w.scales[self.r * self.w.groups_per_row() + self.g];
            self.z = self.w.zero(self.r, self.g);
        }
        self.left -= 1;
        (self.s, self.z)
    }
}

/// INT4 (symmetric: zero point 8, or stored zero points).
pub(crate) struct Int4<'a>(pub &'a PackedWeight);
/// INT8 (zero point 0, or stored zero points).
pub(crate) struct Int8<'a>(pub &'a PackedWeight);
/// FP8 E4M3.
pub(crate) struct Fp8<'a>(pub &'a PackedWeight);
/// FP4 E2M1.
pub(crate) struct Fp4<'a>(pub &'a PackedWeight);

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn i8x16_to_ps(v: __m128i) -> [__m256; 2] {
    let a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    let b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(v)));
    [a, b]
}

impl Block for Int4<'_> {
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block_raw(&self, row: *const u8, b: usize, z: i32) -> [__m256; 4] {
        let p = row.add(b * NIBBLE_BLOCK_BYTES);
        let v = _mm_loadu_si128(p as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let zv = _mm_set1_epi8(z as i8);
        let lo = _mm_sub_epi8(_mm_and_si128(v, mask), zv);
        let hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16::<4>(v), mask), zv);
        let [a, b2] = i8x16_to_ps(lo);
        let [c, d] = i8x16_to_ps(hi);
        [a, b2, c, d]
    }
    const FACTOR: f32 = 1.0;
    const BLOCK_BYTES: usize = NIBBLE_BLOCK_BYTES;
    fn w(&self) -> &PackedWeight {
        self.0
    }
}

impl Block for Int8<'_> {
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block_raw(&self, row: *const u8, b: usize, z: i32) -> [__m256; 4] {
        let p = row.add(b * NIBBLE_BLOCK);
        let zv = _mm256_set1_epi32(z);
        let mut out = [_mm256_setzero_ps(); 4];
        for (i, o) in out.iter_mut().enumerate() {
            let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8 * i) as *const __m128i));
            *o = _mm256_cvtepi32_ps(_mm256_sub_epi32(q, zv));
        }
        out
    }
    const FACTOR: f32 = 1.0;
    const BLOCK_BYTES: usize = NIBBLE_BLOCK;
    fn w(&self) -> &PackedWeight {
        self.0
    }
}

impl Block for Fp8<'_> {
    /// E4M3 → FP16 by bits, then F16C's exact conversion to FP32: the byte `b` moved to the
    /// high half of a 16-bit lane and shifted right arithmetically by one puts the sign in bit
    /// 15 and the 7 exponent/mantissa bits in bits 7..=13 (bit 14, a copy of the sign, is
    /// cleared). Read as FP16 that is the E4M3 value times `2^-8` — subnormals included, which
    /// FP16 represents and F16C converts without a microcode assist — so the scale is multiplied
    /// by 256: the same real product `value · scale`, hence the same FP32 rounding.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block_raw(&self, row: *const u8, b: usize, z: i32) -> [__m256; 4] {
        let _ = z;
        let p = row.add(b * NIBBLE_BLOCK);
        let clear14 = _mm256_set1_epi16(!0x4000);
        // Interleaving with zero bytes puts each byte in the high half of a 16-bit lane in one
        // in-lane µop (the former `vpmovzxbw` + `vpsllw` took two, one of them across lanes):
        // `lo` holds elements 0..8 (low 128 bits) and 16..24 (high), `hi` 8..16 and 24..32.
        let v = _mm256_loadu_si256(p as *const __m256i);
        let z = _mm256_setzero_si256();
        let lo = _mm256_and_si256(_mm256_srai_epi16::<1>(_mm256_unpacklo_epi8(z, v)), clear14);
        let hi = _mm256_and_si256(_mm256_srai_epi16::<1>(_mm256_unpackhi_epi8(z, v)), clear14);
        [
            _mm256_cvtph_ps(_mm256_castsi256_si128(lo)),
            _mm256_cvtph_ps(_mm256_castsi256_si128(hi)),
            _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(lo)),
            _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(hi)),
        ]
    }
    const FACTOR: f32 = 256.0;
    const BLOCK_BYTES: usize = NIBBLE_BLOCK;
    fn w(&self) -> &PackedWeight {
        self.0
    }
}

impl Block for Fp4<'_> {
    /// E2M1 → twice its value as an `i8` by a 16-entry byte shuffle (all E2M1 values are
    /// multiples of 0.5), then times `scale / 2`: the same real product as `value · scale`, so
    /// the same FP32 rounding (the sign of a zero aside).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block_raw(&self, row: *const u8, b: usize, z: i32) -> [__m256; 4] {
        let _ = z;
        let p = row.add(b * NIBBLE_BLOCK_BYTES);
        let v = _mm_loadu_si128(p as *const __m128i);
        let lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_shuffle_epi8(lut, _mm_and_si128(v, mask));
        let hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16::<4>(v), mask));
        let [a, b2] = i8x16_to_ps(lo);
        let [c, d] = i8x16_to_ps(hi);
        [a, b2, c, d]
    }
    const FACTOR: f32 = 0.5;
    const BLOCK_BYTES: usize = NIBBLE_BLOCK_BYTES;
    fn w(&self) -> &PackedWeight {
        self.0
    }
}

/// The largest of the eight lanes (for non-negative lanes, as the quantizers' `|x|`).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `yt[(r - r0) · m + i] = Σ_k x[i, k] · W[r, k]` for the rows `r0 .. r0 + yt.len() / m`.
///
/// # Safety
/// AVX2, FMA and F16C are available; `x.len() == m · k`; `yt.len()` is a multiple of `m` and the rows
/// lie within the weight; the weight's group satisfies `group % 32 == 0 || group == k`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn rows<D: Block>(d: &D, x: &[f32], m: usize, r0: usize, yt: &mut [f32]) {
    let w = d.w();
    let k = w.k;
    let nb = yt.len() / m;
    let rb = w.row_bytes();
    let xp = x.as_ptr();
    if m == 1 {
        gemv(d, x, r0, yt);
        return;
    }
    yt.iter_mut().for_each(|v| *v = 0.0);
    let mut buf = vec![0f32; ROWS * KC];
    let mut k0 = 0;
    while k0 < k {
        let kc = KC.min(k - k0);
        // Decode rows r0.. for elements k0 .. k0 + kc.
        for j in 0..nb {
            let r = r0 + j;
            let out = buf.as_mut_ptr().add(j * KC);
            let full = kc / NIBBLE_BLOCK;
            let row = w.data.as_ptr().add(r * rb);
            let mut walk = GroupWalk::new(w, r, k0 / NIBBLE_BLOCK);
            for bi in 0..full {
                let (s, z) = walk.next();
                let wv = d.block(row, k0 / NIBBLE_BLOCK + bi, s, z);
                for (i, v) in wv.iter().enumerate() {
                    _mm256_storeu_ps(out.add(bi * NIBBLE_BLOCK + 8 * i), *v);
                }
            }
            for t in full * NIBBLE_BLOCK..kc {
                *out.add(t) = w.value(r, k0 + t);
            }
        }
        tile_all(&buf, xp.add(k0), k, m, nb, kc, yt);
        k0 += kc;
    }
}

/// Software prefetch distance of the FP32-activation GEMV, in bytes ahead in the weight stream
/// (rows of a task are contiguous, so it runs on into the next row): one prefetch per 64-byte line.
/// Cold weights, 4096 × 11008, two threads, load average 3.8–4.6 (medians of 15 interleaved
/// rounds, three runs each): W8 10.1–14.1 ms without, 8.6–9.2 ms with 2048, 9.0–9.8 ms with 4096;
/// FP8 10.5–14.1 / 9.2–9.9 / 8.7–10.3 ms. In cache it costs a few per cent.
const PF_GEMV: usize = 4096;

/// GEMV (`m == 1`): per scale group, four FP32 accumulators of unscaled values
/// ([`Block::block_raw`]) times the activations, then one multiply-add by the group's scale —
/// instead of a multiply per decoded element (in cache, one thread, 256 × 4096: 10–13 % faster
/// for int4 g64/g128, 22 % for int8, 13 % for FP8, 2–6 % for FP4 g32, minimum of 1001 interleaved
/// runs under load). Exact for an identity input as before: each product is `v · 1`, scaled once.
///
/// Tried and measured worse or no better on 2026-11-29 (cold weights, two threads, load average
/// 1.7–3.1, medians of 15–31 interleaved rounds, three runs each): two rows per pass, one
/// activation load feeding both (4096 × 11008: W8 5.05–6.04 ms against 5.72–6.44 ms; 4096 ×
/// 4096: W8 2.04–2.45 against 1.55–2.21 ms, FP4 up to 2× slower; the bench summary's 4-bit GEMVs
/// 2–4× slower); chunks of 4096 elements across the task's rows so that the activations of a
/// long row (44 KB at K = 11008) are read from L1 (4096 × 11008: W8 minimum 3.1–3.4 ms against
/// 2.6–2.8 ms, CPU time 8.6–9.6 against 6.9–8.1 ms).
///
/// # Safety
/// As [`rows`] with `m == 1`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv<D: Block>(d: &D, x: &[f32], r0: usize, yt: &mut [f32]) {
    let w = d.w();
    let k = w.k;
    let kb = k / NIBBLE_BLOCK;
    let rb = w.row_bytes();
    let gpr = w.groups_per_row();
    let bpg = if w.group == k { kb.max(1) } else { w.group / NIBBLE_BLOCK };
    let xp = x.as_ptr();
    for (j, y) in yt.iter_mut().enumerate() {
        let r = r0 + j;
        let row = w.data.as_ptr().add(r * rb);
        let mut acc = [_mm256_setzero_ps(); 4];
        let (mut b, mut g) = (0, 0);
        while b < kb {
            let end = (b + bpg).min(kb);
            let z = w.zero(r, g);
            let mut ag = [_mm256_setzero_ps(); 4];
            while b < end {
                if PF_GEMV > 0 && (b * D::BLOCK_BYTES) % 64 == 0 {
                    // May point past the weight: a prefetch never faults, and wrapping_add keeps
                    // the pointer arithmetic defined.
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(b * D::BLOCK_BYTES + PF_GEMV) as *const i8);
                }
                let wv = d.block_raw(row, b, z);
                for i in 0..4 {
                    ag[i] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(b * NIBBLE_BLOCK + 8 * i)), wv[i], ag[i]);
                }
                b += 1;
            }
            let s = _mm256_set1_ps(w.scales[r * gpr + g] * D::FACTOR);
            for i in 0..4 {
                acc[i] = _mm256_fmadd_ps(ag[i], s, acc[i]);
            }
            g += 1;
        }
        let mut s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        for kk in kb * NIBBLE_BLOCK..k {
            s += x[kk] * w.value(r, kk);
        }
        *y = s;
    }
}

/// Adds `Σ_t x[i, t] · buf[j, t]` (t < kc) to `yt[j · m + i]` for all rows `j < nb`, `i < m`.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_all(buf: &[f32], xp: *const f32, ldx: usize, m: usize, nb: usize, kc: usize, yt: &mut [f32]) {
    let mut i = 0;
    while i < m {
        let mr = (m - i).min(2);
        let mut j = 0;
        while j < nb {
            let nr = (nb - j).min(4);
            match (mr, nr) {
                (2, 4) => tile::<2, 4>(buf, xp, ldx, m, i, j, kc, yt),
                (1, 4) => tile::<1, 4>(buf, xp, ldx, m, i, j, kc, yt),
                (2, _) => tile::<2, 1>(buf, xp, ldx, m, i, j, kc, yt),
                _ => tile::<1, 1>(buf, xp, ldx, m, i, j, kc, yt),
            }
            j += if nr == 4 { 4 } else { 1 };
        }
        i += mr;
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const MR: usize, const NR: usize>(
    buf: &[f32],
    xp: *const f32,
    ldx: usize,
    m: usize,
    i0: usize,
    j0: usize,
    kc: usize,
    yt: &mut [f32],
) {
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    let bp = buf.as_ptr();
    let k8 = kc / 8 * 8;
    let mut t = 0;
    while t < k8 {
        let mut wv = [_mm256_setzero_ps(); NR];
        for (j, v) in wv.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(bp.add((j0 + j) * KC + t));
        }
        for (i, a) in acc.iter_mut().enumerate() {
            let xv = _mm256_loadu_ps(xp.add((i0 + i) * ldx + t));
            for j in 0..NR {
                a[j] = _mm256_fmadd_ps(xv, wv[j], a[j]);
            }
        }
        t += 8;
    }
    for (i, a) in acc.iter().enumerate() {
        for (j, v) in a.iter().enumerate() {
            let mut s = hsum(*v);
            for tt in k8..kc {
                s += *xp.add((i0 + i) * ldx + tt) * *bp.add((j0 + j) * KC + tt);
            }
            yt[(j0 + j) * m + i0 + i] += s;
        }
    }
}

/// Weight rows per panel of the broadcast kernel ([`panels`]): two `__m256` per inner element.
pub(crate) const NR: usize = 16;
/// Activation rows per register tile of [`panels`] (6 × 2 accumulators, two panel vectors and one
/// broadcast: 15 of the 16 `ymm` registers).
const MR: usize = 6;
/// Inner elements per panel chunk of [`panels`] (a multiple of 32): 256 × 16 × 4 B = 16 KiB, half
/// the L1 data cache, next to the `MR` activation rows the tile streams.
pub(crate) const KCP: usize = 256;

/// A k-major panel: `NR` weight rows of one chunk, element `t` of row `j` at `t · NR + j`.
#[repr(C, align(64))]
struct Panel([f32; KCP * NR]);

/// `y[i · ldy + j] = Σ_t x[i, t] · W[n0 + j, t]` for `i < m`, `j < nb`: the broadcast kernel for
/// `m > 1`. Per chunk of [`KCP`] inner elements and per panel of [`NR`] weight rows, the rows are
/// decoded once into a k-major [`Panel`] (exact dequantized values, by [`Block::block`] and an 8 × 8
/// transpose), then `MR × NR` register tiles run over all `m` activation rows: per inner element
/// two panel loads, `MR` broadcasts and `2 MR` FMAs, no horizontal sums; outputs go straight to
/// `y` (row-major), the first chunk from zero, later chunks added to what the earlier ones left.
///
/// # Safety
/// AVX2, FMA and F16C are available; `x.len() == m · k`; `n0 + nb <= n`, `nb > 0`, `ldy >= nb`,
/// `y.len() >= (m - 1) · ldy + nb`; the weight's group satisfies `group % 32 == 0 || group == k`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn panels<D: Block>(d: &D, x: &[f32], m: usize, n0: usize, nb: usize, y: &mut [f32], ldy: usize) {
    let k = d.w().k;
    let mut panel = Panel([0.0; KCP * NR]);
    let pp = panel.0.as_mut_ptr();
    let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
    let mut k0 = 0;
    while k0 < k {
        let kc = KCP.min(k - k0);
        let first = k0 == 0;
        let mut p0 = 0;
        while p0 < nb {
            let pn = NR.min(nb - p0);
            decode_panel(d, n0 + p0, pn, k0, kc, pp);
            let (xc, yc) = (xp.add(k0), yp.add(p0));
            let mut i = 0;
            if pn > 8 {
                // A rest of one or two rows goes with the last whole tile as 4 + 3 or 4 + 4 rows:
                // a 1- or 2-row tile loads as often per FMA as it multiplies.
                let tiles = if m > MR && matches!(m % MR, 1 | 2) { m / MR - 1 } else { m / MR };
                for _ in 0..tiles {
                    ptile::<MR, 2>(pp, kc, xc.add(i * k), k, yc.add(i * ldy), ldy, first, pn);
                    i += MR;
                }
                if m - i > MR - 1 {
                    ptile::<4, 2>(pp, kc, xc.add(i * k), k, yc.add(i * ldy), ldy, first, pn);
                    i += 4;
                }
                let (xc, yc) = (xc.add(i * k), yc.add(i * ldy));
                match m - i {
                    5 => ptile::<5, 2>(pp, kc, xc, k, yc, ldy, first, pn),
                    4 => ptile::<4, 2>(pp, kc, xc, k, yc, ldy, first, pn),
                    3 => ptile::<3, 2>(pp, kc, xc, k, yc, ldy, first, pn),
                    2 => ptile::<2, 2>(pp, kc, xc, k, yc, ldy, first, pn),
                    1 => ptile::<1, 2>(pp, kc, xc, k, yc, ldy, first, pn),
                    _ => {}
                }
            } else {
                // One vector of columns: twice the rows per tile for the same registers.
                const MR1: usize = 2 * MR;
                while i + MR1 <= m {
                    ptile::<MR1, 1>(pp, kc, xc.add(i * k), k, yc.add(i * ldy), ldy, first, pn);
                    i += MR1;
                }
                while i + 4 <= m {
                    ptile::<4, 1>(pp, kc, xc.add(i * k), k, yc.add(i * ldy), ldy, first, pn);
                    i += 4;
                }
                while i < m {
                    ptile::<1, 1>(pp, kc, xc.add(i * k), k, yc.add(i * ldy), ldy, first, pn);
                    i += 1;
                }
            }
            p0 += NR;
        }
        k0 += kc;
    }
}

/// In-register transpose of an 8 × 8 block of FP32.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// Decodes weight rows `r0 .. r0 + pn` (`pn <= NR`), elements `k0 .. k0 + kc`, into the k-major
/// panel at `pp` (element `t` of row `j` at `t · NR + j`): per 8 rows and 32-element block, the
/// rows' exact values ([`Block::block`]) through an L1 scratch and 8 × 8 transposes; the elements
/// after the last whole block by [`PackedWeight::value`]. Columns `pn ..` of the panel (rows past
/// the weight's end, or a second half of 8 that is not needed) hold copies of the last row or
/// stale values: each lane of the tile is independent, and those columns are never stored.
///
/// # Safety
/// As [`panels`]; `k0` is a multiple of 32, `k0 + kc <= k`, `kc <= KCP`, rows `r0 .. r0 + pn` exist,
/// `pp` points to a panel of `KCP · NR` floats.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_panel<D: Block>(d: &D, r0: usize, pn: usize, k0: usize, kc: usize, pp: *mut f32) {
    #[repr(C, align(32))]
    struct Scratch([[f32; NIBBLE_BLOCK]; 8]);
    let w = d.w();
    let rb = w.row_bytes();
    let full = kc / NIBBLE_BLOCK;
    let b0 = k0 / NIBBLE_BLOCK;
    let mut sc = Scratch([[0.0; NIBBLE_BLOCK]; 8]);
    let sp = sc.0.as_mut_ptr() as *mut f32;
    for h in 0..pn.div_ceil(8) {
        let rows: [usize; 8] = std::array::from_fn(|j| r0 + (8 * h + j).min(pn - 1));
        let mut walks: [GroupWalk; 8] = std::array::from_fn(|j| GroupWalk::new(w, rows[j], b0));
        for bi in 0..full {
            for j in 0..8 {
                let (s, z) = walks[j].next();
                let v = d.block(w.data.as_ptr().add(rows[j] * rb), b0 + bi, s, z);
                for (q, vq) in v.iter().enumerate() {
                    _mm256_store_ps(sp.add(j * NIBBLE_BLOCK + 8 * q), *vq);
                }
            }
            for q in 0..4 {
                let r: [__m256; 8] = std::array::from_fn(|j| _mm256_load_ps(sp.add(j * NIBBLE_BLOCK + 8 * q)));
                let c = transpose8(r);
                let o = pp.add((bi * NIBBLE_BLOCK + 8 * q) * NR + 8 * h);
                for (t, ct) in c.iter().enumerate() {
                    _mm256_store_ps(o.add(t * NR), *ct);
                }
            }
        }
        for t in full * NIBBLE_BLOCK..kc {
            for j in 0..8 {
                *pp.add(t * NR + 8 * h + j) = w.value(rows[j], k0 + t);
            }
        }
    }
}

/// One `R × (8 V)` register tile of [`panels`]: `y[i · ldy + j] (+)= Σ_{t < kc} x[i · ldx + t] ·
/// panel[t · NR + j]` for `i < R`, `j < cols.min(8 V)`, from zero when `first`.
///
/// # Safety
/// AVX2 + FMA available; `pp` a panel of `kc` filled elements; `x` rows `0 .. R` with stride `ldx`,
/// `kc` elements each; `y` rows `0 .. R` with stride `ldy`, `cols.min(8 V)` columns each.
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn ptile<const R: usize, const V: usize>(
    pp: *const f32,
    kc: usize,
    x: *const f32,
    ldx: usize,
    y: *mut f32,
    ldy: usize,
    first: bool,
    cols: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); V]; R];
    let whole = cols >= 8 * V;
    if !first {
        for i in 0..R {
            let yr = y.add(i * ldy);
            if whole {
                for v in 0..V {
                    acc[i][v] = _mm256_loadu_ps(yr.add(8 * v));
                }
            } else {
                let mut tmp = [0f32; 16];
                std::ptr::copy_nonoverlapping(yr, tmp.as_mut_ptr(), cols);
                for v in 0..V {
                    acc[i][v] = _mm256_loadu_ps(tmp.as_ptr().add(8 * v));
                }
            }
        }
    }
    for t in 0..kc {
        let b: [__m256; V] = std::array::from_fn(|v| _mm256_load_ps(pp.add(t * NR + 8 * v)));
        for i in 0..R {
            let a = _mm256_broadcast_ss(&*x.add(i * ldx + t));
            for v in 0..V {
                acc[i][v] = _mm256_fmadd_ps(a, b[v], acc[i][v]);
            }
        }
    }
    for i in 0..R {
        let yr = y.add(i * ldy);
        if whole {
            for v in 0..V {
                _mm256_storeu_ps(yr.add(8 * v), acc[i][v]);
            }
        } else {
            let mut tmp = [0f32; 16];
            for v in 0..V {
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8 * v), acc[i][v]);
            }
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), yr, cols);
        }
    }
}

/// INT8 × INT8 → INT32 dot products, added to `acc[j · m + i]` for rows `r0 + j` (`j < nb`) and
/// activation rows `i < m`, over inner elements `k0 .. k0 + kc` (`kc` a multiple of 32).
///
/// `maddubs` multiplies unsigned by signed bytes: the weight goes in as `|w|` (128 fits in a
/// `u8`) and the activation as `sign(x, w)`; activations are in `-127..=127`, so the negation never
/// overflows, and a pair sum is at most 2 · 128 · 127 < 2^15, so `maddubs` never saturates.
///
/// # Safety
/// AVX2 available; `xq.len() == m · k`, rows `r0 .. r0 + nb` exist in `wq` (row stride `k`),
/// `k0 + kc <= k`, `acc.len() == nb · m`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn i8_rows(wq: &[u8], xq: &[i8], k: usize, m: usize, r0: usize, nb: usize, k0: usize, kc: usize, acc: &mut [i32]) {
    let ones = _mm256_set1_epi16(1);
    let mut i = 0;
    while i < m {
        let mr = (m - i).min(2);
        let mut j = 0;
        while j < nb {
            let nr = (nb - j).min(4);
            let mut a = [[_mm256_setzero_si256(); 4]; 2];
            let mut t = 0;
            while t < kc {
                let mut wa = [_mm256_setzero_si256(); 4];
                let mut wv = [_mm256_setzero_si256(); 4];
                for jj in 0..nr {
                    wv[jj] = _mm256_loadu_si256(wq.as_ptr().add((r0 + j + jj) * k + k0 + t) as *const __m256i);
                    wa[jj] = _mm256_sign_epi8(wv[jj], wv[jj]);
                }
                for ii in 0..mr {
                    let xv = _mm256_loadu_si256(xq.as_ptr().add((i + ii) * k + k0 + t) as *const __m256i);
                    for jj in 0..nr {
                        let p = _mm256_maddubs_epi16(wa[jj], _mm256_sign_epi8(xv, wv[jj]));
                        a[ii][jj] = _mm256_add_epi32(a[ii][jj], _mm256_madd_epi16(p, ones));
                    }
                }
                t += 32;
            }
            for ii in 0..mr {
                for jj in 0..nr {
                    acc[(j + jj) * m + i + ii] += hsum_i32(a[ii][jj]);
                }
            }
            j += nr;
        }
        i += mr;
    }
}

/// Weight rows per register tile of [`i16_rows`] (a panel's rows come in tiles of this many).
pub(crate) const W8A8_NR: usize = 4;
/// Activation rows per register tile of [`i16_rows`].
pub(crate) const W8A8_MR: usize = 2;

/// INT16 × INT16 → INT32 dot products for W8A8 at `m` ≥ a few rows, on operands widened once:
/// adds, for weight rows `j < nb` and activation rows `i < m`, the eight INT32 lane sums of
/// `Σ_t x[i, t] · w[j, t]` (`t < kc`, one chunk) to `acc8[8 (j · m + i) ..][..8]`.
///
/// The activation chunk comes packed in `xpack` (`gemm::pack_x_i16`): tiles of [`W8A8_MR`] rows
/// (the last may be one row), tile starting at row `i` at offset `i · kc`, inside it step `s`
/// (16 elements) at `s · mr · 16`, row `ii` at `+ 16 ii`: each tile one sequential stream from
/// L2. Reading two unpacked rows `k` apart instead was about 10 % slower at 4096 × 4096, M = 128.
///
/// The weight chunk comes packed in `panel`: tiles of [`W8A8_NR`] rows (the last may be shorter,
/// `nr` rows), tile `jt` at offset `W8A8_NR · jt · kc`, inside it step `s` (16 elements) at
/// `s · nr · 16`, row `jj` of the tile at `+ 16 jj`. A 2 × 4 register tile (two activation
/// rows, four weight rows: eight accumulators, the four weight vectors, one activation vector,
/// one product: no spills in 16 ymm registers) runs `vpmaddwd`: 16 multiply-adds per µop, exact
/// (|products| ≤ 128 · 127, pair sums < 2^15), the same multiply-port cost per element as
/// `maddubs` + `madd` but no `sign` per pair. Measured (1024 × 4096, M = 128, one thread, CPU
/// time, median of 7, load average 3.5–3.9): 2 × 4 15.8–17.8 ms, 3 × 3 17.2–22.4 ms, 3 × 4
/// (spills one accumulator) 17.8–20.0 ms, the `i8_rows` 2 × 4 `maddubs` kernel 24.0–25.9 ms.
///
/// # Safety
/// AVX2 available; `kc` a multiple of 16; `panel.len() >= nb · kc`; `xpack.len() >= m · kc` in
/// the layout above; `acc8.len() == 8 · nb · m`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn i16_rows(panel: &[i16], nb: usize, kc: usize, xpack: &[i16], m: usize, acc8: &mut [i32]) {
    let mut j = 0;
    while j < nb {
        let nr = (nb - j).min(W8A8_NR);
        let wp = panel.as_ptr().add(j * kc);
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(W8A8_MR);
            let xp = xpack.as_ptr().add(i * kc);
            let ap = acc8.as_mut_ptr().add(8 * (j * m + i));
            match (mr, nr) {
                (2, 4) => i16_tile::<2, 4>(wp, xp, kc, m, ap),
                (1, 4) => i16_tile::<1, 4>(wp, xp, kc, m, ap),
                (2, 3) => i16_tile::<2, 3>(wp, xp, kc, m, ap),
                (1, 3) => i16_tile::<1, 3>(wp, xp, kc, m, ap),
                (2, 2) => i16_tile::<2, 2>(wp, xp, kc, m, ap),
                (1, 2) => i16_tile::<1, 2>(wp, xp, kc, m, ap),
                (2, _) => i16_tile::<2, 1>(wp, xp, kc, m, ap),
                _ => i16_tile::<1, 1>(wp, xp, kc, m, ap),
            }
            i += mr;
        }
        j += nr;
    }
}

/// Packs weight rows `r0 .. r0 + pn` (row stride `k` in `w`), elements `k0 .. k0 + kc`, into
/// `panel` as INT16 in [`i16_rows`]' layout (`vpmovsxbw` per 16 bytes).
///
/// # Safety
/// AVX2 available; `kc` a multiple of 16; `(r0 + pn) · k <= w.len()` and `k0 + kc <= k`;
/// `panel.len() >= pn · kc`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn pack_panel_i16(w: &[u8], k: usize, r0: usize, pn: usize, k0: usize, kc: usize, panel: &mut [i16]) {
    let mut j = 0;
    while j < pn {
        let nr = (pn - j).min(W8A8_NR);
        let tile = panel.as_mut_ptr().add(j * kc);
        for jj in 0..nr {
            let src = w.as_ptr().add((r0 + j + jj) * k + k0);
            let mut s = 0;
            while s < kc {
                let v = _mm256_cvtepi8_epi16(_mm_loadu_si128(src.add(s) as *const __m128i));
                _mm256_storeu_si256(tile.add(s * nr + 16 * jj) as *mut __m256i, v);
                s += 16;
            }
        }
        j += nr;
    }
}

/// One `MR × NR` tile of [`i16_rows`]: `wp` the tile's panel (`NR` rows), `xp` the packed
/// activation tile (`MR` rows interleaved per 16 elements), `ap` the lanes of output `(j0, i0)` (row stride
/// `8 m` per weight row, 8 per activation row).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn i16_tile<const MR: usize, const NR: usize>(wp: *const i16, xp: *const i16, kc: usize, m: usize, ap: *mut i32) {
    let mut a = [[_mm256_setzero_si256(); NR]; MR];
    let mut s = 0;
    while s < kc {
        let w = wp.add(s * NR);
        for ii in 0..MR {
            let xv = _mm256_loadu_si256(xp.add(s * MR + 16 * ii) as *const __m256i);
            for jj in 0..NR {
                let wv = _mm256_loadu_si256(w.add(16 * jj) as *const __m256i);
                a[ii][jj] = _mm256_add_epi32(a[ii][jj], _mm256_madd_epi16(xv, wv));
            }
        }
        s += 16;
    }
    for ii in 0..MR {
        for jj in 0..NR {
            let p = ap.add(8 * (jj * m + ii)) as *mut __m256i;
            _mm256_storeu_si256(p, _mm256_add_epi32(_mm256_loadu_si256(p), a[ii][jj]));
        }
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// Activations of one row prepared for the W4A8 kernels (see `gemm::matmul_w4a8`).
///
/// The int8 codes of blocks `2p` and `2p + 1` sit in 64 bytes ordered as the nibbles of a
/// 32-byte load of those two weight blocks come out of `and` / `shift`: elements 0..16 of both
/// blocks (the low nibbles), then elements 16..32 of both (the high nibbles). A missing last block
/// (odd block count) has codes 0 and scale 0.
pub(crate) struct W4a8Row<'a> {
    /// Interleaved codes, 64 per pair of blocks.
    pub xq: &'a [i8],
    /// Per pair of blocks, `[s(2p); 4]` then `[s(2p + 1); 4]`: the lanes of the pair's INT32 sums.
    pub xs8: &'a [f32],
    /// Per weight group `g`: `Σ_{b in g} s(b) · Σ q(b)`, for the zero-point term.
    pub gsum: &'a [f32],
}

/// Software prefetch distance of the W4A8 loop, in bytes ahead in each weight row stream (one
/// prefetch per 64-byte line). Streaming 4096 × 4096 from DRAM under load (weights evicted
/// before each call, minima of 41 interleaved runs): about 1.4 ms without, 0.8–1.0 ms with 2048
/// or 4096, 1.0 ms with 8192; on an idle machine it is unmeasured. The prefetch goes to L2
/// (`prefetcht1`), not L1: at K = 14336 the activation codes and scales (21 KiB) and two streams'
/// 4 KiB of prefetched lines do not fit the 32 KiB L1 together. Quiet machine, 2026-11-29 05:24,
/// x · W[4096×14336] g64, old and new binaries alternated four times (`w4_gemv`, medians of 9
/// rounds): cold 2.10–2.85 ms (T0) against 1.48–2.81 ms (T1; a 2 KiB distance 2.36–3.08 ms);
/// 4096 × 4096 cold 0.76–0.95 against 0.57–0.84 ms; ggml's protocol 1.10–1.29 against 1.01–1.20 ms.
const PF_W4A8: usize = 4096;

/// Prefetch offset, from the start of a row, for pair `p` of a loop over `r` rows at a time: `PF_W4A8`
/// bytes ahead, and past the row's end into the row this stream reads next (`r` rows on), not the
/// next row of the weight (which another stream of the same loop already reads).
#[inline(always)]
fn pf_off(p: usize, rb: usize, r: usize) -> usize {
    let o = 32 * p + PF_W4A8;
    if o >= rb {
        o + (r - 1) * rb
    } else {
        o
    }
}

/// Calls `step(p, half, prefetch)` for the pairs `p0 .. end` of a row with `full` whole pairs:
/// the whole ones two at a time, `prefetch` on the first of each two (one software prefetch per
/// 64-byte line and stream), then the half pair (`p == full`, an odd block count) if it is in the
/// range — no per-pair branch in the loop. Returns `end`.
#[inline(always)]
fn walk_pairs(p0: usize, end: usize, full: usize, mut step: impl FnMut(usize, bool, bool)) -> usize {
    let whole = end.min(full);
    let mut p = p0;
    while p + 2 <= whole {
        step(p, false, true);
        step(p + 1, false, false);
        p += 2;
    }
    if p < whole {
        step(p, false, true);
        p += 1;
    }
    if p < end {
        step(p, true, p.is_multiple_of(2));
    }
    end
}

/// How the weight's scale groups fall on pairs of 32-element blocks.
#[derive(Clone, Copy)]
pub(crate) enum PairGroups {
    /// Whole pairs per group (`group % 64 == 0`) or one group per row: FP32 sums per group, the
    /// weight scale applied once per group.
    PerGroup {
        /// Pairs per group (`usize::MAX` for one group per row).
        pairs: usize,
    },
    /// An odd number of blocks per group (`group % 64 == 32`): a pair may straddle two groups, so
    /// each pair gets a vector of its two blocks' weight scales.
    PerBlock {
        /// Blocks per group.
        blocks: usize,
    },
}

/// Σ over the 64 elements of a pair of blocks of `nibble · x`, as eight INT32 lanes (lanes 0..4
/// block `2p`, lanes 4..8 block `2p + 1`). `maddubs` multiplies the unsigned nibbles (0..=15) by
/// the signed codes (|x| ≤ 127): pair sums ≤ 2 · 15 · 127, the sum of two ≤ 7620, so no INT16
/// saturation; the result is exact.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn pair_dot(v: __m256i, xa: __m256i, xb: __m256i) -> __m256i {
    let mask = _mm256_set1_epi8(0x0F);
    let lo = _mm256_and_si256(v, mask);
    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
    let s = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xa), _mm256_maddubs_epi16(hi, xb));
    _mm256_madd_epi16(s, _mm256_set1_epi16(1))
}

/// The 32 bytes of pair `p` of a row: both blocks, or the last block and zeros when `half`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn load_pair(row: *const u8, p: usize, half: bool) -> __m256i {
    if half {
        _mm256_set_m128i(_mm_setzero_si128(), _mm_loadu_si128(row.add(32 * p) as *const __m128i))
    } else {
        _mm256_loadu_si256(row.add(32 * p) as *const __m256i)
    }
}

/// `Σ_g scale[g] · zero[g] · gsum[g]` over the `gpr` groups of one row (zero point 8 when `zeros`
/// is `None`).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn zero_term(scales: *const f32, zeros: Option<*const u8>, gsum: *const f32, gpr: usize) -> f32 {
    let g8 = gpr / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    let mut g = 0;
    while g < g8 {
        let mut s = _mm256_loadu_ps(scales.add(g));
        if let Some(z) = zeros {
            s = _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(z.add(g) as *const __m128i))));
        }
        acc = _mm256_fmadd_ps(s, _mm256_loadu_ps(gsum.add(g)), acc);
        g += 8;
    }
    let mut t = hsum(acc);
    if zeros.is_none() {
        t *= 8.0;
    }
    for g in g8..gpr {
        let z = zeros.map_or(8.0, |z| f32::from(*z.add(g)));
        t += *scales.add(g) * z * *gsum.add(g);
    }
    t
}

/// W4A8 dot products of `R` consecutive weight rows `r ..= r + R - 1` with one prepared activation
/// row: `Σ_b s_w(b) · s_x(b) · Σ_t (u_t - z) · q_t`, computed as the unsigned-nibble sums per
/// block minus the zero-point term `Σ_g s_w(g) · z(g) · gsum(g)`.
///
/// # Safety
/// AVX2 + FMA available; `w` is int4 with `mode` matching its group; rows `r .. r + R` exist;
/// `x` was prepared for `w.k` and `w.group`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn w4a8_dot<const R: usize>(w: &PackedWeight, r: usize, x: &W4a8Row, mode: PairGroups) -> [f32; R] {
    let kb = w.k.div_ceil(NIBBLE_BLOCK);
    let (full, odd) = (kb / 2, kb % 2 == 1);
    let pairs = full + usize::from(odd);
    let rb = w.row_bytes();
    let gpr = w.groups_per_row();
    let mut wp = [std::ptr::null::<u8>(); R];
    let mut sp = [std::ptr::null::<f32>(); R];
    for j in 0..R {
        wp[j] = w.data.as_ptr().add((r + j) * rb);
        sp[j] = w.scales.as_ptr().add((r + j) * gpr);
    }
    let (xq, xs) = (x.xq.as_ptr(), x.xs8.as_ptr());
    let mut acc = [_mm256_setzero_ps(); R];
    // Pair `p`'s INT32 lane sums of the R rows as FP32, times the activation scales
    // (one prefetch per row when `pf`, i.e. every second pair: one per 64-byte line).
    let dots = |p: usize, half: bool, pf: bool| {
        let xa = _mm256_loadu_si256(xq.add(64 * p) as *const __m256i);
        let xb = _mm256_loadu_si256(xq.add(64 * p + 32) as *const __m256i);
        let s = _mm256_loadu_ps(xs.add(8 * p));
        let mut d = [_mm256_setzero_ps(); R];
        for j in 0..R {
            if pf {
                // May point past the weight: a prefetch never faults, and wrapping_add
                // keeps the pointer arithmetic defined.
                _mm_prefetch::<_MM_HINT_T1>(wp[j].wrapping_add(pf_off(p, rb, R)) as *const i8);
            }
            d[j] = _mm256_cvtepi32_ps(pair_dot(load_pair(wp[j], p, half), xa, xb));
        }
        (d, s)
    };
    match mode {
        PairGroups::PerGroup { pairs: ppg } => {
            if ppg == 1 {
                // Groups of 64: the weight scale folds into the pair's activation scales, one
                // multiply-add per pair and row, no group loop.
                walk_pairs(0, pairs, full, |p, half, pf| {
                    let (d, s) = dots(p, half, pf);
                    for j in 0..R {
                        acc[j] = _mm256_fmadd_ps(d[j], _mm256_mul_ps(s, _mm256_broadcast_ss(&*sp[j].add(p))), acc[j]);
                    }
                });
            } else {
                let mut p = 0;
                for g in 0..gpr {
                    let end = if g + 1 == gpr { pairs } else { p + ppg };
                    let mut ag = [_mm256_setzero_ps(); R];
                    p = walk_pairs(p, end, full, |p, half, pf| {
                        let (d, s) = dots(p, half, pf);
                        for j in 0..R {
                            ag[j] = _mm256_fmadd_ps(d[j], s, ag[j]);
                        }
                    });
                    for j in 0..R {
                        acc[j] = _mm256_fmadd_ps(ag[j], _mm256_broadcast_ss(&*sp[j].add(g)), acc[j]);
                    }
                }
            }
        }
        PairGroups::PerBlock { blocks } => {
            let (mut g, mut left) = (0usize, blocks);
            for p in 0..pairs {
                let half = odd && p == full;
                let g0 = g;
                left -= 1;
                if left == 0 {
                    g += 1;
                    left = blocks;
                }
                let g1 = if half { g0 } else { g };
                if !half {
                    left -= 1;
                    if left == 0 {
                        g += 1;
                        left = blocks;
                    }
                }
                let (d, s) = dots(p, half, p % 2 == 0);
                for j in 0..R {
                    let ws = _mm256_blend_ps::<0xF0>(_mm256_broadcast_ss(&*sp[j].add(g0)), _mm256_broadcast_ss(&*sp[j].add(g1)));
                    acc[j] = _mm256_fmadd_ps(d[j], _mm256_mul_ps(s, ws), acc[j]);
                }
            }
        }
    }
    let mut out = [0f32; R];
    for j in 0..R {
        let zeros = w.zeros.as_ref().map(|z| z.as_ptr().add((r + j) * gpr));
        out[j] = hsum(acc[j]) - zero_term(sp[j], zeros, x.gsum.as_ptr(), gpr);
    }
    out
}

/// W4A8: `yt[(r - r0) · m + i]` for the weight rows `r0 .. r0 + yt.len() / m` and the `m`
/// prepared activation rows, two weight rows at a time (one activation load feeds both; one, two
/// or four rows measured the same, within the noise of a loaded machine, at 4096 × 4096).
///
/// # Safety
/// AVX2 + FMA available; `w` is int4 with `mode` matching its group; `xs.len() == m`, each
/// prepared for `w`; `yt.len()` is a multiple of `m` and the rows lie within the weight.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn w4a8_rows(w: &PackedWeight, xs: &[W4a8Row], mode: PairGroups, r0: usize, yt: &mut [f32]) {
    const R: usize = 2;
    let m = xs.len();
    let nb = yt.len() / m;
    let mut j = 0;
    while j + R <= nb {
        for (i, x) in xs.iter().enumerate() {
            let o = w4a8_dot::<R>(w, r0 + j, x, mode);
            for (jj, v) in o.iter().enumerate() {
                yt[(j + jj) * m + i] = *v;
            }
        }
        j += R;
    }
    while j < nb {
        for (i, x) in xs.iter().enumerate() {
            yt[j * m + i] = w4a8_dot::<1>(w, r0 + j, x, mode)[0];
        }
        j += 1;
    }
}

/// Block-wise activation quantization, the AVX2 version of `gemm::quantize_blocks` for whole
/// 32-element blocks (the tail block goes to the portable code): the same IEEE operations (exact
/// `max |x|`, `amax / 127`, a correctly rounded division, round-half-even, clamp), so the same codes.
///
/// # Safety
/// AVX2 + FMA available; `codes.len() == x.len()`, `scales.len() == x.len().div_ceil(32)`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn quantize_blocks_avx2(x: &[f32], codes: &mut [i8], scales: &mut [f32]) {
    let full = x.len() / NIBBLE_BLOCK;
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    for b in 0..full {
        let p = x.as_ptr().add(b * NIBBLE_BLOCK);
        let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
        let amax = hmax(_mm256_max_ps(
            _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)),
            _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)),
        ));
        let d = amax / 127.0;
        let s = if d > 0.0 { d } else { 1.0 };
        scales[b] = s;
        _mm256_storeu_si256(codes.as_mut_ptr().add(b * NIBBLE_BLOCK) as *mut __m256i, codes32(v, s));
    }
    let t = full * NIBBLE_BLOCK;
    crate::gemm::quantize_blocks(&x[t..], &mut codes[t..], &mut scales[full..]);
}

/// The 32 codes `clamp(round_ties_even(v / s), -127, 127)` of four vectors, in order: a correctly
/// rounded division, round-half-even, clamp, as the portable `(v / s).round_ties_even().clamp(..)`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn codes32(v: [__m256; 4], s: f32) -> __m256i {
    let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let sv = _mm256_set1_ps(s);
    let mut q = [_mm256_setzero_si256(); 4];
    for (q, v) in q.iter_mut().zip(v) {
        let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_div_ps(v, sv));
        *q = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    }
    let packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_permutevar8x32_epi32(packed, order)
}

/// Per-row activation quantization for W8A8, the AVX2 version of the loop in
/// `gemm::quantize_activations`: the row's `max |x|` (exact in any order), `scale = amax / 127`
/// (1 for an all-zero row), codes as [`codes32`] (the tail element by element, as the portable
/// code), so the same codes and scale bit for bit. Returns the scale.
///
/// # Safety
/// AVX2 + FMA available; `codes.len() == x.len()`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn quantize_row_avx2(x: &[f32], codes: &mut [i8]) -> f32 {
    let full = x.len() / NIBBLE_BLOCK;
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let mut mv = _mm256_setzero_ps();
    for b in 0..full {
        let p = x.as_ptr().add(b * NIBBLE_BLOCK);
        for i in 0..4 {
            mv = _mm256_max_ps(mv, _mm256_and_ps(_mm256_loadu_ps(p.add(8 * i)), abs));
        }
    }
    let mut amax = hmax(mv);
    for v in &x[full * NIBBLE_BLOCK..] {
        amax = amax.max(v.abs());
    }
    let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
    for b in 0..full {
        let p = x.as_ptr().add(b * NIBBLE_BLOCK);
        let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
        _mm256_storeu_si256(codes.as_mut_ptr().add(b * NIBBLE_BLOCK) as *mut __m256i, codes32(v, s));
    }
    for (c, v) in codes[full * NIBBLE_BLOCK..].iter_mut().zip(&x[full * NIBBLE_BLOCK..]) {
        *c = (v / s).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    s
}
