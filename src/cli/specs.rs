//! From the command line's arguments to the library's types: the engines `dump` and
//! `bisect` run, the reference's precision and profile, and the prompt input.

use resbisect::engine::{EngineKind, EngineSpec, Profile, RefPrecision, RefSpec};
use resbisect::prompts::Input;
use resbisect::runtime::backend::StorageDType;
use resbisect::runtime::weights::WeightMode;
use resbisect::runtime::{BackendKind, RunOptions};
use resbisect::{Error, Result};

use super::args::{BisectArgs, BisectEngine, DumpArgs, DumpEngine, PromptArgs};

impl PromptArgs {
    /// The prompts these flags name: one of --prompt, --tokens or --prompts.
    pub fn input(&self) -> Result<Input> {
        let id = self.id.clone().unwrap_or_else(|| "prompt".into());
        Ok(match (&self.prompt, &self.tokens, &self.prompts) {
            (Some(text), _, _) => Input::Text { id, text: text.clone() },
            (_, Some(list), _) => Input::Tokens { id, list: list.clone() },
            (_, _, Some(path)) => Input::Suite {
                path: path.clone(),
                only: self.id.clone(),
            },
            _ => return Err(Error::input("give one of --prompt, --tokens or --prompts")),
        })
    }
}

impl DumpArgs {
    /// The engine `dump` runs.
    pub fn engine(&self) -> Result<EngineSpec> {
        let kind = match self.engine {
            DumpEngine::Reference => {
                if self.twin && self.profile == Profile::Exact.name() {
                    return Err(Error::input(
                        "--twin needs a rounding --profile (llamacpp-cpu, llamacpp-cuda): the exact reference has no twin",
                    ));
                }
                let spec = RefSpec {
                    precision: named("--dtype", RefPrecision::parse(&self.dtype))?,
                    profile: parse_profile(&self.profile)?,
                    twin: self.twin,
                };
                let runtime_only = self.prefill_chunk.is_some() || self.sync_check || self.weights != "native";
                if self.max_tokens > 0 || self.warmup > 0 || runtime_only || self.backend != BackendKind::Cpu {
                    return Err(Error::input(
                        "--backend, --max-tokens, --prefill-chunk, --sync-check, --warmup and --weights are runtime \
                         options (--engine runtime); the reference computes on the CPU",
                    ));
                }
                EngineKind::Reference(spec)
            }
            DumpEngine::Runtime if self.profile != Profile::Exact.name() || self.twin => {
                return Err(Error::input(
                    "--profile and --twin are reference options (--engine reference)",
                ))
            }
            DumpEngine::Runtime => EngineKind::Runtime {
                backend: self.backend,
                dtype: named("--dtype", StorageDType::parse(&self.dtype))?,
            },
        };
        Ok(EngineSpec {
            kind,
            injections: self.inject.clone(),
            run: RunOptions {
                prefill_chunk: self.prefill_chunk,
                max_tokens: self.max_tokens,
                sync_check: self.sync_check,
                stop_token: None,
                warmup: self.warmup,
                weights: named("--weights", WeightMode::parse(&self.weights))?,
            },
        })
    }
}

impl BisectArgs {
    /// The reference's precision and profile (oracle and local replay).
    pub fn reference_spec(&self) -> Result<RefSpec> {
        Ok(RefSpec {
            precision: named("--reference-dtype", RefPrecision::parse(&self.reference_dtype))?,
            profile: parse_profile(&self.profile)?,
            twin: false,
        })
    }

    /// Options that do not apply to the engines chosen: one line naming the first,
    /// never a silently ignored flag (`--command` without `--engine external` would run the
    /// runtime and call it clean).
    fn check_options_apply(&self) -> Result<()> {
        use BisectEngine::{External, Runtime};
        let a_runtime = matches!(self.engine, Runtime);
        let b_runtime = matches!(self.oracle, Runtime);
        let misplaced = [
            (
                self.command.is_some() && !matches!(self.engine, External),
                "--command",
                "--engine external",
            ),
            (
                self.oracle_command.is_some() && !matches!(self.oracle, External),
                "--oracle-command",
                "--oracle external",
            ),
            (
                !a_runtime && self.backend != BackendKind::Cpu,
                "--backend",
                "--engine runtime",
            ),
            (
                !a_runtime && self.prefill_chunk.is_some(),
                "--prefill-chunk",
                "--engine runtime",
            ),
            (!a_runtime && self.weights != "native", "--weights", "--engine runtime"),
            // An external engine's faults and precision are its own options, in its command.
            (
                matches!(self.engine, External) && !self.inject.is_empty(),
                "--inject",
                "--engine runtime or reference",
            ),
            (
                matches!(self.engine, External) && self.dtype != "f32",
                "--dtype",
                "--engine runtime or reference",
            ),
            (
                self.engine_timeout.is_some() && !matches!(self.engine, External) && !matches!(self.oracle, External),
                "--engine-timeout",
                "--engine external or --oracle external",
            ),
            (
                !b_runtime && self.oracle_backend != BackendKind::Cpu,
                "--oracle-backend",
                "--oracle runtime",
            ),
            (
                !b_runtime && self.oracle_dtype != "f32",
                "--oracle-dtype",
                "--oracle runtime",
            ),
            (
                !b_runtime && self.oracle_weights != "native",
                "--oracle-weights",
                "--oracle runtime",
            ),
            (
                !b_runtime && self.oracle_prefill_chunk.is_some(),
                "--oracle-prefill-chunk",
                "--oracle runtime",
            ),
        ];
        match misplaced.iter().find(|(set, ..)| *set) {
            Some((_, flag, needs)) => Err(Error::input(format!(
                "{flag} applies only with {needs}; drop it or choose that engine"
            ))),
            None => Ok(()),
        }
    }

    /// Engine A (under test) and engine B (the oracle).
    pub fn engines(&self) -> Result<(EngineSpec, EngineSpec)> {
        self.check_options_apply()?;
        let precision = self.reference_spec()?;
        // --dtype keeps its default unless given; a reference A given another dtype than
        // --reference-dtype is a conflict, not a choice between the two.
        let dtype_given = self.dtype != "f32";
        if matches!(self.engine, BisectEngine::Reference)
            && dtype_given
            && named("--dtype", RefPrecision::parse(&self.dtype))? != precision.precision
        {
            return Err(Error::input(format!(
                "with --engine reference, A computes in --reference-dtype ({}); drop --dtype {}",
                self.reference_dtype, self.dtype
            )));
        }
        let a = EngineSpec {
            kind: self.engine.kind(
                self.command.as_deref(),
                self.backend,
                ("--dtype", &self.dtype),
                precision,
                self.engine_timeout,
            )?,
            injections: self.inject.clone(),
            run: RunOptions {
                weights: named("--weights", WeightMode::parse(&self.weights))?,
                prefill_chunk: self.prefill_chunk,
                ..RunOptions::default()
            },
        };
        let b = EngineSpec {
            kind: self.oracle.kind(
                self.oracle_command.as_deref(),
                self.oracle_backend,
                ("--oracle-dtype", &self.oracle_dtype),
                precision,
                self.engine_timeout,
            )?,
            injections: Vec::new(),
            run: RunOptions {
                weights: named("--oracle-weights", WeightMode::parse(&self.oracle_weights))?,
                prefill_chunk: self.oracle_prefill_chunk,
                ..RunOptions::default()
            },
        };
        Ok((a, b))
    }
}

impl BisectEngine {
    /// The library's engine kind; flags of other kinds are ignored.
    fn kind(
        self,
        command: Option<&str>,
        backend: BackendKind,
        (dtype_flag, dtype): (&str, &str),
        precision: RefSpec,
        timeout: Option<std::time::Duration>,
    ) -> Result<EngineKind> {
        Ok(match self {
            BisectEngine::Runtime => EngineKind::Runtime {
                backend,
                dtype: named(dtype_flag, StorageDType::parse(dtype))?,
            },
            BisectEngine::Reference => EngineKind::Reference(precision),
            BisectEngine::External => EngineKind::External {
                command: command
                    .ok_or_else(|| {
                        Error::input(
                            "an external engine needs its command template (--command for A, --oracle-command for B)",
                        )
                    })?
                    .to_string(),
                timeout,
            },
        })
    }
}

/// `--profile NAME`, or one line naming the option and the known profiles.
fn parse_profile(name: &str) -> Result<Profile> {
    Profile::parse(name).map_err(|e| Error::input(format!("--profile: {e}")))
}

/// A parsed option value, its error prefixed with the flag it came from: `--dtype` and
/// `--oracle-dtype` share one parser, and the user must know which one to fix.
pub(super) fn named<T>(flag: &str, parsed: Result<T>) -> Result<T> {
    parsed.map_err(|e| match e {
        Error::Input(msg) => Error::input(format!("{flag}: {msg}")),
        other => other,
    })
}
