"""The direct-read bandwidth of the device a model lives on, at several queue depths: what `-tp auto` chooses
prefetch threads from. Probed once per device (O_DIRECT reads of the model file itself, so the page cache plays no
part), cached under the cache root's `readspeed/`, re-probed on demand (`flashflex plan --reprobe`) and when a
larger file can give a truer answer: a disk a host caches (a virtual one) serves a small file's blocks from that
cache, fast at one thread and no faster at four, which says nothing about a model of several GiB. Each depth is
measured in interleaved rounds over blocks no other round reads, and its median kept: one round of this host's
disk swings by more than the gap between two depths."""

from __future__ import annotations

import json
import mmap
import os
import statistics
import threading
import time
from pathlib import Path

from orchestrator import fsutil
from orchestrator.paths import cache_root

QUEUE_DEPTHS = (1, 2, 4)
CHUNK = 4 << 20  # the runtime's read job (k_chunk)
PROBE_BYTES = 256 << 20  # per queue depth and round, at most
ROUNDS = 3  # interleaved, each depth's median kept
MIN_SEGMENT_CHUNKS = 16  # a measurement of fewer reads says little: a smaller file's segments read the same blocks


def cache_file(path: Path) -> Path:
    st = path.stat()
    return cache_root() / "readspeed" / f"dev-{os.major(st.st_dev)}-{os.minor(st.st_dev)}.json"


def _probe_depth(fd: int, offsets: list[int], depth: int) -> float:
    lock = threading.Lock()
    cursor = [0]
    failed: list[OSError] = []

    def worker() -> None:
        buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
        try:
            while True:
                with lock:
                    if cursor[0] >= len(offsets) or failed:
                        return
                    off = offsets[cursor[0]]
                    cursor[0] += 1
                os.preadv(fd, [buf], off)
        except OSError as exc:
            failed.append(exc)
        finally:
            buf.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(depth)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise failed[0]
    return len(offsets) * CHUNK / max(time.perf_counter() - t0, 1e-9)


def _segments(size: int) -> tuple[list[list[int]], int]:
    """Offsets of the probe's ROUNDS x depths segments of reads, each spread over the whole file and, where the
    file is large enough, reading blocks no other segment reads; and the distinct bytes they cover."""
    n_seg = ROUNDS * len(QUEUE_DEPTHS)
    per = min(PROBE_BYTES, size // n_seg) // CHUNK
    if per >= MIN_SEGMENT_CHUNKS:  # disjoint: segment k reads chunks k, k + n_seg, ... of a grid over the file
        stride = size // (n_seg * per) // CHUNK * CHUNK
        return [[(k + n_seg * i) * stride for i in range(per)] for k in range(n_seg)], n_seg * per * CHUNK
    per = min(PROBE_BYTES, size) // CHUNK  # a small file: every segment reads the same blocks
    stride = (size // max(per, 1)) // CHUNK * CHUNK
    offsets = [i * stride for i in range(per) if i * stride + CHUNK <= size]
    return [list(offsets) for _ in range(n_seg)], len(offsets) * CHUNK


def probe(path: Path) -> tuple[dict[int, float], int] | None:
    """Bytes/s of O_DIRECT reads of `path` by 1, 2 and 4 threads (each the median of ROUNDS interleaved rounds, the
    depths' order turned from one round to the next), and the distinct bytes the probe read; None where O_DIRECT is
    unavailable (the page cache would answer instead of the device) or the file is smaller than two read jobs."""
    size = path.stat().st_size
    if size // CHUNK < 2 or not hasattr(os, "O_DIRECT"):
        return None
    segments, distinct = _segments(size)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None
    try:
        return _rounds(fd, segments), distinct
    except OSError:
        return None
    finally:
        os.close(fd)


def _rounds(fd: int, segments: list[list[int]]) -> dict[int, float]:
    """Each depth's median over ROUNDS rounds, segment after segment, the depths' order turned each round."""
    rates: dict[int, list[float]] = {depth: [] for depth in QUEUE_DEPTHS}
    for r in range(ROUNDS):
        turned = QUEUE_DEPTHS[r % len(QUEUE_DEPTHS):] + QUEUE_DEPTHS[:r % len(QUEUE_DEPTHS)]
        for i, depth in enumerate(turned):
            rates[depth].append(_probe_depth(fd, segments[r * len(QUEUE_DEPTHS) + i], depth))
    return {depth: statistics.median(v) for depth, v in rates.items()}


def measured(path: Path, *, refresh: bool = False) -> dict[int, float] | None:
    """The device's probe, from the cache unless `refresh`, or unless it was made with fewer distinct bytes than
    `path` gives (a smaller file, or a probe of an older flashflex): then probed again with `path` and cached."""
    where = cache_file(path)
    if where.is_file() and not refresh:
        try:
            cached = json.loads(where.read_text())
            rates = {int(k): float(v) for k, v in cached["bytes_per_s"].items()}
            if int(cached.get("distinct_bytes", 0)) >= _segments(path.stat().st_size)[1]:
                return rates
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # a damaged entry: probe again
    result = probe(path)
    if result is None:
        return None
    rates, distinct = result
    where.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.atomic_file(where, "w") as f:
        json.dump({"probed_with": str(path), "distinct_bytes": distinct, "rounds": ROUNDS, "bytes_per_s": rates}, f)
    return rates
