"""make_plan: ModelTable + budget + settings -> Plan (a pure function; see the package docstring for the rules)."""

from __future__ import annotations

import bisect
import itertools
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from orchestrator.errors import FlashflexError
from orchestrator.modelfile.table import ModelTable, Role, TensorInfo
from orchestrator.planner.schema import (
    _ALL_RESIDENT_MODES,
    _ATTENTION_RANK,
    _FFN_ROLES,
    _SUBSET_SUM_LIMIT,
    BANK_WARN_FACTOR,
    COMPUTE_FIXED_BYTES,
    DEFAULT_N_VOCAB,
    DEFAULT_READ_BANDWIDTH,
    DIRECT_IO_ALIGNMENT,
    Estimates,
    LayerPlan,
    MoEPlan,
    Placement,
    Plan,
    PrefetchPlan,
    Reservations,
    TensorDecision,
)
from orchestrator.sizes import format_size, parse_rate


@dataclass(frozen=True)
class _Steps:
    """Selection of a layer's streamable tensors as a function of the quota, piecewise constant."""

    breakpoints: tuple[int, ...]  # sorted quotas where the selection may change; starts at 0
    selections: tuple[frozenset[int], ...]  # indices into the layer's streamable tensors
    resident: tuple[int, ...]  # bytes of each selection (non-decreasing)
    regimes: tuple[str, ...]

    def at(self, quota: int) -> int:
        return bisect.bisect_right(self.breakpoints, quota) - 1


def _greedy(order: list[int], sizes: tuple[int, ...], quota: int) -> frozenset[int]:
    left = quota
    chosen = []
    for i in order:
        if sizes[i] <= left:
            chosen.append(i)
            left -= sizes[i]
    return frozenset(chosen)


@lru_cache(maxsize=4096)
def _layer_steps(items: tuple[tuple[Role, int], ...]) -> _Steps:
    """Preservation step function for one layer signature: (role, n_bytes) of each streamable tensor."""
    sizes = tuple(n for _, n in items)
    attention = [i for i, (r, _) in enumerate(items) if r not in _FFN_ROLES]
    ffn = [i for i, (r, _) in enumerate(items) if r in _FFN_ROLES]
    att_bytes = sum(sizes[i] for i in attention)
    ffn_bytes = sum(sizes[i] for i in ffn)
    att_key = lambda i: (_ATTENTION_RANK.get(items[i][0], 5), sizes[i], i)  # noqa: E731
    attention_first = sorted(attention, key=att_key) + sorted(ffn, key=lambda i: (sizes[i], i))
    ffn_first = sorted(ffn, key=lambda i: (-sizes[i], i)) + sorted(attention, key=att_key)

    if len(sizes) <= _SUBSET_SUM_LIMIT:
        sums = {0}
        for n in sizes:
            sums |= {s + n for s in sums}
    else:  # any breakpoint set keeps the result feasible and monotone; subset sums make it exact
        sums = {0, att_bytes, ffn_bytes, sum(sizes), *sizes}
        for order in (attention_first, ffn_first):
            sums |= set(itertools.accumulate(sizes[i] for i in order))
    total = sum(sizes)
    bps, sels, res, regs = [], [], [], []
    best: frozenset[int] = frozenset()
    best_bytes, best_regime = 0, "none"
    for q in sorted(sums):
        if q <= att_bytes:
            regime, order = "attention", attention_first
        else:
            regime, order = ("ffn" if q >= ffn_bytes else "mixed"), ffn_first
        sel = _greedy(order, sizes, q)
        n = sum(sizes[i] for i in sel)
        if n >= best_bytes:
            best, best_bytes, best_regime = sel, n, regime
        if best_bytes == total and total > 0:
            best_regime = "all"
        elif best_bytes == 0:
            best_regime = "none"
        bps.append(q)
        sels.append(best)
        res.append(best_bytes)
        regs.append(best_regime)
    return _Steps(tuple(bps), tuple(sels), tuple(res), tuple(regs))


# --------------------------------------------------------------------------------------------------
# Model analysis


@dataclass
class _Layer:
    index: int
    streamable: list[TensorInfo]
    pinned: list[TensorInfo]
    routed: list[TensorInfo]
    steps: _Steps
    n_expert: int = 0
    expert_bytes: int = 0

    @property
    def streamable_bytes(self) -> int:
        return sum(t.n_bytes for t in self.streamable)


def _is_pinned(t: TensorInfo) -> bool:
    return len(t.shape) <= 1 or t.role in (Role.NORM, Role.ROUTER)


def _span_allowance(layer: _Layer) -> int:
    """Padding a layer's streamed tensors may need in a buffer: an O_DIRECT read covers whole 4096-byte
    pages, so each tensor's span is at most its size plus two pages. Counted for every streamable tensor of
    the layer, whichever stream, so that buffer sizes only shrink as the quota grows."""
    return 2 * DIRECT_IO_ALIGNMENT * len(layer.streamable)


def _base_name(t: TensorInfo) -> str:
    return re.sub(rf"(^|\.){t.layer}(\.|$)", r"\1#\2", t.name, count=1) if t.layer is not None else t.name


def _layers(table: ModelTable, n_expert: int) -> list[_Layer]:
    by_layer: dict[int, list[TensorInfo]] = {}
    for t in table.tensors:
        if t.layer is not None:
            by_layer.setdefault(t.layer, []).append(t)
    out = []
    for index in sorted(by_layer):
        tensors = by_layer[index]
        routed = [t for t in tensors if t.role is Role.EXPERT_ROUTED and not _is_pinned(t)]
        pinned = [t for t in tensors if _is_pinned(t)]
        streamable = [t for t in tensors if t not in routed and t not in pinned]
        streamable.sort(key=_base_name)  # layer-independent order, so equal layers share one step function
        steps = _layer_steps(tuple((t.role, t.n_bytes) for t in streamable))
        layer = _Layer(index, streamable, pinned, routed, steps)
        if routed:
            e = n_expert or max((t.shape[-1] for t in routed), default=1)
            layer.n_expert = e
            layer.expert_bytes = sum(-(-t.n_bytes // e) for t in routed)
        out.append(layer)
    return out


def _n_vocab(table: ModelTable) -> int:
    for role in (Role.OUTPUT, Role.TOKEN_EMBD):
        for t in table.tensors:
            if t.role is role and len(t.shape) >= 2:
                return int(t.shape[1])
    return DEFAULT_N_VOCAB


def _ffn_width(table: ModelTable, topk: int) -> int:
    a = table.arch
    dense = [d for t in table.tensors if t.role is Role.FFN_DENSE for d in t.shape[:2] if d != a.n_embd]
    shared = [d for t in table.tensors if t.role is Role.EXPERT_SHARED for d in t.shape[:2] if d != a.n_embd]
    width = max(dense, default=0)
    if a.is_moe:
        expert = a.expert_ffn or max((d for t in table.tensors if t.role is Role.EXPERT_ROUTED
                                      for d in t.shape[:2] if d != a.n_embd), default=0)
        width = max(width, expert * topk + (a.shared_expert_ffn or max(shared, default=0)))
    return width or 4 * a.n_embd


def kv_cache_bytes(table: ModelTable, ctx: int) -> int:
    """f16 K and V for all layers and the whole context."""
    a = table.arch
    return a.n_layer * ctx * a.n_head_kv * (a.head_dim_k + a.head_dim_v) * 2


def compute_bytes(table: ModelTable, ctx: int, ubatch: int, topk: int | None = None) -> int:
    """Upper estimate of llama.cpp's compute buffers for one ubatch (see the module docstring)."""
    a = table.arch
    k = topk if topk is not None else max(a.n_expert_used, 1)
    per_token = _n_vocab(table) + 6 * a.n_embd + 3 * _ffn_width(table, k) + a.n_head * ctx
    return 4 * ubatch * per_token + COMPUTE_FIXED_BYTES


# --------------------------------------------------------------------------------------------------
# Planning


def _get(obj: Any, name: str, default: Any) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _level(layers: list[_Layer], avail: int, candidates: list[int]) -> int:
    """The largest per-layer quota whose resident bytes over all layers fit in `avail` (water level)."""

    def total(q: int) -> int:
        return sum(layer.steps.resident[layer.steps.at(q)] for layer in layers)

    lo, hi = 0, len(candidates) - 1  # candidates[0] == 0 and total(0) == 0 <= avail
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total(candidates[mid]) <= avail:
            lo = mid
        else:
            hi = mid - 1
    return candidates[lo]


def _streamed_layer_buffer(layer: _Layer, quota: int | None) -> int:
    """Buffer bytes a layer needs at `quota`: its streamed bytes plus page padding; 0 if nothing streams."""
    if quota is None:
        return 0
    streamed = layer.streamable_bytes - layer.steps.resident[layer.steps.at(quota)]
    return streamed + _span_allowance(layer) if streamed > 0 else 0


def _buffers(layers: list[_Layer], quota: int | None, window: int) -> tuple[int, int]:
    """(number of buffers, bytes per buffer) for a quota (None = nothing streams)."""
    per_layer = [_streamed_layer_buffer(layer, quota) for layer in layers]
    streaming = sum(1 for b in per_layer if b > 0)
    if streaming == 0:
        return 0, 0
    return min(window, streaming), max(per_layer)


def _staging_bytes(layers: list[_Layer], threads: int) -> int:
    """Staging the runtime needs besides the ring: tensors the CPU backend keeps in a repacked layout are read
    raw into a staging buffer, then repacked into their slot; one buffer per prefetch thread (or one for
    synchronous reads), each as large as the largest streamable tensor plus its page padding."""
    largest = max((t.n_bytes for layer in layers for t in layer.streamable), default=0)
    return max(1, threads) * (largest + 2 * DIRECT_IO_ALIGNMENT) if largest else 0


def _prefetch_cost(n_buf: int, buf: int, staging: int) -> int:
    """Bytes of the ring (n_buf slots of buf bytes) plus staging, when anything streams."""
    return n_buf * buf + (staging if n_buf else 0)


def _dense_fill(layers: list[_Layer], avail_before_buffers: int, window: int,
                staging: int = 0) -> tuple[int, int, int]:
    """Water-fill the layers' quota while paying for the prefetch buffers it leaves necessary.

    Starts from the buffers of streaming everything and iterates: a higher quota streams less, so needs
    smaller buffers, which frees budget for a higher quota. Each step stays within budget and is monotone in
    the budget, so the result is too. Returns (quota, buffers, buffer_bytes).
    """
    candidates = sorted({bp for layer in layers for bp in layer.steps.breakpoints})
    n_buf, buf = _buffers(layers, 0, window)
    reserved = _prefetch_cost(n_buf, buf, staging)
    quota = 0
    for _ in range(64):
        quota = _level(layers, avail_before_buffers - reserved, candidates)
        n_buf, buf = _buffers(layers, quota, window)
        if _prefetch_cost(n_buf, buf, staging) >= reserved:
            break
        reserved = _prefetch_cost(n_buf, buf, staging)
    return quota, n_buf, buf


def runtime_slots(slots: int, n_expert: int) -> int:
    """Expert slots the runtime allocates for a bank of `slots`: one more (a zero slot where a ubatch that
    needs several passes parks the pairs another pass computes) unless the bank holds every expert."""
    slots = min(slots, n_expert)
    return slots + 1 if slots < n_expert else slots


def make_plan(
    table: ModelTable,
    budget_bytes: int,
    *,
    ctx: int = 2048,
    ubatch: int = 512,
    prefetch: Any = None,
    moe: Any = None,
    read_bandwidth: int | str | None = None,
) -> Plan:
    """Plan `table` under `budget_bytes` of RAM. Pure: reads nothing, writes nothing.

    `prefetch` is a PrefetchConfig or anything with `threads`, `window`, `direct_io` (and optionally
    `read_bandwidth`); `moe` a MoEConfig or anything with `mode`, `slot_bank`, `topk`; dicts work too.
    `read_bandwidth` (bytes/s or a rate string) overrides the prefetch settings' value for the estimate.
    Raises FlashflexError for a budget below the minimum, MoE options on a dense model, and impossible
    MoE settings.
    """
    arch = table.arch
    name = table.files[0].name if table.files else arch.arch
    if ctx < 1 or ubatch < 1:
        raise FlashflexError(f"ctx and ubatch must be positive (got ctx={ctx}, ubatch={ubatch})",
                             "pass --ctx and --ubatch of 1 or more")
    threads = int(_get(prefetch, "threads", 1))
    window = int(_get(prefetch, "window", 3))
    direct_io_requested = str(_get(prefetch, "direct_io", "auto"))
    if read_bandwidth is None:
        read_bandwidth = _get(prefetch, "read_bandwidth", DEFAULT_READ_BANDWIDTH)
    bandwidth = read_bandwidth if isinstance(read_bandwidth, int) else parse_rate(read_bandwidth)
    effective_window = max(1, window) if threads > 0 else 1

    requested_mode = str(_get(moe, "mode", "auto") or "auto")
    slot_bank_req = _get(moe, "slot_bank", None)
    topk_req = _get(moe, "topk", None)
    warnings: list[str] = []

    has_routed = any(t.role is Role.EXPERT_ROUTED for t in table.tensors)
    is_moe = arch.is_moe or has_routed
    if not is_moe:
        used = [f"--moe-mode {requested_mode}"] if requested_mode not in ("auto", "stock") else []
        used += [f"--moe-slot-bank {slot_bank_req}"] if slot_bank_req is not None else []
        used += [f"--moe-topk {topk_req}"] if topk_req is not None else []
        if used:
            raise FlashflexError(f"{name} is a dense model ({arch.arch}, no routed experts): "
                                 f"{', '.join(used)} applies to MoE models only", "drop the MoE options")

    n_expert_used = max(arch.n_expert_used, 1) if is_moe else 0
    topk = n_expert_used
    if is_moe and topk_req is not None:
        if topk_req < 1 or topk_req > n_expert_used:
            raise FlashflexError(f"--moe-topk {topk_req} is outside 1..{n_expert_used}",
                                 f"top-k can only reduce the model's {n_expert_used} experts per token")
        topk = int(topk_req)
        if topk < n_expert_used:
            warnings.append(f"top-k {topk} overrides the model's {n_expert_used} experts per token: lossy, "
                            "output will differ from stock")

    layers = _layers(table, arch.n_expert)
    moe_layers = [layer for layer in layers if layer.routed]
    if ctx > arch.n_ctx_train > 0:
        warnings.append(f"ctx {ctx} exceeds the model's training context {arch.n_ctx_train}")

    kv = kv_cache_bytes(table, ctx)
    compute = compute_bytes(table, ctx, ubatch, topk if is_moe else None)
    non_layer = sum(t.n_bytes for t in table.tensors if t.layer is None)
    pinned = sum(t.n_bytes for layer in layers for t in layer.pinned)
    fixed = kv + compute + non_layer + pinned
    streamable_all = sum(layer.streamable_bytes for layer in layers)
    routed_all = sum(t.n_bytes for layer in moe_layers for t in layer.routed)
    everything = fixed + streamable_all + routed_all

    # MoE mode: which experts are resident
    mode = requested_mode
    if is_moe:
        if mode == "auto":
            mode = "stock" if everything <= budget_bytes and slot_bank_req is None else "slot-bank"
        if mode in _ALL_RESIDENT_MODES:
            if slot_bank_req is not None:
                raise FlashflexError(f"--moe-slot-bank applies to slot-bank and oracle modes, not {mode}",
                                     "drop --moe-slot-bank or use --moe-mode slot-bank")
            if everything > budget_bytes:
                raise FlashflexError(
                    f"mode {mode} keeps every expert resident and needs {format_size(everything, round_up=True)}; "
                    f"the budget is {format_size(budget_bytes)}",
                    "use --moe-mode slot-bank, or raise --budget")
    banked = is_moe and mode not in _ALL_RESIDENT_MODES

    # Minimum banks (top-k, or the slot bank asked for)
    min_slots = topk
    if banked and slot_bank_req is not None:
        max_expert = max(layer.n_expert for layer in moe_layers) if moe_layers else 0
        if slot_bank_req < topk:
            raise FlashflexError(f"--moe-slot-bank {slot_bank_req} is below top-k {topk}: every token needs {topk} "
                                 "experts resident at once", f"use a slot bank of at least {topk}")
        if slot_bank_req > max_expert:
            warnings.append(f"slot bank {slot_bank_req} capped at the expert count {max_expert}")
        min_slots = int(slot_bank_req)

    def bank_bytes(slots: int) -> int:
        return sum(runtime_slots(slots, layer.n_expert) * layer.expert_bytes for layer in moe_layers)

    min_banks = bank_bytes(min_slots) if banked else 0
    if not banked:
        fixed += routed_all  # resident experts are fixed weights

    staging = _staging_bytes(layers, threads)
    n_buf0, buf0 = _buffers(layers, 0, effective_window)
    stream_all = _prefetch_cost(n_buf0, buf0, staging)
    minimum = fixed + min_banks + min(streamable_all, stream_all)
    if is_moe and requested_mode == "auto" and not banked:  # auto falls back to slot-bank below the stock size
        auto_min = fixed - routed_all + bank_bytes(topk) + min(streamable_all, stream_all)
        minimum = min(minimum, auto_min)
    if budget_bytes < minimum:
        parts = [f"KV cache {format_size(kv)}", f"compute {format_size(compute)}",
                 f"always-resident weights {format_size(non_layer + pinned + (0 if banked else routed_all))}"]
        if streamable_all > stream_all:
            parts.append(f"prefetch buffers {n_buf0} x {format_size(buf0)} + staging {format_size(staging)}")
        else:
            parts.append(f"layer weights {format_size(streamable_all)}")
        if banked:
            parts.append(f"{min_slots} expert slots x {len(moe_layers)} layers {format_size(min_banks)}")
        raise FlashflexError(
            f"budget {format_size(budget_bytes)} is below the {format_size(minimum, round_up=True)} minimum for "
            f"{name} ({' + '.join(parts)})",
            f"give --budget {format_size(minimum, round_up=True).replace(' ', '')} or more, or lower --ctx, "
            "--ubatch or --prefetch-window")

    # Dense weights: all resident if they fit beside the minimum banks, else water-filled with streaming
    avail = budget_bytes - fixed - min_banks
    if streamable_all <= avail:
        quota: int | None = None
        n_buf, buf = 0, 0
    else:
        quota, n_buf, buf = _dense_fill(layers, avail, effective_window, staging)

    # Banks grow with whatever is left once every dense weight is resident
    slots = min_slots
    if banked and quota is None and slot_bank_req is None and moe_layers:
        left = avail + min_banks - streamable_all
        lo, hi = min_slots, max(layer.n_expert for layer in moe_layers)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if bank_bytes(mid) <= left:
                lo = mid
            else:
                hi = mid - 1
        slots = lo
    if banked and moe_layers:
        top = max(layer.n_expert for layer in moe_layers)
        if min(slots, top) < BANK_WARN_FACTOR * topk and min(slots, top) < top:
            warnings.append(f"slot bank {min(slots, top)} is within {BANK_WARN_FACTOR}x top-k {topk}: most expert "
                            "reads will miss; raise the budget or lower --moe-topk")

    # Decisions
    file_index = {str(f): i for i, f in enumerate(table.files)}
    decision: dict[str, tuple[Placement, str]] = {}
    layer_plans: list[LayerPlan] = []
    dense_streamed = 0
    dense_kept = 0
    unaligned = 0
    for layer in layers:
        kept = frozenset(range(len(layer.streamable))) if quota is None else layer.steps.selections[
            layer.steps.at(quota)]
        regime = "all" if quota is None else layer.steps.regimes[layer.steps.at(quota)]
        for t in layer.pinned:
            decision[t.name] = ("resident", "pinned")
        for i, t in enumerate(layer.streamable):
            if i in kept:
                decision[t.name] = ("resident", "fits" if quota is None else f"quota:{regime}")
            else:
                decision[t.name] = ("streamed", "over-quota")
                dense_streamed += t.n_bytes
                unaligned += t.offset % DIRECT_IO_ALIGNMENT != 0
        for t in layer.routed:
            decision[t.name] = ("bank", "expert-bank") if banked else ("resident", "expert-resident")
        kept_bytes = sum(layer.streamable[i].n_bytes for i in kept)
        dense_kept += kept_bytes
        res = sum(t.n_bytes for t in layer.pinned) + kept_bytes
        lp = LayerPlan(
            layer=layer.index, regime=regime if layer.streamable else "all", resident_bytes=res,
            streamed_bytes=layer.streamable_bytes - kept_bytes,
            attention_bytes=sum(t.n_bytes for t in layer.streamable if t.role not in _FFN_ROLES),
            ffn_bytes=sum(t.n_bytes for t in layer.streamable if t.role in _FFN_ROLES),
        )
        if layer.routed:
            s = min(slots, layer.n_expert) if banked else layer.n_expert
            lp.n_expert, lp.expert_bytes = layer.n_expert, layer.expert_bytes
            lp.slot_bank = s if banked else None
            lp.bank_bytes = (runtime_slots(s, layer.n_expert) * layer.expert_bytes if banked
                             else sum(t.n_bytes for t in layer.routed))
        layer_plans.append(lp)
    for t in table.tensors:
        if t.layer is None:
            decision[t.name] = ("resident", "non-layer")

    # Direct I/O
    if direct_io_requested == "strict" and unaligned:
        raise FlashflexError(f"{unaligned} streamed tensors of {name} are not {DIRECT_IO_ALIGNMENT}-byte aligned, "
                             "and direct I/O is strict",
                             "rewrite the model with `flashflex gguf realign`, or use --direct-io auto")
    if direct_io_requested == "off":
        direct_io = False
    elif direct_io_requested == "auto":
        direct_io = unaligned == 0
        if unaligned:
            warnings.append(f"direct I/O off: {unaligned} streamed tensors are not {DIRECT_IO_ALIGNMENT}-byte "
                            "aligned (rewrite with `flashflex gguf realign`)")
    else:
        direct_io = True
        if unaligned:
            warnings.append(f"{unaligned} unaligned streamed tensors are read through the page cache")

    # Estimates
    expert_miss = 0.0
    expert_reads = 0.0
    if banked:
        for layer in moe_layers:
            s = min(slots, layer.n_expert)
            expert_reads += topk * layer.expert_bytes
            expert_miss += topk * layer.expert_bytes * (1 - s / layer.n_expert)
    expert_miss_bytes = int(round(expert_miss))
    streamed_per_token = dense_streamed + expert_miss_bytes
    hit_rate = None if not is_moe else (1.0 if expert_reads == 0 else 1 - expert_miss / expert_reads)

    resident_weights = (non_layer + pinned + dense_kept
                        + (bank_bytes(slots) if banked else routed_all))
    reserved = kv + compute + _prefetch_cost(n_buf, buf, staging)
    plan = Plan(
        files=[str(f) for f in table.files],
        arch=arch.arch,
        kind="moe" if is_moe else "dense",
        n_layer=arch.n_layer,
        budget_bytes=budget_bytes,
        minimum_budget_bytes=minimum,
        ctx=ctx,
        ubatch=ubatch,
        fits_entirely=streamed_per_token == 0 and (not banked or all(
            min(slots, layer.n_expert) >= layer.n_expert for layer in moe_layers)),
        layer_quota_bytes=quota,
        model_bytes=table.total_bytes,
        resident_bytes=resident_weights,
        reserved_bytes=reserved,
        used_bytes=resident_weights + reserved,
        reservations=Reservations(kv_cache_bytes=kv, compute_bytes=compute,
                                  prefetch_buffer_bytes=_prefetch_cost(n_buf, buf, staging)),
        prefetch=PrefetchPlan(threads=threads, window=window, buffers=n_buf, buffer_bytes=buf,
                              staging_bytes=staging if n_buf else 0,
                              direct_io_requested=direct_io_requested, direct_io=direct_io,
                              unaligned_tensors=unaligned),
        moe=None if not is_moe else MoEPlan(
            requested_mode=requested_mode, mode=mode, n_expert=max((lay.n_expert for lay in moe_layers), default=0),
            n_expert_used=n_expert_used, topk=topk, topk_lossy=topk < n_expert_used,
            slot_bank=min(slots, max((lay.n_expert for lay in moe_layers), default=slots)) if banked else None,
            bank_bytes=bank_bytes(slots) if banked else routed_all, moe_layers=len(moe_layers)),
        estimates=Estimates(
            dense_streamed_bytes_per_token=dense_streamed,
            expert_miss_bytes_per_token=expert_miss_bytes,
            streamed_bytes_per_token=streamed_per_token,
            expected_hit_rate=hit_rate,
            hit_rate_model="uniform independent routing: hit rate = slots / experts" if is_moe else "none",
            read_bandwidth=bandwidth,
            io_bound_tokens_per_s=(bandwidth / streamed_per_token) if streamed_per_token else None,
        ),
        layers=layer_plans,
        tensors=[
            TensorDecision(name=t.name, layer=t.layer, role=t.role.value, n_bytes=t.n_bytes,
                           file=file_index.get(str(t.file), 0), offset=t.offset,
                           placement=decision[t.name][0], reason=decision[t.name][1])
            for t in table.tensors
        ],
        warnings=warnings,
    )
    return plan


def plan_for_run(table: ModelTable, config: Any, *, available: int | None = None, workers: list[Any] | None = None,
                 read_bandwidth: int | str | None = None) -> Plan:
    """make_plan with the settings of a RunConfig. Not pure when the budget is `auto` (reads free memory).

    `workers` (orchestrator.rpc.Worker, checked by the caller): the model's last layers go to them
    (planner.placement) and the budget plans what stays here."""
    ctx, ubatch = config.context.ctx, config.context.ubatch
    rpc_plan, rpc_warnings, local = None, [], table
    if workers:
        from orchestrator.planner.placement import devices_of, local_table, place_layers

        layers = getattr(getattr(config, "rpc", None), "layers", None)
        moe_mode = str(getattr(getattr(config, "moe", None), "mode", "auto"))
        experts_here = (moe_mode in ("resident-bank", "slot-bank", "oracle-all-hit", "oracle-prefetch")
                        and any(t.role is Role.EXPERT_ROUTED for t in table.tensors))
        rpc_plan, rpc_warnings = place_layers(table, devices_of(workers), ctx=ctx, ubatch=ubatch, layers=layers,
                                              experts_here=experts_here)
        local = local_table(table, rpc_plan.local_layers, experts_here)
    plan = make_plan(
        local,
        config.budget.resolve_bytes(available),
        ctx=ctx,
        ubatch=ubatch,
        prefetch=config.prefetch,
        moe=config.moe,
        read_bandwidth=read_bandwidth,
    )
    if rpc_plan is not None:
        plan.rpc = rpc_plan
        plan.n_layer = table.arch.n_layer
        plan.model_bytes = table.total_bytes
        plan.warnings = rpc_warnings + plan.warnings
    return plan


# --------------------------------------------------------------------------------------------------
# Explanations
