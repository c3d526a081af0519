"""The installed llama_cpp is ours: doctor, the C API, and the stock run path on the default model."""

from __future__ import annotations

import json

import pytest

from orchestrator import patches

from conftest import REPO, flashflex

pytestmark = pytest.mark.native


def test_library_reports_our_series(patched_llama):
    info = patched_llama.info()
    assert info["api_version"] >= 1
    assert info["series_hash"] == patches.series_hash(REPO)
    assert "info" in info["features"]
    assert "CPU" in info["backends"]


def test_a_library_from_another_series_is_refused_in_one_place(patched_llama, monkeypatch):
    """native.lib() is the one gate: a library built from another patch series than this checkout's is refused
    with the fix (whatever feature is asked for), unless FLASHFLEX_ANY_SERIES=1 (an A/B of two builds)."""
    from orchestrator import native

    monkeypatch.setattr(patches, "series_hash", lambda root=None: "0" * 64)
    native.lib.cache_clear()
    try:
        with pytest.raises(native.NotPatched, match="another patch series") as info:
            native.lib()
        assert "flashflex build" in info.value.one_line() and not native.is_patched()
        monkeypatch.setenv("FLASHFLEX_ANY_SERIES", "1")
        assert native.is_patched()
    finally:
        native.lib.cache_clear()


def test_doctor_reports_the_patched_library(patched_llama):
    result = flashflex("doctor", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["patched"]
    assert report["library_series_hash"] == report["series_hash"]
    assert report["ram_total"] > 0 and report["disk_free"] > 0


def test_doctor_fails_without_a_patched_library(tmp_path):
    # A fresh interpreter that cannot import llama_cpp: doctor must say so and exit non-zero.
    import os
    import subprocess
    import sys

    shadow = tmp_path / "llama_cpp"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "orchestrator", "doctor"], capture_output=True, text=True,
                            cwd=REPO, env=env)
    assert result.returncode != 0
    assert "not installed" in result.stderr


def test_run_json_on_the_default_model(patched_llama):
    result = flashflex("run", "--json", "-n", "8", "--prompt", "The capital of France is", "--threads", "2")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out["prompt_tokens"]) >= 2
    assert 1 <= len(out["tokens"]) <= 8
    assert isinstance(out["text"], str) and out["text"]
    for key in ("load_s", "prompt_s", "decode_s"):
        assert out[key] > 0
    assert out["peak_rss_bytes"] > 100 * 2**20  # the model is ~250 MB
