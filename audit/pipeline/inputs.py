"""The inputs of `audit run`, found and checked before the long work: prompt files beside the models, the tokenizer both
sides share, each model loaded in its stored dtype and placement (one at a time, released before the next), and the servers."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from audit.forward.generate import ServerBackend
from audit.forward.probe import encode
from audit.model.loading import placement
from audit.model.prompts import encode_prompts
from audit.pipeline.options import RunContext, RunOptions
from checks.errors import AuditError


def prompt_source(explicit: str | None, kind: str, dirs: list[Path]) -> str | None:
    """--harmful/--harmless win; else a model directory may ship its evaluation prompts as prompts/{kind}.txt."""
    if explicit:
        return explicit
    for d in dirs:
        p = d / "prompts" / f"{kind}.txt"
        if p.is_file():
            return str(p)
    return None


def train_source(explicit: str | None, kind: str, dirs: list[Path]) -> str | None:
    for d in dirs:
        p = d / "prompts" / f"train_{kind}.txt"
        if p.is_file() and not explicit:
            return str(p)
    return explicit


def load_model(md, opts: RunOptions, ctx: RunContext | None = None, inputs=()):
    """One model, in the stored dtype unless --dtype says otherwise, placed by --device (auto: accelerate's device map,
    bounded by --max-memory, disk offload in a temporary folder of ours that goes with the model)."""
    model = md.load_model(dtype=opts.dtype, device=opts.device, max_memory=opts.max_memory, offload_folder=offload_parent(opts),
                          inputs=inputs)
    if ctx is not None:
        ctx.placement[str(md.path)] = {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "devices": placement(model)}
    return model


def offload_parent(opts: RunOptions) -> str | None:
    """Where accelerate's disk offload goes (only with --device auto): --offload-folder, else beside the output folder."""
    if opts.device != "auto" or opts.offload_folder:
        return opts.offload_folder
    parent = Path(opts.out).absolute().parent
    while not parent.is_dir() and parent != parent.parent:  # never create a folder for it (an applied fix's -o does not exist yet)
        parent = parent.parent
    return str(parent)


def release() -> None:
    """Give a released model's memory back before the next one loads (and its offload folder, by its finalizer)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def same_tokenizer(abl, base, tok, prompts: list) -> None:
    """The ablated model formats and tokenizes the audit's prompts as its base does (one tokenizer, the base's, serves both
    sides of the audit); an ablation never changes them, so a difference is the wrong pair of directories or a damaged copy."""
    if not any((abl.path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return  # nothing of its own: the base's is the only one there is
    theirs = abl.tokenizer()
    if len(theirs) != len(tok):
        raise AuditError(f"{abl.path}: its tokenizer has {len(theirs)} tokens, its base's ({base.path}) {len(tok)}; an ablation does not change "
                         "the tokenizer -- copy the base's tokenizer files into it, or pass the right --base")
    for prompt, a, b in zip(prompts, encode_prompts(theirs, prompts), encode_prompts(tok, prompts)):
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise AuditError(f"{abl.path}: its tokenizer or chat template formats prompts differently from its base's ({base.path}): prompt "
                             f"{prompt[:60]!r} is {len(a)} tokens there and {len(b)} in the base, first difference at token {at}; an "
                             "ablation does not change them -- copy the base's tokenizer files and chat template into it, or pass the right --base")


def open_servers(opts: RunOptions, abl, base, tok, prompts: list) -> dict:
    """The OpenAI-compatible servers that generate for the ablated model (--server) and the base (--base-server), each
    checked before any model is loaded: reachable, serving that name, room for the prompts, the same chat template."""
    out = {}
    spec = (("abl", opts.server, opts.served_model, abl, "--server", "--served-model"),
            ("base", opts.base_server, opts.served_base_model, base, "--base-server", "--served-base-model"))
    ids = None
    for side, url, name, md, flag, name_flag in spec:
        if url is None:
            if name is not None:
                raise AuditError(f"{name_flag} {name!r} names a served model, but no {flag} URL was given")
            continue
        be = ServerBackend(url, name or str(md.path), tokenizer=tok, timeout=opts.server_timeout, flag=flag, name_flag=name_flag)
        ids = encode(tok, prompts) if ids is None else ids
        be.check_prompts(prompts, ids, opts.max_new_tokens)
        out[side] = be
    if "abl" in out and "base" in out and out["abl"].base == out["base"].base and out["abl"].model == out["base"].model:
        raise AuditError(f"--server and --base-server both point at {out['abl'].model!r} on {out['abl'].base}: one server model cannot be "
                         "the base and the ablated model; serve both (see the README's two-server recipe)")
    return out
