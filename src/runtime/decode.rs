//! Greedy decode: one-row steps whose ops read token, position and tap slot from the
//! step record, so one recording of a step replays at every later position; decode taps
//! are staged on the device and downloaded once, after the last step.

use super::backend::{Backend, Step};
use super::capture::{Staged, TapRoute};
use super::forward::{Next, Pass};
use super::layer::Workspace;
use super::PromptRun;
use crate::error::{Error, Result};

impl<B: Backend> PromptRun<'_, '_, B> {
    /// Generate `opts.max_tokens` tokens greedily after `tokens` (the prompt), starting
    /// from `next`, the prompt's greedy next token; every processed token is pushed.
    ///
    /// Each step is issued before the host knows its token (all but the first): the
    /// step before put it in the step record on the device, and the host reads it while
    /// the step runs, so the device never waits for the host between tokens. A step
    /// issued for a stop token is dropped with the run.
    pub(super) fn decode(&mut self, next: Option<u32>, tokens: &mut Vec<u32>, on_step: &mut dyn FnMut()) -> Result<()> {
        let (rt, opts) = (self.rt, self.opts);
        let mut ws = Workspace::new(&rt.backend, &rt.cfg, 1)?;
        let record = !opts.sync_check && self.faults.crash.is_empty();
        let mut staged = Staged::new(rt, &self.collector, tokens.len(), record)?;
        let start = tokens.len();
        if opts.max_tokens > 0 {
            let first = next.ok_or_else(|| Error::engine("decode: no next token"))?;
            rt.backend.set_step(Step {
                token: first,
                ..step_at(&staged.positions, start)
            })?;
        }
        for step in 0..opts.max_tokens {
            let pos = start + step;
            let after = (step + 1 < opts.max_tokens).then(|| step_at(&staged.positions, pos + 1));
            self.step(pos, &mut ws, &mut staged, after)?;
            // The first token is the prompt's; the others came from the step before.
            let token = match (step, next) {
                (0, Some(first)) => first,
                _ => rt.backend.take_token()?,
            };
            tokens.push(token);
            if opts.stop_token == Some(token) && self.collector.writer.is_none() {
                break;
            }
            on_step();
        }
        staged.download(&rt.backend, &mut self.collector)
    }

    /// Issue one decode step at `pos`, whose token the step record holds: its layers
    /// replayed from a recording when the backend can record and nothing about the step's
    /// ops differs from the recorded one, else issued op by op; then the head, whose
    /// argmax makes the record `after`'s when another step follows.
    fn step(&mut self, pos: usize, ws: &mut Workspace<B>, staged: &mut Staged<B>, after: Option<Step>) -> Result<()> {
        let (rt, faults) = (self.rt, self.faults);
        let slot = staged.positions.binary_search(&pos).ok();
        // The ops of a step depend on the position only through the step record, except
        // where an injected fault starts acting.
        let key: Vec<bool> = faults
            .taps
            .iter()
            .map(|f| pos >= f.from)
            .chain([slot.is_some()])
            .collect();
        let recordable = staged.record && faults.rope.iter().all(|r| pos < r.from);
        let mut pass = Pass {
            rt,
            start: pos,
            rows: 1,
            faults,
            collector: &mut self.collector,
            route: TapRoute::Stage {
                buffers: &mut staged.buffers,
                selected: slot.is_some(),
            },
            opts: self.opts,
        };
        let kv = &mut self.kv;
        // The token argument is unused: a decode step's embedding reads the step record.
        if recordable && staged.graph.as_ref().is_none_or(|(k, _)| *k != key) {
            staged.graph = None;
            if rt.backend.begin_record()? {
                let issued = rt.layers(&[], ws, kv, &mut pass);
                match (issued, rt.backend.end_record()?) {
                    (Ok(()), Some(graph)) => staged.graph = Some((key.clone(), graph)),
                    // Something in the step cannot be recorded: issue ops from now on.
                    _ => staged.record = false,
                }
            } else {
                staged.record = false;
            }
        }
        match &staged.graph {
            Some((k, graph)) if recordable && *k == key => rt.backend.replay(graph)?,
            _ => rt.layers(&[], ws, kv, &mut pass)?,
        }
        let next = after.map_or(Next::None, Next::ToStep);
        rt.head(ws, &mut pass, next).map(drop)
    }
}

/// The step record of a decode step at `pos` (its token aside), whose decode taps, if
/// it has any, fill the row of `pos` among the sorted tapped `positions`.
fn step_at(positions: &[usize], pos: usize) -> Step {
    Step {
        token: 0,
        pos,
        rope_pos: pos as f32,
        slot: positions.binary_search(&pos).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::super::backend::StorageDType;
    use super::super::cpu::CpuBackend;
    use super::super::{RunOptions, Runtime};
    use crate::dump::PromptRecord;
    use crate::inject::RuntimeFaults;
    use crate::model::Model;
    use crate::taps::Selection;

    /// A run that meets its stop token has issued the step after it before knowing; that
    /// step's token must not leak into the tokens, nor into the runtime's next run.
    #[test]
    fn a_stop_token_ends_the_tokens_and_the_next_run_starts_clean() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("micro.gguf");
        let preset = crate::synth::preset("micro").unwrap();
        crate::synth::write_model(&preset, candle_core::quantized::GgmlDType::F32, 3, &path).unwrap();
        let model = Model::open(&path).unwrap();
        let faults = RuntimeFaults::default();
        let backend = CpuBackend::new(StorageDType::F32);
        let rt = Runtime::load(backend, &model, Default::default(), &faults, &mut |_| {}).unwrap();
        let prompt = PromptRecord {
            id: "p".into(),
            text: None,
            tokens: vec![1, 5, 9, 2],
        };
        let selection = Selection::parse("0", "resid_post", "last", model.config.n_layer).unwrap();
        let run = |stop_token| {
            let opts = RunOptions {
                max_tokens: 12,
                stop_token,
                ..Default::default()
            };
            rt.run_prompt(&prompt, &selection, &faults, &opts, None, None, &mut || {})
                .unwrap()
                .0
        };
        let all = run(None);
        assert_eq!(all.len(), prompt.tokens.len() + 12);
        let generated = &all[prompt.tokens.len()..];
        let stop = generated[4];
        let first = generated.iter().position(|&t| t == stop).unwrap();
        assert_eq!(run(Some(stop)), all[..prompt.tokens.len() + first + 1]);
        assert_eq!(run(None), all);
    }
}
