//! Probes that look inside layers the residual stream calls good. The stream carries a
//! layer's error diluted by everything summed into it, so bisect checks the first layers
//! under a twin, the branches below the layer the search found, and every tap of the
//! layers an error faded through.

use super::*;
use crate::engine::BRANCH_OUTPUTS;

impl<'s, 'r: 's> Search<'s, 'r, '_> {
    /// Under a twin (a profiled oracle), every tap of layer 0 at every position the
    /// coarse probe ran, before the search trusts the residual stream. There a profile's
    /// tolerance is set by the 8-bit rounding noise the engine itself makes (4 × the
    /// twin's worst row: 0.18 at SmolLM2's blk.0.resid_post under `llamacpp-cuda`),
    /// while layer 0's q, k, v come before any rounding flip and the twin pins them to
    /// ~1e-6. A bug that acts in every layer (RoPE, the KV cache, a norm) shows there
    /// first and clearly, yet can stay inside the residual stream's tolerance at every
    /// layer: llama.cpp CUDA with its RoPE base at 10000 passed a 128-token coarse probe
    /// (docs/validation.md). A bug that acts in every layer of one attention kind (the
    /// RoPE base of Gemma 3's global layers) starts at that kind's first layer: the probe
    /// takes the first layer of each kind below `below`. Some: the first layer with a
    /// divergent tap as the suspect.
    pub(super) fn inside_first_layers(&mut self, below: usize) -> Flow<Option<Suspect>> {
        if self.session.twin.is_none() {
            return Ok(None);
        }
        let n = self.n;
        let layers: Vec<usize> = self.kind_firsts.iter().copied().filter(|&l| l < below).collect();
        let names: Vec<String> = layers.iter().map(usize::to_string).collect();
        let purpose = format!("taps-{}", names.join("+"));
        let taps_diff = self.probe(&purpose, n, selection(layers.clone(), &self.layer_taps, &Rows::All, n))?;
        let which = match layers.as_slice() {
            [only] => format!("layer {only}"),
            _ => format!("layers {} (the first of each attention kind)", names.join(" and ")),
        };
        let Some(first) = first_of(&taps_diff) else {
            self.session
                .note(format!("every tap of {which} agrees at every position"));
            return Ok(None);
        };
        let layer = Tap::parse(&first.tap).and_then(|t| t.layer()).unwrap_or(0);
        let id = resid_post(layer);
        let rows = |side: &str| {
            self.session
                .rows(side, &id, n)?
                .ok_or_else(|| Error::engine(format!("{id} missing from the {side} dumps")))
        };
        let tolerance = tolerance_in(&taps_diff, &id);
        let at = replay_positions(&rows("a")?, &rows("b")?, self.n_embd, tolerance, Some(first.position));
        self.session.note(format!(
            "inside layer {layer}, {} diverges first, at position {} (every position of {which} probed)",
            first.tap, first.position
        ));
        self.preload_replay(layer);
        Ok(Some(Suspect {
            layer,
            prefix: n,
            at,
            window: 0,
            taps_diff,
            first: Some(first),
        }))
    }

    /// The taps where a layer's error enters the residual stream (its branch outputs,
    /// which the engines keep beside their checkpoints) and the stream itself.
    fn branch_taps(&self) -> Vec<&'static str> {
        let branches: Vec<&str> = (BRANCH_OUTPUTS.iter().chain([&LayerTap::ResidPost]))
            .map(|t| t.name())
            .collect();
        self.layer_taps
            .iter()
            .copied()
            .filter(|t| branches.contains(t))
            .collect()
    }

    /// The coarse probe within tolerance or off in the head only, yet a residual-stream
    /// tap over its noise floor on a quarter of its rows or more, by an error that fades
    /// before the last layer (so the floor does not judge the stream): every tap of every
    /// layer down to the deepest such tap, over the coarse probe's tokens, judged as `diff`
    /// judges a dump (a tap inside a layer may cross tolerance while its branch output does
    /// not). An error that starts inside one layer is diluted by the residual add: RoPE
    /// frequencies rounded to f16 in layer 5 alone put `blk.5.attn` over the 1e-3
    /// tolerance on 17 rows of 826, while no residual-stream tap reached it and
    /// `blk.16.resid_post` was back under its floor's threshold; with RoPE 1.0005× too
    /// fast in layer 5, `final_norm` was the first tap the floor judged. A rare path, and
    /// a costly one: as much as dumping those layers whole. Some: the layer of the first
    /// divergent tap.
    pub(super) fn inside_fading_error(&mut self, r: &DiffReport, coarse: &[usize]) -> Flow<Option<SuspectLayer>> {
        if self.session.twin.is_some() {
            return Ok(None);
        }
        let over = |l: usize| {
            r.prompts
                .iter()
                .flat_map(|p| &p.taps)
                .any(|t| t.tap == resid_post(l) && t.systematically_over_floor())
        };
        let Some(deepest) = coarse.iter().copied().filter(|&l| over(l)).max() else {
            return Ok(None);
        };
        if self.opts.judge == Judge::Auto {
            self.session.judge = Judge::Auto;
        }
        let (n, taps) = (self.n, self.layer_taps.clone());
        let b = self.probe(
            &format!("inside-0-{deepest}"),
            n,
            selection((0..=deepest).collect(), &taps, &Rows::All, n),
        )?;
        self.report.judged = b.prompts.first().map_or(Judgement::Tolerance, |p| p.judged);
        self.session.judge = match self.report.judged {
            Judgement::Tolerance => Judge::Tolerance,
            Judgement::NoiseFloor => Judge::NoiseFloor,
        };
        let Some(first) = first_of(&b) else {
            self.session.note(format!(
                "blk.{deepest}.resid_post sits over its noise floor on a quarter of its rows or more, but every \
                 tap of layers 0 to {deepest} agrees"
            ));
            return Ok(None);
        };
        let layer = Tap::parse(&first.tap).and_then(|t| t.layer()).unwrap_or(0);
        let how = match self.report.judged {
            Judgement::NoiseFloor => "over its noise floor, as is every later residual-stream tap probed",
            Judgement::Tolerance => "over tolerance",
        };
        self.session.note(format!(
            "{} diverges at position {} ({how}), though the coarse residual stream stays within tolerance: \
             the first bad layer is {layer}",
            first.tap, first.position
        ));
        Ok(Some(SuspectLayer {
            layer,
            position: first.position,
            resid_tolerance: tolerance_in(&b, &resid_post(layer)),
        }))
    }

    /// Before the suspect layer's taps: the branch outputs (`attn_out`, `ffn_out`, and
    /// their post norms where the model has them) of every layer below it, over the first
    /// `prefix` tokens. The residual stream carries a layer's error diluted by everything
    /// summed into it: a bug in every layer's attention (RoPE frequencies rounded to f16)
    /// left layer 0's `resid_post` under the noise floor's threshold on most rows while its
    /// `attn` was over it on almost all, so the layer search named layer 1, after the
    /// first divergent tap. Some: the earliest layer with a divergent branch, where it
    /// first diverges.
    pub(super) fn branches_below(&mut self, found: &SuspectLayer, prefix: usize) -> Flow<Option<SuspectLayer>> {
        if found.layer == 0 {
            return Ok(None);
        }
        let taps = self.branch_taps();
        let below: Vec<usize> = (0..found.layer).collect();
        let r = self.probe(
            &format!("branches-below-{}", found.layer),
            prefix,
            selection(below, &taps, &Rows::All, prefix),
        )?;
        let last = found.layer - 1;
        let taps_diff = r.prompts.first().map_or(&[][..], |p| &p.taps[..]);
        // In graph order, as the diff's first divergence; a stray row over the floor is noise.
        let Some(first) = taps_diff.iter().find(|t| t.beyond_stray_rows()) else {
            let stray = first_of(&r).map_or(String::new(), |f| {
                format!(
                    " ({} at position {} is over its noise floor on stray rows only, under its tolerance)",
                    f.tap, f.position
                )
            });
            self.session.note(format!(
                "the branches of layers 0 to {last} ({}) agree{stray}: layer {} is the first bad layer",
                taps.join(", "),
                found.layer
            ));
            return Ok(None);
        };
        let position = first.positions[first.first_bad.expect("divergent rows have a first")];
        let layer = Tap::parse(&first.tap).and_then(|t| t.layer()).unwrap_or(0);
        self.session.note(format!(
            "{} diverges at position {position}, though resid_post stays within its tolerance below layer {}: \
             the first bad layer is {layer}",
            first.tap, found.layer
        ));
        Ok(Some(SuspectLayer {
            layer,
            position,
            resid_tolerance: tolerance_in(&r, &resid_post(layer)),
        }))
    }
}
