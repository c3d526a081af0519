"""The HTTP front of the llama-server engine: every request passes here before llama.cpp's server sees it.

llama-server listens on a private loopback port with a key only this process knows; clients talk to this front on
the address the user chose. Checks that must come before llama.cpp parses anything, and the server's promises under
load, live here, one place for every path:

- the API key from the headers before any byte of the body is read (401); a body cap from the Content-Length or
  while reading (413): a prompt longer than the context can hold is refused before it is tokenized;
- the body parsed strictly: JSON (no NaN, valid Unicode, nesting at most MAX_JSON_DEPTH deep), an object; a grammar
  nesting deeper than MAX_GRAMMAR_DEPTH (llama.cpp's parser recurses per level and overflows its stack: a crash);
  token ids outside the vocabulary (/detokenize, logit_bias) — 400s naming the field, where llama.cpp would answer a
  500 with its internals or die;
- a bounded wait queue: generation requests beyond the slots and `queue` waiting get 503 with Retry-After;
- a client that leaves closes the upstream request, so llama-server drops its slot at the next token;
- /health answered here at once, whatever the slots are doing;
- on shutdown: new requests 503, in-flight ones get the grace period, then a streamed answer still running ends with
  an error event saying it was cut, a non-streamed one a 503; llama-server is stopped after.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

# llama.cpp's grammar parser recurses once per nesting level (parentheses, brackets); 20,000 levels overflow its
# thread's stack (a SIGSEGV that takes every client down). Real grammars nest a few levels.
MAX_GRAMMAR_DEPTH = 256
# A JSON body nested deeper than this is not a request anyone means; its parsers recurse too.
MAX_JSON_DEPTH = 64
# Upper bound of a prompt's bytes per context token: no tokenizer makes a token of more (a byte-fallback token is 1
# byte; the longest merges are far below). A body bigger than this times the context cannot fit, whatever it says.
BYTES_PER_TOKEN = 128
MIN_BODY_CAP = 256 << 10
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/completion", "/completions",
                              "/chat/completions", "/infill", "/v1/responses"})
# The answers a shutdown gives a generation it cut (both engines): a whole answer becomes this 503; a stream ends with
# this event (its SSE `data:` line, no blank line after) instead of [DONE].
CUT_WHOLE_MESSAGE = "the server shut down while this answer was generated: it was cut"
CUT_STREAM_EVENT = ("data: " + json.dumps({"error": {"message": "the server shut down while this answer was "
                                                                "streamed: it was cut here", "type": "server_error",
                                                     "code": "answer_cut"}})).encode()
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer",
                        "upgrade", "proxy-authenticate", "proxy-authorization"})


class Refusal(Exception):
    """An answer given here instead of llama-server's: an HTTP status and one line."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> bytes:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return json.dumps({"error": {"message": self.message, "type": kind, "param": self.param,
                                     "code": self.code}}).encode()


def body_cap(ctx_per_slot: int) -> int:
    """The largest request body accepted: what the context could hold at BYTES_PER_TOKEN, and never below
    MIN_BODY_CAP (chat templates and JSON around a prompt)."""
    return max(MIN_BODY_CAP, BYTES_PER_TOKEN * ctx_per_slot + (64 << 10))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _depth_and_text(value: Any, limit: int) -> None:
    """Refuse nesting deeper than `limit` and strings that are not valid Unicode (lone surrogates), iteratively."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                raise Refusal(400, f"the request body nests deeper than {limit} levels", "too_deep")
            items = list(v.items()) if isinstance(v, dict) else [(None, x) for x in v]
            for k, x in items:
                if k is not None:
                    stack.append((k, depth))
                stack.append((x, depth + 1))
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise Refusal(400, "the request body holds a string that is not valid Unicode (a lone surrogate "
                                   "escape such as \\ud800)", "invalid_unicode") from None


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request's JSON object, strictly; a Refusal saying what is wrong otherwise."""
    try:
        data = json.loads(raw or b"null", parse_constant=_reject_constant)
    except RecursionError:
        raise Refusal(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", "too_deep") from None
    except ValueError as exc:  # includes UnicodeDecodeError and NaN/Infinity
        raise Refusal(400, f"the request body is not valid JSON ({str(exc).split(':')[0][:120]})",
                      "invalid_json") from None
    if not isinstance(data, dict):
        raise Refusal(400, "the request body must be a JSON object", "invalid_json")
    _depth_and_text(data, MAX_JSON_DEPTH)
    return data


def grammar_depth(grammar: str) -> int:
    """How deep a GBNF grammar's groups nest (parentheses and character classes; quoted text skipped)."""
    depth = deepest = 0
    quote = False
    escaped = False
    for ch in grammar:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif quote:
            quote = ch != '"'
        elif ch == '"':
            quote = True
        elif ch in "([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]":
            depth = max(0, depth - 1)
    return deepest


def _token_id(value: Any, n_vocab: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_vocab:
        raise Refusal(400, f"{what}: token id {str(value)[:40]} is outside the vocabulary (0 to {n_vocab - 1})",
                      "invalid_token", what.split("[")[0])


def check_request(path: str, data: dict[str, Any], n_vocab: int) -> None:
    """What llama-server would turn into a crash or a 500 with its internals: refused here, one line each."""
    grammar = data.get("grammar")
    if isinstance(grammar, str) and grammar_depth(grammar) > MAX_GRAMMAR_DEPTH:
        raise Refusal(400, f"grammar nests deeper than {MAX_GRAMMAR_DEPTH} levels", "grammar_too_deep", "grammar")
    if path == "/detokenize":
        tokens = data.get("tokens")
        if not isinstance(tokens, list):
            raise Refusal(400, "tokens: must be a list of token ids", "invalid_request", "tokens")
        for i, t in enumerate(tokens):
            _token_id(t, n_vocab, f"tokens[{i}]")
    bias = data.get("logit_bias")
    if isinstance(bias, dict):
        for key in bias:
            if key.lstrip("-").isdigit():  # an id; other keys are text llama-server tokenizes
                _token_id(int(key), n_vocab, f"logit_bias[{key[:20]}]")
    elif isinstance(bias, list):
        for i, pair in enumerate(bias):
            if isinstance(pair, list) and pair and isinstance(pair[0], int):
                _token_id(pair[0], n_vocab, f"logit_bias[{i}]")


def authorized(headers: list[tuple[bytes, bytes]], key: str) -> bool:
    import hmac

    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
    return False


@dataclass
class Counters:
    """What /health and /flashflex/stats report about the front."""

    started: float = field(default_factory=time.time)
    requests: int = 0
    generating: int = 0  # generation requests forwarded and not finished (in slots, or queued in llama-server)
    refused_busy: int = 0
    refused_bad: int = 0
    cut: int = 0
    client_left: int = 0


class FrontDoor:
    """The ASGI app in front of llama-server at `upstream` (http://127.0.0.1:PORT), which takes `internal_key`."""

    def __init__(self, upstream: str, internal_key: str, *, api_key: str | None, slots: int, queue: int,
                 ctx_per_slot: int, n_vocab: int, grace_s: float, summary: Callable[[], dict[str, Any]],
                 model_name: str = "model"):
        self.upstream, self.internal_key, self.api_key = upstream, internal_key, api_key
        self.slots, self.queue, self.n_vocab, self.grace_s = slots, queue, n_vocab, grace_s
        self.cap, self.ctx_per_slot = body_cap(ctx_per_slot), ctx_per_slot
        self.summary, self.model_name = summary, model_name
        self.counters = Counters()
        self.stopping = asyncio.Event()
        self.cut_now = asyncio.Event()
        self._client: Any = None

    # -- ASGI

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            await self._http(scope, receive, send)
        except Refusal as r:
            if r.status in (400, 413):
                self.counters.refused_bad += 1
            await respond(send, r.status, r.body(), r.headers)

    async def _lifespan(self, receive, send) -> None:
        import httpx

        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # No keep-alive to llama-server: its HTTP library closes an idle connection after a few seconds,
                # and a request sent on one it has just closed fails with no answer (seen as 4 of 394 requests
                # answered 502 under 32 clients for 60 s); a new loopback connection per request costs nothing
                # beside a generation, and holds none of llama-server's HTTP threads while idle.
                self._client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0),
                                                 limits=httpx.Limits(max_connections=None,
                                                                     max_keepalive_connections=0))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope, receive, send) -> None:
        path, method = scope.get("path", ""), scope.get("method", "GET")
        self.counters.requests += 1
        if path == "/health":  # never waits on a generation, never needs the key
            await respond(send, 200, json.dumps(self.health()).encode())
            return
        if self.api_key is not None and not authorized(scope.get("headers", []), self.api_key):
            raise Refusal(401, "invalid or missing API key (Authorization: Bearer KEY)", "invalid_api_key")
        if path == "/flashflex/stats":
            await respond(send, 200, json.dumps(self.stats(await self.runtime_counters())).encode())
            return
        if self.stopping.is_set():
            raise Refusal(503, "the server is shutting down", "shutting_down", headers={"Retry-After": "5"})
        body = await read_body(scope, receive, self.cap) if method in ("POST", "PUT", "PATCH") else b""
        generation = path in GENERATION_PATHS
        if body or method == "POST":
            check_request(path, parse_body(body), self.n_vocab)
        if generation and self.counters.generating >= self.slots + self.queue:
            self.counters.refused_busy += 1
            raise Refusal(503, f"the server is busy: {self.slots} slots decoding and {self.queue} requests waiting",
                          "server_busy", headers={"Retry-After": "2"})
        if generation:
            self.counters.generating += 1
        try:
            await self._forward(scope, receive, send, body, generation)
        finally:
            if generation:
                self.counters.generating -= 1

    async def _forward(self, scope, receive, send, body: bytes, generation: bool) -> None:
        """Hand the request to llama-server and its answer back, chunk by chunk; the client leaving, or the
        shutdown's grace running out, ends the upstream request."""
        import httpx

        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", [])
                   if k.lower().decode("latin-1") not in HOP_BY_HOP | {"host", "authorization"}]
        headers.append(("authorization", f"Bearer {self.internal_key}"))
        url = self.upstream + scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        request = self._client.build_request(scope["method"], url, headers=headers, content=body)
        left = asyncio.Event()

        async def watch_client() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    left.set()
                    return

        watcher = asyncio.create_task(watch_client())
        started = False

        async def step(task: asyncio.Task) -> Any:
            """The task's result; ClientLeft when the client hung up first, _Cut when the shutdown's grace ran out
            first (the task is then cancelled)."""
            result = await _first_of(task, left, self.cut_now)
            if result is None:
                raise ClientLeft() if left.is_set() else _Cut()
            return result

        try:
            try:
                response = await step(asyncio.create_task(self._client.send(request, stream=True)))
            except _Cut:
                self.counters.cut += 1
                raise Refusal(503, "the server shut down before this request was answered", "shutting_down") from None
            try:
                streamed = response.headers.get("content-type", "").startswith("text/event-stream")
                out_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()
                               if k.lower() not in HOP_BY_HOP]
                if not streamed:  # the whole answer first: a cut one becomes a 503, not a truncated 200
                    try:
                        whole = await step(asyncio.create_task(response.aread()))
                    except _Cut:
                        self.counters.cut += 1
                        raise Refusal(503, CUT_WHOLE_MESSAGE, "answer_cut") from None
                    out_headers.append((b"content-length", str(len(whole)).encode()))
                    await send({"type": "http.response.start", "status": response.status_code,
                                "headers": out_headers})
                    await send({"type": "http.response.body", "body": whole})
                    return
                await send({"type": "http.response.start", "status": response.status_code, "headers": out_headers})
                started = True
                chunks = response.aiter_raw().__aiter__()
                while True:
                    try:
                        chunk = await step(asyncio.create_task(chunks.__anext__()))
                    except StopAsyncIteration:
                        break
                    except _Cut:
                        self.counters.cut += 1
                        await send({"type": "http.response.body", "body": CUT_STREAM_EVENT + b"\n\n",
                                    "more_body": True})
                        break
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                await response.aclose()
        except ClientLeft:
            self.counters.client_left += 1
        except httpx.TransportError as exc:
            if started:  # the answer began: all that can be done is end it
                return
            raise Refusal(502, f"llama-server did not answer ({exc.__class__.__name__})", "upstream_error") from None
        finally:
            watcher.cancel()

    # -- what it reports

    def health(self) -> dict[str, Any]:
        c = self.counters
        return {"status": "stopping" if self.stopping.is_set() else "ok", "slots": self.slots,
                "generating": min(c.generating, self.slots), "waiting": max(0, c.generating - self.slots),
                "queue": self.queue}

    async def runtime_counters(self) -> dict[str, Any] | None:
        """The runtime's counters as llama-server reports them (GET /flashflex/stats, a route of our series): read
        while it decodes, without waiting for a slot. None when it does not answer within two seconds."""
        import httpx

        try:
            answer = await self._client.get(self.upstream + "/flashflex/stats", timeout=2.0,
                                            headers={"authorization": f"Bearer {self.internal_key}"})
            return answer.json() if answer.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def stats(self, counters: dict[str, Any] | None = None) -> dict[str, Any]:
        """The front's counters, and the model as the python engine reports it: its plan summary and, when
        llama-server answered, the runtime's counters (`runtime`) with the ones users read first."""
        from orchestrator.run.execution import runtime_summary

        c = self.counters
        model = {**self.summary(), "loaded": True, "ctx_per_slot": self.ctx_per_slot}  # ctx: the slots' one KV cache
        if counters is not None:
            model.update(runtime_summary({k: v for k, v in counters.items() if v is not None}))
        return {"engine": "llama-server", "slots": self.slots, "queue": self.queue, "body_cap_bytes": self.cap,
                "uptime_s": round(time.time() - c.started, 1), "requests": c.requests,
                "generating": c.generating, "refused_busy": c.refused_busy, "refused_bad_request": c.refused_bad,
                "cut_by_shutdown": c.cut, "client_left": c.client_left,
                "default": self.model_name, "loaded": self.model_name, "models": {self.model_name: model}}

    async def drain(self) -> None:
        """Shutdown: refuse new requests, give in-flight ones the grace period, then cut what is left."""
        self.stopping.set()
        deadline = time.monotonic() + self.grace_s
        while self.counters.generating and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.cut_now.set()
        end = time.monotonic() + 2.0
        while self.counters.generating and time.monotonic() < end:  # the cut answers' last bytes
            await asyncio.sleep(0.02)


class ClientLeft(Exception):
    """The client hung up (before its request was read whole, or while it was answered)."""


class _Cut(Exception):
    """The shutdown's grace ran out while a request was answered."""


async def read_body(scope, receive, cap: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `cap`: from Content-Length before
    reading, else while reading."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise Refusal(400, "Content-Length is not a number", "invalid_request") from None
            if declared > cap:
                raise _too_large(declared, cap)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientLeft()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            raise _too_large(size, cap)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _too_large(size: int, cap: int) -> Refusal:
    return Refusal(413, f"the request body ({size} bytes or more) is larger than this server takes ({cap} bytes: "
                        "more than the context can hold)", "request_too_large")


async def _first_of(task: asyncio.Task, *events: asyncio.Event) -> Any:
    """The task's result, or None when one of `events` is set first (the task is then cancelled)."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait([task, *waiters], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    if task in done:
        return task.result()
    task.cancel()
    return None


async def respond(send, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def new_internal_key() -> str:
    """The key llama-server takes on its private port: only this process sends it."""
    return secrets.token_urlsafe(24)
