//! Other tools' names for the canonical taps (docs/taps.md), in one table each:
//! TransformerLens hooks (`hook_attn_out`, `blocks.L.hook_resid_post`), llama.cpp
//! graph names (`l_out`, `kqv_out-7`) and HF `hidden_states[i]`.

use crate::error::{Error, Result};
use crate::tap::{LayerTap, Tap};

/// TransformerLens hook → canonical short name. Inside a block they read
/// `blocks.L.<hook>`; `hook_resid_pre` is handled apart (it is the previous layer's output).
const TRANSFORMER_LENS: &[(&str, &str)] = &[
    ("hook_attn_out", "attn_out"),
    ("hook_resid_mid", "resid_mid"),
    ("hook_mlp_out", "ffn_out"),
    ("hook_resid_post", "resid_post"),
    ("ln_final.hook_normalized", "final_norm"),
];

/// llama.cpp graph tensor → canonical short name. Layer tensors read `<name>-L`.
const LLAMA_CPP: &[(&str, &str)] = &[
    ("attn_norm", "attn_norm"),
    ("Qcur", "q"),
    ("Kcur", "k"),
    ("Vcur", "v"),
    ("kqv_out", "attn"),
    ("ffn_inp", "resid_mid"),
    // Gemma 3's graph names the attention residual `sa_out`, not `ffn_inp`.
    ("sa_out", "resid_mid"),
    ("ffn_norm", "ffn_norm"),
    ("ffn_out", "ffn_out"),
    ("attn_post_norm", "attn_post_norm"),
    ("ffn_post_norm", "ffn_post_norm"),
    ("l_out", "resid_post"),
    ("result_norm", "final_norm"),
    ("result_output", "logits"),
];

fn lookup(table: &[(&str, &'static str)], name: &str) -> Option<&'static str> {
    table
        .iter()
        .find(|(alias, _)| *alias == name)
        .map(|&(_, canonical)| canonical)
}

/// The canonical short name (`resid_post`, `logits`) for a tap name without a layer,
/// canonical or an alias; None when it is neither.
pub fn canonical_tap_name(name: &str) -> Option<&'static str> {
    let canonical = lookup(TRANSFORMER_LENS, name).or_else(|| lookup(LLAMA_CPP, name));
    let known = Tap::parse(name).filter(|t| t.layer().is_none()).map(|t| t.name());
    known
        .or_else(|| LayerTap::from_name(name).map(LayerTap::name))
        .or(canonical)
}

/// Map any accepted id (canonical, TransformerLens, llama.cpp, HF hidden_states) to its
/// tap. `n_layer` resolves `hidden_states[last]` and `hook_resid_pre`, and bounds layers.
pub fn canonical_tap(name: &str, n_layer: usize) -> Result<Tap> {
    let unknown = || {
        Error::new(format!(
            "unknown tap name {name:?} (canonical ids and aliases: docs/taps.md)"
        ))
    };
    let in_model = |tap: Tap| match tap.layer() {
        Some(l) if l >= n_layer => Err(Error::new(format!(
            "tap {name}: layer {l} does not exist (model has {n_layer})"
        ))),
        _ => Ok(tap),
    };
    let layer_tap = |l: usize, short: Option<&str>| {
        let t = short.and_then(LayerTap::from_name).ok_or_else(unknown)?;
        in_model(Tap::Layer(l, t))
    };
    let parse_layer = |s: &str| s.parse::<usize>().map_err(|_| unknown());
    if let Some(tap) = Tap::parse(name) {
        return in_model(tap);
    }
    if let Some(short) = lookup(TRANSFORMER_LENS, name).or_else(|| lookup(LLAMA_CPP, name)) {
        if let Some(tap) = Tap::parse(short) {
            return Ok(tap);
        }
    }
    if let Some(rest) = name.strip_prefix("blocks.") {
        let (l, hook) = rest.split_once('.').ok_or_else(unknown)?;
        return match (parse_layer(l)?, hook) {
            (0, "hook_resid_pre") => Ok(Tap::Embed),
            (l, "hook_resid_pre") => layer_tap(l - 1, Some("resid_post")),
            (l, hook) => layer_tap(l, lookup(TRANSFORMER_LENS, hook)),
        };
    }
    if let Some(i) = name.strip_prefix("hidden_states[").and_then(|r| r.strip_suffix(']')) {
        return match parse_layer(i)? {
            0 => Ok(Tap::Embed),
            i if i < n_layer => Ok(Tap::Layer(i - 1, LayerTap::ResidPost)),
            i if i == n_layer => Ok(Tap::FinalNorm),
            _ => Err(Error::new(format!(
                "tap {name}: hidden_states has {} entries",
                n_layer + 1
            ))),
        };
    }
    if let Some((base, l)) = name.rsplit_once('-') {
        return layer_tap(parse_layer(l)?, lookup(LLAMA_CPP, base));
    }
    Err(unknown())
}

/// [`canonical_tap`]'s id (`blk.3.resid_post`).
pub fn canonical_tap_id(name: &str, n_layer: usize) -> Result<String> {
    canonical_tap(name, n_layer).map(|t| t.id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_map_to_canonical_ids() {
        let cases = [
            ("blocks.0.hook_resid_pre", "embed"),
            ("blocks.3.hook_resid_pre", "blk.2.resid_post"),
            ("blocks.4.hook_mlp_out", "blk.4.ffn_out"),
            ("blocks.5.hook_attn_out", "blk.5.attn_out"),
            ("ln_final.hook_normalized", "final_norm"),
            ("result_norm", "final_norm"),
            ("kqv_out-7", "blk.7.attn"),
            ("ffn_inp-2", "blk.2.resid_mid"),
            ("sa_out-2", "blk.2.resid_mid"),
            ("ffn_post_norm-1", "blk.1.ffn_post_norm"),
            ("ffn_norm-0", "blk.0.ffn_norm"),
            ("Qcur-1", "blk.1.q"),
            ("l_out-29", "blk.29.resid_post"),
            ("result_output", "logits"),
            ("hidden_states[0]", "embed"),
            ("hidden_states[1]", "blk.0.resid_post"),
            ("hidden_states[30]", "final_norm"),
            ("blk.12.ffn_act", "blk.12.ffn_act"),
        ];
        for (alias, want) in cases {
            assert_eq!(canonical_tap_id(alias, 30).unwrap(), want, "{alias}");
        }
        for bad in [
            "blk.30.q",
            "blk.01.q",
            "hidden_states[31]",
            "l_out-x",
            "l_out-30",
            "q-3",
            "result_norm-3",
            "blocks.2.hook_nope",
            "blocks.2.ln_final.hook_normalized",
            "hook_resid_post",
            "nonsense",
        ] {
            assert!(canonical_tap_id(bad, 30).is_err(), "{bad}");
        }
        let msg = canonical_tap_id("blk.30.q", 30).unwrap_err().to_string();
        assert_eq!(msg, "tap blk.30.q: layer 30 does not exist (model has 30)");
    }

    #[test]
    fn short_names_resolve_through_both_tables() {
        for (name, want) in [
            ("resid_post", "resid_post"),
            ("hook_resid_post", "resid_post"),
            ("l_out", "resid_post"),
            ("hook_mlp_out", "ffn_out"),
            ("Vcur", "v"),
            ("embed", "embed"),
            ("result_output", "logits"),
            ("final_norm", "final_norm"),
        ] {
            assert_eq!(canonical_tap_name(name), Some(want), "{name}");
        }
        for bad in ["resid_pots", "blk.1.q", "hook_resid_pre", "", "output"] {
            assert_eq!(canonical_tap_name(bad), None, "{bad}");
        }
    }
}
