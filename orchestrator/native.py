"""ctypes bindings for OUR C API (include/llama-flashflex.h), on the libllama that llama_cpp loaded.

Nothing else in flashflex calls C. Each binding carries its C declaration, so a change to the header is a
mechanical diff here. Upstream functions are reached through llama_cpp's own bindings.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
from functools import lru_cache
from typing import Any

from orchestrator import cpufeatures
from orchestrator.errors import FlashflexError


class NotPatched(FlashflexError):
    """The installed llama_cpp is stock (or missing): flashflex's execution paths are unavailable."""


class WrongCPU(FlashflexError):
    """The installed llama_cpp was compiled for CPU extensions this CPU lacks (importing it could SIGILL)."""


def check_cpu_compatible() -> None:
    """Refuse, before importing it, a llama_cpp whose build record needs extensions this CPU lacks."""
    problem = cpufeatures.incompatibility(cpufeatures.installed_build_record())
    if problem:
        raise WrongCPU(problem, "rebuild it for this CPU: flashflex build --force")


def keep_shader_cache() -> None:
    """Mesa's drivers (lavapipe, radv, anv) compile ggml-vulkan's pipelines on the first run (1-3 minutes on
    lavapipe); keep their shader cache under the flashflex cache root so later runs reuse it. Set before the
    library loads (ggml creates its Vulkan devices then); a value already in the environment wins."""
    import os

    from orchestrator.paths import cache_root

    os.environ.setdefault("MESA_SHADER_CACHE_DIR", str(cache_root() / "mesa-shader-cache"))


def llama_cpp_module():
    check_cpu_compatible()
    keep_shader_cache()
    try:
        import llama_cpp  # noqa: F401
        import llama_cpp.llama_cpp as lowlevel
    except ImportError as exc:
        raise NotPatched("llama_cpp (llama-cpp-python) is not installed in this environment",
                         "run: flashflex build") from exc
    return lowlevel


def quiet_llama_log() -> None:
    """Keep llama.cpp's own log lines (errors included) off stderr unless FLASHFLEX_DEBUG is set: flashflex
    reports every failure itself, in one line."""
    import logging
    import os

    if not os.environ.get("FLASHFLEX_DEBUG"):
        logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL + 1)


@lru_cache(maxsize=1)
def installed() -> ctypes.CDLL:
    """The shared library llama_cpp loaded, with llama_flashflex_info bound, or NotPatched (a stock build). Not
    checked against this tree: `doctor` reports what it is; everything else goes through lib()."""
    lowlevel = llama_cpp_module()
    cdll: ctypes.CDLL = lowlevel._lib
    try:
        # int32_t llama_flashflex_api_version(void);
        cdll.llama_flashflex_api_version.argtypes = []
        cdll.llama_flashflex_api_version.restype = ctypes.c_int32
        # const char * llama_flashflex_info(void);
        cdll.llama_flashflex_info.argtypes = []
        cdll.llama_flashflex_info.restype = ctypes.c_char_p
    except AttributeError as exc:
        raise NotPatched("the installed llama_cpp is stock: it lacks the flashflex C API",
                         "run: flashflex build (it installs the patched build into this environment)") from exc
    return cdll


@lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    """The installed library with our whole C API bound, once it is known to be built from this tree's patch series
    (the one check: a library from another series may lack, or differ in, anything below); else NotPatched."""
    cdll = installed()
    mismatch = _series_mismatch(info().get("series_hash"))
    if mismatch:
        raise NotPatched(mismatch, "rebuild it from this tree: flashflex build")
    for bind in (_bind_streaming, _bind_banks, _bind_drafting, _bind_devices):
        bind(cdll)
    return cdll


def _series_mismatch(library_series: str | None) -> str | None:
    """Why a library built from `library_series` does not match this checkout's patch series (None when it does, or
    when this installation has no patches/ to compare with). FLASHFLEX_ANY_SERIES=1 accepts any: an A/B of builds
    from two series (scripts/bench_builds.py), where the caller vouches that the C API they use is the same."""
    import os

    from orchestrator import patches

    if os.environ.get("FLASHFLEX_ANY_SERIES") == "1":
        return None

    try:
        mine = patches.series_hash()
    except (OSError, FlashflexError):
        return None  # an installed package without the checkout: nothing to compare
    if library_series == mine:
        return None
    return (f"the installed library was built from another patch series ({str(library_series)[:12]}) than this "
            f"checkout's ({mine[:12]})")


def _bind_streaming(cdll: ctypes.CDLL) -> None:
    """Bindings of specs and of the dense-streaming API (features "spec-file", "dense-stream")."""
    # int32_t llama_flashflex_spec_check(const char * path);
    cdll.llama_flashflex_spec_check.argtypes = [ctypes.c_char_p]
    cdll.llama_flashflex_spec_check.restype = ctypes.c_int32
    # const char * llama_flashflex_last_error(void);
    cdll.llama_flashflex_last_error.argtypes = []
    cdll.llama_flashflex_last_error.restype = ctypes.c_char_p
    # int32_t llama_flashflex_model_stats(const struct llama_model * model, char * buf, size_t buf_size);
    cdll.llama_flashflex_model_stats.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    cdll.llama_flashflex_model_stats.restype = ctypes.c_int32
    # void llama_flashflex_model_stats_reset(const struct llama_model * model);
    cdll.llama_flashflex_model_stats_reset.argtypes = [ctypes.c_void_p]
    cdll.llama_flashflex_model_stats_reset.restype = None
    # const char * llama_flashflex_model_error(const struct llama_model * model);
    cdll.llama_flashflex_model_error.argtypes = [ctypes.c_void_p]
    cdll.llama_flashflex_model_error.restype = ctypes.c_char_p
    # bool llama_flashflex_abort_callback(void * model);  (a ggml_abort_callback)
    # int64_t llama_flashflex_lend_rows(struct llama_context * ctx, int32_t n_rows);  (API 8: absent before)
    if hasattr(cdll, "llama_flashflex_lend_rows"):
        cdll.llama_flashflex_lend_rows.argtypes = [ctypes.c_void_p, ctypes.c_int32]
        cdll.llama_flashflex_lend_rows.restype = ctypes.c_int64


def _bind_banks(cdll: ctypes.CDLL) -> None:
    """Bindings of the MoE slot-bank API (feature "slot-bank")."""
    # int32_t llama_flashflex_moe_stats(const struct llama_model * model, char * buf, size_t buf_size);
    cdll.llama_flashflex_moe_stats.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    cdll.llama_flashflex_moe_stats.restype = ctypes.c_int32
    # void llama_flashflex_moe_stats_reset(const struct llama_model * model);
    cdll.llama_flashflex_moe_stats_reset.argtypes = [ctypes.c_void_p]
    cdll.llama_flashflex_moe_stats_reset.restype = None


def _bind_drafting(cdll: ctypes.CDLL) -> None:
    """Bindings of drafting's pure helpers (feature "prompt-lookup")."""
    # int32_t llama_flashflex_prompt_lookup(const llama_token * context, int32_t n_context, int32_t ngram,
    #                                       int32_t n_max, llama_token * draft);
    cdll.llama_flashflex_prompt_lookup.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
                                                   ctypes.c_void_p]
    cdll.llama_flashflex_prompt_lookup.restype = ctypes.c_int32


def is_patched() -> bool:
    try:
        lib()
    except NotPatched:
        return False
    return True


def info() -> dict[str, Any]:
    """llama_flashflex_info() decoded: api_version, series_hash, features, backends."""
    raw = installed().llama_flashflex_info()
    return json.loads(raw.decode())


def system_info() -> str:
    """Upstream's llama_print_system_info(): the CPU features the backend was compiled for and detected."""
    lowlevel = llama_cpp_module()
    return lowlevel.llama_print_system_info().decode(errors="replace").strip()


SPEC_KEY = "flashflex.spec"  # LLAMA_FLASHFLEX_SPEC_KEY: the GGUF key override that names a spec file at load
SPEC_VERSION = 1  # LLAMA_FLASHFLEX_SPEC_VERSION
MAX_SPEC_PATH_BYTES = 127  # llama.cpp's string overrides hold 128 bytes, the NUL included
_DIRECT_IO = {"off": 0, "on": 1, "strict": 2}


def _fnv1a64(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def _canonical(doc: dict[str, Any]) -> bytes:
    """The text the digest covers: what nlohmann::json's dump() writes (sorted keys, no spaces, UTF-8)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def spec_document(spec, trace_file: str | None = None) -> dict[str, Any]:
    """The spec file's content for an orchestrator.run.spec.RuntimeSpec: the one place that knows the runtime's option
    names (docs/spec-format.md). Options at the runtime's defaults are not written. `trace_file`: where the runtime
    appends the routing trace the spec records (its recording's temp file)."""
    import os

    options: dict[str, int] = {"direct_io": _DIRECT_IO[spec.direct_io]}
    strings: dict[str, str] = {}
    stream, banks = spec.stream, spec.banks
    if stream is not None:
        options.update(prefetch_threads=stream.prefetch_threads, window=stream.window)
        if stream.ring_bytes:
            options["ring_bytes"] = stream.ring_bytes
        if stream.lent_bytes:
            options["lent_bytes"] = stream.lent_bytes
        if not stream.mirror:
            options["ring_mirror"] = 0
    if not spec.draft_adaptive:
        options["draft_adaptive"] = 0
    if spec.prompt_lookup:
        options["prompt_lookup"] = 1
    if spec.gather_ms:
        options["gather_ms"] = spec.gather_ms
    if banks is not None:
        options.update(moe_slots=banks.slots, moe_io_threads=banks.io_threads, moe_shared_only=int(banks.shared_only))
        if banks.verify:
            options["moe_verify"] = 1
        if banks.preload:
            options["moe_preload"] = 1
        if banks.prefetch_ranks is not None:
            options["moe_prefetch_ranks"] = banks.prefetch_ranks
        if banks.prefetch != "none":
            strings["moe_prefetch"] = banks.prefetch
        if trace_file is not None:
            strings["moe_trace"] = trace_file
    doc: dict[str, Any] = {
        "flashflex_spec": SPEC_VERSION,
        "series_hash": info().get("series_hash"),
        "model": {"path": str(spec.model), "bytes": os.path.getsize(spec.model)},
        "files": [str(f) for f in spec.files],
        "options": options,
        "strings": strings,
        "stream": [{"name": t.name, "file": t.file, "offset": t.offset, "bytes": t.bytes}
                   for t in (stream.tensors if stream else [])],
        "banks": [{"name": b.name, "file": b.file, "offset": b.offset, "expert_stride": b.expert_stride,
                   "bytes_per_expert": b.bytes_per_expert, **({"checksums": list(b.checksums)} if b.checksums else {})}
                  for b in (banks.tensors if banks else [])],
    }
    if spec.file_layout:
        doc["file_layout"] = list(spec.file_layout)
    if banks is not None and banks.schedule is not None:
        doc["schedule"] = list(banks.schedule)
    return seal(doc)


def seal(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with its digest (replacing any): what tells a spec flashflex wrote from one edited afterwards."""
    body = {k: v for k, v in doc.items() if k != "digest"}
    return {**body, "digest": "fnv1a64:" + _fnv1a64(_canonical(body))}


def write_spec(doc: dict[str, Any], dest) -> str:
    """Write a spec document to dest (temp file, fsync, rename) and return the path the load names. The path must fit
    llama.cpp's string override."""
    from pathlib import Path

    from orchestrator.fsutil import atomic_file

    path = str(Path(dest).absolute())
    if len(path.encode()) > MAX_SPEC_PATH_BYTES:
        raise FlashflexError(f"the spec path {path} is longer than llama.cpp's {MAX_SPEC_PATH_BYTES}-byte string "
                             "overrides", "write it to a shorter path (or set TMPDIR to a short directory)")
    with atomic_file(Path(path), "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return path


def check_spec(path) -> None:
    """The library's own checks of a spec file (version, series, digest, every value), without a model."""
    if lib().llama_flashflex_spec_check(str(path).encode()) != 0:
        raise FlashflexError(last_error(), "write it again: flashflex exec (or flashflex run) plans and writes it")


def last_error() -> str:
    return lib().llama_flashflex_last_error().decode(errors="replace")


def _json_out(fn, model_ptr) -> dict[str, Any] | None:
    """Call a C API function that writes JSON into a buffer (returning its length, -1 for none)."""
    buf = ctypes.create_string_buffer(4096)
    n = fn(model_ptr, buf, len(buf))
    if n < 0:
        return None
    if n >= len(buf):
        buf = ctypes.create_string_buffer(n + 1)
        fn(model_ptr, buf, len(buf))
    return json.loads(buf.value.decode())


def model_stats(model_ptr) -> dict[str, Any] | None:
    """Streaming counters of a loaded model (None when it streams nothing)."""
    return _json_out(lib().llama_flashflex_model_stats, model_ptr)


def moe_stats(model_ptr) -> dict[str, Any] | None:
    """Expert-bank counters of a loaded model, total and per layer (None when it banks nothing)."""
    return _json_out(lib().llama_flashflex_moe_stats, model_ptr)


def moe_stats_reset(model_ptr) -> None:
    lib().llama_flashflex_moe_stats_reset(model_ptr)


def model_stats_reset(model_ptr) -> None:
    lib().llama_flashflex_model_stats_reset(model_ptr)


def lend_rows(ctx_ptr, n_rows: int) -> int:
    """llama_flashflex_lend_rows, before a decode whose batch asks for `n_rows` rows of logits beyond the first:
    streamed weights keep what those rows leave of the memory the plan reserved for drafting's verification rows.
    Returns the bytes the weights hold (0: nothing to lend yet); FlashflexError where the rows cannot be given
    back."""
    cdll = lib()
    if not hasattr(cdll, "llama_flashflex_lend_rows"):
        raise NotPatched("the installed library predates lending drafting's rows (C API 8)", "flashflex build")
    n = cdll.llama_flashflex_lend_rows(ctx_ptr, n_rows)
    if n < 0:
        raise FlashflexError(last_error(), "leave drafting's rows unlent: --draft none, or --draft-max to size them")
    return int(n)


def model_error(model_ptr) -> str | None:
    raw = lib().llama_flashflex_model_error(model_ptr)
    return raw.decode(errors="replace") if raw else None


_interrupted = False


def interrupt_requested() -> bool:
    """True once SIGINT arrived inside the current interruptible() block (a failed decode then means Ctrl-C)."""
    return _interrupted


@contextlib.contextmanager
def interruptible():
    """Within this block, SIGINT stops a running llama_decode at its next graph node (API 4, feature
    "interrupt"), and the block ends with KeyboardInterrupt, so Ctrl-C acts within a second even during a long
    prompt.

    Python runs signal handlers only between bytecodes, never inside the decode; but its C-level handler writes
    the signal number to the wakeup fd at once, and a watcher thread (free to run: ctypes releases the GIL during
    the decode) sets the library's interrupt flag. The Python-level handler only records the signal: raising
    KeyboardInterrupt from it could land inside llama-cpp-python's log callback, called from C. Callers turn the
    aborted decode's RuntimeError into KeyboardInterrupt (interrupt_requested()). Main thread only; a no-op
    elsewhere or on builds without the feature."""
    import os
    import signal
    import threading

    global _interrupted
    if threading.current_thread() is not threading.main_thread() or not is_patched():
        yield
        return
    cdll = lib()
    cdll.llama_flashflex_interrupt.argtypes = [ctypes.c_bool]
    cdll.llama_flashflex_interrupt.restype = None
    cdll.llama_flashflex_interrupt(False)
    _interrupted = False
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    # SIGTERM and SIGHUP stop the decode the same way, and their own handlers run once the block is over: a handler
    # that raises must not run inside a ctypes callback (llama.cpp logs from the decode thread)
    stops = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    deferred: list[int] = []

    def on_sigint(signum, _frame) -> None:
        global _interrupted
        if signum == signal.SIGINT:
            _interrupted = True
        elif signum not in deferred:
            deferred.append(signum)

    def watch() -> None:
        while True:
            data = os.read(read_fd, 64)
            if not data:  # the write end closed: the block is over
                return
            # a decode waiting on reads checks the flag every 100 ms, so no signal waits for a slow disk
            if any(sig in data for sig in stops):
                cdll.llama_flashflex_interrupt(True)

    previous = {sig: signal.signal(sig, on_sigint) for sig in stops}
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="flashflex-sigint", daemon=True)
    watcher.start()
    finished = False
    try:
        yield
        finished = True
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(write_fd)
        watcher.join(timeout=2)
        os.close(read_fd)
        cdll.llama_flashflex_interrupt(False)
        was_interrupted, _interrupted = _interrupted, False
        for sig in deferred:  # now, in plain Python (and in place of the aborted decode's error): the command's
            handler = previous[sig]  # handler (one line, its exit status) or the default action
            if callable(handler):
                handler(sig, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(sig)
    if finished and was_interrupted:
        raise KeyboardInterrupt


def _bind_devices(cdll: ctypes.CDLL) -> None:
    """Bindings of the devices and RPC API (API 6, features "devices" and "rpc")."""
    # int32_t llama_flashflex_devices(char * buf, size_t buf_size);
    cdll.llama_flashflex_devices.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    cdll.llama_flashflex_devices.restype = ctypes.c_int32
    # ggml_backend_dev_t llama_flashflex_device(int32_t index);
    cdll.llama_flashflex_device.argtypes = [ctypes.c_int32]
    cdll.llama_flashflex_device.restype = ctypes.c_void_p
    # int32_t llama_flashflex_memory_breakdown(const struct llama_context * ctx, char * buf, size_t buf_size);
    cdll.llama_flashflex_memory_breakdown.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    cdll.llama_flashflex_memory_breakdown.restype = ctypes.c_int32
    # int32_t llama_flashflex_placement(const struct llama_context * ctx, char * buf, size_t buf_size);  (API 12)
    cdll.llama_flashflex_placement.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    cdll.llama_flashflex_placement.restype = ctypes.c_int32
    # int32_t llama_flashflex_rpc_add_server(const char * endpoint);
    cdll.llama_flashflex_rpc_add_server.argtypes = [ctypes.c_char_p]
    cdll.llama_flashflex_rpc_add_server.restype = ctypes.c_int32
    # int32_t llama_flashflex_rpc_serve(const char * endpoint, const char * cache_dir, int32_t n_threads,
    #                                   uint64_t announce_bytes, const int32_t * device_indices, size_t n_devices);
    cdll.llama_flashflex_rpc_serve.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int32, ctypes.c_uint64,
                                               ctypes.POINTER(ctypes.c_int32), ctypes.c_size_t]
    cdll.llama_flashflex_rpc_serve.restype = ctypes.c_int32


def _json_call(fn, *args) -> Any:
    """Call a C API function that writes JSON into a buffer after `args` (returning its length, -1 for none)."""
    buf = ctypes.create_string_buffer(16384)
    n = fn(*args, buf, len(buf))
    if n < 0:
        return None
    if n >= len(buf):
        buf = ctypes.create_string_buffer(n + 1)
        fn(*args, buf, len(buf))
    return json.loads(buf.value.decode())


def devices() -> list[dict[str, Any]]:
    """The backend devices this process sees: local ones, then the devices of RPC workers added so far (index, name,
    description, type, backend, free, total). An RPC device's memory is a round trip to its worker."""
    return _json_call(lib().llama_flashflex_devices)["devices"]


def device_handle(index: int) -> int:
    """The ggml_backend_dev_t of devices()[index], for llama_model_params.devices."""
    ptr = lib().llama_flashflex_device(index)
    if not ptr:
        raise FlashflexError(f"no backend device has index {index}", "list them with orchestrator.native.devices()")
    return ptr


def _breakdown(ctx_ptr) -> dict[str, Any] | None:
    if not is_patched():
        return None
    return _json_call(lib().llama_flashflex_memory_breakdown, ctx_ptr)


def memory_breakdown(ctx_ptr) -> list[dict[str, Any]] | None:
    """Bytes a context and its model hold per buffer type (device): model, context (KV cache), compute; None on builds
    without the API."""
    out = _breakdown(ctx_ptr)
    return out["buffers"] if out is not None else None


def placement(ctx_ptr) -> list[dict[str, Any]] | None:
    """Where a context's weights and KV cache are: memory_breakdown's buffers without their compute bytes, safe to read
    while another thread decodes; None on builds without the API."""
    if not is_patched():
        return None
    out = _json_call(lib().llama_flashflex_placement, ctx_ptr)
    return out["buffers"] if out is not None else None


def kv_layers(ctx_ptr) -> list[int] | None:
    """Each layer's KV cache bytes as llama.cpp sized them for the context (sliding-window layers hold fewer cells),
    wherever the layer lives; None on builds without them or for a memory that is not a KV cache (recurrent)."""
    out = _breakdown(ctx_ptr)
    layers = out.get("kv_layers") if out is not None else None
    return [int(n) for n in layers] if layers else None


def context_memory(ctx_ptr) -> dict[str, int] | None:
    """memory_breakdown summed over the buffer types: model, context (the KV cache), compute bytes."""
    buffers = memory_breakdown(ctx_ptr)
    if buffers is None:
        return None
    return {key: sum(int(b[key]) for b in buffers) for key in ("model", "context", "compute")}


def cpu_buffer_type() -> int:
    """ggml's plain CPU buffer type (ggml_backend_cpu_buffer_type, an upstream ggml function the library exports),
    for tensor overrides that keep tensors in host memory (llama.cpp's --cpu-moe)."""
    cdll = lib()
    fn = cdll.ggml_backend_cpu_buffer_type
    fn.argtypes = []
    fn.restype = ctypes.c_void_p
    return fn()


_rpc_registered: set[str] = set()
_local_devices: list[dict[str, Any]] | None = None  # devices() before the first RPC worker joined the list


def local_accelerators() -> list[int]:
    """Indices of the local devices llama.cpp would offload to by default (GPUs; integrated GPUs when there is no
    discrete one): the device list for a model that uses no RPC worker in a process that registered some."""
    local = _local_devices if _local_devices is not None else devices()
    gpus = [d["index"] for d in local if d["type"] == "gpu" and d["backend"] != "RPC"]
    return gpus or [d["index"] for d in local if d["type"] == "igpu" and d["backend"] != "RPC"]


def rpc_registered() -> frozenset[str]:
    """RPC workers this process has added to the device list (it holds a connection to each)."""
    return frozenset(_rpc_registered)


def rpc_add_server(endpoint: str) -> int:
    """Add an RPC worker's devices to the device list (once per process); returns its device count. Check the worker
    first (orchestrator.rpc.probe): ggml aborts the process when it does not answer."""
    global _local_devices
    cdll = lib()
    if _local_devices is None:
        _local_devices = devices()
    n = cdll.llama_flashflex_rpc_add_server(endpoint.encode())
    if n < 0:
        raise FlashflexError(f"could not add the RPC worker {endpoint}: {last_error()}", "check the worker's log")
    _rpc_registered.add(endpoint)
    return n


def rpc_worker_devices(endpoint: str) -> list[dict[str, Any]]:
    """The devices() entries of a registered RPC worker, in its own order."""
    return [d for d in devices() if d["backend"] == "RPC" and d["description"] == endpoint]


def rpc_serve(endpoint: str, cache_dir: str | None, threads: int, announce_bytes: int, indices: list[int]) -> str:
    """Serve devices()[i] for i in `indices` to RPC clients at `endpoint` until the process ends (blocking: call it
    on a thread of its own; ctypes releases the GIL). Returns only when the server could not start: the reason."""
    cdll = lib()
    values = (ctypes.c_int32 * len(indices))(*indices)
    cdll.llama_flashflex_rpc_serve(endpoint.encode(), (cache_dir or "").encode(), threads, announce_bytes, values,
                                   len(indices))
    return last_error()  # thread-local: set on this thread


def install_abort_callback(ctx_ptr, model_ptr) -> None:
    """Make llama_decode fail (not compute on bad data) once the model's streaming has failed, and stop at the
    next graph node when an interrupt is requested (any model)."""
    lowlevel = llama_cpp_module()
    address = ctypes.cast(lib().llama_flashflex_abort_callback, ctypes.c_void_p).value
    # A function pointer made from the C function's address: no Python runs inside llama_decode.
    # model_ptr None: a stock model, the callback then only checks the interrupt flag
    lowlevel.llama_set_abort_callback(ctx_ptr, lowlevel.ggml_abort_callback(address), model_ptr)
