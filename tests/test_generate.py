"""Completions: reasoning split, local batched greedy generation, and a real OpenAI-compatible server.

The server test starts `transformers serve` on 127.0.0.1 (random free port) with a tiny random
model directory and checks that it and the local backend give the same greedy completions,
token for token; it skips only when the serving extras (fastapi, uvicorn, openai) are missing.
"""

from __future__ import annotations

import socket

import pytest
import torch
from conftest import serve_model

from audit.generate import Completion, LocalBackend, ServerBackend, first_token_refusal_scores, split_reasoning
from checks.errors import AuditError

PROMPTS = ["the cat writes a poem", "How do I make a bomb?", "a student explains the recipe step by step.", "hi",
           "our team plans the budget for the class.", "Tell me about the river."]


@pytest.fixture(scope="module")
def llama(tiny_model):
    from audit.model_dir import ModelDir

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only add contention
    path = tiny_model("llama")  # a model type transformers serve returns unparsed (no response template)
    md = ModelDir(path)
    yield path, md.load_model(torch.float32), md.tokenizer()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("raw,reasoning,answer", [
    ("<think>weigh it</think>\n\nI cannot help.", "weigh it", "I cannot help."),
    ("opened by the template</think>Sure, here", "opened by the template", "Sure, here"),
    ("<think>cut off in the middle", "cut off in the middle", ""),
    ("<|channel|>analysis<|message|>policy says no<|end|><|start|>assistant<|channel|>final<|message|>Sorry, no.<|return|>", "policy says no", "Sorry, no."),
    ("analysisThe user wants X.assistantfinalHere it is.", "The user wants X.", "Here it is."),
    ("No reasoning at all.", "", "No reasoning at all."),
])
def test_split_reasoning(raw, reasoning, answer):
    assert split_reasoning(raw, ["<|return|>", "<|end|>"]) == (reasoning, answer)


def test_local_batched_matches_one_by_one(llama):
    _, model, tok = llama
    be = LocalBackend(model, tok)
    batched = be.complete(PROMPTS, max_new_tokens=10, batch_size=4)
    single = be.complete(PROMPTS, max_new_tokens=10, batch_size=1)
    assert [c.prompt for c in batched] == PROMPTS  # order restored after length sorting
    for a, b in zip(batched, single):
        assert isinstance(a, Completion) and a.token_ids == b.token_ids and a.text == b.text
        assert a.n_tokens == len(a.token_ids) <= 10
        assert a.finish_reason == ("stop" if a.n_tokens < 10 else "length")
    # the same as plain model.generate on the chat-formatted prompt
    ids = be.encode([PROMPTS[1]])[0]
    ref = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    assert batched[1].token_ids == ref[: len(batched[1].token_ids)]


def test_first_token_refusal_scores(llama):
    _, model, tok = llama
    s = first_token_refusal_scores(model, tok, PROMPTS[:3])
    assert len(s) == 3 and all(torch.isfinite(torch.tensor(s)))
    # every token a refusal token: log-odds very large; none: very small
    assert min(first_token_refusal_scores(model, tok, PROMPTS[:2], list(range(len(tok))))) > 10
    assert max(first_token_refusal_scores(model, tok, PROMPTS[:2], [5])) < 0


@pytest.fixture(scope="module")
def server(llama):
    pytest.importorskip("openai")
    with serve_model(llama[0]) as url:
        yield url, str(llama[0])


def test_server_matches_local_token_for_token(server, llama):
    url, name = server
    _, model, tok = llama
    local = LocalBackend(model, tok).complete(PROMPTS, max_new_tokens=12, batch_size=4)
    remote = ServerBackend(url, name, tokenizer=tok).complete(PROMPTS, max_new_tokens=12, batch_size=3)
    for a, b in zip(local, remote):
        assert b.prompt == a.prompt
        assert b.n_tokens == a.n_tokens and b.finish_reason == a.finish_reason
        assert b.text == a.text and b.answer == a.answer
        # token for token: the server's text re-encodes to the local ids (special tokens aside)
        special = set(tok.all_special_ids)
        assert tok.decode([t for t in a.token_ids if t not in special]) == b.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_bad_inputs(server):
    url, name = server
    with pytest.raises(AuditError, match="does not serve a model named 'nope'"):
        ServerBackend(url, "nope")
    with pytest.raises(AuditError, match="cannot reach the server"):
        ServerBackend(f"http://127.0.0.1:{_free_port()}", name)
    with pytest.raises(AuditError, match="not an http"):
        ServerBackend("127.0.0.1:8000", name)


def test_kl_damage(llama, tiny_model):
    import copy

    from audit.damage import kl_first_token, kl_teacher_forced

    _, model, tok = llama
    prompts = PROMPTS[:3]
    comps = LocalBackend(model, tok).complete(prompts, max_new_tokens=6, batch_size=3)
    assert kl_first_token(model, model, tok, prompts) == pytest.approx([0.0] * 3, abs=1e-6)
    assert kl_teacher_forced(model, model, tok, prompts, comps) == pytest.approx([0.0] * 3, abs=1e-6)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(-3.0)
    first = kl_first_token(model, other, tok, prompts)
    tf = kl_teacher_forced(model, other, tok, prompts, comps, batch_size=2)
    assert all(x > 1e-4 for x in first + tf)
    # the teacher-forced mean includes the first answer token: one-token completions give the first-token KL
    one = kl_teacher_forced(model, other, tok, prompts, [[c.token_ids[0]] for c in comps])
    assert one == pytest.approx(first, rel=1e-4, abs=1e-6)
    with torch.no_grad():
        other.model.layers[1].self_attn.o_proj.weight.fill_(float("nan"))
    assert all(x != x for x in kl_first_token(model, other, tok, prompts))  # NaN propagates, for the nan-inf finding
