//! A diff's terminal summary, its Markdown for a CI comment, and the three report files.

use std::fmt::Write as _;
use std::path::Path;

use super::{abbreviate, html, md_code, md_text, sci, shift_text, worst_tap};
use crate::diff::{DiffReport, FirstDivergence, Judgement, PromptDiff};
use crate::error::{Error, Result};

/// The compact summary printed by `resbisect diff`.
pub fn terminal_summary(r: &DiffReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "A: {} ({}, {:?})", r.a.path, r.a.engine.describe(), r.a.status);
    let _ = writeln!(s, "B: {} ({}, {:?})", r.b.path, r.b.engine.describe(), r.b.status);
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    for p in &r.prompts {
        prompt_summary(&mut s, p);
    }
    let result = match r.engine_failure() {
        Some(f) => format!(
            "result: ENGINE FAILURE: {f}{}",
            if r.prompts.iter().any(|p| p.first.is_some()) {
                " (and a divergence in what was compared)"
            } else if r.diverged {
                " (and the engines ran different tokens)"
            } else {
                ""
            }
        ),
        None if r.diverged => "result: DIVERGENCE".into(),
        None => "result: no divergence".into(),
    };
    let _ = writeln!(s, "\n{result}");
    s
}

/// One prompt's lines of the summary.
fn prompt_summary(s: &mut String, p: &PromptDiff) {
    let compared: usize = p.taps.iter().map(|t| t.rows.len()).sum();
    match &p.first {
        // "no divergence over 0 taps" would read as a pass; nothing was compared.
        None if compared == 0 => {
            let why = match &p.token_mismatch {
                Some(m) if m.position == 0 => "the tokens differ from the first",
                _ => "no row of a selected tap is in both dumps",
            };
            let _ = writeln!(s, "\nprompt {} ({} tokens): nothing compared: {why}", p.id, p.n_tokens);
        }
        None => {
            let w = worst_tap(p)
                .map(|t| format!("; max rel_l2 {} at {}", sci(t.max_rel_l2()), t.tap))
                .unwrap_or_default();
            let before = if p.token_mismatch.is_some() {
                " before the tokens differ"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "\nprompt {} ({} tokens): no divergence{before} over {} taps, {compared} rows{w}",
                p.id,
                p.n_tokens,
                p.taps.len()
            );
        }
        Some(f) => first_divergence_summary(s, p, f),
    }
    if let Some(m) = &p.token_mismatch {
        let _ = writeln!(s, "  TOKENS DIFFER: {}", m.describe());
    }
    if !p.missing_in_a.is_empty() {
        let _ = writeln!(
            s,
            "  missing in A ({}): {}",
            p.missing_in_a.len(),
            abbreviate(&p.missing_in_a)
        );
    }
    if !p.missing_in_b.is_empty() {
        let _ = writeln!(
            s,
            "  missing in B ({}): {}",
            p.missing_in_b.len(),
            abbreviate(&p.missing_in_b)
        );
    }
    for (side, missing) in [("A", &p.rows_missing_in_a), ("B", &p.rows_missing_in_b)] {
        for rows in missing {
            let _ = writeln!(s, "  rows missing in {side} (not compared): {}", rows.describe());
        }
    }
}

/// The first divergence of prompt `p`: where, by how much, and how the error grows.
fn first_divergence_summary(s: &mut String, p: &PromptDiff, f: &FirstDivergence) {
    let m = &f.metrics;
    let _ = writeln!(
        s,
        "\nprompt {} ({} tokens): FIRST DIVERGENCE at {}, position {} (token {})",
        p.id, p.n_tokens, f.tap, f.position, f.token
    );
    if p.judged == Judgement::NoiseFloor {
        let _ = writeln!(
            s,
            "  judged against the noise floor (threshold rel_l2 {}) from {}, where a systematic error begins",
            sci(f.tolerance.rel_l2),
            p.drift_onset.as_deref().unwrap_or("the first tap")
        );
    }
    if let Some(k) = f.shift {
        let _ = writeln!(s, "  {}", shift_text(k));
    }
    // What the row was judged against: the tolerance, or the noise-floor threshold.
    let threshold = match p.judged {
        Judgement::Tolerance => "tolerance",
        Judgement::NoiseFloor => "noise-floor threshold",
    };
    let _ = writeln!(
            s,
            "  rel_l2 {}  max_abs {}  cosine {:.6}  nmse {}  sqnr {:.1} dB  non-finite A/B {}/{}  ({threshold} rel_l2 {}, abs {})",
            sci(m.rel_l2), sci(m.max_abs), m.cosine, sci(m.nmse), m.sqnr_db, m.nonfinite_a, m.nonfinite_b, sci(f.tolerance.rel_l2), sci(f.tolerance.abs)
        );
    if let Some(l) = &m.logits {
        let _ = writeln!(
            s,
            "  logits: KL {}  top-1 {}  top-5 overlap {}/5",
            sci(l.kl),
            if l.top1_agree { "agrees" } else { "differs" },
            l.top5_overlap
        );
    }
    let ch: Vec<String> = f
        .top_channels
        .iter()
        .take(5)
        .map(|c| format!("[{}] A {:.4} B {:.4}", c.index, c.a, c.b))
        .collect();
    let _ = writeln!(s, "  top channels by |A-B|: {}", ch.join(", "));
    if !f.heads.is_empty() {
        let h: Vec<String> = f
            .heads
            .iter()
            .take(4)
            .map(|h| format!("head {} {}", h.head, sci(h.rel_l2)))
            .collect();
        let _ = writeln!(s, "  heads by rel_l2: {}", h.join(", "));
    }
    let g: Vec<String> = f
        .growth
        .iter()
        .take(8)
        .map(|g| format!("{} {}", g.tap, g.at_position.map(sci).unwrap_or_else(|| "-".into())))
        .collect();
    if !g.is_empty() {
        let _ = writeln!(s, "  downstream at position {}: {}", f.position, g.join(", "));
    }
    let bad: usize = p.taps.iter().filter(|t| t.first_bad.is_some()).count();
    let _ = writeln!(s, "  {bad} of {} taps diverge somewhere", p.taps.len());
}

/// Markdown for a CI comment.
pub fn markdown(r: &DiffReport) -> String {
    let mut s = String::new();
    let verdict = match r.engine_failure() {
        Some(f) => format!("engine failure — {}", md_text(&f)),
        None if r.diverged => "divergence found".into(),
        None => "no divergence".into(),
    };
    let _ = writeln!(s, "## resbisect: {verdict}\n");
    let _ = writeln!(
        s,
        "- A: `{}` — {}, {:?}",
        md_code(&r.a.path),
        md_text(&r.a.engine.describe()),
        r.a.status
    );
    let _ = writeln!(
        s,
        "- B: `{}` — {}, {:?}",
        md_code(&r.b.path),
        md_text(&r.b.engine.describe()),
        r.b.status
    );
    for n in &r.notes {
        let _ = writeln!(s, "- note: {}", md_text(n));
    }
    let _ = writeln!(s, "\n| prompt | tokens | first divergence | position | rel_l2 | max_abs | worst tap |\n|---|---|---|---|---|---|---|");
    let mut shifts = Vec::new();
    for p in &r.prompts {
        let worst = worst_tap(p)
            .map(|t| format!("{} {}", t.tap, sci(t.max_rel_l2())))
            .unwrap_or_default();
        match &p.first {
            Some(f) => {
                let _ = writeln!(
                    s,
                    "| {} | {} | **{}** | {} | {} | {} | {} |",
                    md_text(&p.id),
                    p.n_tokens,
                    f.tap,
                    f.position,
                    sci(f.metrics.rel_l2),
                    sci(f.metrics.max_abs),
                    worst
                );
                if let Some(k) = f.shift {
                    shifts.push(format!("- prompt {}: {}", md_text(&p.id), md_text(&shift_text(k))));
                }
            }
            None => {
                let _ = writeln!(s, "| {} | {} | none | | | | {} |", md_text(&p.id), p.n_tokens, worst);
            }
        }
    }
    if !shifts.is_empty() {
        let _ = writeln!(s, "\n{}", shifts.join("\n"));
    }
    s
}

/// Write report.json, report.md and report.html into `dir`.
pub fn write_all(r: &DiffReport, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json = serde_json::to_vec(r).map_err(|e| Error::input(format!("report: {e}")))?;
    for (name, bytes) in [
        ("report.json", json),
        ("report.md", markdown(r).into_bytes()),
        ("report.html", html(r)?.into_bytes()),
    ] {
        crate::output::write_file(&dir.join(name), &bytes)?;
    }
    Ok(())
}
