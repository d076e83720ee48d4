#!/usr/bin/env python3
"""Validates the reference against an independent implementation: HF transformers
loading the same GGUF in f32. Runs `resbisect dump` (resid_post at every layer, logits,
all positions) on one prompt of a suite, runs HF with hooks on every decoder layer, and
prints rel L2 = |a-b|/|b| per layer (max over positions). Exits 1 above the threshold.

  scripts/compare_hf.py --prompts fixtures/prompts/long.jsonl --id long_826
  scripts/compare_hf.py --prompts fixtures/prompts/bisect.jsonl --id p6_len_32 \
      --fixture-out fixtures/hf/smollm2_p6_len_32.safetensors
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
FIXTURE_LAYERS = [0, 1, 2, 4, 8, 16, 29]
FIXTURE_TOPK = 64


def rel_l2_rows(a, b):
    return np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "fixtures/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--resbisect", default=str(ROOT / "target/release/resbisect"))
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--id", required=True)
    ap.add_argument("--threshold", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fixture-out")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    line = next(l for l in open(args.prompts) if l.strip() and json.loads(l)["id"] == args.id)
    with tempfile.TemporaryDirectory() as tmp:
        suite = pathlib.Path(tmp) / "one.jsonl"
        suite.write_text(line)
        dump = pathlib.Path(tmp) / "dump"
        subprocess.run([args.resbisect, "dump", "--model", args.model, "--prompts", str(suite), "--layers", "all",
                        "--taps", "resid_post,logits", "--positions", "all", "-o", str(dump)], check=True)
        manifest = json.loads((dump / "manifest.json").read_text())
        tokens = manifest["prompts"][0]["tokens"]
        n_layer = manifest["model"]["n_layer"]
        ours = {}
        for l in range(n_layer):
            ours[l] = load_file(str(dump / "data" / args.id / f"blk.{l}.safetensors"))[f"blk.{l}.resid_post"].astype(np.float64)
        ours_logits = load_file(str(dump / "data" / args.id / "output.safetensors"))["logits"].astype(np.float64)

    from transformers import AutoModelForCausalLM
    model_path = pathlib.Path(args.model)
    hf = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32)
    hf.eval()
    captured = {}

    def hook(layer):
        def fn(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            captured[layer] = out[0].detach().double().numpy()
        return fn

    for i, layer in enumerate(hf.model.layers):
        layer.register_forward_hook(hook(i))
    with torch.no_grad():
        logits = hf(torch.tensor([tokens])).logits[0].double().numpy()

    results = {"prompt": args.id, "n_tokens": len(tokens), "threshold": args.threshold,
               "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
               "torch": torch.__version__, "layers": []}
    worst = 0.0
    print(f"prompt {args.id}: {len(tokens)} tokens; rel L2 per layer, max over positions")
    for l in range(n_layer):
        r = rel_l2_rows(ours[l], captured[l])
        worst = max(worst, float(r.max()))
        results["layers"].append({"layer": l, "max_rel_l2": float(r.max()), "mean_rel_l2": float(r.mean())})
        print(f"  blk.{l:<2}.resid_post  max {r.max():.3e}  mean {r.mean():.3e}")
    r = rel_l2_rows(ours_logits, logits)
    worst = max(worst, float(r.max()))
    top1 = float((ours_logits.argmax(-1) == logits.argmax(-1)).mean())
    results["logits"] = {"max_rel_l2": float(r.max()), "mean_rel_l2": float(r.mean()), "top1_agreement": top1}
    results["worst"] = worst
    print(f"  logits            max {r.max():.3e}  mean {r.mean():.3e}  top-1 agreement {top1:.4f}")
    print(f"worst rel L2 {worst:.3e} (threshold {args.threshold:.0e}): {'PASS' if worst <= args.threshold else 'FAIL'}")
    if args.json_out:
        pathlib.Path(args.json_out).write_text(json.dumps(results, indent=1) + "\n")

    if args.fixture_out:
        n = len(tokens)
        positions = np.array(sorted({0, n // 2, n - 1}), dtype=np.int64)
        tensors = {"tokens": np.array(tokens, dtype=np.int64), "positions": positions}
        for l in FIXTURE_LAYERS:
            tensors[f"blk.{l}.resid_post"] = captured[l][positions].astype(np.float32)
        last = logits[-1]
        top = np.argsort(-last)[:FIXTURE_TOPK]
        tensors["logits_top_ids"] = top.astype(np.int64)
        tensors["logits_top_values"] = last[top].astype(np.float32)
        save_file(tensors, args.fixture_out)
        print(f"wrote {args.fixture_out}")
    sys.exit(0 if worst <= args.threshold else 1)


if __name__ == "__main__":
    main()
