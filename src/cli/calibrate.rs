//! `resbisect calibrate`: tolerances measured from known-good pairs of dumps, refused
//! when a pair is not one (a failed or short dump, different tokens, a dump against
//! itself, an error as large as the values).

use std::path::Path;
use std::process::ExitCode;

use resbisect::diff::{self, DiffReport};
use resbisect::{Error, Result};

use super::args::{CalibrateArgs, CompareArgs, JudgeArg};
use super::commands::{compare, refuse_writing_over_inputs, same_file};
use super::shown;

pub fn calibrate(a: CalibrateArgs) -> Result<ExitCode> {
    if !a.dumps.len().is_multiple_of(2) {
        return Err(Error::input("calibrate takes pairs of dumps: A B [A B ...]"));
    }
    let inputs: Vec<&Path> = a.dumps.iter().map(|d| d.as_path()).collect();
    refuse_writing_over_inputs(&a.output, "--output", &inputs)?;
    resbisect::output::check_replaceable_file(&a.output, "--output", "a tolerance file", |p| {
        resbisect::tolerance::Tolerances::load(p).is_ok()
    })?;
    if !(a.margin.is_finite() && a.margin >= 1.0) {
        return Err(Error::input(format!("--margin {}: must be a number >= 1", a.margin)));
    }
    for (flag, v) in [("--floor", a.floor), ("--abs-floor", a.abs_floor)] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(Error::input(format!("{flag} {v}: must be a finite number >= 0")));
        }
    }
    if !(a.quantile > 0.0 && a.quantile <= 1.0) {
        return Err(Error::input("--quantile must be in (0, 1]"));
    }
    let how = resbisect::tolerance::Calibration {
        quantile: a.quantile,
        margin: a.margin,
        floor: a.floor,
        abs_floor: a.abs_floor,
    };
    let args = CompareArgs {
        tolerances: None,
        allow_model_mismatch: a.allow_model_mismatch,
        judge: JudgeArg::Tolerance,
    };
    // A dump against itself differs nowhere: every tolerance would be the floor.
    if let Some(pair) = a.dumps.chunks(2).find(|p| same_file(&p[0], &p[1])) {
        return Err(Error::input(format!(
            "calibrate: {} is paired with itself; calibrate takes an engine's dump and its reference's",
            pair[0].display()
        )));
    }
    let reports = a
        .dumps
        .chunks(2)
        .map(|p| compare(&p[0], &p[1], &args, &[]))
        .collect::<Result<Vec<_>>>()?;
    // Known-good pairs only: a failed, unfinished or short dump is no noise floor.
    if let Some(failure) = reports.iter().find_map(DiffReport::engine_failure) {
        return Err(Error::engine(failure));
    }
    if let Some(short) = reports
        .iter()
        .flat_map(|r| &r.prompts)
        .find_map(|p| p.undelivered.first())
    {
        return Err(Error::engine(short.clone()));
    }
    // A pair that ran different tokens is not a known-good pair, whatever its rows say.
    for (i, r) in reports.iter().enumerate() {
        if let Some((id, m)) = r.prompts.iter().find_map(|p| Some((&p.id, p.token_mismatch.as_ref()?))) {
            return Err(Error::input(format!(
                "calibrate: pair {} ({} against {}), prompt {id}: {}; calibrate takes pairs that ran the same tokens",
                i + 1,
                r.a.path,
                r.b.path,
                m.describe()
            )));
        }
    }
    // A pair whose oracle does not imitate A's numerics calibrates that mismatch too.
    for (i, r) in reports.iter().enumerate() {
        if let Some(note) = diff::profile_note(&r.a.engine, &r.b.engine) {
            eprintln!(
                "note: pair {} ({} against {}): {note}; tolerances calibrated on it take that difference in",
                i + 1,
                r.a.path,
                r.b.path
            );
        }
    }
    let (t, notes) = diff::calibrate(&reports, &how);
    if t.taps.is_empty() {
        let compared = reports
            .iter()
            .flat_map(|r| &r.prompts)
            .flat_map(|p| &p.taps)
            .any(|t| !t.rows.is_empty());
        return Err(Error::input(if compared {
            "calibrate: every compared row holds NaN or Inf (or differs past any tolerance): no noise floor to calibrate on"
        } else {
            "calibrate: the pairs share no tap: nothing was compared"
        }));
    }
    // An error as large as the values is a divergence: tolerances from it would pass anything.
    if let Some((tap, m)) = t
        .taps
        .iter()
        .find_map(|o| o.measured.filter(|&m| m >= 1.0).map(|m| (&o.pattern, m)))
    {
        return Err(Error::input(format!(
            "calibrate: {tap} differs by rel L2 {m:.2e} at the {} quantile of its rows, a divergence rather than \
             noise; calibrate takes pairs of a known-good engine and its reference",
            a.quantile
        )));
    }
    for n in &notes {
        eprintln!("note: {n}");
    }
    // A quantile of a few rows is their maximum: rare rounding events (an 8-bit rounding
    // flip) a longer prompt meets are missing (docs/profiles.md, TWIN_MIN_ROWS).
    let mut rows_per_tap = std::collections::BTreeMap::<&str, usize>::new();
    for t in reports.iter().flat_map(|r| &r.prompts).flat_map(|p| &p.taps) {
        *rows_per_tap.entry(&t.tap).or_default() += t.rows.len();
    }
    let rows = rows_per_tap.values().copied().min().unwrap_or(0);
    if rows < resbisect::bisect::TWIN_MIN_ROWS {
        eprintln!(
            "note: some taps were calibrated on {rows} row(s), fewer than {}: tolerances from so few rows may \
             miss noise that a longer prompt shows",
            resbisect::bisect::TWIN_MIN_ROWS
        );
    }
    let output = &a.output;
    let text = serde_json::to_string_pretty(&t).map_err(|e| Error::input(e.to_string()))? + "\n";
    resbisect::output::write_file(output, text.as_bytes())?;
    for o in &t.taps {
        println!("{:<22} rel_l2 <= {:.2e}", o.pattern, o.rel_l2);
    }
    eprintln!("wrote {}", shown(output));
    Ok(ExitCode::SUCCESS)
}
