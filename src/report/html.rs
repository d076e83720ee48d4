//! A diff's self-contained HTML report: the verdict per prompt, its plots, no script.

use std::fmt::Write as _;

use super::plots::prompt_plots;
use super::{abbreviate, html_escape, sci, worst_tap, STYLE};
use crate::diff::{DiffReport, FirstDivergence};
use crate::error::Result;

/// One self-contained HTML file: no script, no external resource; every piece of text
/// from the dumps is escaped.
pub fn html(r: &DiffReport) -> Result<String> {
    let mut s = String::new();
    // A crashed engine's report must not read as a pass, whatever it wrote before the crash.
    let title = match r.engine_failure() {
        Some(_) => "engine failure",
        None if r.diverged => "divergence found",
        None => "no divergence",
    };
    let _ = write!(s, "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>resbisect: {title}</title><style>{STYLE}</style></head><body>");
    let _ = write!(s, "<h1>resbisect: {title}</h1><table>");
    for (name, side) in [("A", &r.a), ("B", &r.b)] {
        let _ = write!(
            s,
            "<tr><th>{name}</th><td>{}</td><td>{}</td><td>{:?}{}</td></tr>",
            html_escape(&side.path),
            html_escape(&side.engine.describe()),
            side.status,
            side.error
                .as_ref()
                .map(|e| format!(": {}", html_escape(&e.message)))
                .unwrap_or_default()
        );
    }
    s.push_str("</table>");
    for n in &r.notes {
        let _ = write!(s, "<p class=\"legend\">note: {}</p>", html_escape(n));
    }
    for p in &r.prompts {
        let _ = write!(
            s,
            "<h2>prompt {} <small>({} tokens)</small></h2>",
            html_escape(&p.id),
            p.n_tokens
        );
        match &p.first {
            Some(f) => first_divergence_html(&mut s, f, p.judged),
            None => {
                let w = worst_tap(p)
                    .map(|t| format!(" — max rel L2 {} at {}", sci(t.max_rel_l2()), html_escape(&t.tap)))
                    .unwrap_or_default();
                let _ = write!(
                    s,
                    "<div class=\"callout good\"><b>No divergence</b> over {} taps{w}</div>",
                    p.taps.len()
                );
            }
        }
        if let Some(text) = &p.text {
            let _ = write!(
                s,
                "<details><summary>prompt text</summary><pre class=\"prompt\">{}</pre></details>",
                html_escape(text)
            );
        }
        s.push_str(&prompt_plots(p)?);
        if !p.missing_in_a.is_empty() || !p.missing_in_b.is_empty() {
            let _ = write!(
                s,
                "<p>missing in A: {} · missing in B: {}</p>",
                html_escape(&abbreviate(&p.missing_in_a)),
                html_escape(&abbreviate(&p.missing_in_b))
            );
        }
        for (side, missing) in [("A", &p.rows_missing_in_a), ("B", &p.rows_missing_in_b)] {
            for rows in missing {
                let _ = write!(
                    s,
                    "<p>rows missing in {side} (not compared): {}</p>",
                    html_escape(&rows.describe())
                );
            }
        }
    }
    s.push_str("</body></html>\n");
    Ok(s)
}

/// The callout of a first divergence: its metrics, top channels and the taps downstream.
fn first_divergence_html(s: &mut String, f: &FirstDivergence, judged: crate::diff::Judgement) {
    let _ = write!(
        s,
        "<div class=\"callout bad\"><b>First divergence: {} at position {}</b> (token {})<br>rel L2 {} · max |A−B| {} · cosine {:.6} · SQNR {:.1} dB · non-finite A/B {}/{} · {} rel L2 {}",
        html_escape(&f.tap), f.position, f.token, sci(f.metrics.rel_l2), sci(f.metrics.max_abs), f.metrics.cosine, f.metrics.sqnr_db, f.metrics.nonfinite_a, f.metrics.nonfinite_b,
        match judged {
            crate::diff::Judgement::Tolerance => "tolerance",
            crate::diff::Judgement::NoiseFloor => "noise-floor threshold",
        },
        sci(f.tolerance.rel_l2)
    );
    if let Some(k) = f.shift {
        let _ = write!(s, "<br>{}", html_escape(&super::shift_text(k)));
    }
    if !f.heads.is_empty() {
        let heads: Vec<String> = f
            .heads
            .iter()
            .take(8)
            .map(|h| format!("head {} {}", h.head, sci(h.rel_l2)))
            .collect();
        let _ = write!(s, "<br>heads by rel L2: {}", heads.join(" · "));
    }
    if let Some(l) = &f.metrics.logits {
        let _ = write!(
            s,
            "<br>logits: KL {} · top-1 {} · top-5 overlap {}/5",
            sci(l.kl),
            if l.top1_agree { "agrees" } else { "differs" },
            l.top5_overlap
        );
    }
    s.push_str("<table><tr><th>channel</th><th>A</th><th>B</th></tr>");
    for c in &f.top_channels {
        let _ = write!(s, "<tr><td>{}</td><td>{:.6}</td><td>{:.6}</td></tr>", c.index, c.a, c.b);
    }
    s.push_str("</table>");
    if !f.growth.is_empty() {
        // Collapsed: up to 40 rows would push the plots far down the page.
        let shown = f.growth.len().min(40);
        let _ = write!(s, "<details class=\"growth\"><summary>Downstream: {shown} tap{} after {} (rel L2 at this position and max)</summary><table><tr><th>tap</th><th>rel L2 at this position</th><th>max rel L2</th></tr>", if shown == 1 { "" } else { "s" }, html_escape(&f.tap));
        for g in f.growth.iter().take(40) {
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                html_escape(&g.tap),
                g.at_position.map(sci).unwrap_or_default(),
                sci(g.max_rel_l2)
            );
        }
        s.push_str("</table></details>");
    }
    s.push_str("</div>");
}
