"""`flashflex plan MODEL --budget SIZE`: show what a budget buys before anything is loaded.

A table for people; with --json, the Plan exactly as the native runtimes receive it.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from orchestrator.cli.common import JsonOpt, console, emit_json, err_console
from orchestrator.config import DEFAULT_BANDWIDTH, RunConfig, load_run_config
from orchestrator.modelfile.table import ModelTable
from orchestrator.modes import MOE_MODES
from orchestrator.planner import Plan, PlanInputs, PlanRequest, explain, format_tokens_per_s, make_plan
from orchestrator.planner.explain import device_label
from orchestrator.sizes import format_rate, format_size, parse_rate

_MOE_MODE_HELP = f"MoE only: {' | '.join(MOE_MODES)}."


def _load_table(path: Path) -> ModelTable:
    """The tensor table of `path` (imported lazily so `plan` stays cheap to register)."""
    from orchestrator.modelfile.reader import read_model_table

    return read_model_table(path)


def _settings(budget: str, ctx: int, ubatch: int, window: str, threads: str, direct_io: str,
              moe_mode: str | None, slot_bank: int | None, topk: int | None, rpc: str | None = None,
              rpc_layers: int | None = None, rpc_timeout: float | None = None,
              gpu_layers: str | None = None, gpu_budget: str | None = None, draft: str | None = None,
              draft_max: int | None = None) -> RunConfig:
    """Flags validated by the same models as YAML, so errors read the same."""
    overrides: dict[str, Any] = {
        "budget.size": budget,
        "context.ctx": ctx,
        "context.ubatch": ubatch,
        "context.batch": max(ubatch, RunConfig().context.batch),
        "prefetch.window": window,
        "prefetch.threads": threads,
        "prefetch.direct_io": direct_io,
        "moe.mode": moe_mode,
        "moe.slot_bank": slot_bank,
        "moe.topk": topk,
        "rpc.servers": rpc,
        "rpc.layers": rpc_layers,
        "rpc.timeout_s": rpc_timeout,
        "gpu.layers": gpu_layers,
        "gpu.budget": gpu_budget,
        "draft.kind": draft,
        "draft.max_tokens": draft_max,
    }
    return load_run_config(None, overrides)


def plan_command(
    model: Annotated[Path, typer.Argument(help="GGUF model file (any shard of a split model).")],
    budget: Annotated[str, typer.Option("--budget", "-am", help="RAM budget: 2GiB, 1.5G, 512MiB, a bare number "
                                        "of GiB (0.5), or auto (available memory minus 1 GiB).")] = "auto",
    ctx: Annotated[int, typer.Option("--ctx", "-c", help="Context length the KV cache is reserved for.")] = 2048,
    ubatch: Annotated[int, typer.Option("--ubatch", "-ub", help="Micro-batch the compute buffers are sized "
                                        "for.")] = 512,
    prefetch_window: Annotated[str, typer.Option("--prefetch-window", help="Read-ahead: auto (a ring sized in "
                                                 "bytes) or a number of layers.")] = "auto",
    prefetch_threads: Annotated[str, typer.Option("--prefetch-threads", "-tp", help="Prefetch I/O threads: auto "
                                                  "(chosen from the device's probed read bandwidth), or a number; "
                                                  "0 = synchronous reads.")] = "auto",
    reprobe: Annotated[bool, typer.Option("--reprobe", help="Probe the device's direct-read bandwidth again (-tp "
                                          "auto; the probe is cached per device).")] = False,
    direct_io: Annotated[str, typer.Option("--direct-io", help="auto | on | off | strict.")] = "auto",
    bandwidth: Annotated[str, typer.Option("--bandwidth", help="Read bandwidth for the tokens/s estimate "
                                           "(1.1GB/s, 500MiB/s).")] = DEFAULT_BANDWIDTH,
    moe_mode: Annotated[Optional[str], typer.Option("--moe-mode", help=_MOE_MODE_HELP)] = None,
    moe_slot_bank: Annotated[Optional[int], typer.Option("--moe-slot-bank", help="MoE only: expert slots per "
                                                         "layer instead of the planner's choice.")] = None,
    moe_topk: Annotated[Optional[int], typer.Option("--moe-topk", help="MoE only: fewer experts per token "
                                                    "(lossy).")] = None,
    rpc: Annotated[Optional[str], typer.Option("--rpc", help="RPC workers, HOST:PORT[,HOST:PORT...] (flashflex "
                                               "rpc-server on each): each is asked for the memory it announces, and "
                                               "the plan puts the model's last layers on them.")] = None,
    rpc_layers: Annotated[Optional[int], typer.Option("--rpc-layers", min=1, help="Layers to put on the RPC "
                                                      "workers (default: as many as they hold).")] = None,
    rpc_timeout: Annotated[Optional[float], typer.Option("--rpc-timeout", min=0.1, max=120.0,
                                                         help="Seconds each worker has to answer.")] = None,
    gpu_layers: Annotated[Optional[str], typer.Option("--gpu-layers", "-ngl", help="Layers to offload to this "
                                                      "host's GPUs, then the RPC workers (99 = all, 0 = none; auto = "
                                                      "as many as the device budget holds, the default where this "
                                                      "host has a GPU and no --rpc is given).")] = None,
    gpu_budget: Annotated[Optional[str], typer.Option("--gpu-budget", help="Device memory the plan may use on each "
                                                      "of this host's GPUs (default: its free memory minus a "
                                                      "margin).")] = None,
    draft: Annotated[Optional[str], typer.Option("--draft", help="Reserve drafting's verification batch as run "
                                                 "would: prompt-lookup[:N] (none: nothing).")] = None,
    draft_max: Annotated[Optional[int], typer.Option("--draft-max", min=1, max=64, help="Most drafted tokens per "
                                                     "verification (default: what the budget affords).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help="Compute threads of the run "
                                                   "planned for: drafting's rows are priced by the decode earlier "
                                                   "runs with these threads measured (default: as run's).")] = None,
    show_explain: Annotated[bool, typer.Option("--explain", help="Say which tensors are kept and why.")] = False,
    estimate: Annotated[bool, typer.Option("--estimate", help="Reserve the planner's estimates for the KV cache and "
                                           "compute buffers instead of measuring what llama.cpp allocates (the "
                                           "measurement needs the patched library; it is cached).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Plan a model under a RAM budget: resident and streamed tensors, expert banks, reservations, estimates; with
    --rpc, which layers go to which worker and what stays here."""
    settings = _settings(budget, ctx, ubatch, prefetch_window, prefetch_threads, direct_io, moe_mode,
                         moe_slot_bank, moe_topk, rpc, rpc_layers, rpc_timeout, gpu_layers, gpu_budget, draft,
                         draft_max)
    settings.context.threads = threads
    rate = parse_rate(bandwidth, what="--bandwidth")
    settings.context.outputs = 1  # as run plans: a decode asks for the next token's logits (drafting reserves more)
    table = _load_table(model)
    from orchestrator import rpc as rpc_mod

    workers = rpc_mod.offload_targets(settings)
    from orchestrator import overheads

    measured, probe = overheads.plan_inputs(settings, model, workers=workers, estimate=estimate, reprobe=reprobe)
    request = PlanRequest.from_config(settings, settings.budget.resolve_bytes(), read_bandwidth=rate,
                                      draft=_draft_request(settings, model, table))
    from orchestrator import computespeed

    profile = computespeed.measured(model, settings.context.threads) if request.draft is not None else None
    plan = make_plan(request, PlanInputs(table=table, overheads=measured, read_probe=probe, workers=workers or [],
                                         decode_profile=profile))
    if json_out:
        emit_json(plan.model_dump(mode="json"))
        if show_explain:
            for line in explain(plan):
                err_console.print(line, markup=False)
        return
    _print_plan(plan)
    if show_explain:
        console.print()
        for line in explain(plan):
            console.print(line, markup=False)


def _draft_request(settings: RunConfig, model: Path, table: ModelTable) -> Any:
    """What drafting asks the planner to reserve, as `run` would ask it (None without --draft)."""
    if settings.draft.kind == "none":
        return None  # auto: as run, prompt lookup where the plan affords it
    from orchestrator import speculative
    from orchestrator.run.settings import GenerationSettings

    generation = GenerationSettings(model=model, ctx=settings.context.ctx, batch=settings.context.batch,
                                    ubatch=settings.context.ubatch)
    setup = speculative.setup_for(settings, generation, log=err_console.print, target_table=table, auto=True)
    return setup.request() if setup is not None else None


def _print_plan(plan: Plan) -> None:
    r, e, p = plan.reservations, plan.estimates, plan.prefetch
    summary = Table(title=f"plan: {Path(plan.files[0]).name if plan.files else plan.arch}", show_header=False,
                    title_justify="left")
    summary.add_column("what", style="bold")
    summary.add_column("value")
    summary.add_row("model", f"{plan.arch} ({plan.kind}), {plan.n_layer} layers, {format_size(plan.model_bytes)}")
    summary.add_row("budget", f"{format_size(plan.budget_bytes)} (minimum "
                              f"{format_size(plan.minimum_budget_bytes, round_up=True)}), used "
                              f"{format_size(plan.used_bytes)}")
    summary.add_row("KV cache", f"{format_size(r.kv_cache_bytes)} ({plan.ctx} tokens, {r.source})")
    summary.add_row("compute", f"{format_size(r.compute_bytes)} (ubatch {plan.ubatch}, {r.source})")
    if r.load_staging_bytes:
        summary.add_row("loading", f"{format_size(r.load_staging_bytes)} more while a tensor bound for another "
                                   "device is staged here")
    summary.add_row("prefetch", f"ring {format_size(p.ring_bytes)}, {p.threads} thread(s), window "
                                f"{p.window}, direct I/O {'on' if p.direct_io else 'off'}" if p.buffers
                    else "none (nothing streams)")
    summary.add_row("weights resident", format_size(plan.resident_bytes))
    if plan.layer_quota_bytes is not None:
        summary.add_row("per-layer quota", format_size(plan.layer_quota_bytes))
    if plan.moe is not None:
        m = plan.moe
        bank = (f"{m.slot_bank} of {m.n_expert} experts x {m.moe_layers} layers ({format_size(m.bank_bytes)})"
                if m.slot_bank is not None else f"all {m.n_expert} experts resident")
        summary.add_row("MoE", f"mode {m.mode}, top-k {m.topk}{' (lossy)' if m.topk_lossy else ''}, {bank}")
    if e.streamed_bytes_per_token:
        hit = f", hit rate ~{e.expected_hit_rate:.0%}" if e.expected_hit_rate is not None else ""
        summary.add_row("reads per token", f"{format_size(e.streamed_bytes_per_token)}{hit}")
        summary.add_row("I/O-bound speed", f"<= {format_tokens_per_s(e.io_bound_tokens_per_s)} tok/s at "
                                           f"{format_rate(e.read_bandwidth)}")
    else:
        summary.add_row("reads per token", "none: not I/O bound")
    console.print(summary)
    if plan.rpc is not None:
        _print_placement(plan)

    layers = Table(title="layers on this host" if plan.rpc is not None else "layers", title_justify="left")
    for col in ("layers", "regime", "resident", "streamed", "bank"):
        layers.add_column(col, justify="left" if col in ("layers", "regime") else "right")

    def key(lp: Any) -> tuple[Any, ...]:
        return lp.regime, lp.resident_bytes, lp.streamed_bytes, lp.slot_bank, lp.bank_bytes

    for _, group in itertools.groupby(plan.layers, key=key):
        g = list(group)
        span = f"{g[0].layer}" if len(g) == 1 else f"{g[0].layer}-{g[-1].layer}"
        first = g[0]
        bank = "-" if first.n_expert is None else (
            f"{first.slot_bank}/{first.n_expert} ({format_size(first.bank_bytes)})" if first.slot_bank is not None
            else f"all ({format_size(first.bank_bytes)})")
        layers.add_row(span, first.regime, format_size(first.resident_bytes), format_size(first.streamed_bytes), bank)
    console.print(layers)
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}", highlight=False)


def _print_placement(plan: Plan) -> None:
    """Which layers go to which device (this host's GPUs, RPC workers' devices), and what stays here."""
    rpc = plan.rpc
    assert rpc is not None
    table = Table(title=f"placement: {rpc.remote_layers} of {plan.n_layer} layers on other devices "
                        f"({format_size(rpc.remote_weight_bytes)}), {rpc.local_layers} on this host's CPU "
                        f"({format_size(rpc.local_model_bytes)} with the input embedding)", title_justify="left")
    for col in ("device", "layers", "weights", "KV cache", "compute", "used", "budget", "free"):
        table.add_column(col, justify="left" if col in ("device", "layers") else "right")
    here = f"0-{rpc.local_layers - 1} + input" if rpc.local_layers else "input embedding"
    table.add_row("this host's CPU", here, "planned below", "", "", "", format_size(plan.budget_bytes), "")
    for d in rpc.devices:
        last = d.first_layer + d.n_layers - 1
        span = (f"{d.first_layer}" if d.n_layers == 1 else f"{d.first_layer}-{last}") + (" + output" if d.output
                                                                                          else "")
        compute = format_size(d.compute_bytes) + (" (measured)" if d.compute_source == "measured" else "")
        kv = format_size(d.kv_cache_bytes) + (" (measured)" if d.kv_source == "measured" else "")
        table.add_row(device_label(d), span, format_size(d.weight_bytes), kv, compute,
                      format_size(d.used_bytes), format_size(d.budget_bytes) if d.budget_bytes is not None else "",
                      format_size(d.free_bytes))
    console.print(table)
    console.print(f"llama.cpp: n_gpu_layers {rpc.n_gpu_layers}, tensor_split "
                  f"{','.join(f'{x:g}' for x in rpc.tensor_split)}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_command)
