"""The inputs of `audit run`, found and checked before the long work: prompt files beside the models, the tokenizer both
sides share, each model loaded in its stored dtype and placement (one at a time, released before the next), and the servers."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from audit.forward.capability import trim_heap
from audit.forward.generate import ServerBackend
from audit.forward.probe import encode
from audit.intent.manifest import load_manifest
from audit.intent.config import resolve_measurements
from audit.model.directory import ModelDir
from audit.model.gguf_file import GGUFModel, is_gguf
from audit.model.hashes import input_entries
from audit.model.loading import placement
from audit.model.prompts import default_path, encode_prompts
from audit.pipeline.options import RunContext, RunOptions
from checks.errors import AuditError


def open_models(opts: RunOptions):
    """(ablated model, base, manifest, intent folder): the ablated model is a model directory, or a GGUF file read against its
    base; the manifest that states the intent is the directory's own, or with --against the source's (it names the base)."""
    gguf = is_gguf(opts.model_dir)
    if opts.against is not None and not gguf:
        raise AuditError(f"--against compares a GGUF file with the safetensors model it was converted from; {opts.model_dir} is not a .gguf file")
    abl = None if gguf else ModelDir(opts.model_dir)
    intent_dir = Path(opts.against) if opts.against is not None else None if gguf else abl.path
    manifest = load_manifest(intent_dir) if intent_dir is not None else None
    base_path = opts.base or (manifest or {}).get("base", {}).get("path")
    if base_path is None:
        where = opts.model_dir if intent_dir is None else intent_dir
        raise AuditError(f"{where}: no ablation-manifest.json names its base; pass --base BASE (the model it was ablated from)"
                         + (" or --against the safetensors ablation it was converted from" if gguf and opts.against is None else ""))
    base = ModelDir(base_path)
    if gguf:
        abl = GGUFModel(opts.model_dir, base)
    return abl, base, manifest, intent_dir


def run_inputs(opts: RunOptions, abl, base, intent_dir, harmful_src, harmless_src, gate_source: str, config=None) -> list:
    """(role, root, name) of every file the run reads: both models (and --against's source), the config and its measurements,
    the directions, the prompt files (the embedded ones too), and the gate file (audit/model/hashes.py hashes them)."""
    out = input_entries("model", abl) + input_entries("base", base)
    if opts.against is not None:
        out += input_entries("source", ModelDir(intent_dir))
    out += input_entries("config", opts.config) + input_entries("directions", opts.directions)
    if config is not None and resolve_measurements(config) is not None:
        out += input_entries("directions", resolve_measurements(config))
    near = [p for p in (abl.path, base.path, intent_dir) if p is not None and Path(p).is_dir()]
    for kind, src in (("harmful", harmful_src), ("harmless", harmless_src)):
        out += input_entries(f"prompts:{kind}", src if src is not None else default_path(kind))
        out += input_entries(f"prompts:train_{kind}", train_source(opts.__dict__.get(kind), kind, near))
    if gate_source != "defaults":
        out += input_entries("gate", opts.gate or "pyproject.toml")
    return out


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
    trim_heap()  # freed CPU heap back to the system too: glibc keeps it, and the next model would load on top of it
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
