//! Cheaper or more direct sensitivity measures, for research and for checking the curvature
//! estimates against the truth.
//!
//! - **Empirical Fisher trace**: (1/N) Σ_n ‖∇_i ℓ_n‖², from single-sample gradients. It equals the
//!   Gauss–Newton trace only in expectation over the model's own labels and at a good fit.
//! - **First order** |g_i·ΔW_i| and **weight error** ‖ΔW_i‖² per format: what a first-order
//!   Taylor model and a curvature-blind model predict.
//! - **Measured ΔL**: the loss increase when only layer i is quantized to format f — the ground
//!   truth the others approximate, one pass over the calibration data per (layer, format).

use super::hvp::HvpEngine;
use crate::config::ResolvedLayer;
use crate::error::Result;
use crate::quant::{fake_quantize, QuantSpec};
use tch::Kind;

/// Per layer and format: (|g·ΔW|, ‖ΔW‖²), formats in the order given.
pub fn first_order(engine: &HvpEngine<'_>, specs: &[QuantSpec]) -> Result<Vec<Vec<(f64, f64)>>> {
    let grads = engine.gradient()?;
    let mut out = Vec::with_capacity(grads.len());
    for ((layer, w), g) in engine.layers().iter().zip(engine.weights()).zip(&grads) {
        let mut row = Vec::with_capacity(specs.len());
        for spec in specs {
            spec.check_fits(&layer.name, &layer.shape)?;
            let w = w.detach();
            let dw = (tch::no_grad(|| fake_quantize(&w, spec))? - &w).to_kind(Kind::Double);
            let lin = (&dw * g.to_kind(Kind::Double)).sum(Kind::Double).double_value(&[]).abs();
            let err = dw.square().sum(Kind::Double).double_value(&[]);
            row.push((lin, err));
        }
        out.push(row);
    }
    Ok(out)
}

/// Per layer and format: the mean calibration loss with only that layer quantized, minus the
/// loss of the unquantized model.
pub fn measured_delta_loss(engine: &HvpEngine<'_>, specs: &[QuantSpec]) -> Result<Vec<Vec<f64>>> {
    let base = engine.loss_value()?;
    let mut out = Vec::with_capacity(engine.layers().len());
    for layer in engine.layers() {
        let mut row = Vec::with_capacity(specs.len());
        for spec in specs {
            spec.check_fits(&layer.name, &layer.shape)?;
            let plan = [ResolvedLayer { layer: layer.clone(), weight: *spec, activation: None, source: "sensitivity".into() }];
            let applied = crate::eval::apply(engine.model(), &plan)?;
            let l = engine.loss_value();
            applied.restore();
            row.push(l? - base);
        }
        out.push(row);
    }
    Ok(out)
}
