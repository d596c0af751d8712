//! Runs every fuzz target body over its committed corpus and over a
//! deterministic pseudo-random stream (mutations of the corpus), on stable
//! Rust and without libFuzzer. `cargo test --manifest-path fuzz/Cargo.toml`.
//! FUZZ_REPLAY_ITERS sets how many generated inputs each target gets.

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("fuzz_iscsi_pdu", iscsi_fuzz::iscsi_pdu),
    ("fuzz_text", iscsi_fuzz::text),
    ("fuzz_scsi_data", iscsi_fuzz::scsi_data),
    ("fuzz_cdb", iscsi_fuzz::cdb),
    ("fuzz_sense", iscsi_fuzz::sense),
    ("fuzz_login", iscsi_fuzz::login),
    ("fuzz_connection", iscsi_fuzz::connection),
    ("fuzz_send_targets", iscsi_fuzz::send_targets),
    ("fuzz_url", iscsi_fuzz::url),
    ("fuzz_chap", iscsi_fuzz::chap),
    ("fuzz_net_packet", iscsi_fuzz::net_packet),
    ("fuzz_net_iface", iscsi_fuzz::net_iface),
    ("fuzz_target_conn", iscsi_fuzz::target_conn),
    ("fuzz_nbd", iscsi_fuzz::nbd),
];

fn corpus(name: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in ["corpus", "regressions"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(sub).join(name);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            if f.is_file() {
                out.push((f.display().to_string(), std::fs::read(&f).unwrap()));
            }
        }
    }
    out
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..1 + rng.below(8) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next() as u8);
            }
            3 if !v.is_empty() => {
                let i = rng.below(v.len());
                v.remove(i);
            }
            4 if !v.is_empty() => {
                let i = rng.below(v.len());
                v.truncate(i);
            }
            _ => {
                let i = rng.below(v.len() + 1);
                let interesting = [0u8, 0xff, 0x7f, 0x80, 1, 0x3f];
                v.insert(i, interesting[rng.below(interesting.len())]);
            }
        }
    }
    v
}

#[test]
fn corpora_and_mutations() {
    let iters: usize = std::env::var("FUZZ_REPLAY_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    for (i, (name, f)) in TARGETS.iter().enumerate() {
        let seeds = corpus(name);
        assert!(!seeds.is_empty(), "no corpus for {name}");
        for (path, input) in &seeds {
            eprintln!("{name}: {path}");
            f(input);
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ i as u64);
        for n in 0..iters {
            let input = if seeds.is_empty() || n % 5 == 0 {
                (0..rng.below(300)).map(|_| rng.next() as u8).collect()
            } else {
                let pick = rng.below(seeds.len());
                mutate(&mut rng, &seeds[pick].1)
            };
            let r = std::panic::catch_unwind(|| f(&input));
            if r.is_err() {
                let dir = std::env::temp_dir().join("iscsi-fuzz-replay");
                let _ = std::fs::create_dir_all(&dir);
                let p = dir.join(format!("{name}-{n}"));
                std::fs::write(&p, &input).unwrap();
                panic!(
                    "{name} failed on generated input {n}, saved to {}",
                    p.display()
                );
            }
        }
    }
}
