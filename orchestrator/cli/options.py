"""Options shared by every command that opens a model (run, verify-exact, serve, chat): one definition each.

The flag names are the keyword options of the Python API (`--moe-slot-bank` ↔ `moe_slot_bank=`), and
`orchestrator.api.OPTION_KEYS` maps both to RunConfig keys; each flag's help text and bounds come from the
RunConfig field it sets (config.py), so the YAML docs, the JSON schema and --help say the same thing. Flags beat
the YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from orchestrator.api import OPTION_KEYS, overrides_from_options
from orchestrator.config import RunConfig


def _flag(option: str, *decls: str) -> Any:
    """A typer option for the API keyword `option`, its help text and bounds taken from the RunConfig field it
    sets (api.OPTION_KEYS): the field's description is the one definition."""
    section, _, name = OPTION_KEYS[option].partition(".")
    field = RunConfig.model_fields[section].annotation.model_fields[name]
    bounds: dict[str, Any] = {}
    for rule in field.metadata:
        if hasattr(rule, "ge"):
            bounds["min"] = rule.ge
        if hasattr(rule, "le"):
            bounds["max"] = rule.le
    return typer.Option(*decls, help=field.description, **bounds)


ConfigArg = Annotated[Optional[Path], typer.Argument(help="A YAML RunConfig (see configs/). Flags override it.")]
ModelOpt = Annotated[Optional[Path], _flag("model", "--model", "-m")]
BudgetOpt = Annotated[Optional[str], _flag("budget", "--budget", "-am")]
PrefetchThreadsOpt = Annotated[Optional[int], _flag("prefetch_threads", "--prefetch-threads", "-tp")]
PrefetchWindowOpt = Annotated[Optional[int], _flag("prefetch_window", "--prefetch-window")]
DirectIOOpt = Annotated[Optional[str], _flag("direct_io", "--direct-io")]
ThreadsOpt = Annotated[Optional[int], _flag("threads", "--threads", "-t")]
CtxOpt = Annotated[Optional[int], _flag("ctx", "--ctx", "-c")]
UbatchOpt = Annotated[Optional[int], _flag("ubatch", "--ubatch", "-ub")]
MoEModeOpt = Annotated[Optional[str], _flag("moe_mode", "--moe-mode")]
MoESidecarOpt = Annotated[Optional[Path], _flag("moe_sidecar", "--moe-sidecar")]
MoESlotBankOpt = Annotated[Optional[int], _flag("moe_slot_bank", "--moe-slot-bank")]
MoETopkOpt = Annotated[Optional[int], _flag("moe_topk", "--moe-topk")]
MoESharedOnlyOpt = Annotated[Optional[bool], _flag("moe_shared_only", "--moe-shared-only")]
MoEIOThreadsOpt = Annotated[Optional[int], _flag("moe_io_threads", "--moe-io-threads")]
MoETraceOpt = Annotated[Optional[Path], _flag("moe_trace", "--moe-trace")]
TraceForceOpt = Annotated[Optional[bool], _flag("moe_trace_force", "--force")]
MoEPrefetchOpt = Annotated[Optional[str], _flag("moe_prefetch", "--moe-prefetch")]
MoEVerifyOpt = Annotated[Optional[bool], _flag("moe_verify", "--moe-verify/--no-moe-verify")]


def model_options(model, budget, prefetch_threads, prefetch_window, direct_io, threads, ctx, ubatch, *, moe_mode=None,
                  moe_sidecar=None, moe_slot_bank=None, moe_topk=None, moe_shared_only=None, moe_io_threads=None,
                  moe_trace=None, moe_prefetch=None, moe_trace_force=None, moe_verify=None) -> dict:
    """The shared flags as the Python API's keyword options (unset flags are None and change nothing)."""
    return dict(model=model, budget=budget, prefetch_threads=prefetch_threads, prefetch_window=prefetch_window,
                direct_io=direct_io, threads=threads, ctx=ctx, ubatch=ubatch, moe_mode=moe_mode,
                moe_sidecar=moe_sidecar, moe_slot_bank=moe_slot_bank, moe_topk=moe_topk,
                moe_shared_only=moe_shared_only, moe_io_threads=moe_io_threads, moe_trace=moe_trace,
                moe_prefetch=moe_prefetch, moe_trace_force=moe_trace_force, moe_verify=moe_verify)


def model_overrides(*args, extra: dict | None = None, **kwargs) -> dict:
    """The shared flags as RunConfig overrides, plus `extra` overrides (dotted RunConfig keys)."""
    return {**overrides_from_options(model_options(*args, **kwargs)), **(extra or {})}
