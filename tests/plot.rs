//! Pictures: `bench --plot` and `iscsi-bypass plot` over our JSON, fio's
//! JSON and fio's histogram log, each SVG rendered to a PNG (resvg) and
//! checked pixel by pixel: its size, that it is not blank, and that each
//! line is drawn in its colour in its panel. Bad input gives one clear line.

mod common;

use iscsi_bypass::bench::fio_hist::{self, HistLog};
use iscsi_bypass::bench::plot::{color, SPECTRUM_SHARE};
use resvg::tiny_skia::Pixmap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_iscsi-bypass");

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ib-plot-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cmd(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(BIN).args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Renders `svg` to a PNG next to it (for a person to look at) and decodes
/// that PNG back.
fn render_png(svg: &Path) -> Pixmap {
    let text = std::fs::read_to_string(svg).unwrap();
    let tree = resvg::usvg::Tree::from_str(&text, &resvg::usvg::Options::default())
        .unwrap_or_else(|e| panic!("{} does not parse as SVG: {e}", svg.display()));
    let size = tree.size().to_int_size();
    let mut pixmap = Pixmap::new(size.width(), size.height()).unwrap();
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::default(),
        &mut pixmap.as_mut(),
    );
    let png = pixmap.encode_png().unwrap();
    let at = svg.with_extension("png");
    std::fs::write(&at, &png).unwrap();
    eprintln!("rendered {}", at.display());
    Pixmap::decode_png(&png).unwrap()
}

/// Pixels within a small distance of `c` in rows `rows`.
fn count_color(p: &Pixmap, c: plotters::style::RGBColor, rows: Range<u32>) -> usize {
    let w = p.width() as usize;
    p.pixels()
        .iter()
        .enumerate()
        .filter(|(i, _)| rows.contains(&((i / w) as u32)))
        .filter(|(_, px)| {
            let px = px.demultiply();
            let d = (px.red() as i32 - c.0 as i32).abs()
                + (px.green() as i32 - c.1 as i32).abs()
                + (px.blue() as i32 - c.2 as i32).abs();
            px.alpha() == 255 && d <= 40
        })
        .count()
}

/// The rows of the spectrum panel and of the IOPS panel (with a margin
/// around the split, below the title).
fn panels(p: &Pixmap) -> (Range<u32>, Range<u32>) {
    let h = p.height() as f64;
    let split = 40.0 + (h - 40.0) * SPECTRUM_SHARE;
    (40..(split - 10.0) as u32, (split + 10.0) as u32..p.height())
}

fn assert_not_blank(p: &Pixmap) {
    let inked = p
        .pixels()
        .iter()
        .filter(|px| {
            let px = px.demultiply();
            px.alpha() == 255 && (px.red(), px.green(), px.blue()) != (255, 255, 255)
        })
        .count();
    let transparent = p.pixels().iter().filter(|px| px.alpha() == 0).count();
    assert_eq!(transparent, 0, "the background is filled");
    assert!(inked > 5_000, "only {inked} pixels are not white");
}

/// A line across a panel leaves well over this many pixels of its colour;
/// its legend swatch alone (20 x 3) far fewer.
const LINE: usize = 400;
/// Anti-aliasing of other lines leaves at most this many of a colour not used.
const NONE: usize = 30;

#[test]
fn bench_plot_draws_the_spectrum_and_each_paths_iops_in_its_colour() {
    let dir = scratch("bench");
    let svg = dir.join("run.svg");
    let (ok, out, err) = cmd(&[
        "bench",
        "--runtime",
        "2s",
        "--ramp",
        "200ms",
        "--json",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ours = &v["iscsi_bypass"];
    assert_eq!(ours["iops_series_interval_ms"], 100, "{ours}");
    let paths = ours["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 2);
    for p in paths {
        let series: Vec<f64> = p["iops_series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(series.len(), 20, "2 s in 100 ms intervals: {p}");
        // The series adds up to the path's I/Os.
        let ios: f64 = series.iter().map(|iops| iops * 0.1).sum();
        let total = p["stats"]["total_ios"].as_u64().unwrap() as f64;
        assert!((ios - total).abs() < 1.0, "{ios} vs {total}");
        let busy = series.iter().filter(|&&x| x > 0.0).count();
        assert!(busy >= 10, "most intervals have I/O: {series:?}");
    }
    let spectrum = ours["clat_spectrum"]["read"].as_array().unwrap();
    assert!(spectrum.len() > 100, "a dense spectrum: {}", spectrum.len());
    assert_eq!(spectrum.last().unwrap()[0], 100.0);
    assert_eq!(
        spectrum.last().unwrap()[1],
        v["jobs"][0]["read"]["clat_ns"]["max"]
    );

    // `plot` over the JSON draws the very same picture.
    let json = dir.join("run.json");
    std::fs::write(&json, &out).unwrap();
    let again = dir.join("again.svg");
    let (ok, _, err) = cmd(&[
        "plot",
        json.to_str().unwrap(),
        "-o",
        again.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("IOPS over time of 2 path(s)"), "{err}");
    assert_eq!(
        std::fs::read(&svg).unwrap(),
        std::fs::read(&again).unwrap(),
        "bench --plot and plot of its JSON differ"
    );

    let png = render_png(&svg);
    assert_eq!((png.width(), png.height()), (1000, 800));
    assert_not_blank(&png);
    let (top, bottom) = panels(&png);
    // The default job reads: one spectrum line, in the first colour.
    assert!(
        count_color(&png, color(0), top.clone()) > LINE,
        "read spectrum"
    );
    assert!(
        count_color(&png, color(1), top.clone()) < NONE,
        "no write spectrum"
    );
    // One IOPS line per path, each in its own colour, and no third.
    for i in 0..2 {
        let n = count_color(&png, color(i), bottom.clone());
        assert!(n > LINE, "path {i}: {n} pixels of its colour");
    }
    assert!(count_color(&png, color(2), bottom) < NONE, "a third line");
}

/// fio itself, with the null engine: its JSON and its histogram log.
fn fio_outputs(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    if common::which("fio").is_none() {
        let why = "fio is not installed (scripts/setup.sh installs it)";
        assert!(!common::required(), "CI requires the fio plot test: {why}");
        eprintln!("SKIPPED: {why}");
        return None;
    }
    let o = Command::new("fio")
        .current_dir(dir)
        .args([
            "--name=nulljob",
            "--ioengine=null",
            "--size=1g",
            "--rw=randrw",
            "--bs=4k",
            "--time_based",
            "--runtime=1",
            "--rate_iops=20000",
            "--write_hist_log=h",
            "--log_hist_msec=100",
            "--output-format=json",
            "--output=fio.json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Some((dir.join("fio.json"), dir.join("h_clat_hist.1.log")))
}

#[test]
fn plot_draws_fios_json_and_histogram_log() {
    let dir = scratch("fio");
    let Some((json, log)) = fio_outputs(&dir) else {
        return;
    };
    let fio: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();

    // Our reading of fio's bins gives fio's own percentiles (the log
    // misses at most the last part-interval, so allow the next bin).
    let hist = HistLog::parse(&std::fs::read_to_string(&log).unwrap()).unwrap();
    assert_eq!(hist.coarseness, 0);
    assert_eq!(hist.ddirs(), vec![0, 1]);
    for (ddir, name) in [(0, "read"), (1, "write")] {
        let ours = fio_hist::percentiles(&hist.summed(ddir), 0, &[50.0, 90.0, 99.0]);
        for (p, v) in ours {
            let theirs = fio["jobs"][0][name]["clat_ns"]["percentile"][format!("{p:.6}")]
                .as_f64()
                .unwrap();
            assert!(
                (v - theirs).abs() <= 1.0 + theirs / 32.0,
                "{name} p{p}: ours {v}, fio {theirs}"
            );
        }
        // rate_iops=20000 caps each direction: the log's IOPS are in the
        // thousands.
        let iops = hist.iops(ddir);
        assert!(iops.len() >= 8, "{iops:?}");
        let mid = iops[iops.len() / 2].1;
        assert!((2_000.0..40_000.0).contains(&mid), "{name}: {iops:?}");
    }

    for (input, series_pixels) in [(&log, true), (&json, false)] {
        let svg = input.with_extension("svg");
        let (ok, _, err) = cmd(&[
            "plot",
            input.to_str().unwrap(),
            "-o",
            svg.to_str().unwrap(),
            "--size",
            "800x600",
        ]);
        assert!(ok, "{err}");
        let png = render_png(&svg);
        assert_eq!((png.width(), png.height()), (800, 600));
        assert_not_blank(&png);
        let (top, bottom) = panels(&png);
        for (i, dir) in ["read", "write"].iter().enumerate() {
            let n = count_color(&png, color(i), top.clone());
            assert!(
                n > LINE,
                "{}: {dir} spectrum has {n} pixels",
                input.display()
            );
            let n = count_color(&png, color(i), bottom.clone());
            if series_pixels {
                assert!(n > LINE, "{}: {dir} IOPS has {n} pixels", input.display());
            } else {
                assert!(n < NONE, "fio's JSON has no time series, yet {n} pixels");
            }
        }
    }
}

#[test]
fn bad_input_names_what_is_wrong() {
    let dir = scratch("bad");
    let out = dir.join("x.svg");
    let cases: [(&str, &str, &[&str]); 6] = [
        (
            "truncated.json",
            "{\"jobs\": [{\"jobname\": \"j\"",
            &["truncated.json (read as a JSON report)", "not valid JSON", "line 1 column"],
        ),
        (
            "other.json",
            "{\"iops\": 5}",
            &["other.json", "no `jobs` list"],
        ),
        ("empty.log", "", &["empty.log", "histogram log is empty"]),
        (
            "hdr.log",
            "#[StartTime: 1764547200.000 (seconds since epoch)]\n\"StartTimestamp\",\"Interval_Length\"\n",
            &["hdr.log", "HdrHistogram interval log, not fio's log_hist_msec format"],
        ),
        (
            "lat.log",
            "10, 4512, 0, 4096, 0\n",
            &["lat.log", "line 1", "ddir 4512"],
        ),
        (
            "short.log",
            "100, 0, 4096, 1, 2, 3\n",
            &["short.log", "line 1", "3 bins", "1856"],
        ),
    ];
    for (name, text, says) in cases {
        let input = dir.join(name);
        std::fs::write(&input, text).unwrap();
        let (ok, _, err) = cmd(&["plot", input.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        assert!(!ok, "{name} was accepted");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        for s in says {
            assert!(err.contains(s), "{name}: {s:?} not in {err}");
        }
        assert!(!out.exists(), "{name}: an SVG was written");
    }
    let input = dir.join("missing.json");
    let (ok, _, err) = cmd(&["plot", input.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(
        !ok && err.contains("reading") && err.contains("missing.json"),
        "{err}"
    );
    let (ok, _, err) = cmd(&["plot", "x", "-o", "y", "--size", "10x10"]);
    assert!(!ok && err.contains("\"10x10\""), "{err}");
}
