//! Where a tap sits in the llama graph (docs/taps.md): the taps inside a layer, the
//! canonical id grammar (`embed`, `blk.L.<tap>`, `final_norm`, `logits`), topological
//! order, row widths, and the dump file (stem) that holds each tap.

use std::fmt;
use std::str::FromStr;

use crate::config::Config;
use crate::error::Error;

/// Names of the taps inside a layer, in topological order; [`LayerTap`] indexes it.
pub const LAYER_TAPS: &[&str] = &[
    "attn_norm",
    "q_pre_rope",
    "k_pre_rope",
    "q",
    "k",
    "v",
    "attn",
    "attn_out",
    "attn_post_norm",
    "resid_mid",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_act",
    "ffn_out",
    "ffn_post_norm",
    "resid_post",
];
/// Taps after the layers, in order.
pub const OUTPUT_TAPS: &[&str] = &["final_norm", "logits"];
/// The one tap before the layers.
pub const EMBED_TAP: &str = "embed";

/// A tap inside a layer; the declaration order is the topological order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerTap {
    AttnNorm,
    /// The query as it enters RoPE (the projection, after any bias or per-head norm).
    QPreRope,
    /// The key as it enters RoPE.
    KPreRope,
    Q,
    K,
    V,
    Attn,
    AttnOut,
    /// RMSNorm of `attn_out` before it joins the residual stream (models with post
    /// norms: Gemma 3); absent elsewhere.
    AttnPostNorm,
    ResidMid,
    FfnNorm,
    FfnGate,
    FfnUp,
    FfnAct,
    FfnOut,
    /// RMSNorm of `ffn_out` before it joins the residual stream (Gemma 3); absent elsewhere.
    FfnPostNorm,
    ResidPost,
}

impl LayerTap {
    /// Every layer tap, in topological order.
    pub const ALL: [LayerTap; 17] = [
        LayerTap::AttnNorm,
        LayerTap::QPreRope,
        LayerTap::KPreRope,
        LayerTap::Q,
        LayerTap::K,
        LayerTap::V,
        LayerTap::Attn,
        LayerTap::AttnOut,
        LayerTap::AttnPostNorm,
        LayerTap::ResidMid,
        LayerTap::FfnNorm,
        LayerTap::FfnGate,
        LayerTap::FfnUp,
        LayerTap::FfnAct,
        LayerTap::FfnOut,
        LayerTap::FfnPostNorm,
        LayerTap::ResidPost,
    ];

    /// Position in the layer's topological order.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The canonical name (`resid_post`).
    pub fn name(self) -> &'static str {
        LAYER_TAPS[self.index()]
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether a model has this tap: the post norms exist only in models with
    /// `variant.post_norms`; every other layer tap exists in every model.
    pub fn in_model(self, c: &Config) -> bool {
        !matches!(self, LayerTap::AttnPostNorm | LayerTap::FfnPostNorm) || c.variant.post_norms
    }

    /// Row width for a model.
    pub fn width(self, c: &Config) -> usize {
        match self {
            LayerTap::QPreRope | LayerTap::Q | LayerTap::Attn => c.q_width(),
            LayerTap::KPreRope | LayerTap::K | LayerTap::V => c.kv_width(),
            LayerTap::FfnGate | LayerTap::FfnUp | LayerTap::FfnAct => c.n_ff,
            _ => c.n_embd,
        }
    }
}

/// A tap of the model: its canonical id is its `Display` form, and `FromStr` reads only
/// canonical ids (aliases go through [`canonical_tap`](crate::canonical_tap)). The derived
/// order is the topological order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tap {
    Embed,
    Layer(usize, LayerTap),
    FinalNorm,
    Logits,
}

impl Tap {
    /// Parse a canonical id such as `blk.5.resid_post` (layers without leading zeros).
    pub fn parse(id: &str) -> Option<Tap> {
        match id {
            "embed" => return Some(Tap::Embed),
            "final_norm" => return Some(Tap::FinalNorm),
            "logits" => return Some(Tap::Logits),
            _ => {}
        }
        let (layer, name) = id.strip_prefix("blk.")?.split_once('.')?;
        Some(Tap::Layer(parse_layer_index(layer)?, LayerTap::from_name(name)?))
    }

    /// The canonical id (`blk.5.resid_post`).
    pub fn id(&self) -> String {
        self.to_string()
    }

    /// The short name a selection lists (`embed`, `resid_post`, `logits`).
    pub fn name(&self) -> &'static str {
        match *self {
            Tap::Embed => EMBED_TAP,
            Tap::Layer(_, t) => t.name(),
            Tap::FinalNorm => OUTPUT_TAPS[0],
            Tap::Logits => OUTPUT_TAPS[1],
        }
    }

    /// The layer a tap sits in; None outside the layers.
    pub fn layer(&self) -> Option<usize> {
        match *self {
            Tap::Layer(l, _) => Some(l),
            _ => None,
        }
    }

    /// Whether layers and the head are judged by this tap: the residual stream (`embed`,
    /// each layer's `resid_post`), `final_norm` and `logits`. An engine must write these
    /// where asked; the taps inside a layer (q, k) an external engine may not capture.
    pub fn is_stream(&self) -> bool {
        matches!(
            self,
            Tap::Embed | Tap::FinalNorm | Tap::Logits | Tap::Layer(_, LayerTap::ResidPost)
        )
    }

    /// Whether a model has this tap ([`LayerTap::in_model`]).
    pub fn in_model(&self, c: &Config) -> bool {
        match *self {
            Tap::Layer(_, t) => t.in_model(c),
            _ => true,
        }
    }

    /// The dump file that holds this tap.
    pub fn file_stem(&self) -> FileStem {
        match *self {
            Tap::Embed => FileStem::Embed,
            Tap::Layer(l, _) => FileStem::Layer(l),
            Tap::FinalNorm | Tap::Logits => FileStem::Output,
        }
    }

    /// Row width of the tap for a model.
    pub fn width(&self, c: &Config) -> usize {
        match *self {
            Tap::Embed | Tap::FinalNorm => c.n_embd,
            Tap::Layer(_, t) => t.width(c),
            Tap::Logits => c.n_vocab,
        }
    }
}

impl fmt::Display for Tap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Tap::Layer(l, t) => write!(f, "blk.{l}.{}", t.name()),
            _ => f.write_str(self.name()),
        }
    }
}

impl FromStr for Tap {
    type Err = Error;

    fn from_str(id: &str) -> Result<Self, Error> {
        Tap::parse(id).ok_or_else(|| Error::new(format!("{id:?} is not a canonical tap id (docs/taps.md)")))
    }
}

/// A layer index as ids and file stems write it: decimal, without leading zeros.
fn parse_layer_index(s: &str) -> Option<usize> {
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The taps of `c`'s model, in topological order: [`all_taps`] less those it lacks.
pub fn model_taps(c: &Config) -> Vec<Tap> {
    all_taps(c.n_layer).into_iter().filter(|t| t.in_model(c)).collect()
}

/// Every tap of any supported architecture with `n_layer` layers, in topological order;
/// a given model may lack some ([`model_taps`]).
pub fn all_taps(n_layer: usize) -> Vec<Tap> {
    let layers = (0..n_layer).flat_map(|l| LayerTap::ALL.map(|t| Tap::Layer(l, t)));
    std::iter::once(Tap::Embed)
        .chain(layers)
        .chain([Tap::FinalNorm, Tap::Logits])
        .collect()
}

/// A dump file (without its `.safetensors`): `embed`, `blk.L` (one per layer) or
/// `output` (`final_norm` and `logits`). The derived order is the graph order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileStem {
    Embed,
    Layer(usize),
    Output,
}

impl FileStem {
    /// Parse a stem, layers written without leading zeros.
    pub fn parse(stem: &str) -> Option<FileStem> {
        match stem {
            "embed" => Some(FileStem::Embed),
            "output" => Some(FileStem::Output),
            _ => stem
                .strip_prefix("blk.")
                .and_then(parse_layer_index)
                .map(FileStem::Layer),
        }
    }

    /// A stem naming a file of a model with `n_layer` layers.
    pub fn parse_in(stem: &str, n_layer: usize) -> Option<FileStem> {
        Self::parse(stem).filter(|s| s.within(n_layer))
    }

    /// Whether a model with `n_layer` layers has this file.
    pub fn within(&self, n_layer: usize) -> bool {
        match *self {
            FileStem::Layer(l) => l < n_layer,
            _ => true,
        }
    }

    /// The taps the file holds, in order.
    pub fn taps(&self) -> Vec<Tap> {
        match *self {
            FileStem::Embed => vec![Tap::Embed],
            FileStem::Layer(l) => LayerTap::ALL.map(|t| Tap::Layer(l, t)).to_vec(),
            FileStem::Output => vec![Tap::FinalNorm, Tap::Logits],
        }
    }
}

impl fmt::Display for FileStem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FileStem::Embed => f.write_str("embed"),
            FileStem::Layer(l) => write!(f, "blk.{l}"),
            FileStem::Output => f.write_str("output"),
        }
    }
}

impl FromStr for FileStem {
    type Err = Error;

    fn from_str(stem: &str) -> Result<Self, Error> {
        FileStem::parse(stem)
            .ok_or_else(|| Error::new(format!("{stem:?} is not a dump file stem (embed, blk.L, output)")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_taps_follow_their_names() {
        assert_eq!(LayerTap::ALL.len(), LAYER_TAPS.len());
        for (i, t) in LayerTap::ALL.into_iter().enumerate() {
            assert_eq!(t.index(), i);
            assert_eq!(LayerTap::from_name(LAYER_TAPS[i]), Some(t));
        }
        assert_eq!(LayerTap::ResidPost.name(), "resid_post");
        assert_eq!(LayerTap::from_name("l_out"), None);
    }

    #[test]
    fn ids_round_trip_and_refuse_what_is_not_canonical() {
        for (id, tap) in [
            ("embed", Tap::Embed),
            ("blk.0.attn_norm", Tap::Layer(0, LayerTap::AttnNorm)),
            ("blk.12.ffn_act", Tap::Layer(12, LayerTap::FfnAct)),
            ("blk.29.resid_post", Tap::Layer(29, LayerTap::ResidPost)),
            ("final_norm", Tap::FinalNorm),
            ("logits", Tap::Logits),
        ] {
            assert_eq!(id.parse::<Tap>(), Ok(tap), "{id}");
            assert_eq!(tap.to_string(), id);
        }
        for bad in [
            "",
            "blk.01.q",
            "blk..q",
            "blk.+1.q",
            "blk.1.l_out",
            "blk.1",
            "blk.1.q.x",
            "output",
            "output_norm",
            "Embed",
        ] {
            assert!(bad.parse::<Tap>().is_err(), "{bad}");
        }
    }

    #[test]
    fn order_is_topological_and_stems_group_taps() {
        let all = all_taps(2);
        assert_eq!(all.len(), 1 + 2 * 17 + 2);
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(all[1].id(), "blk.0.attn_norm");
        assert_eq!(all[2].id(), "blk.0.q_pre_rope");
        assert_eq!(all[35].id(), "final_norm");
        for t in &all {
            assert!(t.file_stem().taps().contains(t));
        }
        assert_eq!(Tap::Logits.file_stem().to_string(), "output");
        assert_eq!(Tap::Layer(7, LayerTap::Q).file_stem().to_string(), "blk.7");
    }

    #[test]
    fn stems_parse_strictly_and_sort_in_graph_order() {
        assert_eq!("blk.3".parse::<FileStem>(), Ok(FileStem::Layer(3)));
        assert_eq!(FileStem::parse_in("blk.3", 3), None);
        assert_eq!(FileStem::parse_in("output", 3), Some(FileStem::Output));
        for bad in ["blk.03", "blk.", "blk.x", "final_norm", "embed.safetensors"] {
            assert_eq!(FileStem::parse(bad), None, "{bad}");
        }
        let mut stems: Vec<FileStem> = ["output", "blk.10", "blk.2", "embed"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        stems.sort();
        let names: Vec<String> = stems.iter().map(FileStem::to_string).collect();
        assert_eq!(names, ["embed", "blk.2", "blk.10", "output"]);
    }

    #[test]
    fn widths_come_from_the_config() {
        let c = Config {
            arch: "llama".into(),
            n_layer: 2,
            n_embd: 64,
            n_head: 8,
            n_head_kv: 2,
            n_ff: 96,
            n_vocab: 100,
            n_ctx: 128,
            rope_base: 10000.0,
            rms_eps: 1e-5,
            variant: Default::default(),
        };
        let width = |id: &str| Tap::parse(id).unwrap().width(&c);
        assert_eq!(width("blk.0.q"), 64);
        assert_eq!(width("blk.0.k"), 16);
        assert_eq!(width("blk.0.q_pre_rope"), 64);
        assert_eq!(width("blk.0.k_pre_rope"), 16);
        assert_eq!(width("blk.1.ffn_up"), 96);
        assert_eq!(width("blk.1.resid_post"), 64);
        assert_eq!(width("final_norm"), 64);
        assert_eq!(width("logits"), 100);
        assert_eq!(width("blk.1.attn_post_norm"), 64);
    }

    #[test]
    fn post_norm_taps_exist_only_in_models_with_post_norms() {
        let mut c = Config {
            arch: "gemma3".into(),
            n_layer: 2,
            n_embd: 64,
            n_head: 4,
            n_head_kv: 1,
            n_ff: 96,
            n_vocab: 100,
            n_ctx: 128,
            rope_base: 10000.0,
            rms_eps: 1e-6,
            variant: Default::default(),
        };
        assert_eq!(model_taps(&c).len(), 1 + 2 * 15 + 2);
        assert!(!Tap::Layer(0, LayerTap::FfnPostNorm).in_model(&c));
        c.variant.post_norms = true;
        let taps = model_taps(&c);
        assert_eq!(taps, all_taps(2));
        let pos = |id: &str| taps.iter().position(|t| t.id() == id).unwrap();
        assert!(pos("blk.0.attn_out") < pos("blk.0.attn_post_norm"));
        assert!(pos("blk.0.attn_post_norm") < pos("blk.0.resid_mid"));
        assert!(pos("blk.0.ffn_out") < pos("blk.0.ffn_post_norm"));
        assert!(pos("blk.0.ffn_post_norm") < pos("blk.0.resid_post"));
    }
}
