//! Embeds an rpath to the libtorch library directory, so that the `mixq` binary, the tests and the
//! benches run without LD_LIBRARY_PATH. torch-sys (links = "tch") tells us where libtorch is.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
