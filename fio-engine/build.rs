//! Compiles the C shim (src/shim.c) against a configured fio source tree:
//! `FIO_SRC` (default: target/fio-src/fio-3.33 of the workspace, where
//! scripts/fio-engine.sh puts it). Its config-host.h must exist (fio's
//! configure wrote it), so the struct layouts are the installed binary's.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/shim.c");
    println!("cargo:rerun-if-env-changed=FIO_SRC");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let src = std::env::var_os("FIO_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/fio-src/fio-3.33"));
    let config = src.join("config-host.h");
    if !src.join("fio.h").is_file() || !config.is_file() {
        panic!(
            "no configured fio source at {} (fio.h and config-host.h needed): run scripts/fio-engine.sh, \
             which fetches fio's Debian source (apt-get source fio) and runs its configure, or set FIO_SRC",
            src.display()
        );
    }
    println!("cargo:rerun-if-changed={}", config.display());
    cc::Build::new()
        .file("src/shim.c")
        .include(&src)
        // As fio's Makefile compiles its own objects.
        .flag("-include")
        .flag(config.to_str().expect("utf-8 path"))
        .define("_GNU_SOURCE", None)
        .define("_LARGEFILE_SOURCE", None)
        .define("_FILE_OFFSET_BITS", "64")
        .define("FIO_INTERNAL", None)
        .flag("-std=gnu99")
        .flag("-fPIC")
        .warnings(false)
        .compile("fio_iscsi_bypass_shim");
}
