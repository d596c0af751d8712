//! fio's completion-latency histogram: its bins (`stat.h`,
//! `plat_val_to_idx`/`plat_idx_to_val` in `stat.c`) and its histogram log
//! (`log_hist_msec`, `flush_hist_samples` in `iolog.c`), so the files
//! `--hist-log` writes read like fio's `*_clat_hist.*.log` and fio's own
//! `tools/hist/fiologparser_hist.py` takes them.
//!
//! File format (fio 3.33), one line per sample:
//! `msec, ddir, bs, bin0, bin1, ..., binN` — `msec` since the measured
//! part began, `ddir` 0 for reads and 1 for writes, `bs` the size of the
//! I/O that closed the window, then the I/Os completed since the previous
//! sample of that direction per latency bin (nanoseconds,
//! [`FIO_IO_U_PLAT_NR`] = 1856 bins, or 1856 / 2^coarseness columns each
//! summing 2^coarseness bins). Fields are separated by `", "`.
//!
//! The bin arithmetic here is the crate's one transcription of fio's;
//! [`super::fio_hist`], which reads such logs back, uses it.

/// `FIO_IO_U_PLAT_BITS`: each power-of-two group has 2^6 bins.
pub const PLAT_BITS: u32 = 6;
/// `FIO_IO_U_PLAT_VAL`.
pub const PLAT_VAL: u64 = 1 << PLAT_BITS;
/// `FIO_IO_U_PLAT_GROUP_NR` (fio 3.x).
pub const PLAT_GROUP_NR: u64 = 29;
/// `FIO_IO_U_PLAT_NR`: bins in a histogram.
pub const FIO_IO_U_PLAT_NR: usize = (PLAT_GROUP_NR * PLAT_VAL) as usize;

/// fio's `plat_val_to_idx`: the bin of a latency in nanoseconds.
pub fn val_to_idx(val: u64) -> usize {
    let msb = if val == 0 {
        0
    } else {
        63 - val.leading_zeros()
    };
    if msb <= PLAT_BITS {
        return val as usize;
    }
    let error_bits = msb - PLAT_BITS;
    let base = ((error_bits + 1) as u64) << PLAT_BITS;
    let offset = (PLAT_VAL - 1) & (val >> error_bits);
    ((base + offset) as usize).min(FIO_IO_U_PLAT_NR - 1)
}

/// The group layout of bin `idx` (clamped to the last bin) at or above 128:
/// (`base` latency of its group, its index `k` in the group, bin width
/// `2^error_bits`), as `plat_idx_to_val` computes them; `None` below 128,
/// where a bin is one nanosecond.
fn bin_layout(idx: usize) -> Option<(u64, u64, u32)> {
    let idx = idx.min(FIO_IO_U_PLAT_NR - 1) as u64;
    if idx < (PLAT_VAL << 1) {
        return None;
    }
    let error_bits = ((idx >> PLAT_BITS) - 1) as u32;
    let base = 1u64 << (error_bits + PLAT_BITS);
    Some((base, idx % PLAT_VAL, error_bits))
}

/// fio's `plat_idx_to_val`: the middle of a bin, in nanoseconds (what fio
/// prints as a percentile); below 128 the bin's value itself. Indexes past
/// the last bin are the last bin.
pub fn idx_to_val(idx: usize) -> u64 {
    match bin_layout(idx) {
        None => idx as u64,
        // base + (k + 0.5) * 2^error_bits, exact since error_bits >= 1.
        Some((base, k, error_bits)) => base + (2 * k + 1) * (1u64 << (error_bits - 1)),
    }
}

/// The lower and upper edge (ns) of bin `idx`: it holds `lo..hi`, and
/// below 128 just `lo == hi == idx`.
pub fn idx_edges(idx: usize) -> (u64, u64) {
    match bin_layout(idx) {
        None => (idx as u64, idx as u64),
        Some((base, k, error_bits)) => {
            let w = 1u64 << error_bits;
            (base + k * w, base + (k + 1) * w)
        }
    }
}

/// One histogram-log line: I/Os per bin completed in the window, sparse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistSample {
    pub msec: u64,
    pub ddir: u8,
    pub bs: u32,
    /// (bin, count) for the bins with a count.
    pub bins: Vec<(u16, u32)>,
}

/// fio's per-direction histogram window (`struct io_hist`): cumulative
/// bins, and a sample each time a completion finds `msec` passed since
/// the last one, as `add_clat_sample` does.
pub struct HistWindow {
    msec: u64,
    bins: Vec<u64>,
    last: Vec<u64>,
    hist_last: u64,
}

impl HistWindow {
    pub fn new(msec: u64) -> HistWindow {
        HistWindow {
            msec: msec.max(1),
            bins: vec![0; FIO_IO_U_PLAT_NR],
            last: vec![0; FIO_IO_U_PLAT_NR],
            hist_last: 0,
        }
    }

    /// Records one completion of `lat_ns` at `elapsed_ms` since the
    /// measured part began; returns a sample when the window closed.
    pub fn record(
        &mut self,
        lat_ns: u64,
        elapsed_ms: u64,
        ddir: u8,
        bs: u32,
    ) -> Option<HistSample> {
        self.bins[val_to_idx(lat_ns)] += 1;
        // fio: `if (!hw->hist_last) hw->hist_last = elapsed;`
        if self.hist_last == 0 {
            self.hist_last = elapsed_ms;
        }
        let this_window = elapsed_ms.saturating_sub(self.hist_last);
        if this_window < self.msec {
            return None;
        }
        let mut bins = Vec::new();
        for (i, (now, before)) in self.bins.iter().zip(self.last.iter_mut()).enumerate() {
            if *now != *before {
                bins.push((i as u16, (*now - *before) as u32));
                *before = *now;
            }
        }
        self.hist_last = elapsed_ms - (this_window - self.msec);
        Some(HistSample {
            msec: elapsed_ms,
            ddir,
            bs,
            bins,
        })
    }
}

/// Writes samples as fio's histogram log, in time order, with
/// `coarseness` (0-6) as fio's `log_hist_coarseness`.
pub fn write_log(
    out: &mut impl std::io::Write,
    samples: &[HistSample],
    coarseness: u8,
) -> std::io::Result<()> {
    let stride = 1usize << coarseness.min(6);
    let cols = FIO_IO_U_PLAT_NR / stride;
    let mut sorted: Vec<&HistSample> = samples.iter().collect();
    sorted.sort_by_key(|s| (s.msec, s.ddir));
    let mut row = vec![0u64; cols];
    let mut line = String::with_capacity(cols * 3 + 32);
    for s in sorted {
        row.iter_mut().for_each(|c| *c = 0);
        for &(bin, n) in &s.bins {
            row[(bin as usize / stride).min(cols - 1)] += u64::from(n);
        }
        line.clear();
        use std::fmt::Write as _;
        let _ = write!(line, "{}, {}, {}", s.msec, s.ddir, s.bs);
        for c in &row {
            let _ = write!(line, ", {c}");
        }
        line.push('\n');
        out.write_all(line.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_match_fios_arithmetic() {
        // Values below 128 ns have a bin each.
        for v in 0..128 {
            assert_eq!(val_to_idx(v), v as usize);
            assert_eq!(idx_to_val(v as usize), v);
        }
        // 128..255 ns: bins of 2 ns; 1 µs..2 µs: bins of 16 ns.
        assert_eq!(val_to_idx(128), 128);
        assert_eq!(val_to_idx(129), 128);
        assert_eq!(val_to_idx(130), 129);
        assert_eq!(val_to_idx(1024), 5 * 64);
        assert_eq!(idx_to_val(5 * 64), 1024 + 8);
        // Every value lands in the bin whose range holds it.
        for v in [
            200u64,
            4_096,
            99_999,
            1_234_567,
            987_654_321,
            17_000_000_000,
        ] {
            let i = val_to_idx(v);
            let mid = idx_to_val(i);
            assert!(
                mid.abs_diff(v) as f64 <= v as f64 / 64.0,
                "{v}: bin {i} mid {mid}"
            );
        }
        // The last bin takes everything above the range.
        assert_eq!(val_to_idx(u64::MAX), FIO_IO_U_PLAT_NR - 1);
        // Bins grow with the value.
        let mut last = 0;
        for v in (0..40).map(|s| 1u64 << s) {
            let i = val_to_idx(v);
            assert!(i >= last);
            last = i;
        }
        // Matches fio's own printout for one value: 509385 ns -> 509952
        // (fio 3.33's JSON, clat percentile of a 509385 ns maximum).
        assert_eq!(idx_to_val(val_to_idx(509_385)), 509_952);
    }

    #[test]
    fn bin_values_are_fios() {
        // Below 128 ns a bin is one nanosecond.
        for i in 0..128 {
            assert_eq!(idx_to_val(i), i as u64);
        }
        // 128..255 ns in bins of 2: the middle of [128, 130) is 129.
        assert_eq!(idx_to_val(128), 129);
        assert_eq!(idx_to_val(191), 255);
        // 256..511 in bins of 4.
        assert_eq!(idx_to_val(192), 258);
        assert_eq!(idx_to_val(255), 510);
        // The last bin: group 28, error bits 27.
        assert_eq!(
            idx_to_val(FIO_IO_U_PLAT_NR - 1),
            (1u64 << 33) + 63 * (1 << 27) + (1 << 26)
        );
        assert_eq!(FIO_IO_U_PLAT_NR, 1856);
    }

    #[test]
    fn every_bin_value_files_back_into_its_bin() {
        for idx in 0..FIO_IO_U_PLAT_NR {
            let v = idx_to_val(idx);
            assert_eq!(val_to_idx(v), idx, "bin {idx} value {v}");
            let (lo, hi) = idx_edges(idx);
            assert_eq!(val_to_idx(lo), idx, "lower edge of {idx}");
            if hi > lo {
                assert_eq!(val_to_idx(hi - 1), idx, "upper edge of {idx}");
                if idx + 1 < FIO_IO_U_PLAT_NR {
                    assert_eq!(val_to_idx(hi), idx + 1, "past {idx}");
                }
            }
        }
    }

    #[test]
    fn window_emits_deltas_like_fio() {
        let mut w = HistWindow::new(100);
        // First completion at 5 ms opens the window.
        assert!(w.record(1000, 5, 0, 4096).is_none());
        assert!(w.record(2000, 50, 0, 4096).is_none());
        let s = w
            .record(1000, 106, 0, 8192)
            .expect("window of 100 ms closed");
        assert_eq!((s.msec, s.ddir, s.bs), (106, 0, 8192));
        let total: u32 = s.bins.iter().map(|b| b.1).sum();
        assert_eq!(total, 3);
        assert!(s.bins.contains(&(val_to_idx(1000) as u16, 2)));
        // The next window starts where this one should have ended (105),
        // so drift does not accumulate; it carries only the new I/Os.
        assert!(w.record(3000, 200, 0, 4096).is_none());
        let s = w.record(3000, 205, 0, 4096).unwrap();
        assert_eq!(s.bins, vec![(val_to_idx(3000) as u16, 2)]);
    }

    #[test]
    fn log_lines_have_fios_columns() {
        let s = HistSample {
            msec: 1000,
            ddir: 1,
            bs: 4096,
            bins: vec![(0, 1), (3, 2), (1855, 4)],
        };
        let mut out = Vec::new();
        write_log(&mut out, std::slice::from_ref(&s), 0).unwrap();
        let text = String::from_utf8(out).unwrap();
        let fields: Vec<&str> = text.trim_end().split(", ").collect();
        assert_eq!(fields.len(), 3 + FIO_IO_U_PLAT_NR);
        assert_eq!(&fields[..5], &["1000", "1", "4096", "1", "0"]);
        assert_eq!(fields[6], "2");
        assert_eq!(fields.last(), Some(&"4"));
        let mut out = Vec::new();
        write_log(&mut out, &[s], 2).unwrap();
        let text = String::from_utf8(out).unwrap();
        let fields: Vec<&str> = text.trim_end().split(", ").collect();
        assert_eq!(fields.len(), 3 + FIO_IO_U_PLAT_NR / 4);
        assert_eq!(fields[3], "3", "bins 0-3 summed");
    }
}
