//! libtorch-backed paths: FP32 references, libtorch's own low-bit ops (for comparison on CPU,
//! and the fast path on CUDA), and [`QLinear`], one quantized linear layer whose device is
//! chosen at run time.
//!
//! On CPU libtorch's low-bit ops are slower than its FP32 matmul on this project's machines
//! (see the README), so [`QLinear`] on CPU runs this crate's native kernels. On CUDA it uses
//! `_weight_int8pack_mm` (symmetric per-channel int8) and `_weight_int4pack_mm` (int4 with
//! groups of 32–256; BF16 activations, as the op requires), and otherwise the dequantized
//! weight with an FP32 matmul on the device: the weight-only result, equal to fake
//! quantization up to the op's rounding.
//!
//! Two more ops quantize the activations too, as [`crate::matmul_w8a8`] does on CPU:
//! [`LibtorchOp::IntMm`] (`_int_mm`, INT8 × INT8 → INT32; the same per-row INT8 activations as
//! `matmul_w8a8`, so the same result) and [`LibtorchOp::ScaledMm`] (`_scaled_mm`, FP8 E4M3 ×
//! FP8 E4M3 with FP32 accumulation; activations rounded to E4M3 with one scale per tensor,
//! `amax / 448`). They run on CPU too (slowly: libtorch's CPU versions are reference code) and are
//! the fast W8A8 / FP8 paths on CUDA, where cuBLASLt needs `m > 16` (rows are padded with zeros),
//! `k` and `n` multiples of 8 (`_int_mm`) or 16 (`_scaled_mm`).

use crate::error::{shape, KernelError, Result};
use crate::gemm::matmul;
use crate::pack::{PackedWeight, WeightFormat};
use tch::{Device, Kind, Tensor};

/// The dequantized weight `[n, k]` as an FP32 CPU tensor (the reference the kernels match).
pub fn dequantized_tensor(w: &PackedWeight) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(&w.dequantize())?.f_reshape([w.n as i64, w.k as i64])?)
}

/// Whether libtorch sees a CUDA device.
pub fn cuda_available() -> bool {
    tch::Cuda::is_available()
}

/// Which libtorch op a [`LibtorchWeight`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LibtorchOp {
    /// `x · Wᵀ` with the dequantized FP32 weight.
    Fp32,
    /// `_weight_int8pack_mm(x, W_int8[n, k], scales[n])`.
    Int8Pack,
    /// `_weight_int4pack_mm_for_cpu` (CPU) / `_weight_int4pack_mm` (CUDA) with
    /// `scales_and_zeros[k / group, n, 2]`.
    Int4Pack,
    /// W8A8: `_int_mm(x_int8[m, k], W_int8ᵀ)` → INT32, times `scale_x[i] · scale_w[r]`; the
    /// activations quantized per row as [`crate::quantize_activations`] does (symmetric,
    /// `amax / 127`, round half to even), so the result equals [`crate::matmul_w8a8`]'s.
    /// Symmetric int8 per channel.
    IntMm,
    /// FP8: `_scaled_mm(x_e4m3[m, k], W_e4m3ᵀ, scale_x, 1)` → FP32, times the weight's per-channel
    /// scales; the activations rounded to E4M3 with one scale per tensor, `amax / 448` (1 for an
    /// all-zero input). FP8 E4M3 per channel.
    ScaledMm,
}

/// Largest finite E4M3 value.
const E4M3_MAX: f64 = 448.0;

/// A weight prepared for one of libtorch's ops on a device.
#[derive(Debug)]
pub struct LibtorchWeight {
    op: LibtorchOp,
    weight: Tensor,
    aux: Option<Tensor>,
    group: i64,
}

impl LibtorchWeight {
    /// Prepares `w` for `op` on `device`. Errors when the op does not support the weight's format
    /// or layout (int8pack: symmetric int8 per channel; int4pack: int4 with a group of 32, 64,
    /// 128 or 256 and `k` a multiple of 64 · 16 on CUDA / of the group on CPU).
    pub fn new(w: &PackedWeight, op: LibtorchOp, device: Device) -> Result<Self> {
        let (n, k) = (w.n as i64, w.k as i64);
        match op {
            LibtorchOp::Fp32 => Ok(LibtorchWeight { op, weight: dequantized_tensor(w)?.f_to_device(device)?, aux: None, group: 0 }),
            LibtorchOp::Int8Pack | LibtorchOp::IntMm => {
                if w.format != (WeightFormat::Int8 { asymmetric: false }) || w.group != w.k {
                    return Err(KernelError::Unsupported(format!(
                        "{} needs symmetric int8 per channel, got {} with group {} of {}",
                        op.name(),
                        w.format,
                        w.group,
                        w.k
                    )));
                }
                if op == LibtorchOp::IntMm && device.is_cuda() && (!w.k.is_multiple_of(8) || !w.n.is_multiple_of(8)) {
                    return Err(KernelError::Unsupported(format!("_int_mm on CUDA needs k and n multiples of 8, got n {} k {}", w.n, w.k)));
                }
                let codes: Vec<i8> = w.data.iter().map(|&b| b as i8).collect();
                let weight = Tensor::f_from_slice(&codes)?.f_reshape([n, k])?.f_to_device(device)?;
                let aux = Tensor::f_from_slice(&w.scales)?.f_to_device(device)?;
                Ok(LibtorchWeight { op, weight, aux: Some(aux), group: 0 })
            }
            LibtorchOp::ScaledMm => {
                if w.format != WeightFormat::Fp8E4M3 || w.group != w.k {
                    return Err(KernelError::Unsupported(format!(
                        "_scaled_mm needs FP8 E4M3 per channel, got {} with group {} of {}",
                        w.format, w.group, w.k
                    )));
                }
                if device.is_cuda() && (!w.k.is_multiple_of(16) || !w.n.is_multiple_of(16)) {
                    return Err(KernelError::Unsupported(format!(
                        "_scaled_mm on CUDA needs k and n multiples of 16, got n {} k {}",
                        w.n, w.k
                    )));
                }
                // The packed bytes are E4M3 bit patterns: reinterpret, do not convert.
                let weight = Tensor::f_from_slice(&w.data)?.f_reshape([n, k])?.f_view_dtype(Kind::Float8e4m3fn)?.f_to_device(device)?;
                let aux = Tensor::f_from_slice(&w.scales)?.f_to_device(device)?;
                Ok(LibtorchWeight { op, weight, aux: Some(aux), group: 0 })
            }
            LibtorchOp::Int4Pack => {
                if !matches!(w.format, WeightFormat::Int4 { .. }) || ![32, 64, 128, 256].contains(&w.group) {
                    return Err(KernelError::Unsupported(format!(
                        "_weight_int4pack_mm needs int4 with a group of 32, 64, 128 or 256, got {} with group {}",
                        w.format, w.group
                    )));
                }
                // tinygemm convention: w = (q - 8) · scale + zero, with q the unsigned nibble.
                let (codes, _) = w.unpack_int()?;
                let asym = w.format.has_zero_point();
                let u: Vec<i32> = codes.iter().map(|&c| if asym { c } else { c + 8 }).collect();
                let gpr = w.groups_per_row();
                let mut sz = vec![0f32; gpr * w.n * 2];
                for r in 0..w.n {
                    for g in 0..gpr {
                        let s = w.scales[r * gpr + g];
                        let z = w.zero(r, g);
                        sz[(g * w.n + r) * 2] = s;
                        sz[(g * w.n + r) * 2 + 1] = (8 - z) as f32 * s;
                    }
                }
                let ut = Tensor::f_from_slice(&u)?.f_reshape([n, k])?;
                let szt = Tensor::f_from_slice(&sz)?.f_reshape([gpr as i64, n, 2])?;
                let (weight, aux) = if device == Device::Cpu {
                    (ut.f_internal_convert_weight_to_int4pack_for_cpu(2)?, szt)
                } else {
                    // CUDA takes [n, k/2] uint8, element 2j in the high nibble.
                    let even = ut.f_slice(1, 0, k, 2)?;
                    let odd = ut.f_slice(1, 1, k, 2)?;
                    let packed = even.f_bitwise_left_shift_tensor_scalar(4)?.f_bitwise_or_tensor(&odd)?.f_to_kind(Kind::Uint8)?;
                    (
                        packed.f_to_device(device)?.f_internal_convert_weight_to_int4pack(8)?,
                        szt.f_to_kind(Kind::BFloat16)?.f_to_device(device)?,
                    )
                };
                Ok(LibtorchWeight { op, weight, aux: Some(aux), group: w.group as i64 })
            }
        }
    }

    /// The op this weight runs.
    pub fn op(&self) -> LibtorchOp {
        self.op
    }

    /// `x · Wᵀ` for `x` `[m, k]` on the weight's device (converted to BF16 for int4pack on
    /// CUDA); the result is FP32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match (self.op, &self.aux) {
            (LibtorchOp::Fp32, _) => x.f_matmul(&self.weight.f_tr()?)?,
            (LibtorchOp::Int8Pack, Some(s)) => x.f_internal_weight_int8pack_mm(&self.weight, s)?,
            (LibtorchOp::Int4Pack, Some(sz)) if self.weight.device() == Device::Cpu => {
                x.f_internal_weight_int4pack_mm_for_cpu(&self.weight, self.group, sz)?
            }
            (LibtorchOp::Int4Pack, Some(sz)) => x.f_to_kind(Kind::BFloat16)?.f_internal_weight_int4pack_mm(&self.weight, self.group, sz)?,
            (LibtorchOp::IntMm, Some(sw)) => {
                let x = x.f_to_kind(Kind::Float)?;
                // Per row: scale amax / 127 (1 for an all-zero row), codes round_half_even(x / s)
                // clamped to ±127 — the same FP32 operations as `quantize_activations`.
                let amax = x.f_abs()?.f_amax([1i64].as_slice(), true)?;
                let sx = amax.f_div_scalar(127.0)?.f_where_scalarother(&amax.f_gt(0.0)?, 1.0)?;
                let q = x.f_div(&sx)?.f_round()?.f_clamp(-127.0, 127.0)?.f_to_kind(Kind::Int8)?;
                let acc = pad_rows(&q, 17)?.f_internal_int_mm(&self.weight.f_tr()?)?.f_narrow(0, 0, q.size()[0])?;
                // acc · (scale_x · scale_w), as `matmul_w8a8`.
                acc.f_to_kind(Kind::Float)?.f_mul(&sx.f_mul(&sw.f_unsqueeze(0)?)?)?
            }
            (LibtorchOp::ScaledMm, Some(sw)) => {
                let x = x.f_to_kind(Kind::Float)?;
                let amax = x.f_abs()?.f_max()?;
                let sx = amax.f_div_scalar(E4M3_MAX)?;
                let sx = sx.f_where_scalarother(&amax.f_gt(0.0)?, 1.0)?;
                let q = x.f_div(&sx)?.f_to_kind(Kind::Float8e4m3fn)?;
                let m = q.size()[0];
                let one = Tensor::f_ones([], (Kind::Float, x.device()))?;
                let y = pad_rows(&q, (m + 15) / 16 * 16)?.f_internal_scaled_mm(
                    &self.weight.f_tr()?,
                    &sx,
                    &one,
                    None::<Tensor>,
                    None::<Tensor>,
                    Kind::Float,
                    false,
                )?;
                y.f_narrow(0, 0, m)?.f_mul(&sw.f_unsqueeze(0)?)?
            }
            _ => return Err(KernelError::Unsupported("libtorch weight without its scales".into())),
        };
        Ok(y.f_to_kind(Kind::Float)?)
    }
}

impl LibtorchOp {
    /// The libtorch op's name.
    pub fn name(self) -> &'static str {
        match self {
            LibtorchOp::Fp32 => "matmul (FP32)",
            LibtorchOp::Int8Pack => "_weight_int8pack_mm",
            LibtorchOp::Int4Pack => "_weight_int4pack_mm",
            LibtorchOp::IntMm => "_int_mm",
            LibtorchOp::ScaledMm => "_scaled_mm",
        }
    }
}

/// `t` (`[m, k]`) with zero rows appended up to `rows` on CUDA (cuBLASLt's low-bit GEMMs need
/// `m > 16`, FP8 a multiple of 16); `t` itself on CPU or when it has enough rows.
fn pad_rows(t: &Tensor, rows: i64) -> Result<Tensor> {
    let m = t.size()[0];
    if !t.device().is_cuda() || m >= rows {
        return Ok(t.shallow_clone());
    }
    Ok(t.f_constant_pad_nd([0i64, 0, 0, rows - m].as_slice())?)
}

/// A quantized linear layer without bias, `y = x · Wᵀ`, on a device chosen at run time: native
/// kernels on CPU, libtorch's ops on CUDA (see the module docs).
#[derive(Debug)]
pub struct QLinear {
    w: PackedWeight,
    device: Device,
    cuda: Option<LibtorchWeight>,
}

impl QLinear {
    /// Prepares `w` for `device` (`Device::Cpu` or `Device::Cuda(i)`).
    pub fn new(w: PackedWeight, device: Device) -> Result<Self> {
        let cuda = match device {
            Device::Cpu => None,
            Device::Cuda(_) if cuda_available() => {
                let op = match w.format {
                    WeightFormat::Int8 { asymmetric: false } if w.group == w.k => LibtorchOp::Int8Pack,
                    WeightFormat::Int4 { .. } if [32, 64, 128, 256].contains(&w.group) => LibtorchOp::Int4Pack,
                    _ => LibtorchOp::Fp32,
                };
                // Not every build has every low-bit op for CUDA (or for this GPU): probe once
                // and fall back to the dequantized FP32 weight.
                let probe = |lw: &LibtorchWeight| lw.forward(&Tensor::f_zeros([1, w.k as i64], (Kind::Float, device))?);
                match LibtorchWeight::new(&w, op, device) {
                    Ok(lw) if probe(&lw).is_ok() => Some(lw),
                    _ => Some(LibtorchWeight::new(&w, LibtorchOp::Fp32, device)?),
                }
            }
            d => return Err(KernelError::Unsupported(format!("device {d:?} is not available (libtorch sees no CUDA device)"))),
        };
        Ok(QLinear { w, device, cuda })
    }

    /// The packed weight.
    pub fn weight(&self) -> &PackedWeight {
        &self.w
    }

    /// The libtorch op the layer runs on CUDA (`None` on CPU: native kernels).
    pub fn libtorch_op(&self) -> Option<LibtorchOp> {
        self.cuda.as_ref().map(LibtorchWeight::op)
    }

    /// The device the layer runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// `x · Wᵀ` for `x` `[m, k]` (any float dtype; moved to the layer's device); FP32 `[m, n]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let sz = x.size();
        if sz.len() != 2 || sz[1] != self.w.k as i64 || sz[0] < 1 {
            return Err(shape("QLinear input", format!("[m, {}] with m >= 1", self.w.k), format!("{sz:?}")));
        }
        if let Some(t) = &self.cuda {
            return t.forward(&x.f_to_device(self.device)?);
        }
        let m = sz[0] as usize;
        let xs: Vec<f32> = Vec::<f32>::try_from(x.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?.f_view([-1])?)?;
        let mut y = vec![0f32; m * self.w.n];
        matmul(&xs, m, &self.w, &mut y)?;
        Ok(Tensor::f_from_slice(&y)?.f_reshape([m as i64, self.w.n as i64])?)
    }
}
