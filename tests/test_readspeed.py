"""The direct-read probe `-tp auto` chooses prefetch threads from (orchestrator.readspeed): what it reads, how it
summarises its rounds, and when a cached probe is replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import readspeed

GiB = 1 << 30


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_a_large_files_rounds_read_disjoint_blocks_spread_over_the_file():
    size = 3 * GiB + 12345
    segments, distinct = readspeed._segments(size)
    assert len(segments) == readspeed.ROUNDS * len(readspeed.QUEUE_DEPTHS)
    offsets = [o for seg in segments for o in seg]
    assert len(set(offsets)) == len(offsets)  # no block read twice: a host's cache cannot answer a later round
    assert distinct == len(offsets) * readspeed.CHUNK
    for seg in segments:  # each spans the file, so no round reads only its start or its end
        assert len(seg) * readspeed.CHUNK <= readspeed.PROBE_BYTES
        assert min(seg) < size // 8 and max(seg) > size // 2 and max(seg) + readspeed.CHUNK <= size
        assert all(o % readspeed.CHUNK == 0 for o in seg)


def test_a_small_files_rounds_read_it_whole():
    size = 100 << 20
    segments, distinct = readspeed._segments(size)
    assert all(seg == segments[0] for seg in segments)
    assert distinct == len(segments[0]) * readspeed.CHUNK and distinct > size - readspeed.CHUNK - (size // 25)


def test_each_depth_is_the_median_of_rounds_in_turned_order(monkeypatch):
    """One round of a swinging disk must not decide: each depth keeps its median, and the order the depths run in
    turns from one round to the next."""
    order: list[int] = []
    first = {1: [9.0, 1.0, 1.1], 2: [2.0, 2.1, 0.1], 4: [3.0, 3.2, 30.0]}

    def fake(fd, offsets, depth):
        order.append(depth)
        return first[depth].pop(0)

    monkeypatch.setattr(readspeed, "_probe_depth", fake)
    segments, _ = readspeed._segments(3 * GiB)
    assert readspeed._rounds(-1, segments) == {1: 1.1, 2: 2.0, 4: 3.2}
    assert order == [1, 2, 4, 2, 4, 1, 4, 1, 2]


def test_a_probe_from_a_smaller_file_is_replaced_by_one_from_a_larger(monkeypatch, tmp_path):
    """The first model planned on a device used to decide its threads for good: a 100 MiB model, which a host's
    cache serves at one thread as fast as at four, chose one thread for a 3.5 GiB model that reads 1.2x faster with
    four. A file that gives the probe more distinct bytes probes again; a smaller one keeps the larger's answer."""
    monkeypatch.setattr(readspeed, "cache_root", lambda: tmp_path / "cache")
    probed: list[str] = []

    def fake_probe(path: Path):
        probed.append(path.name)
        rate = {"small.gguf": 1.6e9, "large.gguf": 1.3e9}[path.name]
        return {1: rate, 2: rate * 1.1, 4: rate * 1.2}, readspeed._segments(path.stat().st_size)[1]

    monkeypatch.setattr(readspeed, "probe", fake_probe)
    small = _sparse(tmp_path / "small.gguf", 100 << 20)
    large = _sparse(tmp_path / "large.gguf", 3 * GiB)
    assert readspeed.measured(small)[1] == pytest.approx(1.6e9)
    assert readspeed.measured(small)[1] == pytest.approx(1.6e9) and probed == ["small.gguf"]  # cached
    assert readspeed.measured(large)[1] == pytest.approx(1.3e9) and probed == ["small.gguf", "large.gguf"]
    assert readspeed.measured(small)[1] == pytest.approx(1.3e9)  # the larger file's answer stands
    assert readspeed.measured(large)[1] == pytest.approx(1.3e9) and len(probed) == 2
    cached = json.loads(readspeed.cache_file(large).read_text())
    assert cached["probed_with"] == str(large) and cached["distinct_bytes"] == readspeed._segments(3 * GiB)[1]
    # a probe cached by an older flashflex (no distinct_bytes) is made again
    readspeed.cache_file(large).write_text(json.dumps({"probed_with": "x", "bytes_per_s": {"1": 5.0}}))
    assert readspeed.measured(small)[1] == pytest.approx(1.6e9) and len(probed) == 3
    assert readspeed.measured(large, refresh=True)[1] == pytest.approx(1.3e9) and len(probed) == 4
