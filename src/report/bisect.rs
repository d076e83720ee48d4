//! A bisect's reports: the terminal summary, Markdown for a CI comment, the HTML page,
//! and bisect.{json,md,html} with the last probe's report beside them.

use std::fmt::Write as _;
use std::path::Path;

use super::bisect_plots::{bisect_plots, replay_svg};
use super::{html_escape, md_code, md_text, sci, shift_text, write_all, STYLE};
use crate::bisect::{BisectReport, Outcome};
use crate::diff::Judgement;
use crate::error::{Error, Result};

/// The terminal summary of `resbisect bisect`.
pub fn bisect_summary(r: &BisectReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "A: {}\nB: {}\nprompt {} ({} tokens)",
        r.engine_a, r.engine_b, r.prompt, r.n_tokens
    );
    let _ = writeln!(s, "\nsearch path:");
    let name_width = r.probes.iter().map(|p| p.purpose.chars().count()).max().unwrap_or(0);
    for (i, p) in r.probes.iter().enumerate() {
        let _ = writeln!(
            s,
            "  {:>2}. {:<name_width$} {:>5} tok  {:>6.2}s + {:>6.2}s  {:>9}  {}",
            i + 1,
            p.purpose,
            p.tokens,
            p.seconds_a,
            p.seconds_b,
            bytes(p.bytes_a + p.bytes_b),
            p.finding
        );
    }
    let _ = writeln!(s);
    if let Some(c) = &r.crash {
        let _ = writeln!(
            s,
            "ENGINE {} FAILED ({}) during the {} probe: {}",
            c.engine, c.label, c.probe, c.error.message
        );
        let _ = writeln!(s, "  {}", c.stopped_at());
    }
    if let Some(m) = &r.token_mismatch {
        let _ = writeln!(s, "TOKENS DIFFER: {}", m.describe());
    }
    first_summary(&mut s, r);
    for note in [&r.numerics_note, &r.replay_note].into_iter().flatten().chain(&r.notes) {
        let _ = writeln!(s, "note: {note}");
    }
    if let Some(twin) = &r.twin {
        let _ = writeln!(s, "{twin}");
    }
    if !r.noise.is_empty() {
        let _ = writeln!(s, "{}", noise_line(r));
    }
    replay_summary(&mut s, r);
    let _ = writeln!(s, "\n{}", cost_line(r));
    if !r.reproduce.is_empty() {
        let _ = writeln!(s, "reproduce:");
        for c in &r.reproduce {
            let _ = writeln!(s, "  {c}");
        }
    }
    s
}

/// The first divergence, or that there is none.
fn first_summary(s: &mut String, r: &BisectReport) {
    match &r.first {
        Some(f) => {
            let m = &f.metrics;
            let _ = writeln!(
                s,
                "FIRST DIVERGENCE: {} at position {} (token {})",
                f.tap, f.position, f.token
            );
            let _ = writeln!(
                s,
                "  rel_l2 {}  max_abs {}  cosine {:.6}  ({} rel_l2 {})",
                sci(m.rel_l2),
                sci(m.max_abs),
                m.cosine,
                judged_name(r.judged),
                sci(f.tolerance.rel_l2)
            );
            if let Some(k) = f.shift {
                let _ = writeln!(s, "  {}", shift_text(k));
            }
        }
        None if r.crash.is_none() && r.token_mismatch.is_none() => {
            let _ = writeln!(s, "{}", bisect_title(r));
        }
        None => {}
    }
}

/// Local replay's table: per layer the error inherited and introduced, and the first
/// tap off its replay.
fn replay_summary(s: &mut String, r: &BisectReport) {
    if r.replay.is_empty() {
        return;
    }
    let _ = writeln!(s, "\nlocal replay on the {} from A's own inputs (max rel_l2 over positions; introduced at the {} replayed positions):", r.replay_oracle, r.replay_positions.len());
    let _ = writeln!(s, "  layer  inherited   introduced  total       verdict");
    for l in &r.replay {
        let verdict = if l.dumps_disagree {
            "A's dumps disagree"
        } else if l.introduces {
            "INTRODUCES error"
        } else if l.inherited > l.tolerance {
            "inherits error"
        } else {
            "clean"
        };
        let _ = writeln!(
            s,
            "  {:>5}  {:<10}  {:<10}  {:<10}  {verdict}",
            l.layer,
            sci(l.inherited),
            sci(l.introduced),
            sci(l.total)
        );
    }
    if let Some(t) = r.replay_taps.iter().find(|t| t.introduces) {
        let _ = writeln!(
            s,
            "  within the layer, the first tap off its replay: {} (largest rel_l2 {} at position {})",
            t.tap,
            sci(t.introduced),
            t.at_position
        );
    }
}

fn judged_name(j: Judgement) -> &'static str {
    match j {
        Judgement::Tolerance => "tolerance",
        Judgement::NoiseFloor => "noise-floor threshold",
    }
}

/// What rows were judged against, and the floor against the level the coarse probe
/// measured along the residual stream.
fn noise_line(r: &BisectReport) -> String {
    let Some(n0) = r.noise.first() else {
        return format!("judged against {}", judged_name(r.judged));
    };
    let levels: Vec<String> = r
        .noise
        .iter()
        .map(|n| format!("{} {}", n.tap.trim_end_matches(".resid_post"), sci(n.p75_rel_l2)))
        .collect();
    // Under the twin each tap has its own measured tolerance: one threshold would mislead.
    let thresholds = match r.twin {
        Some(_) => "per-tap tolerances from the twin".to_string(),
        None => {
            // Rows judged against the floor carry the threshold as their tolerance.
            let cap = match n0.tolerance > n0.threshold {
                true => format!(", at most the tolerance {}", sci(n0.tolerance)),
                false => String::new(),
            };
            format!(
                "noise-floor threshold rel_l2 {} (floor {} × {}{cap})",
                sci(n0.threshold),
                sci(n0.floor),
                crate::tolerance::FLOOR_MARGIN,
            )
        }
    };
    format!(
        "judged against the {}; {thresholds}; coarse residual stream, 75th-percentile row rel_l2: {}",
        judged_name(r.judged),
        levels.join(", ")
    )
}

/// What the search cost: probes, engine runs where chunks made them more, bytes, time.
fn cost_line(r: &BisectReport) -> String {
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    let runs = if (r.engine_runs_a, r.engine_runs_b) == (r.runs_a, r.runs_b) {
        format!("{} run{} of A, {} of B", r.runs_a, plural(r.runs_a), r.runs_b)
    } else {
        format!(
            "{} probe{}: A ran {} time{}, B {} (each chunk of a streamed probe runs an engine that does not \
             resume from its KV cache anew)",
            r.runs_a,
            plural(r.runs_a),
            r.engine_runs_a,
            plural(r.engine_runs_a),
            r.engine_runs_b
        )
    };
    format!("{runs}, {} dumped, {:.1} s", bytes(r.bytes_dumped), r.seconds)
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn bisect_title(r: &BisectReport) -> String {
    match (&r.crash, &r.first) {
        (Some(c), _) => format!("engine {} failed", c.engine),
        (None, Some(f)) => format!("first divergence at {}, position {}", f.tap, f.position),
        (None, None) if r.token_mismatch.is_some() => "the engines ran different tokens".into(),
        // A probe diverged, a later one on the same tokens did not (the notes say why).
        (None, None) if r.outcome == Outcome::Diverged => {
            "divergence not reproduced: a probe diverged, a later one did not (see the notes)".into()
        }
        (None, None) => "no divergence".into(),
    }
}

/// The Markdown lines for different tokens and for a divergence the engines' numerics
/// explain.
fn md_findings(s: &mut String, r: &BisectReport) {
    if let Some(m) = &r.token_mismatch {
        let _ = writeln!(s, "- **tokens differ**: {}", md_text(&m.describe()));
    }
    for note in [&r.numerics_note, &r.replay_note].into_iter().flatten().chain(&r.notes) {
        let _ = writeln!(s, "- note: {}", md_text(note));
    }
    if let Some(twin) = &r.twin {
        let _ = writeln!(s, "- {}", md_text(twin));
    }
}

/// Markdown for a CI comment.
pub fn bisect_markdown(r: &BisectReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## resbisect bisect: {}\n", md_text(&bisect_title(r)));
    let _ = writeln!(
        s,
        "- A: {}\n- B: {}\n- prompt {} ({} tokens, final probes on {})",
        md_text(&r.engine_a),
        md_text(&r.engine_b),
        md_text(&r.prompt),
        r.n_tokens,
        r.prefix
    );
    if let Some(c) = &r.crash {
        let _ = writeln!(
            s,
            "- failure of engine {} in the {} probe: {} ({})",
            c.engine,
            md_text(&c.probe),
            md_text(&c.error.message),
            md_text(&c.stopped_at())
        );
    }
    md_findings(&mut s, r);
    if let Some(f) = &r.first {
        let _ = writeln!(
            s,
            "- first divergence **{}** at position {}: rel_l2 {}, max_abs {}",
            f.tap,
            f.position,
            sci(f.metrics.rel_l2),
            sci(f.metrics.max_abs)
        );
        if let Some(k) = f.shift {
            let _ = writeln!(s, "- {}", md_text(&shift_text(k)));
        }
    }
    let _ = writeln!(s, "- {}", md_text(&noise_line(r)));
    if !r.replay.is_empty() {
        let _ = writeln!(s, "\nLocal replay on the {}:", md_text(&r.replay_oracle));
        let _ = writeln!(
            s,
            "\n| layer | inherited | introduced | total | introduces |\n|---|---|---|---|---|"
        );
        for l in &r.replay {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                l.layer,
                sci(l.inherited),
                sci(l.introduced),
                sci(l.total),
                if l.introduces { "**yes**" } else { "no" }
            );
        }
    }
    let _ = writeln!(
        s,
        "\n| probe | tokens | layers | taps | seconds A/B | bytes | finding |\n|---|---|---|---|---|---|---|"
    );
    for p in &r.probes {
        let _ = writeln!(
            s,
            "| {} | {} | {:?} | {} | {:.2}/{:.2} | {} | {} |",
            md_text(&p.purpose),
            p.tokens,
            p.layers,
            md_text(&p.taps.join(",")),
            p.seconds_a,
            p.seconds_b,
            bytes(p.bytes_a + p.bytes_b),
            md_text(&p.finding)
        );
    }
    let _ = writeln!(
        s,
        "\nReproduce:\n\n```sh\n{}\n```",
        r.reproduce.iter().map(|c| md_code(c)).collect::<Vec<_>>().join("\n")
    );
    s
}

/// Self-contained HTML: verdict, plots of what the probes measured, local replay, the
/// search path, reproduce commands.
pub fn bisect_html(r: &BisectReport) -> Result<String> {
    let mut s = String::new();
    let title = html_escape(&bisect_title(r));
    let _ = write!(s, "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>resbisect bisect: {title}</title><style>{STYLE}</style></head><body>");
    let _ = write!(s, "<h1>resbisect bisect: {title}</h1><table>");
    let _ = write!(
        s,
        "<tr><th>A</th><td>{}</td></tr><tr><th>B</th><td>{}</td></tr>",
        html_escape(&r.engine_a),
        html_escape(&r.engine_b)
    );
    let _ = write!(
        s,
        "<tr><th>prompt</th><td>{} ({} tokens; final probes on the first {})</td></tr></table>",
        html_escape(&r.prompt),
        r.n_tokens,
        r.prefix
    );
    verdict_html(&mut s, r);
    let _ = write!(s, "<p>{}</p>", html_escape(&noise_line(r)));
    s.push_str(&bisect_plots(r)?);
    if !r.replay.is_empty() {
        s.push_str(&replay_html(r)?);
    }
    search_table_html(&mut s, r);
    // One command a line, wrapped: they hold long paths.
    let _ = write!(
        s,
        "<h2>Reproduce</h2><pre class=\"reproduce\">{}</pre>",
        html_escape(&r.reproduce.join("\n"))
    );
    if r.final_diff.is_some() {
        s.push_str("<p>The full comparison of the last probe: <a href=\"report.html\">report.html</a>.</p>");
    }
    s.push_str("</body></html>\n");
    Ok(s)
}

/// The callouts of a crash, different tokens and the first divergence (or none).
fn verdict_html(s: &mut String, r: &BisectReport) {
    if let Some(c) = &r.crash {
        let _ = write!(
            s,
            "<div class=\"callout bad\"><b>Engine {} ({}) failed</b> during the {} probe: {}<br>{}</div>",
            html_escape(&c.engine),
            html_escape(&c.label),
            html_escape(&c.probe),
            html_escape(&c.error.message),
            html_escape(&c.stopped_at())
        );
    }
    if let Some(m) = &r.token_mismatch {
        let _ = write!(
            s,
            "<div class=\"callout bad\"><b>Tokens differ</b>: {}</div>",
            html_escape(&m.describe())
        );
    }
    match &r.first {
        Some(f) => {
            let _ = write!(
                s,
                "<div class=\"callout bad\"><b>First divergence: {} at position {}</b> (token {})<br>rel L2 {} · max |A−B| {} · cosine {:.6} · {} rel L2 {}",
                html_escape(&f.tap), f.position, f.token, sci(f.metrics.rel_l2), sci(f.metrics.max_abs), f.metrics.cosine, judged_name(r.judged), sci(f.tolerance.rel_l2)
            );
            if let Some(k) = f.shift {
                let _ = write!(s, "<br>{}", html_escape(&shift_text(k)));
            }
            s.push_str("</div>");
        }
        None if r.crash.is_none() => s.push_str("<div class=\"callout good\"><b>No divergence</b></div>"),
        None => {}
    }
    for note in [&r.numerics_note, &r.replay_note].into_iter().flatten().chain(&r.notes) {
        let _ = write!(s, "<p>note: {}</p>", html_escape(note));
    }
}

/// Local replay: what it recomputes, its plot, the table per layer and per suspect tap.
fn replay_html(r: &BisectReport) -> Result<String> {
    let mut s = format!("<h2>Local replay</h2><p class=\"legend\">The {} recomputes each layer from A's own dumped input: <i>introduced</i> is A's output against that replay, <i>inherited</i> A's input against B's, <i>total</i> A's output against B's (max rel L2 over positions; <i>introduced</i> over the {} positions replayed: every divergent one, thinned to 64, and evenly spaced controls).</p>", html_escape(&r.replay_oracle), r.replay_positions.len());
    s.push_str(&replay_svg(r)?);
    s.push_str("<table><tr><th>layer</th><th>inherited</th><th>introduced</th><th>total</th><th>verdict</th></tr>");
    for l in &r.replay {
        let verdict = if l.dumps_disagree {
            "<b>A's dumps disagree</b>"
        } else if l.introduces {
            "<b>introduces error</b>"
        } else if l.inherited > l.tolerance {
            "inherits error"
        } else {
            "clean"
        };
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{verdict}</td></tr>",
            l.layer,
            sci(l.inherited),
            sci(l.introduced),
            sci(l.total)
        );
    }
    s.push_str("</table>");
    if !r.replay_taps.is_empty() {
        s.push_str("<p>Taps of the suspect layer against their replay:</p><table><tr><th>tap</th><th>introduced</th><th>at position</th><th>tolerance</th></tr>");
        for t in &r.replay_taps {
            let _ = write!(
                s,
                "<tr><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                html_escape(&t.tap),
                if t.introduces { " ◀" } else { "" },
                sci(t.introduced),
                t.at_position,
                sci(t.tolerance)
            );
        }
        s.push_str("</table><p class=\"legend\">◀ marks the taps whose error this layer introduces: over tolerance against the reference replayed on A's own input.</p>");
    }
    Ok(s)
}

/// The probes in order, with what each found, and their totals.
fn search_table_html(s: &mut String, r: &BisectReport) {
    s.push_str("<h2>Search path</h2><table><tr><th>#</th><th>probe</th><th>tokens</th><th>layers</th><th>taps</th><th>positions</th><th>seconds A / B</th><th>bytes</th><th>finding</th></tr>");
    for (i, p) in r.probes.iter().enumerate() {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2} / {:.2}</td><td>{}</td><td>{}</td></tr>",
            i + 1, html_escape(&p.purpose), p.tokens, html_escape(&crate::engine::layers_arg(&p.layers)), html_escape(&p.taps.join(", ")), html_escape(&p.positions), p.seconds_a, p.seconds_b, bytes(p.bytes_a + p.bytes_b), html_escape(&p.finding)
        );
    }
    let _ = write!(s, "</table><p>{}.</p>", html_escape(&cost_line(r)));
}

/// Write bisect.{json,md,html} and the last probe's report.{json,md,html} into `dir`.
pub fn write_bisect(r: &BisectReport, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // After a crash, a comparison that does not show it (an engine that wrote its dump
    // whole, then died) would read as a pass as report.*: only one that shows it is kept.
    if let Some(d) = r
        .final_diff
        .as_ref()
        .filter(|d| r.crash.is_none() || d.engine_failure().is_some())
    {
        write_all(d, dir)?;
    } else {
        // An earlier run's report.* beside this bisect would be read as its comparison.
        for name in ["report.json", "report.md", "report.html"] {
            match std::fs::remove_file(dir.join(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&dir.join(name), e)),
                _ => {}
            }
        }
    }
    let json = serde_json::to_vec_pretty(r).map_err(|e| Error::input(format!("report: {e}")))?;
    for (name, bytes) in [
        ("bisect.json", json),
        ("bisect.md", bisect_markdown(r).into_bytes()),
        ("bisect.html", bisect_html(r)?.into_bytes()),
    ] {
        crate::output::write_file(&dir.join(name), &bytes)?;
    }
    Ok(())
}
