#!/usr/bin/env python3
"""Seed corpora for the fuzz targets (fuzz/): the project's own `synth`, `cut`, `dump` and
`calibrate` outputs, plus issue 21's hostile inputs as regression seeds.

    scripts/fuzz_seeds.py [--bin target/release/resbisect] [--big]

Writes fuzz/seeds/<target>/ (small, committed: under 2 MB in all). With --big, also writes
the issue's full-size inputs (a 50 MB metadata array, a 200k-line suite, ...) to
fuzz/corpus-big/<target>/ (ignored by git), for scripts/fuzz.sh to run long.
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = b"\n@@@resbisect-file "  # fuzz/src/lib.rs ENTRY

# ---- a minimal GGUF reader/writer (v3, little-endian), enough to edit metadata ----

SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_value(b, pos, t):
    if t in SCALAR:
        fmt = SCALAR[t]
        return struct.unpack_from(fmt, b, pos)[0], pos + struct.calcsize(fmt)
    if t == 8:
        (n,) = struct.unpack_from("<Q", b, pos)
        return b[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n
    if t == 9:
        et, n = struct.unpack_from("<IQ", b, pos)
        pos += 12
        items = []
        for _ in range(n):
            v, pos = read_value(b, pos, et)
            items.append(v)
        return (et, items), pos
    raise ValueError(f"type {t}")


def write_value(t, v):
    if t in SCALAR:
        return struct.pack(SCALAR[t], v)
    if t == 8:
        s = v.encode("utf-8")
        return struct.pack("<Q", len(s)) + s
    et, items = v
    return struct.pack("<IQ", et, len(items)) + b"".join(write_value(et, x) for x in items)


def read_gguf(path):
    b = open(path, "rb").read()
    magic, version, n_t, n_kv = struct.unpack_from("<4sIQQ", b, 0)
    assert magic == b"GGUF", path
    pos = 24
    meta = []
    for _ in range(n_kv):
        key, pos = read_value(b, pos, 8)
        (t,) = struct.unpack_from("<I", b, pos)
        v, pos = read_value(b, pos + 4, t)
        meta.append([key, t, v])
    tensors = []
    for _ in range(n_t):
        name, pos = read_value(b, pos, 8)
        (nd,) = struct.unpack_from("<I", b, pos)
        dims = list(struct.unpack_from(f"<{nd}Q", b, pos + 4))
        pos += 4 + 8 * nd
        ty, off = struct.unpack_from("<IQ", b, pos)
        pos += 12
        tensors.append([name, dims, ty, off])
    align = next((v for k, _, v in meta if k == "general.alignment"), 32)
    data_start = (pos + align - 1) // align * align
    return meta, tensors, b[data_start:], align


def write_gguf(path, meta, tensors, data, align=32):
    out = bytearray(struct.pack("<4sIQQ", b"GGUF", 3, len(tensors), len(meta)))
    for key, t, v in meta:
        out += write_value(8, key) + struct.pack("<I", t) + write_value(t, v)
    for name, dims, ty, off in tensors:
        out += write_value(8, name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ty, off)
    out += b"\0" * (-len(out) % align)
    out += data
    open(path, "wb").write(out)


def edited(src, dst, edit_meta=None, edit_tensors=None):
    meta, tensors, data, align = read_gguf(src)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    write_gguf(dst, meta, tensors, data, align)


def set_meta(meta, key, t, v):
    for m in meta:
        if m[0] == key:
            m[1], m[2] = t, v
            return
    meta.append([key, t, v])


def tokens_of(meta):
    return next(m for m in meta if m[0] == "tokenizer.ggml.tokens")[2][1]


# ---- dumps packed as fuzz/src/lib.rs unpack_dump reads them ----

def pack_dump(root):
    out = open(os.path.join(root, "manifest.json"), "rb").read()
    data = os.path.join(root, "data")
    for pid in sorted(os.listdir(data)):
        for name in sorted(os.listdir(os.path.join(data, pid))):
            if name.startswith("."):
                continue
            out += ENTRY + f"{pid}/{name}\n".encode() + open(os.path.join(data, pid, name), "rb").read()
    return out


def with_manifest(packed, edit):
    head, sep, rest = packed.partition(ENTRY)
    m = json.loads(head)
    edit(m)
    return json.dumps(m).encode() + sep + rest


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/resbisect"))
    ap.add_argument("--big", action="store_true")
    a = ap.parse_args()
    rb = a.bin
    if not os.access(rb, os.X_OK):
        sys.exit(f"fuzz_seeds: {rb} is missing: cargo build --release first")
    seeds = os.path.join(ROOT, "fuzz/seeds")
    big = os.path.join(ROOT, "fuzz/corpus-big")
    tmp = tempfile.mkdtemp(prefix="resbisect-seeds-")

    def run(*args):
        subprocess.run([rb, *args], check=True, stdout=subprocess.DEVNULL)

    def put(target, name, data, where=seeds):
        d = os.path.join(where, target)
        os.makedirs(d, exist_ok=True)
        open(os.path.join(d, name), "wb").write(data)

    def put_file(target, name, path, where=seeds):
        put(target, name, open(path, "rb").read(), where)

    for d in (seeds, big if a.big else None):
        if d and os.path.isdir(d):
            shutil.rmtree(d)

    # GGUF: synthetic micro models (both tokenizer kinds, a few types), a cut, hostile edits.
    t = lambda n: os.path.join(tmp, n)
    run("synth", "--preset", "micro", "--quant", "q4_0", "--seed", "1", "-o", t("gpt2.gguf"))
    run("synth", "--preset", "micro", "--quant", "q8_0", "--tokenizer", "llama", "--seed", "2", "-o", t("spm.gguf"))
    run("synth", "--preset", "micro", "--quant", "f16", "--seed", "3", "-o", t("f16.gguf"))
    run("cut", "--model", t("spm.gguf"), "--layers", "1", "-o", t("cut.gguf"))
    for n in ("gpt2", "spm", "f16", "cut"):
        put_file("gguf_model", f"{n}.gguf", t(f"{n}.gguf"))
    # Issue 21: a tensor byte size that wraps; a lying block_count; SentencePiece pieces
    # too long and too deeply nested; a large u8 metadata array (scaled down here).
    edited(t("gpt2.gguf"), t("wrap.gguf"), edit_tensors=lambda ts: ts.__setitem__(0, [ts[0][0], [1 << 62, 1], 0, ts[0][3]]))
    edited(t("gpt2.gguf"), t("blocks.gguf"), lambda m: set_meta(m, "llama.block_count", 4, 1 << 24))
    edited(t("spm.gguf"), t("long_piece.gguf"), lambda m: tokens_of(m).__setitem__(500, "x" * 2000))
    edited(t("spm.gguf"), t("stairs.gguf"), lambda m: [tokens_of(m).__setitem__(200 + k, "q" * (k + 1)) for k in range(300)])
    edited(t("gpt2.gguf"), t("u8_array.gguf"), lambda m: set_meta(m, "junk", 9, (0, [7] * 100_000)))
    for n in ("wrap", "blocks", "long_piece", "stairs", "u8_array"):
        put_file("gguf_model", f"issue21_{n}.gguf", t(f"{n}.gguf"))
    if a.big:
        edited(t("spm.gguf"), t("long_big.gguf"), lambda m: tokens_of(m).__setitem__(500, "x" * 200_000))
        edited(t("gpt2.gguf"), t("u8_big.gguf"), lambda m: set_meta(m, "junk", 9, (0, [7] * 50_000_000)))
        for n in ("long_big", "u8_big"):
            put_file("gguf_model", f"issue21_{n}.gguf", t(f"{n}.gguf"), big)

    # Dumps: complete, partial (a fault that NaNs), f64; issue 21's manifests.
    m = t("gpt2.gguf")
    run("dump", "--model", m, "--tokens", "5,6,7", "--taps", "all", "-o", t("d_all"))
    run("dump", "--model", m, "--tokens", "9,8,7,6,5,4", "--taps", "resid_post,logits", "--positions", "1,-2..", "-o", t("d_some"))
    run("dump", "--model", m, "--tokens", "5,6,7", "--taps", "all", "--dtype", "f64", "-o", t("d_f64"))
    run("dump", "--model", m, "--tokens", "5,6,7", "--taps", "all", "--inject", "blk.0.ffn_out:nan@1", "-o", t("d_nan"))
    packed = {n: pack_dump(t(n)) for n in ("d_all", "d_some", "d_f64", "d_nan")}
    for n, p in packed.items():
        put("dump_read", f"{n}.dump", p)
    put("dump_read", "issue21_n_head0.dump", with_manifest(packed["d_some"], lambda v: v["model"].__setitem__("n_head", 0)))
    put("dump_read", "issue21_n_layer_2p62.dump", with_manifest(packed["d_some"], lambda v: v["model"].__setitem__("n_layer", 1 << 62)))
    put("dump_read", "issue21_n_layer_1e8.dump", with_manifest(packed["d_some"], lambda v: v["model"].__setitem__("n_layer", 100_000_000)))
    put("dump_read", "issue21_running.dump", with_manifest(packed["d_all"], lambda v: v.__setitem__("status", "running")))

    # Tolerances: calibrate's own output (clean and over NaN rows), issue 21's null file.
    run("calibrate", t("d_all"), t("d_f64"), "-o", t("tol.json"))
    run("calibrate", t("d_nan"), t("d_all"), "-o", t("tol_nan.json"))
    put_file("tolerances", "calibrated.json", t("tol.json"))
    put_file("tolerances", "calibrated_nan.json", t("tol_nan.json"))
    put("tolerances", "issue21_null.json", b'{"version": 1, "defaults": {"F32": {"rel_l2": 1e-3, "abs": 1e-6}}, "taps": [{"pattern": "blk.*.ffn_up", "rel_l2": null, "abs": 0.0}]}')
    put("tolerances", "glob.txt", b"blk.*.res*_po*t\nblk.12.resid_post")

    # Prompt suites: the committed ones, a late duplicate (small here, 200k lines big).
    for n in ("bisect.jsonl", "long.jsonl"):
        put_file("prompt_suite", n, os.path.join(ROOT, "fixtures/prompts", n))
    dup = lambda n: "".join(json.dumps({"id": f"p{i}", "tokens": [1, 2]}) + "\n" for i in range(n)) + '{"id": "p0", "text": "again"}\n'
    put("prompt_suite", "issue21_late_duplicate.jsonl", dup(2000).encode())
    if a.big:
        put("prompt_suite", "issue21_late_duplicate_200k.jsonl", dup(200_000).encode(), big)

    # Selections: layers, taps, positions lines, then --inject specs (first byte: depth, length).
    for i, text in enumerate([
        "0,1,2,4,8\nresid_post,attn_out\n0..16,820..840\nblk.5.attn_out:scale=1.5@826\nrope:shift=3@100",
        "all\nall\n-8..\nl_out-3:nan@7\nblk.2.rope:shift=-1@0\nembed:zero@0\nblk.1.q:oob@2",
        "3..\nhook_resid_post,Qcur,result_output\nlast,5\nhidden_states[2]\nblocks.3.hook_resid_pre\nkqv_out-1",
        # issue 21: extreme numbers
        "18446744073709551615\nall\n9223372036854775807\nblk.18446744073709551615.q:nan@0",
        "0..18446744073709551615\nall\n-9223372036854775808..\nembed:nan@18446744073709551616",
    ]):
        put("selection", f"sel{i}.txt", bytes([21 + i * 40]) + text.encode())

    shutil.rmtree(tmp)
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(seeds) for f in fs)
    print(f"fuzz seeds: {total / 1e6:.2f} MB in {seeds}" + (f"; big inputs in {big}" if a.big else ""))
    if total > 2_000_000:
        sys.exit("fuzz_seeds: committed seeds exceed 2 MB")


if __name__ == "__main__":
    main()
