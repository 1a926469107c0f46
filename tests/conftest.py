"""Session-wide fixtures: tiny models of every family, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_tok():
    from audit.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_tok):
    """tiny_model(family, sharded=False, **overrides) -> Path; cached per (family, sharded, overrides)."""
    from audit.tiny import build_tiny

    cache: dict = {}

    def make(family: str, sharded: bool = False, **overrides) -> Path:
        key = (family, sharded, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{family}-{'sharded' if sharded else 'single'}")
            cache[key] = build_tiny(family, out, tiny_tok, shard_bytes=20_000 if sharded else None, **overrides)
        return cache[key]

    return make
