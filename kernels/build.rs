//! Embeds an rpath to the libtorch library directory, so that this crate's tests and benches run
//! without LD_LIBRARY_PATH (as the root crate's build.rs does). torch-sys (links = "tch") reports
//! where libtorch is through `DEP_TCH_LIBTORCH_LIB`.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(lib) => println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}"),
        Err(_) => println!(
            "cargo:warning=torch-sys did not report the libtorch lib dir (DEP_TCH_LIBTORCH_LIB); binaries will need LD_LIBRARY_PATH. Build through scripts/with-env"
        ),
    }
}
