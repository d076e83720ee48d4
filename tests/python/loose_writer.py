#!/usr/bin/env python3
"""A third-party dump writer for the conformance test, written from docs/dump-format.md
alone with numpy and safetensors (no resbisect code). It plays an engine that copies
its numbers from an existing dump (--source: the "computation") and writes them as its
own dump with the loose spellings other writers use: no fingerprint (null), its own
prompt id, `selection.taps: "all"`, `selection.positions: ["all"]`, rope_base as an
integer. --scale TAP@POS=V multiplies that tap's rows from position POS on, as a
bug would; --rope-base overrides the config, as a misread model would.
"""
import argparse
import json
import os
import pathlib

import numpy as np
from safetensors.numpy import load_file, save_file


def write_atomic(path, write):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", required=True, help="a dump whose numbers this engine reports")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompt-id", default="p0")
    ap.add_argument("--scale", help="TAP@POS=V, e.g. blk.1.resid_post@3=1.5")
    ap.add_argument("--rope-base", type=float)
    args = ap.parse_args()

    source = pathlib.Path(args.source)
    src = json.loads((source / "manifest.json").read_text())
    assert src["format"] == "resbisect.dump" and src["version"] == 1
    prompt = src["prompts"][0]
    scale_tap, scale_pos, scale_by = None, 0, 1.0
    if args.scale:
        tap_pos, value = args.scale.split("=")
        scale_tap, pos = tap_pos.split("@")
        scale_pos, scale_by = int(pos), float(value)

    out = pathlib.Path(args.out)
    data = out / "data" / args.prompt_id
    data.mkdir(parents=True)
    for f in sorted((source / "data" / prompt["id"]).glob("*.safetensors")):
        tensors = load_file(str(f))
        positions = tensors["positions"]
        mine = {"positions": positions.astype(np.int64)}
        for name, rows in tensors.items():
            if name == "positions":
                continue
            rows = rows.astype(np.float32)
            if name == scale_tap:
                rows[positions >= scale_pos] *= scale_by
            mine[name] = rows
        write_atomic(data / f.name, lambda p: save_file(mine, str(p)))

    model = {k: v for k, v in src["model"].items() if k not in ("fingerprint", "path")}
    model["path"] = "my-engine-weights/"
    model["fingerprint"] = None  # this engine cannot compute resbisect's fingerprint
    model["rope_base"] = int(model["rope_base"]) if args.rope_base is None else args.rope_base
    manifest = {
        "format": "resbisect.dump",
        "version": 1,
        "engine": {"name": "loose-writer", "version": "1", "backend": "numpy", "dtype": "f32", "device": "cpu"},
        "model": model,
        "prompts": [{"id": args.prompt_id, "tokens": prompt["tokens"]}],
        "selection": {"layers": "all", "taps": "all", "positions": ["all"]},
        "status": "complete",
        "error": None,
        "created": "2026-11-29T10:00:00Z",
    }
    write_atomic(out / "manifest.json", lambda p: p.write_text(json.dumps(manifest, indent=1) + "\n"))


if __name__ == "__main__":
    main()
