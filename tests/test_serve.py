"""`flashflex serve` answers OpenAI-style requests on loopback with the patched library."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = [pytest.mark.native, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_completes_a_prompt(patched_llama):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "serve", "--port", str(port), "--ctx", "256",
                             "--threads", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ))
    try:
        base = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up within 60 s"
            time.sleep(0.5)
        reply = httpx.post(f"{base}/completions", json={"prompt": "The capital of France is", "max_tokens": 4,
                                                         "temperature": 0}, timeout=60)
        assert reply.status_code == 200
        body = reply.json()
        assert body["choices"][0]["text"]
        assert body["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
