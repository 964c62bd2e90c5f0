//! Helpers shared by the integration tests.
#![allow(dead_code)]

use mixq::model::{LayerInfo, LayerKind, QuantModel};
use mixq::Result;
use std::path::Path;
use std::process::{Command, Output};
use tch::Tensor;

/// The `QuantModel` methods that every test model spells the same way: its name, `layers` and
/// `params: Vec<(String, Tensor)>` fields, an input shape and a class count.
#[macro_export]
macro_rules! test_model_basics {
    ($name:expr, $input:expr, $classes:expr) => {
        fn name(&self) -> &str {
            $name
        }
        fn layers(&self) -> &[mixq::model::LayerInfo] {
            &self.layers
        }
        fn input_shape(&self) -> &[i64] {
            &$input
        }
        fn num_classes(&self) -> i64 {
            $classes
        }
        fn named_parameters(&self) -> Vec<(String, tch::Tensor)> {
            self.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
        }
    };
}

/// The `mixq` binary, run from the repository root with `MIXQ_HOME=home` and without
/// `LD_LIBRARY_PATH` (the binary must find libtorch through its own rpath).
pub fn mixq_command(home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mixq"));
    c.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("MIXQ_HOME", home)
        .env_remove("LD_LIBRARY_PATH")
        .stdin(std::process::Stdio::null());
    c
}

/// Runs `mixq args…` to completion (see [`mixq_command`]).
pub fn mixq(args: &[&str], home: &Path) -> Output {
    mixq_command(home, args).output().expect("the mixq binary runs")
}

/// A stand-in model for `[1, 8, 8]` images and 10 classes with four layers of random weights:
/// config, data and evaluation logic need layers and weights, not a trained network.
pub struct Toy {
    pub layers: Vec<LayerInfo>,
    pub params: Vec<(String, Tensor)>,
}

impl Toy {
    pub fn new() -> Self {
        let mk = |name: &str, kind, shape: Vec<i64>| LayerInfo { name: name.into(), kind, params: shape.iter().product(), macs: 0, shape };
        let layers = vec![
            mk("stem.conv", LayerKind::Conv2d, vec![32, 1, 3, 3]),
            mk("layer1.0.conv1", LayerKind::Conv2d, vec![32, 32, 3, 3]),
            mk("layer1.0.conv2", LayerKind::Conv2d, vec![32, 32, 3, 3]),
            mk("fc", LayerKind::Linear, vec![10, 64]),
        ];
        // mixq's generator, not libtorch's global one that parallel test threads share.
        let mut rng = mixq::util::SplitMix64(0);
        let params = layers
            .iter()
            .map(|l| (format!("{}.weight", l.name), Tensor::from_slice(&rng.normals(l.params as usize, 1.0)).reshape(&l.shape)))
            .collect();
        Toy { layers, params }
    }
}

impl QuantModel for Toy {
    test_model_basics!("toy", [1, 8, 8], 10);
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.flatten(1, -1).narrow(1, 0, 10))
    }
}
