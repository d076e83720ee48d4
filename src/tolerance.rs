//! Tolerances: per-dtype defaults, per-tap overrides by glob pattern, and the file that
//! `resbisect calibrate` writes from measured noise floors and `--tolerances` reads.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::dump::TapDType;
use crate::error::{Error, Result};
use crate::taps::{LayerTap, Tap};

/// A row diverges when `rel_l2 > rel_l2` and `max_abs > abs` (so rows of near-zero
/// vectors do not trip on rounding), or when it holds NaN/Inf.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a tolerance: an object with \"rel_l2\" and \"abs\""
)]
pub struct Tolerance {
    pub rel_l2: f64,
    pub abs: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a tap tolerance: an object with \"pattern\", \"rel_l2\" and \"abs\""
)]
pub struct TapTolerance {
    /// Glob over canonical tap ids, `*` matching any run of characters: `blk.*.k`.
    pub pattern: String,
    pub rel_l2: f64,
    pub abs: f64,
    /// What calibration measured (the rel L2 quantile over positions), before margin and
    /// floor; absent for hand-written entries and per-kind fallbacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<f64>,
}

/// How `resbisect calibrate` derived a file's per-tap tolerances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Quantile of each tap's rows' rel L2 over positions (0.99: p99).
    pub quantile: f64,
    /// Multiplies the quantile.
    pub margin: f64,
    /// Least rel L2 tolerance of any tap.
    pub floor: f64,
    /// Every calibrated tap's `abs`: rows whose largest difference stays under it never diverge.
    pub abs_floor: f64,
}

impl Calibration {
    /// `calibrated per tap: p99 × 4, rel floor 1e-7, abs floor 1e-6`.
    pub fn describe(&self) -> String {
        format!(
            "calibrated per tap: p{} × {}, rel floor {:e}, abs floor {:e}",
            self.quantile * 100.0,
            self.margin,
            self.floor,
            self.abs_floor
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a tolerance file: an object with \"version\", \"defaults\" and optionally \"taps\", \"floors\""
)]
pub struct Tolerances {
    pub version: u32,
    /// Defaults by the least precise dtype involved: F64, F32, BF16, F16.
    #[serde(deserialize_with = "unique_keys")]
    pub defaults: std::collections::BTreeMap<String, Tolerance>,
    /// Overrides, first match wins.
    #[serde(default)]
    pub taps: Vec<TapTolerance>,
    /// Expected noise floors (rel L2 of a sound engine's rows against the f32 reference)
    /// by the least precise dtype involved; judging against the floor uses
    /// [`FLOOR_MARGIN`] × floor. Files without them get the built-in floors.
    #[serde(default = "default_floors", deserialize_with = "unique_keys")]
    pub floors: std::collections::BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// How calibration made `taps`, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
}

/// A JSON object as a map, refusing a key given twice (where serde would keep the last).
fn unique_keys<'de, D, V>(de: D) -> std::result::Result<std::collections::BTreeMap<String, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Unique<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Unique<V> {
        type Value = std::collections::BTreeMap<String, V>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> std::result::Result<Self::Value, M::Error> {
            let mut out = std::collections::BTreeMap::new();
            while let Some((key, value)) = map.next_entry::<String, V>()? {
                if out.contains_key(&key) {
                    return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
                }
                out.insert(key, value);
            }
            Ok(out)
        }
    }
    de.deserialize_map(Unique(std::marker::PhantomData))
}

impl Default for Tolerances {
    /// Defaults sized for comparing a sound engine with the f32 reference: f32 engines
    /// differ by summation order (measured ~1e-5 rel L2), half-precision engines by
    /// storage rounding that accumulates over layers. Measured, `cpu` runtime against the
    /// reference on SmolLM2, 1652 tokens + 5 generated, worst tap: f32 3.4e-5, f16 1.5e-2
    /// (ffn_act), bf16 9.2e-2 (logits, a near-uniform shift that softmax ignores: KL 7e-4,
    /// top-1 agrees).
    fn default() -> Self {
        let t = |rel_l2, abs| Tolerance { rel_l2, abs };
        Self {
            version: 1,
            defaults: [
                ("F64", t(1e-9, 1e-12)),
                ("F32", t(1e-3, 1e-6)),
                ("BF16", t(1.5e-1, 1e-3)),
                ("F16", t(3e-2, 1e-3)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            taps: Vec::new(),
            floors: default_floors(),
            source: None,
            calibration: None,
        }
    }
}

/// How far over its expected noise floor a row must be to count as over the floor.
pub const FLOOR_MARGIN: f64 = 10.0;

/// Noise floors of sound engines against the f32 reference, from SmolLM2 (`cpu` runtime
/// against the reference, every tap of every layer, 128 and 1652 tokens; docs/validation.md,
/// "Noise floors"): the worst tap's 75th-percentile row was f32 4.5e-6, f16 6.9e-3, bf16
/// 4.7e-2, and the worst single f32 row 3.4e-5 (1652 tokens); HF transformers f32 stays
/// ≤ 1.3e-5 on every row. Each floor × FLOOR_MARGIN sits above those, and below the
/// errors of real sub-tolerance bugs (RMSNorm eps 1e-6 for 1e-5: 3e-4 from layer 0 on;
/// RoPE angles in bf16: 7e-4 at layer 0's q, 1e-4 in its residual stream).
fn default_floors() -> std::collections::BTreeMap<String, f64> {
    [("F64", 1e-12), ("F32", 4e-6), ("BF16", 1e-2), ("F16", 2e-3)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// `*` matches any run of characters; everything else literally.
/// Whether a tolerance pattern can match a tap of some model: its layer numbers read as
/// any layer, it matches one of the canonical tap ids.
fn matches_some_tap(pattern: &str) -> bool {
    let any_layer: String = pattern
        .split('.')
        .map(|part| {
            if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
                "*"
            } else {
                part
            }
        })
        .collect::<Vec<_>>()
        .join(".");
    let ids = [Tap::Embed, Tap::FinalNorm, Tap::Logits]
        .into_iter()
        .chain(LayerTap::ALL.into_iter().map(|t| Tap::Layer(0, t)))
        .map(|t| t.id());
    ids.into_iter().any(|id| glob_match(&any_layer, &id))
}

pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

fn precision_rank(d: TapDType) -> u8 {
    match d {
        TapDType::F64 => 3,
        TapDType::F32 => 2,
        TapDType::F16 => 1,
        TapDType::BF16 => 0,
    }
}

/// The least precise of the dtypes involved.
pub fn coarsest(dtypes: &[TapDType]) -> TapDType {
    *dtypes
        .iter()
        .min_by_key(|d| precision_rank(**d))
        .unwrap_or(&TapDType::F32)
}

/// An engine's declared compute dtype as a tap dtype (`f16` computes coarser than it
/// dumps), in the spellings engines use (`f16`, `fp16`, `float16`, `half`, torch's
/// `torch.float16`); `None` for any other text.
pub fn engine_dtype(name: &str) -> Option<TapDType> {
    let lower = name.to_ascii_lowercase();
    match lower.strip_prefix("torch.").unwrap_or(&lower) {
        "f64" | "fp64" | "float64" | "double" => Some(TapDType::F64),
        "f32" | "fp32" | "float32" | "float" => Some(TapDType::F32),
        "f16" | "fp16" | "float16" | "half" => Some(TapDType::F16),
        "bf16" | "bfloat16" => Some(TapDType::BF16),
        _ => None,
    }
}

impl Tolerances {
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::sys::read_text(path)?;
        let t: Tolerances = serde_json::from_str(&text)
            .map_err(|e| Error::input(format!("{}: bad tolerance file: {e}", path.display())))?;
        if t.version != 1 {
            return Err(Error::input(format!(
                "{}: tolerance file version {} is not supported",
                path.display(),
                t.version
            )));
        }
        let values = t
            .defaults
            .iter()
            .flat_map(|(k, d)| {
                [
                    (format!("defaults.{k}.rel_l2"), d.rel_l2),
                    (format!("defaults.{k}.abs"), d.abs),
                ]
            })
            .chain(t.taps.iter().flat_map(|o| {
                [
                    (format!("taps[{:?}].rel_l2", o.pattern), o.rel_l2),
                    (format!("taps[{:?}].abs", o.pattern), o.abs),
                ]
            }))
            .chain(t.floors.iter().map(|(k, &f)| (format!("floors.{k}"), f)));
        for (field, v) in values {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::input(format!(
                    "{}: {field} is {v}; a tolerance is a finite number >= 0",
                    path.display()
                )));
            }
        }
        let dtypes = ["F64", "F32", "F16", "BF16"];
        if let Some(key) = t
            .defaults
            .keys()
            .chain(t.floors.keys())
            .find(|k| !dtypes.contains(&k.as_str()))
        {
            return Err(Error::input(format!(
                "{}: {key:?} is not a dtype of the defaults or floors (known: {})",
                path.display(),
                dtypes.join(", ")
            )));
        }
        if let Some(o) = t.taps.iter().find(|o| !matches_some_tap(&o.pattern)) {
            return Err(Error::input(format!(
                "{}: tap pattern {:?} matches no tap (canonical ids: embed, blk.L.<tap>, final_norm, logits)",
                path.display(),
                o.pattern
            )));
        }
        // The first match wins: a second entry of a pattern would be ignored unseen.
        if let Some((k, o)) = t
            .taps
            .iter()
            .enumerate()
            .find(|(k, o)| t.taps[..*k].iter().any(|e| e.pattern == o.pattern))
        {
            return Err(Error::input(format!(
                "{}: taps[{k}]: pattern {:?} appears twice (the first would win)",
                path.display(),
                o.pattern
            )));
        }
        Ok(t)
    }

    /// The noise-floor threshold of a tap: [`FLOOR_MARGIN`] × the dtype's floor, never
    /// above the tap's tolerance, with the tolerance's `abs`.
    pub fn floor_for(&self, tap_id: &str, dtype: TapDType) -> Tolerance {
        let tol = self.for_tap(tap_id, dtype);
        Tolerance {
            rel_l2: (self.noise_floor(tap_id, dtype) * FLOOR_MARGIN).min(tol.rel_l2),
            abs: tol.abs,
        }
    }

    /// The expected noise floor (rel L2) of a tap, before the margin: the dtype's floor
    /// from the file or the built-ins, else the tap's tolerance / [`FLOOR_MARGIN`].
    pub fn noise_floor(&self, tap_id: &str, dtype: TapDType) -> f64 {
        self.floors
            .get(dtype.name())
            .copied()
            .or_else(|| default_floors().get(dtype.name()).copied())
            .unwrap_or_else(|| self.for_tap(tap_id, dtype).rel_l2 / FLOOR_MARGIN)
    }

    pub fn for_tap(&self, tap_id: &str, dtype: TapDType) -> Tolerance {
        if let Some(o) = self.taps.iter().find(|o| glob_match(&o.pattern, tap_id)) {
            return Tolerance {
                rel_l2: o.rel_l2,
                abs: o.abs,
            };
        }
        self.defaults
            .get(dtype.name())
            .copied()
            .or_else(|| Tolerances::default().defaults.get(dtype.name()).copied())
            .unwrap_or(Tolerance {
                rel_l2: 1e-3,
                abs: 1e-6,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_dtypes_read_in_the_spellings_engines_write() {
        for (name, dtype) in [
            ("f16", Some(TapDType::F16)),
            ("float16", Some(TapDType::F16)),
            ("torch.float16", Some(TapDType::F16)),
            ("FP16", Some(TapDType::F16)),
            ("half", Some(TapDType::F16)),
            ("bfloat16", Some(TapDType::BF16)),
            ("float", Some(TapDType::F32)),
            ("double", Some(TapDType::F64)),
            ("q4_k_m", None),
        ] {
            assert_eq!(engine_dtype(name), dtype, "{name}");
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match("blk.*.k", "blk.12.k"));
        assert!(!glob_match("blk.*.k", "blk.12.attn_norm"));
        assert!(glob_match("*", "logits"));
        assert!(glob_match("blk.1*.resid_post", "blk.17.resid_post"));
        assert!(!glob_match("blk.1*.resid_post", "blk.2.resid_post"));
        assert!(glob_match("logits", "logits"));
    }
}
