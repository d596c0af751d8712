//! Records the build's git revision so `iscsi-bypass --version` and bench
//! reports say which code produced a figure.
use std::process::Command;

fn main() {
    let rev = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=ISCSI_BYPASS_GIT_REV={rev}");
    println!("cargo:rerun-if-changed=.git/HEAD");
}
