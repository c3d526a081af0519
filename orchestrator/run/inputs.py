"""What a run reads before it plans, each once: the model's tensor table, the draft setup, the devices and workers
layers go to, the measured overheads, the read probe, a replayed trace; and, once the plan says experts come from
the sidecar, the sidecar's manifest (checked against the model). Planning and the spec only compute."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from orchestrator import modes
from orchestrator.errors import FlashflexError
from orchestrator.modelfile.table import ModelTable
from orchestrator.planner import Plan, PlanInputs, PlanRequest
from orchestrator.run.settings import GenerationSettings

if TYPE_CHECKING:
    from orchestrator.config import RunConfig
    from orchestrator.sidecar import SidecarManifest
    from orchestrator.speculative import DraftSetup
    from orchestrator.traces import Trace


@dataclass
class RunInputs:
    """A RunConfig's inputs, gathered by `gather`. `table` is None when the run needs no plan (an `auto` budget with
    the model's files well inside available memory: reading a large vocabulary's table takes seconds)."""

    config: "RunConfig"
    model: Path
    budget_bytes: int
    table: ModelTable | None = None
    draft: "DraftSetup | None" = None
    workers: list[Any] = field(default_factory=list)  # rpc.Worker: this host's GPUs, then RPC workers
    overheads: Any = None  # overheads.Measured
    read_probe: dict[int, float] | None = None
    replayed: "Trace | None" = None  # the trace an oracle mode replays
    process_bytes: int = 0
    decode_profile: Any = None  # computespeed.DecodeProfile: what drafting's rows are priced by
    sidecar: Path | None = None  # set by with_sidecar when the plan reads experts from the sidecar
    manifest: "SidecarManifest | None" = None

    def request(self) -> PlanRequest:
        draft = self.draft.request() if self.draft is not None else None
        return PlanRequest.from_config(self.config, self.budget_bytes, draft=draft, process_bytes=self.process_bytes)

    def plan_inputs(self) -> PlanInputs:
        assert self.table is not None
        return PlanInputs(table=self.table, overheads=self.overheads, read_probe=self.read_probe,
                          workers=self.workers,
                          replay_distinct=self.replayed.max_distinct_per_layer() if self.replayed else None,
                          decode_profile=self.decode_profile)

    def with_sidecar(self, plan: Plan | None) -> "RunInputs":
        """The sidecar's manifest, checked (cheaply) against the model, when the plan reads experts from it."""
        if plan is None or plan.moe is None or plan.moe.experts != modes.SIDECAR:
            return self
        from orchestrator import sidecar

        where = Path(self.config.moe.sidecar or sidecar.default_path(self.model))
        if not where.exists():
            raise FlashflexError(f"--moe-mode {plan.moe.mode} needs the model's expert sidecar, and {where} does not "
                                 "exist", f"extract it: flashflex sidecar extract {self.model} {where} (or pass "
                                 "--moe-sidecar)")
        self.sidecar = where
        self.manifest = sidecar.check_sidecar(where, self.table if self.table is not None else self.model)
        return self


def gather(cfg: "RunConfig", settings: GenerationSettings, *, log: Callable[[str], None] = print,
           budget_bytes: int | None = None, process_bytes: int = 0, draft_auto: bool = False,
           draft_slots: int | None = None) -> RunInputs:
    """Everything planning needs, read once. `budget_bytes` replaces the config's budget (a benchmark's cgroup);
    `draft_auto`: draft.kind auto drafts by prompt lookup where the model is planned (run, chat);
    `draft_slots`: llama-server drafts in that many slots (speculative.setup_for)."""
    from orchestrator import overheads, rpc, speculative
    from orchestrator.sizes import available_memory

    budget = budget_bytes if budget_bytes is not None else cfg.budget.resolve_bytes(available_memory())
    inputs = RunInputs(config=cfg, model=settings.model, budget_bytes=budget, process_bytes=process_bytes)
    needs_plan = budget_bytes is not None or not _fits_without_plan(cfg, settings.model, budget)
    if needs_plan or cfg.draft.asked:
        from orchestrator.modelfile.reader import read_model_table

        inputs.table = read_model_table(settings.model)
    inputs.draft = speculative.setup_for(cfg, settings, log=log, target_table=inputs.table,
                                         auto=draft_auto and needs_plan, slots=draft_slots)
    if not needs_plan:
        inputs.table = None
        return inputs
    inputs.workers = rpc.offload_targets(cfg) or []
    inputs.overheads, inputs.read_probe = overheads.plan_inputs(cfg, settings.model, workers=inputs.workers)
    if inputs.draft is not None and not inputs.draft.length_fixed:
        from orchestrator import computespeed

        inputs.decode_profile = computespeed.measured(settings.model, settings.threads)
    if modes.is_oracle(cfg.moe.mode):
        from orchestrator import traces

        assert cfg.moe.trace is not None  # MoEConfig requires it for the oracle modes
        inputs.replayed = traces.read_trace(cfg.moe.trace)
    elif cfg.moe.trace is not None:
        from orchestrator import traces

        traces.check_trace_destination(Path(cfg.moe.trace), cfg.moe.trace_force)
    return inputs


def _fits_without_plan(cfg: "RunConfig", model: Path, budget: int) -> bool:
    """An `auto` budget, no MoE option and nothing offloaded (not even by -ngl auto, the default where this host has
    a GPU), and the model's files well inside the budget: the run needs no plan (the headers are still checked,
    cheaply)."""
    from orchestrator import rpc
    from orchestrator.modelfile.reader import shard_paths
    from orchestrator.modelfile.validate import read_layout
    from orchestrator.sizes import is_auto

    plain = cfg.moe.mode in (modes.AUTO, *modes.STOCK_LOADER_MODES) and not (cfg.moe.model_fields_set - {"mode"})
    if not (is_auto(str(cfg.budget.size)) and plain and not cfg.offloads and cfg.gpu.budget is None):
        return False
    if rpc.gpus_for(cfg) is not None:
        return False
    for shard in shard_paths(model):  # the header checks the full table read would make, in a fraction
        read_layout(shard)
    return 2 * sum(p.stat().st_size for p in shard_paths(model)) < budget
