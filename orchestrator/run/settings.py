"""GenerationSettings: what one generation needs beyond the plan (model, prompt, context, sampling)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

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
    outputs: int | None = None  # output rows a micro-batch may ask for (ContextConfig.outputs); None: every token


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


def settings_from_config(cfg: "RunConfig", log: Callable[[str], None] = print,
                         chat: bool = False) -> GenerationSettings:
    """The settings of a RunConfig, its model resolved (the default model installed on first use; `chat`: the
    instruction-tuned default)."""
    from orchestrator.modelfile.locate import resolve_model

    for line in sanity_warnings(cfg):
        log(f"warning: {line}")
    return GenerationSettings(
        model=resolve_model(cfg.model.path, log=log, chat=chat),
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
        outputs=cfg.context.outputs_per_ubatch if cfg.context.outputs is not None else None,
    )
