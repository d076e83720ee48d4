//! Whether an engine labels its taps one layer off: an engine whose `blk.L` holds layer
//! L − 1's tensors (or L + 1's) diverges at its first mislabeled layer by the whole of a
//! layer's contribution, and every verdict after that is about names, not numerics. The
//! search cannot tell; the rows it already holds can.

use super::probe::Session;
use super::search::resid_post;
use crate::dump::TapDType;
use crate::error::Result;

/// Rows compared: the first positions, which every probe of a layer's residual stream holds.
const ROWS: usize = 32;

/// A note when A's `resid_post` rows of the first divergent `layer` (of `n_layer`) equal
/// B's of the layer before or after it, within that tap's tolerance, while they are far
/// (ten times that) from B's of the same layer. Only rows the search's probes dumped are
/// compared; None when they do not hold them.
pub(super) fn label_shift_note(
    session: &Session,
    layer: usize,
    n_layer: usize,
    tokens: usize,
) -> Result<Option<String>> {
    let at: Vec<usize> = (0..tokens.min(ROWS)).collect();
    let id = resid_post(layer);
    let threshold = session.tolerances().for_tap(&id, TapDType::F32).rel_l2.max(1e-6);
    let (Some(a), Some(same)) = (session.rows_at("a", &id, &at)?, session.rows_at("b", &id, &at)?) else {
        return Ok(None);
    };
    if rel_l2(&a, &same) <= 10.0 * threshold {
        return Ok(None);
    }
    for (neighbour, which) in [(layer.checked_sub(1), "before"), (Some(layer + 1), "after")] {
        let Some(neighbour) = neighbour.filter(|&l| l < n_layer) else {
            continue;
        };
        let Some(b) = session.rows_at("b", &resid_post(neighbour), &at)? else {
            continue;
        };
        let shifted = rel_l2(&a, &b);
        if shifted <= threshold {
            return Ok(Some(format!(
                "engine A's {id} equals engine B's {} at positions 0..{} (rel L2 {shifted:.2e}, against {:.2e} for B's \
                 {id}): A may label its taps one layer off, its blk.{layer} holding the layer {which} it",
                resid_post(neighbour),
                at.len(),
                rel_l2(&a, &same),
            )));
        }
    }
    Ok(None)
}

/// ‖a − b‖ / ‖b‖ over whole blocks of rows, in f64.
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        diff += (f64::from(x) - f64::from(y)).powi(2);
        norm += f64::from(y).powi(2);
    }
    (diff / norm).sqrt()
}
