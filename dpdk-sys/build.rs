//! Finds DPDK with pkg-config, compiles the C shim over DPDK's static-inline
//! functions, and generates the bindings with bindgen.
//!
//! PMDs (net_ring, net_tap, NIC drivers, and the `ring` mempool handler every
//! pktmbuf pool needs) are plugins in the distribution build. A shared
//! librte_eal loads them from its built-in plugin directory (Debian:
//! /usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0) at `rte_eal_init`, so nothing
//! here links them; `-d <dir>` on the EAL command line adds more.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=shim/shim.c");
    println!("cargo:rerun-if-changed=shim/shim.h");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

    let dpdk = pkg_config::Config::new()
        .atleast_version("21.11")
        .cargo_metadata(false)
        .probe("libdpdk")
        .unwrap_or_else(|e| {
            panic!("libdpdk not found with pkg-config (install libdpdk-dev; scripts/setup.sh does): {e}")
        });

    // Link flags: each library dynamically, as pkg-config lists them. The
    // `-Wl,--as-needed` it prepends only drops libraries we never call.
    for dir in &dpdk.link_paths {
        println!("cargo:rustc-link-search=native={}", dir.display());
    }
    for lib in &dpdk.libs {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }

    // Compile flags: include paths plus `-include rte_config.h` and the
    // `-march` DPDK's inline functions are built for.
    let cflags = pkg_config_cflags();
    let mut shim = cc::Build::new();
    shim.file("shim/shim.c").include("shim").warnings(false);
    for flag in &cflags {
        shim.flag(flag);
    }
    shim.compile("dpdk_shim");

    let bindings = bindgen::Builder::default()
        .header("shim/shim.h")
        .clang_args(&cflags)
        .clang_arg("-Ishim")
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .allowlist_function("shim_.*")
        .allowlist_var("SHIM_.*")
        .allowlist_type("shim_.*")
        .allowlist_function("rte_eal_.*")
        .allowlist_function("rte_eth_.*")
        .allowlist_function("rte_pktmbuf_.*")
        .allowlist_function("rte_mbuf_.*")
        .allowlist_function("rte_mempool_.*")
        .allowlist_function("rte_lcore_.*")
        .allowlist_function("rte_socket_id")
        .allowlist_function("rte_strerror")
        .allowlist_function("rte_thread_register")
        .allowlist_function("rte_thread_unregister")
        .allowlist_type("rte_eth_.*")
        .allowlist_type("rte_mbuf")
        .allowlist_type("rte_mempool")
        .allowlist_type("rte_ether_addr")
        .allowlist_var("RTE_ETH_.*")
        .allowlist_var("RTE_MBUF_.*")
        .allowlist_var("RTE_PKTMBUF_.*")
        .allowlist_var("RTE_MAX_ETHPORTS")
        .allowlist_var("RTE_MAX_LCORE")
        .allowlist_var("SOCKET_ID_ANY")
        // Static-inline functions have no symbol; the shim wraps the ones we use.
        .generate_inline_functions(false)
        // rte_mbuf and friends are packed and over-aligned; bindgen cannot
        // always express that, so keep the rest of the layouts out of Rust
        // except what the ethdev setup calls take by value.
        .opaque_type("rte_mbuf")
        .opaque_type("rte_mempool")
        .opaque_type("rte_arp_hdr")
        .opaque_type("rte_arp_ipv4")
        .opaque_type("rte_l2tpv2_combined_msg_hdr")
        .opaque_type("rte_gtp_psc_generic_hdr")
        .derive_default(true)
        .derive_debug(true)
        .layout_tests(true)
        .prepend_enum_name(false)
        .default_enum_style(bindgen::EnumVariation::Consts)
        .generate()
        .expect("bindgen failed on shim/shim.h");

    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("writing bindings.rs");
}

/// `pkg-config --cflags libdpdk`, split on whitespace. The pkg-config crate
/// keeps only include paths and defines; the `-include rte_config.h` and
/// `-march` flags matter to DPDK's headers.
fn pkg_config_cflags() -> Vec<String> {
    let pkg_config = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".to_string());
    let output = std::process::Command::new(pkg_config)
        .args(["--cflags", "libdpdk"])
        .output()
        .expect("running pkg-config --cflags libdpdk");
    assert!(
        output.status.success(),
        "pkg-config --cflags libdpdk failed"
    );
    let text = String::from_utf8(output.stdout).expect("pkg-config output is UTF-8");
    let mut flags = Vec::new();
    let mut words = text.split_whitespace();
    while let Some(word) = words.next() {
        if word == "-include" {
            // Keep `-include FILE` together so it survives as two args.
            if let Some(file) = words.next() {
                flags.push(word.to_string());
                flags.push(file.to_string());
            }
        } else {
            flags.push(word.to_string());
        }
    }
    flags
}
