"""The direct-read bandwidth of the device a model lives on, at several queue depths: what `-tp auto` chooses
prefetch threads from. Probed once per device (O_DIRECT reads of the model file itself, so the page cache plays no
part), cached under the cache root's `readspeed/`, re-probed on demand (`flashflex plan --reprobe`)."""

from __future__ import annotations

import json
import mmap
import os
import threading
import time
from pathlib import Path

from orchestrator import fsutil
from orchestrator.paths import cache_root

QUEUE_DEPTHS = (1, 2, 4)
CHUNK = 4 << 20  # the runtime's read job (k_chunk)
PROBE_BYTES = 256 << 20  # per queue depth, at most


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


def probe(path: Path) -> dict[int, float] | None:
    """Bytes/s of O_DIRECT reads of `path` by 1, 2 and 4 threads; None where O_DIRECT is unavailable (the page
    cache would answer instead of the device) or the file is smaller than two read jobs."""
    size = path.stat().st_size
    n = min(PROBE_BYTES, size) // CHUNK
    if n < 2 or not hasattr(os, "O_DIRECT"):
        return None
    stride = (size // n) // CHUNK * CHUNK
    offsets = [i * stride for i in range(n) if i * stride + CHUNK <= size]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None
    try:
        return {depth: _probe_depth(fd, offsets, depth) for depth in QUEUE_DEPTHS}
    except OSError:
        return None
    finally:
        os.close(fd)


def measured(path: Path, *, refresh: bool = False) -> dict[int, float] | None:
    """The device's probe, from the cache unless `refresh` (then probed again and cached)."""
    where = cache_file(path)
    if where.is_file() and not refresh:
        try:
            return {int(k): float(v) for k, v in json.loads(where.read_text())["bytes_per_s"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # a damaged entry: probe again
    result = probe(path)
    if result is not None:
        where.parent.mkdir(parents=True, exist_ok=True)
        with fsutil.atomic_file(where, "w") as f:
            json.dump({"probed_with": str(path), "bytes_per_s": result}, f)
    return result
