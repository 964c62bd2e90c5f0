//! Cheaper or more direct sensitivity measures, for research and for checking the curvature
//! estimates against the truth.
//!
//! - **Empirical Fisher trace**: (1/N) Σ_n ‖∇_i ℓ_n‖², from single-sample gradients. It equals the
//!   Gauss–Newton trace only in expectation over the model's own labels and at a good fit.
//! - **First order** |g_i·ΔW_i| and **weight error** ‖ΔW_i‖² per format: what a first-order
//!   Taylor model and a curvature-blind model predict.
//! - **Measured ΔL**: the loss increase when only layer i is quantized to format f — the ground
//!   truth the others approximate, one pass over the calibration data per (layer, format).
//!
//! Measured ΔL is the one estimator whose work splits into independent pieces, so it can run on
//! several workers ([`measured_delta_loss_jobs`]). libtorch parallelises inside each op, but on a
//! small model and a calibration batch of a few hundred samples its ops are too short for that
//! to pay; whole (layer, format) passes on separate cores do. Each worker owns a replica of the
//! model ([`QuantModel::replicate`]: quantizing a weight in place must not be seen by the
//! others) and its own copies of the calibration batches (a tch `Tensor` is `Send` but not
//! `Sync`, so threads never share one), and runs libtorch with one intra-op thread.

use super::hvp::{mean_loss, Batch, HvpEngine};
use crate::error::{Error, Result};
use crate::model::ResolvedLayer;
use crate::model::{LayerInfo, QuantModel};
use crate::quant::{fake_quantize, QuantSpec};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;
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
/// loss of the unquantized model. Serial, on the engine's model (see
/// [`measured_delta_loss_jobs`] for the parallel form).
pub fn measured_delta_loss(engine: &HvpEngine<'_>, specs: &[QuantSpec]) -> Result<Vec<Vec<f64>>> {
    serial(engine, specs, engine.loss_value()?)
}

/// [`measured_delta_loss`] with the unquantized loss `base` already known.
fn serial(engine: &HvpEngine<'_>, specs: &[QuantSpec], base: f64) -> Result<Vec<Vec<f64>>> {
    let mut out = Vec::with_capacity(engine.layers().len());
    for layer in engine.layers() {
        let mut row = Vec::with_capacity(specs.len());
        for spec in specs {
            spec.check_fits(&layer.name, &layer.shape)?;
            let l = quantized_loss(engine.model(), engine.batches(), layer, spec);
            row.push(l.map_err(|e| pass_error(engine.model(), layer, spec, e))? - base);
        }
        out.push(row);
    }
    Ok(out)
}

/// The error of one (layer, format) pass, naming both.
fn pass_error(model: &dyn QuantModel, layer: &LayerInfo, spec: &QuantSpec, e: Error) -> Error {
    Error::Model { model: model.name().to_string(), msg: format!("measured ΔL of layer `{}` at {}: {e}", layer.name, spec.format) }
}

/// The number of workers `mixq sensitivity --estimator measured` uses when `--jobs` is not given:
/// the number of cores (measured faster than one worker with libtorch's own threads, see
/// `experiments/measured-parallel`).
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map(std::num::NonZeroUsize::get).unwrap_or(1)
}

/// Rejects zero workers.
pub fn check_jobs(jobs: usize) -> Result<()> {
    if jobs == 0 {
        return Err(Error::invalid("--jobs", "0", "give at least 1 worker (1 runs the measured estimator serially)"));
    }
    Ok(())
}

/// Sets libtorch's intra-op thread count and puts the previous one back when dropped (also on
/// errors and unwinding).
struct TorchThreads(i32);

impl TorchThreads {
    fn set(n: i32) -> TorchThreads {
        let prev = tch::get_num_threads();
        tch::set_num_threads(n);
        TorchThreads(prev)
    }
}

impl Drop for TorchThreads {
    fn drop(&mut self) {
        tch::set_num_threads(self.0);
    }
}

/// Loss of `model` with only `layer` quantized to `spec` (the weight is restored afterwards).
fn quantized_loss(model: &dyn QuantModel, batches: &[Batch], layer: &LayerInfo, spec: &QuantSpec) -> Result<f64> {
    let plan = [ResolvedLayer { layer: layer.clone(), weight: *spec, activation: None, source: "sensitivity".into() }];
    let applied = crate::model::apply(model, &plan)?;
    let l = mean_loss(model, batches);
    applied.restore();
    l
}

/// What the workers share: the work list and where the results go.
struct Shared<'a> {
    layers: &'a [LayerInfo],
    specs: &'a [QuantSpec],
    base: f64,
    next: AtomicUsize,
    stop: AtomicBool,
    /// Pair index (layer-major) → ΔL.
    results: Mutex<Vec<Option<f64>>>,
    /// The failures, by pair index.
    errors: Mutex<Vec<(usize, Error)>>,
}

/// One worker: takes the next (layer, format) pair until none is left or another worker failed.
fn worker(model: &dyn QuantModel, batches: &[Batch], sh: &Shared<'_>) {
    // libtorch's CPU ops size their OpenMP team by the calling thread's setting (and MKL's by a
    // thread-local one), so each worker thread limits its own; the caller's TorchThreads guard
    // sets and restores the process-wide value.
    tch::set_num_threads(1);
    let nf = sh.specs.len();
    let pairs = sh.layers.len() * nf;
    while !sh.stop.load(Ordering::Relaxed) {
        let k = sh.next.fetch_add(1, Ordering::Relaxed);
        if k >= pairs {
            break;
        }
        let (layer, spec) = (&sh.layers[k / nf], &sh.specs[k % nf]);
        match quantized_loss(model, batches, layer, spec) {
            Ok(l) => {
                if let Ok(mut r) = sh.results.lock() {
                    r[k] = Some(l - sh.base);
                }
            }
            Err(e) => {
                sh.stop.store(true, Ordering::Relaxed);
                let e = pass_error(model, layer, spec, e);
                if let Ok(mut errs) = sh.errors.lock() {
                    errs.push((k, e));
                }
                break;
            }
        }
    }
}

/// Serial time of all passes below which [`measured_delta_loss_auto`] does not start workers:
/// making the replicas and a thread pool costs 30–100 ms, and on a quiet machine two workers
/// were 1.06× faster than serial on a 0.43 s workload, slower on 0.02–0.09 s ones
/// (experiments/measured-parallel).
pub const MIN_PARALLEL_SECONDS: f64 = 0.5;

/// [`measured_delta_loss_jobs`] where it pays: times one pass (the unquantized loss) and runs
/// serially when all passes would take less than [`MIN_PARALLEL_SECONDS`] that way, on `jobs`
/// workers otherwise. Same result either way.
pub fn measured_delta_loss_auto(engine: &HvpEngine<'_>, specs: &[QuantSpec], jobs: usize) -> Result<Vec<Vec<f64>>> {
    check_jobs(jobs)?;
    let pairs = engine.layers().len() * specs.len();
    let t = Instant::now();
    let base = engine.loss_value()?;
    let pass = t.elapsed().as_secs_f64();
    if jobs > 1 && pairs > 1 && pass * (pairs as f64) < MIN_PARALLEL_SECONDS {
        tracing::info!(
            "measured ΔL: {pairs} passes of {:.1} ms each: serial (workers pay off from {MIN_PARALLEL_SECONDS} s of passes)",
            pass * 1e3
        );
        return serial(engine, specs, base);
    }
    on_workers(engine, specs, jobs, base)
}

/// [`measured_delta_loss`] on `jobs` workers: the (layer, format) pairs are handed out one at a
/// time to a rayon pool of `jobs` threads, each with its own replica of the engine's model and
/// its own deep copies of the engine's calibration batches, and libtorch
/// limited to one intra-op thread for the duration (restored afterwards, also on errors).
///
/// The result is in the same order and, on the CPU, has the same values as the serial form, bit
/// for bit: each pass runs the same ops on the same batches, and at these sizes libtorch's
/// kernels do not split their reductions by thread count (tests/measured.rs checks it).
///
/// `jobs` = 1, a single pair, or a model that cannot be replicated run the serial form (the last
/// with a warning saying so). A failing pass is reported as an error naming its layer and format.
pub fn measured_delta_loss_jobs(engine: &HvpEngine<'_>, specs: &[QuantSpec], jobs: usize) -> Result<Vec<Vec<f64>>> {
    check_jobs(jobs)?;
    on_workers(engine, specs, jobs, engine.loss_value()?)
}

/// [`measured_delta_loss_jobs`] with the unquantized loss `base` already known.
fn on_workers(engine: &HvpEngine<'_>, specs: &[QuantSpec], jobs: usize, base: f64) -> Result<Vec<Vec<f64>>> {
    let model = engine.model();
    let layers = engine.layers();
    let pairs = layers.len() * specs.len();
    let start = Instant::now();
    if jobs == 1 || pairs <= 1 {
        let out = serial(engine, specs, base)?;
        tracing::info!("measured ΔL: {pairs} (layer, format) passes serially in {:.3} s", start.elapsed().as_secs_f64());
        return Ok(out);
    }
    for layer in layers {
        for spec in specs {
            spec.check_fits(&layer.name, &layer.shape)?;
        }
    }
    let workers = jobs.min(pairs);
    let replicas = (0..workers).map(|_| model.replicate()).collect::<Result<Vec<_>>>();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(workers).thread_name(|i| format!("mixq-measured-{i}")).build();
    let (replicas, pool) = match (replicas, pool) {
        (Ok(r), Ok(p)) => (r, p),
        (Err(e), _) => {
            tracing::warn!("measured ΔL: {e}; running the {pairs} (layer, format) passes serially instead of on {jobs} workers");
            return serial(engine, specs, base);
        }
        (_, Err(e)) => {
            tracing::warn!("measured ΔL: cannot start {workers} worker threads ({e}); running the {pairs} (layer, format) passes serially");
            return serial(engine, specs, base);
        }
    };
    let copies: Vec<Vec<Batch>> = (0..workers).map(|_| engine.batches().iter().map(Batch::deep_copy).collect()).collect();
    let shared = Shared {
        layers,
        specs,
        base,
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        results: Mutex::new(vec![None; pairs]),
        errors: Mutex::new(Vec::new()),
    };
    {
        let _threads = TorchThreads::set(1);
        let sh = &shared;
        pool.scope(|s| {
            for (replica, batches) in replicas.into_iter().zip(copies) {
                s.spawn(move |_| worker(replica.as_ref(), &batches, sh));
            }
        });
    }
    let poisoned = || Error::Model { model: model.name().to_string(), msg: "a measured-ΔL worker panicked".into() };
    let mut errors = shared.errors.into_inner().map_err(|_| poisoned())?;
    if let Some(i) = (0..errors.len()).min_by_key(|&i| errors[i].0) {
        return Err(errors.swap_remove(i).1);
    }
    let results = shared.results.into_inner().map_err(|_| poisoned())?;
    let mut out = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let mut row = Vec::with_capacity(specs.len());
        for (j, spec) in specs.iter().enumerate() {
            let v = results[i * specs.len() + j].ok_or_else(|| Error::Model {
                model: model.name().to_string(),
                msg: format!("measured ΔL of layer `{}` at {}: no result from the workers", layer.name, spec.format),
            })?;
            row.push(v);
        }
        out.push(row);
    }
    tracing::info!("measured ΔL: {pairs} (layer, format) passes on {workers} workers in {:.3} s", start.elapsed().as_secs_f64());
    Ok(out)
}
