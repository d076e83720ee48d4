//! Fault injection specs, one syntax for every engine:
//! `TAP:KIND[=VALUE]@FROM` — `blk.5.attn_out:scale=1.5@826`, `blk.3.q:nan@100`,
//! `embed:offset=0.25@0`, `blk.2.ffn_act:zero@7` — perturbs the tap's rows at positions
//! ≥ FROM; `rope:shift=N@FROM` (every layer) or `blk.L.rope:shift=N@FROM` rotates
//! queries and keys at positions ≥ FROM as if they sat N positions later;
//! `TAP:oob@FROM` (runtime only) makes the op at that tap fail with a real
//! out-of-bounds request once the run reaches FROM, to exercise the crash path.
//! Numerics bugs of a whole model: `[blk.L.]rope:scale=F@FROM` scales every RoPE
//! frequency by F; `[blk.L.]rope:bf16@FROM` (reference only) forms RoPE angles in bf16;
//! `norm:eps=E@FROM` (reference only) computes every RMSNorm with epsilon E.
//! A sliding-window fault (runtime only): `[blk.L.]window:shift=N@0` makes windowed
//! layers attend over `window + N` positions, `[blk.L.]window:global@0` over all of them.
//! A block-layout fault: `QUANT:swap_nibbles@0` (runtime only; QUANT one of q4_0, q4_1,
//! q4_k, q5_k, q6_k) reads every weight block of that GGUF type with its nibbles swapped.

use resbisect_taps::{
    BlockFault, Config, Fault, Faults, NormFault, RopeCorruption, RopeFault, TapFault, WindowCorruption, WindowFault,
};

use crate::error::{Error, Result};
use crate::taps::canonical_tap_id;

fn bad(spec: &str, why: &str) -> Error {
    Error::input(format!("bad --inject {spec:?}: {why} (syntax TAP:KIND[=VALUE]@POS, KIND one of scale, offset, nan, zero, oob; or [blk.L.]rope:shift=N|scale=F|bf16@POS; or [blk.L.]window:shift=N|global@0; or norm:eps=E@POS; or QUANT:swap_nibbles@0)"))
}

/// Refuse specs whose position no processed row reaches (`n_positions` rows: the
/// longest prompt plus generated tokens): such a fault would silently never fire.
pub fn check_reach(specs: &[String], n_positions: usize) -> Result<()> {
    for spec in specs {
        let from = spec.rsplit_once('@').and_then(|(_, p)| p.parse::<usize>().ok());
        if let Some(from) = from.filter(|&f| f >= n_positions) {
            return Err(Error::input(format!(
                "--inject {spec:?} starts at position {from}, but the prompt has {n_positions} positions (0..{n_positions}): it would never fire"
            )));
        }
    }
    Ok(())
}

/// Faults as the runtime applies them: the reference's, plus failing ops.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuntimeFaults {
    pub taps: Vec<TapFault>,
    pub rope: Vec<RopeFault>,
    /// The reference's whole-model numerics faults, which the runtime refuses.
    pub norm: Option<NormFault>,
    /// (tap id, position): the op at this tap fails once the run reaches the position.
    pub crash: Vec<(String, usize)>,
    /// Quant types whose weight blocks are read with a wrong layout.
    pub blocks: Vec<BlockFault>,
    /// Windowed layers attending over a wrong window.
    pub window: Vec<WindowFault>,
}

enum Parsed {
    Tap(TapFault),
    Rope(RopeFault),
    Norm(NormFault),
    Crash(String, usize),
    Block(BlockFault),
    Window(WindowFault),
}

/// Parse one `--inject` spec.
fn parse_one(spec: &str, n_layer: usize) -> Result<Parsed> {
    let (target, rest) = spec.split_once(':').ok_or_else(|| bad(spec, "missing ':'"))?;
    let (kind, from) = rest.rsplit_once('@').ok_or_else(|| bad(spec, "missing '@POS'"))?;
    let from: usize = from
        .parse()
        .map_err(|_| bad(spec, "POS is not a non-negative integer"))?;
    let (kind, value) = match kind.split_once('=') {
        Some((k, v)) => (
            k,
            Some(
                v.parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| bad(spec, "VALUE is not a finite number"))?,
            ),
        ),
        None => (kind, None),
    };
    if let Some(layer) = layer_target(spec, target, "rope")? {
        if let Some(l) = layer.filter(|&l| l >= n_layer) {
            return Err(bad(spec, &format!("layer {l} does not exist (model has {n_layer})")));
        }
        let corruption = match (kind, value) {
            ("shift", Some(v)) if v.fract() == 0.0 && v != 0.0 => RopeCorruption::Shift(v as i64),
            ("scale", Some(v)) if v > 0.0 && v != 1.0 => RopeCorruption::Scale(v),
            ("bf16", None) => RopeCorruption::Bf16Angles,
            _ => {
                return Err(bad(
                    spec,
                    "RoPE corruption takes shift=N (a non-zero integer), scale=F (positive, not 1) or bf16",
                ))
            }
        };
        return Ok(Parsed::Rope(RopeFault {
            layer,
            corruption,
            from,
        }));
    }
    if let Some(layer) = layer_target(spec, target, "window")? {
        return parse_window(spec, layer, kind, value, from, n_layer);
    }
    if let Some(ty) = crate::quant::QuantType::parse(target) {
        return match (kind, value, from) {
            ("swap_nibbles", None, 0) if ty.nibble_bytes().is_some() => Ok(Parsed::Block(BlockFault {
                quant_type: ty.name().to_string(),
            })),
            ("swap_nibbles", None, 0) => Err(bad(spec, &format!("{} has no nibbles to swap", ty.name()))),
            _ => Err(bad(
                spec,
                "a quant type takes swap_nibbles@0 (weights have no positions)",
            )),
        };
    }
    if target == "norm" {
        return match (kind, value) {
            ("eps", Some(eps)) if eps >= 0.0 => Ok(Parsed::Norm(NormFault { eps, from })),
            _ => Err(bad(spec, "norm takes eps=E with E a non-negative number")),
        };
    }
    let tap_id = canonical_tap_id(target, n_layer).map_err(|e| bad(spec, &e.to_string()))?;
    let fault = match (kind, value) {
        ("scale", Some(v)) => Fault::Scale(v),
        ("offset", Some(v)) => Fault::Offset(v),
        ("nan", None) => Fault::Nan,
        ("zero", None) => Fault::Zero,
        ("oob", None) => return Ok(Parsed::Crash(tap_id, from)),
        ("scale" | "offset", None) => return Err(bad(spec, "needs =VALUE")),
        ("nan" | "zero" | "oob", Some(_)) => return Err(bad(spec, "takes no value")),
        _ => return Err(bad(spec, &format!("unknown kind {kind:?}"))),
    };
    Ok(Parsed::Tap(TapFault { tap_id, fault, from }))
}

/// `NAME` → Some(None) (every layer), `blk.L.NAME` → Some(Some(L)), anything else None.
fn layer_target(spec: &str, target: &str, name: &str) -> Result<Option<Option<usize>>> {
    if target == name {
        return Ok(Some(None));
    }
    target
        .strip_prefix("blk.")
        .and_then(|r| r.strip_suffix(&format!(".{name}")))
        .map(|l| l.parse::<usize>().map(Some))
        .transpose()
        .map_err(|_| bad(spec, &format!("bad layer in blk.L.{name}")))
}

/// `[blk.L.]window:shift=N|global@0`.
fn parse_window(
    spec: &str,
    layer: Option<usize>,
    kind: &str,
    value: Option<f64>,
    from: usize,
    n_layer: usize,
) -> Result<Parsed> {
    if let Some(l) = layer.filter(|&l| l >= n_layer) {
        return Err(bad(spec, &format!("layer {l} does not exist (model has {n_layer})")));
    }
    if from != 0 {
        return Err(bad(
            spec,
            "a window fault takes @0: the window belongs to the layer, its first effect shows at the window's edge",
        ));
    }
    let corruption = match (kind, value) {
        ("shift", Some(v)) if v.fract() == 0.0 && v != 0.0 => WindowCorruption::Shift(v as i64),
        ("global", None) => WindowCorruption::Global,
        _ => return Err(bad(spec, "a window fault takes shift=N (a non-zero integer) or global")),
    };
    Ok(Parsed::Window(WindowFault { layer, corruption }))
}

/// Faults for the reference, which computes but never fails on request.
pub fn parse_all(specs: &[String], n_layer: usize) -> Result<Faults> {
    let f = parse_any(specs, n_layer)?;
    if let Some(b) = f.blocks.first() {
        return Err(Error::input(format!(
            "--inject {}:swap_nibbles is for the runtime; the reference decodes blocks with candle",
            b.quant_type
        )));
    }
    if let Some((tap, _)) = f.crash.first() {
        return Err(Error::input(format!(
            "--inject {tap}:oob is for the runtime; the reference does not fail on request"
        )));
    }
    if !f.window.is_empty() {
        return Err(Error::input(
            "--inject window:… is for the runtime (the engine under test); the reference keeps the model's window",
        ));
    }
    Ok(Faults {
        taps: f.taps,
        rope: f.rope,
        norm: f.norm,
    })
}

/// Every fault of `specs`, for any engine; [`parse_runtime`] and [`parse_all`] refuse what
/// their engine cannot do.
fn parse_any(specs: &[String], n_layer: usize) -> Result<RuntimeFaults> {
    let mut faults = RuntimeFaults::default();
    for s in specs {
        match parse_one(s, n_layer)? {
            Parsed::Tap(t) => faults.taps.push(t),
            Parsed::Rope(r) => faults.rope.push(r),
            Parsed::Norm(n) if faults.norm.is_none() => faults.norm = Some(n),
            Parsed::Norm(_) => return Err(bad(s, "only one norm fault may be injected")),
            Parsed::Crash(tap, from) => faults.crash.push((tap, from)),
            Parsed::Block(b) => faults.blocks.push(b),
            Parsed::Window(w) => faults.window.push(w),
        }
    }
    Ok(faults)
}

/// Refuse window faults aimed at layers without a sliding window: they would never fire.
pub fn check_windows(faults: &RuntimeFaults, cfg: &Config) -> Result<()> {
    for f in &faults.window {
        let windowed = |l: usize| cfg.window_of(l).is_some();
        let fires = match f.layer {
            Some(l) => windowed(l),
            None => (0..cfg.n_layer).any(windowed),
        };
        if !fires {
            let what = f
                .layer
                .map_or("the model has no layer".into(), |l| format!("layer {l} has no"));
            return Err(Error::input(format!(
                "--inject window:…: {what} sliding window; the fault would never fire"
            )));
        }
    }
    Ok(())
}

/// Refuse a block-layout fault into a GGUF type that no weight of the model has: it would
/// never fire, and a bisect would pass without testing anything.
pub fn check_blocks(faults: &RuntimeFaults, model: &crate::model::Model) -> Result<()> {
    for f in &faults.blocks {
        let present = model
            .gguf
            .tensors
            .iter()
            .any(|t| crate::quant::QuantType::of(t.dtype).is_some_and(|q| q.name() == f.quant_type));
        if !present {
            return Err(Error::input(format!(
                "--inject {}:swap_nibbles@0: the model has no {} weights; the fault would never fire",
                f.quant_type,
                f.quant_type.to_uppercase()
            )));
        }
    }
    Ok(())
}

/// Faults as the runtime applies them: its kernels form RoPE angles from positions, so
/// position corruptions work and bf16 angles do not; RMSNorm epsilon is not injectable.
pub fn parse_runtime(specs: &[String], n_layer: usize) -> Result<RuntimeFaults> {
    let faults = parse_any(specs, n_layer)?;
    if faults.norm.is_some() || faults.rope.iter().any(|r| r.corruption == RopeCorruption::Bf16Angles) {
        return Err(Error::input("--inject norm:eps and rope:bf16 are for the reference engine (--engine reference); the runtime does not support them"));
    }
    Ok(faults)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        let f = parse_all(
            &[
                "blk.5.attn_out:scale=1.5@826".into(),
                "l_out-3:nan@7".into(),
                "rope:shift=3@100".into(),
                "blk.2.rope:shift=-1@0".into(),
                "embed:zero@0".into(),
            ],
            30,
        )
        .unwrap();
        assert_eq!(
            f.taps[0],
            TapFault {
                tap_id: "blk.5.attn_out".into(),
                fault: Fault::Scale(1.5),
                from: 826
            }
        );
        assert_eq!(f.taps[1].tap_id, "blk.3.resid_post");
        assert_eq!(
            f.rope,
            vec![
                RopeFault {
                    layer: None,
                    corruption: RopeCorruption::Shift(3),
                    from: 100
                },
                RopeFault {
                    layer: Some(2),
                    corruption: RopeCorruption::Shift(-1),
                    from: 0
                }
            ]
        );
        let f = parse_all(
            &[
                "rope:scale=1.01@0".into(),
                "blk.1.rope:bf16@0".into(),
                "norm:eps=1e-6@0".into(),
            ],
            30,
        )
        .unwrap();
        assert_eq!(f.rope[0].corruption, RopeCorruption::Scale(1.01));
        assert_eq!(
            f.rope[1],
            RopeFault {
                layer: Some(1),
                corruption: RopeCorruption::Bf16Angles,
                from: 0
            }
        );
        assert_eq!(f.norm, Some(NormFault { eps: 1e-6, from: 0 }));
        assert!(parse_runtime(&["norm:eps=1e-6@0".into()], 30).is_err());
        assert!(parse_runtime(&["rope:bf16@0".into()], 30).is_err());
        assert!(parse_runtime(&["rope:scale=1.01@0".into()], 30).is_ok());
        for bad in [
            "blk.5.attn_out:scale@1",
            "blk.5.attn_out:nan=1@1",
            "blk.5.attn_out:scale=2",
            "blk.40.q:nan@1",
            "rope:shift=0.5@1",
            "blk.2.rope:melt=2@1",
            "rope:scale=1@1",
            "norm:eps=-1@0",
            "norm:scale=2@0",
            "x:nan@1",
            "blk.1.q:melt@1",
            "blk.1.q:scale=inf@1",
            "blk.3.window:global@0",
        ] {
            assert!(parse_all(&[bad.into()], 30).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_window_faults_for_the_runtime_only() {
        let f = parse_runtime(&["blk.3.window:shift=1@0".into(), "window:global@0".into()], 18).unwrap();
        let shift = WindowFault {
            layer: Some(3),
            corruption: WindowCorruption::Shift(1),
        };
        assert_eq!(f.window[0], shift);
        assert_eq!(f.window[1].corruption, WindowCorruption::Global);
        for bad in [
            "blk.3.window:shift=1@5",
            "blk.3.window:shift=0@0",
            "blk.3.window:shift=0.5@0",
            "blk.18.window:global@0",
            "blk.3.window:global=1@0",
        ] {
            assert!(parse_runtime(&[bad.into()], 18).is_err(), "{bad}");
        }
        // Only the layer named: layer 3 widened, layer 4 and a global layer untouched.
        assert_eq!(WindowFault::window_of(&f.window[..1], 3, Some(512)), Some(513));
        assert_eq!(WindowFault::window_of(&f.window[..1], 4, Some(512)), Some(512));
        assert_eq!(WindowFault::window_of(&f.window, 5, None), None);
        assert_eq!(WindowFault::window_of(&f.window[1..], 4, Some(512)), None);
    }
}
