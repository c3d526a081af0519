"""How a model's decode goes, measured by its runs (orchestrator.computespeed): what a plan prices drafting's
rows by."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import computespeed
from orchestrator.computespeed import DecodeProfile


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "decode.json"
    monkeypatch.setattr(computespeed, "cache_file", lambda model, threads: where)
    return where


def test_a_plan_reads_the_medians_of_the_last_runs(cache: Path, tmp_path: Path):
    model = tmp_path / "m.gguf"
    assert computespeed.measured(model, 2) is None  # never run
    # the first falls out: only the last KEEP count
    for c, bw in ((0.9, 9e9), (0.040, 1.2e9), (0.044, 1.0e9), (0.041, 1.4e9), (0.043, 1.1e9), (0.042, 1.3e9)):
        computespeed.record(model, 2, DecodeProfile(c, bw))
    assert len(json.loads(cache.read_text())["runs"]) == computespeed.KEEP
    got = computespeed.measured(model, 2)
    assert got is not None
    assert got.step_compute_seconds == pytest.approx(0.042) and got.read_bytes_per_second == pytest.approx(1.2e9)
    computespeed.record(model, 2, DecodeProfile(0.0, 1e9))  # nothing measured: nothing recorded
    assert computespeed.measured(model, 2) == got


def test_a_damaged_entry_is_measured_again(cache: Path, tmp_path: Path):
    cache.write_text("{not json")
    assert computespeed.measured(tmp_path / "m.gguf", 2) is None
    computespeed.record(tmp_path / "m.gguf", 2, DecodeProfile(0.05, 1e9))
    assert computespeed.measured(tmp_path / "m.gguf", 2) == DecodeProfile(0.05, 1e9)


def test_an_unwritable_cache_costs_the_measurement_not_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setattr(computespeed, "cache_file", lambda model, threads: blocked / "decode.json")
    computespeed.record(tmp_path / "m.gguf", 2, DecodeProfile(0.05, 1e9))  # no exception
    assert computespeed.measured(tmp_path / "m.gguf", 2) is None


def test_a_step_s_compute_is_its_time_less_its_wait_on_reads():
    steps = [(0.050, 0.010), (0.045, 0.0), (0.060, 0.020), (0.041, 0.0)]
    profile = computespeed.profile_of(steps, 100 << 20, 2.0)
    assert profile is not None
    assert profile.step_compute_seconds == pytest.approx(0.0405)  # median of 40, 45, 40, 41 ms
    assert profile.read_bytes_per_second == pytest.approx(50 * 2**20)
    assert computespeed.profile_of(steps[:3], 100 << 20, 2.0) is None  # too few to say
    assert computespeed.profile_of(steps, 0, 2.0) is None  # nothing streamed
    assert computespeed.profile_of([(0.01, 0.02)] * 4, 1, 1.0).step_compute_seconds == 0.0  # never negative
