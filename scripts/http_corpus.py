#!/usr/bin/env python3
"""The reliability review's HTTP requests (../shared/docs/reviews/2026-12-04-reliability.md, cases C1-C7, S2-S4,
M1-M7, X1) against a running `flashflex serve`, each with the answer it should get, so the next review starts from
here instead of from scratch.

    python scripts/http_corpus.py http://127.0.0.1:8000 [--engine llama-server|python] [--api-key KEY] [--json]

Sends one request per case (bounded: 60 s each), checks the status, that an error names its problem without the
server's internals (no traceback, no source path), and that /health still answers after it: a case that kills the
server is reported as such and ends the run. Exit 0 when every case got its answer, 1 otherwise. Standard library
only. tests/test_front_door.py runs the same table against both engines.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time
from urllib.parse import urlparse

# (case, path, body, llama-server engine's status, python engine's status). Paths are llama-server's; the python
# engine serves llama-cpp-python's /extras/(de)tokenize (EXTRAS), answers one prompt per request and has no
# logprobs. M5 is sent as text/plain.
CORPUS: list[tuple[str, str, dict | bytes, int, int]] = [
    ("C1", "/v1/completions", {"prompt": "hi", "max_tokens": 4, "grammar": "root ::= (((("}, 400, 400),
    ("C2", "/v1/completions", {"prompt": "hi", "max_tokens": 4, "grammar": "root ::= foo"}, 400, 400),
    ("C3", "/v1/completions", {"prompt": "hi", "max_tokens": 4, "grammar": 'root ::= root "a" | "a"'}, 400, 400),
    ("C4", "/v1/completions", {"prompt": "hi", "max_tokens": 4,
                               "grammar": "root ::= " + "(" * 20000 + '"a"' + ")" * 20000}, 400, 400),
    ("C5", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                    "response_format": {"type": "json_object", "schema": {"enum": []}}}, 400, 400),
    ("C6", "/detokenize", {"tokens": [999999999]}, 400, 400),
    ("C7", "/detokenize", {"tokens": [-1]}, 400, 400),
    ("S2", "/v1/completions", b'{"prompt":"The capital of France is","max_tokens":8,"temperature":NaN}', 400, 400),
    ("S3", "/v1/completions", {"prompt": "hi", "max_tokens": 4, "logit_bias": {"-259942": 100}}, 400, 400),
    ("S4", "/v1/completions", {"prompt": "hi", "max_tokens": 4, "n": 1000}, 400, 400),
    ("M1", "/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2}, 200, 400),
    ("M2", "/v1/completions", b'{"prompt":"Hello \\ud800 world","max_tokens":4}', 400, 400),
    ("M3", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "logit_bias": {"abc": 1}}, 200, 400),
    ("M4", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "logprobs": 100000}, 200, 400),
    ("M5", "/v1/completions", b'{"prompt":"hi","max_tokens":2}', 200, 200),
    ("M6", "/tokenize", b"{", 400, 400),
    ("M7", "/v1/embeddings", {"input": "hello"}, 501, 501),
    ("model", "/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}],
                                       "max_tokens": 2}, 200, 200),
]
EXTRAS = {"/detokenize": "/extras/detokenize", "/tokenize": "/extras/tokenize"}
INTERNALS = ("Traceback", 'File "', ".py\", line", "site-packages")


def path_for(path: str, engine: str) -> str:
    return EXTRAS.get(path, path) if engine == "python" else path


def request(host: str, port: int, method: str, path: str, body: bytes = b"", *, key: str | None = None,
            content_type: str = "application/json", timeout: float = 60) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"Content-Type": content_type}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    try:
        conn.request(method, path, body=body or None, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def alive(host: str, port: int) -> bool:
    try:
        return request(host, port, "GET", "/health", timeout=10)[0] == 200
    except OSError:
        return False


def run_case(host: str, port: int, case: tuple, engine: str, key: str | None) -> dict:
    name, path, body, want_llama, want_python = case
    want = want_python if engine == "python" else want_llama
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    t0 = time.monotonic()
    problems = []
    try:
        status, data = request(host, port, "POST", path_for(path, engine), raw, key=key,
                               content_type="text/plain" if name == "M5" else "application/json")
    except OSError as exc:
        status, data = None, repr(exc).encode()
    if status != want:
        problems.append(f"status {status}, expected {want}")
    if status is not None and status >= 400:
        text = data.decode("utf-8", "replace")
        try:
            message = json.loads(text)["error"]["message"]
            if not message:
                problems.append("the error has no message")
        except (ValueError, KeyError, TypeError):
            problems.append("the error is not an OpenAI-style JSON error")
        if any(s in text for s in INTERNALS):
            problems.append("the answer shows the server's internals")
    up = alive(host, port)
    if not up:
        problems.append("the server no longer answers /health")
    return {"case": name, "status": status, "expected": want, "seconds": round(time.monotonic() - t0, 3),
            "ok": not problems, "problems": problems, "alive": up, "answer": data[:200].decode("utf-8", "replace")}


def body_before_key(host: str, port: int, key: str | None) -> list[dict]:
    """X1: 200 MiB announced, nothing sent: 401 without the key (when one is set), 413 with it, at once."""
    out = []
    for with_key in ([False, True] if key else [True]):
        t0 = time.monotonic()
        auth = f"Authorization: Bearer {key}\r\n" if (key and with_key) else ""
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
                      f"Content-Length: {200 << 20}\r\n\r\n".encode())
            head = s.recv(200)
        parts = head.split(b" ")
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        want = 413 if with_key else 401
        out.append({"case": f"X1 ({'key' if with_key else 'no key'})", "status": status, "expected": want,
                    "seconds": round(time.monotonic() - t0, 3), "ok": status == want,
                    "problems": [] if status == want else [f"status {status}, expected {want}"],
                    "alive": alive(host, port), "answer": head[:120].decode("latin-1")})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--engine", choices=("llama-server", "python"), default="llama-server",
                    help="which engine serves (their answers differ where noted in CORPUS)")
    ap.add_argument("--api-key", default=None, help="the server's --api-key, if it has one")
    ap.add_argument("--json", action="store_true", help="one JSON object per case instead of a table")
    args = ap.parse_args(argv)
    url = urlparse(args.url)
    if url.scheme != "http" or not url.hostname or not url.port:
        print(f"error: {args.url} is not http://HOST:PORT — give the address serve printed", file=sys.stderr)
        return 2
    host, port = url.hostname, url.port
    if not alive(host, port):
        print(f"error: nothing answers {args.url}/health — start flashflex serve first", file=sys.stderr)
        return 2
    results = body_before_key(host, port, args.api_key)
    for case in CORPUS:
        results.append(run_case(host, port, case, args.engine, args.api_key))
        if not results[-1]["alive"]:
            break
    for r in results:
        if args.json:
            print(json.dumps(r))
        else:
            mark = "ok " if r["ok"] else "BAD"
            print(f"{mark} {r['case']:<14} {str(r['status']):>4} (expected {r['expected']}) {r['seconds']:>7.3f} s"
                  + (f"  {'; '.join(r['problems'])}" if r["problems"] else ""))
    bad = [r for r in results if not r["ok"]]
    if not args.json:
        print(f"{len(results) - len(bad)} of {len(results)} cases answered as they should")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
