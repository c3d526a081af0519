"""The build cache key and toolchain checks (the build itself runs in `make install`)."""

from __future__ import annotations

import pytest

from orchestrator import build, vendor
from orchestrator.errors import FlashflexError

from conftest import REPO, flashflex


def test_key_depends_on_series_backend_and_flags():
    pin = vendor.load_pin(REPO)
    base = build.build_key(pin, "abc", build.Backend.cpu, ["-DX=1"])
    assert base == build.build_key(pin, "abc", build.Backend.cpu, ["-DX=1"])
    assert base != build.build_key(pin, None, build.Backend.cpu, ["-DX=1"])  # --stock is its own entry
    assert base != build.build_key(pin, "abd", build.Backend.cpu, ["-DX=1"])
    assert base != build.build_key(pin, "abc", build.Backend.cuda, ["-DX=1"])
    assert base != build.build_key(pin, "abc", build.Backend.cpu, ["-DX=2"])


def test_series_hash_reaches_cmake_only_for_patched_builds():
    assert any(a.startswith("-DFLASHFLEX_SERIES_HASH=abc") for a in build.cmake_args_for(build.Backend.cpu, "abc", []))
    assert not any("FLASHFLEX" in a for a in build.cmake_args_for(build.Backend.cpu, None, []))
    assert "-DGGML_CUDA=ON" in build.cmake_args_for(build.Backend.cuda, "abc", [])


def test_missing_cmake_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(FlashflexError, match="cmake is not installed"):
        build.check_toolchain(build.Backend.cpu)


def test_missing_compiler_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(build.shutil, "which", lambda name: "/usr/bin/cmake" if name == "cmake" else None)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(FlashflexError, match="compiler"):
        build.check_toolchain(build.Backend.cpu)


@pytest.mark.native
def test_unchanged_rebuild_reuses_the_cached_wheel(patched_llama):
    result = flashflex("build", "--no-install", "--json")
    assert result.returncode == 0, result.stderr
    import json

    summary = json.loads(result.stdout)
    assert summary["cached"] is True
    assert summary["seconds"] < 60
