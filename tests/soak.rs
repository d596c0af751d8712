//! One minute of `bench/soak.sh`: bench --verify over two paths on both
//! transports, the NBD export with nbdcopy and qemu-io beside it, a path
//! flapping every 20 s and a tgtd restart. Needs root (network namespaces,
//! tgtd, DPDK af_packet); under `CI=true` a missing prerequisite fails.

mod common;

use std::process::Command;

#[test]
fn soak_one_minute_has_no_errors_and_no_mismatches() {
    if !common::is_root() {
        assert!(!common::required(), "CI requires the soak to run as root");
        eprintln!("SKIPPED: the soak needs root");
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{root}/bench/soak.sh"))
        .arg("1")
        .env("BIN", env!("CARGO_BIN_EXE_iscsi-bypass"))
        .output()
        .expect("run bench/soak.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT soak "))
        .unwrap_or_else(|| panic!("no RESULT line: {text}"));
    let field = |k: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {line}"))
    };
    assert!(field("ios") > 1000.0, "{line}");
    assert_eq!(field("errors"), 0.0, "{text}");
    assert_eq!(field("mismatches"), 0.0, "{text}");
    assert!(out.status.success(), "{text}");
}
