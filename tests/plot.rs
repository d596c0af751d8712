//! Pictures: `bench --plot` and `iscsi-bypass plot` over our JSON, fio's
//! JSON and fio's histogram log, each SVG rendered to a PNG (resvg) and
//! checked pixel by pixel: its size, that it is not blank, and that each
//! line is drawn in its colour in its panel. Bad input gives one clear line.

mod common;

use iscsi_bypass::bench::fio_hist::{self, HistLog};
use iscsi_bypass::bench::plot::{color, PlotData, SPECTRUM_SHARE};
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
        // Not every interval: on a loaded machine a path can stall for some.
        assert!(
            series.iter().any(|&x| x > 0.0),
            "the path carries I/O: {series:?}"
        );
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
    // One IOPS line per path in its colour, one point per interval (two
    // balanced paths may draw over each other, so count their points here
    // and their pixels in `each_path_is_drawn_in_its_colour`).
    let text = std::fs::read_to_string(&svg).unwrap();
    for i in 0..3 {
        let c = color(i);
        let stroke = format!("stroke=\"#{:02X}{:02X}{:02X}\"", c.0, c.1, c.2);
        let lines: Vec<usize> = text
            .lines()
            .filter(|l| l.starts_with("<polyline") && l.contains(&stroke))
            .map(|l| {
                l.split("points=\"")
                    .nth(1)
                    .and_then(|p| p.split('"').next())
                    .unwrap()
                    .split_whitespace()
                    .count()
            })
            .collect();
        // Path 0's colour is also the read spectrum's (160-odd points);
        // each colour has its legend swatch (2 points).
        let series = lines.iter().filter(|&&n| n == 20).count();
        assert_eq!(
            series,
            usize::from(i < 2),
            "colour {i}: polylines of {lines:?} points"
        );
    }
    assert!(count_color(&png, color(2), bottom) < NONE, "a third line");
}

#[test]
fn each_path_is_drawn_in_its_colour() {
    let dir = scratch("paths");
    // Three paths: steady, slower, and one that is down for a second.
    let steady: Vec<f64> = (0..30).map(|i| 40_000.0 + (i % 3) as f64 * 500.0).collect();
    let slow: Vec<f64> = (0..30).map(|i| 15_000.0 + (i % 4) as f64 * 300.0).collect();
    let back: Vec<f64> = (0..30)
        .map(|i| if (10..20).contains(&i) { 0.0 } else { 28_000.0 })
        .collect();
    let report = serde_json::json!({
        "jobs": [{
            "jobname": "three",
            "read": {"total_ios": 100, "clat_ns": {"percentile": {"50.000000": 90000, "99.000000": 400000, "99.900000": 900000}}},
            "write": {"total_ios": 100, "clat_ns": {"percentile": {"50.000000": 150000, "99.000000": 700000, "99.900000": 2000000}}},
        }],
        "iscsi_bypass": {
            "iops_series_interval_ms": 100,
            "paths": [
                {"name": "a", "iops_series": steady},
                {"name": "b", "iops_series": slow},
                {"name": "c", "iops_series": back},
            ],
        },
    });
    let json = dir.join("three.json");
    std::fs::write(&json, report.to_string()).unwrap();
    let svg = dir.join("three.svg");
    let (ok, _, err) = cmd(&[
        "plot",
        json.to_str().unwrap(),
        "-o",
        svg.to_str().unwrap(),
        "--size",
        "1200x900",
    ]);
    assert!(ok, "{err}");
    let png = render_png(&svg);
    assert_eq!((png.width(), png.height()), (1200, 900));
    assert_not_blank(&png);
    let (top, bottom) = panels(&png);
    for i in 0..2 {
        let n = count_color(&png, color(i), top.clone());
        assert!(n > LINE, "spectrum {i}: {n} pixels of its colour");
    }
    assert!(count_color(&png, color(2), top) < NONE, "a third spectrum");
    for i in 0..3 {
        let n = count_color(&png, color(i), bottom.clone());
        assert!(n > LINE, "path {i}: {n} pixels of its colour");
    }
    assert!(count_color(&png, color(3), bottom) < NONE, "a fourth line");
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
            "--rate_iops=20000,5000",
            "--write_hist_log=h",
            "--log_hist_msec=100",
            "--output-format=json+",
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

    // Our reading of the log's bins gives the latencies fio itself gives
    // them: json+ lists each non-empty bin of the whole run under
    // plat_idx_to_val(bin), and the log holds the same bins (all but the
    // last part-interval of the run).
    let hist = HistLog::parse(&std::fs::read_to_string(&log).unwrap()).unwrap();
    assert_eq!(hist.coarseness, 0);
    assert_eq!(hist.ddirs(), vec![0, 1]);
    for (ddir, name) in [(0, "read"), (1, "write")] {
        let fio_bins = &fio["jobs"][0][name]["clat_ns"]["bins"];
        let summed = hist.summed(ddir);
        let mut logged = 0;
        for (i, &n) in summed.iter().enumerate().filter(|(_, n)| **n > 0) {
            let ns = fio_hist::plat_idx_to_val(i);
            let whole_run = fio_bins[ns.to_string()].as_u64();
            assert!(
                whole_run.is_some_and(|w| w >= n),
                "{name} bin {i}: {n} I/Os at {ns} ns in the log, fio's json+ has {whole_run:?}"
            );
            logged += n;
        }
        let total = fio["jobs"][0][name]["clat_ns"]["N"].as_u64().unwrap();
        assert!(
            logged * 10 >= total * 7,
            "{name}: {logged} of {total} I/Os logged"
        );
        // IOPS over each line's interval give back the logged I/Os (fio
        // closes an interval at the first completion 100 ms after the last,
        // so on a loaded machine there are fewer, longer ones).
        let iops = hist.iops(ddir);
        assert!(iops.len() >= 2, "{name}: {iops:?}");
        let mut from = 0.0;
        let mut back = 0.0;
        for &(t, v) in &iops {
            back += v * (t - from);
            from = t;
        }
        assert!(
            (back - logged as f64).abs() <= 1e-6 * logged as f64 + 1e-6,
            "{name}: {back} vs {logged} from {iops:?}"
        );
    }

    // fio's json+ has its bins: our percentile rule over them gives fio's
    // own percentiles, all of them; the spectrum drawn from them meets
    // fio's list at 50%.
    let data = PlotData::from_json(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(data.spectra.len(), 2);
    assert!(data.series.is_empty());
    for (s, name) in data.spectra.iter().zip(["read", "write"]) {
        assert_eq!(s.name, name);
        // 8 per halving of 1-p, as far as its ~5000 or more I/Os resolve.
        assert!(s.points.len() > 90, "{name}: {} points", s.points.len());
        let lat = &fio["jobs"][0][name]["clat_ns"];
        let mut bins: Vec<(f64, u64)> = lat["bins"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, n)| (k.parse().unwrap(), n.as_u64().unwrap()))
            .collect();
        bins.sort_by(|a, b| a.0.total_cmp(&b.0));
        let theirs: Vec<(f64, f64)> = lat["percentile"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(p, v)| (p.parse().unwrap(), v.as_f64().unwrap()))
            .collect();
        // (serde_json's map is in key order: "10.000000" before "5.000000")
        let mut theirs = theirs;
        theirs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let pcts: Vec<f64> = theirs.iter().map(|x| x.0).collect();
        assert_eq!(
            fio_hist::rank_percentiles(bins.iter().copied(), &pcts),
            theirs,
            "{name}"
        );
        let p50 = s.points.iter().find(|x| x.0 == 50.0).unwrap().1;
        assert_eq!(
            Some(p50),
            lat["percentile"]["50.000000"].as_f64(),
            "{name} p50"
        );
        let max = fio["jobs"][0][name]["clat_ns"]["max"].as_f64().unwrap();
        let ours = s.points.last().unwrap().1;
        assert!(
            (ours - max).abs() <= max / 64.0 + 1.0,
            "{name} max: {ours} vs {max}"
        );
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
