//! The layer order that `src/lib.rs` and `docs/architecture.md` state, checked
//! against the code: a module under `src/<layer>/` may name (`crate::x`) only
//! its own layer and the layers below it. Doc comments and comments do not
//! count; `#[cfg(test)]` code does (a test must not reach up either), with
//! one exception: test code (from a file's first `#[cfg(test)]` on) may use
//! the embedded `target` as its peer, as the integration tests do.

use std::collections::BTreeMap;
use std::path::Path;

/// Rank of each layer: a layer may use layers of a lower rank. `target` is
/// placed separately: it sits on `wire`, `clock` and `iscsi`, and on the
/// userspace stack (`phy`, `net`, `transport`) for its DPDK listener.
const ORDER: &[(&str, u32)] = &[
    ("wire", 0),
    ("clock", 0),
    ("phy", 1),
    ("net", 2),
    ("transport", 3),
    ("iscsi", 4),
    ("scsi", 5),
    ("multipath", 6),
    ("worker", 7),
    ("bench", 8),
    ("nbd", 8),
    ("metrics", 8),
];
const TARGET_MAY_USE: &[&str] = &[
    "wire",
    "clock",
    "phy",
    "net",
    "transport",
    "iscsi",
    "target",
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `crate::<name>` references outside comments, by line number, and
/// whether they come after the file's first `#[cfg(test)]` (test code).
fn crate_references(source: &str) -> Vec<(usize, String, bool)> {
    let mut refs = Vec::new();
    let mut in_test = false;
    for (number, line) in source.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        in_test |= code.trim_start().starts_with("#[cfg(test)]");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `crate::{a, b}` groups are split by rustfmt elsewhere; a name
            // must start with a letter to be a module.
            if name.starts_with(|c: char| c.is_ascii_lowercase()) {
                refs.push((number + 1, name, in_test));
            }
            rest = after;
        }
    }
    refs
}

#[test]
fn no_layer_reaches_up() {
    let rank: BTreeMap<&str, u32> = ORDER.iter().copied().collect();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    let mut checked = 0;
    for (layer, _) in ORDER.iter().chain([("target", 0)].iter()) {
        let dir = src.join(layer);
        let mut files = Vec::new();
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        } else {
            files.push(src.join(format!("{layer}.rs")));
        }
        for file in files {
            let source = std::fs::read_to_string(&file).expect("read source");
            for (line, used, in_test) in crate_references(&source) {
                checked += 1;
                let allowed = if *layer == "target" || (in_test && used == "target") {
                    TARGET_MAY_USE.contains(&used.as_str())
                } else {
                    match rank.get(used.as_str()) {
                        Some(r) => *r < rank[layer] || used == *layer,
                        // Not a layer (a re-exported item at the crate root).
                        None => false,
                    }
                };
                if !allowed {
                    violations.push(format!(
                        "{}:{line}: {layer} uses crate::{used}",
                        file.strip_prefix(&src).unwrap().display()
                    ));
                }
            }
        }
    }
    assert!(checked > 100, "found only {checked} crate:: references");
    assert!(
        violations.is_empty(),
        "layer order broken (see src/lib.rs):\n{}",
        violations.join("\n")
    );
}
