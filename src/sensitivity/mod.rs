//! Sensitivity: how much each layer's quantization would hurt the loss. (Being implemented.)

pub mod report;

pub use report::{LayerSensitivity, SensitivityReport, REPORT_FORMAT, REPORT_VERSION};
