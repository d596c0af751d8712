//! Runs the examples' logic as tests (the binaries themselves are plain
//! `cargo run --example NAME`).

#[path = "../examples/kvlog.rs"]
#[allow(dead_code)]
mod kvlog;

#[test]
fn kvlog_survives_path_failures_without_losing_acknowledged_records() {
    let r = kvlog::run_embedded(1500);
    eprintln!("{r:?}");
    assert!(r.lost.is_empty(), "lost: {:?}", r.lost);
    assert_eq!(r.faults, 2, "both path failures were injected");
    assert_eq!(r.acknowledged, 1500);
    assert_eq!(r.verified, r.acknowledged);
}
