"""Static audit speed and memory on a synthetic base + ablated pair of a few GB.

Builds (once, cached in --dir) a qwen3_moe-shaped bf16 checkpoint of about --gb GB in 1 GB shards
and an ablated copy (o_proj and expert down_proj orthogonalized in the middle layers, the commonest
ablation), then, each in a fresh subprocess, with the page cache warm:

- read_copy: read both models once, one thread, every tensor with a positioned read into one reused
  buffer -- the fastest plain read into process memory we have (fresh buffers per tensor take 1.5x);
- read_mapped: map both models the way the audit does and read every byte once (memcmp of each
  tensor with itself), one thread -- reading with no copy at all, the lowest bound we know;
- the static audit with a directions file: every pair compared, every writer and reader projected on
  its layer's direction, every changed tensor's direction recovered. It uses two worker threads and
  the C kernels of audit/weights/native.py;
- the same audit on its torch path (AUDIT_NATIVE=0), what runs where no C compiler is found.

Prints the time ratios against both reads (target <= 1.5 against the read) and the audit's peak RSS
against 1 GB + 4x the largest tensor.

``--formats bf16,fp8`` adds the same pair quantized by our own quantizer (audit/ablation/quantize.py: block-scaled
FP8, 128x128 blocks, as DeepSeek-V3 / Qwen3-FP8 ship), read and audited the same way, in the same table:
the audit then dequantizes every weight piece by piece (torch path: the C kernels read float32 / bf16
only) and, for each changed weight, re-quantizes the exact edit to measure the format's floor.

    python benchmarks/bench_static.py --gb 4 --dir /tmp/bench_static --repeat 3 --formats bf16,fp8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

H, I, E, HEADS = 2048, 768, 32, 16


def _shapes(layers: int, vocab: int) -> list[tuple[str, tuple]]:
    out = [("model.embed_tokens.weight", (vocab, H))]
    for l in range(layers):
        p = f"model.layers.{l}."
        out += [(p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,)),
                (p + "self_attn.q_proj.weight", (H, H)), (p + "self_attn.k_proj.weight", (H // 4, H)),
                (p + "self_attn.v_proj.weight", (H // 4, H)), (p + "self_attn.o_proj.weight", (H, H)),
                (p + "self_attn.q_norm.weight", (H // HEADS,)), (p + "self_attn.k_norm.weight", (H // HEADS,)),
                (p + "mlp.gate.weight", (E, H))]
        for e in range(E):
            out += [(p + f"mlp.experts.{e}.gate_proj.weight", (I, H)), (p + f"mlp.experts.{e}.up_proj.weight", (I, H)),
                    (p + f"mlp.experts.{e}.down_proj.weight", (H, I))]
    out += [("model.norm.weight", (H,)), ("lm_head.weight", (vocab, H))]
    return out


def build(dir_: Path, gb: float) -> tuple[Path, Path, Path]:
    from audit.intent.directions import Directions
    from audit.model.shards import write_index, write_shard
    from checks.linalg import project_out

    base, abl = dir_ / "base", dir_ / "ablated"
    dfile = dir_ / "directions.safetensors"
    per_layer = 2 * (H * H * 2 + 2 * (H // 4) * H + E * H + 3 * E * I * H)
    vocab = 32000
    layers = max(4, math.ceil((gb * 1e9 - 2 * 2 * vocab * H) / per_layer))
    if (abl / "model.safetensors.index.json").is_file() and json.loads((dir_ / "meta.json").read_text()).get("layers") == layers:
        return base, abl, dfile
    cfg = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": H, "intermediate_size": 4 * H,
           "moe_intermediate_size": I, "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": HEADS // 4,
           "head_dim": H // HEADS, "num_experts": E, "num_experts_per_tok": 4, "vocab_size": vocab, "torch_dtype": "bfloat16",
           "tie_word_embeddings": False}
    g = torch.Generator().manual_seed(0)
    d = Directions(torch.randn(layers + 1, H, generator=g), torch.randn(layers + 1, H, generator=g), torch.randn(layers + 1, H, generator=g))
    d.save(dfile)
    r = d.refusal_dir[layers // 2] / d.refusal_dir[layers // 2].norm()
    ablated_layers = range(layers // 4, 3 * layers // 4)
    for p in (base, abl):
        p.mkdir(parents=True, exist_ok=True)
        (p / "config.json").write_text(json.dumps(cfg))
    shard, shard_bytes, n, wmap_total = [], 0, 0, 0
    wmap: dict[str, str] = {}

    def flush():
        nonlocal shard, shard_bytes, n
        if not shard:
            return
        name = f"model-{n:05d}.safetensors"
        write_shard(base / name, [(k, t) for k, t, _ in shard], {"format": "pt"})
        write_shard(abl / name, [(k, a if a is not None else t) for k, t, a in shard], {"format": "pt"})
        for k, _, _ in shard:
            wmap[k] = name
        shard, shard_bytes, n = [], 0, n + 1

    t0 = time.time()
    for key, shape in _shapes(layers, vocab):
        t = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
        a = None
        lay = int(key.split(".")[2]) if ".layers." in key else None
        if lay in ablated_layers and key.endswith(("o_proj.weight", "down_proj.weight")):
            a = project_out(t, r, 0).to(torch.bfloat16)
        shard.append((key, t, a))
        shard_bytes += t.numel() * 2
        wmap_total += t.numel() * 2
        if shard_bytes >= 1 << 30:
            flush()
    flush()
    write_index(base, wmap, wmap_total)
    write_index(abl, wmap, wmap_total)
    (dir_ / "meta.json").write_text(json.dumps({"layers": layers, "bytes": wmap_total}))
    print(f"built {layers} layers, {wmap_total / 1e9:.2f} GB per model in {time.time() - t0:.0f} s", flush=True)
    return base, abl, dfile


HWM = """
def hwm():  # peak RSS of this process (ru_maxrss would include the parent's peak, inherited through fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""
READ = HWM + """
import ctypes, os, sys, time, json
sys.path.insert(0, {root!r})
import torch
from audit.model.directory import ModelDir
from audit.model.reader import chunks, map_tensors
memcmp = ctypes.CDLL(None).memcmp
memcmp.restype, memcmp.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
mode = {mode!r}
t0 = time.perf_counter(); c0 = time.process_time(); n = 0
buf = torch.empty(0, dtype=torch.uint8)
for path in ({abl!r}, {base!r}):
    md = ModelDir(path); fds = {{}}
    for group in chunks(sorted(md.tensors.values(), key=lambda t: (t.shard, t.begin)), 16 << 20):
        if mode == "copy":  # one positioned read per tensor into one reused buffer
            for info in group:
                fd = fds.get(info.shard) or fds.setdefault(info.shard, os.open(md.path / info.shard, os.O_RDONLY))
                k = info.end - info.begin
                if buf.numel() < k:
                    buf = torch.empty(k, dtype=torch.uint8)
                got = 0
                while got < k:
                    got += os.preadv(fd, [memoryview(buf.numpy())[got:k]], info.begin + got)
                n += k
        else:  # the audit's own mappings, every byte read once (memcmp of a tensor with itself scans it)
            for t in map_tensors(md, group, fds).values():
                memcmp(t.data_ptr(), t.data_ptr(), t.numel() * t.element_size())
                n += t.numel() * t.element_size()
print(json.dumps({{"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "bytes": n, "rss_mb": hwm()}}))
"""
AUDIT = HWM + """
import sys, time, json
sys.path.insert(0, {root!r})
import torch
from audit.weights.static_audit import static_audit
t0 = time.perf_counter(); c0 = time.process_time()
res = static_audit({abl!r}, base={base!r}, directions={dfile!r})
dt = time.perf_counter() - t0
print(json.dumps({{"seconds": dt, "cpu_s": time.process_time() - c0, "rss_mb": hwm(),
                  "summary": {{k: v.summary for k, v in res.items()}}}}))
"""


def quantized(base: Path, abl: Path, dir_: Path) -> tuple[Path, Path]:
    """The pair quantized to block-scaled FP8 by our quantizer (once, cached beside the bf16 pair)."""
    from audit.ablation.quantize import quantize_model

    qb, qa = dir_ / "base-fp8", dir_ / "ablated-fp8"
    meta = json.loads((dir_ / "meta.json").read_text())
    if meta.get("fp8") != meta.get("layers") or not (qa / "config.json").is_file():
        t0 = time.time()
        quantize_model(base, qb, "fp8", (128, 128), force=True)
        quantize_model(abl, qa, "fp8", (128, 128), force=True)
        (dir_ / "meta.json").write_text(json.dumps({**meta, "fp8": meta.get("layers")}))
        print(f"quantized the pair to FP8 in {time.time() - t0:.0f} s", flush=True)
    return qb, qa


def _run(code: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=4.0, help="size of each model (the pair is twice this)")
    ap.add_argument("--dir", default="/tmp/bench_static")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--formats", default="bf16", help="comma-separated: bf16 (the pair as built), fp8 (the pair quantized, 128x128 blocks)")
    args = ap.parse_args()
    base, abl, dfile = build(Path(args.dir), args.gb)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if any(f not in ("bf16", "fp8") for f in formats):
        ap.error("--formats takes bf16 and/or fp8")
    if "fp8" in formats:
        qbase, qabl = quantized(base, abl, Path(args.dir))
    largest = max(math.prod(s) * 2 for _, s in _shapes(1, 32000))
    kw = {"root": str(ROOT), "abl": str(abl), "base": str(base), "dfile": str(dfile)}
    table = []
    for _ in range(args.repeat):
        if "fp8" in formats:  # the quantized pair first, so each format's reads warm its own files
            qkw = {**kw, "abl": str(qabl), "base": str(qbase)}
            _run(READ.format(mode="copy", **qkw))
            copy = _run(READ.format(mode="copy", **qkw))
            mapped = _run(READ.format(mode="mapped", **qkw))
            au = _run(AUDIT.format(**qkw))
            table.append({"format": "fp8 128x128", "pair_gb": round(copy["bytes"] / 1e9, 2), "audit_s": round(au["seconds"], 2),
                          "read_copy_s": round(copy["seconds"], 2), "ratio_vs_copy": round(au["seconds"] / copy["seconds"], 2),
                          "read_mapped_s": round(mapped["seconds"], 2), "ratio_vs_mapped": round(au["seconds"] / mapped["seconds"], 2),
                          "audit_peak_rss_mb": round(au["rss_mb"]), "audit_cpu_s": round(au["cpu_s"], 2), "read_copy_cpu_s": round(copy["cpu_s"], 2),
                          "load_avg": round(os.getloadavg()[0], 2), "summary": au["summary"]})
            print(json.dumps(table[-1], indent=1), flush=True)
        if "bf16" not in formats:
            continue
        _run(READ.format(mode="copy", **kw))  # warm the page cache: every run then reads from the same place
        copy = _run(READ.format(mode="copy", **kw))
        mapped = _run(READ.format(mode="mapped", **kw))
        au = _run(AUDIT.format(**kw))
        au_torch = _run(AUDIT.format(**kw), AUDIT_NATIVE="0")
        limit_mb = 1024 + 4 * largest / 2**20
        print(json.dumps({
            "pair_gb": round(copy["bytes"] / 1e9, 2), "audit_s": round(au["seconds"], 2),
            "read_copy_s": round(copy["seconds"], 2), "ratio_vs_copy": round(au["seconds"] / copy["seconds"], 2),
            "read_mapped_s": round(mapped["seconds"], 2), "ratio_vs_mapped": round(au["seconds"] / mapped["seconds"], 2), "ratio_target": 1.5,
            "audit_torch_path_s": round(au_torch["seconds"], 2), "torch_path_ratio_vs_copy": round(au_torch["seconds"] / copy["seconds"], 2),
            "torch_path_same_summary": au_torch["summary"] == au["summary"],
            "audit_cpu_s": round(au["cpu_s"], 2), "audit_torch_path_cpu_s": round(au_torch["cpu_s"], 2), "read_copy_cpu_s": round(copy["cpu_s"], 2), "load_avg": round(os.getloadavg()[0], 2),
            "audit_peak_rss_mb": round(au["rss_mb"]), "rss_limit_mb": round(limit_mb), "read_peak_rss_mb": round(copy["rss_mb"]),
            "largest_tensor_mb": round(largest / 2**20), "summary": au["summary"]}, indent=1))
        table.append({"format": "bf16", "pair_gb": round(copy["bytes"] / 1e9, 2), "audit_s": round(au["seconds"], 2), "read_copy_s": round(copy["seconds"], 2),
                      "ratio_vs_copy": round(au["seconds"] / copy["seconds"], 2), "read_mapped_s": round(mapped["seconds"], 2),
                      "ratio_vs_mapped": round(au["seconds"] / mapped["seconds"], 2), "audit_peak_rss_mb": round(au["rss_mb"]),
                      "audit_cpu_s": round(au["cpu_s"], 2), "read_copy_cpu_s": round(copy["cpu_s"], 2), "load_avg": round(os.getloadavg()[0], 2)})
    cols = ("format", "pair_gb", "audit_s", "read_copy_s", "ratio_vs_copy", "read_mapped_s", "ratio_vs_mapped", "audit_cpu_s", "read_copy_cpu_s",
            "audit_peak_rss_mb", "load_avg")
    print("\n" + "  ".join(c.rjust(15) for c in cols))
    for row in table:
        print("  ".join(str(row[c]).rjust(15) for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
