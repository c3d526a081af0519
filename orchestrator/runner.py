"""Open a model through llama_cpp with its Plan applied, run it, and collect tokens, timings, memory and
runtime statistics.

The flow of a run: RunConfig → (model table → Plan, when the budget calls for one) → open_model, which
hands the Plan's streamed tensors to the native runtime and opens a plain `llama_cpp.Llama` → generate.
With no plan (the model fits), the model opens exactly as stock llama-cpp-python would.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import modes, native
from orchestrator.errors import FlashflexError
from orchestrator.native import llama_cpp_module
from orchestrator.planner import Plan, plan_for_run

if TYPE_CHECKING:
    from orchestrator.config import RunConfig


@dataclass
class GenerationSettings:
    """What one run needs; built from a RunConfig or CLI flags."""

    model: Path
    prompt: str = "The quick brown fox"
    n_predict: int = 16  # < 0: until end of text or a full context
    threads: int | None = None
    ctx: int = 512
    batch: int = 512
    ubatch: int = 512
    seed: int = 0
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95


@dataclass
class RunResult:
    model: str
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    load_s: float
    prompt_s: float
    decode_s: float
    prompt_tok_per_s: float
    decode_tok_per_s: float
    peak_rss_bytes: int
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@contextlib.contextmanager
def quiet_native_stderr(enabled: bool = True):
    """llama.cpp logs to fd 2 from C; keep it off the terminal unless FLASHFLEX_DEBUG is set."""
    if not enabled or os.environ.get("FLASHFLEX_DEBUG"):
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@dataclass
class MoESetup:
    """Where a run's routed experts live: a sidecar and a slot bank per layer (Flash-MoE).

    `slots` = 0 means every expert resident, read from the sidecar at load (resident-bank). A slot-bank run
    may record a routing trace (`trace_out`, with its `trace_header`); the oracle modes replay one (`schedule`,
    with `preload` for oracle-all-hit and prefetch "oracle" for oracle-prefetch)."""

    mode: modes.SidecarMode
    sidecar: Path
    manifest: Any  # orchestrator.sidecar.SidecarManifest
    slots: int
    io_threads: int = 4
    shared_only: bool = False
    verify: bool = False  # check every expert read against the sidecar's checksum (moe.verify)
    direct_io: str = "on"  # off | on | strict (RuntimeSpec's words)
    prefetch: str = "none"  # none | router-lookahead | oracle
    prefetch_ranks: int = 0  # router-lookahead: each token's top ranks read ahead (0 = all)
    trace_out: Path | None = None
    trace_header: Any = None  # orchestrator.traces.TraceHeader
    schedule: list[int] | None = None
    preload: bool = False

    def files(self) -> list[str]:
        return [str(self.sidecar / layer.file) for layer in self.manifest.layers]

    def bank_tensors(self, first_file: int) -> list[native.BankTensor]:
        """Every routed tensor of the sidecar, its file numbered from `first_file` (after the model files)."""
        index = {layer.file: first_file + i for i, layer in enumerate(self.manifest.layers)}
        return [native.BankTensor(t.name, index[t.file], t.offset, t.expert_stride, t.bytes_per_expert,
                                  tuple(t.checksums))
                for t in self.manifest.tensors if t.n_expert > 1]

    def begin_trace(self) -> None:
        if self.trace_out is not None:
            from orchestrator import traces

            traces.begin_recording(self.trace_out, self.trace_header)

    def finish_trace(self, ok: bool) -> None:
        """After the model is closed (the runtime has flushed every record): publish or discard the trace."""
        if self.trace_out is not None:
            from orchestrator import traces

            traces.finish_recording(self.trace_out, ok)


def default_sidecar(model: Path) -> Path:
    """Where `flashflex sidecar extract` output is looked for when a run names none: beside the model."""
    return model.with_name(model.name.removesuffix(".gguf") + ".sidecar")


def streamed_tensors(plan: Plan | None) -> list[tuple[str, int, int, int]]:
    """(name, file index, offset, bytes) of every tensor the plan streams."""
    if plan is None:
        return []
    return [(t.name, t.file, t.offset, t.n_bytes) for t in plan.tensors if t.placement == "streamed"]


@dataclass
class RuntimeSpec:
    """Everything flashflex's native runtime is told about a run, typed and JSON-serialisable (what
    `flashflex run --dry-run --json` prints), made by runtime_spec() from a run's Plan and MoESetup. The C API's
    option names appear only in native.RuntimeConfig.from_spec, which hands this to the library.

    Dense streaming: `streamed` tensors (name, file index, offset, bytes) read ahead by `prefetch_threads` into a
    ring of `ring_bytes` (tensors at fixed homes; `window` is the plan's layer count, for older builds). Expert
    banks: `banks` of `moe_slots` slots per layer (0 = every expert resident), misses read by `moe_io_threads`;
    `moe_prefetch` and `moe_trace`, and the `schedule` an oracle replays.
    `direct_io`: off | on (O_DIRECT where the file allows) | strict (O_DIRECT or fail)."""

    files: list[str]
    streamed: list[tuple[str, int, int, int]] = field(default_factory=list)
    banks: list[native.BankTensor] = field(default_factory=list)
    direct_io: str = "on"
    prefetch_threads: int | None = None  # None: nothing streams
    window: int | None = None
    ring_bytes: int | None = None
    moe_slots: int | None = None  # None: no banks
    moe_io_threads: int | None = None
    moe_shared_only: bool = False
    moe_preload: bool = False
    moe_verify: bool = False  # check each expert read against its checksum
    moe_prefetch: str = "none"
    moe_prefetch_ranks: int | None = None
    moe_trace: str | None = None  # where the runtime appends trace records (TRACE.partial)
    schedule: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["streamed"] = [dict(zip(("name", "file", "offset", "bytes"), t)) for t in self.streamed]
        out["schedule"] = len(self.schedule) if self.schedule is not None else None  # values, not the list
        return out


def runtime_spec(plan: Plan | None, moe: MoESetup | None) -> RuntimeSpec | None:
    """The RuntimeSpec of a plan (its streamed tensors) and MoE setup (its banks), or None for a stock run."""
    stream = streamed_tensors(plan)
    if not stream and moe is None:
        return None
    spec = RuntimeSpec(files=[])
    if stream:
        assert plan is not None
        spec.files = [str(f) for f in plan.files]
        spec.streamed = stream
        spec.prefetch_threads = plan.prefetch.threads
        spec.window = plan.prefetch.buffers
        spec.ring_bytes = plan.prefetch.ring_bytes  # the ring the plan paid for
        spec.direct_io = ("strict" if plan.prefetch.direct_io_requested == "strict"
                          else "on" if plan.prefetch.direct_io else "off")
    if moe is not None:
        from orchestrator import traces

        spec.banks = moe.bank_tensors(first_file=len(spec.files))
        spec.files += moe.files()
        spec.direct_io = moe.direct_io  # sidecar slices are page-aligned: the MoE setting decides
        spec.moe_slots, spec.moe_io_threads = moe.slots, moe.io_threads
        spec.moe_shared_only, spec.moe_preload, spec.moe_verify = moe.shared_only, moe.preload, moe.verify
        spec.moe_prefetch = moe.prefetch
        spec.moe_prefetch_ranks = moe.prefetch_ranks if moe.prefetch == "router-lookahead" else None
        spec.moe_trace = str(traces.partial_path(moe.trace_out)) if moe.trace_out is not None else None
        spec.schedule = moe.schedule
    return spec


@contextlib.contextmanager
def model_params(repack: bool = True, devices: list[int] | None = None, cpu_tensors: list[str] | None = None,
                 no_alloc: bool = False):
    """Model parameters llama_cpp.Llama does not expose, set on the defaults it starts from during the load:
    `repack=False` turns the CPU backend's repacked weight layout off (llama_model_params.use_extra_bufts = false:
    the one stock mode whose weights stay in the page cache (mmap) instead of anonymous memory, the below-RAM
    baseline of benchmarks); `devices` (ggml_backend_dev_t handles, native.device_handle) is the model's device
    list (llama_model_params.devices; [] = the CPU only), in the order its layers are split across them;
    `cpu_tensors` (regular expressions) are kept in the CPU buffer type whatever their layer's device
    (llama_model_params.tensor_buft_overrides: llama.cpp's --cpu-moe); `no_alloc` sizes every buffer without
    allocating any (llama_model_params.no_alloc: what orchestrator.overheads measures)."""
    if repack and devices is None and not cpu_tensors and not no_alloc:
        yield
        return
    import llama_cpp.llama as high

    original = high.llama_cpp.llama_model_default_params
    handles = None
    if devices is not None:  # NULL-terminated; alive until the load has copied it
        handles = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
    overrides = None
    if cpu_tensors:
        cpu = native.cpu_buffer_type()
        overrides = (_BuftOverride * (len(cpu_tensors) + 1))(
            *[_BuftOverride(p.encode(), cpu) for p in cpu_tensors], _BuftOverride(None, None))

    def params():
        p = original()
        if not repack:
            p.use_extra_bufts = False
        if no_alloc:
            p.no_alloc = True
        if handles is not None:
            p.devices = ctypes.cast(handles, ctypes.c_void_p)
        if overrides is not None:
            p.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        return p

    high.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        high.llama_cpp.llama_model_default_params = original


def _placement(rpc: Any, timeout: float) -> tuple[list[int] | None, dict[str, Any]]:
    """(device handles, Llama keyword arguments) for a model split across RPC workers (an RPCPlan): each worker is
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


class _BuftOverride(ctypes.Structure):
    """struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }"""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def open_model(settings: GenerationSettings, plan: Plan | None = None, logits_all: bool = False,
               repack: bool = True, moe: MoESetup | None = None, rpc: Any = None, rpc_timeout: float = 3.0,
               rpc_answer_timeout: float | None = None, **llama_kwargs: Any):
    """A `llama_cpp.Llama` for `settings.model`: the stock path, or with flashflex's runtime reading the
    plan's streamed tensors (when the plan streams anything) and/or the routed experts from a sidecar into
    slot banks (`moe`). `repack=False` turns the CPU backend's repacked weight layout off (a stock
    baseline mode). `rpc` (an RPCPlan) places the model's last layers on RPC workers, checked within
    `rpc_timeout` seconds each before the load; during the run each has `rpc_answer_timeout` seconds to answer a
    request (None: no limit, ggml's default)."""
    llama_cpp_module()  # one clear line if llama_cpp is missing
    from llama_cpp import Llama

    devices, placement_kwargs = _placement(rpc, rpc_timeout)
    cpu_tensors = list(rpc.cpu_tensors) if rpc is not None else []
    llama_kwargs = {**llama_kwargs, **placement_kwargs}
    spec = runtime_spec(plan, moe)
    stream = spec.streamed if spec is not None else []
    config = None
    if spec is not None:
        if moe is not None:
            moe.begin_trace()
        try:
            config = native.RuntimeConfig.from_spec(spec)
        except BaseException:
            if moe is not None:
                moe.finish_trace(False)
            raise
        # Streamed tensors and banked experts are read by our runtime; nothing maps the whole file.
        llama_kwargs = {**llama_kwargs, "use_mmap": False,
                        "kv_overrides": {**llama_kwargs.get("kv_overrides", {}), "flashflex.config": config.id}}
    try:
        with quiet_native_stderr(), model_params(repack=repack, devices=devices, cpu_tensors=cpu_tensors):
            llm = Llama(model_path=str(settings.model), n_ctx=settings.ctx, n_batch=settings.batch,
                        n_ubatch=settings.ubatch, n_threads=settings.threads, n_threads_batch=settings.threads,
                        seed=settings.seed, logits_all=logits_all, verbose=False, **llama_kwargs)
    except ValueError as exc:  # llama_cpp raises ValueError when llama.cpp cannot load the file
        if moe is not None:
            moe.finish_trace(False)
        reason = native.last_error() if config is not None else ""
        if reason:
            fix = ("check the sidecar (flashflex sidecar verify) or re-extract it" if moe is not None and not stream
                   else "re-plan the model (flashflex plan) and check the file")
            raise FlashflexError(f"could not load {settings.model}: {reason}", fix) from exc
        raise FlashflexError(f"llama.cpp could not load {settings.model} ({exc})",
                             "check that the file is a complete GGUF of an architecture this llama.cpp supports "
                             "(FLASHFLEX_DEBUG=1 shows llama.cpp's log)") from exc
    finally:
        if config is not None:
            config.free()
    if config is not None:
        native.install_abort_callback(llm.ctx, llm.model)
    elif native.has_feature("interrupt"):
        # stock models too, so SIGINT stops a decode; with no model the callback only reads the interrupt flag
        # (one relaxed atomic load per graph node: stock stays stock)
        native.install_abort_callback(llm.ctx, None)
    native.quiet_llama_log()  # Llama(verbose=False) still prints llama.cpp's errors before ours
    if rpc is not None and rpc_answer_timeout is not None:
        from orchestrator import rpc as rpc_mod

        rpc_mod.limit_answer_time([d.endpoint for d in rpc.devices], rpc_answer_timeout)
    return llm


@contextlib.contextmanager
def session(settings: GenerationSettings, ex: "Execution", logits_all: bool = False, repack: bool = True,
            **llama_kwargs: Any):
    """open_model for an Execution, closed on exit; a routing trace the run records is published only when the
    block ends without an exception (after the close, which flushes the runtime's last records)."""
    llm = open_model(settings, ex.plan, logits_all=logits_all, repack=repack, moe=ex.moe, rpc=ex.rpc,
                     rpc_timeout=ex.rpc_timeout, rpc_answer_timeout=ex.rpc_answer_timeout,
                     **{**ex.llama_kwargs(), **llama_kwargs})
    ok = False
    try:
        yield llm
        ok = True
    finally:
        llm.close()
        if ex.moe is not None:
            ex.moe.finish_trace(ok)


def sanity_warnings(cfg: "RunConfig") -> list[str]:
    """Settings that are allowed but almost certainly not meant: a budget above physical RAM (the run would
    swap or be OOM-killed instead of streaming), more compute threads than cores (each step waits on the
    slowest thread)."""
    import psutil

    from orchestrator.sizes import format_size, is_auto

    out = []
    if not is_auto(str(cfg.budget.size)):
        total = psutil.virtual_memory().total
        budget = cfg.budget.resolve_bytes()
        if budget > total:
            out.append(f"the budget {format_size(budget)} is more than this machine's {format_size(total)} of RAM; "
                       "nothing will stream and the run may be killed for memory (give a budget below the RAM)")
    cores = psutil.cpu_count(logical=True) or 1
    if cfg.context.threads is not None and cfg.context.threads > cores:
        out.append(f"-t {cfg.context.threads} is more compute threads than this machine's {cores} cores; "
                   f"decoding slows down (use -t {cores} or fewer)")
    return out


def settings_from_config(cfg: "RunConfig", log=print) -> GenerationSettings:
    from orchestrator.modelfile.locate import resolve_model

    for line in sanity_warnings(cfg):
        log(f"warning: {line}")

    return GenerationSettings(
        model=resolve_model(cfg.model.path, log=log),
        prompt=cfg.prompt,
        n_predict=cfg.sampling.n_predict,
        threads=cfg.context.threads,
        ctx=cfg.context.ctx,
        batch=max(cfg.context.batch, cfg.context.ubatch),
        ubatch=cfg.context.ubatch,
        seed=cfg.sampling.seed,
        temperature=cfg.sampling.temperature,
        top_k=cfg.sampling.top_k,
        top_p=cfg.sampling.top_p,
    )


@dataclass
class Execution:
    """How a run executes beyond GenerationSettings: the Plan's streamed tensors, the MoE banks, a lossy
    top-k override, and whether the stock weights load resident (no mmap)."""

    mode: modes.ExecutionMode = modes.STOCK
    plan: Plan | None = None  # set when the plan streams dense tensors
    moe: MoESetup | None = None
    kv_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. a --moe-topk override
    budget_plan: Plan | None = None  # the plan made for the budget, streaming or not (for reports)
    lossy: list[str] = field(default_factory=list)  # why this run's output may differ from stock
    rpc: Any = None  # planner.RPCPlan: the model's last layers on RPC workers (stock runs too)
    rpc_timeout: float = 3.0  # seconds each worker has to answer the check before the load
    rpc_answer_timeout: float = 120.0  # seconds each worker has to answer a request during the run

    def stock(self) -> "Execution":
        """Stock llama.cpp with the same placement (the same RPC workers and layer split): what exactness compares
        against."""
        return Execution(mode="stock", rpc=self.rpc, rpc_timeout=self.rpc_timeout,
                         rpc_answer_timeout=self.rpc_answer_timeout)

    @property
    def native(self) -> bool:
        """True when flashflex's runtime (not stock llama.cpp) loads part of the model."""
        return self.plan is not None or self.moe is not None

    def llama_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.kv_overrides:
            kw["kv_overrides"] = dict(self.kv_overrides)
        if self.mode == modes.RESIDENT:
            kw["use_mmap"] = False
        return kw


def moe_setup_for(cfg: "RunConfig", model: Path, plan: Plan, table: Any = None) -> MoESetup:
    """The sidecar and banks of a resident-bank, slot-bank or oracle run, checked (cheaply) against the model;
    with the trace it records (slot-bank) or replays (oracle modes)."""
    from orchestrator import sidecar, traces

    assert plan.moe is not None
    where = cfg.moe.sidecar or default_sidecar(model)
    if not Path(where).exists():
        raise FlashflexError(f"--moe-mode {plan.moe.mode} needs the model's expert sidecar, and {where} does not "
                             "exist", f"extract it: flashflex sidecar extract {model} {where} (or pass --moe-sidecar)")
    manifest = sidecar.check_sidecar(where, table if table is not None else model)
    slots = 0 if plan.moe.mode == modes.RESIDENT_BANK else min(plan.moe.slot_bank or plan.moe.n_expert,
                                                                plan.moe.n_expert)
    direct = {"off": "off", "auto": "on", "on": "on", "strict": "strict"}[str(cfg.prefetch.direct_io)]  # pages
    setup = MoESetup(mode=plan.moe.mode, sidecar=Path(where), manifest=manifest, slots=slots,
                     io_threads=cfg.moe.io_threads, shared_only=cfg.moe.shared_only, verify=cfg.moe.verify,
                     direct_io=direct,
                     prefetch=cfg.moe.prefetch)
    k = plan.moe.topk or plan.moe.n_expert_used
    setup.prefetch_ranks = min(k, cfg.moe.prefetch_ranks or (k + 3) // 4)
    if cfg.moe.prefetch != "none" and plan.moe.mode != modes.SLOT_BANK:
        raise FlashflexError(f"--moe-prefetch {cfg.moe.prefetch} applies to slot-bank runs, not {plan.moe.mode}",
                             "use --moe-mode slot-bank (the oracle modes bring their own prefetch)")
    if modes.is_oracle(plan.moe.mode):
        trace = traces.read_trace(cfg.moe.trace)
        traces.check_replay(trace, manifest, k=k, ubatch=cfg.context.ubatch)
        setup.schedule = traces.schedule(trace.records)
        if plan.moe.mode == modes.ORACLE_ALL_HIT:
            # every expert the trace uses resident: the hit path's ceiling, whatever the budget
            setup.slots = min(plan.moe.n_expert, max(k, trace.max_distinct_per_layer()))
            setup.preload = True
        else:
            setup.prefetch = "oracle"
    elif cfg.moe.trace is not None:
        if plan.moe.mode != modes.SLOT_BANK:
            raise FlashflexError(f"--moe-trace records slot-bank runs; {plan.moe.mode} routes nothing through banks",
                                 "use --moe-mode slot-bank")
        traces.check_trace_destination(Path(cfg.moe.trace), cfg.moe.trace_force)
        setup.trace_out = Path(cfg.moe.trace)
        setup.trace_header = traces.header_for(manifest, k=k, ubatch=cfg.context.ubatch, slots=slots,
                                               prefetch=cfg.moe.prefetch, mode=plan.moe.mode)
    return setup


# MoE options that only mean something when experts live in banks (RunConfig key → flag).
_BANK_OPTIONS = {"sidecar": "--moe-sidecar", "slot_bank": "--moe-slot-bank", "io_threads": "--moe-io-threads",
                 "trace": "--moe-trace", "prefetch": "--moe-prefetch", "prefetch_ranks": "moe.prefetch_ranks"}


def _refuse_bank_options(cfg: "RunConfig", what: str) -> None:
    """One line for a bank option given to a run without banks (stock, resident, a dense model)."""
    given = [flag for key, flag in _BANK_OPTIONS.items() if key in cfg.moe.model_fields_set
             and getattr(cfg.moe, key) not in (None, "none")]
    if given:
        raise FlashflexError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to runs with expert "
                             f"banks (resident-bank, slot-bank, oracle modes), and this run is {what}",
                             "add --moe-mode slot-bank (on a MoE model with a sidecar) or drop "
                             + ("it" if len(given) == 1 else "them"))


def execution_for_config(cfg: "RunConfig", model: Path) -> Execution:
    """What a RunConfig runs: stock when the model fits (and no mode asks otherwise), else the Plan's
    streaming and/or the MoE banks.

    An `auto` budget with the model's files well inside available memory skips planning altogether (reading
    the tensor table of a large-vocabulary model takes seconds)."""
    from orchestrator.modelfile.reader import read_model_table, shard_paths
    from orchestrator.sizes import available_memory, is_auto

    plain = cfg.moe.mode in (modes.AUTO, *modes.STOCK_LOADER_MODES) and not (cfg.moe.model_fields_set - {"mode"})
    if is_auto(str(cfg.budget.size)) and plain and not cfg.offloads:
        from orchestrator.modelfile.validate import read_layout

        for shard in shard_paths(model):  # the header checks the full table read would make, in a fraction
            read_layout(shard)
        file_bytes = sum(p.stat().st_size for p in shard_paths(model))
        if 2 * file_bytes < cfg.budget.resolve_bytes(available_memory()):
            return Execution(mode=modes.RESIDENT if cfg.moe.mode == modes.RESIDENT else modes.STOCK)
    if cfg.moe.mode in modes.STOCK_LOADER_MODES:
        _refuse_bank_options(cfg, cfg.moe.mode)
    table = read_model_table(model)
    if not table.arch.is_moe and not any(t.role.name == "EXPERT_ROUTED" for t in table.tensors):
        _refuse_bank_options(cfg, "a dense model")
    from orchestrator import overheads, rpc

    workers = rpc.offload_targets(cfg)  # GPUs here and RPC workers, or None

    measured, probe = overheads.plan_inputs(cfg, model, workers=workers)
    plan = plan_for_run(table, cfg, workers=workers, overheads=measured, read_probe=probe)
    ex = Execution(budget_plan=plan, rpc=plan.rpc, rpc_timeout=cfg.rpc.timeout_s,
                   rpc_answer_timeout=cfg.rpc.answer_timeout_s)
    if plan.rpc is not None and plan.moe is not None and plan.moe.mode not in ("auto", "stock", "resident"):
        if not plan.rpc.experts_here:
            raise FlashflexError(f"the layers left here need --moe-mode {plan.moe.mode}, and with --rpc expert banks "
                                 "hold every layer's experts only when asked for",
                                 f"add --moe-mode {plan.moe.mode} (every layer's experts then stay here, in banks), or "
                                 "raise --budget")
    if plan.moe is not None:
        if plan.moe.topk_lossy:
            ex.kv_overrides[f"{plan.arch}.expert_used_count"] = plan.moe.topk
            ex.lossy.append(f"--moe-topk {plan.moe.topk} < the model's {plan.moe.n_expert_used} experts per token")
        if cfg.moe.shared_only and plan.moe.mode != modes.SLOT_BANK:
            raise FlashflexError("--moe-shared-only is a slot-bank diagnostic",
                                 "add --moe-mode slot-bank (and a sidecar)")
        if cfg.moe.shared_only:
            ex.lossy.append("--moe-shared-only drops every routed expert")
        if modes.reads_sidecar(plan.moe.mode):
            ex.moe = moe_setup_for(cfg, model, plan, table)
        else:  # llama.cpp loads every expert (auto resolved to stock; asked-for stock and resident were checked above)
            _refuse_bank_options(cfg, plan.moe.mode)
        ex.mode = plan.moe.mode  # the planner resolves auto
    elif cfg.moe.shared_only:
        raise FlashflexError("--moe-shared-only applies to MoE models only", "drop --moe-shared-only")
    if not plan.fits_entirely and streamed_tensors(plan):
        ex.plan = plan
        if ex.mode in modes.STOCK_LOADER_MODES:
            ex.mode = modes.DENSE_STREAM
    return ex


def open_configured(cfg: "RunConfig", log=print, logits_all: bool = False):
    """A `llama_cpp.Llama` for a RunConfig, with its budget plan and MoE banks applied. Kept for older code:
    `orchestrator.open_llama` / `orchestrator.llama` are the Python API (its close publishes a trace)."""
    from orchestrator import api

    return api.prepare(cfg, log=log).open(logits_all=logits_all)


def _stream_stats(llm, ex: Execution) -> dict[str, Any] | None:
    return native.model_stats(llm.model) if ex.plan is not None else None


def _moe_stats(llm, ex: Execution) -> dict[str, Any] | None:
    return native.moe_stats(llm.model) if ex.moe is not None else None


def _reset_stats(llm, ex: Execution) -> None:
    if ex.plan is not None:
        native.model_stats_reset(llm.model)
    if ex.moe is not None:
        native.moe_stats_reset(llm.model)


def _phase_stats(raw: dict[str, Any] | None, n_tokens: int, seconds: float) -> dict[str, Any] | None:
    if raw is None:
        return None
    per_token = raw["bytes_read"] / n_tokens if n_tokens else 0.0
    return {
        **raw,
        "tokens": n_tokens,
        "bytes_read_per_token": per_token,
        "compute_seconds": max(0.0, seconds - raw["wait_seconds"]),
        "achieved_read_bandwidth": raw["bytes_read"] / raw["read_seconds"] if raw["read_seconds"] > 0 else 0.0,
        "effective_read_bandwidth": raw["bytes_read"] / seconds if seconds > 0 else 0.0,
    }


def _moe_phase_stats(raw: dict[str, Any] | None, n_tokens: int, seconds: float) -> dict[str, Any] | None:
    if raw is None:
        return None
    return {
        **raw,
        "tokens": n_tokens,
        "misses_per_token": raw["misses"] / n_tokens if n_tokens else 0.0,
        "bytes_read_per_token": raw["bytes_read"] / n_tokens if n_tokens else 0.0,
        # read_seconds adds up the I/O threads' time; install_seconds is what compute waited for
        "achieved_read_bandwidth": raw["bytes_read"] / raw["install_seconds"] if raw["install_seconds"] > 0 else 0.0,
        "seconds": seconds,
        **_prefetch_stats(raw),
    }


def _prefetch_stats(raw: dict[str, Any]) -> dict[str, Any]:
    """Prefetch hit rate (read-ahead experts the next call needed), and an estimate of the time it saved: each
    used prefetch spared compute one demand read, costed at this phase's compute-thread time per demand miss,
    minus the time compute waited for reads still in flight. The A/B in `flashflex bench prefetch` measures it."""
    issued = raw.get("prefetch_issued", 0)
    if not issued:
        return {}
    per_miss = raw["install_seconds"] / raw["misses"] if raw["misses"] else 0.0
    return {"prefetch_hit_rate": min(1.0, raw["prefetch_used"] / issued),
            "prefetch_time_saved_estimate_seconds": raw["prefetch_used"] * per_miss - raw["prefetch_wait_seconds"]}


class RPCTraffic:
    """Bytes on the connections to the RPC workers per phase of a run, as the kernel counted them (rpc.traffic):
    measured, not computed. Nothing without workers, or where the counters are not available."""

    def __init__(self, ex: Execution):
        self.endpoints = sorted({d.endpoint for d in ex.rpc.devices}) if ex.rpc is not None else []
        self.phases: dict[str, dict[str, Any]] = {}
        self.last = self._now()

    def _now(self) -> tuple[int, int] | None:
        if not self.endpoints:
            return None
        from orchestrator import rpc

        return rpc.traffic(self.endpoints)

    def phase(self, name: str, n_tokens: int) -> None:
        now = self._now()
        if now is not None and self.last is not None:
            sent, received = now[0] - self.last[0], now[1] - self.last[1]
            self.phases[name] = {"bytes_sent": sent, "bytes_received": received, "tokens": n_tokens,
                                 "bytes_per_token": (sent + received) / n_tokens if n_tokens else None}
        self.last = now


def generate(settings: GenerationSettings, plan: Plan | None = None, ex: Execution | None = None,
             draft: Any = None) -> RunResult:
    """One run; `draft` (a speculative.DraftSetup) drafts tokens and verifies them in one batch."""
    ex = ex or Execution(mode=modes.DENSE_STREAM if plan is not None else modes.STOCK, plan=plan)
    t0 = time.perf_counter()
    with native.interruptible(), session(settings, ex) as llm, _drafting(llm, settings, draft) as drafter:
        load_s = time.perf_counter() - t0
        try:
            return _generate(llm, settings, ex, load_s, drafter)
        except RuntimeError as exc:  # llama_decode failed: an aborted graph after a streaming or expert-read error
            raise decode_error(llm, ex, exc) from exc


@contextlib.contextmanager
def _drafting(llm, settings: GenerationSettings, draft: Any):
    """The drafter of a DraftSetup attached to `llm` (None without drafting), closed on exit."""
    if draft is None:
        yield None
        return
    from orchestrator import speculative

    drafter = draft.open(settings)
    try:
        speculative.attach(llm, drafter, max_batch=draft.max_tokens + 1)
        yield drafter
    finally:
        drafter.close()


def decode_error(llm, ex: Execution, exc: Exception) -> BaseException:
    """One line for a failed llama_decode: the runtime's own reason (I/O error, diverged replay) when it has one;
    KeyboardInterrupt when Ctrl-C aborted it (native.interruptible)."""
    if native.interrupt_requested():
        return KeyboardInterrupt()
    reason = native.model_error(llm.model) if ex.native else None
    if reason:
        fix = ("replay the trace with the model, prompt and settings it was recorded with"
               if "replayed trace" in reason else "check the model file, the sidecar and the disk")
        return FlashflexError(f"the run stopped: {reason}", fix)
    return FlashflexError(f"llama.cpp failed during the run ({exc})",
                          "rerun with FLASHFLEX_DEBUG=1 to see llama.cpp's log")


def _generate(llm, settings: GenerationSettings, ex: Execution, load_s: float, drafter: Any = None) -> RunResult:
    # surrogateescape: a prompt from the command line that is not valid UTF-8 goes to the tokenizer as its bytes
    prompt_tokens = llm.tokenize(settings.prompt.encode("utf-8", "surrogateescape"), add_bos=True, special=False)
    # n_predict < 0 means "until end of text or a full context".
    n_new = settings.n_predict if settings.n_predict >= 0 else settings.ctx - len(prompt_tokens)
    if len(prompt_tokens) + n_new > settings.ctx:
        raise FlashflexError(f"prompt ({len(prompt_tokens)} tokens) + {n_new} new tokens exceed "
                             f"the context of {settings.ctx}", "raise --ctx or lower -n")
    _reset_stats(llm, ex)  # the load's initial reads are not the prompt's
    wire = RPCTraffic(ex)
    t1 = time.perf_counter()
    llm.eval(prompt_tokens)
    prompt_s = time.perf_counter() - t1
    prompt_stats, prompt_moe = _stream_stats(llm, ex), _moe_stats(llm, ex)
    wire.phase("prompt", len(prompt_tokens))
    _reset_stats(llm, ex)

    out: list[int] = []
    eos = llm.token_eos()
    t2 = time.perf_counter()
    if drafter is not None:
        from orchestrator import speculative

        out = speculative.decode(llm, prompt_tokens, n_new, settings, drafter)
    for _ in range(n_new if drafter is None else 0):
        tok = llm.sample(temp=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
        if tok == eos:
            break
        out.append(tok)
        llm.eval([tok])
    decode_s = time.perf_counter() - t2
    decode_stats, decode_moe = _stream_stats(llm, ex), _moe_stats(llm, ex)
    wire.phase("decode", len(out))
    text = llm.detokenize(out).decode(errors="replace")
    stats: dict[str, Any] = {"mode": ex.mode, "lossy": ex.lossy}
    devices = native.memory_breakdown(llm.ctx)
    if devices is not None:
        stats["devices"] = devices  # bytes per buffer type (device), as llama.cpp allocated them
    if ex.rpc is not None:
        stats["rpc"] = {**ex.rpc.model_dump(mode="json"), "traffic": wire.phases or None}
    if drafter is not None:
        stats["draft"] = drafter.report()
    if ex.plan is not None:
        stats.update({
            "budget_bytes": ex.plan.budget_bytes,
            "resident_bytes": ex.plan.resident_bytes,
            "planned_streamed_bytes_per_token": ex.plan.estimates.dense_streamed_bytes_per_token,
            "prompt": _phase_stats(prompt_stats, len(prompt_tokens), prompt_s),
            "decode": _phase_stats(decode_stats, len(out), decode_s),
        })
    if ex.moe is not None:
        stats["moe"] = {
            "sidecar": str(ex.moe.sidecar),
            "prompt": _moe_phase_stats(prompt_moe, len(prompt_tokens), prompt_s),
            "decode": _moe_phase_stats(decode_moe, len(out), decode_s),
        }
    return RunResult(
        model=str(settings.model), prompt_tokens=list(prompt_tokens), tokens=out, text=text,
        load_s=load_s, prompt_s=prompt_s, decode_s=decode_s,
        prompt_tok_per_s=len(prompt_tokens) / prompt_s if prompt_s > 0 else 0.0,
        decode_tok_per_s=len(out) / decode_s if decode_s > 0 and out else 0.0,
        peak_rss_bytes=peak_rss_bytes(), stats=stats,
    )
