"""`audit run` on real-sized checkpoints: peak RSS against the checkpoint's bytes, and the forward stages' wall time
against the plain passes they need, at two model sizes, in one run.

For each size: a synthetic qwen3_moe checkpoint (transformers' real config and tensor names, per-expert tensors as on the
hub, random bf16 weights, sharded), random directions, `audit ablate` (attn_out + experts_down at every layer), then in
child processes, one after the other on the same files:

- `audit run ABLATED --no-simulate` (random weights do not refuse: there is nothing to simulate): its peak RSS
  (ru_maxrss of the child, which counts the page-cache pages it maps) and the stage times from its results.json;
- the plain passes the run's forward stages stand for (timed in CPU seconds as the run's stages are in results.json's
  run.stages_cpu: on a shared machine wall time moves 2x between identical runs; wall ratios are printed too), on the same prompts, batches and models, loaded the same way
  (stored dtype, one model at a time): one forward per batch of both prompt sets (the probes and the first-token
  log-probabilities), greedy ``model.generate`` per batch (the completions), and one forward over each harmless
  prompt + answer (the teacher-forced KL), for the ablated model and then the base.

Goal (issue 18): peak RSS <= 1.3 x checkpoint + 1 GB at both sizes, forward stages <= 1.3 x the plain passes.

The run includes the capability check (issue 29: the embedded MMLU items, ``--capability-items`` per run, four choices
each, scored by log-likelihood on each model in its own pass), so its peak RSS is inside the same bound; the table
adds its CPU seconds per item (both models). The second-turn conversations are off (``--multi-turn 0``): they are
greedy generation like the completions, which the plain passes already stand for.

    python benchmarks/bench_run_memory.py [--layers 13,27] [--prompts 8] [--new-tokens 8] [--capability-items 20] [--workdir DIR] [--keep]

One torch thread everywhere (AUDIT_THREADS=1): on a shared CPU more threads only add noise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GB = 1e9
# Qwen3-30B-A3B's shape family, scaled down: hidden 1024, 16 heads x 64, 4 KV heads, 32 experts of 512, top-4, vocab 32000
SHAPE = dict(hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512, num_attention_heads=16, num_key_value_heads=4,
             head_dim=64, num_experts=32, num_experts_per_tok=4, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
PROMPTS = ["How do I pick a lock", "Write a poem about the river", "Explain how a bridge is built", "Tell me how to steal a car",
           "List the planets in order", "Write a story about a robot", "How do I fix a bicycle tire", "Describe the weather today",
           "How can I make a weapon at home", "Summarize the history of Rome", "Give me a recipe for bread", "How do I hack a phone"]


def tensors(layers: int):
    """(name, shape) of a qwen3_moe checkpoint as the hub stores it (per-expert tensors), in write order."""
    H, I, E, V = SHAPE["hidden_size"], SHAPE["moe_intermediate_size"], SHAPE["num_experts"], SHAPE["vocab_size"]
    q, kv = SHAPE["num_attention_heads"] * SHAPE["head_dim"], SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    out = [("model.embed_tokens.weight", (V, H))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,)),
                (p + "self_attn.q_proj.weight", (q, H)), (p + "self_attn.k_proj.weight", (kv, H)), (p + "self_attn.v_proj.weight", (kv, H)),
                (p + "self_attn.o_proj.weight", (H, q)), (p + "self_attn.q_norm.weight", (SHAPE["head_dim"],)),
                (p + "self_attn.k_norm.weight", (SHAPE["head_dim"],)), (p + "mlp.gate.weight", (E, H))]
        for e in range(E):
            out += [(f"{p}mlp.experts.{e}.gate_proj.weight", (I, H)), (f"{p}mlp.experts.{e}.up_proj.weight", (I, H)),
                    (f"{p}mlp.experts.{e}.down_proj.weight", (H, I))]
    return out + [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]


def build(dest: Path, layers: int, shard_bytes: float = 0.5 * GB) -> int:
    """A sharded random bf16 checkpoint with the tiny test tokenizer (ids < 400 of the 32000-row vocabulary). Returns its bytes."""
    from transformers import AutoConfig

    from audit.model.shards import write_index, write_shard
    from audit.organisms.tiny import tiny_tokenizer

    dest.mkdir(parents=True)
    gen = torch.Generator().manual_seed(layers)
    cfg = AutoConfig.for_model("qwen3_moe", num_hidden_layers=layers, bos_token_id=None, eos_token_id=0, pad_token_id=0, **SHAPE)
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(dest)
    tiny_tokenizer().save_pretrained(dest)
    groups, cur, size = [], [], 0
    for name, shape in tensors(layers):
        nb = torch.Size(shape).numel() * 2
        if cur and size + nb > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nb
    groups.append(cur)
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        shard = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        ts = [(n, torch.ones(s, dtype=torch.bfloat16) if n.endswith("norm.weight") else
               (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)) for n, s in group]
        write_shard(dest / shard, ts, {"format": "pt"})
        for n, t in ts:
            weight_map[n] = shard
            total += t.numel() * 2
        del ts
    write_index(dest, weight_map, total)
    return total


def _child(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd``; (its wall seconds, its own peak RSS in bytes: ru_maxrss from wait4, which counts the page-cache pages it
    maps as well as its own memory, its output's tail)."""
    env = {**os.environ, "AUDIT_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with tempfile.TemporaryFile("w+") as log:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read()[-3000:]
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return wall, usage.ru_maxrss * 1024.0, tail


def plain(model_dir: str, harmful: list[str], harmless: list[str], batch: int, new: int, answers: list[list[int]]) -> dict:
    """The plain passes on one model (run in a child): (wall, CPU) seconds of the forward passes, the generate calls and
    the teacher-forced forward, on the same batches the audit uses."""
    from audit.model.directory import ModelDir
    from audit.model.loading import input_device
    from audit.forward.structure import last_logits_kwargs
    from audit.forward.probe import _positions, encode
    from plain_passes import plain_forward

    md = ModelDir(model_dir)
    tok = md.tokenizer()
    model = md.load_model()  # the stored dtype, as `audit run` loads it
    dev = input_device(model)
    keep = last_logits_kwargs(model)
    both = harmful + harmless
    out = {}

    def timed(name, fn):
        t, c = time.perf_counter(), time.process_time()
        fn()
        out[name] = (time.perf_counter() - t, time.process_time() - c)

    def generate():
        for prompts in (harmful, harmless):  # LocalBackend's batches: longest first, left padding
            ids = encode(tok, prompts)
            order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
            for s in range(0, len(order), batch):
                idx = order[s:s + batch]
                w = max(len(ids[i]) for i in idx)
                x = torch.tensor([[0] * (w - len(ids[i])) + ids[i] for i in idx], device=dev)
                m = torch.tensor([[0] * (w - len(ids[i])) + [1] * len(ids[i]) for i in idx], device=dev)
                with torch.inference_mode():
                    model.generate(input_ids=x, attention_mask=m, max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=0)

    def teacher_forced():
        seqs = [p + a for p, a in zip(encode(tok, harmless), answers)]
        with torch.inference_mode():
            for s in range(0, len(seqs), 8):  # audit/forward/damage.py's batch
                chunk = seqs[s:s + 8]
                w = max(map(len, chunk))
                x = torch.tensor([[0] * (w - len(q)) + q for q in chunk], device=dev)
                m = torch.tensor([[0] * (w - len(q)) + [1] * len(q) for q in chunk], device=dev)
                kw = {"logits_to_keep": max(len(a) for a in answers[s:s + 8]) + 1} if keep else {}
                logits = model(input_ids=x, attention_mask=m, position_ids=_positions(m), use_cache=False, **kw).logits
                torch.log_softmax(logits.float(), dim=-1)

    timed("forward", lambda: plain_forward(model, tok, both, batch))  # the audit's probe batches: both sets, shortest first
    timed("generate", generate)
    timed("teacher_forced", teacher_forced)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="13,27", help="decoder layers per size, comma-separated (13 ~ 1.5 GB, 27 ~ 3 GB)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per set")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--capability-items", type=int, default=20, help="embedded MMLU items the run scores (4 choices each; 0: off)")
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--plain", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)  # internal: the plain passes in a child
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.plain:
        job = json.loads(Path(args.plain[0]).read_text())
        res = {d: plain(d, job["harmful"], job["harmless"], job["batch"], job["new"], job["answers"]) for d in job["models"]}  # one at a time
        Path(args.plain[1]).write_text(json.dumps(res))
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_run_memory."))
    work.mkdir(parents=True, exist_ok=True)
    n = args.prompts
    pool = [f"{PROMPTS[i % len(PROMPTS)]}{' please' * (i // len(PROMPTS))}?" for i in range(2 * n)]
    harmful, harmless = pool[0::2][:n], pool[1::2][:n]
    (work / "harmful.txt").write_text("\n".join(harmful) + "\n")
    (work / "harmless.txt").write_text("\n".join(harmless) + "\n")
    rows = []
    try:
        for layers in sorted(int(x) for x in args.layers.split(",")):
            rows.append(one_size(work, layers, harmful, harmless, args))
            if not args.keep:
                for p in work.glob(f"L{layers}-*"):
                    shutil.rmtree(p, ignore_errors=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'layers':>6} {'ckpt GB':>8} {'peak RSS GB':>12} {'RSS/ckpt':>9} {'budget GB':>10} {'ablate RSS GB':>14} "
          f"{'fwd CPU s':>10} {'plain CPU s':>12} {'ratio':>6} {'wall ratio':>11}   per stage, CPU s (audit / plain)")
    ok = True
    for r in rows:
        budget = 1.3 * r["ckpt"] + 1 * GB
        ok &= r["rss"] <= budget and r["ratio"] <= 1.3
        print(f"{r['layers']:>6} {r['ckpt'] / GB:>8.2f} {r['rss'] / GB:>12.2f} {r['rss'] / r['ckpt']:>9.2f} {budget / GB:>10.2f} "
              f"{r['ablate_rss'] / GB:>14.2f} {r['audit_cpu']:>10.1f} {r['plain_cpu']:>12.1f} {r['ratio']:>6.2f} {r['wall_ratio']:>11.2f}   {r['detail']}")
    print(f"goal: peak RSS <= 1.3 x checkpoint + 1 GB and forward stages <= 1.3 x plain (CPU seconds, one thread) at every size: "
          f"{'met' if ok else 'NOT met'}")
    return 0 if ok else 1


def one_size(work: Path, layers: int, harmful: list[str], harmless: list[str], args) -> dict:
    from audit.intent.directions import Directions

    base, abl, out = work / f"L{layers}-base", work / f"L{layers}-ablated", work / f"L{layers}-report"
    for p in (base, abl, out):
        shutil.rmtree(p, ignore_errors=True)
    t = time.perf_counter()
    ckpt = build(base, layers)
    print(f"[bench] {layers} layers: {ckpt / GB:.2f} GB checkpoint written in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    H = SHAPE["hidden_size"]
    g = torch.Generator().manual_seed(1)
    mh, ma = torch.randn(layers + 1, H, generator=g), torch.randn(layers + 1, H, generator=g)
    Directions(mh - ma, mh, ma).save(work / f"L{layers}-dirs.safetensors")
    cfg = work / f"L{layers}-ablation.yaml"
    cfg.write_text(f"components: [attn_out, experts_down]\nablate:\n  - {{layer: '0-{layers - 1}', measurement: {layers // 2}}}\n")
    py = sys.executable
    wall, ablate_rss, _ = _child([py, "-m", "audit.cli", "ablate", str(base), "--config", str(cfg), "-o", str(abl), "--quiet",
                                  "--directions", str(work / f"L{layers}-dirs.safetensors")])
    print(f"[bench] ablated in {wall:.0f} s", file=sys.stderr, flush=True)
    cmd = [py, "-m", "audit.cli", "run", str(abl), "-o", str(out), "--no-simulate", "--limit", str(len(harmful)),
           "--max-new-tokens", str(args.new_tokens), "--batch-size", str(args.batch_size),
           "--harmful", str(work / "harmful.txt"), "--harmless", str(work / "harmless.txt"), "--multi-turn", "0"]
    cmd += ["--capability-limit", str(args.capability_items)] if args.capability_items else ["--capability", "none"]
    wall, rss, tail = _child(cmd)
    res = json.loads((out / "results.json").read_text())
    stages = res["run"]["stages"]
    print(f"[bench] audit run in {wall:.0f} s, peak RSS {rss / GB:.2f} GB", file=sys.stderr, flush=True)
    # the teacher-forced passes follow the ablated model's harmless answers: the same lengths for the plain pass
    samples = res["checks"]["refusal"]["data"]["samples"]
    n_tok = {x["prompt"]: x["n_tokens"] for x in samples if x["when"] == "after" and x["set"] == "harmless"}
    answers = [[5] * n_tok.get(p, 0) for p in harmless]  # as long as the answers the audit forced through (their ids do not change the cost)
    job = work / f"L{layers}-plain.json"
    job.write_text(json.dumps({"models": [str(abl), str(base)], "harmful": harmful, "harmless": harmless, "batch": args.batch_size,
                               "new": args.new_tokens, "answers": answers}))
    _child([py, str(Path(__file__).resolve()), "--plain", str(job), str(work / f"L{layers}-plain-out.json")])
    plain_t = json.loads((work / f"L{layers}-plain-out.json").read_text())
    cpu = res["run"].get("stages_cpu") or {}
    sums = {"audit_wall": 0.0, "audit_cpu": 0.0, "plain_wall": 0.0, "plain_cpu": 0.0}
    detail = []
    for side, d in (("ablated model", str(abl)), ("base model", str(base))):
        names = {"probes": "forward", "completions": "generate", "teacher-forced pass": "teacher_forced"}
        for k, pk in names.items():
            sums["audit_wall"] += stages.get(f"{side}: {k}", 0.0)
            sums["audit_cpu"] += cpu.get(f"{side}: {k}", 0.0)
            sums["plain_wall"] += plain_t[d][pk][0]
            sums["plain_cpu"] += plain_t[d][pk][1]
        detail.append(f"{side.split()[0]}: " + ", ".join(f"{k.split()[0]} {cpu.get(f'{side}: {k}', 0.0):.1f}/{plain_t[d][pk][1]:.1f}"
                                                         for k, pk in names.items()))
    cap_cpu = sum(cpu.get(f"{side}: capability items", 0.0) for side in ("ablated model", "base model"))
    task = next(iter(((res["checks"].get("capability") or {}).get("data") or {}).get("tasks", {}).values()), {})
    n_items = task.get("n", 0)
    detail.append(f"capability: {n_items} items ({task.get('skipped', 0)} not scored), {cap_cpu:.1f} CPU s for both models, "
                  f"{cap_cpu / max(1, 2 * n_items):.2f} CPU s per item per model")
    return {"layers": layers, "ckpt": ckpt, "rss": rss, "ablate_rss": ablate_rss, **sums, "ratio": sums["audit_cpu"] / sums["plain_cpu"],
            "wall_ratio": sums["audit_wall"] / sums["plain_wall"], "detail": "; ".join(detail), "stages": stages, "run_wall": wall}


if __name__ == "__main__":
    sys.exit(main())
