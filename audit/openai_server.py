"""Every request this tool sends to an OpenAI-compatible server (vLLM, SGLang, llama.cpp, `transformers serve`): the
generation backends (``--server``, ``--base-server``, audit/forward/generate.py) and the LLM judge (``--judge server:URL``,
audit/judgement/judges.py) share this one client.

httpx2 does the transport: HTTP, connection pooling, its connect and read timeouts, and its redirect policy (none is
ever followed: an answer 3xx is refused, since a redirect could send a request to another host). What the library
leaves to us is here, once:

- a deadline per request over everything (connect, send, wait, read, retries), so a server that trickles its answer a
  byte at a time is cut off like one that never answers (httpx2's timeouts are per read);
- a connection that could not be made or was closed without an answer, and answers 429 / 502 / 503 / 504, are sent
  again after a pause, within that deadline (a request here has no side effect: greedy generation, a tokenization, a
  listing); httpx2's transport retries only connections, and not within a deadline;
- at most ``MAX_RESPONSE`` bytes are read;
- an answer is JSON of the shape its caller reads (a JSON Schema per endpoint), else an AuditError naming the server,
  the endpoint and the flag: exit 2, never a traceback.

``ServerError`` (an AuditError) is a request that failed at the server (unreachable, timed out, an error status): a
caller that can carry on without one answer (the judge: that completion is unknown) catches it per request.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import jsonschema
from jsonschema.exceptions import best_match

from checks.errors import AuditError

CONNECT_TIMEOUT = 10.0  # seconds to open a connection
RETRIES = 2  # connections that could not be made, and answers worth sending again
RETRY_STATUS = (429, 502, 503, 504)
OPTIONAL_STATUS = (400, 404, 405, 422, 501)  # what a server without an optional endpoint answers
MAX_RESPONSE = 64 << 20  # bytes


class ServerError(AuditError):
    """A request that failed at the server: unreachable, no answer within its deadline, or an error status."""


def api_base(url: str, flag: str = "--server") -> str:
    """'http://host:port', '.../v1' or '.../v1/' -> 'http://host:port/v1'; AuditError naming ``flag`` for anything else."""
    u = str(url).strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", u):
        raise AuditError(f"{flag} {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000)")
    return u if u.endswith("/v1") else u + "/v1"


class OpenAIServer:
    """One server: ``get`` / ``post`` / ``post_many`` send JSON and return the answer's JSON, checked against ``schema``.

    ``what`` and ``flag`` name the server in messages ("the server at URL (--server)"); ``advice`` is what to check when
    it cannot be reached; ``timeout_flag`` the option that allows more time, if any.
    """

    def __init__(self, url: str, flag: str = "--server", what: str = "the server", timeout: float = 300.0,
                 connect_timeout: float = CONNECT_TIMEOUT, retries: int = RETRIES, advice: str | None = None, timeout_flag: str | None = None):
        self.base = api_base(url, flag)
        self.root = self.base[: -len("/v1")]
        self.flag, self.timeout, self.connect_timeout, self.retries = flag, float(timeout), float(connect_timeout), retries
        self.where = f"{what} at {self.base} ({flag})"
        self.advice = advice or f"check that it is up, or fix {flag}"
        self.timeout_flag = timeout_flag

    # -- the calls --------------------------------------------------------------------------------
    def get(self, path: str, schema: dict, timeout: float | None = None, optional: bool = False) -> Any:
        """GET base+path (``path`` starting with '/'); ``optional``: an endpoint the server may lack (None then)."""
        return _run(self._one("GET", path, None, schema, timeout, optional))

    def post(self, path: str, body: dict, schema: dict, timeout: float | None = None, optional: bool = False, at_root: bool = False) -> Any:
        """POST ``body`` to base+path (root+path with ``at_root``: vLLM's /tokenize lives outside /v1)."""
        return _run(self._one("POST", path, body, schema, timeout, optional, at_root))

    def post_many(self, path: str, bodies: list[dict], schema: dict, concurrency: int, progress: Callable[[int], None] | None = None,
                  keep_failures: bool = False) -> list:
        """POST each body, ``concurrency`` at a time (the server batches them), answers in order. The first error stops the
        rest; with ``keep_failures`` a ServerError takes that body's place instead (any other error still stops all)."""
        return _run(self._many(path, bodies, schema, max(1, concurrency), progress, keep_failures))

    # -- asyncio ----------------------------------------------------------------------------------
    def _client(self, connections: int) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(timeout=httpx2.Timeout(self.timeout, connect=self.connect_timeout), follow_redirects=False, trust_env=False,
                                  transport=httpx2.AsyncHTTPTransport(trust_env=False, limits=httpx2.Limits(max_connections=connections)),
                                  headers={"Authorization": "Bearer none", "Accept": "application/json"})

    async def _one(self, method, path, body, schema, timeout, optional, at_root=False):
        async with self._client(1) as client:
            return await self._request(client, method, (self.root if at_root else self.base) + path, body, schema,
                                       self.timeout if timeout is None else float(timeout), optional)

    async def _many(self, path, bodies, schema, concurrency, progress, keep_failures):
        gate = asyncio.Semaphore(concurrency)
        async with self._client(concurrency) as client:
            async def one(body):
                async with gate:
                    try:
                        answer = await self._request(client, "POST", self.base + path, body, schema, self.timeout, False)
                    except ServerError as e:
                        if not keep_failures:
                            raise
                        answer = e
                if progress is not None:
                    progress(1)
                return answer

            tasks = [asyncio.create_task(one(b)) for b in bodies]
            try:
                return await asyncio.gather(*tasks)
            finally:  # after an error: the requests still running are cancelled, not left to their deadline
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _request(self, client, method: str, url: str, body, schema: dict, timeout: float, optional: bool):
        """One request within ``timeout`` seconds in all, sent again (after a pause) only where nothing was answered."""
        path = httpx2.URL(url).path
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        late = (f"{self.where} did not answer {method} {path} within {timeout:g} s; it may be overloaded or stuck: check its log"
                + (f", or allow more time with {self.timeout_flag}" if self.timeout_flag else ""))
        attempt = 0
        while True:
            attempt += 1
            try:
                async with asyncio.timeout_at(deadline):
                    status, raw, location = await self._exchange(client, method, url, body)
            except (TimeoutError, httpx2.ReadTimeout, httpx2.WriteTimeout, httpx2.PoolTimeout):
                raise ServerError(late) from None
            except httpx2.ConnectTimeout:
                raise ServerError(f"cannot reach {self.where}: no connection within {self.connect_timeout:g} s; {self.advice}") from None
            except httpx2.ConnectError as e:
                status, raw, location = None, f"cannot reach {self.where}: {_connect_failure(e)}", None
            except (httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.WriteError):
                status, raw, location = None, f"{self.where} closed the connection without answering {method} {path}", None
            if status is None or status in RETRY_STATUS:  # nothing was answered: worth sending again, within the deadline
                what = raw if status is None else f"{self.where} answered {method} {path} with HTTP {status}: {_text(raw)}"
                pause = 0.25 * 2 ** attempt
                if attempt > self.retries or loop.time() + pause >= deadline:
                    raise ServerError(f"{what} (after {attempt} attempt(s)); {self.advice}")
                await asyncio.sleep(pause)
                continue
            if 300 <= status < 400:
                raise AuditError(f"{self.where} answered {method} {path} with a redirect (HTTP {status} to {location or 'nowhere'}); redirects "
                                 f"are never followed (one could lead to another host): point {self.flag} at the server itself")
            if status != 200:
                if optional and status in OPTIONAL_STATUS:
                    return None
                hint = (f"; {self.flag} takes the address of an OpenAI-compatible server (vLLM, SGLang, llama.cpp, transformers serve), "
                        "e.g. http://127.0.0.1:8000" if status == 404 else "")
                raise ServerError(f"{self.where} answered {method} {path} with HTTP {status}: {_text(raw)}{hint} ({self.advice})")
            return self._checked(raw, method, path, schema, optional)

    async def _exchange(self, client, method: str, url: str, body) -> tuple[int, bytes, str | None]:
        async with client.stream(method, url, json=body) as r:
            chunks, size = [], 0
            async for chunk in r.aiter_bytes():  # decoded: a compressed answer is bounded by what it expands to
                size += len(chunk)
                if size > MAX_RESPONSE:
                    raise AuditError(f"{self.where} sent more than {MAX_RESPONSE >> 20} MB for {r.request.url.path}; is {self.flag} an "
                                     "OpenAI-compatible server?")
                chunks.append(chunk)
            return r.status_code, b"".join(chunks), r.headers.get("location")

    def _checked(self, raw: bytes, method: str, path: str, schema: dict, optional: bool):
        """The answer's JSON, of the shape ``schema`` describes; an AuditError naming the server otherwise."""
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: not JSON, or an integer too long to read
            if optional:
                return None
            why = "nested too deeply" if isinstance(e, RecursionError) else "not JSON"
            raise AuditError(f"{self.where} answered {method} {path} with something that is {why}: {_text(raw)}; is {self.flag} an "
                             "OpenAI-compatible server?") from None
        err = best_match(jsonschema.Draft202012Validator(schema).iter_errors(data))
        if err is not None:
            raise AuditError(f"{self.where} answered {method} {path} with JSON of another shape than an OpenAI-compatible server's "
                             f"({err.json_path}: {err.message[:200]}); is {self.flag} such a server?")
        return data


def _run(coro):
    """Run ``coro`` to its end from synchronous code; from inside a running event loop (a notebook) in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _connect_failure(e: BaseException) -> str:
    """Why a connection could not be made, from the OS error under httpx2's (it says "All connection attempts failed")."""
    x: BaseException | None = e
    while x is not None:
        if isinstance(x, ConnectionRefusedError):
            return "connection refused"
        if isinstance(x, OSError) and x.strerror:
            return x.strerror
        x = x.__cause__ or x.__context__
    return str(e) or type(e).__name__


def _text(raw) -> str:
    """The start of an answer, for a message."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return text[:300]


# -- the shapes read (JSON Schema): what the callers use, nothing more ------------------------------

MODELS = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "array", "items": {"type": "object", "required": ["id"], "properties": {
        "id": {"type": "string"}, "max_model_len": {"type": ["integer", "null"]}}}}}}
CHAT = {"type": "object", "required": ["choices"], "properties": {
    "choices": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["message"], "properties": {
        "message": {"type": "object", "properties": {
            "content": {"type": ["string", "null"]}, "reasoning_content": {"type": ["string", "null"]}, "reasoning": {"type": ["string", "null"]}}},
        "finish_reason": {"type": ["string", "null"]}}}},
    "usage": {"type": ["object", "null"], "properties": {"completion_tokens": {"type": ["integer", "null"], "minimum": 0}}}}}
TOKENIZE = {"type": "object", "required": ["tokens"], "properties": {"tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}}}
