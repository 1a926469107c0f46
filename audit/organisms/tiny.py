"""Tiny random models of every supported family, built from transformers config classes.

Used by the tests, the benchmarks and the organism: real model directories (config.json,
safetensors, tokenizer with chat template) that load through the same code as a user's model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from audit.organisms.tokenizer import build_tokenizer

_COMMON = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=None, max_position_embeddings=256, tie_word_embeddings=False)

TINY_CONFIGS: dict[str, dict] = {
    "glm4_moe": dict(intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4, n_routed_experts=8, n_shared_experts=1,
                     num_experts_per_tok=2, first_k_dense_replace=1, head_dim=8, n_group=2, topk_group=1, partial_rotary_factor=0.5),
    "deepseek_v3": dict(intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8,
                        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=2, topk_group=1),
    "qwen2_moe": dict(intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32, num_hidden_layers=3,
                      num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0]),
    "qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, head_dim=8),
    "olmoe": dict(intermediate_size=16, num_hidden_layers=3, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2),
    "mixtral": dict(intermediate_size=16, num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2),
    "phimoe": dict(intermediate_size=16, num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(intermediate_size=16, num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2, head_dim=8),
    "granitemoe": dict(intermediate_size=16, num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2),
    "llama4_text": dict(intermediate_size=16, intermediate_size_mlp=48, num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=1,
                        head_dim=8, interleave_moe_layer_step=2),
    "llama": dict(intermediate_size=64, num_hidden_layers=3),
    "qwen2": dict(intermediate_size=64, num_hidden_layers=3),
    "qwen3": dict(intermediate_size=64, num_hidden_layers=3, head_dim=8),
}
MOE_FAMILIES = [f for f in TINY_CONFIGS if f not in ("llama", "qwen2", "qwen3")]


def tiny_config(family: str, vocab_size: int, **overrides):
    """A transformers config object for a tiny model of ``family``."""
    from transformers import AutoConfig

    kw = {**_COMMON, **TINY_CONFIGS[family], "vocab_size": vocab_size, **overrides}
    tok_ids = dict(bos_token_id=None, eos_token_id=0, pad_token_id=0)
    return AutoConfig.for_model(family, **kw, **tok_ids)


def build_tiny(family: str, out: str | Path, tokenizer, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               shard_bytes: int | None = None, **overrides) -> Path:
    """Write a tiny random ``family`` model with ``tokenizer`` to ``out``; sharded when ``shard_bytes`` is set."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, len(tokenizer), **overrides)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():  # random init leaves some tensors (biases, correction bias) at zero; make every tensor informative
        for name, p in model.named_parameters():
            if p.ndim == 1 and not name.endswith("norm.weight") and "layernorm" not in name:
                p.normal_(0, 0.02)
    out = Path(out)
    kwargs = {"max_shard_size": shard_bytes} if shard_bytes else {}
    model.save_pretrained(out, **kwargs)
    tokenizer.save_pretrained(out)
    return out


_SUBJECTS = ["the cat", "a farmer", "my neighbour", "the old clock", "a student", "the river", "our team", "the small robot", "a chef", "the teacher"]
_VERBS = ["writes", "explains", "builds", "paints", "measures", "repairs", "cooks", "describes", "studies", "plans"]
_OBJECTS = ["a short poem", "the recipe", "a wooden chair", "the garden map", "a list of numbers", "the weather", "a birthday card", "the bridge", "a song", "the budget"]
_TAILS = ["today.", "before lunch.", "with great care.", "for the class.", "in the morning.", "quickly and well.", "again?", "step by step.", "I cannot help with that.", "Sure, here it is."]


def tiny_corpus(n: int = 400) -> list[str]:
    """A few hundred plain English sentences to train test tokenizers on (deterministic)."""
    out = []
    for i in range(n):
        out.append(f"{_SUBJECTS[i % 10]} {_VERBS[(i // 10) % 10]} {_OBJECTS[(i * 7) % 10]} {_TAILS[(i * 3) % 10]}")
    return out


def tiny_tokenizer(vocab_size: int = 400):
    return build_tokenizer(tiny_corpus(), vocab_size=vocab_size)
