"""Probe overhead: wall time of `probe` vs plain forward passes over the same prompts, batches and model.

Target (issue 7): probe <= 1.15x plain forward. Both are timed in the same run, interleaved, best of
``--repeats`` (the minimum is the least disturbed by other work on the machine).

    python benchmarks/bench_probe.py [--family glm4_moe | --organism] [--prompts 64] [--repeats 5] [--threads 1]

``--organism`` times the cached demo organism (``audit.organisms.build.cached_organism()``, eager experts, bf16 on
disk loaded as float32) on its own harmful + harmless prompts instead of a random tiny model. One torch
thread by default: on a shared CPU, more threads spin at barriers and the numbers stop meaning anything.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from audit.forward.probe import probe
from plain_passes import plain_forward  # noqa: E402
from audit.organisms.tiny import build_tiny, tiny_corpus, tiny_tokenizer

# A mid-sized MoE (hidden 256, 16 experts top-4 for GLM) so that matmuls, not Python, dominate a forward.
SIZES = {
    "glm4_moe": dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=32, intermediate_size=512,
                     moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2),
    "mixtral": dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, intermediate_size=256, num_local_experts=8),
    "qwen3_moe": dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=32, intermediate_size=512,
                      moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="glm4_moe", choices=sorted(SIZES))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--organism", action="store_true", help="time the cached demo organism instead of a tiny random model")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, for stable numbers)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    if args.organism:
        from audit.organisms.build import cached_organism, load_organism, read_prompts

        path = cached_organism()
        model, tok, meta = load_organism(path)
        model = model.to(args.device)
        args.family = f"organism {meta['family']}/{meta['variant']}"
        pool = read_prompts(path, "harmful") + read_prompts(path, "harmless")
        prompts = [pool[i % len(pool)] for i in range(args.prompts)]
    else:
        tok = tiny_tokenizer()
        with tempfile.TemporaryDirectory() as tmp:
            path = build_tiny(args.family, Path(tmp) / args.family, tok, **SIZES[args.family])
            model = AutoModelForCausalLM.from_pretrained(path).to(args.device).eval()
        prompts = [f"{s} and then {t}" for s, t in zip(tiny_corpus(args.prompts), reversed(tiny_corpus(args.prompts)))]
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    plain_forward(model, tok, prompts[: args.batch_size], args.batch_size)  # warm-up
    probe(model, tok, prompts[: args.batch_size], r, args.batch_size)
    plain, probed = [], []
    for _ in range(args.repeats):
        sync(); t = time.perf_counter(); plain_forward(model, tok, prompts, args.batch_size); sync(); plain.append(time.perf_counter() - t)
        sync(); t = time.perf_counter(); probe(model, tok, prompts, r, args.batch_size); sync(); probed.append(time.perf_counter() - t)
    ratio = min(probed) / min(plain)
    print(f"{args.family} on {args.device} ({torch.get_num_threads()} thread(s)): {args.prompts} prompts, batch {args.batch_size}: plain forward {min(plain):.3f}s, "
          f"probe {min(probed):.3f}s, ratio {ratio:.2f} (target <= 1.15)")
    return 0 if ratio <= 1.15 else 1


if __name__ == "__main__":
    sys.exit(main())
