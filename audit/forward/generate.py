"""Greedy chat completions for refusal evaluation, from a local model or an OpenAI-compatible server.

Both backends take plain user prompts, apply the chat template (the server applies its own),
decode greedily for ``max_new_tokens`` (default 128: long enough for late refusals after a
preamble) and split reasoning (``<think>...</think>``, gpt-oss analysis channels) from the
answer, so the judge reads only what the model finally says. The server backend is how a model
too large for this machine is evaluated: vLLM, SGLang, llama.cpp's server, `transformers serve`.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from audit.forward.structure import last_logits_kwargs
from audit.model.loading import input_device
from audit.model.prompts import as_messages, encode_prompts, format_prompts
from checks.errors import AuditError


@dataclass
class Completion:
    prompt: str
    text: str  # everything generated, special tokens removed
    reasoning: str  # reasoning blocks ("" when none)
    answer: str  # what the judge reads: text without the reasoning
    finish_reason: str  # "stop" (end of sequence) or "length" (hit max_new_tokens)
    n_tokens: int  # generated tokens, the end-of-sequence token included
    token_ids: list[int] | None = field(default=None, repr=False)  # local backend only
    extended_from: int | None = None  # cut off at this many tokens, then generated further (audit/judgement/extend.py)


# ---------------------------------------------------------------- reasoning / answer split

_THINK = re.compile(r"<(think|thinking|reasoning)>(.*?)(?:</\1>|$)", re.S | re.I)
_HARMONY = re.compile(r"<\|channel\|>(\w+)(?:<\|constrain\|>\w+)?<\|message\|>(.*?)(?=<\|end\|>|<\|return\|>|<\|call\|>|<\|start\|>|$)", re.S)
_HARMONY_FLAT = re.compile(r"^\s*analysis(.*?)assistantfinal(.*)$", re.S)  # the same, special tokens already stripped


def split_reasoning(raw: str, special_tokens: list[str] = ()) -> tuple[str, str]:
    """(reasoning, answer) from a decoded generation; ``raw`` may still hold special tokens.

    Handles ``<think>`` blocks (also when the template opened ``<think>`` in the prompt, so only
    ``</think>`` appears, and when generation was cut off inside the block) and gpt-oss
    harmony channels (analysis/commentary are reasoning, final is the answer).
    """
    if "<|channel|>" in raw:
        parts = _HARMONY.findall(raw)
        reasoning = "\n".join(m for ch, m in parts if ch != "final").strip()
        answer = "\n".join(m for ch, m in parts if ch == "final").strip()
        return _strip(reasoning, special_tokens), _strip(answer, special_tokens)
    m = _HARMONY_FLAT.match(raw)
    if m:
        return m.group(1).strip(), _strip(m.group(2), special_tokens).strip()
    reasoning = []
    close = re.search(r"</(?:think|thinking|reasoning)>", raw, re.I)
    if close and not re.search(r"<(?:think|thinking|reasoning)>", raw[: close.start()], re.I):  # opened by the template
        reasoning.append(raw[: close.start()])
        raw = raw[close.end():]
    reasoning += [m.group(2) for m in _THINK.finditer(raw)]
    answer = _THINK.sub("", raw)
    return _strip("\n".join(r.strip() for r in reasoning if r.strip()), special_tokens), _strip(answer, special_tokens).strip()


def _strip(text: str, special_tokens) -> str:
    for s in special_tokens:
        if s:
            text = text.replace(s, "")
    return text


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


# ---------------------------------------------------------------- local transformers backend


class LocalBackend:
    """Batched greedy generation with a transformers model already loaded (left padding)."""

    def __init__(self, model, tokenizer):
        format_prompts(tokenizer, [])  # refuses a tokenizer without a chat template
        self.model, self.tok = model, tokenizer
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"
        self.eos = _eos_ids(model, tokenizer)
        self.special = [s for s in getattr(tokenizer, "all_special_tokens", []) if s]

    def encode(self, prompts: list) -> list[list[int]]:
        """Chat-templated prompt token ids (no second BOS: the template has its own)."""
        return encode_prompts(self.tok, prompts)

    def complete(self, prompts: list, max_new_tokens: int = 128, batch_size: int = 16, progress=None) -> list[Completion]:
        """Greedy completions in the prompts' order; ``progress(k)`` is called with each batch's size."""
        new = self._generate(self.encode(prompts), [max_new_tokens] * len(prompts), batch_size, progress)
        return [self._completion(p, toks, max_new_tokens) for p, toks in zip(prompts, new)]

    def extend(self, prompts: list, completions: list[Completion], cap: int, batch_size: int = 16) -> list[Completion]:
        """The same greedy answers generated further, up to ``cap`` tokens in all: decoding continues from the tokens
        already generated (the prompt and the answer so far go in as the input)."""
        seqs = [ids + list(c.token_ids or []) for ids, c in zip(self.encode(prompts), completions)]
        more = self._generate(seqs, [max(0, cap - len(c.token_ids or [])) for c in completions], batch_size)
        return [self._completion(p, list(c.token_ids or []) + toks, cap) for p, c, toks in zip(prompts, completions, more)]

    @torch.inference_mode()
    def _generate(self, ids: list[list[int]], budgets: list[int], batch_size: int, progress=None) -> list[list[int]]:
        """Greedy new tokens after each input (left-padded batches of similar length and budget)."""
        order = sorted(range(len(ids)), key=lambda i: (-budgets[i], -len(ids[i])))  # similar lengths share a batch: less padding
        out: list[list[int]] = [[] for _ in ids]
        dev = input_device(self.model)
        pad = self.tok.pad_token_id
        for start in range(0, len(order), batch_size):
            idx = [i for i in order[start:start + batch_size]]
            budget = max(budgets[i] for i in idx)
            if budget > 0:
                width = max(len(ids[i]) for i in idx)
                input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in idx], device=dev)
                mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in idx], device=dev)
                gen = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=budget, do_sample=False,
                                          temperature=None, top_p=None, top_k=None, pad_token_id=pad, eos_token_id=sorted(self.eos))
                for row, i in enumerate(idx):
                    out[i] = gen[row, width:].tolist()[: budgets[i]]
            if progress is not None:
                progress(len(idx))
        return out

    def _completion(self, prompt, new: list[int], max_new_tokens: int) -> Completion:
        stop = next((k for k, t in enumerate(new) if t in self.eos), None)
        toks = new[: stop + 1] if stop is not None else new
        raw = self.tok.decode(toks, skip_special_tokens=False)
        text = self.tok.decode(toks, skip_special_tokens=True)
        reasoning, answer = split_reasoning(raw, self.special)
        return Completion(_prompt_text(prompt), text, reasoning, answer, "stop" if stop is not None else "length", len(toks), toks)


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(x) for x in src)
    if not ids:
        raise AuditError("neither the generation config nor the tokenizer names an end-of-sequence token")
    return ids


@torch.inference_mode()
def last_token_logprobs(model, tokenizer, prompts: list, batch_size: int = 16) -> torch.Tensor:
    """[n_prompts, vocab] float32 log-probabilities of the first answer token (only the last position's logits computed)."""
    enc = LocalBackend(model, tokenizer).encode(prompts)
    dev, keep = input_device(model), last_logits_kwargs(model)
    rows = []
    for s in range(0, len(enc), batch_size):
        chunk = enc[s:s + batch_size]
        width = max(map(len, chunk))
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=dev)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=dev)
        logits = model(input_ids=ids, attention_mask=mask, **keep).logits[:, -1, :]
        rows.append(torch.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(rows)


# ---------------------------------------------------------------- OpenAI-compatible server backend

SERVER_TIMEOUT = 300.0  # seconds one request may take in all (connect, wait, read); --server-timeout
CONNECT_TIMEOUT = 10.0
RETRIES = 2  # on refused / reset connections and 429 / 502 / 503 / 504 only: a greedy request has no side effect
MAX_RESPONSE = 64 << 20


class _Retry(Exception):
    """A failure after which sending the same request again is safe (nothing was answered)."""


class ServerBackend:
    """Greedy chat completions from an OpenAI-compatible server (concurrent requests; the server batches).

    The server applies the model's chat template and its tokenizer; ``check_prompts`` compares them with the local
    ones where the server can say (vLLM's /tokenize), and ``check_first_tokens`` compares what it generated with the
    local model's greedy first token, so a server that serves another model is an error, not a wrong audit. Every
    request has a deadline (``timeout`` seconds in all, ``connect_timeout`` to connect); only failures that were not
    answered are retried. ``flag`` / ``name_flag`` name the options in messages (--server or --base-server).
    """

    remote = True

    def __init__(self, url: str, served_model: str, tokenizer=None, timeout: float = SERVER_TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT,
                 flag: str = "--server", name_flag: str = "--served-model", retries: int = RETRIES):
        self.flag, self.name_flag = flag, name_flag
        self.base = _api_base(url, flag)
        self.root = self.base[: -len("/v1")]
        self.model, self.timeout, self.connect_timeout, self.retries = served_model, float(timeout), float(connect_timeout), retries
        self.tok = tokenizer
        self.special = [s for s in getattr(tokenizer, "all_special_tokens", []) if s] if tokenizer is not None else []
        self.info: dict = {}
        self.checks: dict = {"url": self.base, "model": served_model}
        listed = self.models()
        names = [m.get("id") for m in listed]
        if served_model not in names:
            raise AuditError(f"the server at {self.base} ({flag}) does not serve a model named {served_model!r}; it serves: "
                             f"{', '.join(map(str, names)) or 'nothing'} (pass one of these to {name_flag}, or point {flag} at the server of that model)")
        self.info = next(m for m in listed if m.get("id") == served_model)

    def models(self) -> list[dict]:
        """The models the server lists at /v1/models (each a dict with at least "id")."""
        data = self._request("GET", self.base + "/models", None, timeout=min(self.timeout, 60.0))
        rows = data.get("data") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise AuditError(f"{self.base}/models answered without a 'data' list; is {self.flag} an OpenAI-compatible server (vLLM, SGLang, llama.cpp, transformers serve)?")
        return [m for m in rows if isinstance(m, dict) and "id" in m]

    # -- checks -----------------------------------------------------------------------------
    def check_prompts(self, prompts: list, local_ids: list[list[int]], max_new_tokens: int) -> None:
        """Before any generation: the server's context holds the longest prompt plus ``max_new_tokens`` (where it says
        its max_model_len), and its chat template and tokenizer give the local token ids (where it has vLLM's /tokenize)."""
        need = max(map(len, local_ids), default=0) + max_new_tokens
        mml = self.info.get("max_model_len")
        if isinstance(mml, int) and mml < need:
            raise AuditError(f"the server at {self.base} ({self.flag}) serves {self.model!r} with max_model_len {mml}, but the longest prompt "
                             f"({need - max_new_tokens} tokens) plus --max-new-tokens {max_new_tokens} needs {need}: restart it with "
                             f"--max-model-len {need} or more, or lower --max-new-tokens")
        checked = 0
        for prompt, ids in list(zip(prompts, local_ids))[:2]:
            body = {"model": self.model, "messages": as_messages(prompt), "add_generation_prompt": True, "add_special_tokens": False}
            data = self._request("POST", self.root + "/tokenize", body, timeout=min(self.timeout, 60.0), optional=True)
            if data is None or not isinstance(data.get("tokens"), list):
                self.checks["template"] = "not checked: the server has no /tokenize endpoint (the chat template is assumed to be the model directory's)"
                return
            theirs = [int(t) for t in data["tokens"]]
            if theirs != list(ids):
                at = next((i for i, (a, b) in enumerate(zip(theirs, ids)) if a != b), min(len(theirs), len(ids)))
                show = (lambda t: repr(self.tok.decode(t[max(0, at - 3): at + 3])) if self.tok is not None else str(t[max(0, at - 3): at + 3]))
                raise AuditError(f"the server at {self.base} ({self.flag}) formats prompts differently from the local tokenizer and chat template: "
                                 f"prompt {prompt!r} is {len(theirs)} tokens there and {len(ids)} here, first difference at token {at} "
                                 f"(server {show(theirs)}, local {show(list(ids))}). Serve the same model directory with its own chat template "
                                 f"(no --chat-template override), or audit the directory the server serves")
            checked += 1
        self.checks["template"] = f"same token ids as the local chat template on {checked} prompt(s) (/tokenize)"

    def check_first_tokens(self, completions: dict[str, list[Completion]], logprobs: dict[str, torch.Tensor], min_agree: float = 0.5,
                           min_informative: int = 4) -> None:
        """The server's answers open with the local model's greedy first token on most prompts of each set; else it serves
        another model (e.g. the base where the ablated one was meant) and the audit would mix two models."""
        if self.tok is None:
            return
        seen = {}
        for k, comps in completions.items():
            agree, n = first_token_agreement(comps, logprobs[k], self.tok)
            seen[k] = {"agree": agree, "of": n}
            if n >= min_informative and agree < min_agree * n:
                raise AuditError(f"the server at {self.base} ({self.flag}) does not seem to serve the model audited here as {self.model!r}: its "
                                 f"answers to the {k} prompts open with the local model's greedy first token on only {agree} of {n} prompts. "
                                 f"Check that {self.flag} serves this model directory (not the base or the ablated one by mistake) and that "
                                 f"{self.name_flag} names it")
        self.checks["first_token_agreement"] = seen

    # -- generation -------------------------------------------------------------------------
    def extend(self, prompts: list, completions: list[Completion], cap: int, batch_size: int = 16) -> list[Completion]:
        """The same answers up to ``cap`` tokens: greedy decoding is asked again with the larger limit (every server can)."""
        return self.complete(prompts, cap, batch_size)

    def complete(self, prompts: list, max_new_tokens: int = 128, batch_size: int = 16, progress=None) -> list[Completion]:
        pool = ThreadPoolExecutor(max_workers=max(1, batch_size))
        try:
            futs = [pool.submit(self._one, p, max_new_tokens) for p in prompts]
            out = []
            for f in futs:
                out.append(f.result())
                if progress is not None:
                    progress(1)
            return out
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # after an error: queued requests are dropped, running ones end by their deadline

    def _one(self, prompt, max_new_tokens: int) -> Completion:
        body = {"model": self.model, "messages": as_messages(prompt), "max_tokens": max_new_tokens, "temperature": 0.0,
                "top_p": 1.0, "stream": False, "seed": 0}
        data = self._request("POST", self.base + "/chat/completions", body, timeout=self.timeout)
        try:
            choice = data["choices"][0]
            msg = choice.get("message") or {}
            content = msg.get("content") or ""
            server_reasoning = msg.get("reasoning_content") or msg.get("reasoning") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise AuditError(f"the server at {self.base} ({self.flag}) answered without choices[0].message: {json.dumps(data)[:300]}") from None
        reasoning, answer = split_reasoning(content, self.special)
        reasoning = "\n".join(x for x in (str(server_reasoning).strip(), reasoning) if x)
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        n = int((data.get("usage") or {}).get("completion_tokens") or 0)
        text = _strip(content, self.special)
        return Completion(_prompt_text(prompt), text, reasoning, answer, finish, n)

    # -- transport --------------------------------------------------------------------------
    def _request(self, method: str, url: str, body: dict | None, timeout: float, optional: bool = False) -> dict | None:
        """One JSON request with a deadline of ``timeout`` seconds in all; retried (with a pause) only where it was not
        answered. ``optional``: an endpoint the server may lack (404 / 405 / 400 / 501 give None)."""
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            try:
                return self._once(method, url, body, deadline, timeout, optional)
            except _Retry as e:
                attempt += 1
                pause = 0.25 * 2 ** attempt
                if attempt > self.retries or time.monotonic() + pause >= deadline:
                    raise AuditError(f"{e} (after {attempt} attempt(s)); {self._advice()}") from None
                time.sleep(pause)

    def _advice(self) -> str:
        return f"check that the server is up and serves {self.model!r} there, or fix {self.flag}"

    def _once(self, method: str, url: str, body: dict | None, deadline: float, timeout: float, optional: bool) -> dict | None:
        import http.client
        import socket
        import threading
        import urllib.parse

        u = urllib.parse.urlsplit(url)
        conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        left = deadline - time.monotonic()
        conn = conn_cls(u.hostname, u.port, timeout=max(0.05, min(self.connect_timeout, left)))
        where = f"the server at {self.base} ({self.flag})"
        try:
            try:
                conn.connect()
            except ConnectionRefusedError:
                raise _Retry(f"cannot reach {where}: connection refused") from None
            except (socket.timeout, TimeoutError):
                raise AuditError(f"cannot reach {where}: no connection within {min(self.connect_timeout, left):.0f} s; {self._advice()}") from None
            except OSError as e:
                raise AuditError(f"cannot reach {where} ({e.strerror or e}); {self._advice()}") from None
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json", "Authorization": "Bearer none", "Accept": "application/json"}
            expired = threading.Event()

            def expire():  # the deadline covers the whole exchange: a server that trickles bytes is cut off too
                expired.set()
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), expire)
            watchdog.daemon = True
            watchdog.start()
            try:
                conn.sock.settimeout(max(0.05, deadline - time.monotonic()))
                conn.request(method, u.path + (f"?{u.query}" if u.query else ""), body=data, headers=headers)
                resp = conn.getresponse()
                chunks, size = [], 0
                while True:
                    chunk = resp.read1(1 << 16)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > MAX_RESPONSE:
                        raise AuditError(f"{where} sent more than {MAX_RESPONSE >> 20} MB for {u.path}; is {self.flag} an OpenAI-compatible server?")
                    chunks.append(chunk)
                if expired.is_set():
                    raise TimeoutError
            except (socket.timeout, TimeoutError):
                raise AuditError(f"{where} did not answer {method} {u.path} within {timeout:.0f} s; it may be overloaded or stuck: "
                                 f"check its log, or allow more time with --server-timeout") from None
            except (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError, http.client.IncompleteRead, OSError) as e:
                if expired.is_set():
                    raise AuditError(f"{where} did not answer {method} {u.path} within {timeout:.0f} s; it may be overloaded or stuck: "
                                     f"check its log, or allow more time with --server-timeout") from None
                if isinstance(e, (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError)):
                    raise _Retry(f"{where} closed the connection without answering {method} {u.path}") from None
                raise AuditError(f"{where}: {method} {u.path} failed ({type(e).__name__}: {e}); {self._advice()}") from None
            except http.client.HTTPException as e:
                raise AuditError(f"{where}: {method} {u.path} failed ({type(e).__name__}: {e}); {self._advice()}") from None
            finally:
                watchdog.cancel()
            raw = b"".join(chunks)
            if resp.status != 200:
                detail = raw.decode("utf-8", "replace")[:300]
                if optional and resp.status in (400, 404, 405, 422, 501):
                    return None
                if resp.status in (429, 502, 503, 504):
                    raise _Retry(f"{where} answered {method} {u.path} with HTTP {resp.status}: {detail}")
                if resp.status == 404 and u.path.endswith("/models"):
                    raise AuditError(f"{where} has no {u.path} (HTTP 404); {self.flag} takes the address of an OpenAI-compatible server "
                                     "(vLLM, SGLang, llama.cpp, transformers serve), e.g. http://127.0.0.1:8000")
                raise AuditError(f"{where} answered {method} {u.path} with HTTP {resp.status}: {detail} ({self._advice()}, and {self.name_flag})")
            try:
                return json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                if optional:
                    return None
                raise AuditError(f"{where} did not answer {u.path} with JSON; is {self.flag} an OpenAI-compatible server?") from None
        finally:
            conn.close()


def first_token_agreement(completions: list[Completion], logprobs: torch.Tensor, tokenizer) -> tuple[int, int]:
    """(prompts whose completion opens with the greedy first token of ``logprobs`` [n, V], prompts where that token says
    something: it decodes to visible text)."""
    agree = n = 0
    top = logprobs.argmax(-1).tolist()
    for c, t in zip(completions, top):
        first = tokenizer.decode([t], skip_special_tokens=True).strip()
        if not first:
            continue  # end of sequence, a special or blank token: the text cannot show it
        n += 1
        opened = any(x.lstrip().startswith(first) for x in (c.text, c.reasoning))  # a reasoning parser may have moved the opening
        if opened or (re.fullmatch(r"<(think|thinking|reasoning)>", first, re.I) and c.reasoning):
            agree += 1
    return agree, n


def _api_base(url: str, flag: str = "--server") -> str:
    """'http://host:port', '.../v1' or '.../v1/' -> 'http://host:port/v1'."""
    u = str(url).strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", u):
        raise AuditError(f"{flag} {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000)")
    return u if u.endswith("/v1") else u + "/v1"
