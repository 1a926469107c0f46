"""Per-layer refusal directions: difference of mean residual-stream activations, harmful minus harmless.

Each prompt goes through the chat template (add_generation_prompt=True) and one forward pass; the
residual stream at the last prompt token (the position whose output is the first answer token) is
summed in float64 per hidden-state index, then divided once.

Index convention (the same as llm-abliteration's ``measurement`` index, which reads
``hidden_states[i]`` from transformers): index i = hidden_states[i] = the *input* of decoder layer i;
0 = embedding output; L = final normed output (after the last layer and the model's final norm).
So an ablate entry ``measurement: 18`` uses the stream entering layer 18 (= leaving layer 17).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from checks.errors import AuditError

CONVENTION = "index i = hidden_states[i] = input of decoder layer i; 0 = embedding output; L = final normed output"
TENSORS = ("refusal_dir", "harmful_mean", "harmless_mean")


@dataclass
class Directions:
    """Difference-of-means directions per hidden-state index (rows), float32 [n, H]; refusal_dir is raw (not normalized)."""

    refusal_dir: torch.Tensor
    harmful_mean: torch.Tensor
    harmless_mean: torch.Tensor
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        shapes = {n: tuple(getattr(self, n).shape) for n in TENSORS}
        if len(set(shapes.values())) != 1 or len(shapes["refusal_dir"]) != 2:
            raise AuditError(f"directions: refusal_dir, harmful_mean, harmless_mean must share one [n, hidden] shape, got {shapes}")
        for n in TENSORS:
            t = getattr(self, n).detach().to(torch.float32).contiguous()
            if not torch.isfinite(t).all():
                raise AuditError(f"directions: {n} holds NaN or Inf values; re-measure (is the model's dtype overflowing?)")
            setattr(self, n, t)

    @property
    def n(self) -> int:
        """Number of hidden-state indices measured (L+1 for our files)."""
        return self.refusal_dir.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.refusal_dir.shape[1]

    def quality_table(self) -> list[dict]:
        """Per index: cosine of the two means, snr, purity, quality = snr*(1-cos)*purity, rotation from the previous index.

        snr = ||r|| / max(||mu_harmful||, ||mu_harmless||); purity = ||r - (r.a)a|| / ||r|| with a the unit
        harmless mean (the share of r orthogonal to it); rotation = angle in degrees between r_i and r_{i-1}.
        """
        rows, prev = [], None
        for i in range(self.n):
            h, a, r = (t[i].double() for t in (self.harmful_mean, self.harmless_mean, self.refusal_dir))
            nh, na, nr = h.norm().item(), a.norm().item(), r.norm().item()
            cos = float(h @ a / (nh * na)) if nh > 0 and na > 0 else 0.0
            snr = nr / max(nh, na) if max(nh, na) > 0 else 0.0
            if nr > 0 and na > 0:
                ahat = a / na
                purity = float((r - (r @ ahat) * ahat).norm() / nr)
            else:
                purity = 0.0
            rot_cos = None
            if prev is not None and nr > 0 and prev.norm() > 0:
                rot_cos = float(r @ prev / (nr * prev.norm()))
            rows.append({
                "index": i, "cos": cos, "harmful_norm": nh, "harmless_norm": na, "refusal_norm": nr, "snr": snr,
                "purity": purity, "quality": snr * (1 - cos) * purity,
                "rotation": None if rot_cos is None else math.degrees(math.acos(max(-1.0, min(1.0, rot_cos)))),
                "rotation_cos": rot_cos,
            })
            prev = r
        return rows

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (atomically: temporary file, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in self.metadata.items()}
        meta.setdefault("convention", CONVENTION)
        meta.setdefault("format", "moe-ablation-audit directions v1")
        meta["quality_table"] = json.dumps(self.quality_table())
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({n: getattr(self, n) for n in TENSORS}, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Directions":
        """Our safetensors file, or llm-abliteration's measurement file (.pt/.refuse, read with weights_only=True)."""
        path = Path(path)
        if not path.is_file():
            raise AuditError(f"{path}: no such directions file; run `audit measure BASE -o {path.name}` first")
        with open(path, "rb") as f:
            head = f.read(9)
        # safetensors: an 8-byte little-endian header length, then the JSON header. Tell it first: that length
        # can itself begin with the bytes that mark a torch.save zip ("PK") or a legacy pickle (0x80).
        if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size:
            return cls._load_safetensors(path)
        if head[:2] == b"PK" or head[:1] == b"\x80" or path.suffix in (".pt", ".pth", ".bin", ".refuse"):
            return cls._load_llm_abliteration(path)
        return cls._load_safetensors(path)

    @classmethod
    def _load_safetensors(cls, path: Path) -> "Directions":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
                missing = [n for n in TENSORS if n not in names]
                if missing:
                    raise AuditError(f"{path}: not a directions file (missing {', '.join(missing)}); make one with `audit measure`")
                tensors = {n: f.get_tensor(n) for n in TENSORS}
                meta = dict(f.metadata() or {})
        except AuditError:
            raise
        except Exception as e:
            raise AuditError(f"{path}: cannot read the directions file ({type(e).__name__}: {e}); re-run `audit measure`") from None
        return cls(**tensors, metadata=meta)

    @classmethod
    def _load_llm_abliteration(cls, path: Path) -> "Directions":
        """llm-abliteration's measurement dict (refuse_i, harmful_i, harmless_i); audit/foreign.py reads it, type-checked."""
        from audit.foreign import load_measurement

        return load_measurement(path)


def _check_prompts(harmful: list[str], harmless: list[str]) -> None:
    for kind, ps in (("harmful", harmful), ("harmless", harmless)):
        if not ps:
            raise AuditError(f"the {kind} prompt set is empty; pass --{kind} with a file of prompts")


class _LastToken:
    """hidden_states[i][:, -1] for every index i, taken by hooks as the forward goes (the input of decoder layer i; the
    final norm's output for i = L), so a batch never holds every layer's [B, T, H] at once as output_hidden_states does."""

    def __init__(self, model, n_states: int):
        from audit.probe import _decoder_layers, _final_norm

        layers = _decoder_layers(model)
        if len(layers) + 1 != n_states:
            raise AuditError(f"the model has {len(layers)} decoder layers, expected num_hidden_layers = {n_states - 1}")
        self.rows: list = [None] * n_states
        self.handles = [layer.register_forward_pre_hook(self._pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
        self.handles.append(_final_norm(model).register_forward_hook(lambda mod, a, out: self._keep(n_states - 1, out)))

    def _pre(self, i: int):
        def hook(mod, args, kwargs):
            self._keep(i, args[0] if args else kwargs["hidden_states"])
        return hook

    def _keep(self, i: int, h) -> None:
        h = h[0] if isinstance(h, tuple) else h
        self.rows[i] = h[:, -1, :].to(torch.float64).cpu()

    def take(self) -> torch.Tensor:
        if any(r is None for r in self.rows):
            raise AuditError("a decoder layer or the final norm was not called in the forward pass; this architecture is not supported by `audit measure`")
        out, self.rows = torch.stack(self.rows), [None] * len(self.rows)
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def _means(model, tokenizer, formatted: list[str], batch_size: int, device, n_states: int, desc: str, progress) -> torch.Tensor:
    """Mean over prompts of hidden_states[i][last prompt token], float64 [n_states, H]."""
    from tqdm import tqdm

    from audit.probe import _last_logits_kwargs

    total, count = None, 0
    bar = tqdm(total=len(formatted), desc=desc, unit="prompt", disable=None if progress is None else not progress)
    rec = _LastToken(model, n_states)
    keep = _last_logits_kwargs(model)
    try:
        for start in range(0, len(formatted), batch_size):
            batch = formatted[start:start + batch_size]
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            # positions count real tokens only, as generate() does, so a left-padded prompt is encoded as when alone
            enc["position_ids"] = (enc["attention_mask"].long().cumsum(-1) - 1).clamp_min(0)
            model(**enc, use_cache=False, **keep)
            last = rec.take()  # [n_states, B, H]; left padding: -1 is the last prompt token
            s = last.sum(dim=1)
            total = s if total is None else total + s
            count += last.shape[1]
            bar.update(len(batch))
    finally:
        rec.remove()
        bar.close()
    return total / count


def measure_directions(model_dir, harmful: list[str], harmless: list[str], batch_size: int = 16, device: str | None = None,
                       dtype: torch.dtype | str = "auto", progress: bool | None = None, max_memory: dict | None = None,
                       offload_folder=None, inputs=()) -> Directions:
    """Refusal directions of a model directory (audit.model_dir.ModelDir) from two prompt lists.

    The model is loaded in ``dtype`` (auto: as stored) on ``device`` (auto: accelerate's device map within ``max_memory``,
    disk offload under ``offload_folder``: ModelDir.load_model); the sums are float64 whatever the dtype."""
    from audit.prompts import fit_to_context, token_budget

    _check_prompts(harmful, harmless)
    if batch_size < 1:
        raise AuditError(f"batch size must be at least 1, got {batch_size}")
    t0 = time.time()
    tok = model_dir.tokenizer()
    budget = token_budget(model_dir.config)
    harmful, cut_h = fit_to_context(tok, harmful, budget)
    harmless, cut_a = fit_to_context(tok, harmless, budget)
    if cut_h or cut_a:
        import sys

        print(f"measure: {cut_h} harmful and {cut_a} harmless prompt(s) cut to {budget} tokens (the model's context)", file=sys.stderr)
    model = model_dir.load_model(dtype=dtype, device=device, max_memory=max_memory, offload_folder=offload_folder, inputs=inputs)
    d = directions_of(model, tok, harmful, harmless, batch_size, progress)
    meta = {
        "convention": CONVENTION, "model": str(model_dir.path), "family": model_dir.layout.family,
        "num_layers": str(model_dir.layout.num_layers), "hidden_size": str(model_dir.layout.hidden_size),
        "n_harmful": str(len(harmful)), "n_harmless": str(len(harmless)), "position": "last prompt token",
        "dtype": str(next(model.parameters()).dtype), "seconds": f"{time.time() - t0:.2f}",
    }
    return Directions(d.refusal_dir, d.harmful_mean, d.harmless_mean, metadata=meta)


def directions_of(model, tokenizer, harmful: list[str], harmless: list[str], batch_size: int = 16, progress: bool | None = None) -> Directions:
    """Difference of means (harmful - harmless) at the last prompt token of a loaded model, per hidden_states index.

    The measurement itself: `audit measure` runs it on a model directory, the organisms on the model they train."""
    from audit.model_dir import input_device
    from audit.prompts import format_prompts

    _check_prompts(harmful, harmless)
    dev = input_device(model)
    n_states = model.config.get_text_config().num_hidden_layers + 1
    mh = _means(model, tokenizer, format_prompts(tokenizer, harmful), batch_size, dev, n_states, "harmful", progress)
    ma = _means(model, tokenizer, format_prompts(tokenizer, harmless), batch_size, dev, n_states, "harmless", progress)
    return Directions((mh - ma).float(), mh.float(), ma.float(), metadata={"convention": CONVENTION})


def format_table(rows: list[dict]) -> str:
    """The quality table as fixed-width text (best quality marked with *)."""
    best = max(range(len(rows)), key=lambda i: rows[i]["quality"]) if rows else -1
    lines = [f"{'index':>5} {'cos':>8} {'snr':>8} {'purity':>8} {'quality':>9} {'rot(deg)':>9}"]
    for i, r in enumerate(rows):
        rot = "" if r["rotation"] is None else f"{r['rotation']:.1f}"
        lines.append(f"{r['index']:>5} {r['cos']:>8.4f} {r['snr']:>8.4f} {r['purity']:>8.4f} {r['quality']:>9.5f} {rot:>9}{' *' if i == best else ''}")
    return "\n".join(lines)


def is_directions_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directions file written by `audit measure` (so --force may replace it)."""
    from audit.model_dir import read_header

    try:
        _, meta, _ = read_header(Path(path))
    except AuditError:
        return False
    return str(meta.get("format", "")).startswith("moe-ablation-audit directions")
