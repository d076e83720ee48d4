#!/usr/bin/env python3
"""An external resbisect engine on HF transformers: runs a GGUF (or HF checkpoint) with
forward hooks and writes the requested taps as dump format v1 (docs/engines.md).

As a bisect engine (placeholders filled by resbisect; the project virtualenv has torch):
  resbisect bisect --model M --prompt "..." --engine external --command \
    '.venv/bin/python scripts/dump_hf.py --model {model} --model-info {model_info} --tokens {tokens} \
     --prompt-id {prompt_id} --layers {layers} --taps {taps} --positions {positions} --out {out}'

Taps: embed, attn_norm, v, attn, attn_out, resid_mid, ffn_norm, ffn_gate, ffn_up, ffn_act,
ffn_out, resid_post, final_norm, logits; in models with post norms (Gemma 3) also
attn_post_norm and ffn_post_norm. Not q_pre_rope, k_pre_rope, q and k: HF applies RoPE
inside attention, and it un-permutes the GGUF q/k rows to its half-split RoPE layout, so
its q/k channels are not the canonical ones; bisect reports them as missing on this side.
--inject-layer/--inject-pos/--inject-scale scale one decoder layer's output from a
position on, to test the loop with a known bug.
"""
import argparse
import datetime
import json
import os
import pathlib
import re
import sys

import numpy as np
import torch
from safetensors.numpy import save_file

def positions_of(spec, n):
    """The subset of resbisect's position syntax this engine needs: all, last, N, A..B, -K.."""
    out = set()
    for item in spec.split(","):
        item = item.strip()
        if item == "all":
            out.update(range(n))
        elif item == "last":
            out.add(n - 1)
        elif ".." in item:
            a, b = item.split("..")
            lo = int(a) if a else 0
            hi = int(b) if b else n
            lo, hi = (lo + n if lo < 0 else lo), (hi + n if hi < 0 else hi)
            out.update(range(max(lo, 0), min(hi, n)))
        else:
            p = int(item)
            out.add(p + n if p < 0 else p)
    return sorted(p for p in out if 0 <= p < n)


def write_atomic(path, write):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_manifest(out, manifest):
    write_atomic(out / "manifest.json", lambda p: p.write_text(json.dumps(manifest) + "\n"))


# The dump format's short tap names in order (docs/taps.md); this engine writes all but
# the query and key taps (HF computes RoPE inside its attention), which it skips as the
# external protocol allows.
LAYER_TAPS = ["attn_norm", "q_pre_rope", "k_pre_rope", "q", "k", "v", "attn", "attn_out", "attn_post_norm",
              "resid_mid", "ffn_norm", "ffn_gate", "ffn_up", "ffn_act", "ffn_out", "ffn_post_norm", "resid_post"]
ALL_TAPS = ["embed"] + LAYER_TAPS + ["final_norm", "logits"]


def refuse(message):
    print(f"dump_hf.py: {message}", file=sys.stderr)
    sys.exit(2)


def apply_gguf_rope_scaling(hf, model_path):
    """transformers' GGUF loader reads the RoPE base but none of its frequency scaling, so
    a Llama 3.x GGUF would run unscaled: apply what the GGUF says, as llama.cpp reads it
    (each frequency divided by its `rope_freqs.weight` factor; linear scaling divides them
    all by the factor), and refuse scaling this script does not implement (YaRN)."""
    import gguf
    reader = gguf.GGUFReader(model_path)
    fields = reader.fields

    def field(key):
        f = fields.get(key)
        if f is None:
            return None
        value = f.parts[f.data[0]]
        return bytes(value).decode() if value.dtype == np.uint8 else float(value[0])

    arch = field("general.architecture")
    kind = field(f"{arch}.rope.scaling.type")
    factors = next((t.data for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if kind in (None, "none") and factors is None:
        return
    if kind not in (None, "none", "linear"):
        refuse(f"{model_path}: {arch}.rope.scaling.type {kind!r} is not implemented here (none, linear, rope_freqs)")
    rotary = getattr(hf.model, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        refuse(f"{model_path}: RoPE scaling on a model without one rotary embedding ({arch})")
    inv_freq = rotary.inv_freq.float()
    if factors is not None:
        inv_freq = inv_freq / torch.from_numpy(np.asarray(factors, dtype=np.float32))
    if kind == "linear":
        inv_freq = inv_freq / field(f"{arch}.rope.scaling.factor")
    rotary.inv_freq = inv_freq
    if hasattr(rotary, "original_inv_freq"):
        rotary.original_inv_freq = inv_freq


def selected_layers(spec, n_layer):
    """--layers: `none`, `all`, or a comma list of layer indices below n_layer."""
    if spec == "none":
        return []
    if spec == "all":
        return list(range(n_layer))
    try:
        layers = [int(x) for x in spec.split(",")]
    except ValueError:
        refuse(f"--layers {spec!r}: `none`, `all` or comma-separated layer indices")
    bad = [l for l in layers if not 0 <= l < n_layer]
    if bad:
        refuse(f"--layers: layer {bad[0]} is not in 0..{n_layer - 1}")
    return layers


def selected_taps(spec):
    """--taps: `all`, or a comma list of the dump format's short tap names."""
    if spec == "all":
        return list(ALL_TAPS)
    taps = spec.split(",")
    unknown = [t for t in taps if t not in ALL_TAPS]
    if unknown:
        refuse(f"--taps: unknown tap {unknown[0]!r} (taps: all, {', '.join(ALL_TAPS)})")
    return taps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a .gguf file or an HF checkpoint directory")
    ap.add_argument("--model-info", required=True, help="the manifest 'model' object resbisect passes")
    ap.add_argument("--tokens", required=True, help="file of comma-separated token ids")
    ap.add_argument("--prompt-id", required=True)
    ap.add_argument("--layers", required=True)
    ap.add_argument("--taps", required=True)
    ap.add_argument("--positions", default="all")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--inject-layer", type=int)
    ap.add_argument("--inject-pos", type=int, default=0)
    ap.add_argument("--inject-scale", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tokens = [int(t) for t in pathlib.Path(args.tokens).read_text().replace("\n", "").split(",") if t]
    n = len(tokens)
    n_layer = json.loads(pathlib.Path(args.model_info).read_text()).get("n_layer", 0)
    layers = selected_layers(args.layers, n_layer)
    taps = selected_taps(args.taps)
    positions = positions_of(args.positions, n)
    # The prompt id names a directory under data/ (docs/dump-format.md); --out must be new.
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", args.prompt_id) or args.prompt_id in (".", ".."):
        refuse(f"bad --prompt-id {args.prompt_id!r}: 1-64 characters of A-Z a-z 0-9 _ . -")
    out = pathlib.Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        refuse(f"--out {out}: exists and is not an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "data" / args.prompt_id).mkdir(parents=True)

    dtype = getattr(torch, args.dtype)
    manifest = {
        "format": "resbisect.dump", "version": 1,
        "engine": {"name": "hf-transformers", "version": __import__("transformers").__version__,
                   "backend": "torch-cpu", "dtype": {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[args.dtype],
                   "device": "cpu"},
        "model": json.loads(pathlib.Path(args.model_info).read_text()),
        "prompts": [{"id": args.prompt_id, "text": None, "tokens": tokens}],
        "selection": {"layers": layers, "taps": taps, "positions": args.positions},
        "status": "running", "error": None,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    write_manifest(out, manifest)

    from transformers import AutoModelForCausalLM
    model_path = pathlib.Path(args.model)
    if model_path.suffix == ".gguf":
        hf = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name, dtype=dtype)
        apply_gguf_rope_scaling(hf, model_path)
    else:
        hf = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype)
    hf.eval()

    idx = torch.tensor(positions)
    captured = {}

    def keep(tap_id, t):
        captured[tap_id] = t[0].index_select(0, idx).float().numpy()

    def on_output(tap_id):
        return lambda _m, _i, o: keep(tap_id, o[0] if isinstance(o, tuple) else o)

    def on_input(tap_id):
        return lambda _m, i: keep(tap_id, i[0])

    if "embed" in taps:
        hf.model.embed_tokens.register_forward_hook(on_output("embed"))
    for l, layer in enumerate(hf.model.layers):
        if args.inject_layer == l:
            def scale(_m, _i, o, p=args.inject_pos, s=args.inject_scale):
                h = o[0] if isinstance(o, tuple) else o
                h[:, p:] *= s
                return o
            layer.register_forward_hook(scale)
        if l not in layers:
            continue
        want = lambda t: t in taps
        name = lambda t: f"blk.{l}.{t}"
        if want("attn_norm"):
            layer.input_layernorm.register_forward_hook(on_output(name("attn_norm")))
        if want("v"):
            layer.self_attn.v_proj.register_forward_hook(on_output(name("v")))
        if want("attn"):
            layer.self_attn.o_proj.register_forward_pre_hook(on_input(name("attn")))
        # With post norms (Gemma 3) HF's post_attention_layernorm normalizes the attention
        # output and pre_feedforward_layernorm is the FFN's input norm; without them
        # (llama, qwen) post_attention_layernorm is the FFN's input norm.
        attn_post_norm, ffn_input_norm = None, layer.post_attention_layernorm
        if hasattr(layer, "pre_feedforward_layernorm"):
            attn_post_norm, ffn_input_norm = layer.post_attention_layernorm, layer.pre_feedforward_layernorm
        ffn_post_norm = getattr(layer, "post_feedforward_layernorm", None)
        if want("attn_out"):
            layer.self_attn.o_proj.register_forward_hook(on_output(name("attn_out")))
        if want("attn_post_norm") and attn_post_norm is not None:
            attn_post_norm.register_forward_hook(on_output(name("attn_post_norm")))
        if want("resid_mid"):
            ffn_input_norm.register_forward_pre_hook(on_input(name("resid_mid")))
        if want("ffn_norm"):
            ffn_input_norm.register_forward_hook(on_output(name("ffn_norm")))
        if want("ffn_post_norm") and ffn_post_norm is not None:
            ffn_post_norm.register_forward_hook(on_output(name("ffn_post_norm")))
        if want("ffn_gate"):
            layer.mlp.gate_proj.register_forward_hook(on_output(name("ffn_gate")))
        if want("ffn_up"):
            layer.mlp.up_proj.register_forward_hook(on_output(name("ffn_up")))
        if want("ffn_act"):
            layer.mlp.down_proj.register_forward_pre_hook(on_input(name("ffn_act")))
        if want("ffn_out"):
            layer.mlp.register_forward_hook(on_output(name("ffn_out")))
        # Registered after the injection hook, so it sees the perturbed output.
        if want("resid_post"):
            layer.register_forward_hook(on_output(name("resid_post")))
    if "final_norm" in taps:
        hf.model.norm.register_forward_hook(on_output("final_norm"))

    try:
        with torch.no_grad():
            logits = hf(torch.tensor([tokens])).logits
        if "logits" in taps:
            keep("logits", logits)
        pos = np.array(positions, dtype=np.int64)
        groups = {}
        for tap_id, values in captured.items():
            stem = tap_id.rsplit(".", 1)[0] if tap_id.startswith("blk.") else ("embed" if tap_id == "embed" else "output")
            short = tap_id.rsplit(".", 1)[-1] if tap_id.startswith("blk.") else tap_id
            if short in taps:
                groups.setdefault(stem, {})[tap_id] = np.ascontiguousarray(values, dtype=np.float32)
        for stem, tensors in groups.items():
            tensors["positions"] = pos
            write_atomic(out / "data" / args.prompt_id / f"{stem}.safetensors", lambda p, t=tensors: save_file(t, str(p)))
        manifest["status"] = "complete"
    except Exception as e:  # a failing engine still leaves a readable dump
        manifest["status"] = "failed"
        manifest["error"] = {"message": f"{type(e).__name__}: {e}"}
        write_manifest(out, manifest)
        print(f"dump_hf: {e}", file=sys.stderr)
        return 3
    write_manifest(out, manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
