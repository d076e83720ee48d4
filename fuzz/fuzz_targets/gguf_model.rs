//! A GGUF file from anywhere: container parse, llama config and tensor checks, tensor
//! data slices, the tokenizer built from its metadata and a short round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use resbisect::gguf::GgufFile;
use resbisect::model::Model;
use resbisect::tokenizer::Tokenizer;

fuzz_target!(|data: &[u8]| {
    let path = resbisect_fuzz::scratch().join("model.gguf");
    std::fs::write(&path, data).expect("scratch write");
    if let Ok(model) = Model::open(&path) {
        let _ = model.n_params();
        let _ = model.config.head_dim();
        for name in ["output.weight", "token_embd.weight", "blk.0.attn_q.weight"] {
            if let Ok(info) = model.weight(name) {
                assert_eq!(model.weight_data(info).len(), info.len);
            }
        }
    }
    let Ok(gguf) = GgufFile::open(&path) else { return };
    for t in &gguf.tensors {
        assert_eq!(gguf.tensor_data(t).len(), t.len);
    }
    for key in &gguf.metadata_order {
        let _ = gguf.get(key).map(|v| v.summary());
    }
    if let Ok(tok) = Tokenizer::from_gguf(&gguf) {
        if let Ok(ids) = tok.encode("Hello world, the layer 42 attention\n<s> ▁x é") {
            assert!(ids
                .iter()
                .all(|&id| (id as usize) < tok.vocab_size || tok.vocab_size == 0));
            let _ = tok.decode(&ids);
        }
    }
});
