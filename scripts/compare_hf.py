#!/usr/bin/env python3
"""Validates the reference against an independent implementation: HF transformers
loading the same GGUF in f32. Runs `resbisect dump` (resid_post at every layer, logits,
all positions) on one prompt of a suite, runs HF with hooks on every decoder layer, and
prints rel L2 = |a-b|/|b| per layer (max over positions). Exits 1 above the threshold.

  scripts/compare_hf.py --prompts fixtures/prompts/long.jsonl --id long_826
  scripts/compare_hf.py --prompts fixtures/prompts/bisect.jsonl --id p6_len_32 \
      --fixture-out fixtures/hf/smollm2_p6_len_32.safetensors
  scripts/compare_hf.py --model fixtures/models/gemma-3-270m-q4_k_m.gguf \
      --prompts fixtures/prompts/long.jsonl --id long_1652 --retokenize \
      --fixture-out fixtures/hf/gemma3-270m_long_1652.safetensors --fixture-tokens 640
  scripts/compare_hf.py --preset yarn-tiny --random-tokens 1200 --json-out X.json \
      --fixture-out fixtures/hf/yarn-tiny_random_1200.safetensors

Architectures: transformers loads llama, qwen2, qwen3 and gemma3 GGUFs itself (it
un-permutes llama's q/k rows, subtracts Gemma's +1 from its norm weights). It reads no
RoPE scaling from a GGUF, so for the synthetic scaled presets the script gives HF's
model its own `rope_scaling` (HF's implementation of llama3, yarn and linear scaling,
parameters from ROPE_SCALING below, which must match src/synth/presets.rs) and, for
llama3, checks that the GGUF's `rope_freqs.weight` equals HF's frequency divisors.
"""
import argparse
import json
import pathlib
import platform
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE_TOPK = 64
SYNTH_SEED = 7
# HF rope_scaling for the synthetic presets (src/synth/presets.rs states the same values).
ROPE_SCALING = {
    "llama3-tiny": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 512},
    "yarn-tiny": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
    "linear-tiny": {"rope_type": "linear", "factor": 4.0},
}


def apply_rope_scaling(hf, scaling, model_path):
    """Rebuilds HF's rotary embedding with `scaling`; for llama3, checks the GGUF's
    rope_freqs.weight against HF's divisors (|diff| <= 1e-6, f32 rounding)."""
    import gguf
    cfg = hf.config
    params = dict(getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta})
    params.update(scaling)
    if hasattr(cfg, "rope_parameters"):
        cfg.rope_parameters = params
    else:
        cfg.rope_scaling = params
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg)
    if scaling["rope_type"] == "llama3":
        stored = next(t for t in gguf.GGUFReader(model_path).tensors if t.name == "rope_freqs.weight").data
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        base = 1.0 / params["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
        divisors = base / hf.model.rotary_emb.inv_freq.double().numpy()
        err = float(np.abs(divisors - stored).max())
        print(f"rope_freqs.weight vs HF llama3 divisors: max |diff| {err:.2e}")
        if err > 1e-6:
            sys.exit(f"rope_freqs.weight disagrees with HF's llama3 scaling (max |diff| {err:.2e})")


def gemma3_attention_scale(model_path):
    """HF's Gemma 3 scales attention scores by query_pre_attn_scalar^-0.5 (default 256) and
    does not read it from a GGUF; llama.cpp scales by key_length^-0.5 (all sizes but 27B).
    The same for the real 270M (key_length 256); gemma3-tiny's 64 needs it said."""
    import gguf
    fields = gguf.GGUFReader(model_path).fields
    key = fields.get("gemma3.attention.key_length")
    return {"query_pre_attn_scalar": int(key.parts[-1][0])} if key is not None else {}


def suite_line(args):
    """The one-prompt suite to dump: the chosen prompt (without its stored token ids when
    --retokenize, so the model's own tokenizer runs), or --random-tokens ids (seeded)."""
    if args.random_tokens:
        import gguf
        n_vocab = len(gguf.GGUFReader(args.model).fields["tokenizer.ggml.tokens"].data)
        ids = np.random.default_rng(SYNTH_SEED).integers(0, n_vocab, args.random_tokens).tolist()
        return json.dumps({"id": args.id, "tokens": ids})
    line = next(l for l in open(args.prompts) if l.strip() and json.loads(l)["id"] == args.id)
    if args.retokenize:
        p = json.loads(line)
        return json.dumps({"id": p["id"], "text": p["text"]})
    return line


def rel_l2_rows(a, b, chunk=128):
    """|a-b|/|b| per row, in f64, `chunk` rows at a time (Gemma's logits are 1652 x 262144)."""
    out = []
    for i in range(0, len(a), chunk):
        x, y = a[i:i + chunk].astype(np.float64), b[i:i + chunk].astype(np.float64)
        out.append(np.linalg.norm(x - y, axis=-1) / np.maximum(np.linalg.norm(y, axis=-1), 1e-30))
    return np.concatenate(out)


def fixture_layers(n_layer):
    """Layers the fixture keeps: 0, 1, 2, 4, 8, ... below n_layer, and the last (SmolLM2's 30
    layers give 0, 1, 2, 4, 8, 16, 29)."""
    layers = {0, n_layer - 1}
    layers.update(l for l in [1] + [2 ** k for k in range(1, 8)] if l < n_layer)
    return sorted(layers)


def fixture_positions(n, window):
    """First, middle, last; with a sliding window, also the last row that sees the whole
    prompt prefix (window - 1) and the first two whose window drops a token."""
    positions = {0, n // 2, n - 1}
    if window:
        positions.update(p for p in (window - 1, window, window + 1) if p < n)
    return np.array(sorted(positions), dtype=np.int64)


def split_by_window(r, window):
    """(max over positions < window, max over positions >= window) of per-row values r."""
    before, after = r[:window], r[window:]
    return (float(before.max()) if len(before) else None, float(after.max()) if len(after) else None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "fixtures/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--resbisect", default=str(ROOT / "target/release/resbisect"))
    ap.add_argument("--preset", help="compare on `resbisect synth --preset P --quant f32 --seed 7` instead")
    ap.add_argument("--prompts")
    ap.add_argument("--id", default="random")
    ap.add_argument("--retokenize", action="store_true", help="ignore the prompt's stored token ids")
    ap.add_argument("--random-tokens", type=int, help="this many seeded random token ids instead of a prompt")
    ap.add_argument("--threshold", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fixture-out")
    ap.add_argument("--fixture-tokens", type=int,
                    help="the fixture keeps the first N tokens (and positions < N) so its test runs a short prompt; "
                         "the model is causal, so HF's rows there are those of the N-token prompt")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    # Kept until exit: the synthetic model is read again by HF below.
    tmpdir = tempfile.TemporaryDirectory()
    tmp = tmpdir.name
    if args.preset:
        args.model = str(pathlib.Path(tmp) / f"{args.preset}.gguf")
        subprocess.run([args.resbisect, "synth", "--preset", args.preset, "--quant", "f32", "--seed", str(SYNTH_SEED),
                        "-o", args.model], check=True)
    suite = pathlib.Path(tmp) / "one.jsonl"
    suite.write_text(suite_line(args))
    dump = pathlib.Path(tmp) / "dump"
    subprocess.run([args.resbisect, "dump", "--model", args.model, "--prompts", str(suite), "--layers", "all",
                    "--taps", "resid_post,logits", "--positions", "all", "-o", str(dump)], check=True)
    manifest = json.loads((dump / "manifest.json").read_text())
    tokens = manifest["prompts"][0]["tokens"]
    n_layer = manifest["model"]["n_layer"]
    ours = {}
    for l in range(n_layer):
        ours[l] = load_file(str(dump / "data" / args.id / f"blk.{l}.safetensors"))[f"blk.{l}.resid_post"]
    ours_logits = load_file(str(dump / "data" / args.id / "output.safetensors"))["logits"]

    from transformers import AutoModelForCausalLM
    model_path = pathlib.Path(args.model)
    hf = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32,
                                              **gemma3_attention_scale(args.model))
    hf.eval()
    if args.preset in ROPE_SCALING:
        apply_rope_scaling(hf, ROPE_SCALING[args.preset], args.model)
    captured = {}

    def hook(layer):
        def fn(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            captured[layer] = out[0].detach().float().numpy().copy()
        return fn

    for i, layer in enumerate(hf.model.layers):
        layer.register_forward_hook(hook(i))
    with torch.no_grad():
        logits = hf(torch.tensor([tokens])).logits[0].float().numpy()
    # Windowed layers (Gemma 3): positions >= window are the ones whose mask drops tokens.
    window = getattr(hf.config, "sliding_window", None) if "sliding_attention" in (
        getattr(hf.config, "layer_types", None) or []) else None

    results = {"model": args.preset or pathlib.Path(args.model).name, "prompt": args.id, "n_tokens": len(tokens), "threshold": args.threshold,
               "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
               "torch": torch.__version__, "sliding_window": window, "layers": []}
    worst = 0.0
    print(f"prompt {args.id}: {len(tokens)} tokens; rel L2 per layer, max over positions"
          + (f" (and split at the sliding window {window}: before | from)" if window else ""))

    def row(name, r):
        entry = {"max_rel_l2": float(r.max()), "mean_rel_l2": float(r.mean())}
        line = f"  {name:<18} max {r.max():.3e}  mean {r.mean():.3e}"
        if window:
            before, after = split_by_window(r, window)
            entry.update(max_before_window=before, max_from_window=after)
            line += f"  | {before:.3e} | " + (f"{after:.3e}" if after is not None else "-")
        print(line)
        return entry

    for l in range(n_layer):
        r = rel_l2_rows(ours[l], captured[l])
        worst = max(worst, float(r.max()))
        results["layers"].append({"layer": l, **row(f"blk.{l}.resid_post", r)})
    r = rel_l2_rows(ours_logits, logits)
    worst = max(worst, float(r.max()))
    top1 = float((ours_logits.argmax(-1) == logits.argmax(-1)).mean())
    results["logits"] = {**row("logits", r), "top1_agreement": top1}
    results["worst_resid_post"] = max(e["max_rel_l2"] for e in results["layers"])
    results["worst"] = worst
    print(f"  top-1 agreement {top1:.4f}")
    print(f"worst rel L2 {worst:.3e} (threshold {args.threshold:.0e}): {'PASS' if worst <= args.threshold else 'FAIL'}")
    if args.json_out:
        pathlib.Path(args.json_out).write_text(json.dumps(results, indent=1) + "\n")

    if args.fixture_out:
        n = min(args.fixture_tokens or len(tokens), len(tokens))
        positions = fixture_positions(n, window)
        tensors = {"tokens": np.array(tokens[:n], dtype=np.int64), "positions": positions}
        for l in fixture_layers(n_layer):
            tensors[f"blk.{l}.resid_post"] = captured[l][positions].astype(np.float32)
        last = logits[n - 1]
        top = np.argsort(-last)[:FIXTURE_TOPK]
        tensors["logits_top_ids"] = top.astype(np.int64)
        tensors["logits_top_values"] = last[top].astype(np.float32)
        # The test (tests/integration/hf_fixtures.rs) remakes the model from this: a preset
        # with SYNTH_SEED, or a file under fixtures/models/.
        meta = {"preset": args.preset, "seed": str(SYNTH_SEED)} if args.preset else {"model": model_path.name}
        save_file(tensors, args.fixture_out, metadata={**meta, "sliding_window": str(window or 0),
                                                       "worst_rel_l2": f"{worst:.3e}"})
        print(f"wrote {args.fixture_out}")
    sys.exit(0 if worst <= args.threshold else 1)


if __name__ == "__main__":
    main()
