"""Ablation speed and memory on a synthetic checkpoint with GLM-4.5-Air's real tensor shapes.

Builds (with write_shard, no transformers model) embeddings, one dense layer and N MoE layers of
GLM-4.5-Air (hidden 4096, 96 heads x 128, 8 KV heads, dense intermediate 10944, 128 routed experts of
intermediate 1408 stored per expert, 1 shared expert, vocab 151552), sharded like a hub checkpoint.
Then, in one run: a plain copy of the files, `audit ablate` (in a child process, so its peak RSS is
its own), a second plain copy. Prints wall-time ratio ablate / copy and peak RSS against the budget
1 GB + 4 x the largest tensor. Both copy and ablation fsync their output files inside the timing.

    python benchmarks/bench_ablate.py [--moe-layers 1] [--workdir /tmp/bench_ablate] [--all-expert-projections]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit.model.shards import write_index, write_shard  # noqa: E402

H, HEADS, HEAD_DIM, KV, DENSE_I, MOE_I, E, VOCAB = 4096, 96, 128, 8, 10944, 1408, 128, 151552
GB = 1e9


def glm_air_tensors(moe_layers: int):
    """(name, shape, dtype) of the synthetic checkpoint, in write order."""
    bf = torch.bfloat16
    out = [("model.embed_tokens.weight", (VOCAB, H), bf)]
    for layer in range(1 + moe_layers):
        p = f"model.layers.{layer}."
        out += [
            (p + "input_layernorm.weight", (H,), bf), (p + "post_attention_layernorm.weight", (H,), bf),
            (p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, H), bf), (p + "self_attn.q_proj.bias", (HEADS * HEAD_DIM,), bf),
            (p + "self_attn.k_proj.weight", (KV * HEAD_DIM, H), bf), (p + "self_attn.k_proj.bias", (KV * HEAD_DIM,), bf),
            (p + "self_attn.v_proj.weight", (KV * HEAD_DIM, H), bf), (p + "self_attn.v_proj.bias", (KV * HEAD_DIM,), bf),
            (p + "self_attn.o_proj.weight", (H, HEADS * HEAD_DIM), bf),
        ]
        if layer == 0:
            out += [(p + "mlp.gate_proj.weight", (DENSE_I, H), bf), (p + "mlp.up_proj.weight", (DENSE_I, H), bf), (p + "mlp.down_proj.weight", (H, DENSE_I), bf)]
            continue
        out += [(p + "mlp.gate.weight", (E, H), bf), (p + "mlp.gate.e_score_correction_bias", (E,), torch.float32)]
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            out += [(q + "gate_proj.weight", (MOE_I, H), bf), (q + "up_proj.weight", (MOE_I, H), bf), (q + "down_proj.weight", (H, MOE_I), bf)]
        out += [(p + f"mlp.shared_experts.{n}.weight", s, bf) for n, s in (("gate_proj", (MOE_I, H)), ("up_proj", (MOE_I, H)), ("down_proj", (H, MOE_I)))]
    out += [("model.norm.weight", (H,), bf), ("lm_head.weight", (VOCAB, H), bf)]
    return out


def build(dest: Path, moe_layers: int, shard_bytes: float = 2 * GB) -> tuple[int, int]:
    """Write the checkpoint; values are slices of one random pool (fast to make, never constant)."""
    dest.mkdir(parents=True)
    pool = (torch.randn(1 << 26) * 0.02).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)

    def fill(shape, dtype):
        n = torch.Size(shape).numel()
        if n > pool.numel() // 2:
            flat = pool.repeat(-(-n // pool.numel()))[:n]
        else:
            start = int(torch.randint(0, pool.numel() - n, (1,), generator=gen))
            flat = pool[start:start + n].clone()
        return flat.to(dtype).reshape(shape)

    specs = glm_air_tensors(moe_layers)
    groups, cur, size = [], [], 0
    for spec in specs:
        nb = torch.Size(spec[1]).numel() * spec[2].itemsize
        if cur and size + nb > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(spec)
        size += nb
    groups.append(cur)
    weight_map, total, largest = {}, 0, 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = [(n, fill(s, d)) for n, s, d in group]
        write_shard(dest / name, tensors, {"format": "pt"})
        for n, t in tensors:
            weight_map[n] = name
            total += t.numel() * t.element_size()
            largest = max(largest, t.numel() * t.element_size())
        del tensors
    write_index(dest, weight_map, total)
    config = {
        "model_type": "glm4_moe", "architectures": ["Glm4MoeForCausalLM"], "hidden_size": H, "num_attention_heads": HEADS,
        "head_dim": HEAD_DIM, "num_key_value_heads": KV, "intermediate_size": DENSE_I, "moe_intermediate_size": MOE_I,
        "n_routed_experts": E, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 1,
        "num_hidden_layers": 1 + moe_layers, "vocab_size": VOCAB, "attention_bias": True, "torch_dtype": "bfloat16",
    }
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return total, largest


def plain_copy(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    dst.mkdir()
    for f in sorted(src.iterdir()):
        shutil.copyfile(f, dst / f.name)
    _fsync_tree(dst)
    return time.perf_counter() - t0


def _fsync_tree(d: Path) -> None:
    for f in d.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


CHILD = r"""
import json, sys, time, torch
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from audit.ablation.ablate import ablate
from audit.intent.config import AblationConfig
from audit.intent.directions import Directions
base, out, comps = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4].split(",")
g = torch.Generator().manual_seed(0)
hm, am = torch.randn(3, 4096, generator=g), torch.randn(3, 4096, generator=g)
d = Directions(hm - am, hm, am)
n_layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
cfg = AblationConfig.from_dict({"ablate": [{"layer": f"0-{n_layers - 1}", "measurement": 1}], "components": comps})
t0 = time.perf_counter()
m = ablate(base, cfg, out, d, progress=False)
for f in out.iterdir():
    import os
    fd = os.open(f, os.O_RDONLY); os.fsync(fd); os.close(fd)
wall = time.perf_counter() - t0
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))  # this image's peak (ru_maxrss keeps the parent's across exec)
ratios = sorted(x["along_after"] / x["along_before"] for x in m["modified"] if x["along_before"] > 0)
print(json.dumps({"wall_s": wall, "peak_rss": hwm, "tensors_edited": len(m["modified"]),
                  "residue_median": ratios[len(ratios) // 2], "residue_max": ratios[-1], "timings": m["timings"]}))
"""


def run_ablation(repo: Path, base: Path, out: Path, comps: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(repo), str(base), str(out), ",".join(comps)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"ablation failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe-layers", type=int, default=1, help="MoE layers to build (each ~4.7 GB)")
    ap.add_argument("--workdir", default="/tmp/bench_ablate")
    ap.add_argument("--all-expert-projections", action="store_true", help="also edit every expert's gate and up (3x the edited bytes)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic model and outputs")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    free = shutil.disk_usage(work).free
    need = 3 * (2.8 + 4.7 * args.moe_layers) * GB
    if free < need:
        raise SystemExit(f"{work}: needs about {need / GB:.0f} GB free, has {free / GB:.0f} GB")
    t0 = time.perf_counter()
    total, largest = build(work / "base", args.moe_layers)
    print(f"built {total / GB:.2f} GB synthetic GLM-4.5-Air-shaped checkpoint ({1 + args.moe_layers} layers) in {time.perf_counter() - t0:.1f} s; "
          f"largest tensor {largest / GB:.2f} GB")
    comps = ["attn_out", "mlp_down", "experts_down", "shared_down"]
    if args.all_expert_projections:
        comps += ["experts_gate", "experts_up", "shared_gate", "shared_up", "router"]
    try:
        c1 = plain_copy(work / "base", work / "copy1")
        shutil.rmtree(work / "copy1")
        res = run_ablation(repo, work / "base", work / "out", comps)
        c2 = plain_copy(work / "base", work / "copy2")
        copy_s = (c1 + c2) / 2
        budget = 1 * GB + 4 * largest
        ratio = res["wall_s"] / copy_s
        print(f"components: {', '.join(comps)}")
        print(f"plain copy: {c1:.2f} s and {c2:.2f} s (mean {copy_s:.2f} s, {total / GB / copy_s:.2f} GB/s)")
        print(f"ablation:   {res['wall_s']:.2f} s, {res['tensors_edited']} tensors edited, timings {res['timings']}")
        print(f"component along r left (after/before, bf16 rounding floor): median {res['residue_median']:.3g}, max {res['residue_max']:.3g}")
        print(f"wall-time ratio ablate / copy = {ratio:.2f}  (target <= 2)  {'OK' if ratio <= 2 else 'OVER'}")
        print(f"peak RSS {res['peak_rss'] / GB:.2f} GB; budget 1 GB + 4 x {largest / GB:.2f} GB = {budget / GB:.2f} GB  "
              f"({res['peak_rss'] / budget:.2f} of budget)  {'OK' if res['peak_rss'] <= budget else 'OVER'}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
