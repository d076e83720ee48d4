//! Bisect's two engines, started at the same time: a GPU context and its kernels come
//! up while the reference loads its weights.

use std::sync::Arc;

use super::{Engine, EngineKind, EngineSpec, Oracle, Progress};
use crate::error::Result;
use crate::model::Model;

/// Engine A (under test), engine B (the oracle), and the loaded reference when either
/// is the reference (for local replay too).
pub struct EnginePair<'m> {
    pub a: Box<dyn Engine + 'm>,
    pub b: Box<dyn Engine + 'm>,
    pub oracle: Option<Arc<Oracle>>,
}

/// Start `a` and `b` for prompts of up to `longest` tokens. The whole reference loads only
/// when one of them is the reference, once for both; the other engines start on their
/// own threads meanwhile and [prepare](Engine::prepare) (the runtime loads its weights).
pub fn start_pair<'m>(
    model: &'m Model,
    a: &EngineSpec,
    b: &EngineSpec,
    longest: usize,
    progress: &mut dyn Progress,
) -> Result<EnginePair<'m>> {
    let precision = [a, b].into_iter().find_map(|spec| match spec.kind {
        EngineKind::Reference(reference) => Some(reference),
        _ => None,
    });
    let (oracle, started) = std::thread::scope(|scope| {
        let started = [a, b].map(|spec| {
            (!matches!(spec.kind, EngineKind::Reference(_))).then(|| {
                scope.spawn(move || {
                    let mut engine = spec.open(model)?;
                    if engine.prepare(longest).is_err() {
                        // Opened afresh, its first probe meets the same failure where
                        // bisect reports a failing engine (a crash with its evidence).
                        engine = spec.open(model)?;
                    }
                    Ok(engine)
                })
            })
        });
        let oracle = precision.map(|precision| {
            progress.stage("loading the reference", model.config.n_layer);
            Oracle::load(model, precision, &mut |_| progress.tick()).map(Arc::new)
        });
        let joined = started.map(|job| job.map(|j| j.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))));
        (oracle.transpose(), joined)
    });
    let oracle = oracle?;
    let [started_a, started_b] = started;
    let open = |started: Option<Result<Box<dyn Engine + 'm>>>, spec: &EngineSpec| match started {
        Some(engine) => engine,
        None => spec.open_sharing(model, oracle.clone()),
    };
    Ok(EnginePair {
        a: open(started_a, a)?,
        b: open(started_b, b)?,
        oracle,
    })
}
