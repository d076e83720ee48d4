//! `resbisect inspect`: a model's header and tensors, or a dump's manifest and files.

use std::path::Path;

use resbisect::dump::Dump;
use resbisect::model::Model;
use resbisect::taps::{FileStem, Tap};
use resbisect::tokenizer::Tokenizer;
use resbisect::{gguf, Result};

use super::args::{InspectArgs, ModelInfoArgs};

pub fn inspect(a: InspectArgs) -> Result<()> {
    if a.path.is_dir() {
        inspect_dump(&a.path)
    } else {
        inspect_model(&a.path, a.tensors)
    }
}

/// `resbisect model-info`: the {model_info} JSON an external engine receives, one line.
pub fn model_info(a: ModelInfoArgs) -> Result<()> {
    if let Some(out) = &a.out {
        super::commands::refuse_writing_over_inputs(out, "--out", &[&a.model])?;
        resbisect::output::check_replaceable_file(out, "--out", "a model-info file", |p| {
            std::fs::read(p).is_ok_and(|b| serde_json::from_slice::<resbisect::dump::ModelInfo>(&b).is_ok())
        })?;
    }
    let model = Model::open(&a.model)?;
    let text = resbisect::engine::model_info_json(&model)? + "\n";
    match &a.out {
        Some(path) => resbisect::output::write_file(path, text.as_bytes()),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

fn inspect_model(path: &Path, tensors: bool) -> Result<()> {
    let model = Model::open(path)?;
    let c = &model.config;
    println!("model        {}", path.display());
    println!("fingerprint  {}", model.fingerprint);
    println!(
        "gguf         v{}, {} tensors, {} metadata keys, {} bytes",
        model.gguf.version,
        model.gguf.tensors.len(),
        model.gguf.metadata.len(),
        model.gguf.file_len()
    );
    println!("arch         {} ({} parameters)", c.arch, model.n_params());
    println!("layers       {}", c.n_layer);
    println!(
        "n_embd       {}  heads {} (kv {}, head dim {})",
        c.n_embd,
        c.n_head,
        c.n_head_kv,
        c.head_dim()
    );
    println!("n_ff         {}", c.n_ff);
    println!("vocab        {}  context {}", c.n_vocab, c.n_ctx);
    // The GGUF stores both as f32: printed as f32, 1e-5 reads as 1e-5.
    println!("rope base    {}  rms eps {:e}", c.rope_base as f32, c.rms_eps as f32);
    println!(
        "output       {}",
        if model.tied_output {
            "tied to token_embd"
        } else {
            "output.weight"
        }
    );
    match Tokenizer::from_gguf(&model.gguf) {
        Ok(t) => {
            let id = |t: Option<u32>| t.map_or_else(|| "none".to_string(), |t| t.to_string());
            println!(
                "tokenizer    {} (pre {}), {} tokens, bos {} eos {}, add_bos {}",
                t.kind,
                t.pre,
                t.vocab_size,
                id(t.bos_id),
                id(t.eos_id),
                t.add_bos
            )
        }
        Err(e) => println!("tokenizer    unusable: {e}"),
    }
    let mut counts = std::collections::BTreeMap::new();
    for t in &model.gguf.tensors {
        *counts.entry(gguf::dtype_name(t.dtype)).or_insert(0) += 1;
    }
    println!(
        "types        {}",
        counts
            .iter()
            .map(|(k, v)| format!("{k}×{v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    if tensors {
        for t in &model.gguf.tensors {
            println!("  {:<32} {:<6} {:?}", t.name, gguf::dtype_name(t.dtype), t.dims);
        }
    }
    Ok(())
}

fn inspect_dump(path: &Path) -> Result<()> {
    let dump = Dump::open(path)?;
    let m = &dump.manifest;
    println!("dump         {} (format {} v{})", path.display(), m.format, m.version);
    println!(
        "status       {:?}{}",
        m.status,
        m.error.as_ref().map(|e| format!(": {}", e.message)).unwrap_or_default()
    );
    println!("engine       {} on {}", m.engine.describe(), m.engine.device);
    println!(
        "model        {} ({})",
        m.model.path,
        m.model.fingerprint.as_deref().unwrap_or("no fingerprint")
    );
    println!(
        "selection    layers {:?} taps {} positions {}",
        m.selection.layers,
        m.selection.taps.join(","),
        m.selection.positions
    );
    println!("created      {}", m.created);
    for p in &m.prompts {
        println!("prompt {} ({} tokens)", p.id, p.tokens.len());
        let mut stems = dump.files(&p.id)?;
        stems.sort_by_key(|s| FileStem::parse(s));
        for stem in stems {
            let Some(file) = dump.map_file(&p.id, &stem)? else {
                continue;
            };
            let mut taps: Vec<(&String, _)> = file.taps.iter().collect();
            taps.sort_by_key(|(id, _)| Tap::parse(id));
            for (id, slice) in taps {
                println!(
                    "  {:<24} {:<5} [{}, {}]",
                    id,
                    slice.dtype.name(),
                    file.positions.len(),
                    slice.width
                );
            }
        }
    }
    Ok(())
}
