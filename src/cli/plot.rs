//! `iscsi-bypass plot`: an SVG of a bench (or fio) JSON report or of a fio
//! histogram log; `bench --plot` writes the same picture after a run.

use super::Output;
use anyhow::{Context, Result};
use clap::Args;
use iscsi_bypass::bench::plot::{self, PlotData};
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
pub struct PlotArgs {
    /// A JSON report (`iscsi-bypass bench --json`, or fio's
    /// `--output-format=json`), or a fio histogram log (`write_hist_log`
    /// with `log_hist_msec`: `msec, ddir, bs, bin0..binN` lines).
    pub input: PathBuf,
    /// Where to write the SVG.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Picture size in pixels, WIDTHxHEIGHT.
    #[arg(long, default_value = "1000x800")]
    pub size: String,
    /// Title (default: the job name, or the log's file name).
    #[arg(long)]
    pub title: Option<String>,
}

/// Reads `input` as JSON when it starts with `{`, else as a histogram log.
pub fn load(input: &Path) -> Result<PlotData> {
    let bytes = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not text (byte {} is not UTF-8)",
            input.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let name = input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| input.display().to_string());
    let data = if text.trim_start().starts_with('{') {
        PlotData::from_json(&text)
            .with_context(|| format!("{} (read as a JSON report)", input.display()))?
    } else {
        PlotData::from_hist_log(&text, &name).with_context(|| {
            format!(
                "{} (read as a fio histogram log: it does not start with `{{`)",
                input.display()
            )
        })?
    };
    Ok(data)
}

pub fn write_svg(data: &PlotData, size: (u32, u32), out: &Path) -> Result<()> {
    let svg = plot::render_svg(data, size)?;
    std::fs::write(out, svg).with_context(|| format!("writing {}", out.display()))
}

pub fn run(args: &PlotArgs, out: &Output) -> Result<()> {
    let size = plot::parse_size(&args.size)?;
    let mut data = load(&args.input)?;
    if let Some(t) = &args.title {
        data.title = t.clone();
    }
    write_svg(&data, size, &args.out)?;
    let spectra: Vec<&str> = data.spectra.iter().map(|s| s.name.as_str()).collect();
    if out.json {
        println!(
            "{}",
            serde_json::json!({
                "svg": args.out,
                "spectra": spectra,
                "iops_series": data.series.iter().map(|s| &s.name).collect::<Vec<_>>(),
            })
        );
    } else {
        eprintln!(
            "wrote {}: latency spectrum of {}, IOPS over time of {} {}(s)",
            args.out.display(),
            if spectra.is_empty() {
                "nothing".to_string()
            } else {
                spectra.join(", ")
            },
            data.series.len(),
            data.series_of
        );
    }
    Ok(())
}

/// `bench --plot FILE`: the picture of a report made by `report::json`.
pub fn write_report_plot(report: &serde_json::Value, out: &Path) -> Result<()> {
    let data = PlotData::from_report(report).context("plotting the run")?;
    write_svg(&data, plot::DEFAULT_SIZE, out)
}
