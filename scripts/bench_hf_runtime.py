#!/usr/bin/env python3
"""The PyTorch/transformers side of scripts/bench-runtime.sh: a LlamaForCausalLM of the
same shapes on the same GPU in f16 (the GGUF's weights when the gguf package can load
them, else random), prefill of 512 and 2048 tokens and greedy decode, tokens/s. Prints one
line `HF {json}`."""
import json, pathlib, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM

gguf_path, tokens_path, decode = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
tokens = [int(t) for t in open(tokens_path).read().strip().split(",")]
weights = "random weights at the same shapes"
try:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float16, attn_implementation="sdpa")
    weights = "the same GGUF weights"
except Exception:
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float16)
model = model.cuda().eval()
out = {"weights": weights, "torch": torch.__version__}

def timed(fn, reps=3):
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best

with torch.no_grad():
    for n in (512, 2048):
        ids = torch.tensor([tokens[:n]], device="cuda")
        model(ids)  # warm-up
        out[f"prefill_{n}_tok_s"] = n / timed(lambda: model(ids, use_cache=False))
    ids = torch.tensor([tokens[:512]], device="cuda")
    gen = lambda: model.generate(ids, max_new_tokens=decode, min_new_tokens=decode, do_sample=False)
    gen()
    t_gen = timed(gen, reps=2)
    t_prefill = timed(lambda: model(ids), reps=2)
    out["decode_tok_s"] = decode / max(t_gen - t_prefill, 1e-9)
print("HF " + json.dumps(out))
