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
use the same table. `run`, `verify-exact`, `serve`, `chat`, this API and the benchmarks all go through `prepare()`:
RunConfig → inputs gathered once (run.inputs) → one Plan (planner.make_plan) → RuntimeSpec (run.spec) →
`Prepared.open` / `Prepared.session` (run.handle).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

from orchestrator.config import RunConfig, load_run_config
from orchestrator.errors import BudgetBelowMinimum, FlashflexError
from orchestrator.planner import make_plan
from orchestrator.run.handle import Handle, Prepared
from orchestrator.run.inputs import gather
from orchestrator.run.settings import settings_from_config
from orchestrator.run.spec import RuntimeSpec

__all__ = ["OPTION_KEYS", "Handle", "Prepared", "RequestMeter", "llama", "open_llama", "overrides_from_options",
           "prepare", "prepare_stock", "run_config"]

# Keyword option (the CLI flag's name with underscores) → RunConfig key. One table for every entry point.
OPTION_KEYS: dict[str, str] = {
    "model": "model.path",
    "budget": "budget.size",
    "prefetch_threads": "prefetch.threads",
    "prefetch_window": "prefetch.window",
    "prefetch_mirror": "prefetch.mirror",
    "prefetch_repack": "prefetch.repack",
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
    "gpu_budget": "gpu.budget",
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
        # only what was set, so options left at their defaults stay "not given" (the planner refuses given ones
        # that do not apply to the run)
        return load_run_config(None, {**_flatten(_set_fields(config)), **overrides_from_options(options)})
    return load_run_config(config, overrides_from_options(options))


def _set_fields(model: BaseModel) -> dict[str, Any]:
    """The fields set on `model` at any depth: pydantic's exclude_unset drops a whole section its parent did not
    mark set, so a value assigned to it afterwards (llama_server.plan_slots' `cfg.context.ctx = slots x ctx` on a
    config with no context section) would be lost and the defaults planned instead."""
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            inner = _set_fields(value)
            if inner or name in model.model_fields_set:
                out[name] = inner
        elif name in model.model_fields_set:
            out[name] = model.model_dump(mode="python", include={name})[name]
    return out


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def prepare(config: str | Path | RunConfig | None = None, log=None, *, budget_bytes: int | None = None,
            process_bytes: int = 0, chat: bool = False, draft_auto: bool = False, own_decodes: bool = False,
            draft_slots: int | None = None, **options: Any) -> Prepared:
    """Validate everything `run` validates (model, plan, sidecar, traces, flag combinations, a draft model's
    vocabulary) without loading the weights: the inputs gathered once, one plan, its RuntimeSpec.
    `budget_bytes` replaces the config's budget (always planned); `process_bytes`: what the process around the
    model occupies when the budget is a whole cgroup (benchmarks); `chat`: with no model named, the
    instruction-tuned default (chat, serve) instead of the default base model; `draft_auto`: draft.kind auto
    drafts by prompt lookup where the plan affords it (run, chat); `draft_slots`: llama-server drafts, in
    that many slots (its rows reserved for each, lent as run's are); `own_decodes`: flashflex's code makes every
    decode call of the model (run, chat, serve, benchmarks), so a micro-batch asks for one row of logits unless
    context.outputs says otherwise (elsewhere every token's, as stock)."""
    quiet = log is None
    log = log or (lambda _msg: None)
    cfg = run_config(config, **options)
    if own_decodes and cfg.context.outputs is None:
        cfg.context.outputs = 1

    def planned(cfg: RunConfig):
        settings = settings_from_config(cfg, log=log, chat=chat)
        inputs = gather(cfg, settings, log=log, budget_bytes=budget_bytes, process_bytes=process_bytes,
                        draft_auto=draft_auto, draft_slots=draft_slots)
        plan = make_plan(inputs.request(), inputs.plan_inputs()) if inputs.table is not None else None
        return settings, inputs, plan

    try:
        settings, inputs, plan = planned(cfg)
    except BudgetBelowMinimum:
        fitted = _largest_fitting_ubatch(cfg, planned)
        if fitted is None:
            raise
        cfg, (settings, inputs, plan) = fitted
        note = (f"ubatch {RunConfig().context.ubatch}'s compute buffers do not fit the budget beside the model: "
                f"using ubatch {cfg.context.ubatch}, the largest that fits (give --ubatch to choose)")
        if quiet:  # the Python API: a warning the caller can see, filter or turn into an error
            import warnings

            warnings.warn(note, stacklevel=3)
        else:
            log(f"note: {note}")
    if inputs.draft is not None and inputs.draft.optional and (plan is None or plan.draft is None):
        from orchestrator.planner.make import FAILING_DRAFT_SHARE, draft_row_allowance
        from orchestrator.sizes import format_size

        streamed = plan.estimates.streamed_bytes_per_token if plan is not None else 0
        row = inputs.draft.row_bytes
        probed = plan.estimates.read_bandwidth if plan is not None and inputs.read_probe else None
        allowance, pricing = draft_row_allowance(streamed, inputs.decode_profile, probed)
        if streamed > 0 and row > allowance:
            log(f"note: no drafting: a drafted token's logits ({format_size(row)} resident) would cost more than "
                f"{FAILING_DRAFT_SHARE:.0%} of a token's time where drafts fail (a token streams "
                f"{format_size(streamed)}; {pricing}); --draft prompt-lookup turns it on")
        elif streamed > 0:
            log(f"note: no drafting: the budget has no room beside the model for a drafted token's logits "
                f"({format_size(row)}); raise --budget to draft")
        inputs.draft = None  # drafting by default, left off by the plan
    if plan is not None and plan.draft is not None:
        if plan.draft.note and not plan.draft.optional:
            log(f"note: {plan.draft.note}")
        assert inputs.draft is not None
        inputs.draft.apply(plan.draft)
    inputs = inputs.with_sidecar(plan)
    return Prepared(cfg, settings, plan, RuntimeSpec.from_plan(plan, inputs), inputs.draft)


def _largest_fitting_ubatch(cfg: RunConfig, planned) -> tuple[RunConfig, Any] | None:
    """When only the default micro-batch stands between a budget and a run (its compute buffers grow with it: 257
    MiB at 512 tokens with Gemma's 262k vocabulary), the largest halving of it that plans; None when the ubatch was
    given, or no smaller one fits either (the caller's refusal stands)."""
    if "ubatch" in cfg.context.model_fields_set:
        return None
    lowest = 2 if cfg.draft.asked else 1  # a verification batch needs 2
    # a logical batch set to the micro-batch (llama-server's: one decode call per micro-batch) stays the micro-batch
    follows = "batch" in cfg.context.model_fields_set and cfg.context.batch == cfg.context.ubatch
    ubatch = cfg.context.ubatch // 2
    while ubatch >= lowest:
        trial = cfg.model_copy(deep=True)
        trial.context.ubatch = ubatch
        if follows:
            trial.context.batch = ubatch
        try:
            return trial, planned(trial)
        except BudgetBelowMinimum:
            ubatch //= 2
    return None


def prepare_stock(config: str | Path | RunConfig | None = None, *, use_mmap: bool | None = None,
                  **options: Any) -> Prepared:
    """Stock llama.cpp as llama-cpp-python opens the model, nothing planned or measured (benchmarks' baselines);
    `use_mmap=False` loads the weights resident."""
    cfg = run_config(config, **options)
    settings = settings_from_config(cfg, log=lambda _msg: None)
    return Prepared(cfg, settings, None, RuntimeSpec(model=str(settings.model), use_mmap=use_mmap))


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


# llama_cpp.Llama's own keyword names, for code ported from `Llama(...)`: those that are ours under another name,
# and those handed to the Llama as they are (they change nothing the plan decides).
LLAMA_NAMES: dict[str, str] = {"model_path": "model", "n_ctx": "ctx", "n_batch": "batch", "n_ubatch": "ubatch",
                               "n_threads": "threads", "n_gpu_layers": "gpu_layers"}
LLAMA_PASSTHROUGH = frozenset({"verbose", "chat_format", "chat_handler", "n_threads_batch", "embedding",
                               "last_n_tokens_size", "logits_all", "type_k", "type_v", "flash_attn"})


def split_llama_kwargs(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(our options, keyword arguments for the Llama) from keyword arguments that may use Llama's own names."""
    ours: dict[str, Any] = {}
    llama_kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if key in LLAMA_NAMES:
            if LLAMA_NAMES[key] in options:
                raise FlashflexError(f"{key} and {LLAMA_NAMES[key]} both set the same option",
                                     f"give one of them ({key} is llama_cpp.Llama's name for it)")
            # llama_cpp.Llama's n_gpu_layers=-1 means every layer, as llama.cpp's -ngl 999 does
            ours[LLAMA_NAMES[key]] = 999 if key == "n_gpu_layers" and value == -1 else value
        elif key in LLAMA_PASSTHROUGH:
            llama_kwargs[key] = value
        else:
            ours[key] = value
    return ours, llama_kwargs


def open_llama(model: str | Path | None = None, *, config: str | Path | RunConfig | None = None,
               **options: Any):
    """A ready `llama_cpp.Llama` for `model` (default: Gemma 3 270M) and/or a YAML/RunConfig, with keyword
    options as on the command line (budget, prefetch_threads, moe_mode, moe_sidecar, moe_slot_bank, ...) or as
    `llama_cpp.Llama` names them (n_ctx, n_batch, n_ubatch, n_threads, n_gpu_layers; verbose, chat_format
    and other load options that a plan does not decide are handed to the Llama)."""
    ours, llama_kwargs = split_llama_kwargs(options)
    if model is not None:
        ours["model"] = model
    return prepare(config, **ours).open(**llama_kwargs)


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
