#!/usr/bin/env python3
"""Writes the expected token ids that resbisect's tokenizer must reproduce, from HF
tokenizers built for the same GGUF files:

- SmolLM2 (gpt2 BPE, `smollm` pre-tokenizer): HF `tokenizers` assembled as the model's
  published tokenizer.json is (individual digits, then byte-level GPT-2 split), with
  the vocabulary, merges and control tokens read from the GGUF.
- A synthetic SentencePiece model (`resbisect synth --preset tiny --tokenizer llama`):
  transformers' own GGUF tokenizer loader (`AutoTokenizer.from_pretrained(gguf_file=)`).
- Gemma 3 270M (SentencePiece-style vocabulary in the GGUF, byte fallback, no space
  prefix, user-defined pieces for whitespace runs and HTML tags): transformers' GGUF
  tokenizer loader (its GemmaTokenizer converter), on texts.json plus Gemma-specific
  texts (chat-turn markers, whitespace runs, HTML, rare code points). The `sentencepiece`
  library itself is not the reference: given the same pieces it matches user-defined
  pieces only after escaping spaces and never matches control pieces in text, so it
  splits "  " and "<start_of_turn>" where HF and llama.cpp emit one token.

  scripts/tokenizer_fixture.py [--resbisect target/release/resbisect]
"""
import argparse
import json
import pathlib
import subprocess
import tempfile

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEXTS = json.loads((ROOT / "fixtures/tokenizer/texts.json").read_text())


def field(reader, key):
    return reader.fields[key].contents()


def smollm2_tokenizer(path):
    r = gguf.GGUFReader(path)
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(r, "tokenizer.ggml.merges")]
    assert field(r, "tokenizer.ggml.pre") == "smollm"
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == 3])
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--resbisect", default=str(ROOT / "target/release/resbisect"))
    ap.add_argument("--model", default=str(ROOT / "fixtures/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    args = ap.parse_args()

    encode = smollm2_tokenizer(args.model)
    out = {"model": "SmolLM2-135M-Instruct.Q4_1.gguf", "reference": "HF tokenizers, SmolLM2 tokenizer.json layout",
           "cases": [{"text": t, "ids": encode(t)} for t in TEXTS]}
    (ROOT / "fixtures/tokenizer/smollm2_expected.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")

    import transformers
    from transformers import AutoTokenizer
    with tempfile.TemporaryDirectory() as tmp:
        model = pathlib.Path(tmp) / "spm.gguf"
        subprocess.run([args.resbisect, "synth", "--preset", "tiny", "--tokenizer", "llama", "--quant", "f32", "--seed", "7", "-o", str(model)], check=True)
        hf = AutoTokenizer.from_pretrained(tmp, gguf_file=model.name)
        cases = [{"text": t, "ids": hf(t, add_special_tokens=True)["input_ids"]} for t in TEXTS]
    out = {"model": "resbisect synth --preset tiny --tokenizer llama --quant f32 --seed 7",
           "reference": "transformers AutoTokenizer GGUF loader", "cases": cases}
    (ROOT / "fixtures/tokenizer/synth_spm_expected.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    gemma = ROOT / "fixtures/models/gemma-3-270m-q4_k_m.gguf"
    hf = AutoTokenizer.from_pretrained(str(gemma.parent), gguf_file=gemma.name)
    texts = TEXTS + json.loads((ROOT / "fixtures/tokenizer/texts_gemma.json").read_text())
    out = {"model": gemma.name, "reference": f"transformers {transformers.__version__} AutoTokenizer GGUF loader",
           "cases": [{"text": t, "ids": hf(t, add_special_tokens=True)["input_ids"]} for t in texts]}
    (ROOT / "fixtures/tokenizer/gemma3_expected.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print("wrote fixtures/tokenizer/smollm2_expected.json, synth_spm_expected.json and gemma3_expected.json")


if __name__ == "__main__":
    main()
