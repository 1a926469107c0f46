"""A small OpenAI-compatible server in a thread, for the server backend's failure modes (slow, trickling, flaky, another
model, another chat template, hostile answers sent byte for byte). Real generation goes through `transformers serve`
(conftest.serve_model)."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Behaviour:
    """What the fake server does; every field may be changed while it runs."""

    def __init__(self, models=("m",), answer=lambda messages, max_tokens: ("Sure, here it is.", "stop", 5)):
        self.models = list(models)
        self.max_model_len: int | None = None
        self.answer = answer  # (messages, max_tokens) -> (content, finish_reason, completion_tokens)
        self.delay = 0.0  # seconds before a chat completion answers
        self.trickle: float | None = None  # seconds between the bytes of a chat completion's body
        self.fail_first: list[int] = []  # HTTP statuses the next chat completion requests get, in order
        self.tokenize = None  # (messages) -> token ids, or None: no /tokenize (404)
        self.raw: dict[str, tuple[int, bytes, dict]] = {}  # path -> (status, body, headers) sent as they are: hostile answers
        self.requests: list[tuple[str, str, dict | None]] = []


@contextlib.contextmanager
def fake_server(behaviour: Behaviour):
    """Serve ``behaviour`` on 127.0.0.1 (a free port); yields the URL."""
    b = behaviour

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, obj, trickle: float | None = None):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if trickle is None:
                self.wfile.write(body)
                return
            for i in range(len(body)):
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                time.sleep(trickle)

        def _send_raw(self) -> bool:
            if self.path not in b.raw:
                return False
            status, body, headers = b.raw[self.path]
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", **headers}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return True

        def do_GET(self):
            b.requests.append(("GET", self.path, None))
            if self._send_raw():
                return
            if self.path == "/v1/models":
                rows = [{"id": m, "object": "model", **({"max_model_len": b.max_model_len} if b.max_model_len else {})} for m in b.models]
                return self._send(200, {"object": "list", "data": rows})
            self._send(404, {"error": "not found"})

        def do_POST(self):
            data = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            b.requests.append(("POST", self.path, data))
            if self._send_raw():
                return
            if self.path == "/tokenize":
                if b.tokenize is None:
                    return self._send(404, {"detail": "Not Found"})
                ids = b.tokenize(data["messages"])
                return self._send(200, {"count": len(ids), "tokens": ids, "max_model_len": b.max_model_len or 4096})
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": "not found"})
            if b.fail_first:
                return self._send(b.fail_first.pop(0), {"error": "try again"})
            if data.get("model") not in b.models:
                return self._send(404, {"error": f"model {data.get('model')!r} not found"})
            time.sleep(b.delay)
            content, finish, n = b.answer(data["messages"], data.get("max_tokens"))
            self._send(200, {"id": "x", "object": "chat.completion", "model": data["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
                             "usage": {"completion_tokens": n}}, trickle=b.trickle)

    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # a client that gave up (a deadline, a refusal) is no server error
            if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
                super().handle_error(request, client_address)

    srv = Server(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
