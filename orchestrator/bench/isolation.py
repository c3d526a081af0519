"""Isolation of one benchmark run: memory cgroups (v1 or v2), the page cache, and the disk's direct-read
bandwidth at a queue depth (the I/O roofline every figure is set against)."""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path
from typing import Callable

from orchestrator.errors import FlashflexError

Log = Callable[[str], None]


# What the interpreter, numpy and libllama occupy before any weight is loaded; the flashflex point plans with
# the cgroup limit minus this, so the whole process fits the cgroup (measured per run, see orchestrator.bench.worker).
PROCESS_SLACK = 64 << 20


# --------------------------------------------------------------------------------------------------------
# Platform: memory cgroups and the page cache


def cgroup_version() -> str | None:
    """'v2', 'v1' or None when no memory cgroup can be created here."""
    if os.geteuid() != 0:
        return None
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return "v2" if "memory" in Path("/sys/fs/cgroup/cgroup.controllers").read_text() else None
    if Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists():
        return "v1"
    return None


class MemoryCgroup:
    """A child memory cgroup with a hard limit; processes join it through `preexec`."""

    def __init__(self, name: str, limit_bytes: int):
        self.version = cgroup_version()
        if self.version is None:
            raise FlashflexError("memory cgroups are not available here", "run as root on Linux, or pass --no-cgroup")
        base = Path("/sys/fs/cgroup") if self.version == "v2" else Path("/sys/fs/cgroup/memory")
        self.path = base / name
        self.path.mkdir(exist_ok=True)
        if self.version == "v2":
            (self.path / "memory.max").write_text(str(limit_bytes))
            swap = self.path / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        self.limit = limit_bytes

    def preexec(self) -> None:  # runs in the child between fork and exec
        procs = self.path / ("cgroup.procs" if self.version == "v2" else "tasks")
        procs.write_text(str(os.getpid()))

    def peak_bytes(self) -> int | None:
        f = self.path / ("memory.peak" if self.version == "v2" else "memory.max_usage_in_bytes")
        try:
            return int(f.read_text().strip())
        except (OSError, ValueError):
            return None

    def oom_killed(self) -> bool:
        events = self.path / ("memory.events" if self.version == "v2" else "memory.oom_control")
        try:
            text = events.read_text()
        except OSError:
            return False
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key in ("oom_kill", "oom") and value.strip().isdigit() and int(value) > 0:
                return True
        return False

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def drop_page_cache() -> bool:
    """Write back and drop the page cache so the next run starts cold. False where not permitted."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------------
# The disk: direct-read bandwidth at a queue depth


def direct_read_bandwidth(path: Path, queue_depth: int, total_bytes: int = 1 << 30, chunk: int = 4 << 20) -> float:
    """Bytes/s of O_DIRECT reads of `path` by `queue_depth` threads, chunk-sized and spread over the file
    (cold: the page cache is dropped first; O_DIRECT bypasses it anyway)."""
    size = path.stat().st_size
    total_bytes = min(total_bytes, size - size % chunk)
    n_chunks = max(1, total_bytes // chunk)
    stride = max(chunk, (size // n_chunks) // chunk * chunk)
    return parallel_direct_reads([(path, i * stride, chunk) for i in range(n_chunks) if i * stride + chunk <= size],
                                 queue_depth)


def parallel_direct_reads(reads: list[tuple[Path, int, int]], queue_depth: int) -> float:
    """Bytes/s of O_DIRECT reads of (file, offset, bytes), page-aligned, by `queue_depth` threads taking them in
    order from one queue (the page cache is dropped first; O_DIRECT bypasses it anyway)."""
    if not reads:  # a file smaller than one read
        return 0.0
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    drop_page_cache()
    fds = {path: os.open(path, flags) for path in dict.fromkeys(p for p, _, _ in reads)}
    largest = max(n for _, _, n in reads)
    lock = threading.Lock()
    cursor = [0]

    def worker() -> None:
        buf = mmap.mmap(-1, largest)  # page-aligned, as O_DIRECT needs
        view = memoryview(buf)
        while True:
            with lock:
                if cursor[0] >= len(reads):
                    break
                path, off, n = reads[cursor[0]]
                cursor[0] += 1
            os.preadv(fds[path], [view[:n]], off)
        view.release()
        buf.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(max(1, queue_depth))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    return sum(n for _, _, n in reads) / seconds


