"""Session-wide fixtures: tiny models of every family, built once per test session."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one torch thread per test worker: the workers (pytest-xdist, one per core) are the parallelism
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# the organisms every test audits are committed (audit/organisms/fixtures.py): the same weights on every machine, no build
FIXTURES = Path(__file__).parent / "fixtures" / "organisms"
os.environ.setdefault("AUDIT_FIXTURES", str(FIXTURES))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one thread is as fast, and on a busy box extra threads spin at barriers; a module that changes the
    thread count (a build, a benchmark-like test) gets it back. Use: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def glm_organism():
    """glm_organism(variant) -> (model, tokenizer, r*, meta, prompts(name, n)): the cached glm4_moe organism
    (seed 0; built on first use), a fresh model on each call so a test may edit it."""
    import torch

    from audit.organisms import build as organism

    def load(variant: str):
        path = organism.cached_organism("glm4_moe", variant, 0)
        model, tok, meta = organism.load_organism(path)

        def prompts(name: str, n: int) -> list[str]:
            return organism.read_prompts(path, name)[:n]

        return model, tok, torch.tensor(meta["r_star"]), meta, prompts

    return load


@pytest.fixture(scope="session")
def tiny_tok():
    from audit.organisms.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_tok):
    """tiny_model(family, sharded=False, **overrides) -> Path; cached per (family, sharded, overrides)."""
    from audit.organisms.tiny import build_tiny

    cache: dict = {}

    def make(family: str, sharded: bool = False, **overrides) -> Path:
        key = (family, sharded, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{family}-{'sharded' if sharded else 'single'}")
            cache[key] = build_tiny(family, out, tiny_tok, shard_bytes=20_000 if sharded else None, **overrides)
        return cache[key]

    return make


@contextlib.contextmanager
def serve_model(model_dir, dtype: str = "float32"):
    """A real OpenAI-compatible server: `transformers serve MODEL_DIR` on 127.0.0.1 (a free port). Yields its URL; always stopped."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    exe = shutil.which("transformers") or pytest.skip("the `transformers` command is not on PATH")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([exe, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", dtype],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail("transformers serve exited early:\n" + proc.stdout.read().decode(errors="replace")[-2000:])
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("transformers serve did not answer within 90 s")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
