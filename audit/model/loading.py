"""Loading a checkpoint into a model within memory: the stored dtype, accelerate placement and disk offload, reading
tensors into their own buffers, quantized checkpoints dequantized on load, and where a loaded module's weights live."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import torch

from audit.model.logical import TRANSFORMERS_FP8_SHAPES_NOTE, quant_spec, row_pieces, source, transformers_misreads
from audit.model.reader import map_tensors
from audit.outputs import remove_scratch
from checks.errors import AuditError


@contextmanager
def bounded_loading():
    """transformers' from_pretrained in about one model's worth of memory: each tensor read (pread) into its own buffer,
    and read when its conversion needs it.

    By default transformers 5 maps the shards (mmap) and keeps the tensors it loads as they are as views of the mapping,
    so every page it touched stays resident, the per-expert tensors it copies into fused ones included: 2x the
    checkpoint in RSS on a MoE model. Its thread pool also reads every tensor ahead of the conversions that consume
    them. Inside this block safetensors files are read with the pread backend (the one transformers uses on MPS and
    Windows) and loading is sequential (transformers' own HF_DEACTIVATE_ASYNC_LOAD); both are put back on exit.
    benchmarks/bench_run_memory.py measures the difference (peak RSS 3.0 -> 1.9 GB loading a 1.5 GB bf16 MoE).
    """
    try:
        import transformers.modeling_utils as mu
    except ImportError:  # pragma: no cover
        yield
        return
    real = getattr(mu, "safe_open", None)
    env = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")

    def pread_open(*args, **kwargs):
        if kwargs.get("device", "cpu") == "cpu" and kwargs.get("backend", "mmap") == "mmap":
            kwargs["backend"] = "pread"
        return real(*args, **kwargs)

    if real is not None:
        mu.safe_open = pread_open
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    try:
        yield
    finally:
        if real is not None:
            mu.safe_open = real
        if env is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = env


DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """"auto" (the stored dtype) or a torch dtype, from a dtype or its name (--dtype)."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise AuditError(f"--dtype {dtype!r}: use auto (the stored dtype), {', '.join(DTYPE_NAMES)}")


def parse_max_memory(text: str | None) -> dict | None:
    """--max-memory "cpu=2GiB" or "0=70GiB,1=70GiB,cpu=200GiB" -> accelerate's max_memory ({0: "70GiB", "cpu": "200GiB"})."""
    if text is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    out: dict = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        key, sep, size = (x.strip() for x in part.partition("="))
        if not sep or not key or not size:
            raise AuditError(f"--max-memory {text!r}: each entry is DEVICE=SIZE, e.g. cpu=2GiB or 0=70GiB,cpu=200GiB")
        dev = int(key) if key.isdigit() else key.lower()
        if not isinstance(dev, int) and dev not in ("cpu", "mps"):
            raise AuditError(f"--max-memory {text!r}: unknown device {key!r}; use a GPU number (0, 1, ...) or cpu")
        try:
            n = int(size) if size.isdigit() else convert_file_size_to_int(size)  # a plain number is bytes
        except (ValueError, TypeError):
            n = -1
        if not isinstance(n, int) or n < 0:
            raise AuditError(f"--max-memory {text!r}: {size!r} is not a size; write e.g. 500MB, 2GiB or a number of bytes")
        if dev in out:
            raise AuditError(f"--max-memory {text!r}: {key} is given twice")
        out[dev] = n
    if not out:
        raise AuditError(f"--max-memory {text!r}: give at least one DEVICE=SIZE, e.g. cpu=2GiB")
    return out


def input_device(model) -> torch.device:
    """Where a model's inputs go: its embeddings' execution device (accelerate's, when they are offloaded and sit on
    the meta device until a forward needs them), else where the embeddings are."""
    emb = model.get_input_embeddings()
    dev = getattr(getattr(emb, "_hf_hook", None), "execution_device", None)
    if dev is None:
        dev = emb.weight.device
    dev = torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return torch.device("cpu") if dev.type == "meta" else dev


def weights_on(module: torch.nn.Module):
    """A context in which ``module``'s own weights are real tensors on its execution device: accelerate keeps offloaded
    modules' weights on the meta device and loads them only around their forward; code that reads weights outside
    that forward (the probe's expert maths, interventions that recompute experts) reads them inside this block."""
    from contextlib import nullcontext

    try:
        from accelerate.utils import align_module_device, has_offloaded_params
    except ImportError:  # pragma: no cover -- accelerate is a dependency; without it nothing is offloaded
        return nullcontext()
    return align_module_device(module) if has_offloaded_params(module) else nullcontext()


def placement(model) -> dict[str, int]:
    """How many modules of accelerate's device map went where ({"cpu": 3, "disk": 5}); {} when the model is in one place."""
    out: dict[str, int] = {}
    for dev in (getattr(model, "hf_device_map", None) or {}).values():
        key = f"cuda:{dev}" if isinstance(dev, int) else str(dev)
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def release_scratch(path) -> None:
    if path is not None:
        remove_scratch(path)


def _torch_dtype(dtype, config: dict) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype if dtype not in (None, "auto") else (config.get("dtype") or config.get("torch_dtype") or "float32")
    return getattr(torch, str(name), torch.float32)


def load_quantized(md, **kwargs):
    """A quantized checkpoint loaded through transformers, dequantized to the model dtype on every device (the probes read
    float weights), the way transformers loads it: its FP8 and MXFP4 integrations with ``dequantize=True`` (FP8 needs the
    ``accelerate`` package there). Where transformers 5 would misread the FP8 scales (TRANSFORMERS_FP8_SHAPES_NOTE), or
    accelerate is missing, the weights come from our own dequantization instead, handed to transformers as a state dict
    (no quantization_config: plain float tensors, transformers' own key conversion; the whole state dict in memory)."""
    import importlib.util

    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    spec = quant_spec(md.config, md.path)
    if spec.method == "mxfp4":
        return AutoModelForCausalLM.from_pretrained(str(md.path), quantization_config=Mxfp4Config(dequantize=True), **kwargs)
    misread = transformers_misreads(md)
    if not misread and importlib.util.find_spec("accelerate") is not None:
        qc = FineGrainedFP8Config(dequantize=True, weight_block_size=spec.block, modules_to_not_convert=(spec.config or {}).get("modules_to_not_convert"))
        return AutoModelForCausalLM.from_pretrained(str(md.path), quantization_config=qc, **kwargs)
    why = f"{misread[0]} ({TRANSFORMERS_FP8_SHAPES_NOTE})" if misread else "the accelerate package is not installed"
    print(f"{md.path}: FP8 weights dequantized by the audit, not by transformers: {why}", file=sys.stderr)
    return _load_state_dict(md, _torch_dtype(kwargs.get("dtype"), md.config), kwargs)


def _load_state_dict(md, dtype: torch.dtype, kwargs: dict):
    return load_state_dict(md, md.path, dtype, kwargs=kwargs)


def load_state_dict(md, config_dir, dtype, device=None, kwargs: dict | None = None):
    """``config_dir``'s architecture (its config.json, no quantization_config, no remote code) with ``md``'s logical tensors as
    its weights: plain ones copied, quantized ones (FP8, MXFP4, GGUF) dequantized into ``dtype`` ("auto": the config's),
    handed to transformers as a state dict of the checkpoint's names (its own key conversion applies). The whole state
    dict is in memory."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cfg = AutoConfig.from_pretrained(str(config_dir), trust_remote_code=False)
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is not None and hasattr(c, "quantization_config"):
            delattr(c, "quantization_config")
    dtype = _torch_dtype(dtype, md.config)
    fds: dict = {}
    sd = {}
    try:
        for name, lt in md.logical.items():
            t = source(lt, map_tensors(md, list(lt.parts), fds))
            if lt.quantized:
                out = torch.empty(lt.shape, dtype=dtype)
                flat = out.view(-1, lt.shape[-1])
                for r0, r1, rows in row_pieces(t):
                    flat[r0:r1] = rows
                t = out
            sd[name] = t.clone() if isinstance(t, torch.Tensor) and not lt.quantized else t  # no view of a mapping outlives it
    finally:
        for fd in fds.values():
            os.close(fd)
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]
    kw = {k: v for k, v in (kwargs or {"dtype": dtype}).items() if k != "use_safetensors"}
    model = cls.from_pretrained(None, config=cfg, state_dict=sd, **kw)
    return model.to(device) if device not in (None, "cpu", "auto") else model
