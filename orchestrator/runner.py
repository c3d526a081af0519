"""Open a model through llama_cpp with its Plan applied, run it, and collect tokens, timings, memory and
runtime statistics.

The flow of a run: RunConfig → (model table → Plan, when the budget calls for one) → open_model, which
hands the Plan's streamed tensors to the native runtime and opens a plain `llama_cpp.Llama` → generate.
With no plan (the model fits), the model opens exactly as stock llama-cpp-python would.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import native
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
def _quiet_native_stderr(enabled: bool = True):
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


def streamed_tensors(plan: Plan | None) -> list[tuple[str, int, int, int]]:
    """(name, file index, offset, bytes) of every tensor the plan streams."""
    if plan is None:
        return []
    return [(t.name, t.file, t.offset, t.n_bytes) for t in plan.tensors if t.placement == "streamed"]


@contextlib.contextmanager
def _without_repack():
    """Load with the CPU backend's repacked weight layout off (llama_model_params.use_extra_bufts = false),
    which llama_cpp.Llama does not expose: the one stock mode whose weights stay in the page cache (mmap)
    instead of anonymous memory, used as the below-RAM baseline by benchmarks."""
    import llama_cpp.llama as high

    original = high.llama_cpp.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    high.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        high.llama_cpp.llama_model_default_params = original


def open_model(settings: GenerationSettings, plan: Plan | None = None, logits_all: bool = False,
               repack: bool = True, **llama_kwargs: Any):
    """A `llama_cpp.Llama` for `settings.model`: the stock path, or with the plan's streamed tensors
    read from disk by flashflex's runtime (when the plan streams anything). `repack=False` turns the CPU
    backend's repacked weight layout off (a stock baseline mode)."""
    llama_cpp_module()  # one clear line if llama_cpp is missing
    from llama_cpp import Llama

    stream = streamed_tensors(plan)
    config = None
    if stream:
        assert plan is not None
        config = native.StreamConfig(plan.files, stream, threads=plan.prefetch.threads,
                                     window=plan.prefetch.buffers,  # the ring the plan paid for
                                     direct_io=2 if plan.prefetch.direct_io_requested == "strict"
                                     else int(plan.prefetch.direct_io))
        # Streamed tensors are read by our runtime; nothing maps the whole file.
        llama_kwargs = {**llama_kwargs, "use_mmap": False,
                        "kv_overrides": {**llama_kwargs.get("kv_overrides", {}), "flashflex.config": config.id}}
    try:
        with _quiet_native_stderr(), (contextlib.nullcontext() if repack else _without_repack()):
            llm = Llama(model_path=str(settings.model), n_ctx=settings.ctx, n_batch=settings.batch,
                        n_ubatch=settings.ubatch, n_threads=settings.threads, n_threads_batch=settings.threads,
                        seed=settings.seed, logits_all=logits_all, verbose=False, **llama_kwargs)
    except ValueError as exc:  # llama_cpp raises ValueError when llama.cpp cannot load the file
        reason = native.last_error() if config is not None else ""
        if reason:
            raise FlashflexError(f"could not load {settings.model}: {reason}",
                                 "re-plan the model (flashflex plan) and check the file") from exc
        raise FlashflexError(f"llama.cpp could not load {settings.model} ({exc})",
                             "check that the file is a complete GGUF of an architecture this llama.cpp supports "
                             "(FLASHFLEX_DEBUG=1 shows llama.cpp's log)") from exc
    finally:
        if config is not None:
            config.free()
    if stream:
        native.install_abort_callback(llm.ctx, llm.model)
    return llm


def settings_from_config(cfg: "RunConfig", log=print) -> GenerationSettings:
    from orchestrator.models import resolve_model

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


def plan_for_config(cfg: "RunConfig", model: Path) -> Plan | None:
    """The Plan a run executes, or None for the stock path (the model fits the budget as it is).

    An `auto` budget with the model's files well inside available memory skips planning altogether (reading
    the tensor table of a large-vocabulary model takes seconds)."""
    from orchestrator.modelfile.reader import read_model_table, shard_paths
    from orchestrator.sizes import available_memory, is_auto

    if is_auto(str(cfg.budget.size)) and cfg.moe.mode in ("auto", "stock", "resident"):
        file_bytes = sum(p.stat().st_size for p in shard_paths(model))
        if 2 * file_bytes < cfg.budget.resolve_bytes(available_memory()):
            return None
    plan = plan_for_run(read_model_table(model), cfg)
    if plan.moe is not None and plan.moe.mode not in ("stock", "resident"):
        raise FlashflexError(f"{model.name} needs MoE mode {plan.moe.mode} under this budget, which this build "
                             "does not run yet", "raise --budget to fit the model, or run a dense model")
    if plan.fits_entirely or not streamed_tensors(plan):
        return None
    return plan


def open_configured(cfg: "RunConfig", log=print, logits_all: bool = False):
    """The Python API: a `llama_cpp.Llama` for a RunConfig, with its budget plan applied."""
    settings = settings_from_config(cfg, log)
    return open_model(settings, plan_for_config(cfg, settings.model), logits_all=logits_all)


def _stream_stats(llm, plan: Plan | None) -> dict[str, Any] | None:
    return native.model_stats(llm.model) if plan is not None else None


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


def generate(settings: GenerationSettings, plan: Plan | None = None) -> RunResult:
    t0 = time.perf_counter()
    llm = open_model(settings, plan)
    load_s = time.perf_counter() - t0
    try:
        return _generate(llm, settings, plan, load_s)
    except RuntimeError as exc:  # llama_decode failed: an aborted graph after a streaming error
        reason = native.model_error(llm.model) if plan is not None else None
        if reason:
            raise FlashflexError(f"the run stopped: {reason}", "check the model file and the disk") from exc
        raise FlashflexError(f"llama.cpp failed during the run ({exc})",
                             "rerun with FLASHFLEX_DEBUG=1 to see llama.cpp's log") from exc
    finally:
        llm.close()


def _generate(llm, settings: GenerationSettings, plan: Plan | None, load_s: float) -> RunResult:
    prompt_tokens = llm.tokenize(settings.prompt.encode(), add_bos=True, special=False)
    # n_predict < 0 means "until end of text or a full context".
    n_new = settings.n_predict if settings.n_predict >= 0 else settings.ctx - len(prompt_tokens)
    if len(prompt_tokens) + n_new > settings.ctx:
        raise FlashflexError(f"prompt ({len(prompt_tokens)} tokens) + {n_new} new tokens exceed "
                             f"the context of {settings.ctx}", "raise --ctx or lower -n")
    if plan is not None:
        native.model_stats_reset(llm.model)  # the load's initial prefetch is not the prompt's
    t1 = time.perf_counter()
    llm.eval(prompt_tokens)
    prompt_s = time.perf_counter() - t1
    prompt_stats = _stream_stats(llm, plan)
    if plan is not None:
        native.model_stats_reset(llm.model)

    out: list[int] = []
    eos = llm.token_eos()
    t2 = time.perf_counter()
    for _ in range(n_new):
        tok = llm.sample(temp=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
        if tok == eos:
            break
        out.append(tok)
        llm.eval([tok])
    decode_s = time.perf_counter() - t2
    decode_stats = _stream_stats(llm, plan)
    text = llm.detokenize(out).decode(errors="replace")
    stats: dict[str, Any] = {"mode": "stock" if plan is None else "dense-stream"}
    if plan is not None:
        stats.update({
            "budget_bytes": plan.budget_bytes,
            "resident_bytes": plan.resident_bytes,
            "planned_streamed_bytes_per_token": plan.estimates.dense_streamed_bytes_per_token,
            "prompt": _phase_stats(prompt_stats, len(prompt_tokens), prompt_s),
            "decode": _phase_stats(decode_stats, len(out), decode_s),
        })
    return RunResult(
        model=str(settings.model), prompt_tokens=list(prompt_tokens), tokens=out, text=text,
        load_s=load_s, prompt_s=prompt_s, decode_s=decode_s,
        prompt_tok_per_s=len(prompt_tokens) / prompt_s if prompt_s > 0 else 0.0,
        decode_tok_per_s=len(out) / decode_s if decode_s > 0 and out else 0.0,
        peak_rss_bytes=peak_rss_bytes(), stats=stats,
    )
