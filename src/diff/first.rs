//! The first divergence of a prompt, described: its metrics, the channels and heads
//! that differ most, whether A's rows are B's shifted, and how the error grows downstream.

use super::metrics::{row_stat, Metrics};
use super::{Channel, FirstDivergence, Growth, HeadError, TapDiff};
use crate::dump::{Dump, MappedFile};
use crate::error::{Error, Result};
use crate::taps::Tap;
use crate::tolerance::Tolerance;

const TOP_CHANNELS: usize = 8;

/// The heads of an attention tap of the model of dump `a` (None for other taps).
fn head_count(tap: &Tap, a: &Dump) -> Option<usize> {
    let c = &a.manifest.model.config;
    match tap {
        Tap::Layer(_, i) => match i.name() {
            "q" | "attn" => Some(c.n_head),
            "k" | "v" => Some(c.n_head_kv),
            _ => None,
        },
        _ => None,
    }
}

/// Whether A's rows of `tap` from `position` on equal B's rows shifted by a few positions
/// (A at p holds B's p − k), judged on up to 64 rows that have a partner.
fn row_shift(fa: &MappedFile, fb: &MappedFile, tap: &str, position: usize, tol: &Tolerance) -> Option<i64> {
    let (va, vb) = (fa.tap(tap)?, fb.tap(tap)?);
    let from = fa.positions.partition_point(|&p| p < position);
    [1i64, -1, 2, -2, 3, -3, 4, -4].into_iter().find(|&k| {
        let pairs: Vec<(usize, usize)> = (from..fa.positions.len())
            .filter_map(|i| {
                let q = fa.positions[i] as i64 - k;
                let j = usize::try_from(q)
                    .ok()
                    .and_then(|q| fb.positions.binary_search(&q).ok())?;
                Some((i, j))
            })
            .take(64)
            .collect();
        let matching = pairs
            .iter()
            .filter(|&&(i, j)| !row_stat(&va.row(i), &vb.row(j)).diverges(tol))
            .count();
        !pairs.is_empty() && 4 * matching >= 3 * pairs.len()
    })
}

/// The first tap (in graph order) over its threshold in `taps`, described at its first
/// divergent position.
pub(super) fn first_divergence(
    a: &Dump,
    b: &Dump,
    id: &str,
    taps: &[TapDiff],
    tokens: &[u32],
    n_layer: usize,
) -> Result<Option<FirstDivergence>> {
    let Some((k, td, row)) = taps
        .iter()
        .enumerate()
        .find_map(|(k, t)| t.first_bad.map(|row| (k, t, row)))
    else {
        return Ok(None);
    };
    let position = td.positions[row];
    let tap = Tap::parse(&td.tap).ok_or_else(|| Error::input(format!("{}: not a canonical tap id", td.tap)))?;
    let stem = tap.file_stem();
    let load = |d: &Dump| -> Result<MappedFile> {
        d.map_file(id, &stem.to_string())?
            .ok_or_else(|| Error::input(format!("{stem} vanished while comparing")))
    };
    let (fa, fb) = (load(a)?, load(b)?);
    let pick = |f: &MappedFile| -> Result<Vec<f64>> {
        let r = f
            .positions
            .binary_search(&position)
            .map_err(|_| Error::input(format!("{stem} changed while comparing")))?;
        let v = f
            .tap(&td.tap)
            .ok_or_else(|| Error::input(format!("{} vanished while comparing", td.tap)))?;
        let v = v.row(r);
        Ok((0..v.width).map(|i| v.get(i)).collect())
    };
    let (ra, rb) = (pick(&fa)?, pick(&fb)?);
    let shift = row_shift(&fa, &fb, &td.tap, position, &td.tolerance);
    let top_channels = top_channels(&ra, &rb);
    let heads = head_count(&tap, a).map_or_else(Vec::new, |h| head_errors(h, &ra, &rb));
    let growth = growth(&taps[k + 1..], &tap, position, n_layer);
    let logits = td.logits.get(row).copied();
    Ok(Some(FirstDivergence {
        tap: td.tap.clone(),
        position,
        token: tokens[position],
        metrics: Metrics::new(&td.rows[row], logits),
        tolerance: td.tolerance,
        shift,
        top_channels,
        heads,
        growth,
    }))
}

/// The channels where A and B differ most, largest first (NaN counts as the largest).
fn top_channels(ra: &[f64], rb: &[f64]) -> Vec<Channel> {
    let diff_of = |i: usize| {
        let d = (ra[i] - rb[i]).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            d
        }
    };
    let mut order: Vec<usize> = (0..ra.len()).collect();
    order.sort_by(|&i, &j| diff_of(j).total_cmp(&diff_of(i)));
    order
        .iter()
        .take(TOP_CHANNELS)
        .map(|&i| Channel {
            index: i,
            a: ra[i],
            b: rb[i],
        })
        .collect()
}

/// Each of the `h` heads' rel L2, largest first.
fn head_errors(h: usize, ra: &[f64], rb: &[f64]) -> Vec<HeadError> {
    let hd = ra.len() / h;
    let mut v: Vec<HeadError> = (0..h)
        .map(|head| {
            let s = head * hd..(head + 1) * hd;
            let d: f64 = s.clone().map(|i| (ra[i] - rb[i]).powi(2)).sum();
            let n: f64 = s.map(|i| rb[i] * rb[i]).sum();
            HeadError {
                head,
                rel_l2: if n > 0.0 { (d / n).sqrt() } else { d.sqrt() },
            }
        })
        .collect();
    v.sort_by(|x, y| y.rel_l2.total_cmp(&x.rel_l2));
    v
}

/// How the error grows after `tap` (`later` taps): the same tap in later layers, every
/// later resid_post, the output head; at `position` and at worst.
fn growth(later: &[TapDiff], tap: &Tap, position: usize, n_layer: usize) -> Vec<Growth> {
    let same_kind = |t: &Tap| match (t, tap) {
        (Tap::Layer(_, i), Tap::Layer(_, j)) => i == j,
        _ => false,
    };
    later
        .iter()
        .filter(|t| {
            let p = Tap::parse(&t.tap).expect("canonical");
            same_kind(&p) || t.tap.ends_with(".resid_post") || t.tap == "logits" || t.tap == "final_norm"
        })
        .take(3 * n_layer + 2)
        .map(|t| Growth {
            tap: t.tap.clone(),
            at_position: t.rel_at(position),
            max_rel_l2: t.max_rel_l2(),
        })
        .collect()
}

/// f16's largest finite value (IEEE 754 binary16: (2 − 2⁻¹⁰) · 2¹⁵).
const F16_MAX: f64 = 65504.0;

/// A note when the first divergence is one side turning infinite where the other holds
/// a finite value past [`F16_MAX`]: the mark of an f16 overflow (an activation stored or
/// accumulated in f16), not of wrong arithmetic.
pub(super) fn f16_overflow_note(f: &FirstDivergence) -> Option<String> {
    let overflowed = |inf: f64, finite: f64| inf.is_infinite() && finite.is_finite() && finite.abs() > F16_MAX;
    f.top_channels.iter().find_map(|c| {
        let (side, other, value) = if overflowed(c.a, c.b) {
            ("A", "B", c.b)
        } else if overflowed(c.b, c.a) {
            ("B", "A", c.a)
        } else {
            return None;
        };
        Some(format!(
            "{side} is infinite at {}@{} channel {} where {other} reads {value:.4e}, past f16's largest value \
             (65504): an f16 overflow in {side} (a value stored or accumulated in f16)",
            f.tap, f.position, c.index
        ))
    })
}
