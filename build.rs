//! Link settings for libtorch taken from the PyPI `torch` wheel.
//!
//! torch-sys declares `links = "tch"`, so its build script's `libtorch_lib`
//! output reaches us as `DEP_TCH_LIBTORCH_LIB`. From it we:
//! - embed an rpath, so binaries and tests run without `LD_LIBRARY_PATH`;
//! - force `libtorch_cuda.so` to stay linked when the wheel ships it. Nothing
//!   in our code references a CUDA symbol, so the default `--as-needed` would
//!   drop it and libtorch would never see a GPU at run time.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB not set: no rpath for libtorch");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath={lib_dir}");
    if Path::new(&lib_dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{lib_dir}");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
