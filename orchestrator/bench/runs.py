"""One run = one process (orchestrator.bench.worker), inside a memory cgroup with a cold page cache; and the
checks every sweep shares."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import psutil

from orchestrator import modes
from orchestrator.bench.isolation import MemoryCgroup, cgroup_version, drop_page_cache
from orchestrator.modes import BenchMode
from orchestrator.sizes import format_size

Log = Callable[[str], None]

# --------------------------------------------------------------------------------------------------------
# One run = one process


@dataclass
class Point:
    """One configuration to measure."""

    mode: BenchMode  # the record's label (see orchestrator.modes)
    budget_bytes: int | None  # the cgroup limit; None = no limit
    prefetch_threads: int | str | None = None  # a number, or "auto" (the record then says what the plan chose)
    slot_bank: int | None = None  # slot-bank: slots per layer; None = the planner's pick for the budget
    prefetch: str = "none"  # slot-bank: expert prefetch policy
    prefetch_ranks: int | None = None  # router-lookahead: top ranks read ahead (None = the default, a quarter of k)
    trace: str | None = None  # slot-bank: record a routing trace here; oracle modes: replay it

    @property
    def banked(self) -> bool:
        return modes.is_banked(self.mode)

    @property
    def label(self) -> str:
        budget = format_size(self.budget_bytes) if self.budget_bytes else "unlimited"
        tp = f" tp={self.prefetch_threads}" if self.prefetch_threads is not None else ""
        bank = f" N={self.slot_bank or 'auto'}" if self.banked else ""
        extra = f" +{self.prefetch}" if self.prefetch != "none" else ""
        extra += f"/r{self.prefetch_ranks}" if self.prefetch_ranks else ""
        extra += " +trace" if self.trace and self.mode == modes.SLOT_BANK else ""
        return f"{self.mode}{bank}{extra} @ {budget}{tp}"


@dataclass
class RunSpec:
    model: Path
    threads: int = 2
    ctx: int = 512
    ubatch: int = 32
    prompt_tokens: int = 16
    gen_tokens: int = 16
    window: int | str = "auto"  # prefetch read-ahead: auto (a ring sized in bytes) or layers
    mirror: bool = True  # the ring mapped twice back to back (prefetch.mirror); False: the flat ring, to compare
    repack: bool = False  # streamed weights repacked on arrival (prefetch.repack), to compare with the file's layout
    seed: int = 0
    timeout_s: float = 1800
    sidecar: Path | None = None  # MoE runs: the expert sidecar
    io_threads: int = 4  # MoE runs: parallel readers for misses
    rpc: str | None = None  # flashflex runs: RPC workers (HOST:PORT,...) that take the model's last layers


def run_isolated(cmd: list[str], cg: MemoryCgroup | None, timeout_s: float, record: dict[str, Any]) -> dict[str, Any]:
    """Run one measuring process (in cgroup `cg` when given, which is removed after) and fill `record` from the last
    JSON line it prints: its status (ok, killed out of memory, failed with its last line, timed out), wall time and
    the cgroup's peak memory. Never raises for a failed run."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              preexec_fn=cg.preexec if cg else None)
        record["wall_s"] = time.perf_counter() - t0
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            record.update(json.loads(lines[-1]))
            record["status"] = "ok"
        elif proc.returncode < 0 and -proc.returncode == signal.SIGKILL or (cg and cg.oom_killed()):
            record["status"] = "killed (out of memory in the cgroup)"
        else:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            record["status"] = f"failed: {tail[:300]}"
            record["stderr_tail"] = proc.stderr[-3000:]
    except subprocess.TimeoutExpired:
        record["wall_s"] = time.perf_counter() - t0
        record["status"] = f"timed out after {timeout_s:.0f}s"
    finally:
        if cg:
            record["cgroup_peak_bytes"] = cg.peak_bytes()
            cg.remove()
    return record


def run_point(point: Point, spec: RunSpec, use_cgroup: bool, drop_caches: bool, log: Log) -> dict[str, Any]:
    """Measure one point in a fresh process; returns its result record (never raises for a failed run)."""
    payload = {"point": asdict(point), "spec": {**asdict(spec), "model": str(spec.model),
                                                "sidecar": str(spec.sidecar) if spec.sidecar else None}}
    cg = None
    if use_cgroup and point.budget_bytes:
        cg = MemoryCgroup(f"flashflex-bench-{os.getpid()}", point.budget_bytes)
    cold = drop_page_cache() if drop_caches else False
    cmd = [sys.executable, "-m", "orchestrator.bench.worker", json.dumps(payload)]
    record: dict[str, Any] = {"label": point.label, **asdict(point), "cgroup": cg.version if cg else None,
                              "cold_cache": cold}
    run_isolated(cmd, cg, spec.timeout_s, record)
    log(f"  {point.label}: {record['status']}"
        + (f", decode {record['decode_tok_per_s']:.3f} tok/s" if record.get("status") == "ok" else ""))
    return record



@dataclass
class Isolation:
    """How runs are isolated (what check_isolation reads, and switches off where the platform forbids it)."""

    use_cgroup: bool = True
    drop_caches: bool = True


def check_isolation(sweep: Any, log: Log) -> None:
    """Degrade gracefully where the platform forbids cgroups or dropping the page cache (said once)."""
    if sweep.use_cgroup and cgroup_version() is None:
        log("warning: memory cgroups are not available here; runs are unconstrained (budgets are plans only)")
        sweep.use_cgroup = False
    if sweep.drop_caches and not drop_page_cache():
        log("warning: cannot drop the page cache here (not root?); runs may start warm")
        sweep.drop_caches = False


def _cpu_model() -> str:
    """The CPU's model name where the kernel says it (Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    return {
        "host": platform.node(), "cpu": _cpu_model(),
        "cores": psutil.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }




def median_record(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median decode speed of a point's repeats (every repeat's speed under "repeats"); the last
    run's failure when none succeeded."""
    ok = sorted((r for r in runs if r.get("status") == "ok"), key=lambda r: r["decode_tok_per_s"])
    pick = dict(ok[len(ok) // 2] if ok else runs[-1])
    pick["repeats"] = [r.get("decode_tok_per_s") for r in runs]
    return pick


def interleaved(points: list[Point], repeats: int, measure: Callable[[Point], dict[str, Any]],
                log: Log) -> list[dict[str, Any]]:
    """Every point once, then every point again, `repeats` times, so that drift on a shared machine (this host
    swings by up to 70% between hours) hits every point alike; per point, median_record of its runs, in the order
    of `points`."""
    runs: list[list[dict[str, Any]]] = [[] for _ in points]
    for rep in range(repeats):
        if repeats > 1:
            log(f"repetition {rep + 1} of {repeats}")
        for i, point in enumerate(points):
            runs[i].append(measure(point))
    return [median_record(r) for r in runs]
