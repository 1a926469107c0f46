"""Evaluation throughput: LocalBackend.complete vs plain batched model.generate vs heretic's evaluator, in one run.

All three generate greedily, ``--new`` tokens at most, batch ``--batch``, on the same chat
messages (heretic's default system prompt plus a user prompt) with the same tiny model. The
ratios (plain time / ours, heretic time / ours; > 1 means ours is faster) are what to compare
across machines. heretic (PyPI heretic-llm) is optional: give a Python that has it
(``--heretic-python``, default this one) or it is reported as not run, with the reason.

    python benchmarks/bench_generate.py [--family llama] [--prompts 64] [--new 64] [--batch 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

SYSTEM = "You are a helpful assistant."
SEEDS = ["How do I make a cake", "Write a poem about the river", "Explain how a bridge is built", "Tell me how to pick a lock",
         "List the planets in order", "Write a story about a robot", "How do I fix a bicycle tire", "Describe the weather today"]


def prompts(n: int) -> list[str]:
    return [f"{SEEDS[i % len(SEEDS)]} (variant {i}){' please' * (i % 5)}?" for i in range(n)]


def plain_generate(model, tok, users: list[str], new: int, batch: int) -> int:
    """The baseline: chat template, left padding, model.generate per batch, decode. Returns generated tokens."""
    n = 0
    for s in range(0, len(users), batch):
        chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": u}] for u in users[s:s + batch]]
        texts = tok.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
        gen = out[:, enc["input_ids"].shape[1]:]
        tok.batch_decode(gen, skip_special_tokens=True)
        n += int((gen != tok.pad_token_id).sum())
    return n


def ours(model, tok, users: list[str], new: int, batch: int) -> int:
    from audit.forward.generate import LocalBackend

    msgs = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": u}] for u in users]
    return sum(c.n_tokens for c in LocalBackend(model, tok).complete(msgs, max_new_tokens=new, batch_size=batch))


HERETIC = r"""
import json, os, sys, time
sys.argv = sys.argv[:1]  # heretic's Settings parses the command line
path, new, batch, repeat, threads = json.loads(os.environ["BENCH_ARGS"])
import torch
if threads: torch.set_num_threads(threads)
from heretic.config import Settings
from heretic.model import Model
from heretic.utils import Prompt
users = json.loads(os.environ["BENCH_PROMPTS"])
m = Model(Settings(model=path, dtypes=["float32"], device_map="cpu", batch_size=batch, max_response_length=new))
ps = [Prompt(system=os.environ["BENCH_SYSTEM"], user=u) for u in users]
m.get_responses_batched(ps[:batch], skip_special_tokens=True)  # warm-up
best = 1e9
for _ in range(repeat):
    t = time.perf_counter(); m.get_responses_batched(ps, skip_special_tokens=True); best = min(best, time.perf_counter() - t)
print("BENCH_RESULT", json.dumps({"seconds": best}))
"""


def run_heretic(python: str, path: Path, users: list[str], new: int, batch: int, repeat: int, threads: int | None) -> dict:
    env = {**os.environ, "BENCH_ARGS": json.dumps([str(path), new, batch, repeat, threads]), "BENCH_PROMPTS": json.dumps(users),
           "BENCH_SYSTEM": SYSTEM}
    try:
        r = subprocess.run([python, "-c", HERETIC], capture_output=True, text=True, env=env, timeout=1800, cwd=tempfile.gettempdir())
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"available": False, "why": f"{type(e).__name__}: {e}"}
    for line in r.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return {"available": True, **json.loads(line.split(" ", 1)[1])}
    tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
    return {"available": False, "why": " | ".join(tail) or f"exit {r.returncode}"}


def interleaved(fns: dict, repeat: int) -> dict:
    """Best wall time of each fn over ``repeat`` rounds, the fns alternating within a round (fair under load drift)."""
    best = {k: (float("inf"), 0) for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            n = fn()
            dt = time.perf_counter() - t
            if dt < best[k][0]:
                best[k] = (dt, n)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="llama")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--heretic-python", default=sys.executable, help="a Python with heretic-llm installed")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from audit.model.directory import ModelDir
    from audit.organisms.tiny import build_tiny, tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny(a.family, Path(tmp) / a.family, tiny_tokenizer(), hidden_size=64)
        md = ModelDir(path)
        model, tok = md.load_model(torch.float32), md.tokenizer()
        users = prompts(a.prompts)
        plain_generate(model, tok, users[: a.batch], a.new, a.batch)  # warm-up
        b = interleaved({"plain": lambda: plain_generate(model, tok, users, a.new, a.batch),
                         "ours": lambda: ours(model, tok, users, a.new, a.batch)}, a.repeat)
        (t_plain, n_plain), (t_ours, n_ours) = b["plain"], b["ours"]
        her = run_heretic(a.heretic_python, path, users, a.new, a.batch, a.repeat, a.threads)
    res = {"device": "cpu", "threads": torch.get_num_threads(), "family": a.family, "prompts": a.prompts, "max_new_tokens": a.new,
           "batch": a.batch, "plain_generate_s": round(t_plain, 3), "ours_s": round(t_ours, 3), "tokens_plain": n_plain, "tokens_ours": n_ours,
           "throughput_ratio_vs_plain": round(t_plain / t_ours, 3)}
    if her.get("available"):
        res.update(heretic_s=round(her["seconds"], 3), throughput_ratio_vs_heretic=round(her["seconds"] / t_ours, 3))
    else:
        res["heretic"] = f"not run: {her['why']}"
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
