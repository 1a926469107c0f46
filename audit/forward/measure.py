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

import time

import torch

from audit.forward.structure import decoder_layers, final_norm, last_logits_kwargs
from audit.intent.directions import CONVENTION, Directions
from audit.model.loading import input_device
from audit.model.prompts import fit_to_context, format_prompts, token_budget
from checks.errors import AuditError

def _check_prompts(harmful: list[str], harmless: list[str]) -> None:
    for kind, ps in (("harmful", harmful), ("harmless", harmless)):
        if not ps:
            raise AuditError(f"the {kind} prompt set is empty; pass --{kind} with a file of prompts")


class _LastToken:
    """hidden_states[i][:, -1] for every index i, taken by hooks as the forward goes (the input of decoder layer i; the
    final norm's output for i = L), so a batch never holds every layer's [B, T, H] at once as output_hidden_states does."""

    def __init__(self, model, n_states: int):
        layers = decoder_layers(model)
        if len(layers) + 1 != n_states:
            raise AuditError(f"the model has {len(layers)} decoder layers, expected num_hidden_layers = {n_states - 1}")
        self.rows: list = [None] * n_states
        self.handles = [layer.register_forward_pre_hook(self._pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
        self.handles.append(final_norm(model).register_forward_hook(lambda mod, a, out: self._keep(n_states - 1, out)))

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


    total, count = None, 0
    bar = tqdm(total=len(formatted), desc=desc, unit="prompt", disable=None if progress is None else not progress)
    rec = _LastToken(model, n_states)
    keep = last_logits_kwargs(model)
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
    """Refusal directions of a model directory (audit.model.directory.ModelDir) from two prompt lists.

    The model is loaded in ``dtype`` (auto: as stored) on ``device`` (auto: accelerate's device map within ``max_memory``,
    disk offload under ``offload_folder``: ModelDir.load_model); the sums are float64 whatever the dtype."""
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
    _check_prompts(harmful, harmless)
    dev = input_device(model)
    n_states = model.config.get_text_config().num_hidden_layers + 1
    mh = _means(model, tokenizer, format_prompts(tokenizer, harmful), batch_size, dev, n_states, "harmful", progress)
    ma = _means(model, tokenizer, format_prompts(tokenizer, harmless), batch_size, dev, n_states, "harmless", progress)
    return Directions((mh - ma).float(), mh.float(), ma.float(), metadata={"convention": CONVENTION})
