//! The search's last phases inside the suspect layer: every tap of the layer at the
//! positions replay needs and a window before the first divergent one, then the first
//! divergent position, and the replay inputs no probe has dumped yet.

use super::*;

impl<'s, 'r: 's> Search<'s, 'r, '_> {
    /// Phase 3: all taps of the suspect layer over the first `prefix` tokens, at the
    /// positions that matter: those local replay recomputes and a window before the first
    /// divergent one. None: the cut prompt does not reproduce the divergence.
    pub(super) fn suspect_taps(&mut self, layer: &SuspectLayer, prefix: usize) -> Flow<Option<Suspect>> {
        let hi = layer.layer;
        let hi_out = |side: &str| {
            self.session
                .rows(side, &resid_post(hi), prefix)?
                .ok_or_else(|| Error::engine(format!("{} missing from the {side} dumps", resid_post(hi))))
        };
        let at = replay_positions(
            &hi_out("a")?,
            &hi_out("b")?,
            self.n_embd,
            layer.resid_tolerance,
            Some(layer.position),
        );
        let window = layer.position.saturating_sub(self.opts.tap_window);
        self.start_early_replay(hi, prefix, &at)?;
        let mut probed: Vec<usize> = at.iter().copied().chain(window..=layer.position).collect();
        probed.sort_unstable();
        probed.dedup();
        let sel = selection(vec![hi], &self.layer_taps, &Rows::At(probed.clone()), prefix);
        // Each engine's rows of the layer over the longer prompt, to compare with the cut's.
        let cut = prefix < self.n;
        let longer = if cut {
            let rows = |side| self.session.rows_at(side, &resid_post(hi), &probed);
            Some([rows("a")?, rows("b")?])
        } else {
            None
        };
        let taps_diff = self.probe(&format!("taps-{hi}"), prefix, sel)?;
        if let Some(longer) = longer {
            self.note_lookahead(hi, prefix, &probed, longer, layer.resid_tolerance)?;
        }
        let mut suspect = Suspect {
            layer: hi,
            prefix,
            at,
            window,
            taps_diff,
            first: None,
        };
        let Some(first) = first_of(&suspect.taps_diff) else {
            if prefix < self.n {
                // The engine is not causal here.
                self.session.note(format!("no tap of layer {hi} diverges on the cut prompt: the engine is not causal here; searching the coarse probe's {} tokens", self.n));
                return Ok(None);
            }
            self.session
                .note("no tap of the layer diverges on this run (is the engine deterministic?)".into());
            suspect.window = 0;
            return Ok(Some(suspect));
        };
        // Running every token the stream covered is not a cut: say which one this is.
        let on = if prefix == self.n && self.n < self.report.n_tokens {
            format!(", on the coarse probe's {prefix} tokens")
        } else if prefix < self.n {
            format!(", the prompt cut to {prefix} tokens")
        } else {
            String::new()
        };
        self.session.note(format!(
            "first divergent tap {} at position {} (of {} positions probed{on})",
            first.tap,
            first.position,
            probed.len()
        ));
        let asked: Vec<String> = self.layer_taps.iter().map(|t| format!("blk.{hi}.{t}")).collect();
        self.report
            .notes
            .extend(unobserved_notes(&suspect.taps_diff, &first, &asked));
        let second = (suspect.taps_diff.prompts.iter()).find_map(|p| crate::diff::second_origin_note(p, &first));
        self.report.notes.extend(second);
        suspect.first = Some(first);
        Ok(Some(suspect))
    }

    /// A note for each engine whose layer-`hi` output at `probed` positions changed when
    /// the prompt was cut to `prefix` tokens (its rows over the longer prompt: `longer`,
    /// A's then B's) by more than `tol`: in a causal engine a row depends only on the
    /// tokens up to it, so such a row looked ahead (a mask off by one, a bidirectional
    /// layer), typically at the cut's last position.
    fn note_lookahead(
        &mut self,
        hi: usize,
        prefix: usize,
        probed: &[usize],
        longer: [Option<Vec<f32>>; 2],
        tol: f64,
    ) -> Result<()> {
        let tap = resid_post(hi);
        for (side, longer) in ["a", "b"].into_iter().zip(longer) {
            let (Some(longer), Some(cut)) = (longer, self.session.rows_at(side, &tap, probed)?) else {
                continue;
            };
            let worst = (0..probed.len())
                .map(|r| (row_error(&cut, &longer, self.n_embd, r).0, probed[r]))
                .filter(|(rel, _)| rel.is_finite())
                .fold((0.0, 0), |w, x| if x.0 > w.0 { x } else { w });
            // At least 1e-3: kernels chosen by batch size (cuBLAS picks by shape) move a
            // row by rounding only, far less; a look-ahead moves it by the tokens it saw.
            if worst.0 > tol.max(1e-3) {
                self.report.notes.push(format!(
                    "engine {} is not causal: its {tap} at position {} changed by rel L2 {:.2e} when the prompt was \
                     cut from {} to {prefix} tokens (a row may depend only on the tokens up to it); the divergence \
                     found may be where it looks ahead, or the engine computes a shorter prompt another way (a \
                     kernel chosen by batch size: llama.cpp's flash attention rounds to f16 in micro-batches \
                     under 64 rows), or it is not deterministic (an unseeded dropout, a race between threads)",
                    side.to_uppercase(),
                    worst.1,
                    worst.0,
                    self.n
                ));
            }
        }
        Ok(())
    }

    /// Phases 4 and 5 in one probe, when either needs it: a tap already off at the
    /// window's start may have left B's earlier still (its first position), and local
    /// replay needs the inputs and outputs of the `replayed` layers at every position.
    /// Returns the position probe's comparison, which then shows the finding.
    pub(super) fn first_position(&mut self, suspect: &mut Suspect, replayed: &[usize]) -> Flow<Option<DiffReport>> {
        let prefix = suspect.prefix;
        let missing = self.missing_replay_inputs(replayed, prefix)?;
        let early = suspect
            .first
            .as_ref()
            .filter(|f| f.position <= suspect.window && suspect.window > 0)
            .map(|f| f.tap.clone());
        if early.is_none() && missing.is_empty() {
            return Ok(None);
        }
        let mut layers: Vec<usize> = missing
            .iter()
            .filter_map(|id| match Tap::parse(id) {
                Some(Tap::Layer(l, _)) => Some(l),
                _ => None,
            })
            .collect();
        let mut taps = vec!["resid_post"];
        if missing.iter().any(|m| m == "embed") {
            taps.insert(0, "embed");
        }
        if let Some(tap) = &early {
            layers.push(suspect.layer);
            let short = tap.rsplit('.').next().expect("a tap id has a name");
            if !taps.contains(&short) {
                taps.push(short);
            }
        }
        layers.sort_unstable();
        layers.dedup();
        let purpose = if early.is_some() { "position" } else { "replay-inputs" };
        let r = self.probe(purpose, prefix, selection(layers, &taps, &Rows::All, prefix))?;
        let mut found = Vec::new();
        let mut position_diff = None;
        if let Some(tap) = &early {
            suspect.first = first_of(&r).filter(|f| &f.tap == tap).or(suspect.first.take());
            let position = suspect.first.as_ref().map_or(0, |f| f.position);
            found.push(format!("{tap} first diverges at position {position}"));
            position_diff = Some(r);
            self.suspect_reproduce = Some(self.session.reproduce.clone());
        }
        if !missing.is_empty() {
            found.push(format!("inputs for local replay: {}", missing.join(", ")));
        }
        self.session.note(found.join("; "));
        Ok(position_diff)
    }

    /// The inputs and outputs of the `replayed` layers that no probe so far dumped on
    /// both sides at every position below `prefix`.
    fn missing_replay_inputs(&self, replayed: &[usize], prefix: usize) -> Result<Vec<String>> {
        let mut needed: Vec<String> = replayed.iter().flat_map(|&l| [input_id(l), resid_post(l)]).collect();
        needed.dedup();
        let all: Vec<usize> = (0..prefix).collect();
        let mut missing = Vec::new();
        for id in needed {
            if self.session.locate("a", &id, &all)?.is_none() || self.session.locate("b", &id, &all)?.is_none() {
                missing.push(id);
            }
        }
        Ok(missing)
    }
}
