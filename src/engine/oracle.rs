//! The oracle: the reference crate with a model's weights loaded, computing in f32 or
//! f64 on the CPU. Whole for reference engines, or only the layers local replay needs.

use candle_core::DType;
use resbisect_reference::{Profile, RawWeight, Reference, WeightSource};

use crate::error::{Error, Result};
use crate::model::Model;

/// Precision the reference computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefPrecision {
    F32,
    F64,
}

impl RefPrecision {
    /// Bytes per value.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F64 => 8,
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f64" => Ok(Self::F64),
            other => Err(Error::input(format!(
                "the reference computes in f32 or f64, not {other:?}"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F64 => "f64",
        }
    }

    fn candle(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F64 => DType::F64,
        }
    }
}

/// What the reference computes: its precision and the engine numerics it imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefSpec {
    pub precision: RefPrecision,
    pub profile: Profile,
    /// The profile's twin: projections and attention in f64 (`Reference::into_twin`);
    /// bisect measures a profile's noise floor against it.
    pub twin: bool,
}

impl From<RefPrecision> for RefSpec {
    /// The exact reference in `precision`.
    fn from(precision: RefPrecision) -> Self {
        Self {
            precision,
            profile: Profile::Exact,
            twin: false,
        }
    }
}

impl RefSpec {
    /// `f32`, or `f32, profile llamacpp-cpu` when a profile is on, `…, twin` for the
    /// twin: for labels and reports.
    pub fn label(self) -> String {
        let profile = match self.profile {
            Profile::Exact => String::new(),
            p => format!(", profile {p}"),
        };
        let twin = if self.twin { ", twin (f64 dot products)" } else { "" };
        format!("{}{profile}{twin}", self.precision.name())
    }

    /// The twin of this oracle when its profile rounds (any but exact): what bisect
    /// measures the profile's noise floor with.
    pub fn twin(self) -> Option<RefSpec> {
        (self.profile != Profile::Exact && !self.twin).then_some(RefSpec { twin: true, ..self })
    }
}

impl WeightSource for Model {
    fn weight(&self, name: &str) -> anyhow::Result<RawWeight<'_>> {
        let info = Model::weight(self, name)?;
        Ok(RawWeight {
            dtype: info.dtype,
            dims: info.dims.iter().map(|&d| d as usize).collect(),
            data: self.weight_data(info),
        })
    }
}

/// Reference weights loaded once, reusable across prompts and engines.
pub struct Oracle {
    pub(super) inner: Reference,
    spec: RefSpec,
}

impl Oracle {
    pub fn load(model: &Model, spec: impl Into<RefSpec>, on_layer: &mut dyn FnMut(usize)) -> Result<Self> {
        let spec = spec.into();
        let inner = Reference::load(
            model.config.clone(),
            model,
            spec.precision.candle(),
            spec.profile,
            on_layer,
        )
        .and_then(|r| if spec.twin { r.into_twin() } else { Ok(r) })
        .map_err(|e| Error::engine(format!("reference: loading weights: {e:#}")))?;
        Ok(Self { inner, spec })
    }

    /// Only `layers`, for local replay ([`replay_layer`](Self::replay_layer)).
    pub fn load_for_replay(model: &Model, spec: impl Into<RefSpec>, layers: &[usize]) -> Result<Self> {
        let spec = spec.into();
        let inner = Reference::load_for_replay(
            model.config.clone(),
            model,
            spec.precision.candle(),
            spec.profile,
            layers,
        )
        .map_err(|e| Error::engine(format!("reference: loading layers {layers:?} for replay: {e:#}")))?;
        Ok(Self { inner, spec })
    }

    pub fn precision(&self) -> RefPrecision {
        self.spec.precision
    }

    /// Precision and numerics profile.
    pub fn spec(&self) -> RefSpec {
        self.spec
    }

    /// Local replay: layer `l` recomputed from `rows` rows of residual-stream input
    /// (positions `0..rows`) at positions `at` (ascending); every tap of the layer as f32
    /// rows of those positions, in order.
    pub fn replay_layer(&self, l: usize, input: &[f32], rows: usize, at: &[usize]) -> Result<Vec<(String, Vec<f32>)>> {
        let fail = |e: anyhow::Error| Error::engine(format!("reference: replaying layer {l}: {e:#}"));
        self.inner
            .replay_layer(l, input, rows, at)
            .map_err(fail)?
            .into_iter()
            .map(|(id, t)| {
                Ok((
                    id.id(),
                    t.flatten_all()
                        .and_then(|t| t.to_vec1::<f32>())
                        .map_err(|e| fail(e.into()))?,
                ))
            })
            .collect()
    }
}
