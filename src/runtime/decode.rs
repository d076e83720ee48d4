//! Greedy decode: one-row steps whose ops read token, position and tap slot from the
//! step record, so one recording of a step replays at every later position; decode taps
//! are staged on the device and downloaded once, after the last step.

use super::backend::{Backend, Step};
use super::capture::{Staged, TapRoute};
use super::forward::Pass;
use super::layer::Workspace;
use super::PromptRun;
use crate::error::{Error, Result};

impl<B: Backend> PromptRun<'_, '_, B> {
    /// Generate `opts.max_tokens` tokens greedily after `tokens` (the prompt), starting
    /// from `next`, the prompt's greedy next token; every processed token is pushed.
    pub(super) fn decode(
        &mut self,
        mut next: Option<u32>,
        tokens: &mut Vec<u32>,
        on_step: &mut dyn FnMut(),
    ) -> Result<()> {
        let (rt, opts) = (self.rt, self.opts);
        let mut ws = Workspace::new(&rt.backend, &rt.cfg, 1)?;
        let record = !opts.sync_check && self.faults.crash.is_empty();
        let mut staged = Staged::new(rt, &self.collector, tokens.len(), record)?;
        for step in 0..opts.max_tokens {
            let token = next.ok_or_else(|| Error::engine("decode: no next token"))?;
            tokens.push(token);
            if opts.stop_token == Some(token) && self.collector.writer.is_none() {
                break;
            }
            next = self.step(
                token,
                tokens.len() - 1,
                &mut ws,
                &mut staged,
                step + 1 < opts.max_tokens,
            )?;
            on_step();
        }
        staged.download(&rt.backend, &mut self.collector)
    }

    /// One decode step of `token` at `pos`: its layers replayed from a recording when the
    /// backend can record and nothing about the step's ops differs from the recorded
    /// one, else issued op by op; then the head, returning the next token if `want_next`.
    fn step(
        &mut self,
        token: u32,
        pos: usize,
        ws: &mut Workspace<B>,
        staged: &mut Staged<B>,
        want_next: bool,
    ) -> Result<Option<u32>> {
        let (rt, faults) = (self.rt, self.faults);
        let slot = staged.positions.binary_search(&pos).ok();
        rt.backend.set_step(Step {
            token,
            pos,
            rope_pos: pos as f32,
            slot: slot.unwrap_or(0),
        })?;
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
        if recordable && staged.graph.as_ref().is_none_or(|(k, _)| *k != key) {
            staged.graph = None;
            if rt.backend.begin_record()? {
                let issued = rt.layers(&[token], ws, kv, &mut pass);
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
            _ => rt.layers(&[token], ws, kv, &mut pass)?,
        }
        rt.head(ws, &mut pass, want_next)
    }
}
