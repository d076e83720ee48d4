//! Canonical tap ids (docs/taps.md), their topological order, the accepted aliases, and
//! the command-line selection syntax for layers, taps and positions.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::Config;

/// Taps inside a layer, in topological order.
pub const LAYER_TAPS: &[&str] = &[
    "attn_norm",
    "q",
    "k",
    "v",
    "attn",
    "attn_out",
    "resid_mid",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_act",
    "ffn_out",
    "resid_post",
];
/// Taps outside the layers: `embed` before them, the others after.
pub const OUTPUT_TAPS: &[&str] = &["final_norm", "logits"];
pub const EMBED_TAP: &str = "embed";

/// A tap id parsed into where it sits in the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tap {
    Embed,
    /// Layer index and index into [`LAYER_TAPS`].
    Layer(usize, usize),
    /// Index into [`OUTPUT_TAPS`].
    Output(usize),
}

impl Tap {
    /// Parse a canonical id such as `blk.5.resid_post`.
    pub fn parse(id: &str) -> Option<Tap> {
        if id == EMBED_TAP {
            return Some(Tap::Embed);
        }
        if let Some(i) = OUTPUT_TAPS.iter().position(|t| *t == id) {
            return Some(Tap::Output(i));
        }
        let rest = id.strip_prefix("blk.")?;
        let (layer, name) = rest.split_once('.')?;
        if layer.is_empty() || (layer.len() > 1 && layer.starts_with('0')) {
            return None;
        }
        let layer = layer.parse().ok()?;
        LAYER_TAPS.iter().position(|t| *t == name).map(|i| Tap::Layer(layer, i))
    }

    pub fn id(&self) -> String {
        match *self {
            Tap::Embed => EMBED_TAP.to_string(),
            Tap::Layer(l, i) => format!("blk.{l}.{}", LAYER_TAPS[i]),
            Tap::Output(i) => OUTPUT_TAPS[i].to_string(),
        }
    }

    /// The dump file (without extension) that holds this tap.
    pub fn file_stem(&self) -> String {
        match *self {
            Tap::Embed => "embed".into(),
            Tap::Layer(l, _) => format!("blk.{l}"),
            Tap::Output(_) => "output".into(),
        }
    }

    /// Row width of the tap for a model.
    pub fn width(&self, c: &Config) -> usize {
        match *self {
            Tap::Embed => c.n_embd,
            Tap::Layer(_, i) => match LAYER_TAPS[i] {
                "q" | "attn" => c.q_width(),
                "k" | "v" => c.kv_width(),
                "ffn_gate" | "ffn_up" | "ffn_act" => c.n_ff,
                _ => c.n_embd,
            },
            Tap::Output(0) => c.n_embd,
            Tap::Output(_) => c.n_vocab,
        }
    }
}

/// Map any accepted name (canonical, TransformerLens, llama.cpp, HF hidden_states) to
/// the canonical id. `n_layer` resolves `hidden_states[last]` and `hook_resid_pre`.
pub fn canonical_tap_id(name: &str, n_layer: usize) -> Result<String> {
    let unknown = || {
        Error::input(format!(
            "unknown tap name {name:?} (canonical ids and aliases: docs/taps.md)"
        ))
    };
    if let Some(tap) = Tap::parse(name) {
        return match tap {
            Tap::Layer(l, _) if l >= n_layer => Err(Error::input(format!(
                "tap {name}: layer {l} does not exist (model has {n_layer})"
            ))),
            _ => Ok(tap.id()),
        };
    }
    let layer_checked = |l: usize, tap: &str| {
        if l >= n_layer {
            Err(Error::input(format!(
                "tap {name}: layer {l} does not exist (model has {n_layer})"
            )))
        } else {
            Ok(format!("blk.{l}.{tap}"))
        }
    };
    let parse_layer = |s: &str| s.parse::<usize>().map_err(|_| unknown());
    match name {
        "ln_final.hook_normalized" | "result_norm" => return Ok("final_norm".into()),
        "result_output" => return Ok("logits".into()),
        _ => {}
    }
    if let Some(rest) = name.strip_prefix("blocks.") {
        let (l, hook) = rest.split_once('.').ok_or_else(unknown)?;
        let l = parse_layer(l)?;
        return match hook {
            "hook_resid_pre" if l == 0 => Ok(EMBED_TAP.into()),
            "hook_resid_pre" => layer_checked(l - 1, "resid_post"),
            "hook_attn_out" => layer_checked(l, "attn_out"),
            "hook_resid_mid" => layer_checked(l, "resid_mid"),
            "hook_mlp_out" => layer_checked(l, "ffn_out"),
            "hook_resid_post" => layer_checked(l, "resid_post"),
            _ => Err(unknown()),
        };
    }
    if let Some(rest) = name.strip_prefix("hidden_states[").and_then(|r| r.strip_suffix(']')) {
        let i = parse_layer(rest)?;
        return match i {
            0 => Ok(EMBED_TAP.into()),
            i if i < n_layer => Ok(format!("blk.{}.resid_post", i - 1)),
            i if i == n_layer => Ok("final_norm".into()),
            _ => Err(Error::input(format!(
                "tap {name}: hidden_states has {} entries",
                n_layer + 1
            ))),
        };
    }
    if let Some((base, l)) = name.rsplit_once('-') {
        let tap = match base {
            "attn_norm" => "attn_norm",
            "Qcur" => "q",
            "Kcur" => "k",
            "Vcur" => "v",
            "kqv_out" => "attn",
            "ffn_inp" => "resid_mid",
            "ffn_norm" => "ffn_norm",
            "ffn_out" => "ffn_out",
            "l_out" => "resid_post",
            _ => return Err(unknown()),
        };
        return layer_checked(parse_layer(l)?, tap);
    }
    Err(unknown())
}

/// Which layers, taps and positions an engine records. Positions stay a spec until
/// the sequence length is known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    pub layers: Vec<usize>,
    /// Short names: entries of [`LAYER_TAPS`], `embed`, `final_norm`, `logits`.
    pub taps: Vec<String>,
    pub positions: String,
}

impl Selection {
    pub fn parse(layers: &str, taps: &str, positions: &str, n_layer: usize) -> Result<Self> {
        let layers = parse_layers(layers, n_layer)?;
        let taps = parse_taps(taps)?;
        // Validate the position syntax now, against no particular length.
        PositionSpec::parse(positions)?;
        Ok(Self {
            layers,
            taps,
            positions: positions.to_string(),
        })
    }

    /// Whether the canonical tap is recorded.
    pub fn wants(&self, tap: &Tap) -> bool {
        match *tap {
            Tap::Embed => self.taps.iter().any(|t| t == EMBED_TAP),
            Tap::Layer(l, i) => self.layers.contains(&l) && self.taps.iter().any(|t| t == LAYER_TAPS[i]),
            Tap::Output(i) => self.taps.iter().any(|t| t == OUTPUT_TAPS[i]),
        }
    }

    /// All selected taps in topological order.
    pub fn taps_in_order(&self, n_layer: usize) -> Vec<Tap> {
        all_taps(n_layer).into_iter().filter(|t| self.wants(t)).collect()
    }
}

/// Every tap of a model, in topological order.
pub fn all_taps(n_layer: usize) -> Vec<Tap> {
    let mut out = vec![Tap::Embed];
    for l in 0..n_layer {
        out.extend((0..LAYER_TAPS.len()).map(|i| Tap::Layer(l, i)));
    }
    out.extend((0..OUTPUT_TAPS.len()).map(Tap::Output));
    out
}

fn parse_index(s: &str, what: &str) -> Result<usize> {
    s.trim()
        .parse()
        .map_err(|_| Error::input(format!("bad {what} {s:?}: expected a non-negative integer")))
}

/// `0,1,2,4,8`, `0..22` (end exclusive), `3..`, `all`, `none` (only embed/output taps).
pub fn parse_layers(spec: &str, n_layer: usize) -> Result<Vec<usize>> {
    if spec.trim() == "none" {
        return Ok(Vec::new());
    }
    let mut set = BTreeSet::new();
    for item in spec.split(',').map(str::trim) {
        if item == "all" {
            set.extend(0..n_layer);
            continue;
        }
        let (lo, hi) = match item.split_once("..") {
            Some((a, b)) => {
                let lo = if a.is_empty() { 0 } else { parse_index(a, "layer")? };
                let hi = if b.is_empty() {
                    n_layer
                } else {
                    parse_index(b, "layer")?
                };
                (lo, hi)
            }
            None => {
                let l = parse_index(item, "layer")?;
                if l >= n_layer {
                    return Err(Error::input(format!(
                        "layer selection {item:?} goes past the model's {n_layer} layers (0..{n_layer})"
                    )));
                }
                (l, l + 1)
            }
        };
        if lo >= hi {
            return Err(Error::input(format!("empty layer range {item:?}")));
        }
        if hi > n_layer {
            return Err(Error::input(format!(
                "layer selection {item:?} goes past the model's {n_layer} layers (0..{n_layer})"
            )));
        }
        set.extend(lo..hi);
    }
    Ok(set.into_iter().collect())
}

/// `resid_post,attn_out`, `all`, aliases such as `hook_resid_post` or `l_out`.
pub fn parse_taps(spec: &str) -> Result<Vec<String>> {
    let mut set = BTreeSet::new();
    for item in spec.split(',').map(str::trim) {
        if item == "all" {
            set.extend(LAYER_TAPS.iter().chain(OUTPUT_TAPS).map(|s| s.to_string()));
            set.insert(EMBED_TAP.to_string());
            continue;
        }
        let name = match item {
            "hook_resid_post" | "l_out" => "resid_post",
            "hook_attn_out" => "attn_out",
            "hook_resid_mid" | "ffn_inp" => "resid_mid",
            "hook_mlp_out" => "ffn_out",
            "kqv_out" => "attn",
            "Qcur" => "q",
            "Kcur" => "k",
            "Vcur" => "v",
            "result_norm" => "final_norm",
            "result_output" => "logits",
            other => other,
        };
        if !(LAYER_TAPS.contains(&name) || OUTPUT_TAPS.contains(&name) || name == EMBED_TAP) {
            return Err(Error::input(format!(
                "unknown tap {item:?}; known: embed, {}, {}",
                LAYER_TAPS.join(", "),
                OUTPUT_TAPS.join(", ")
            )));
        }
        set.insert(name.to_string());
    }
    // Order by topological position so manifests read naturally.
    let order = |t: &String| {
        if t == EMBED_TAP {
            0
        } else if let Some(i) = LAYER_TAPS.iter().position(|x| x == t) {
            1 + i
        } else {
            100 + OUTPUT_TAPS.iter().position(|x| x == t).unwrap_or(0)
        }
    };
    let mut out: Vec<String> = set.into_iter().collect();
    out.sort_by_key(order);
    Ok(out)
}

/// One item of a position spec; negative bounds count from the end.
#[derive(Debug, Clone, Copy, PartialEq)]
enum PosItem {
    All,
    Last,
    Range(Option<i64>, Option<i64>),
    One(i64),
}

/// Positions: `all`, `last`, `0..16,820..840` (end exclusive), `-8..` (from the end), `5`.
#[derive(Debug, Clone, PartialEq)]
pub struct PositionSpec(Vec<PosItem>);

impl PositionSpec {
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |item: &str| {
            Error::input(format!(
                "bad position {item:?}: use all, last, N, A..B, A.. or -K.. (negative counts from the end)"
            ))
        };
        let num = |s: &str, item: &str| s.trim().parse::<i64>().map_err(|_| bad(item));
        let mut items = Vec::new();
        for item in spec.split(',').map(str::trim) {
            items.push(match item {
                "all" => PosItem::All,
                "last" => PosItem::Last,
                _ => match item.split_once("..") {
                    Some((a, b)) => PosItem::Range(
                        if a.is_empty() { None } else { Some(num(a, item)?) },
                        if b.is_empty() { None } else { Some(num(b, item)?) },
                    ),
                    None if !item.is_empty() => PosItem::One(num(item, item)?),
                    None => return Err(bad(item)),
                },
            });
        }
        Ok(Self(items))
    }

    /// Absolute, sorted, de-duplicated positions for a sequence of `len` tokens.
    pub fn resolve(&self, len: usize) -> Result<Vec<usize>> {
        // i128: bounds near i64::MAX (`--positions 9223372036854775807`) cannot overflow.
        let n = len as i128;
        let abs = |p: i64| if p < 0 { n + p as i128 } else { p as i128 };
        // Ranges first, merged after: the work is the spec's length plus the output's,
        // not the two multiplied (`all,all,all,...`).
        let mut ranges = Vec::with_capacity(self.0.len());
        for item in &self.0 {
            let (lo, hi) = match *item {
                PosItem::All => (0, n),
                PosItem::Last => (n - 1, n),
                PosItem::One(p) => (abs(p), abs(p) + 1),
                PosItem::Range(a, b) => (a.map(abs).unwrap_or(0), b.map(abs).unwrap_or(n)),
            };
            if lo < 0 || hi > n || lo >= hi {
                return Err(Error::input(format!(
                    "position selection {} is out of range for a {len}-token sequence",
                    describe(item)
                )));
            }
            ranges.push((lo as usize, hi as usize));
        }
        ranges.sort_unstable();
        let mut out: Vec<usize> = Vec::new();
        for (lo, hi) in ranges {
            let from = out.last().map_or(lo, |&last| lo.max(last + 1));
            out.extend(from..hi);
        }
        Ok(out)
    }
}

/// Index ranges of the runs of consecutive values in `values` (ascending): [0, 1, 2, 7]
/// gives 0..3 and 3..4.
pub fn consecutive_runs(values: &[usize]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= values.len() {
            return None;
        }
        let start = i;
        i += 1;
        while i < values.len() && values[i] == values[i - 1] + 1 {
            i += 1;
        }
        Some(start..i)
    })
}

/// The shortest `--positions` text for ascending positions: `5,10..20,31`.
pub fn positions_spec(positions: &[usize]) -> String {
    let item = |r: std::ops::Range<usize>| {
        if r.len() == 1 {
            positions[r.start].to_string()
        } else {
            format!("{}..{}", positions[r.start], positions[r.end - 1] + 1)
        }
    };
    consecutive_runs(positions).map(item).collect::<Vec<_>>().join(",")
}

fn describe(item: &PosItem) -> String {
    let o = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
    match item {
        PosItem::All => "all".into(),
        PosItem::Last => "last".into(),
        PosItem::One(p) => p.to_string(),
        PosItem::Range(a, b) => format!("{}..{}", o(*a), o(*b)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_lists_round_trip_through_their_spec() {
        let positions = vec![0, 3, 4, 5, 9, 11, 12];
        let spec = positions_spec(&positions);
        assert_eq!(spec, "0,3..6,9,11..13");
        assert_eq!(PositionSpec::parse(&spec).unwrap().resolve(20).unwrap(), positions);
    }

    #[test]
    fn aliases_map_to_canonical_ids() {
        let cases = [
            ("blocks.0.hook_resid_pre", "embed"),
            ("blocks.3.hook_resid_pre", "blk.2.resid_post"),
            ("blocks.4.hook_mlp_out", "blk.4.ffn_out"),
            ("ln_final.hook_normalized", "final_norm"),
            ("kqv_out-7", "blk.7.attn"),
            ("ffn_inp-2", "blk.2.resid_mid"),
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
            "blocks.2.hook_nope",
            "nonsense",
        ] {
            assert!(canonical_tap_id(bad, 30).is_err(), "{bad}");
        }
    }

    #[test]
    fn positions_resolve_relative_to_the_end() {
        let spec = PositionSpec::parse("0..3,-2..,last,5").unwrap();
        assert_eq!(spec.resolve(10).unwrap(), vec![0, 1, 2, 5, 8, 9]);
        assert!(PositionSpec::parse("10..20").unwrap().resolve(15).is_err());
        assert!(PositionSpec::parse("5..5").unwrap().resolve(15).is_err());
        assert!(PositionSpec::parse("a..b").is_err());
        assert!(PositionSpec::parse("").is_err());
    }

    #[test]
    fn extreme_numbers_are_refused_without_overflow() {
        // Overflow panics in debug builds (`cargo test`): these must be plain refusals.
        assert!(parse_layers("18446744073709551615", 22).is_err());
        assert!(parse_layers("18446744073709551615..", 22).is_err());
        for spec in [
            "9223372036854775807",
            "-9223372036854775808..",
            "0..9223372036854775807",
            "-9223372036854775808",
        ] {
            assert!(PositionSpec::parse(spec).unwrap().resolve(10).is_err(), "{spec}");
        }
        assert_eq!(
            PositionSpec::parse("all,all,0..3,last").unwrap().resolve(5).unwrap(),
            vec![0, 1, 2, 3, 4]
        );
    }

    #[test]
    fn layers_and_taps_parse() {
        assert_eq!(parse_layers("0,1,2,4,8", 22).unwrap(), vec![0, 1, 2, 4, 8]);
        assert_eq!(parse_layers("20..", 22).unwrap(), vec![20, 21]);
        assert_eq!(parse_layers("all", 3).unwrap(), vec![0, 1, 2]);
        assert!(parse_layers("0..32", 22).is_err());
        assert!(parse_layers("5..2", 22).is_err());
        assert_eq!(
            parse_taps("logits,l_out,embed").unwrap(),
            vec!["embed", "resid_post", "logits"]
        );
        assert!(parse_taps("resid_pots").is_err());
    }
}
