"""`flashflex serve`: llama-cpp-python's OpenAI-compatible server, each model opened through flashflex's plan.

llama-cpp-python's router (`/v1/completions`, `/v1/chat/completions` with the model's chat template, SSE
streaming, `/v1/models`, API key) is used as it is; flashflex supplies what it does not have:

- the model proxy: every served model is a `Prepared` (RunConfig → plan, banks), validated at startup and opened
  on demand through `api.Handle` (one open model at a time, as llama-cpp-python does, so budgets do not add up);
- a request gate in front of the router: malformed JSON or invalid fields → 400, an unknown model → 404,
  max_tokens above the cap or the context → 400, never a 500 that shows the server's internals;
- queueing instead of interruption: concurrent requests wait their turn (llama-cpp-python's default stops a
  streaming answer whenever another request arrives);
- `/health` (no auth, never waits for a generation) and `/flashflex/stats` (mode, plan summary, resident and
  streamed bytes, bank hit rate, bytes read, the last request's tokens/s);
- shutdown: SIGINT/SIGTERM stop accepting, stop in-flight generations at their next token, close the models
  (publishing a routing trace they record) and exit within `shutdown_grace_s`.
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass
from typing import Any, Callable

from orchestrator import api
from orchestrator.config import ServerConfig
from orchestrator.endpoints import check_can_listen, is_loopback  # noqa: F401 (serve_cmd asks here)
from orchestrator.run.execution import runtime_summary


@dataclass
class ServedEntry:
    alias: str
    prepared: api.Prepared


class ShutdownFlag:
    """Set once on SIGINT/SIGTERM; generations check it at every token (a llama_cpp StoppingCriteria)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, _input_ids, _logits) -> bool:
        return self.event.is_set()


class ModelProxy:
    """What llama-cpp-python's router expects of its LlamaProxy (call with a model name → a Llama; iterate the
    names; free), over flashflex Handles. Requests are serialised by the router's own lock."""

    def __init__(self, entries: list[ServedEntry], server: ServerConfig, stop: ShutdownFlag,
                 log: Callable[[str], None] = print):
        self.entries = {e.alias: e for e in entries}
        self.default = entries[0].alias
        self.server = server
        self.stop = stop
        self.log = log
        self.current: api.Handle | None = None
        self.current_alias: str | None = None
        self.last_stats: dict[str, Any] = {}  # runtime stats snapshot after each request, per alias
        self._lock = threading.Lock()
        self._running = 0  # threads inside llama.cpp right now (a suspended, abandoned stream does not count)
        self._idle = threading.Condition()
        self._load(self.default)

    # -- the LlamaProxy interface --------------------------------------------------------------------
    def __call__(self, model: str | None = None):
        alias = model if model in self.entries else self.default
        if alias != self.current_alias:
            self._load(alias)
        assert self.current is not None
        return self.current.llm

    def __iter__(self):
        return iter(self.entries)

    def free(self, timeout: float | None = None) -> bool:
        """Close the open model once no thread is inside llama.cpp (False: one still was after `timeout` s)."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._running == 0, timeout=timeout):
                return False
            with self._lock:
                if self.current is not None:
                    self.current.close()
                    self.current = None
                    self.current_alias = None
        return True

    @contextlib.contextmanager
    def running(self):
        """Around every call into llama.cpp from a request, so free() never closes a model in use."""
        with self._idle:
            self._running += 1
        try:
            yield
        finally:
            with self._idle:
                self._running -= 1
                self._idle.notify_all()

    # -- flashflex ----------------------------------------------------------------------------------
    def _load(self, alias: str) -> None:
        with self._lock:
            if self.current is not None:
                self.log(f"unloading {self.current_alias}")
                self.current.close()
                self.current = None
                self.current_alias = None
            entry = self.entries[alias]
            self.log(f"loading {alias} ({entry.prepared.spec.mode})")
            handle = api.Handle.open(entry.prepared)
            _meter(handle, self, alias)
            self.current, self.current_alias = handle, alias

    def vocab_size(self, alias: str | None) -> int:
        """The vocabulary of the model a request names (the default one for an unknown name)."""
        from orchestrator.modelfile.reader import vocab_size

        entry = self.entries.get(alias or self.default) or self.entries[self.default]
        return vocab_size(entry.prepared.settings.model)

    def grammar_compiles(self, grammar: str) -> bool:
        """Whether llama.cpp parses `grammar` into a sampler (built and freed at once) for the open model."""
        import llama_cpp

        with self._lock:
            handle = self.current if self.current is not None else None
            if handle is None:
                return True  # nothing loaded to check against: the request loads a model and is checked then
            vocab = handle.llm._model.vocab
            sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            return False
        llama_cpp.llama_sampler_free(sampler)
        return True

    def context_of(self, alias: str | None) -> int:
        entry = self.entries.get(alias or self.default) or self.entries[self.default]
        return entry.prepared.settings.ctx

    def stats(self) -> dict[str, Any]:
        models = {}
        for alias, entry in self.entries.items():
            info = entry.prepared.summary()
            info["loaded"] = alias == self.current_alias
            info.update(self.last_stats.get(alias, {}))
            models[alias] = info
        return {"engine": "python", "default": self.default, "loaded": self.current_alias, "models": models}


def _meter(handle: api.Handle, proxy: ModelProxy, alias: str) -> None:
    """Wrap the model's create_completion (every completion and chat request ends up there): add the shutdown
    stop, time the request, turn errors inside a stream into an error event, snapshot the runtime's stats."""
    llm = handle.llm
    original = llm.create_completion

    def finish(meter: api.RequestMeter) -> None:
        handle.last_request = meter.result()
        snapshot: dict[str, Any] = {"last_request": handle.last_request}
        snapshot.update(runtime_summary(handle.native_stats()))
        proxy.last_stats[alias] = snapshot

    def named(answer: dict[str, Any]) -> dict[str, Any]:
        """An answer names the model by its alias, not by the file's absolute path (llama-cpp-python's default)."""
        if answer.get("model") == llm.model_path:
            answer["model"] = alias
        return answer

    def create_completion(*args: Any, **kwargs: Any):
        import llama_cpp

        criteria = kwargs.get("stopping_criteria")
        stops = llama_cpp.StoppingCriteriaList([proxy.stop])
        if criteria:
            stops.extend(criteria)
        kwargs["stopping_criteria"] = stops
        meter = api.RequestMeter()
        if not kwargs.get("stream"):
            def each_token(_input_ids, _logits) -> bool:  # called once per generated token: times the first
                meter.token()
                return False

            stops.append(each_token)
            with proxy.running():
                result = original(*args, **kwargs)
            meter.tokens = result.get("usage", {}).get("completion_tokens", meter.tokens)
            finish(meter)
            return named(result)
        chunks = original(*args, **kwargs)  # a generator: nothing runs until it is iterated

        def stream():
            # Each step runs llama.cpp; between steps the stream is suspended and may be abandoned by a client
            # that hung up, so only the steps count as running.
            try:
                while True:
                    with proxy.running():
                        chunk = next(chunks, None)
                    if chunk is None:
                        break
                    if chunk["choices"] and chunk["choices"][0].get("finish_reason") is None:
                        meter.token()  # the last chunk carries only the finish reason
                    yield named(chunk)
            except ValueError as exc:  # e.g. the prompt exceeds the context: an error event, then [DONE]
                yield {"error": {"message": str(exc), "type": "invalid_request_error", "param": None,
                                 "code": "context_length_exceeded" if "context window" in str(exc) else None}}
            finally:
                finish(meter)

        return stream()

    llm.create_completion = create_completion


class RequestGate:
    """ASGI middleware in front of the router, with the llama-server engine's front-door rules (orchestrator.
    front_door): the API key from the headers before any body byte is read, a body cap (413), strict JSON and token
    ids in range (400); then, for the completion paths, what llama-cpp-python would turn into a crash or a 500
    with its internals: a grammar or JSON schema that does not compile (a NULL sampler it adds unchecked: SIGSEGV),
    several prompts, best_of/n above 1, logprobs, non-integer logit_bias keys, an unknown model when several are
    served, max_tokens above the cap or the context. The body is handed on once checked, as JSON."""

    GUARDED = {"/v1/completions": "completion", "/v1/chat/completions": "chat",
               "/v1/engines/copilot-codex/completions": "completion"}
    # llama-cpp-python's extras: checked like llama-server's /tokenize and /detokenize
    ALIASES = {"/extras/tokenize": "/tokenize", "/extras/tokenize/count": "/tokenize",
               "/extras/detokenize": "/detokenize"}

    def __init__(self, app, proxy_ref: Callable[[], ModelProxy]):
        self.app = app
        self.proxy_ref = proxy_ref

    async def __call__(self, scope, receive, send):
        from orchestrator import front_door as fd

        path = scope.get("path", "")
        if scope["type"] != "http" or path == "/health":
            await self.app(scope, receive, send)
            return
        proxy = self.proxy_ref()
        key = proxy.server.api_key
        try:
            if key is not None and not fd.authorized(scope.get("headers", []), key):
                raise fd.Refusal(401, "invalid or missing API key (Authorization: Bearer KEY)", "invalid_api_key")
            if scope.get("method") != "POST":
                await self.app(scope, receive, send)
                return
            if proxy.stop.event.is_set():
                raise fd.Refusal(503, "the server is shutting down", "shutting_down", headers={"Retry-After": "5"})
            if path == "/v1/embeddings":
                raise fd.Refusal(501, "this server does not compute embeddings", "not_supported")
            body = await fd.read_body(scope, receive, fd.body_cap(max(proxy.context_of(None), 512)))
            data = fd.parse_body(body)
            fd.check_request(self.ALIASES.get(path, path), data, proxy.vocab_size(data.get("model")))
            kind = self.GUARDED.get(path)
            if kind is not None:
                data = self.check(kind, data)
                body = json.dumps(data).encode()
        except fd.ClientLeft:
            return
        except fd.Refusal as r:
            await fd.respond(send, r.status, r.body(), r.headers)
            return
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        # the body is JSON now, whatever the client called it (the router refuses other types with a 500)
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in (b"content-type",
                                                                                    b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await self.app({**scope, "headers": headers}, replay,
                       self._marking_cuts(send) if path in self.GUARDED else send)

    def _marking_cuts(self, send):
        """`send` for a generation: once shutdown stopped it, a whole answer becomes a 503 and a stream ends with an
        error event instead of [DONE], so a cut answer never looks complete (finish_reason "stop")."""
        from orchestrator import front_door as fd

        stopped = self.proxy_ref().stop.event
        cut_whole = streamed = marked = False

        async def send_marked(message):
            nonlocal cut_whole, streamed, marked
            if message["type"] == "http.response.start":
                streamed = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                               for k, v in message.get("headers", []))
                if stopped.is_set() and message["status"] == 200 and not streamed:
                    cut_whole = True
                    refusal = fd.Refusal(503, fd.CUT_WHOLE_MESSAGE, "answer_cut")
                    await fd.respond(send, 503, refusal.body())
                    return
            if message["type"] == "http.response.body":
                if cut_whole:
                    return  # the answer's bytes: replaced by the 503 above
                chunk = message.get("body", b"")
                if streamed and stopped.is_set() and b"data: [DONE]" in chunk:
                    message = {**message, "body": chunk.replace(b"data: [DONE]", fd.CUT_STREAM_EVENT)}
                    marked = True
                elif streamed and stopped.is_set() and not marked and not message.get("more_body"):
                    # the stream ends without [DONE] (sse-starlette stops streams itself on a shutdown signal)
                    await send({"type": "http.response.body", "body": fd.CUT_STREAM_EVENT + b"\r\n\r\n",
                                "more_body": True})
                    marked = True
            await send(message)

        return send_marked

    def check(self, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        """The request to hand on (a request without max_tokens gets the cap), or a Refusal."""
        data = self._check(kind, data)
        if not data.get("max_tokens") and self.proxy_ref().server.max_tokens_cap:  # None or 0: "unlimited"
            data["max_tokens"] = self.proxy_ref().server.max_tokens_cap
        return data

    def _check(self, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
        from pydantic import ValidationError

        from orchestrator.front_door import Refusal

        model_cls = CreateChatCompletionRequest if kind == "chat" else CreateCompletionRequest
        try:
            req = model_cls.model_validate(data)
        except ValidationError as exc:
            problems = []
            for err in exc.errors()[:5]:
                where = ".".join(str(p) for p in err.get("loc", ())) or "body"
                problems.append(f"{where}: {err.get('msg', 'invalid')}")
            raise Refusal(400, "invalid request: " + "; ".join(problems), "invalid_request",
                          str(exc.errors()[0].get("loc", ("body",))[0])) from None
        proxy = self.proxy_ref()
        if req.model is not None and req.model not in proxy.entries and len(proxy.entries) > 1:
            raise Refusal(404, f"model {req.model!r} is not served here; available: {', '.join(proxy.entries)}",
                          "model_not_found", "model")
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) > 1 and not all(isinstance(t, int) for t in prompt):
            raise Refusal(400, f"prompt: a list of {len(prompt)} prompts; this server answers one prompt per "
                               "request", "invalid_request", "prompt")
        for name in ("n", "best_of"):
            if isinstance(data.get(name), int) and data[name] > 1:
                raise Refusal(400, f"{name}: this server gives one choice per request (got {data[name]})",
                              "invalid_request", name)
        if data.get("logprobs") or data.get("top_logprobs"):
            raise Refusal(400, "logprobs: not available from this server (the model keeps only the last token's "
                               "logits)", "invalid_request", "logprobs")
        bias = data.get("logit_bias")
        if isinstance(bias, dict):
            for k in bias:
                if not k.lstrip("-").isdigit():
                    raise Refusal(400, f"logit_bias: keys are token ids (got {k[:20]!r})", "invalid_request",
                                  "logit_bias")
        if req.max_tokens is not None and req.max_tokens < 0:
            raise Refusal(400, f"max_tokens must be >= 0 (got {req.max_tokens})", "invalid_request", "max_tokens")
        ctx = proxy.context_of(req.model)
        cap = min(proxy.server.max_tokens_cap or ctx, ctx)
        if req.max_tokens is not None and req.max_tokens > cap:
            what = "the model's context" if cap == ctx else "this server's max_tokens cap"
            raise Refusal(400, f"max_tokens {req.max_tokens} exceeds {what} of {cap} tokens", "max_tokens_too_large",
                          "max_tokens")
        self._compile_grammars(data)
        return data

    def _compile_grammars(self, data: dict[str, Any]) -> None:
        """A grammar, or a JSON schema turned into one, compiled now against the loaded model's vocabulary:
        llama-cpp-python adds the sampler llama.cpp returns without checking it (NULL for a bad grammar)."""
        from orchestrator.front_door import Refusal

        grammars = []
        if isinstance(data.get("grammar"), str):
            grammars.append(("grammar", data["grammar"]))
        fmt = data.get("response_format")
        if isinstance(fmt, dict):
            schema = fmt.get("schema")
            if schema is None and isinstance(fmt.get("json_schema"), dict):
                schema = fmt["json_schema"].get("schema")
            if schema is not None:
                from llama_cpp.llama_grammar import json_schema_to_gbnf

                try:
                    grammars.append(("response_format", json_schema_to_gbnf(json.dumps(schema))))
                except Exception as exc:  # the converter raises anything from KeyError to ValueError
                    raise Refusal(400, f"response_format: the JSON schema cannot be turned into a grammar "
                                       f"({exc.__class__.__name__}: {str(exc)[:120]})", "invalid_schema",
                                  "response_format") from None
        for param, text in grammars:
            if not self.proxy_ref().grammar_compiles(text):
                what = "grammar does not parse" if param == "grammar" else "JSON schema gives a grammar that " \
                    "does not parse"
                raise Refusal(400, f"{param}: the {what} (llama.cpp's grammar parser refused it)", "invalid_grammar",
                              param)


def build_app(entries: list[ServedEntry], server: ServerConfig, log: Callable[[str], None] = print):
    """The ASGI app: llama-cpp-python's router over our proxy, the request gate, /health and /flashflex/stats.
    Loads the default model (like llama-cpp-python); returns (app, proxy, stop flag)."""
    from fastapi import Depends, FastAPI
    from llama_cpp.server import app as lcp_app
    from llama_cpp.server.settings import ServerSettings
    from starlette_context.middleware import RawContextMiddleware
    from starlette_context.plugins import RequestIdPlugin

    import orchestrator

    lcp_app.set_server_settings(ServerSettings(host=server.host, port=server.port, api_key=server.api_key,
                                               interrupt_requests=False))  # queue, do not interrupt
    stop = ShutdownFlag()
    proxy = ModelProxy(entries, server, stop, log)
    # the router's model source (llama-cpp-python's set_llama_proxy builds its own); ModelProxy is duck-typed
    lcp_app._llama_proxy = proxy  # type: ignore[assignment]

    app = FastAPI(title="flashflex", version=orchestrator.__version__)
    app.add_middleware(RawContextMiddleware, plugins=(RequestIdPlugin(),))
    app.include_router(lcp_app.router)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "stopping" if stop.event.is_set() else "ok", "loaded": proxy.current_alias,
                "models": list(proxy.entries)}

    @app.get("/flashflex/stats", dependencies=[Depends(lcp_app.authenticate)])
    async def stats() -> dict[str, Any]:
        return proxy.stats()

    gated = RequestGate(app, lambda: proxy)
    return gated, proxy, stop


def serve(entries: list[ServedEntry], server: ServerConfig, log: Callable[[str], None] = print,
          on_ready: Callable[[], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM; in-flight generations stop at their next token, models close, traces publish."""
    import asyncio
    import signal

    import uvicorn

    check_can_listen(server.host, server.port)
    app, proxy, stop = build_app(entries, server, log)  # loads the default model: errors surface before "serving"
    if on_ready is not None:
        on_ready()

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            # Unlike uvicorn's own handler, do not re-raise the signal after shutdown: we exit cleanly ourselves,
            # after closing the models (which publishes a routing trace they record).
            stop.event.set()  # generations stop at their next token
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    srv = Server(uvicorn.Config(app, host=server.host, port=server.port, log_level="warning",
                                timeout_graceful_shutdown=max(1, int(server.shutdown_grace_s))))
    try:
        asyncio.run(srv.serve())
    finally:
        stop.event.set()
        if not proxy.free(timeout=server.shutdown_grace_s + 2):
            log("warning: a generation did not stop in time; exiting without closing the model")
    log("server stopped")
