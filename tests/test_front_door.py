"""The front door of the llama-server engine (orchestrator.front_door): the reliability review's HTTP cases
(docs in ../shared/docs/reviews/2026-12-04-reliability.md: C1-C7, S2-S4, M1-M7, X1, X3, M8) and the serving issue's
promises under load (a bounded queue answered 503 with Retry-After, /health that never waits, a client that leaves
freeing its slot, answers cut by shutdown marked as cut). The parsing rules are checked alone; the rest against the
real server on 127.0.0.1, every request bounded in count and time."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from test_llama_server import LlamaServer

from orchestrator import front_door as fd

from conftest import REPO, flashflex

# --------------------------------------------------------------------------------------------------
# The rules, alone


@pytest.mark.parametrize("raw,code", [
    (b'{"prompt":"x","temperature":NaN}', "invalid_json"),
    (b'{"prompt":"x","temperature":Infinity}', "invalid_json"),
    (b'{"prompt":"Hello \\ud800 world"}', "invalid_unicode"),
    (b'{"messages":[{"role":"user","content":"a\\udfff"}]}', "invalid_unicode"),
    (b'{"messages": [}', "invalid_json"),
    (b'{', "invalid_json"),
    (b'\xff\xfe', "invalid_json"),
    (b'[1, 2]', "invalid_json"),
    (b'', "invalid_json"),
    (b'{"a":' + b'[' * 65 + b']' * 65 + b'}', "too_deep"),
    (b'{"a":' + b'[' * 100000 + b']' * 100000 + b'}', "too_deep"),
])
def test_bodies_llama_server_would_answer_with_a_500_are_400s(raw, code):
    with pytest.raises(fd.Refusal) as e:
        fd.parse_body(raw)
    assert e.value.status == 400 and e.value.code == code, e.value.message


def test_a_sound_body_passes_as_it_is():
    assert fd.parse_body(b'{"prompt":"caf\\u00e9 \xf0\x9f\x98\x80","a":[[1]],"t":0.5}')["t"] == 0.5


@pytest.mark.parametrize("grammar,depth", [
    ('root ::= "a"', 0), ('root ::= ("a" | ("b"))', 2), ('root ::= [a-z]+', 1),
    ('root ::= "((((" x', 0), ('root ::= "\\"(" ("a")', 1), ("root ::= " + "(" * 300 + '"a"' + ")" * 300, 300),
])
def test_grammar_depth_counts_groups_not_quoted_text(grammar, depth):
    assert fd.grammar_depth(grammar) == depth


@pytest.mark.parametrize("path,body,says", [
    ("/v1/completions", {"grammar": "root ::= " + "(" * 20000 + '"a"' + ")" * 20000}, "grammar nests deeper"),
    ("/detokenize", {"tokens": [999999999]}, "token id 999999999 is outside the vocabulary (0 to 99)"),
    ("/detokenize", {"tokens": [-1]}, "token id -1 is outside"),
    ("/detokenize", {"tokens": [1, True]}, "token id True"),
    ("/detokenize", {"tokens": "12"}, "must be a list"),
    ("/v1/completions", {"logit_bias": {"-259942": 100}}, "logit_bias[-259942]"),
    ("/v1/completions", {"logit_bias": {"100": 1}}, "token id 100 is outside"),
    ("/v1/completions", {"logit_bias": [[100, 1.0]]}, "logit_bias[0]"),
])
def test_requests_that_would_crash_or_wrap_are_refused(path, body, says):
    with pytest.raises(fd.Refusal) as e:
        fd.check_request(path, body, n_vocab=100)
    assert e.value.status == 400 and says in e.value.message, e.value.message


def test_what_passes_the_checks():
    fd.check_request("/v1/completions", {"grammar": 'root ::= ("a")', "logit_bias": {"5": 1, "hello": -1}}, 100)
    fd.check_request("/detokenize", {"tokens": [0, 99]}, 100)


def test_the_body_cap_follows_the_context():
    assert fd.body_cap(256) == fd.MIN_BODY_CAP
    assert fd.body_cap(32768) == 128 * 32768 + (64 << 10)


def test_the_key_comes_from_the_authorization_header():
    assert fd.authorized([(b"authorization", b"Bearer s3cret")], "s3cret")
    assert fd.authorized([(b"Authorization", b"bearer  s3cret ")], "s3cret")
    assert not fd.authorized([(b"authorization", b"Bearer wrong")], "s3cret")
    assert not fd.authorized([(b"authorization", b"Basic s3cret")], "s3cret")
    assert not fd.authorized([], "s3cret")


# --------------------------------------------------------------------------------------------------
# Against llama-server: one slot, one waiting place, a key, a short grace


KEY = "s3cret"


@pytest.fixture(scope="module")
def door(tools_build, tmp_path_factory):
    serve_file = tmp_path_factory.mktemp("front") / "serve.yaml"
    serve_file.write_text("server:\n  engine: llama-server\n  parallel: 1\n  queue: 1\n  api_key: s3cret\n"
                          "  shutdown_grace_s: 1\nmodels:\n  - context: {ctx: 2048}\n")
    srv = LlamaServer(str(serve_file), "--threads", "2")
    yield srv
    srv.stop()


def _request(port: int, method: str, path: str, body: bytes = b"", key: str | None = KEY,
             headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, dict, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=body or None, headers=h)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data


def _post(port: int, path: str, body: dict | bytes, **kw) -> tuple[int, dict, bytes]:
    return _request(port, "POST", path, body if isinstance(body, bytes) else json.dumps(body).encode(), **kw)


def _corpus():
    """scripts/http_corpus.py: the review's requests and the answers each engine should give."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("http_corpus", REPO / "scripts" / "http_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CORPUS = _corpus().CORPUS


def _ask(port: int, case: str, path: str, body, key: str | None) -> tuple[int, bytes]:
    headers = {"Content-Type": "text/plain"} if case == "M5" else None
    status, _, data = _post(port, path, body, key=key, headers=headers)
    if status >= 400:
        error = json.loads(data)["error"]
        assert error["message"] and "Traceback" not in error["message"] and ".py" not in error["message"], error
    return status, data


@pytest.mark.native
@pytest.mark.parametrize("case,path,body,status", [c[:4] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_the_review_s_requests_get_true_answers_and_the_server_lives(door, case, path, body, status):
    """Crashes become 4xx, 500s with internals become 400s naming the field; the server answers /health after."""
    got, data = _ask(door.port, case, path, body, KEY)
    assert got == status, (case, data[:300])
    assert door.get("/health")["status"] == "ok"


@pytest.fixture(scope="module")
def python_engine(patched_llama):
    from test_serve import Server

    srv = Server("--ctx", "256")
    yield srv
    srv.stop()


@pytest.mark.native
@pytest.mark.parametrize("case,path,body,status", [(*c[:3], c[4]) for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_the_python_engine_answers_the_same_requests_truly(python_engine, case, path, body, status):
    """The same corpus against --engine python (llama-cpp-python's server): grammars and schemas compiled before
    the model sees them (a NULL sampler would be a SIGSEGV), its extras' token ids checked."""
    path = {"/detokenize": "/extras/detokenize", "/tokenize": "/extras/tokenize"}.get(path, path)
    got, data = _ask(python_engine.port, case, path, body, None)
    assert got == status, (case, data[:300])
    assert python_engine.get("/health")["status"] == "ok"


@pytest.mark.native
def test_the_corpus_runner_passes_against_the_server(door):
    """The script the next review starts from, run as a reviewer would: every case answered as it should."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(REPO / "scripts" / "http_corpus.py"), door.base, "--api-key", KEY],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(CORPUS) + 2} of {len(CORPUS) + 2} cases answered as they should" in result.stdout


@pytest.mark.native
def test_the_key_is_checked_before_the_body_is_read_and_big_bodies_are_refused_unread(door):
    """X1: 200 MiB announced: 401 without the key, 413 with it, both before a byte of the body is sent."""
    for key, expected in ((None, b"401"), (KEY, b"413")):
        with socket.create_connection(("127.0.0.1", door.port), timeout=10) as s:
            auth = f"Authorization: Bearer {key}\r\n" if key else ""
            s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
                      f"Content-Length: {200 << 20}\r\n\r\n".encode())
            head = s.recv(200)
        assert head.split(b" ")[1] == expected, head
    status, _, _ = _post(door.port, "/v1/completions", {"prompt": "hi", "max_tokens": 2}, key="wrong")
    assert status == 401
    assert door.get("/health")["status"] == "ok"  # /health needs no key


def _hold(port: int, max_tokens: int = 1500) -> socket.socket:
    """A generation request for many tokens on a raw connection, left open (close it to hang up)."""
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
              f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return s


@pytest.mark.native
def test_beyond_the_slots_and_the_queue_the_answer_is_503_with_retry_after(door):
    held = [_hold(door.port) for _ in range(2)]  # one decoding, one waiting
    try:
        deadline = time.monotonic() + 30
        while door.get("/health")["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        health = door.get("/health")  # answered at once while both are in
        status, headers, data = _post(door.port, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    finally:
        for s in held:  # hang up: the front frees both (see the next test)
            s.close()
    assert health["generating"] == 1 and health["waiting"] == 1, health
    assert status == 503 and int(headers["retry-after"]) > 0, data
    assert json.loads(data)["error"]["code"] == "server_busy"
    deadline = time.monotonic() + 30
    while door.get("/health")["generating"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _post(door.port, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200


def _metric(door, name: str) -> float:
    status, _, text = _request(door.port, "GET", "/metrics")
    assert status == 200
    line = next(x for x in text.decode().splitlines() if x.startswith(f"llamacpp:{name} "))
    return float(line.split()[1])


@pytest.mark.native
def test_a_client_that_leaves_frees_its_slot(door):
    """X3: a non-streamed request for 1500 tokens whose client hangs up after 0.3 s: the front closes the upstream
    request and llama-server drops the task (it looks at the connection once a second while it waits), so far fewer
    than 1500 decode passes ran for it (llama-server's own counter), and the next request is served."""
    deadline = time.monotonic() + 30
    while _metric(door, "requests_processing") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    before = _metric(door, "n_decode_total")
    with _hold(door.port):
        time.sleep(0.3)
    deadline = time.monotonic() + 60
    while _metric(door, "requests_processing") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    ran = _metric(door, "n_decode_total") - before
    assert ran < 1000, ran
    status, _, _ = _post(door.port, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 200
    status, _, stats = _request(door.port, "GET", "/flashflex/stats")
    assert status == 200 and json.loads(stats)["client_left"] >= 1


@pytest.mark.native
@pytest.mark.parametrize("engine", ["llama-server", "python"])
def test_shutdown_marks_cut_answers_and_refuses_the_waiting(tools_build, tmp_path, engine):
    """M8: SIGTERM while one answer streams and another is non-streamed behind it: (after the llama-server engine's
    grace of 1 s; the python engine stops at once) the streamed one ends with an error event saying it was cut,
    the other gets 503 (not a truncated 200 with finish_reason "stop"); the server exits 0."""
    import signal

    serve_file = tmp_path / "serve.yaml"
    serve_file.write_text(f"server:\n  engine: {engine}\n  parallel: 1\n  shutdown_grace_s: 1\n"
                          "models:\n  - context: {ctx: 4096}\n" if engine == "llama-server" else
                          # the python engine stops at the next token; the grace only bounds a slow machine's
                          "server:\n  engine: python\n  shutdown_grace_s: 10\nmodels:\n  - context: {ctx: 4096}\n")
    srv = LlamaServer(str(serve_file), "--threads", "2")
    no_end = {"ignore_eos": True} if engine == "llama-server" else {"logit_bias": {"0": -100, "1": -100, "2": -100}}
    try:
        streamed: list[bytes] = []
        waiting: list[int] = []

        def stream() -> None:
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
            conn.request("POST", "/v1/completions", body=json.dumps({
                "prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0, "stream": True, **no_end}),
                headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            while chunk := r.read1(65536):
                streamed.append(chunk)

        def behind() -> None:
            waiting.append(_post(srv.port, "/v1/completions", {"prompt": "hi", "max_tokens": 3000, **no_end},
                                 key=None)[0])

        threads = [threading.Thread(target=stream), threading.Thread(target=behind)]
        threads[0].start()
        deadline = time.monotonic() + 30
        while not streamed and time.monotonic() < deadline:
            time.sleep(0.02)
        threads[1].start()
        time.sleep(0.3)
        code, err = srv.stop(signal.SIGTERM, timeout=30)
        for t in threads:
            t.join(30)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    text = b"".join(streamed).decode()
    assert code == 0, err[-2000:]
    assert '"code": "answer_cut"' in text and "[DONE]" not in text, text[-500:]
    assert waiting == [503]


def test_the_queue_belongs_to_the_llama_server_engine():
    result = flashflex("serve", "--engine", "python", "--queue", "3", timeout=60)
    assert result.returncode != 0 and "--queue applies to the llama-server engine" in result.stderr


def test_an_ipv6_address_is_printed_as_a_url_that_works():
    """M9: `--host ::1` printed http://::1:8000 (curl: malformed URL)."""
    from orchestrator.llama_server import url_of

    assert url_of("::1", 8000) == "http://[::1]:8000"
    assert url_of("127.0.0.1", 8000) == "http://127.0.0.1:8000"
