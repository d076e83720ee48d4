//! The command lines engines print so a person can rerun what they did: the only place
//! outside the CLI that spells resbisect's flags.

use std::path::Path;

use crate::model::Model;
use crate::runtime::weights::WeightMode;
use crate::taps::Selection;

use super::{Profile, RefSpec};

/// How printed commands invoke resbisect: this binary's own path, so that they run as
/// printed whether or not `resbisect` is on PATH (after `cargo run`, for one).
pub fn resbisect_command() -> String {
    match std::env::current_exe() {
        // Linux reads the path from /proc/self/exe, which appends " (deleted)" once the
        // file was replaced (a rebuild during a long bisect): the path is still the one
        // to run.
        Ok(exe) => {
            let path = exe.to_string_lossy();
            shell_quote(path.strip_suffix(" (deleted)").unwrap_or(&path))
        }
        Err(_) => "resbisect".to_string(),
    }
}

/// Quote one word for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./,:=@+".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `--layers` syntax for a selection's layer list.
pub fn layers_arg(layers: &[usize]) -> String {
    if layers.is_empty() {
        "none".into()
    } else {
        layers.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
    }
}

/// ` +inject(spec;spec)` for an engine's label, or nothing without faults.
pub(super) fn injected_label(injections: &[String]) -> String {
    if injections.is_empty() {
        String::new()
    } else {
        format!(" +inject({})", injections.join(";"))
    }
}

/// A `resbisect dump` that writes an engine's dump of a one-prompt suite.
pub(super) struct DumpCommand<'a> {
    pub model: &'a Model,
    pub suite: &'a Path,
    pub selection: &'a Selection,
    pub out: &'a Path,
    pub injections: &'a [String],
}

impl DumpCommand<'_> {
    /// On the reference computing in `spec`'s precision under its profile.
    pub fn reference(&self, spec: RefSpec) -> String {
        let profile = match spec.profile {
            Profile::Exact => String::new(),
            p => format!(" --profile {p}"),
        };
        let twin = if spec.twin { " --twin" } else { "" };
        format!(
            "{} dump --engine reference --dtype {}{profile}{twin} {}",
            resbisect_command(),
            spec.precision.name(),
            self.args()
        )
    }

    /// On the runtime's `backend` storing `dtype`, holding quantized weights as `weights`
    /// says (spelled only when not the default).
    pub fn runtime(&self, backend: &str, dtype: &str, prefill_chunk: Option<usize>, weights: WeightMode) -> String {
        let chunk = prefill_chunk
            .map(|c| format!(" --prefill-chunk {c}"))
            .unwrap_or_default();
        let weights = if weights == WeightMode::default() {
            String::new()
        } else {
            format!(" --weights {}", weights.name())
        };
        format!(
            "{} dump --engine runtime --backend {backend} --dtype {dtype}{chunk}{weights} {}",
            resbisect_command(),
            self.args()
        )
    }

    /// The arguments every engine shares: model, suite, selection, output (replaced when
    /// the commands run again), faults.
    fn args(&self) -> String {
        let injections: String = self
            .injections
            .iter()
            .map(|i| format!(" --inject {}", shell_quote(i)))
            .collect();
        format!(
            "--model {} --prompts {} --layers {} --taps {} --positions {} -o {} --overwrite{injections}",
            shell_quote(&self.model.gguf.path.display().to_string()),
            shell_quote(&self.suite.display().to_string()),
            layers_arg(&self.selection.layers),
            shell_quote(&self.selection.taps.join(",")),
            shell_quote(self.selection.positions.as_str()),
            shell_quote(&self.out.display().to_string())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{layers_arg, shell_quote};

    #[test]
    fn shell_words_survive_quoting() {
        assert_eq!(shell_quote("blk.11.rope:shift=3@827"), "blk.11.rope:shift=3@827");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(layers_arg(&[]), "none");
        assert_eq!(layers_arg(&[0, 4, 8]), "0,4,8");
    }
}
