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
    // In a git worktree `.git` is a file; ask git where HEAD lives, and only
    // watch it if it exists (a missing path would rerun this on every build).
    let head = Command::new("git")
        .args(["rev-parse", "--git-path", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match head {
        Some(h) if std::path::Path::new(&h).exists() => println!("cargo:rerun-if-changed={h}"),
        _ => println!("cargo:rerun-if-changed=build.rs"),
    }
}
