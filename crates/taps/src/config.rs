//! The model's hyper-parameters, as read from GGUF metadata and recorded in a dump's
//! manifest (docs/dump-format.md); every tap width derives from them.

use serde::{Deserialize, Serialize};

/// Model hyper-parameters, as recorded in a dump's manifest (docs/dump-format.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub arch: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub n_ctx: usize,
    pub rope_base: f64,
    pub rms_eps: f64,
}

/// Largest value of any size in a config (layers, widths, vocabulary, context): far
/// beyond real models, small enough that products of two stay within 64 bits.
pub const MAX_DIM: usize = 1 << 24;

impl Config {
    /// Checks that make the derived sizes safe to compute: every size in 1..=MAX_DIM,
    /// heads dividing the width and the KV heads dividing the heads. The message names
    /// the field (as a dump manifest spells it).
    pub fn check(&self) -> Result<(), String> {
        let sizes = [
            ("n_layer", self.n_layer),
            ("n_embd", self.n_embd),
            ("n_head", self.n_head),
            ("n_head_kv", self.n_head_kv),
            ("n_ff", self.n_ff),
            ("n_vocab", self.n_vocab),
            ("n_ctx", self.n_ctx),
        ];
        for (name, v) in sizes {
            if !(1..=MAX_DIM).contains(&v) {
                return Err(format!("model.{name} = {v} is out of range (1..={MAX_DIM})"));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!(
                "model.n_embd {} is not divisible by model.n_head {}",
                self.n_embd, self.n_head
            ));
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            return Err(format!(
                "model.n_head {} is not a multiple of model.n_head_kv {}",
                self.n_head, self.n_head_kv
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Width of the query rows (and of the attention output before its projection).
    pub fn q_width(&self) -> usize {
        self.n_head * self.head_dim()
    }

    /// Width of the key and value rows.
    pub fn kv_width(&self) -> usize {
        self.n_head_kv * self.head_dim()
    }
}
