//! The nightly history (JSONL, one line per run) and its trend table and plot.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::plots::{clamp_log, plot_err, PLOT_FLOOR};
use super::{html_escape, md_text, sci, worst_tap, STYLE};
use crate::diff::DiffReport;
use crate::error::{Error, Result};

/// One line of the nightly history (JSONL): a run's verdict per prompt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub run: String,
    pub date: String,
    pub prompts: Vec<HistoryPrompt>,
    /// The run's engine failed or never finished: no prompt of it counts as clean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_failure: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryPrompt {
    pub id: String,
    pub diverged: bool,
    pub first_tap: Option<String>,
    pub first_position: Option<usize>,
    pub max_rel_l2: f64,
}

/// `r`'s verdicts as the history's line for run `run` (default: its date and time, UTC).
pub fn history_entry(r: &DiffReport, run: Option<&str>) -> HistoryEntry {
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    HistoryEntry {
        run: run.map_or_else(|| date.clone(), str::to_string),
        date,
        prompts: r
            .prompts
            .iter()
            .map(|p| HistoryPrompt {
                id: p.id.clone(),
                diverged: p.diverged(),
                first_tap: p.first.as_ref().map(|f| f.tap.clone()),
                first_position: p.first.as_ref().map(|f| f.position),
                max_rel_l2: worst_tap(p)
                    .map(|t| {
                        if t.max_rel_l2().is_finite() {
                            t.max_rel_l2()
                        } else {
                            1e3
                        }
                    })
                    .unwrap_or(0.0),
            })
            .collect(),
        engine_failure: r.engine_failure(),
    }
}

/// Append `entry` to the history at `path` (created if absent) under an exclusive lock,
/// so that runs at once neither interleave nor take one name. A name the history already
/// holds is refused when the user `chose` it, else made unique ("<date>-2"); a history
/// whose last line lacks its newline (edited by hand) gets one first.
///
/// Errors: `path` cannot be opened, locked or written; its lines are not history entries;
/// a chosen name is taken (all bad input, exit 2).
pub fn append_history(path: &Path, mut entry: HistoryEntry, chose: bool) -> Result<()> {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    // SAFETY: flock on a descriptor this function owns; the lock ends when it closes.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(Error::io(path, std::io::Error::last_os_error()));
    }
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(|e| Error::io(path, e))?;
    let taken: Vec<String> = parse_history(path, &text)?.into_iter().map(|e| e.run).collect();
    if taken.contains(&entry.run) {
        if chose {
            return Err(Error::input(format!(
                "--run {}: {} already holds a run of that name",
                entry.run,
                path.display()
            )));
        }
        let base = entry.run.clone();
        entry.run = (2..)
            .map(|n| format!("{base}-{n}"))
            .find(|name| !taken.contains(name))
            .expect("an unused suffix");
    }
    let line = serde_json::to_string(&entry).map_err(|e| Error::input(format!("history: {e}")))?;
    let lead = if text.is_empty() || text.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    writeln!(f, "{lead}{line}").map_err(|e| Error::io(path, e))
}

pub fn read_history(path: &Path) -> Result<Vec<HistoryEntry>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_history(path, &text)
}

/// The entries of history `text`, read from `path` (named in errors).
fn parse_history(path: &Path, text: &str) -> Result<Vec<HistoryEntry>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| Error::input(format!("{}:{}: {e}", path.display(), i + 1))))
        .collect()
}

/// Per prompt, the run where its current divergence streak began (None if it is
/// healthy in the latest run).
pub fn first_bad_runs(history: &[HistoryEntry]) -> Vec<(String, Option<String>)> {
    let mut ids: Vec<String> = Vec::new();
    for e in history {
        for p in &e.prompts {
            if !ids.contains(&p.id) {
                ids.push(p.id.clone());
            }
        }
    }
    ids.into_iter()
        .map(|id| {
            let mut start = None;
            for e in history {
                match e.prompts.iter().find(|p| p.id == id) {
                    Some(p) if p.diverged && start.is_none() => start = Some(e.run.clone()),
                    Some(p) if p.diverged => {}
                    Some(_) => start = None,
                    None => {}
                }
            }
            (id, start)
        })
        .collect()
}

/// A prompt's verdict in one run: (diverged, `tap@position` or `ok <worst rel L2>`).
fn trend_cell(e: &HistoryEntry, id: &str) -> Option<(bool, String)> {
    e.prompts.iter().find(|p| p.id == id).map(|p| match &p.first_tap {
        Some(tap) if p.diverged => (
            true,
            format!("{tap}@{}", p.first_position.map(|v| v.to_string()).unwrap_or_default()),
        ),
        _ if p.diverged => (true, "diverged".into()),
        _ if e.engine_failure.is_some() => (true, "engine failed".into()),
        _ => (false, format!("ok {}", sci(p.max_rel_l2))),
    })
}

/// Trend table (Markdown) and HTML page with one line per prompt of max rel L2 per run.
pub fn trend(history: &[HistoryEntry]) -> Result<(String, String)> {
    if history.is_empty() {
        return Err(Error::input("the history is empty"));
    }
    let firsts = first_bad_runs(history);
    let ids: Vec<&String> = firsts.iter().map(|(id, _)| id).collect();
    let md = trend_markdown(history, &ids, &firsts);
    let svg = trend_svg(history, &ids)?;
    Ok((md, trend_html(history, &ids, &firsts, &svg)))
}

/// The trend table in Markdown: a row per run, a column per prompt.
fn trend_markdown(history: &[HistoryEntry], ids: &[&String], firsts: &[(String, Option<String>)]) -> String {
    let mut md = String::from("## resbisect trend\n\n| run |");
    for id in ids {
        let _ = write!(md, " {} |", md_text(id));
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(ids.len()));
    md.push('\n');
    for e in history {
        let _ = write!(md, "| {} |", md_text(&e.run));
        for id in ids {
            let cell = match trend_cell(e, id) {
                Some((true, text)) => format!(" **{}** |", md_text(&text)),
                Some((false, text)) => format!(" {text} |"),
                None => " |".into(),
            };
            md.push_str(&cell);
        }
        md.push('\n');
    }
    md.push('\n');
    for (id, first) in firsts {
        if let Some(run) = first {
            let _ = writeln!(md, "- **{}** has diverged since run {}", md_text(id), md_text(run));
        }
    }
    md
}

/// Each prompt's worst rel L2 per run, one line per prompt.
fn trend_svg(history: &[HistoryEntry], ids: &[&String]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 380)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("worst rel L2 per run", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(
                -0.5f64..(history.len() as f64 - 0.5).max(0.5),
                (PLOT_FLOOR..1e3f64).log_scale(),
            )
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("run")
            .x_label_formatter(&|x| {
                history
                    .get(x.round() as usize)
                    .map(|e| e.run.clone())
                    .unwrap_or_default()
            })
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .draw()
            .map_err(plot_err)?;
        for (k, id) in ids.iter().enumerate() {
            let pts: Vec<(f64, f64)> = history
                .iter()
                .enumerate()
                .filter_map(|(i, e)| {
                    e.prompts
                        .iter()
                        .find(|p| &&p.id == id)
                        .map(|p| (i as f64, clamp_log(p.max_rel_l2)))
                })
                .collect();
            let color = Palette99::pick(k).to_rgba();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(plot_err)?
                .label(id.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// The trend page: the table, since when each prompt diverges, and the plot `svg`.
fn trend_html(history: &[HistoryEntry], ids: &[&String], firsts: &[(String, Option<String>)], svg: &str) -> String {
    let mut html = format!("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>resbisect trend</title><style>{STYLE}</style></head><body><h1>resbisect trend</h1><table><tr><th>run</th>");
    for id in ids {
        let _ = write!(html, "<th>{}</th>", html_escape(id));
    }
    html.push_str("</tr>");
    for e in history {
        let _ = write!(html, "<tr><td>{}</td>", html_escape(&e.run));
        for id in ids {
            let cell = match trend_cell(e, id) {
                Some((true, text)) => format!("<td style=\"background:#fde2e2\">{}</td>", html_escape(&text)),
                Some((false, text)) => format!("<td>{text}</td>"),
                None => "<td></td>".into(),
            };
            html.push_str(&cell);
        }
        html.push_str("</tr>");
    }
    html.push_str("</table><ul>");
    for (id, first) in firsts {
        if let Some(run) = first {
            let _ = write!(
                html,
                "<li><b>{}</b> has diverged since run {}</li>",
                html_escape(id),
                html_escape(run)
            );
        }
    }
    html.push_str("</ul>");
    html.push_str(svg);
    html.push_str("</body></html>\n");
    html
}
