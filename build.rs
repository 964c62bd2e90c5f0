//! Embeds an rpath to the libtorch library directory, so that the `mixq` binary, the tests and the
//! benches run without LD_LIBRARY_PATH. torch-sys (links = "tch") tells us where libtorch is.
//!
//! Also compiles `csrc/torchscript_layers.cpp`, the small C++ shim that finds the layers of a
//! TorchScript module and their multiply-accumulates (tch exposes no hooks or graph; see
//! `src/model/torchscript.rs`), against the same libtorch headers, with the flags torch-sys uses,
//! and `csrc/autograd_grad.cpp`, `torch::autograd::grad` with `grad_outputs` for the
//! curvature–vector products (tch 0.26 does not expose it; see `src/sensitivity/autograd.rs`).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=csrc/torchscript_layers.cpp");
    println!("cargo:rerun-if-changed=csrc/autograd_grad.cpp");
    let lib = match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(lib) => PathBuf::from(lib),
        Err(_) => panic!("torch-sys did not report the libtorch lib dir (DEP_TCH_LIBTORCH_LIB); build through scripts/with-env"),
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let include = lib.join("..").join("include");
    cc::Build::new()
        .cpp(true)
        .file("csrc/torchscript_layers.cpp")
        .file("csrc/autograd_grad.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", std::env::var("LIBTORCH_CXX11_ABI").as_deref().unwrap_or("1"))
        .define("GLOG_USE_GLOG_EXPORT", None)
        // libtorch wheels are release builds: RecordFunction's debug-only checks must be off too.
        .define("NDEBUG", None)
        .warnings(false)
        .compile("mixq_torchscript");
    // The shim calls into libtorch: link it after the static library (torch-sys links these too,
    // but only for its own crate's position on the link line).
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
