"""Open a model through llama_cpp as a RuntimeSpec says: the devices and RPC workers its layers go to, flashflex's
runtime attached when the spec streams or banks anything (the spec written as one file the library reads at load,
named by a GGUF key override, as for llama.cpp's own programs), the stock path otherwise."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import native
from orchestrator.errors import FlashflexError
from orchestrator.llamacpp import captured_llama_errors, context_params, model_params, quiet_native_stderr
from orchestrator.planner import RPCPlan
from orchestrator.run.settings import GenerationSettings
from orchestrator.run.spec import RuntimeSpec


def _placement(rpc: RPCPlan | None, timeout: float) -> tuple[list[int] | None, dict[str, Any]]:
    """(device handles, Llama keyword arguments) for a model split across devices (an RPCPlan): each worker is
    checked (when this process does not use it yet) and registered, and the layer split is llama.cpp's
    n_gpu_layers / tensor_split. Without one: the device list this process would give llama.cpp by default, minus
    RPC workers registered for other models (None = leave it to llama.cpp)."""
    if rpc is None:
        local = native.local_accelerators() if native.rpc_registered() else None
        return ([native.device_handle(i) for i in local] if local is not None else None), {}
    from orchestrator import rpc as rpc_mod

    remote = [d.endpoint for d in rpc.devices if d.endpoint != rpc_mod.LOCAL]
    index = rpc_mod.connect_workers(list(dict.fromkeys(remote)), timeout)
    handles = []
    for d in rpc.devices:
        if d.endpoint == rpc_mod.LOCAL:  # this host's GPU: its index is the library's
            handles.append(native.device_handle(d.device))
            continue
        mine = index[d.endpoint]
        if d.device >= len(mine):
            raise FlashflexError(f"RPC worker {d.endpoint} serves {len(mine)} device(s), and the plan uses its device "
                                 f"{d.device}", "re-plan: the worker changed since the plan was made")
        handles.append(native.device_handle(mine[d.device]))
    return handles, {"n_gpu_layers": rpc.n_gpu_layers, "tensor_split": list(rpc.tensor_split)}


@dataclass(frozen=True)
class Recording:
    """A routing trace being recorded: the runtime appends to `partial`, a temp file of this recording's own;
    `finish` publishes it as `path` after a successful run or discards it."""

    path: Path
    partial: Path

    def finish(self, ok: bool) -> None:
        from orchestrator import traces

        traces.finish_recording(self.path, self.partial, ok)


def begin_trace(spec: RuntimeSpec) -> Recording | None:
    """Before the load: the trace the spec records (None if none), its header written to its temp file."""
    if spec.banks is None or spec.banks.trace is None:
        return None
    from orchestrator import traces

    path = Path(spec.banks.trace)
    return Recording(path, traces.begin_recording(path, traces.TraceHeader.model_validate(spec.banks.trace_header)))


def write_native_spec(spec: RuntimeSpec, trace_file: Path | None = None, dest: Path | None = None) -> str:
    """Write the spec file the runtime reads for `spec` (to `dest`, else a private temp file the caller removes)."""
    doc = native.spec_document(spec, str(trace_file) if trace_file is not None else None)
    if dest is None:
        fd, name = tempfile.mkstemp(prefix="flashflex-spec-", suffix=".json")
        os.close(fd)
        dest = Path(name)
    return native.write_spec(doc, dest)


# What llama.cpp's and ggml's error lines say when a buffer could not be had (a failed allocation, C++'s bad_alloc)
_OUT_OF_MEMORY = ("allocat", "bad_alloc", "out of memory", "insufficient memory")


def open_model(settings: GenerationSettings, spec: RuntimeSpec | None, logits_all: bool = False,
               repack: bool = True, trace_file: Path | None = None, n_seq_max: int | None = None,
               n_outputs: int | None = None, **llama_kwargs: Any):
    """A `llama_cpp.Llama` for `settings.model` as `spec` says (None: stock, as llama-cpp-python opens it).
    `repack=False` turns the CPU backend's repacked weight layout off (a stock baseline of benchmarks).
    `trace_file`: where the runtime appends the routing trace the spec records (a Recording's temp file; without
    it nothing is recorded). `n_seq_max`: sequences decoded together (a unified KV cache), for a batching harness.
    `n_outputs`: output rows a micro-batch may ask for (default `settings.outputs`; at least one per sequence), what
    the plan measured the compute buffers at (llama.cpp aborts on a batch asking for more); None, `logits_all` or
    embeddings: every token, llama.cpp's default."""
    native.llama_cpp_module()  # one clear line if llama_cpp is missing
    from llama_cpp import Llama

    spec = spec or RuntimeSpec(model=str(settings.model))
    devices, placement_kwargs = _placement(spec.placement, spec.rpc_timeout_s)
    cpu_tensors = list(spec.placement.cpu_tensors) if spec.placement is not None else []
    kwargs: dict[str, Any] = {**placement_kwargs}
    if spec.kv_overrides:
        kwargs["kv_overrides"] = dict(spec.kv_overrides)
    if spec.use_mmap is not None:
        kwargs["use_mmap"] = spec.use_mmap
    kwargs.update(llama_kwargs)
    wanted = n_outputs if n_outputs is not None else settings.outputs
    outputs = None if logits_all or kwargs.get("embedding") or wanted is None else min(
        max(wanted, n_seq_max or 1), max(settings.batch, settings.ubatch))
    spec_file = None
    if spec.needs_spec_file:  # the route of llama.cpp's programs (flashflex exec): a spec file named by an override
        spec_file = write_native_spec(spec, trace_file)
        kwargs["kv_overrides"] = {**kwargs.get("kv_overrides", {}), native.SPEC_KEY: spec_file}
    try:
        with quiet_native_stderr(), model_params(repack=repack, devices=devices,
                                                 cpu_tensors=cpu_tensors), \
                context_params(n_seq_max, outputs), captured_llama_errors() as errors:
            llm = Llama(model_path=str(settings.model), n_ctx=settings.ctx, n_batch=settings.batch,
                        n_ubatch=settings.ubatch, n_threads=settings.threads, n_threads_batch=settings.threads,
                        seed=settings.seed, logits_all=logits_all, **{"verbose": False, **kwargs})
    except ValueError as exc:  # llama_cpp raises ValueError when llama.cpp cannot load the file
        reason = native.last_error() if spec_file is not None else ""
        if reason:
            fix = ("check the sidecar (flashflex sidecar verify) or re-extract it"
                   if spec.banks is not None and spec.stream is None
                   else "re-plan the model (flashflex plan) and check the file")
            raise FlashflexError(f"could not load {settings.model}: {reason}", fix) from exc
        failed = [line for line in errors if any(sign in line for sign in _OUT_OF_MEMORY)]
        if failed:  # the first is the cause (ggml's, naming the size), the last what llama.cpp made of it
            gpus = {d.name for d in spec.placement.devices if d.name} if spec.placement is not None else set()
            on_gpu = bool(gpus) and not all("CPU" in line for line in failed)
            said = failed[-1] if len(failed) == 1 else f"{failed[-1]} ({failed[0]})"
            raise FlashflexError(
                f"out of memory loading {settings.model}: {said}",
                "give a smaller --gpu-budget, -ngl or --ctx, or free memory on the device (on the GPU: "
                f"{', '.join(sorted(gpus))})"
                if on_gpu else
                "give a smaller --ctx or --budget, or free memory (a memory limit such as a cgroup or ulimit -v "
                "must hold the plan's budget and the process itself)") from exc
        said = f": {errors[-1]}" if errors else ""
        raise FlashflexError(f"llama.cpp could not load {settings.model} ({exc}){said}",
                             "check that the file is a complete GGUF of an architecture this llama.cpp supports "
                             "(FLASHFLEX_DEBUG=1 shows llama.cpp's log)") from exc
    finally:
        if spec_file is not None:
            os.unlink(spec_file)  # the model keeps its own copy of what it read
    # stock models too, so SIGINT stops a decode; with no model the callback only reads the interrupt flag
    # (one relaxed atomic load per graph node: stock stays stock)
    if native.is_patched():
        native.install_abort_callback(llm.ctx, llm.model if spec_file is not None else None)
    native.quiet_llama_log()  # Llama(verbose=False) still prints llama.cpp's errors before ours
    if spec.placement is not None and spec.rpc_answer_timeout_s is not None:
        from orchestrator import rpc as rpc_mod

        rpc_mod.limit_answer_time([d.endpoint for d in spec.placement.devices], spec.rpc_answer_timeout_s)
    return llm
