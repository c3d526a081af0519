"""How a model's decode steps go on this machine, measured by the runs themselves: the compute time of a
single-token step and the rate its streamed reads arrived at. The plan prices drafting's logits rows by them: a
drafted token's row is taken off the resident weights, so each token then streams that much more; where a step
computes for longer than its reads take, the prefetch threads read those bytes in the compute's shadow, and only
where decode is read-bound does each byte cost time. The runtime counts the time compute waited on reads, so a run
knows its compute per step: recorded after every streamed run (`run`, the benchmarks' runs), kept per model,
compute threads and build; a later plan reads the medians of the last few (this host's speed swings between
hours)."""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from orchestrator import fsutil
from orchestrator.paths import cache_root

KEEP = 5  # the last runs whose medians a plan reads
MIN_STEPS = 4  # single-token steps a run must have timed to record them


@dataclass(frozen=True)
class DecodeProfile:
    step_compute_seconds: float  # a single-token step's time less its wait on reads
    read_bytes_per_second: float  # streamed bytes over decode seconds: the reads as the run drove them


def compute_threads(threads: int | None) -> int:
    """The compute threads a run uses: as asked, else llama-cpp-python's default (half the CPUs)."""
    return threads if threads else max(1, (os.cpu_count() or 1) // 2)


def _key(model: Path, threads: int | None) -> str:
    from orchestrator import native

    st = model.stat()
    raw = json.dumps([str(model.resolve()), st.st_size, st.st_mtime_ns, compute_threads(threads),
                      native.info().get("series_hash", "unknown")])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def cache_file(model: Path, threads: int | None) -> Path:
    return cache_root() / "computespeed" / f"{_key(model, threads)}.json"


def _read(where: Path) -> list[tuple[float, float]]:
    try:
        runs = json.loads(where.read_text())["runs"]
        return [(float(c), float(bw)) for c, bw in runs if float(c) > 0 and float(bw) > 0][-KEEP:]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # none yet, or a damaged entry: the next run records again


def measured(model: Path, threads: int | None) -> DecodeProfile | None:
    """The medians of the last KEEP runs; None before a streamed run of this model with these threads on this
    build has measured them, or where the build cannot say."""
    try:
        runs = _read(cache_file(model, threads))
    except Exception:  # no patched library to name the build: nothing was recorded for it
        return None
    if not runs:
        return None
    return DecodeProfile(statistics.median(c for c, _ in runs), statistics.median(bw for _, bw in runs))


def record(model: Path, threads: int | None, profile: DecodeProfile) -> None:
    """Add one run's profile."""
    if not (profile.step_compute_seconds > 0 and profile.read_bytes_per_second > 0):
        return
    where = cache_file(model, threads)
    runs = (_read(where) + [(profile.step_compute_seconds, profile.read_bytes_per_second)])[-KEEP:]
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        with fsutil.atomic_file(where, "w") as f:
            json.dump({"model": str(model), "threads": threads, "runs": runs}, f)
    except OSError:
        pass  # a cache that cannot be written (read-only, full) costs later plans the measurement, not this run


def profile_of(steps: list[tuple[float, float]], bytes_read: int, decode_seconds: float) -> DecodeProfile | None:
    """A run's profile from its timed single-token steps, each (seconds, seconds waited on reads), and its decode
    phase's streamed bytes and seconds; None with fewer than MIN_STEPS steps or nothing read."""
    if len(steps) < MIN_STEPS or bytes_read <= 0 or decode_seconds <= 0:
        return None
    return DecodeProfile(statistics.median(max(0.0, s - w) for s, w in steps), bytes_read / decode_seconds)
