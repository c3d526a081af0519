"""Overheads measured, not guessed: the KV cache and compute buffers llama.cpp itself sizes for a model and a run's
settings, which the planner reserves instead of its formula.

How: the model is opened through llama_cpp.Llama exactly as a run opens it, but with `no_alloc` (llama.cpp reads
the metadata and sizes every buffer without allocating one), and the library reports the sizes
(llama_flashflex_memory_breakdown). That costs a metadata read and one graph build, so the answer is cached per
model file (path, size, mtime), settings and library build, under the cache root's `overheads/`.

A build without the measurement (or a model llama.cpp cannot size) gives None, and the planner keeps its
estimate; `Plan.reservations.source` says which one a plan used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator import fsutil, native
from orchestrator.llamacpp import context_params, model_params, quiet_native_stderr
from orchestrator.paths import cache_root

FORMAT_VERSION = 3  # 2: a device's entry holds its layers' KV cache too; 3: host contexts sized for their outputs


@dataclass(frozen=True)
class Measured:
    """Bytes llama.cpp allocates for a context on the model (the weights as stock loads them, for reference)."""

    kv_bytes: int
    compute_bytes: int
    model_bytes: int


def _key(model: Path, ctx: int, ubatch: int, batch: int, outputs: int | None = None) -> str:
    st = model.stat()
    build = native.info().get("series_hash", "unknown")
    raw = json.dumps([FORMAT_VERSION, str(model.resolve()), st.st_size, st.st_mtime_ns, ctx, ubatch, batch, build]
                     + ([outputs] if outputs is not None else []))
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def cache_file(model: Path, *, ctx: int, ubatch: int, batch: int, outputs: int | None = None) -> Path:
    return cache_root() / "overheads" / f"{_key(model, ctx, ubatch, batch, outputs)}.json"


def _measure_now(model: Path, ctx: int, ubatch: int, batch: int, outputs: int | None = None) -> Measured | None:
    from llama_cpp import Llama

    try:
        with quiet_native_stderr(), model_params(no_alloc=True), context_params(n_outputs_max=outputs):
            llm = Llama(model_path=str(model), n_ctx=ctx, n_batch=batch, n_ubatch=ubatch, use_mmap=False,
                        verbose=False)
    except (ValueError, RuntimeError, OSError):
        return None  # llama.cpp cannot size this model: the planner keeps its estimate
    try:
        mem = native.context_memory(llm.ctx)
    finally:
        llm.close()
    if mem is None:
        return None
    return Measured(kv_bytes=int(mem["context"]), compute_bytes=int(mem["compute"]), model_bytes=int(mem["model"]))


def device_cache_file(model: Path, *, ctx: int, ubatch: int, batch: int, device: str, total: int) -> Path:
    key = _key(model, ctx, ubatch, batch)
    raw = hashlib.sha256(f"{key}/{device}/{total}".encode()).hexdigest()[:24]
    return cache_root() / "overheads" / f"device-{raw}.json"


@dataclass(frozen=True)
class DeviceMeasured:
    """What llama.cpp sizes on one of this host's GPUs with every layer there (no_alloc): its compute buffer, and each
    layer's KV cache (None where it could not say: the planner's formula then)."""

    compute_bytes: int
    kv_layers: tuple[int, ...] | None = None


def _measure_device_now(model: Path, ctx: int, ubatch: int, batch: int, index: int,
                        name: str) -> DeviceMeasured | None:
    from llama_cpp import Llama

    try:
        with quiet_native_stderr(), model_params(no_alloc=True, devices=[native.device_handle(index)]):
            llm = Llama(model_path=str(model), n_ctx=ctx, n_batch=batch, n_ubatch=ubatch, n_gpu_layers=999,
                        use_mmap=False, verbose=False)
    except (ValueError, RuntimeError, OSError):
        return None  # llama.cpp cannot size this model on the device: the planner keeps its estimate
    try:
        buffers = native.memory_breakdown(llm.ctx)
        kv = native.kv_layers(llm.ctx)
    finally:
        llm.close()
    mine = [b for b in buffers or [] if b["device"] == name and not b["host"]]
    if not mine:
        return None
    return DeviceMeasured(compute_bytes=sum(int(b["compute"]) for b in mine),
                          kv_layers=tuple(kv) if kv else None)


def measure_device(model: Path, *, ctx: int, ubatch: int, batch: int, index: int, name: str, total: int,
                   refresh: bool = False) -> DeviceMeasured | None:
    """The compute buffer and the layers' KV cache llama.cpp sizes on this host's GPU (`index` in the library's device
    list, backend name `name`) for `model` with these settings and every layer on that device, sized without
    allocating (no_alloc), from the cache unless `refresh`; None when it cannot be measured. With fewer layers
    there the device's graph holds the same largest intermediates (the output layer's logits among them: it goes to
    the GPU with the model's last layer), so the plan reserves this compute buffer for any partial placement too;
    a layer's KV cache is the same wherever it lives (sliding-window layers hold fewer cells than the context)."""
    path = device_cache_file(model, ctx=ctx, ubatch=ubatch, batch=batch, device=name, total=total)
    if path.is_file() and not refresh:
        try:
            raw = json.loads(path.read_text())
            kv = raw.get("kv_layers")
            return DeviceMeasured(compute_bytes=int(raw["compute_bytes"]),
                                  kv_layers=tuple(int(n) for n in kv) if kv else None)
        except (ValueError, TypeError, KeyError, AttributeError):
            pass  # a damaged cache entry: measure again
    measured = _measure_device_now(model, ctx, ubatch, batch, index, name)
    if measured is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with fsutil.atomic_file(path, "w") as f:
            json.dump({"compute_bytes": measured.compute_bytes,
                       "kv_layers": list(measured.kv_layers) if measured.kv_layers else None}, f)
    return measured


def _measure_local_gpus(cfg, model: Path, workers: Any) -> None:
    """Fill in the compute buffer and the layers' KV cache of each of this host's GPUs among `workers` (rpc.Worker;
    endpoint LOCAL)."""
    from orchestrator import rpc

    for w in workers:
        if w.endpoint != rpc.LOCAL:
            continue
        devices = []
        for d in w.devices:
            m = measure_device(model, ctx=cfg.context.ctx, ubatch=cfg.context.ubatch, batch=cfg.context.batch,
                               index=d.index, name=d.name, total=d.total)
            devices.append(d if m is None else dataclasses.replace(d, compute=m.compute_bytes, kv_layers=m.kv_layers))
        w.devices = devices


def plan_inputs(cfg, model: Path, *, workers: Any = None, estimate: bool = False,
                reprobe: bool = False) -> tuple[Measured | None, dict[int, float] | None]:
    """What a plan of RunConfig `cfg` measures before planning, the same for `plan` and `run`: the overheads (not
    with layers elsewhere: the local share of the KV cache is planned, not measured; not with `estimate`), the
    compute buffer of each of this host's GPUs that layers may go to (set on `workers`' devices), and the device's
    read probe when `-tp` is auto."""
    from orchestrator import readspeed

    measured = None
    if not estimate and not workers:
        measured = measure(model, ctx=cfg.context.ctx, ubatch=cfg.context.ubatch, batch=cfg.context.batch,
                           outputs=cfg.context.outputs_per_ubatch)
    if not estimate and workers and native.is_patched():
        _measure_local_gpus(cfg, model, workers)
    probe = readspeed.measured(model, refresh=reprobe) if cfg.prefetch.threads == "auto" else None
    return measured, probe


def measure(model: Path, *, ctx: int, ubatch: int, batch: int, outputs: int | None = None,
            refresh: bool = False) -> Measured | None:
    """The KV cache and compute bytes of a context with these settings on `model` whose micro-batches ask for
    `outputs` rows of logits (None: llama.cpp's default, every token), from the cache unless `refresh`; None when
    this build cannot measure (the planner then estimates)."""
    try:
        if not native.is_patched():
            return None
    except Exception:  # no patched library: nothing to measure with
        return None
    path = cache_file(model, ctx=ctx, ubatch=ubatch, batch=batch, outputs=outputs)
    if path.is_file() and not refresh:
        try:
            return Measured(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            pass  # a damaged cache entry: measure again
    measured = _measure_now(model, ctx, ubatch, batch, outputs)
    if measured is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with fsutil.atomic_file(path, "w") as f:
            json.dump(asdict(measured), f)
    return measured
