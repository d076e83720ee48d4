#!/usr/bin/env python3
"""Writes the prompt suites in fixtures/prompts/ from corpus.txt (the project's own
prose), cut to exact token counts with the fixture model's tokenizer via resbisect.

Usage: scripts/make_prompts.py [--resbisect target/release/resbisect] [--model M]
"""
import argparse
import json
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--resbisect", default=str(ROOT / "target/release/resbisect"))
    ap.add_argument("--model", default=str(ROOT / "fixtures/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    args = ap.parse_args()

    def tokenize(text):
        out = subprocess.run([args.resbisect, "tokenize", "--json", "--model", args.model, text], check=True, capture_output=True, text=True)
        return json.loads(out.stdout)

    def decode(ids):
        out = subprocess.run([args.resbisect, "tokenize", "--decode", "--model", args.model, ",".join(map(str, ids))], check=True, capture_output=True, text=True)
        return out.stdout

    corpus = (ROOT / "fixtures/prompts/corpus.txt").read_text()
    corpus_ids = tokenize(corpus)
    # The 4096-token prompt reads the story twice: long, natural, and still causal text.
    twice_ids = tokenize(corpus + "\n\n" + corpus)

    def cut(pid, ids, n, note):
        assert len(ids) >= n, f"{pid}: corpus has only {len(ids)} tokens"
        return {"id": pid, "text": decode(ids[:n]), "tokens": ids[:n], "note": note}

    short = [
        {"id": "p0_short", "text": "The capital of France is", "note": "a short factual prompt"},
        cut("p6_len_16", corpus_ids, 16, "exactly 16 tokens"),
        cut("p6_len_32", corpus_ids, 32, "exactly 32 tokens"),
        cut("p6_len_128", corpus_ids, 128, "exactly 128 tokens"),
        {"id": "chat_turn", "text": "<|im_start|>user\nWhich clock drifted first, and by how much?<|im_end|>\n<|im_start|>assistant\n", "note": "chat template with special tokens"},
    ]
    long = [
        cut("long_826", corpus_ids, 826, "the first long-context collapse length"),
        cut("long_1652", corpus_ids, 1652, "the second long-context collapse length"),
        cut("long_2048", corpus_ids, 2048, "TinyLlama's full context"),
        cut("long_4096", twice_ids, 4096, "the story twice"),
    ]
    for name, suite in [("bisect.jsonl", short), ("long.jsonl", long)]:
        with open(ROOT / "fixtures/prompts" / name, "w") as f:
            for entry in suite:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        print(f"wrote fixtures/prompts/{name}: {len(suite)} prompts")


if __name__ == "__main__":
    main()
