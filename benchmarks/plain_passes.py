"""The passes a benchmark measures the audit's own against: the same batches through the model with no hooks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from audit.forward.probe import _pad_id, _positions, batches, encode
from audit.forward.structure import last_logits_kwargs
from audit.model.loading import input_device


def plain_forward(model, tokenizer, prompts: Sequence[str], batch_size: int = 16) -> None:
    """The same batches through the model with no hooks (and the same one row of logits): the baseline the probe's
    overhead is measured against."""
    ids = encode(tokenizer, prompts)
    dev = input_device(model)
    keep = last_logits_kwargs(model)
    with torch.inference_mode():
        for _, x, m in batches(ids, batch_size, _pad_id(tokenizer)):
            model(input_ids=x.to(dev), attention_mask=m.to(dev), position_ids=_positions(m).to(dev), use_cache=False, **keep)
