//! How the tokens two engines ran differ, and the sentence that says so.

use serde::Serialize;

/// The tokens two dumps ran differ: the engines did not process the same input (e.g. a
/// doubled BOS). Rows before `position` are still compared (causality).
#[derive(Debug, Clone, Serialize)]
pub struct TokenMismatch {
    pub position: usize,
    /// The token at `position` (None past the end of that side's tokens).
    pub a: Option<u32>,
    pub b: Option<u32>,
    /// A's tokens from `position` on equal B's shifted by this many positions (+1: A
    /// holds one extra token at `position`; −1: A lacks B's token there).
    pub shift: Option<i64>,
    /// A's tokens equal B's again after this many tokens from `position` on, which
    /// differ (a wrong BOS id): replaced tokens rather than a shift.
    pub replaced: Option<usize>,
    /// Both dumps record the same prompt text: the engines tokenized one text apart.
    pub same_text: bool,
    /// How many tokens each side ran.
    pub a_tokens: usize,
    pub b_tokens: usize,
    /// Set where the tokens both engines were given are known (bisect): the engine that
    /// ran other tokens than those ("A", "B" or "A and B"). Its tokens then stand as A's
    /// above, the tokens given as B's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// Both dumps' logits at `position − 1` put B's token first, yet A ran another: A did
    /// not pick its top token there (set by `diff` where both hold those
    /// logits).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub a_not_top: bool,
}

impl TokenMismatch {
    /// The dumps are of different prompts rather than of one prompt run differently: the
    /// tokens differ from the first on, are no shift of each other, do not agree again
    /// after a few replaced tokens, and no common text explains them. Nothing of such a pair is comparable; `diff` refuses it.
    pub fn unrelated(&self) -> bool {
        self.position == 0 && self.shift.is_none() && self.replaced.is_none() && !self.same_text
    }

    pub fn describe(&self) -> String {
        let (na, nb, p) = (self.a_tokens, self.b_tokens, self.position);
        // Who ran what: A against B, or an engine against the tokens it was given.
        let (ours, ran_where) = match &self.engine {
            None => ("A".to_string(), format!("A ran {na} tokens where B ran {nb}")),
            Some(e) => {
                let (who, they) = if e.contains(" and ") {
                    (format!("engines {e}"), "they were")
                } else {
                    (format!("engine {e}"), "it was")
                };
                let ran = format!("{who} ran {na} tokens where {they} given {nb}");
                (who, ran)
            }
        };
        let (theirs_tokens, theirs_input) = if self.engine.is_some() {
            ("the prompt's tokens", "the prompt")
        } else {
            ("B's tokens", "B's input")
        };
        // Equal up to where one side ends: one ran a truncated or extended input.
        if self.shift.is_none() && (self.a.is_none() || self.b.is_none()) {
            let why = if self.a.is_none() {
                format!("{ours}'s input ends early (a prompt truncated to a context or batch size, or fewer tokens generated?)")
            } else {
                format!(
                    "{ours} ran {} more from position {p} on (token {} appended: an EOS or BOS added to the prompt?)",
                    na - nb,
                    self.a.unwrap_or_default()
                )
            };
            return format!("{ran_where}, the same up to position {p}: {why}");
        }
        let tok = |t: Option<u32>| t.map_or("nothing".to_string(), |t| format!("token {t}"));
        let shift = match self.shift {
            Some(k) if k > 0 => format!("; {ours} has {k} extra token(s) there and is {theirs_input} shifted by +{k}"),
            Some(k) => {
                // More than a few tokens gone: a span dropped, as an engine that keeps the head
                // and the tail of a prompt over its context does.
                let span = if k < -4 {
                    ", a span of the prompt dropped (context overflow?)"
                } else {
                    ""
                };
                format!(
                    "; {ours} lacks {} of {theirs_tokens} there and is {theirs_input} shifted by {k}{span}",
                    -k
                )
            }
            None => match self.replaced {
                Some(n) if p == 0 => format!("; they agree again after {n} replaced token(s), as with a wrong BOS id"),
                Some(n) => format!("; they agree again after {n} replaced token(s)"),
                None => String::new(),
            },
        };
        let counts = if na == nb {
            String::new()
        } else {
            format!(" ({ran_where})")
        };
        let (has_a, has_b) = (tok(self.a), tok(self.b));
        let not_top = if self.a_not_top {
            format!(
                "; A's own logits at position {} put {has_b} first, as B's do, yet A ran {has_a}: if A generated \
                 it, A did not pick greedily (a repetition penalty, a temperature, or a token taken from another row)",
                p - 1
            )
        } else {
            String::new()
        };
        match &self.engine {
            None => format!("the engines ran different tokens from position {p}{counts}: A has {has_a}, B has {has_b}{shift}{not_top}"),
            Some(_) => format!(
                "{ours} ran other tokens than {} given from position {p}{counts}: {has_a} where the prompt has {has_b}{shift}",
                if ours.starts_with("engines") { "they were" } else { "it was" }
            ),
        }
    }
}
