//! Pictures of a run, as SVG (`iscsi-bypass plot`, `bench --plot`):
//!
//! - the latency percentile spectrum: completion latency against
//!   percentile, on a log axis of 1/(1-p) (0%, 90%, 99%, 99.9%, ... evenly
//!   spaced, as HdrHistogram and fio's plots draw it), one line per
//!   direction;
//! - IOPS over time, one line per path (or per direction for a histogram
//!   log, which has no paths).
//!
//! The input is a bench JSON report (or fio's own `--output-format=json`,
//! which has the percentiles but no time series), or a fio histogram log
//! (`log_hist_msec`, see [`super::fio_hist`]).

use super::fio_hist::{self, HistLog, HistLogError};
use hdrhistogram::Histogram;
use plotters::prelude::*;
use serde_json::Value;
use thiserror::Error;

/// Latency by percentile of one direction: (percentile in %, ns), ascending.
#[derive(Debug, Clone, PartialEq)]
pub struct Spectrum {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// IOPS over time: (seconds since measuring began, IOPS).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// What a picture shows.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotData {
    pub title: String,
    pub spectra: Vec<Spectrum>,
    pub series: Vec<Series>,
    /// What one IOPS line is: "path", "direction" or "job".
    pub series_of: &'static str,
}

#[derive(Debug, Error)]
pub enum PlotError {
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("not a bench or fio JSON report: {0}")]
    Report(String),
    #[error("{0}")]
    HistLog(#[from] HistLogError),
    #[error("nothing to plot: {0}")]
    Nothing(String),
    #[error("picture size {0:?}: give WIDTHxHEIGHT, each 200 to 10000 pixels")]
    Size(String),
    #[error("drawing the SVG: {0}")]
    Draw(String),
}

/// Line colours, in legend order (matplotlib's tab10): spectra and IOPS
/// lines each start at the first.
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),  // blue
    RGBColor(214, 39, 40),   // red
    RGBColor(44, 160, 44),   // green
    RGBColor(255, 127, 14),  // orange
    RGBColor(148, 103, 189), // purple
    RGBColor(140, 86, 75),   // brown
    RGBColor(227, 119, 194), // pink
    RGBColor(23, 190, 207),  // cyan
];

/// The colour of line `i`.
pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Share of the height (below the title) the spectrum takes; the IOPS
/// panel has the rest.
pub const SPECTRUM_SHARE: f64 = 0.55;

/// Default picture size.
pub const DEFAULT_SIZE: (u32, u32) = (1000, 800);

/// Parses `WIDTHxHEIGHT`.
pub fn parse_size(s: &str) -> Result<(u32, u32), PlotError> {
    let bad = || PlotError::Size(s.to_string());
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let w: u32 = w.trim().parse().map_err(|_| bad())?;
    let h: u32 = h.trim().parse().map_err(|_| bad())?;
    if !(200..=10_000).contains(&w) || !(200..=10_000).contains(&h) {
        return Err(bad());
    }
    Ok((w, h))
}

/// The percentiles of a spectrum drawn from a whole histogram of `n`
/// samples: 8 per halving of 1-p (evenly spaced on the log axis), as far as
/// `n` samples resolve (1-p >= 1/n, at most 99.9999%), then the maximum.
pub fn spectrum_percentiles(n: u64) -> Vec<f64> {
    let mut out = Vec::new();
    for k in 0..=160 {
        let tail = 0.5f64.powf(k as f64 / 8.0);
        if tail * (n as f64) < 1.0 || tail < 1e-6 {
            break;
        }
        out.push(100.0 * (1.0 - tail));
    }
    out.push(100.0);
    out
}

/// The spectrum of an HdrHistogram (ns): (percentile, ns).
pub fn spectrum_of_histogram(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    spectrum_percentiles(h.len())
        .into_iter()
        .map(|p| (p, h.value_at_quantile(p / 100.0)))
        .collect()
}

fn report_err(what: impl Into<String>) -> PlotError {
    PlotError::Report(what.into())
}

/// (percentile, ns) pairs of a fio `percentile` object ("99.900000": ns).
fn percentile_map(v: &Value, at: &str) -> Result<Vec<(f64, f64)>, PlotError> {
    let Some(map) = v.as_object() else {
        return Err(report_err(format!("{at} is not an object")));
    };
    let mut points = Vec::with_capacity(map.len());
    for (k, ns) in map {
        let p: f64 = k
            .parse()
            .ok()
            .filter(|p| (0.0..=100.0).contains(p))
            .ok_or_else(|| report_err(format!("{at} has key {k:?}, not a percentile")))?;
        let ns = ns
            .as_f64()
            .ok_or_else(|| report_err(format!("{at}[{k:?}] is {ns}, not a number")))?;
        points.push((p, ns));
    }
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(points)
}

/// The dense spectrum of fio's json+ `bins` ({"ns": count, ...}), by fio's
/// own percentile rule.
fn bins_spectrum(v: &Value, at: &str) -> Result<Vec<(f64, f64)>, PlotError> {
    let Some(map) = v.as_object() else {
        return Err(report_err(format!("{at} is not an object")));
    };
    let mut bins = Vec::with_capacity(map.len());
    for (k, n) in map {
        let ns: f64 = k
            .parse()
            .ok()
            .filter(|ns: &f64| *ns >= 0.0)
            .ok_or_else(|| report_err(format!("{at} has key {k:?}, not a latency")))?;
        let n = n
            .as_u64()
            .ok_or_else(|| report_err(format!("{at}[{k:?}] is {n}, not a count")))?;
        bins.push((ns, n));
    }
    bins.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = bins.iter().map(|b| b.1).sum();
    Ok(fio_hist::rank_percentiles(
        bins.iter().copied(),
        &spectrum_percentiles(total),
    ))
}

/// (percentile, ns) pairs of our dense `[[p, ns], ...]` list.
fn pair_list(v: &Value, at: &str) -> Result<Vec<(f64, f64)>, PlotError> {
    let Some(list) = v.as_array() else {
        return Err(report_err(format!("{at} is not a list")));
    };
    list.iter()
        .enumerate()
        .map(|(i, pair)| match pair.as_array().map(Vec::as_slice) {
            Some([p, ns]) => match (p.as_f64(), ns.as_f64()) {
                (Some(p), Some(ns)) if (0.0..=100.0).contains(&p) => Ok((p, ns)),
                _ => Err(report_err(format!(
                    "{at}[{i}] is {pair}, not [percentile, ns]"
                ))),
            },
            _ => Err(report_err(format!(
                "{at}[{i}] is {pair}, not [percentile, ns]"
            ))),
        })
        .collect()
}

fn number_list(v: &Value, at: &str) -> Result<Vec<f64>, PlotError> {
    let Some(list) = v.as_array() else {
        return Err(report_err(format!("{at} is not a list")));
    };
    list.iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_f64()
                .ok_or_else(|| report_err(format!("{at}[{i}] is {x}, not a number")))
        })
        .collect()
}

impl PlotData {
    /// Reads a JSON report: ours (`iscsi-bypass bench --json`) or fio's.
    pub fn from_json(text: &str) -> Result<PlotData, PlotError> {
        let v: Value = serde_json::from_str(text)?;
        PlotData::from_report(&v)
    }

    /// Reads a parsed JSON report.
    pub fn from_report(v: &Value) -> Result<PlotData, PlotError> {
        let jobs = v
            .get("jobs")
            .and_then(Value::as_array)
            .ok_or_else(|| report_err("it has no `jobs` list"))?;
        if jobs.is_empty() {
            return Err(PlotError::Nothing("the `jobs` list is empty".into()));
        }
        let ours = v.get("iscsi_bypass");
        let dense = ours.and_then(|o| o.get("clat_spectrum"));
        let mut spectra = Vec::new();
        for (ji, job) in jobs.iter().enumerate() {
            let jobname = job.get("jobname").and_then(Value::as_str).unwrap_or("job");
            for dir in ["read", "write", "trim"] {
                let Some(d) = job.get(dir) else { continue };
                let ios = d.get("total_ios").and_then(Value::as_u64).unwrap_or(0);
                if ios == 0 {
                    continue;
                }
                let at = format!("jobs[{ji}].{dir}");
                let points = match dense.and_then(|s| s.get(dir)).filter(|_| jobs.len() == 1) {
                    Some(list) => pair_list(list, &format!("iscsi_bypass.clat_spectrum.{dir}"))?,
                    None => {
                        // clat, or total latency where fio was told
                        // lat_percentiles=1 instead; fio's json+ also has
                        // the bins themselves.
                        let lat = ["clat_ns", "lat_ns"].iter().find_map(|k| {
                            d.get(*k)
                                .filter(|l| l.get("percentile").is_some())
                                .map(|l| (*k, l))
                        });
                        match lat {
                            Some((k, l)) => match l.get("bins") {
                                Some(bins) => bins_spectrum(bins, &format!("{at}.{k}.bins"))?,
                                None => percentile_map(
                                    &l["percentile"],
                                    &format!("{at}.{k}.percentile"),
                                )?,
                            },
                            None => continue,
                        }
                    }
                };
                if points.is_empty() {
                    continue;
                }
                let name = if jobs.len() > 1 {
                    format!("{jobname} {dir}")
                } else {
                    dir.to_string()
                };
                spectra.push(Spectrum { name, points });
            }
        }
        let mut series = Vec::new();
        let mut series_of = "path";
        if let Some(ours) = ours {
            if let Some(ms) = ours.get("iops_series_interval_ms") {
                let ms = ms.as_f64().filter(|ms| *ms > 0.0).ok_or_else(|| {
                    report_err(format!(
                        "iscsi_bypass.iops_series_interval_ms is {ms}, not a positive number"
                    ))
                })?;
                let points = |values: Vec<f64>| -> Vec<(f64, f64)> {
                    values
                        .into_iter()
                        .enumerate()
                        .map(|(i, iops)| ((i + 1) as f64 * ms / 1000.0, iops))
                        .collect()
                };
                let paths = ours.get("paths").and_then(Value::as_array);
                for (i, p) in paths.into_iter().flatten().enumerate() {
                    let Some(values) = p.get("iops_series") else {
                        continue;
                    };
                    let values =
                        number_list(values, &format!("iscsi_bypass.paths[{i}].iops_series"))?;
                    let name = p
                        .get("name")
                        .and_then(Value::as_str)
                        .map(String::from)
                        .unwrap_or_else(|| format!("path {i}"));
                    series.push(Series {
                        name,
                        points: points(values),
                    });
                }
                if series.is_empty() {
                    if let Some(values) = ours.get("iops_series") {
                        series_of = "job";
                        series.push(Series {
                            name: "total".into(),
                            points: points(number_list(values, "iscsi_bypass.iops_series")?),
                        });
                    }
                }
            }
        }
        if spectra.is_empty() && series.is_empty() {
            return Err(PlotError::Nothing(
                "no I/O: no direction has total_ios > 0 with clat_ns.percentile, and there is no IOPS series".into(),
            ));
        }
        let title = match jobs.len() {
            1 => job_title(&jobs[0]),
            n => format!("{n} jobs"),
        };
        Ok(PlotData {
            title,
            spectra,
            series,
            series_of,
        })
    }

    /// Reads a fio histogram log (`write_hist_log` + `log_hist_msec`).
    pub fn from_hist_log(text: &str, title: &str) -> Result<PlotData, PlotError> {
        let log = HistLog::parse(text)?;
        let mut spectra = Vec::new();
        let mut series = Vec::new();
        for d in log.ddirs() {
            let bins = log.summed(d);
            let n: u64 = bins.iter().sum();
            let points = fio_hist::percentiles(&bins, log.coarseness, &spectrum_percentiles(n));
            if !points.is_empty() {
                spectra.push(Spectrum {
                    name: fio_hist::ddir_name(d).into(),
                    points,
                });
            }
            series.push(Series {
                name: fio_hist::ddir_name(d).into(),
                points: log.iops(d),
            });
        }
        if spectra.is_empty() {
            return Err(PlotError::Nothing(format!(
                "the histogram log's {} lines count no completions",
                log.lines.len()
            )));
        }
        Ok(PlotData {
            title: title.to_string(),
            spectra,
            series,
            series_of: "direction",
        })
    }
}

/// "name: rw=randread bs=4096 iodepth=32", from what `job options` has.
fn job_title(job: &Value) -> String {
    let mut t = job
        .get("jobname")
        .and_then(Value::as_str)
        .unwrap_or("job")
        .to_string();
    let opts = job.get("job options");
    let mut sep = ": ";
    for k in ["rw", "bs", "iodepth", "numjobs"] {
        let v = match opts.and_then(|o| o.get(k)) {
            Some(Value::String(v)) => v.clone(),
            Some(Value::Number(v)) => v.to_string(),
            _ => continue,
        };
        t.push_str(&format!("{sep}{k}={v}"));
        sep = " ";
    }
    t
}

/// Where percentile `p` (%) lies on the 1/(1-p) axis; the maximum at `max_x`.
fn x_of(p: f64, max_x: f64) -> f64 {
    if p >= 100.0 {
        max_x
    } else {
        (1.0 / (1.0 - p / 100.0)).min(max_x)
    }
}

/// "99.9%" for x = 1000 on the 1/(1-p) axis; "max" at its end.
fn pct_label(x: f64, max_x: f64) -> String {
    if max_x.is_finite() && (x - max_x).abs() <= max_x * 1e-9 {
        return "max".into();
    }
    let p = 100.0 - 100.0 / x;
    let digits = if x > 100.0 {
        (x / 100.0).log10().ceil().max(0.0) as usize
    } else {
        0
    };
    format!("{p:.digits$}%")
}

fn latency_unit(max_ns: f64) -> (&'static str, f64) {
    if max_ns < 10_000.0 {
        ("ns", 1.0)
    } else if max_ns < 10_000_000.0 {
        ("µs", 1e3)
    } else {
        ("ms", 1e6)
    }
}

fn count_label(v: f64, max: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if max >= 10_000.0 {
        format!("{}k", (v / 1000.0 * 10.0).round() / 10.0)
    } else if max < 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

fn draw_err<E: std::fmt::Debug>(e: E) -> PlotError {
    PlotError::Draw(format!("{e:?}"))
}

const FONT: &str = "sans-serif";

/// Draws `data` as an SVG document of `size` pixels.
pub fn render_svg(data: &PlotData, size: (u32, u32)) -> Result<String, PlotError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let root = root.titled(&data.title, (FONT, 30)).map_err(draw_err)?;
        let body_h = root.dim_in_pixel().1;
        let (top, bottom) = root.split_vertically((body_h as f64 * SPECTRUM_SHARE) as u32);
        draw_spectrum(&top, &data.spectra)?;
        draw_series(&bottom, &data.series, data.series_of)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn draw_spectrum(area: &Area, spectra: &[Spectrum]) -> Result<(), PlotError> {
    let finite_x = spectra
        .iter()
        .flat_map(|s| &s.points)
        .filter(|(p, _)| *p < 100.0)
        .map(|(p, _)| 1.0 / (1.0 - p / 100.0))
        .fold(1.0f64, f64::max);
    // The maximum one decade past the last percentile drawn; without one
    // (fio's list stops at 99.99%), the axis ends at the last decade.
    let has_max = spectra
        .iter()
        .flat_map(|s| &s.points)
        .any(|(p, _)| *p >= 100.0);
    let decade = (finite_x.log10() - 1e-9).ceil().max(1.0);
    let max_x = 10f64.powf(if has_max { decade + 1.0 } else { decade });
    // Labels say "max" at the end only where it is the maximum.
    let label_max = if has_max { max_x } else { f64::INFINITY };
    let max_ns = spectra
        .iter()
        .flat_map(|s| &s.points)
        .map(|(_, ns)| *ns)
        .fold(0.0f64, f64::max);
    let (unit, div) = latency_unit(max_ns);
    let y_max = if max_ns > 0.0 {
        max_ns / div * 1.05
    } else {
        1.0
    };
    let mut keys = vec![1.0, 2.0];
    let mut k = 10.0;
    while k < max_x {
        keys.push(k);
        k *= 10.0;
    }
    keys.push(max_x);
    let mut chart = ChartBuilder::on(area)
        .caption("Completion latency by percentile", (FONT, 22))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d((1.0..max_x).log_scale().with_key_points(keys), 0.0..y_max)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .light_line_style(BLACK.mix(0.04))
        .x_desc("percentile")
        .y_desc(format!("latency ({unit})"))
        .x_label_formatter(&|x| pct_label(*x, label_max))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()
        .map_err(draw_err)?;
    for (i, s) in spectra.iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(
                s.points.iter().map(|&(p, ns)| (x_of(p, max_x), ns / div)),
                c.stroke_width(3),
            ))
            .map_err(draw_err)?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
    }
    if !spectra.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font((FONT, 17))
            .draw()
            .map_err(draw_err)?;
    }
    Ok(())
}

fn draw_series(area: &Area, series: &[Series], of: &str) -> Result<(), PlotError> {
    let max_t = series
        .iter()
        .flat_map(|s| &s.points)
        .map(|(t, _)| *t)
        .fold(0.0f64, f64::max);
    let max_iops = series
        .iter()
        .flat_map(|s| &s.points)
        .map(|(_, v)| *v)
        .fold(0.0f64, f64::max);
    let caption = if series.is_empty() {
        "IOPS over time: none in this input (fio's JSON has no time series)".to_string()
    } else {
        format!("IOPS over time, per {of}")
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 22))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(
            0.0..if max_t > 0.0 { max_t } else { 1.0 },
            // Headroom for the legend above the lines.
            0.0..if max_iops > 0.0 { max_iops * 1.3 } else { 1.0 },
        )
        .map_err(draw_err)?;
    let y_max = max_iops * 1.3;
    chart
        .configure_mesh()
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .light_line_style(BLACK.mix(0.04))
        .x_desc("seconds")
        .y_desc("IOPS")
        .y_label_formatter(&|v| count_label(*v, y_max))
        .draw()
        .map_err(draw_err)?;
    for (i, s) in series.iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(3)))
            .map_err(draw_err)?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font((FONT, 17))
            .draw()
            .map_err(draw_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_axis_labels() {
        assert_eq!(pct_label(1.0, 1e5), "0%");
        assert_eq!(pct_label(2.0, 1e5), "50%");
        assert_eq!(pct_label(10.0, 1e5), "90%");
        assert_eq!(pct_label(100.0, 1e5), "99%");
        assert_eq!(pct_label(1000.0, 1e5), "99.9%");
        assert_eq!(pct_label(10_000.0, 1e5), "99.99%");
        assert_eq!(pct_label(1e5, 1e5), "max");
        assert_eq!(pct_label(1e5, f64::INFINITY), "99.999%");
        assert!((x_of(99.0, 1e5) - 100.0).abs() < 1e-9);
        assert_eq!(x_of(100.0, 1e5), 1e5);
    }

    #[test]
    fn spectrum_stops_where_the_samples_do() {
        let p = spectrum_percentiles(1000);
        assert_eq!(p[0], 0.0);
        assert_eq!(*p.last().unwrap(), 100.0);
        // 1000 samples resolve 99.9% but not beyond.
        let below_max = p[p.len() - 2];
        assert!(below_max <= 99.9 && below_max > 99.8, "{below_max}");
        let p = spectrum_percentiles(u64::MAX);
        assert!(p[p.len() - 2] > 99.9998 && p.len() == 161, "{p:?}");
        assert_eq!(spectrum_percentiles(0), vec![100.0]);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1200x900").unwrap(), (1200, 900));
        for bad in ["1200", "x", "0x100", "100000x500", "axb"] {
            assert!(
                matches!(parse_size(bad), Err(PlotError::Size(ref s)) if s == bad),
                "{bad}"
            );
        }
    }

    #[test]
    fn reads_fio_style_percentiles_and_our_series() {
        let v = serde_json::json!({
            "jobs": [{"jobname": "j", "read": {"total_ios": 10, "clat_ns": {"percentile": {"99.000000": 200, "50.000000": 100}}},
                      "write": {"total_ios": 0, "clat_ns": {"percentile": {"50.000000": 0}}}}],
            "iscsi_bypass": {"iops_series_interval_ms": 500,
                             "paths": [{"name": "a", "iops_series": [1.0, 2.0]}, {"name": "b", "iops_series": [3.0]}]}
        });
        let d = PlotData::from_report(&v).unwrap();
        assert_eq!(d.title, "j");
        let job = serde_json::json!({"jobname": "db", "job options": {"rw": "randrw", "bs": "8k", "iodepth": 16, "size": "1g"}});
        assert_eq!(job_title(&job), "db: rw=randrw bs=8k iodepth=16");
        assert_eq!(
            d.spectra,
            vec![Spectrum {
                name: "read".into(),
                points: vec![(50.0, 100.0), (99.0, 200.0)]
            }]
        );
        assert_eq!(d.series.len(), 2);
        assert_eq!(d.series[0].points, vec![(0.5, 1.0), (1.0, 2.0)]);
        assert_eq!(d.series[1].name, "b");
    }

    #[test]
    fn bad_reports_name_the_field() {
        let e = PlotData::from_json("{\"jobs\": [").unwrap_err();
        assert!(
            matches!(e, PlotError::Json(_)) && e.to_string().contains("line 1"),
            "{e}"
        );
        let e = PlotData::from_json("{\"job\": []}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no `jobs` list"), "{e}");
        let e = PlotData::from_json(
            r#"{"jobs": [{"read": {"total_ios": 5, "clat_ns": {"percentile": {"50.000000": "fast"}}}}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("jobs[0].read.clat_ns.percentile[\"50.000000\"]"),
            "{e}"
        );
        let e = PlotData::from_json(r#"{"jobs": [{"read": {"total_ios": 0}}]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("nothing to plot"), "{e}");
        let e = PlotData::from_json(
            r#"{"jobs": [{}], "iscsi_bypass": {"iops_series_interval_ms": 100, "paths": [{"iops_series": [1, "x"]}]}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("iscsi_bypass.paths[0].iops_series[1]"), "{e}");
    }

    #[test]
    fn renders_an_svg_of_the_size_asked() {
        let d = PlotData {
            title: "t".into(),
            spectra: vec![Spectrum {
                name: "read".into(),
                points: vec![(0.0, 1e4), (99.0, 2e4), (100.0, 5e4)],
            }],
            series: vec![],
            series_of: "path",
        };
        let svg = render_svg(&d, (640, 480)).unwrap();
        assert!(
            svg.contains("width=\"640\"") && svg.contains("height=\"480\""),
            "{svg}"
        );
        assert!(svg.contains("\n99%\n") && svg.contains("\nmax\n"), "{svg}");
        assert!(svg.contains("none in this input"));
    }
}
