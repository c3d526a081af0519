"""Options shared by every command that opens a model (run, verify-exact, serve, chat): one definition each.

The flag names are the keyword options of the Python API (`--moe-slot-bank` ↔ `moe_slot_bank=`), and
`orchestrator.api.OPTION_KEYS` maps both to RunConfig keys; each flag's help text and bounds come from the
RunConfig field it sets (config.py), so the YAML docs, the JSON schema and --help say the same thing. Flags beat
the YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional, cast

import typer
from pydantic import BaseModel

from orchestrator.api import OPTION_KEYS
from orchestrator.config import RunConfig


def _flag(option: str, *decls: str) -> Any:
    """A typer option for the API keyword `option`, its help text and bounds taken from the RunConfig field it
    sets (api.OPTION_KEYS): the field's description is the one definition."""
    section, _, name = OPTION_KEYS[option].partition(".")
    field = cast(type[BaseModel], RunConfig.model_fields[section].annotation).model_fields[name]
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
PrefetchThreadsOpt = Annotated[Optional[str], _flag("prefetch_threads", "--prefetch-threads", "-tp")]
PrefetchWindowOpt = Annotated[Optional[str], _flag("prefetch_window", "--prefetch-window")]
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
RPCOpt = Annotated[Optional[str], _flag("rpc", "--rpc")]
RPCLayersOpt = Annotated[Optional[int], _flag("rpc_layers", "--rpc-layers")]
RPCTimeoutOpt = Annotated[Optional[float], _flag("rpc_timeout", "--rpc-timeout")]
RPCAnswerTimeoutOpt = Annotated[Optional[float], _flag("rpc_answer_timeout", "--rpc-answer-timeout")]
GPULayersOpt = Annotated[Optional[str], _flag("gpu_layers", "--gpu-layers", "-ngl")]
GPUBudgetOpt = Annotated[Optional[str], _flag("gpu_budget", "--gpu-budget")]
DraftOpt = Annotated[Optional[str], _flag("draft", "--draft")]
DraftModelOpt = Annotated[Optional[Path], _flag("draft_model", "--draft-model")]
DraftMaxOpt = Annotated[Optional[int], _flag("draft_max", "--draft-max")]
DraftAdaptiveOpt = Annotated[Optional[bool], _flag("draft_adaptive", "--draft-adaptive/--no-draft-adaptive")]


# The shared flags, in --help order: parameter name → its annotated type. A command takes them all through
# @model_options_command (minus any it excludes) and receives them as one dict of API keyword options.
SHARED_FLAGS: dict[str, Any] = {
    "model": ModelOpt, "budget": BudgetOpt, "prefetch_threads": PrefetchThreadsOpt,
    "prefetch_window": PrefetchWindowOpt, "direct_io": DirectIOOpt, "threads": ThreadsOpt, "ctx": CtxOpt,
    "ubatch": UbatchOpt, "moe_mode": MoEModeOpt, "moe_sidecar": MoESidecarOpt, "moe_slot_bank": MoESlotBankOpt,
    "moe_topk": MoETopkOpt, "moe_shared_only": MoESharedOnlyOpt, "moe_io_threads": MoEIOThreadsOpt,
    "moe_trace": MoETraceOpt, "moe_prefetch": MoEPrefetchOpt, "moe_verify": MoEVerifyOpt,
    "moe_trace_force": TraceForceOpt, "rpc": RPCOpt, "rpc_layers": RPCLayersOpt, "rpc_timeout": RPCTimeoutOpt,
    "rpc_answer_timeout": RPCAnswerTimeoutOpt, "gpu_layers": GPULayersOpt, "gpu_budget": GPUBudgetOpt,
    "draft": DraftOpt, "draft_model": DraftModelOpt, "draft_max": DraftMaxOpt, "draft_adaptive": DraftAdaptiveOpt,
}

DRAFT_FLAGS = ("draft", "draft_model", "draft_max", "draft_adaptive")
"""Speculative decoding's flags: for commands that generate (not verify-exact, which teacher-forces)."""


def model_options_command(*, exclude: tuple[str, ...] = ()):
    """Give a command every shared flag (one definition, not a copy per command): the decorated function declares
    `options: dict` and gets the flags' values as Python API keyword options (unset flags are None). Its own
    parameters keep their places; the shared ones come after its first (the CONFIG argument), in SHARED_FLAGS
    order."""
    import functools
    import inspect

    def decorate(fn):
        own = inspect.signature(fn, eval_str=True)
        params = [p for p in own.parameters.values() if p.name != "options"]
        shared = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=ann)
                  for name, ann in SHARED_FLAGS.items() if name not in exclude]
        names = [p.name for p in shared]

        @functools.wraps(fn)
        def command(**kwargs):
            return fn(options={name: kwargs.pop(name) for name in names}, **kwargs)

        merged = params[:1] + shared + params[1:]
        setattr(command, "__signature__", own.replace(parameters=merged))  # what inspect (and typer) read
        command.__annotations__ = {p.name: p.annotation for p in merged}
        return command

    return decorate
