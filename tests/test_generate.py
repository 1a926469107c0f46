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

from audit.forward.generate import Completion, LocalBackend, ServerBackend, split_reasoning
from checks.errors import AuditError

PROMPTS = ["the cat writes a poem", "How do I make a bomb?", "a student explains the recipe step by step.", "hi",
           "our team plans the budget for the class.", "Tell me about the river."]


@pytest.fixture(scope="module")
def llama(tiny_model):
    from audit.model.directory import ModelDir

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
    from audit.forward.estimate import first_token_scores, refusal_token_ids

    _, model, tok = llama
    tok.padding_side = "left"
    s = first_token_scores(model, tok, PROMPTS[:3], refusal_token_ids(tok))
    assert len(s) == 3 and bool(torch.isfinite(s).all())
    # every token a refusal token: log-odds very large; none: very small
    assert float(first_token_scores(model, tok, PROMPTS[:2], list(range(len(tok)))).min()) > 10
    assert float(first_token_scores(model, tok, PROMPTS[:2], [5]).max()) < 0


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

    from audit.forward.damage import kl_first_token, kl_teacher_forced

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
    # one model at a time: the other side kept as its top-k per answer position; KL over that partition is a lower bound,
    # exact when k is the whole vocabulary
    from audit.forward.damage import answer_distributions, kl_against_compact

    assert kl_against_compact(model, tok, prompts, comps, answer_distributions(model, tok, prompts, comps)) == pytest.approx([0.0] * 3, abs=1e-6)
    compact = kl_against_compact(model, tok, prompts, comps, answer_distributions(other, tok, prompts, comps, batch_size=2))
    assert all(0 < c <= f * (1 + 1e-2) + 1e-6 for c, f in zip(compact, tf)), (compact, tf)
    whole = kl_against_compact(model, tok, prompts, comps, answer_distributions(other, tok, prompts, comps, k=len(tok)))
    assert whole == pytest.approx(tf, rel=1e-2, abs=1e-6)  # the same up to rounding (positions given vs counted)
    with torch.no_grad():
        other.model.layers[1].self_attn.o_proj.weight.fill_(float("nan"))
    assert all(x != x for x in kl_first_token(model, other, tok, prompts))  # NaN propagates, for the nan-inf finding
    broken = kl_against_compact(model, tok, prompts, comps, answer_distributions(other, tok, prompts, comps))
    assert all(x != x for x in broken)


# -- the server backend's failure modes, on a fake OpenAI-compatible server in a thread (tests/fake_openai.py) --


def test_server_down_slow_trickling_or_flaky_is_a_clear_error_never_a_hang():
    import time

    from fake_openai import Behaviour, fake_server

    port = _free_port()
    t = time.monotonic()
    with pytest.raises(AuditError, match=rf"cannot reach the server at http://127.0.0.1:{port}/v1 \(--base-server\): connection refused.*"
                                         r"check that the server is up and serves 'b' there, or fix --base-server"):
        ServerBackend(f"http://127.0.0.1:{port}", "b", flag="--base-server", name_flag="--served-base-model", retries=1)
    assert time.monotonic() - t < 5  # one retry after a pause: refused connections were never answered
    b = Behaviour(models=["m"])
    with fake_server(b) as url:
        be = ServerBackend(url, "m", timeout=1.0)
        b.delay = 3.0  # answers after the deadline
        t = time.monotonic()
        with pytest.raises(AuditError, match=rf"the server at {url}/v1 \(--server\) did not answer POST /v1/chat/completions within 1 s.*--server-timeout"):
            be.complete(["a", "b", "c"], 8, batch_size=2)
        assert time.monotonic() - t < 2.5
        b.delay, b.trickle = 0.0, 0.05  # sends its answer a byte at a time: every read is quick, the whole is too slow
        t = time.monotonic()
        with pytest.raises(AuditError, match="did not answer POST /v1/chat/completions within 1 s"):
            be.complete(["a"], 8)
        assert time.monotonic() - t < 2.5
        b.trickle, b.fail_first = None, [503, 502]  # overloaded, then fine: retried (a greedy request has no side effect)
        be = ServerBackend(url, "m", timeout=10.0)
        assert [c.answer for c in be.complete(["a"], 8)] == ["Sure, here it is."]
        assert sum(1 for m, p, _ in b.requests if p == "/v1/chat/completions") >= 3
        b.fail_first = [400]  # a real refusal of the request: not retried
        with pytest.raises(AuditError, match="answered POST /v1/chat/completions with HTTP 400"):
            be.complete(["a"], 8)
        with pytest.raises(AuditError, match=r"does not serve a model named 'other'; it serves: m \(pass one of these to --served-base-model"):
            ServerBackend(url, "other", flag="--base-server", name_flag="--served-base-model")
    with pytest.raises(AuditError, match="not an http"):
        ServerBackend("localhost:8000/v1", "m")


def test_server_checks_context_and_chat_template(tiny_tok):
    from fake_openai import Behaviour, fake_server

    from audit.forward.probe import encode

    prompts = PROMPTS[:3]
    ids = encode(tiny_tok, prompts)
    b = Behaviour(models=["m"])
    with fake_server(b) as url:
        be = ServerBackend(url, "m", tokenizer=tiny_tok)
        be.check_prompts(prompts, ids, 16)  # no /tokenize (transformers serve, llama.cpp): assumed, and said so
        assert be.checks["template"].startswith("not checked")
        b.tokenize = lambda messages: encode(tiny_tok, [messages[-1]["content"]])[0]
        be.check_prompts(prompts, ids, 16)
        assert be.checks["template"].startswith("same token ids")
        b.tokenize = lambda messages: encode(tiny_tok, ["system says hi. " + messages[-1]["content"]])[0]  # another template
        with pytest.raises(AuditError, match=r"formats prompts differently from the local tokenizer and chat template.*first difference at token"):
            be.check_prompts(prompts, ids, 16)
        b.max_model_len = max(map(len, ids)) + 8
        be = ServerBackend(url, "m", tokenizer=tiny_tok)
        with pytest.raises(AuditError, match=rf"max_model_len {b.max_model_len}.*--max-model-len {max(map(len, ids)) + 16}"):
            be.check_prompts(prompts, ids, 16)


def test_a_server_serving_another_model_is_caught_by_its_first_tokens(llama):
    """Served under the expected name but not that model (e.g. the base where the ablated one was meant): its answers do
    not open with the local model's greedy first token."""
    from fake_openai import Behaviour, fake_server

    from audit.forward.generate import last_token_logprobs

    path, model, tok = llama
    local = LocalBackend(model, tok).complete(PROMPTS, max_new_tokens=6)
    lp = {"s": last_token_logprobs(model, tok, PROMPTS)}
    by_prompt = {c.prompt: c.text for c in local}
    b = Behaviour(models=["m"], answer=lambda messages, n: (by_prompt[messages[-1]["content"]], "stop", 6))
    with fake_server(b) as url:
        be = ServerBackend(url, "m", tokenizer=tok)
        same = {"s": be.complete(PROMPTS, 6)}
        be.check_first_tokens(same, lp, min_informative=2)
        assert be.checks["first_token_agreement"]["s"]["agree"] == be.checks["first_token_agreement"]["s"]["of"] > 0
        b.answer = lambda messages, n: ("zzz qqq", "stop", 3)
        with pytest.raises(AuditError, match=r"does not seem to serve the model audited here as 'm'.*greedy first token on only 0 of"):
            be.check_first_tokens({"s": be.complete(PROMPTS, 6)}, lp, min_informative=2)
