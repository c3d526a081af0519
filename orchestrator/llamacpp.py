"""The seam with llama-cpp-python: what flashflex sets on llama_cpp beyond `Llama(...)`'s own arguments.

Every reach into llama-cpp-python's internals that is not a public `Llama` argument lives here, so a version bump of
llama-cpp-python is checked in one file: the model-parameter defaults swapped during a load (`model_params`), and
llama.cpp's own stderr kept off the terminal (`quiet_native_stderr`). The server's seam (its private model proxy)
is named in orchestrator.server.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import sys
from typing import Iterator

from orchestrator import native


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def disk_read_bytes() -> int | None:
    """Bytes this process (all its threads) has had read from storage so far: /proc/self/io read_bytes, which
    counts O_DIRECT reads and the page-cache misses of mmap faults alike (not what the page cache served). None where
    the kernel does not say (another OS, or no task I/O accounting)."""
    try:
        with open("/proc/self/io") as fh:
            for line in fh:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def return_freed_memory() -> None:
    """Give the memory Python and the C heap have freed back to the system (a collection, then glibc's malloc_trim
    where there is one), before a child that needs it starts: freed heap otherwise stays in this process's RSS."""
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # another C library: nothing to trim


@contextlib.contextmanager
def quiet_native_stderr(enabled: bool = True) -> Iterator[None]:
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


class _BuftOverride(ctypes.Structure):
    """struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }"""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT = 4, 5  # ggml.h's enum ggml_log_level


@contextlib.contextmanager
def captured_llama_errors(keep: int = 16) -> Iterator[list[str]]:
    """The error lines llama.cpp and ggml log inside the block (the last `keep`, stripped), for the one line a failed
    load prints: llama-cpp-python only says "Failed to load model" or "Failed to create llama_context", while the
    log says which buffer could not be allocated on which device. Nothing else changes: the callback
    llama-cpp-python installed is put back after, and what it would have printed it still prints."""
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []
    state = {"error": False}

    @llama_cpp.llama_log_callback
    def capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        state["error"] = level == GGML_LOG_LEVEL_ERROR or (level == GGML_LOG_LEVEL_CONT and state["error"])
        if state["error"]:
            line = text.decode("utf-8", errors="replace").strip()
            if line:
                lines.append(line)
                del lines[:-keep]
        _logger.llama_log_callback(level, text, user_data)

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


@contextlib.contextmanager
def model_params(repack: bool = True, devices: list[int] | None = None, cpu_tensors: list[str] | None = None,
                 no_alloc: bool = False) -> Iterator[None]:
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


@contextlib.contextmanager
def context_params(n_seq_max: int | None = None, n_outputs_max: int | None = None) -> Iterator[None]:
    """Context parameters llama_cpp.Llama does not expose, set on the defaults it starts from while it creates its
    context: `n_seq_max` sequences decoded together in one unified KV cache (what llama-server's slots are), so a
    harness can drive continuous batching through the same context the Python API opens; `n_outputs_max`, the
    output rows a micro-batch asks for, which llama.cpp reserves logits for in the compute buffers (left alone,
    every token of a micro-batch: 512 MiB at ubatch 512 with Gemma's 262k vocabulary, where a plain decode asks
    for one row)."""
    if n_seq_max is None and n_outputs_max is None:
        yield
        return
    import llama_cpp.llama as high

    original = high.llama_cpp.llama_context_default_params

    def params():
        p = original()
        if n_seq_max is not None:
            p.n_seq_max = n_seq_max
            p.kv_unified = True
        if n_outputs_max is not None:
            p.n_outputs_max = n_outputs_max
        return p

    high.llama_cpp.llama_context_default_params = params
    try:
        yield
    finally:
        high.llama_cpp.llama_context_default_params = original
