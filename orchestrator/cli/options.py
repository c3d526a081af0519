"""Options shared by every command that opens a model (run, verify-exact, serve, chat): one definition each.

The flag names are the keyword options of the Python API (`--moe-slot-bank` ↔ `moe_slot_bank=`), and
`orchestrator.api.OPTION_KEYS` maps both to RunConfig keys; flags beat the YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from orchestrator.api import overrides_from_options

ConfigArg = Annotated[Optional[Path], typer.Argument(help="A YAML RunConfig (see configs/). Flags override it.")]
ModelOpt = Annotated[Optional[Path], typer.Option("--model", "-m", help="GGUF file (default: Gemma 3 270M Q4_K_M).")]
BudgetOpt = Annotated[Optional[str], typer.Option(
    "--budget", "-am", help="RAM budget (2GiB, 1.5G, 512MiB, a bare number of GiB, or auto). Below the model's "
    "size, weights stream from disk.")]
PrefetchThreadsOpt = Annotated[Optional[int], typer.Option(
    "--prefetch-threads", "-tp", min=0, help="Prefetch I/O threads for streamed weights; 0 = synchronous reads.")]
PrefetchWindowOpt = Annotated[Optional[int], typer.Option(
    "--prefetch-window", min=1, help="Layers read ahead of compute.")]
DirectIOOpt = Annotated[Optional[str], typer.Option(
    "--direct-io", help="O_DIRECT reads: auto, on, off or strict (fail when the file is not 4096-aligned).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help="Compute threads.")]
CtxOpt = Annotated[Optional[int], typer.Option("--ctx", "-c", min=16, help="Context size in tokens.")]
UbatchOpt = Annotated[Optional[int], typer.Option("--ubatch", "-ub", min=1, help="Micro-batch size.")]
MoEModeOpt = Annotated[Optional[str], typer.Option(
    "--moe-mode", help="MoE execution: auto, stock, resident, resident-bank (every expert from the sidecar), "
    "slot-bank (per-layer banks of resident expert slots, misses read from the sidecar), or the ceilings "
    "oracle-all-hit / oracle-prefetch (replay --moe-trace with every expert pre-installed / read one step "
    "ahead).")]
MoESidecarOpt = Annotated[Optional[Path], typer.Option(
    "--moe-sidecar", help="Expert sidecar directory (flashflex sidecar extract); default MODEL.sidecar beside it.")]
MoESlotBankOpt = Annotated[Optional[int], typer.Option(
    "--moe-slot-bank", min=1, help="Expert slots per MoE layer (>= top-k); default: sized by the planner.")]
MoETopkOpt = Annotated[Optional[int], typer.Option(
    "--moe-topk", min=1, help="Use fewer experts per token than the model (LOSSY: output differs from stock).")]
MoESharedOnlyOpt = Annotated[Optional[bool], typer.Option(
    "--moe-shared-only", help="Diagnostic, LOSSY: routed experts contribute nothing (slot-bank only).")]
MoEIOThreadsOpt = Annotated[Optional[int], typer.Option(
    "--moe-io-threads", min=1, help="Parallel readers for expert misses.")]
MoETraceOpt = Annotated[Optional[Path], typer.Option(
    "--moe-trace", help="Routing trace JSONL: slot-bank records one here; the oracle modes replay it.")]
TraceForceOpt = Annotated[Optional[bool], typer.Option(
    "--force", help="Overwrite an existing --moe-trace file (recording refuses to replace one otherwise).")]
MoEPrefetchOpt = Annotated[Optional[str], typer.Option(
    "--moe-prefetch", help="Expert prefetch policy for slot-bank: none (default) or router-lookahead.")]


def model_options(model, budget, prefetch_threads, prefetch_window, direct_io, threads, ctx, ubatch, *, moe_mode=None,
                  moe_sidecar=None, moe_slot_bank=None, moe_topk=None, moe_shared_only=None, moe_io_threads=None,
                  moe_trace=None, moe_prefetch=None, moe_trace_force=None) -> dict:
    """The shared flags as the Python API's keyword options (unset flags are None and change nothing)."""
    return dict(model=model, budget=budget, prefetch_threads=prefetch_threads, prefetch_window=prefetch_window,
                direct_io=direct_io, threads=threads, ctx=ctx, ubatch=ubatch, moe_mode=moe_mode,
                moe_sidecar=moe_sidecar, moe_slot_bank=moe_slot_bank, moe_topk=moe_topk,
                moe_shared_only=moe_shared_only, moe_io_threads=moe_io_threads, moe_trace=moe_trace,
                moe_prefetch=moe_prefetch, moe_trace_force=moe_trace_force)


def model_overrides(*args, extra: dict | None = None, **kwargs) -> dict:
    """The shared flags as RunConfig overrides, plus `extra` overrides (dotted RunConfig keys)."""
    return {**overrides_from_options(model_options(*args, **kwargs)), **(extra or {})}
