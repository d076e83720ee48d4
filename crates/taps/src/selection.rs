//! What an engine records: the command-line selection syntax for layers, taps and
//! positions, parsed once at the boundary and written to a manifest as the strings the
//! user gave (docs/dump-format.md, `selection`).

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::alias::canonical_tap_name;
use crate::error::{Error, Result};
use crate::tap::{all_taps, Tap, EMBED_TAP, LAYER_TAPS, OUTPUT_TAPS};

/// Which layers, taps and positions an engine records. Positions stay a spec until
/// the sequence length is known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    pub layers: Vec<usize>,
    /// Short names: entries of [`LAYER_TAPS`], `embed`, `final_norm`, `logits`. A dump
    /// of another writer may list names this build does not know; they are kept.
    pub taps: Vec<String>,
    pub positions: PositionSpec,
}

impl Selection {
    pub fn parse(layers: &str, taps: &str, positions: &str, n_layer: usize) -> Result<Self> {
        Ok(Self {
            layers: parse_layers(layers, n_layer)?,
            taps: parse_taps(taps)?,
            positions: PositionSpec::parse(positions)?,
        })
    }

    /// Whether the tap is recorded.
    pub fn wants(&self, tap: &Tap) -> bool {
        let layer_wanted = tap.layer().is_none_or(|l| self.layers.contains(&l));
        layer_wanted && self.taps.iter().any(|t| t == tap.name())
    }

    /// All selected taps in topological order.
    pub fn taps_in_order(&self, n_layer: usize) -> Vec<Tap> {
        all_taps(n_layer).into_iter().filter(|t| self.wants(t)).collect()
    }
}

fn parse_index(s: &str, what: &str) -> Result<usize> {
    s.trim()
        .parse()
        .map_err(|_| Error::new(format!("bad {what} {s:?}: expected a non-negative integer")))
}

/// `0,1,2,4,8`, `0..22` (end exclusive), `3..`, `all`, `none` (only embed/output taps).
pub fn parse_layers(spec: &str, n_layer: usize) -> Result<Vec<usize>> {
    if spec.trim() == "none" {
        return Ok(Vec::new());
    }
    let past_the_model = |item: &str| {
        Error::new(format!(
            "layer selection {item:?} goes past the model's {n_layer} layers (0..{n_layer}, end exclusive)"
        ))
    };
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
                    return Err(past_the_model(item));
                }
                (l, l + 1)
            }
        };
        if lo >= hi {
            return Err(Error::new(format!("empty layer range {item:?}")));
        }
        if hi > n_layer {
            return Err(past_the_model(item));
        }
        set.extend(lo..hi);
    }
    Ok(set.into_iter().collect())
}

/// `resid_post,attn_out`, `all`, aliases such as `hook_resid_post` or `l_out`; the
/// canonical short names come back in topological order, so manifests read naturally.
pub fn parse_taps(spec: &str) -> Result<Vec<String>> {
    let mut set = BTreeSet::new();
    for item in spec.split(',').map(str::trim) {
        if item == "all" {
            set.extend(all_taps(1).iter().map(Tap::name));
            continue;
        }
        let name = canonical_tap_name(item).ok_or_else(|| {
            Error::new(format!(
                "unknown tap {item:?}; known: {EMBED_TAP}, {}, {}",
                LAYER_TAPS.join(", "),
                OUTPUT_TAPS.join(", ")
            ))
        })?;
        set.insert(name);
    }
    let order = |name: &&str| all_taps(1).iter().position(|t| t.name() == *name);
    let mut out: Vec<&str> = set.into_iter().collect();
    out.sort_by_key(order);
    Ok(out.into_iter().map(str::to_string).collect())
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
/// Keeps the text it was parsed from, which is what a manifest records.
#[derive(Debug, Clone, PartialEq)]
pub struct PositionSpec {
    text: String,
    items: Vec<PosItem>,
}

impl PositionSpec {
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |item: &str| {
            Error::new(format!(
                "bad position {item:?}: use all, last, N, A..B, A.. or -K.. (negative counts from the end)"
            ))
        };
        let num = |s: &str, item: &str| s.trim().parse::<i64>().map_err(|_| bad(item));
        let bound = |s: &str, item: &str| if s.is_empty() { Ok(None) } else { num(s, item).map(Some) };
        let mut items = Vec::new();
        for item in spec.split(',').map(str::trim) {
            items.push(match item {
                "all" => PosItem::All,
                "last" => PosItem::Last,
                _ => match item.split_once("..") {
                    Some((a, b)) => match (bound(a, item)?, bound(b, item)?) {
                        // Ends counted from the same side: empty whatever the length.
                        (Some(lo), Some(hi)) if (lo < 0) == (hi < 0) && lo >= hi => {
                            return Err(Error::new(format!("empty position range {item:?}")))
                        }
                        (lo, hi) => PosItem::Range(lo, hi),
                    },
                    None if !item.is_empty() => PosItem::One(num(item, item)?),
                    None => return Err(bad(item)),
                },
            });
        }
        Ok(Self {
            text: spec.to_string(),
            items,
        })
    }

    /// Every position.
    pub fn all() -> Self {
        Self {
            text: "all".into(),
            items: vec![PosItem::All],
        }
    }

    /// Exactly `positions` (ascending, not empty), written as [`positions_spec`] does.
    pub fn exactly(positions: &[usize]) -> Self {
        let item = |r: std::ops::Range<usize>| {
            let (lo, hi) = (positions[r.start] as i64, positions[r.end - 1] as i64 + 1);
            if r.len() == 1 {
                PosItem::One(lo)
            } else {
                PosItem::Range(Some(lo), Some(hi))
            }
        };
        Self {
            text: positions_spec(positions),
            items: consecutive_runs(positions).map(item).collect(),
        }
    }

    /// The first item, as written (`5000`, `0..10`, `-5..`), that selects no position of
    /// a sequence of `len` tokens or reaches past it: what [`Self::resolve`] refuses.
    pub fn misfit(&self, len: usize) -> Option<String> {
        self.items.iter().find(|i| bounds(i, len).is_none()).map(describe)
    }

    /// The first item, as written, that lies within a sequence of `len` tokens but
    /// selects none of them (`5..-1` of 6 tokens), with the range it reads (`5..5`).
    pub fn empty_within(&self, len: usize) -> Option<(String, String)> {
        self.items.iter().find_map(|item| {
            let (lo, hi) = raw_bounds(item, len);
            (lo >= 0 && lo <= len as i128 && hi <= len as i128 && lo >= hi)
                .then(|| (describe(item), format!("{lo}..{hi}")))
        })
    }

    /// The spec as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Absolute, sorted, de-duplicated positions for a sequence of `len` tokens.
    pub fn resolve(&self, len: usize) -> Result<Vec<usize>> {
        // Ranges first, merged after: the work is the spec's length plus the output's,
        // not the two multiplied (`all,all,all,...`).
        let mut ranges = Vec::with_capacity(self.items.len());
        for item in &self.items {
            let Some(range) = bounds(item, len) else {
                return Err(Error::new(format!(
                    "position selection {} is out of range for a {len}-token sequence",
                    describe(item)
                )));
            };
            ranges.push(range);
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

impl fmt::Display for PositionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for PositionSpec {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for PositionSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        PositionSpec::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The positions `lo..hi` an item selects in a sequence of `len` tokens; None when it
/// reaches outside the sequence or selects nothing.
fn bounds(item: &PosItem, len: usize) -> Option<(usize, usize)> {
    let (lo, hi) = raw_bounds(item, len);
    (lo >= 0 && hi <= len as i128 && lo < hi).then_some((lo as usize, hi as usize))
}

/// An item's start and end (exclusive) for `len` tokens, negatives counted from the end,
/// not yet checked against the sequence.
fn raw_bounds(item: &PosItem, len: usize) -> (i128, i128) {
    // i128: bounds near i64::MAX (`--positions 9223372036854775807`) cannot overflow.
    let n = len as i128;
    let abs = |p: i64| if p < 0 { n + p as i128 } else { p as i128 };
    let (lo, hi) = match *item {
        PosItem::All => (0, n),
        PosItem::Last => (n - 1, n),
        PosItem::One(p) => (abs(p), abs(p) + 1),
        PosItem::Range(a, b) => (a.map(abs).unwrap_or(0), b.map(abs).unwrap_or(n)),
    };
    (lo, hi)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::LayerTap;

    #[test]
    fn position_lists_round_trip_through_their_spec() {
        let positions = vec![0, 3, 4, 5, 9, 11, 12];
        let spec = positions_spec(&positions);
        assert_eq!(spec, "0,3..6,9,11..13");
        assert_eq!(PositionSpec::parse(&spec).unwrap().resolve(20).unwrap(), positions);
        assert_eq!(PositionSpec::exactly(&positions), PositionSpec::parse(&spec).unwrap());
    }

    #[test]
    fn positions_resolve_relative_to_the_end() {
        let spec = PositionSpec::parse("0..3,-2..,last,5").unwrap();
        assert_eq!(spec.resolve(10).unwrap(), vec![0, 1, 2, 5, 8, 9]);
        assert!(PositionSpec::parse("10..20").unwrap().resolve(15).is_err());
        // An empty range is refused as it is parsed, whatever the length.
        assert!(PositionSpec::parse("5..5").is_err());
        assert!(PositionSpec::parse("-1..-3").is_err());
        let spec = PositionSpec::parse("0..3,-2..,12..15,5000").unwrap();
        assert_eq!(spec.misfit(15), Some("5000".into()));
        assert_eq!(spec.misfit(14), Some("12..15".into()));
        assert_eq!(spec.misfit(5001), None);
        let tail = PositionSpec::parse("5..-1").unwrap();
        assert_eq!(tail.empty_within(6), Some(("5..-1".into(), "5..5".into())));
        assert_eq!(tail.empty_within(7), None);
        assert_eq!(tail.empty_within(4), None, "outside, not empty: misfit names it");
        assert!(PositionSpec::parse("a..b").is_err());
        assert!(PositionSpec::parse("").is_err());
        assert!(PositionSpec::parse("1,,2").is_err());
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
        assert_eq!(parse_layers("..2, 5", 22).unwrap(), vec![0, 1, 5]);
        assert_eq!(parse_layers("all", 3).unwrap(), vec![0, 1, 2]);
        assert_eq!(parse_layers("none", 3).unwrap(), Vec::<usize>::new());
        assert!(parse_layers("0..32", 22).is_err());
        assert!(parse_layers("5..2", 22).is_err());
        assert!(parse_layers("22", 22).is_err());
        assert_eq!(
            parse_taps("logits,l_out,embed").unwrap(),
            vec!["embed", "resid_post", "logits"]
        );
        assert_eq!(
            parse_taps("hook_mlp_out, Qcur, result_norm, q").unwrap(),
            vec!["q", "ffn_out", "final_norm"]
        );
        assert_eq!(
            parse_taps("all").unwrap().len(),
            1 + LAYER_TAPS.len() + OUTPUT_TAPS.len()
        );
        assert_eq!(parse_taps("all").unwrap()[0], "embed");
        let err = parse_taps("resid_pots").unwrap_err().to_string();
        assert!(
            err.starts_with("unknown tap \"resid_pots\"; known: embed, attn_norm"),
            "{err}"
        );
    }

    #[test]
    fn selections_parse_once_and_serialise_as_written() {
        let s = Selection::parse("1..3", "resid_post,logits", "0..4, -2..", 4).unwrap();
        assert_eq!(s.layers, vec![1, 2]);
        assert_eq!(s.positions.resolve(10).unwrap(), vec![0, 1, 2, 3, 8, 9]);
        assert!(s.wants(&Tap::Layer(2, LayerTap::ResidPost)));
        assert!(!s.wants(&Tap::Layer(0, LayerTap::ResidPost)));
        assert!(!s.wants(&Tap::Layer(2, LayerTap::Q)));
        assert!(s.wants(&Tap::Logits));
        assert!(!s.wants(&Tap::Embed));
        let ids: Vec<String> = s.taps_in_order(4).iter().map(Tap::id).collect();
        assert_eq!(ids, ["blk.1.resid_post", "blk.2.resid_post", "logits"]);
        assert_eq!(s.positions.to_string(), "0..4, -2..");
        assert!(Selection::parse("0", "resid_post", "x", 4).is_err());
        assert!(Selection::parse("0", "nope", "all", 4).is_err());
        assert!(Selection::parse("9", "resid_post", "all", 4).is_err());
    }
}
