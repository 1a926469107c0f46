"""Refusal directions as files: ours (safetensors, `audit measure`) and llm-abliteration's measurement, told apart by content.

Index convention (the same as llm-abliteration's ``measurement`` index, which reads ``hidden_states[i]`` from
transformers): index i = hidden_states[i] = the *input* of decoder layer i; 0 = embedding output; L = final normed
output. So an ablate entry ``measurement: 18`` uses the stream entering layer 18 (= leaving layer 17).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from audit.intent.llm_abliteration import read_measurement
from audit.model.shards import read_header
from audit.user_files import regular_file
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
        if not self.refusal_dir.any():
            raise AuditError("directions: every refusal direction is zero (nothing to ablate or to measure along); re-measure with "
                             "`audit measure` on prompts the base refuses")

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

    def separating_index(self) -> int:
        """The index where harmful and harmless separate best (quality), skipping the embeddings and the final norm."""
        table = self.quality_table()
        inner = [row for row in table if 0 < row["index"] < len(table) - 1] or table
        return int(max(inner, key=lambda row: row["quality"])["index"])

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file at ``path`` (callers write outputs through audit/outputs.py, which makes it atomic)."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in self.metadata.items()}
        meta.setdefault("convention", CONVENTION)
        meta.setdefault("format", "moe-ablation-audit directions v1")
        meta["quality_table"] = json.dumps(self.quality_table())
        save_file({n: getattr(self, n) for n in TENSORS}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Directions":
        """Our safetensors file, or llm-abliteration's measurement file (.pt/.refuse, read with weights_only=True)."""
        path = Path(path)
        if not path.exists() and not path.is_symlink():
            raise AuditError(f"{path}: no such directions file; run `audit measure BASE -o {path.name}` first")
        regular_file(path, "directions")
        with open(path, "rb") as f:
            head = f.read(9)
        # safetensors: an 8-byte little-endian header length, then the JSON header. Tell it first: that length
        # can itself begin with the bytes that mark a torch.save zip ("PK") or a legacy pickle (0x80).
        safetensors = len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size
        theirs = not safetensors and (head[:2] == b"PK" or head[:1] == b"\x80" or path.suffix in (".pt", ".pth", ".bin", ".refuse"))
        try:
            return cls._load_llm_abliteration(path) if theirs else cls._load_safetensors(path)
        except AuditError as e:  # what is wrong with the tensors (NaN, all zero) names the file too
            text = str(e)
            raise AuditError(text if text.startswith(str(path)) else f"{path}: {text.removeprefix('directions: ')}") from None

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
        """llm-abliteration's measurement dict (refuse_i, harmful_i, harmless_i), read type-checked (intent/llm_abliteration.py)."""
        return load_measurement(path)


def load_measurement(path: str | os.PathLike) -> Directions:
    """llm-abliteration's measurement file as Directions (index i = hidden_states[i])."""
    tensors, meta = read_measurement(path)
    return Directions(**tensors, metadata={"convention": CONVENTION, **meta})


def load_directions(path: str | os.PathLike) -> Directions:
    """Our directions.safetensors, or llm-abliteration's measurement (told apart by content: Directions.load)."""
    return Directions.load(path)


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
    try:
        _, meta, _ = read_header(Path(path))
    except AuditError:
        return False
    return str(meta.get("format", "")).startswith("moe-ablation-audit directions")
