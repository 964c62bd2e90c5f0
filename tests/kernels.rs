//! The packed layouts of `mixq-kernels` against mixq's fake quantization: pack the codes and
//! scales `mixq::quant::quantize` returns, dequantize with the kernels crate, and compare with
//! `fake_quantize` and `dequantize` bit for bit (up to the sign of zero, see below), over every
//! format the kernels store, per-channel and per-group, min–max and MSE clipping, and every
//! scale storage type. Then the CPU kernels on those weights against a libtorch FP32 matmul.

mod common;

use mixq::quant::{dequantize, fake_quantize, quantize, Clipping, Format, Granularity, QuantSpec, ScaleType};
use mixq_kernels::{matmul, PackedWeight};
use tch::{Kind, Tensor};

/// Relative tolerance (to the sum of |x|·|w|) of an FP32 kernel against libtorch's FP32 matmul on
/// the same dequantized weights: only the summation order differs.
const FP32_ORDER_RTOL: f32 = 1e-5;

fn vec_f32(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view([-1])).unwrap()
}

fn vec_i32(t: &Tensor) -> Vec<i32> {
    Vec::<i32>::try_from(t.to_kind(Kind::Int).contiguous().view([-1])).unwrap()
}

fn pack(w: &Tensor, spec: &QuantSpec) -> PackedWeight {
    let (n, k) = (w.size()[0] as usize, w.size()[1] as usize);
    let q = quantize(w, spec).unwrap();
    let f = mixq::eval::kernels::weight_format(spec.format).unwrap();
    let scales = vec_f32(&q.scales);
    let p = if f.is_int() {
        let codes = vec_i32(&q.codes);
        let zeros = q.zero_points.as_ref().map(vec_i32);
        let p = PackedWeight::pack_int(f, &codes, &scales, zeros.as_deref(), n, k).unwrap();
        let (c2, z2) = p.unpack_int().unwrap();
        assert_eq!(c2, codes, "{spec}: int codes round trip");
        assert_eq!(z2, zeros, "{spec}: zero points round trip");
        p
    } else {
        let codes = vec_f32(&q.codes);
        let p = PackedWeight::pack_float(f, &codes, &scales, n, k).unwrap();
        let c2 = p.unpack_float().unwrap();
        assert!(c2.iter().zip(&codes).all(|(a, b)| a.to_bits() == b.to_bits()), "{spec}: FP codes round trip");
        p
    };
    // dequantize(quantize(w)) goes through int32 codes exactly like the kernels: equal bits.
    let deq = vec_f32(&dequantize(&q, spec, &w.size()).unwrap());
    let kd = p.dequantize();
    for (i, (a, b)) in kd.iter().zip(&deq).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{spec}: index {i}: kernels {a:e}, mixq dequantize {b:e}");
    }
    p
}

fn specs() -> Vec<QuantSpec> {
    let mut v = Vec::new();
    let formats = [
        Format::Int { bits: 4, signed: true },
        Format::Int { bits: 4, signed: false },
        Format::Int { bits: 8, signed: true },
        Format::Int { bits: 8, signed: false },
        Format::Fp8E4M3,
        Format::Fp4E2M1,
    ];
    for f in formats {
        for g in [Granularity::PerChannel, Granularity::PerGroup(32), Granularity::PerGroup(16)] {
            for clipping in [Clipping::MinMax, Clipping::Mse] {
                let base = QuantSpec { clipping, ..QuantSpec::new(f, g) };
                v.push(base);
                for scale in [ScaleType::F32, ScaleType::F16, ScaleType::E8M0, ScaleType::E4M3] {
                    if scale != base.scale {
                        v.push(QuantSpec { scale, ..base });
                    }
                }
            }
        }
    }
    v
}

#[test]
fn packed_weights_equal_fake_quantization() {
    tch::manual_seed(5);
    // Heavy-tailed rows with an exactly-zero group and tiny values, K = 96 (3 blocks of 32).
    let w = Tensor::randn([7, 96], (Kind::Float, tch::Device::Cpu)) * Tensor::linspace(0.01, 3.0, 96, (Kind::Float, tch::Device::Cpu));
    let _ = w.narrow(0, 2, 1).narrow(1, 0, 32).fill_(0.0);
    for spec in specs() {
        let Ok(fake) = fake_quantize(&w, &spec) else { continue };
        let p = pack(&w, &spec);
        let fake = vec_f32(&fake);
        // fake_quantize keeps the sign of a zero that rounded from a negative value (-0.0 · s);
        // the int32 codes (and the kernels) have only +0. Values compare equal.
        for (i, (a, b)) in p.dequantize().iter().zip(&fake).enumerate() {
            assert!(a == b, "{spec}: index {i}: kernels {a:e}, fake_quantize {b:e}");
        }
    }
}

#[test]
fn kernels_on_mixq_weights_match_libtorch() {
    tch::manual_seed(6);
    let (n, k) = (33, 192);
    let w = Tensor::randn([n, k], (Kind::Float, tch::Device::Cpu));
    for spec in [
        QuantSpec::new(Format::Int { bits: 4, signed: true }, Granularity::PerGroup(64)),
        QuantSpec::new(Format::Int { bits: 4, signed: false }, Granularity::PerGroup(32)),
        QuantSpec::new(Format::Int { bits: 8, signed: true }, Granularity::PerChannel),
        QuantSpec::new(Format::Fp8E4M3, Granularity::PerChannel),
        QuantSpec::new(Format::Fp4E2M1, Granularity::PerGroup(32)),
    ] {
        let p = pack(&w, &spec);
        for m in [1usize, 5] {
            let x = Tensor::randn([m as i64, k], (Kind::Float, tch::Device::Cpu));
            let want = vec_f32(&x.matmul(&fake_quantize(&w, &spec).unwrap().tr()));
            let bound = vec_f32(&x.abs().matmul(&fake_quantize(&w, &spec).unwrap().abs().tr()));
            let mut y = vec![0f32; m * n as usize];
            matmul(&vec_f32(&x), m, &p, &mut y).unwrap();
            for i in 0..y.len() {
                let tol = FP32_ORDER_RTOL * bound[i] + 1e-6;
                assert!((y[i] - want[i]).abs() <= tol, "{spec} m={m}: index {i}: got {}, expected {}, tolerance {tol}", y[i], want[i]);
            }
        }
    }
}

// ---- Evaluation through the kernels (`mixq eval --kernels`) and latency tables (`mixq latency`) ----

use mixq::config::{LayerSetting, QuantConfig};
use mixq::eval::kernels::{logits_fake_and_kernels, KernelModel, LayerPath};
use mixq::model::data::Dataset;
use mixq::model::zoo::DigitsResNet;
use mixq::model::QuantModel;

/// Largest |logit through the kernels − logit with fake quantization| relative to the largest
/// |logit|: both multiply the same dequantized weights (bit for bit, see above) in FP32, in a
/// different summation order, through ten layers; measured ≈ 2e-7 on the trained model.
const KERNEL_LOGIT_RTOL: f64 = 1e-5;

/// A config with `spec` on every layer it fits, `fallback` (per-channel) on the others (the stem,
/// whose 9 inputs take no group of 32).
fn config_for(model: &dyn QuantModel, spec: QuantSpec, fallback: QuantSpec) -> QuantConfig {
    let mut c = QuantConfig::uniform(LayerSetting::weight(spec));
    for l in model.layers() {
        if spec.check_fits(&l.name, &l.shape).is_err() {
            c.layers.insert(l.name.clone(), LayerSetting::weight(fallback));
        }
    }
    c
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

/// Every format the kernels run, per channel and in groups of 32: the logits through the packed
/// kernels (convolutions as im2col GEMMs) equal fake quantization's up to FP32 summation order,
/// every layer ran on the kernels, and the FP32 model's weights are untouched afterwards.
#[test]
fn logits_through_kernels_match_fake_quantization() {
    let model = DigitsResNet::untrained();
    let data = Dataset::digits("test").unwrap().take(32);
    let before = model.weights_hash();
    let formats = [
        Format::Int { bits: 4, signed: true },
        Format::Int { bits: 4, signed: false },
        Format::Int { bits: 8, signed: true },
        Format::Int { bits: 8, signed: false },
        Format::Fp8E4M3,
        Format::Fp4E2M1,
    ];
    for f in formats {
        for g in [Granularity::PerChannel, Granularity::PerGroup(32)] {
            let cfg = config_for(&model, QuantSpec::new(f, g), QuantSpec::new(f, Granularity::PerChannel));
            let plan = cfg.resolve(&model).unwrap();
            let km = KernelModel::new(&model, &plan).unwrap();
            assert!(km.paths().iter().all(|(_, p)| *p == LayerPath::Kernel), "{f}/{g}: {:?}", km.paths());
            let (fake, kern) = logits_fake_and_kernels(&model, &data, &cfg).unwrap();
            let (diff, scale) = (max_abs(&(&kern - &fake)), max_abs(&fake));
            let tol = KERNEL_LOGIT_RTOL * scale;
            let worst = i64::try_from((&kern - &fake).abs().flatten(0, -1).argmax(0, false)).unwrap();
            assert!(
                diff <= tol,
                "{f}/{g}: logit {worst}: kernels {}, fake quantization {}, |Δ| {diff:e} > tolerance {tol:e}",
                kern.flatten(0, -1).double_value(&[worst]),
                fake.flatten(0, -1).double_value(&[worst])
            );
        }
    }
    assert_eq!(model.weights_hash(), before, "kernel evaluation changed the model's weights");
}

/// Share of samples whose top-1 class may differ between the kernels and fake quantization when
/// activations are quantized too: an activation that lies on a rounding boundary can round to
/// the neighbouring code after the previous layer's FP32 sum came out in a different order, and
/// one flipped code moves the logits by far more than FP32 rounding.
const ACT_FLIP_TOP1_SHARE: f64 = 0.05;

/// With int8 input activations (mixq's dynamic per-sample quantization, applied before each
/// kernel) the two paths agree on the top-1 class of almost every sample.
#[test]
fn quantized_activations_through_kernels_agree_on_top1() {
    let model = DigitsResNet::untrained();
    let data = Dataset::digits("test").unwrap().take(64);
    let mut cfg =
        QuantConfig::uniform(LayerSetting::weight(QuantSpec::new(Format::Int { bits: 8, signed: true }, Granularity::PerChannel)));
    cfg.default.activation = Some(Format::Int { bits: 8, signed: true });
    let (fake, kern) = logits_fake_and_kernels(&model, &data, &cfg).unwrap();
    let same = kern.argmax(-1, false).eq_tensor(&fake.argmax(-1, false)).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    assert!(same >= 1.0 - ACT_FLIP_TOP1_SHARE, "top-1 agreement {same}, at least {} expected", 1.0 - ACT_FLIP_TOP1_SHARE);
}

/// Formats the kernels do not run fall back to fake quantization through the same libtorch ops:
/// identical logits; fp32 runs the FP32 weight.
#[test]
fn other_formats_fall_back_to_fake_quantization() {
    let model = DigitsResNet::untrained();
    let data = Dataset::digits("test").unwrap().take(16);
    let mut cfg =
        QuantConfig::uniform(LayerSetting::weight(QuantSpec::new(Format::Int { bits: 3, signed: true }, Granularity::PerChannel)));
    cfg.layers.insert("fc".into(), LayerSetting::weight(QuantSpec::keep()));
    cfg.layers.insert("stem.conv".into(), LayerSetting::weight(QuantSpec::new(Format::Fp8E5M2, Granularity::PerChannel)));
    let plan = cfg.resolve(&model).unwrap();
    let km = KernelModel::new(&model, &plan).unwrap();
    for (name, path) in km.paths() {
        let want = if name == "fc" { LayerPath::Fp32 } else { LayerPath::FakeQuant };
        assert_eq!(path, want, "{name}");
    }
    let (fake, kern) = logits_fake_and_kernels(&model, &data, &cfg).unwrap();
    assert_eq!(max_abs(&(&kern - &fake)), 0.0);
}

#[test]
fn torchscript_models_are_rejected_with_a_reason() {
    let data = Dataset::digits("calib").unwrap();
    let model = mixq::model::load("tests/fixtures/tiny_cnn.pt", Some(&data)).unwrap();
    let plan = QuantConfig::uniform(LayerSetting::weight(QuantSpec::new(Format::Int { bits: 8, signed: true }, Granularity::PerChannel)))
        .resolve(model.as_ref())
        .unwrap();
    let err = KernelModel::new(model.as_ref(), &plan).err().expect("a TorchScript model is rejected").to_string();
    assert!(err.contains("digits-resnet") && err.contains("without --kernels"), "{err}");
}

/// `mixq latency` → CSV → `mixq allocate --latency … --budget latency=…` on the zoo model: the
/// table parses with the allocator's reader and has every layer × format, the allocation's summed
/// latency (looked up in the table) is within the budget, a budget below the fastest configuration
/// fails and writes nothing, and a format the kernels cannot run is named in the error.
#[test]
fn latency_table_drives_a_latency_budget() {
    let d = std::env::temp_dir().join(format!("mixq-kernels-latency-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let p = |f: &str| d.join(f).to_str().unwrap().to_string();
    // The zoo model is trained once per target directory, not once per run.
    let home = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("mixq-home");
    let formats = "int4,int8,fp8-e4m3,fp32";
    let o = common::mixq(&["latency", "--formats", formats, "--reps", "3", "--warmup", "1", "-o", &p("lat.csv")], &home);
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{err}");
    assert!(out.contains("layer3.0.conv2") && out.contains("total (uniform)"), "{out}");
    let table = mixq::cost::LatencyTable::load(&d.join("lat.csv")).unwrap();
    let model = DigitsResNet::untrained();
    assert_eq!(table.entries.len(), model.layers().len() * formats.split(',').count());
    // Allocate over the kernel formats (with fp32, whose error is 0 and which is the fastest on
    // these tiny layers, every budget would pick it everywhere).
    let candidates = "int4,int8,fp8-e4m3";
    let labels: Vec<&str> = candidates.split(',').collect();
    let lat = |layer: &str, f: &str| table.entries[&(layer.to_string(), f.to_string())];
    // Budget halfway between the fastest configuration and the slowest.
    let (fastest, slowest): (f64, f64) = model.layers().iter().fold((0.0, 0.0), |(a, b), l| {
        let v: Vec<f64> = labels.iter().map(|f| lat(&l.name, f)).collect();
        (a + v.iter().cloned().fold(f64::INFINITY, f64::min), b + v.iter().cloned().fold(0.0, f64::max))
    });
    let budget = (500.0 * (fastest + slowest)).floor() / 1000.0;
    let o =
        common::mixq(&["sensitivity", "--estimator", "hutchinson", "--max-probes", "4", "--min-probes", "2", "-o", &p("sens.json")], &home);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (sens, lat_csv) = (p("sens.json"), p("lat.csv"));
    let allocate = |budget: &str, out: &str| {
        let args = ["allocate", "--sens", &sens, "--formats", candidates, "--latency", &lat_csv, "--budget", budget, "-o", out];
        common::mixq(&args, &home)
    };
    let o = allocate(&format!("latency={budget:.3}us"), &p("cfg.json"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg = QuantConfig::load(&d.join("cfg.json")).unwrap();
    let used: f64 = model.layers().iter().map(|l| lat(&l.name, &cfg.layers[&l.name].spec().label())).sum();
    assert!(used <= budget * (1.0 + 1e-9), "allocation uses {used} µs, budget {budget} µs");
    // Below the fastest configuration: infeasible, nothing written.
    let o = allocate(&format!("latency={:.3}us", 0.9 * fastest), &p("none.json"));
    assert!(!o.status.success() && !d.join("none.json").exists());
    // A format without a kernel.
    let o = common::mixq(&["latency", "--formats", "int4,int3", "-o", &p("bad.csv")], &home);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("`int3`") && err.contains("fp8-e4m3") && !d.join("bad.csv").exists(), "{err}");
}
