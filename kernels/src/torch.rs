//! libtorch-backed paths: FP32 references, libtorch's own low-bit ops (for comparison on CPU,
//! and the fast path on CUDA), and [`QLinear`], one quantized linear layer whose device is
//! chosen at run time.
//!
//! On CPU libtorch's low-bit ops are slower than its FP32 matmul on this project's machines
//! (see the README), so [`QLinear`] on CPU runs this crate's native kernels. On CUDA it uses
//! `_weight_int8pack_mm` (symmetric per-channel int8) and `_weight_int4pack_mm` (int4 with
//! groups of 32–256; BF16 activations, as the op requires), and otherwise the dequantized
//! weight with an FP32 matmul on the device.

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
}

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
            LibtorchOp::Int8Pack => {
                if w.format != (WeightFormat::Int8 { asymmetric: false }) || w.group != w.k {
                    return Err(KernelError::Unsupported(format!(
                        "_weight_int8pack_mm needs symmetric int8 per channel, got {}",
                        w.format
                    )));
                }
                let codes: Vec<i8> = w.data.iter().map(|&b| b as i8).collect();
                let weight = Tensor::f_from_slice(&codes)?.f_reshape([n, k])?.f_to_device(device)?;
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
            _ => return Err(KernelError::Unsupported("libtorch weight without its scales".into())),
        };
        Ok(y.f_to_kind(Kind::Float)?)
    }
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
