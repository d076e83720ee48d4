//! `resbisect cut`: a real model's first layers as a model of its own — the embedding, the
//! first N blocks, the output norm and head, every metadata key with the block count
//! rewritten, quantized blocks copied as they are. Real weights small enough to travel
//! where the whole file cannot (a GPU machine that takes 64 MiB per call); by causality
//! across layers, its layers compute exactly what the full model's first N compute.

use std::path::Path;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, gguf_file};
use candle_core::Device;

use crate::error::{Error, Result};
use crate::model::Model;

/// Layer index of a `blk.N.…` tensor name.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// Write the first `layers` layers of the model at `input` to `output` (a new file).
pub fn cut(input: &Path, layers: usize, output: &Path) -> Result<()> {
    let model = Model::open(input)?;
    let n_layer = model.config.n_layer;
    if layers == 0 || layers > n_layer {
        return Err(Error::input(format!(
            "--layers {layers}: the model has {n_layer} layers; keep 1 to {n_layer}"
        )));
    }
    if output.exists() {
        return Err(Error::input(format!(
            "--output {}: exists; cut writes a new file",
            output.display()
        )));
    }
    // The metadata as candle reads it (the file is already validated by Model::open).
    let mut file = std::fs::File::open(input).map_err(|e| Error::io(input, e))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| Error::input(format!("{}: {e}", input.display())))?;
    let count_key = format!("{}.block_count", model.config.arch);
    let mut meta: Vec<(String, gguf_file::Value)> =
        content.metadata.into_iter().filter(|(k, _)| *k != count_key).collect();
    meta.push((count_key, gguf_file::Value::U32(layers as u32)));
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let mut tensors = Vec::new();
    for info in model
        .gguf
        .tensors
        .iter()
        .filter(|t| layer_of(&t.name).is_none_or(|l| l < layers))
    {
        let shape: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
        let q = qtensor_from_ggml(info.dtype, model.weight_data(info), shape, &Device::Cpu)
            .map_err(|e| Error::input(format!("{}: tensor {}: {e}", input.display(), info.name)))?;
        tensors.push((info.name.clone(), q));
    }
    crate::synth::write_gguf(output, &meta, &tensors)?;
    // What was written must open as a model of `layers` layers.
    let cut = Model::open(output)?;
    if cut.config.n_layer != layers {
        return Err(Error::engine(format!(
            "{}: reads back with {} layers, not {layers}",
            output.display(),
            cut.config.n_layer
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::layer_of;

    #[test]
    fn layers_come_from_block_names_only() {
        assert_eq!(layer_of("blk.12.attn_q.weight"), Some(12));
        assert_eq!(layer_of("token_embd.weight"), None);
        assert_eq!(layer_of("output_norm.weight"), None);
        assert_eq!(layer_of("blk.x.attn_q.weight"), None);
    }
}
