"""vendor sync: the offline path from the pinned sdist, idempotence, and bad sdists."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator import gitutil, vendor
from orchestrator.errors import FlashflexError

from conftest import REPO


def _fresh_root(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "vendor").mkdir(parents=True)
    shutil.copy(REPO / "vendor" / "PIN.json", root / "vendor" / "PIN.json")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root


def test_offline_sync_checks_out_the_pin_and_is_idempotent(tmp_path, synced_vendor):
    root = _fresh_root(tmp_path)
    pin = vendor.load_pin(root)
    messages: list[str] = []
    first = vendor.sync(root, allow_network_git=False, log=messages.append)
    assert first.source == "sdist"
    assert gitutil.rev(root / "vendor" / "llama.cpp", "HEAD") == pin.commit
    assert gitutil.rev(root / "vendor" / "llama.cpp", vendor.BASE_REF) == pin.commit
    assert (root / "vendor" / "llama.cpp" / "include" / "llama.h").exists()
    # The sdist's sha256 was checked on the way in.
    assert vendor.sha256_file(vendor.sdist_path(pin.lcp_version)) == pin.sdist_sha256
    second = vendor.sync(root, allow_network_git=False, log=messages.append)
    assert second.source == "already"


def test_sdist_with_the_wrong_hash_is_refused(tmp_path):
    bogus = tmp_path / "llama_cpp_python-0.0.0.tar.gz"
    bogus.write_bytes(gzip.compress(b"not a tarball"))
    with pytest.raises(FlashflexError, match="sha256"):
        vendor.verify_sdist(bogus, "0" * 64)


def test_corrupt_sdist_leaves_nothing_in_vendor(tmp_path, monkeypatch):
    root = _fresh_root(tmp_path)
    bogus = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    bogus.write_bytes(b"\x1f\x8b" + b"garbage" * 100)
    pin = vendor.load_pin(root)
    with pytest.raises(FlashflexError, match="not a readable sdist"):
        vendor._populate_from_sdist(root, root / "vendor" / "llama.cpp", bogus, pin, log=lambda m: None)
    leftovers = [p.name for p in (root / "vendor").iterdir() if p.name != "PIN.json"]
    assert leftovers == []


def test_download_with_mismatched_hash_is_refused_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHFLEX_HOME", str(tmp_path / "cache"))

    def fake_pip_download(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "llama_cpp_python-0.0.1.tar.gz").write_bytes(b"tampered")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(vendor.subprocess, "run", fake_pip_download)
    with pytest.raises(FlashflexError, match="expected"):
        vendor.ensure_sdist("0.0.1", "f" * 64, log=lambda m: None)
    assert not vendor.sdist_path("0.0.1").exists()


def test_malformed_pin_is_one_clear_error(tmp_path):
    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / "PIN.json").write_text(json.dumps({"llama_cpp": {}}))
    with pytest.raises(FlashflexError, match="malformed"):
        vendor.load_pin(tmp_path)
