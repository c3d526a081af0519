"""make_plan: ModelTable + budget + settings -> Plan (a pure function; see the package docstring for the rules)."""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, cast

from orchestrator import modes
from orchestrator.errors import BudgetBelowMinimum, FlashflexError
from orchestrator.modelfile.table import ModelTable, Role, TensorInfo
from orchestrator.modes import ROUTER_LOOKAHEAD, MoEMode, PlannedMoEMode
from orchestrator.planner.buffers import compute_bytes, kv_cache_bytes
from orchestrator.planner.request import PlanInputs, PlanRequest
from orchestrator.planner.schema import (
    BANK_WARN_FACTOR,
    DIRECT_IO_ALIGNMENT,
    READ_CHUNK_BYTES,
    DraftPlan,
    Estimates,
    LayerPlan,
    MoEPlan,
    Placement,
    Plan,
    PrefetchPlan,
    Regime,
    Reservations,
    RPCPlan,
    TensorDecision,
)
from orchestrator.rpc import LOCAL
from orchestrator.sizes import format_rate, format_size

# Preservation order of attention tensors (K and V first: under GQA they are the smallest), the roles counted as
# FFN by the regimes, and the streamable-tensor count above which breakpoints are approximate (still safe).
_ATTENTION_RANK = {Role.ATTN_K: 0, Role.ATTN_V: 1, Role.ATTN_Q: 2, Role.ATTN_QKV: 3, Role.ATTN_O: 4, Role.OTHER: 5}
_FFN_ROLES = frozenset({Role.FFN_DENSE, Role.EXPERT_SHARED})
_SUBSET_SUM_LIMIT = 14


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


# --------------------------------------------------------------------------------------------------
# Planning


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


def _largest_streamed_tensor(layers: list[_Layer], quota: int) -> int:
    """The largest tensor that streams at `quota`, with the two pages an O_DIRECT read may add."""
    largest = 0
    for layer in layers:
        kept = layer.steps.selections[layer.steps.at(quota)]
        for i, t in enumerate(layer.streamable):
            if i not in kept:
                largest = max(largest, t.n_bytes + 2 * DIRECT_IO_ALIGNMENT)
    return largest


def _held_with_layer(t: TensorInfo) -> bool:
    """A streamed tensor the runtime holds for its whole layer: one the graph does not use through build_lora_mm's
    matmul (that takes 2-D weights), so no use node waits for and releases it on its own."""
    return len(t.shape) >= 3


def _buffers(layers: list[_Layer], quota: int | None, window: int | None,
             threads: int = 1, mirrored: bool = True) -> tuple[int, int, int]:
    """(buffers, bytes per buffer, ring bytes) for a quota (None = nothing streams).

    The runtime's ring is bytes, tensors laid out in the order compute uses them, and compute holds one matmul
    weight at a time (a use node waits for it and the next one releases it): the ring must hold the largest
    tensor per buffer type (two, for the plain and the repacked layout), and a whole layer plus the largest tensor
    where the layer streams tensors held for the whole layer (_held_with_layer). A `mirrored` ring (the runtime
    maps it twice back to back, where the platform can) wastes nothing where a home reaches its end; a flat one
    wraps the home to its start and needs the slack that wastes, a largest tensor more. An explicit `window`
    keeps its meaning, window x the largest layer (at least that minimum). With `window` None (auto) the ring is
    two largest tensors (one computing, one arriving) and the slack, plus one read job (4 MiB, or a smaller
    tensor) per prefetch thread, so the disk stays busy while compute holds a weight; whatever a deeper ring
    would cost stays resident weights."""
    per_layer = [_streamed_layer_buffer(layer, quota) for layer in layers]
    streaming = sum(1 for b in per_layer if b > 0)
    if streaming == 0 or quota is None:
        return 0, 0, 0
    buf = max(per_layer)
    largest = _largest_streamed_tensor(layers, quota)
    held = max((b for layer, b in zip(layers, per_layer) if b and any(map(_held_with_layer, layer.streamable))),
               default=0)
    slack = 0 if mirrored else largest
    minimum = max(held, largest) + largest + slack if held else 2 * largest
    if window is not None:
        n_buf = min(window, streaming)
        ring = max(n_buf * buf, minimum)
    else:
        n_buf = 1
        ring = max(minimum, 2 * largest + slack) + max(threads, 0) * min(READ_CHUNK_BYTES, largest)
    return n_buf, buf, min(ring, sum(per_layer))


def _staging_job_bytes(t: TensorInfo) -> int:
    """Staging one read job of a repacked tensor takes: a matrix is staged 64 rows or more at a time, about one
    4 MiB read job (the runtime's job_rows), anything else whole; plus the page padding of an O_DIRECT read."""
    if len(t.shape) == 2 and t.shape[1] > 0:
        rows = int(t.shape[1])
        row_bytes = t.n_bytes // rows
        group = max(64, READ_CHUNK_BYTES // max(row_bytes, 1) // 64 * 64)
        if rows > group:
            return group * row_bytes + 2 * DIRECT_IO_ALIGNMENT
    return t.n_bytes + 2 * DIRECT_IO_ALIGNMENT


def _staging_bytes(layers: list[_Layer], threads: int) -> int:
    """Staging the runtime needs besides the ring where weights do not keep the file's layout
    (PlanRequest.file_layout): those the CPU backend repacks, or all in a GPU's pinned host buffer type, are read
    raw into a staging buffer, a read job at a time, then set into their home (repacked, or copied); one buffer
    per prefetch thread (or one for synchronous reads), as large as the largest job (_staging_job_bytes)."""
    largest = max((_staging_job_bytes(t) for layer in layers for t in layer.streamable), default=0)
    return max(1, threads) * largest


def _prefetch_cost(ring: int, staging: int) -> int:
    """Bytes of the ring plus staging, when anything streams."""
    return ring + (staging if ring else 0)


def _dense_fill(layers: list[_Layer], avail_before_buffers: int, window: int | None,
                staging: int = 0, threads: int = 1, mirrored: bool = True) -> tuple[int, int, int, int]:
    """Water-fill the layers' quota while paying for the prefetch buffers it leaves necessary.

    Starts from the buffers of streaming everything and iterates: a higher quota streams less, so needs
    smaller buffers, which frees budget for a higher quota. Each step stays within budget and is monotone in
    the budget, so the result is too. Returns (quota, buffers, buffer_bytes, ring_bytes).
    """
    candidates = sorted({bp for layer in layers for bp in layer.steps.breakpoints})
    n_buf, buf, ring = _buffers(layers, 0, window, threads, mirrored)
    reserved = _prefetch_cost(ring, staging)
    quota = 0
    for _ in range(64):
        quota = _level(layers, avail_before_buffers - reserved, candidates)
        n_buf, buf, ring = _buffers(layers, quota, window, threads, mirrored)
        if _prefetch_cost(ring, staging) >= reserved:
            break
        reserved = _prefetch_cost(ring, staging)
    return quota, n_buf, buf, ring


def runtime_slots(slots: int, n_expert: int) -> int:
    """Expert slots the runtime allocates for a bank of `slots`: one more (a zero slot where a ubatch that
    needs several passes parks the pairs another pass computes) unless the bank holds every expert."""
    slots = min(slots, n_expert)
    return slots + 1 if slots < n_expert else slots


def make_plan(request: PlanRequest, inputs: PlanInputs) -> Plan:
    """Plan `inputs.table` for `request`. Pure: reads nothing, writes nothing.

    Raises FlashflexError for a budget below the minimum and for every option combination that needs the model or
    a resolved `auto` to judge (MoE options on a dense model, bank options without banks, ...: _check_options);
    rules that need only the settings are the RunConfig's validators.

    The stages, in order (each a function below that says what it decides): check the request, place the last
    layers on other devices (RPC workers, GPUs), analyse the model, the prefetch threads, the fixed overheads, the
    MoE mode and minimum banks, the option rules, the draft length and what drafting reserves, then with the
    budget the model is left: the minimum budget (or refusal), the dense resident/streamed split, the bank size,
    each tensor's placement, direct I/O, the estimates; last what the MoE runtime allocates, and the Plan.
    """
    if request.draft is not None and request.draft.optional:
        # drafting by default never refuses a run that plans without it, nor raises the minimum it reports; where
        # the rows of the whole length do not fit beside the model's minimum, shorter drafts do (halving: Gemma's
        # 262k vocabulary in 4 slots keeps 8 MiB of rows per drafted position)
        plain = _make_plan(dataclasses.replace(request, draft=None), inputs)
        asked = request.draft.max_tokens
        length = asked
        while length >= 1:
            try:
                plan = _make_plan(dataclasses.replace(
                    request, draft=dataclasses.replace(request.draft, max_tokens=length)), inputs)
            except FlashflexError:
                length //= 2
                continue
            plan.minimum_budget_bytes = plain.minimum_budget_bytes
            if plan.draft is not None and length < asked:
                plan.draft.capped_from = asked
                plan.draft.note = plan.draft.note or (
                    f"up to {plan.draft.max_tokens} drafted tokens per verification (not {asked}): the rows of "
                    "more do not fit the budget beside the model's minimum")
            return plan
        return plain
    return _make_plan(request, inputs)


def _make_plan(request: PlanRequest, inputs: PlanInputs) -> Plan:
    """make_plan's stages."""
    req = _check_request(request)
    table, rpc, warnings = _place_layers(req, inputs)
    local_gpu = rpc is not None and any(d.endpoint == LOCAL for d in rpc.devices)
    req = dataclasses.replace(req, file_layout=not req.repack and not local_gpu)
    model = _analyse_model(table, req, warnings)
    req = _prefetch_threads(req, model, inputs.read_probe)
    over = _overheads(table, model, req, inputs.overheads, rpc.load_staging_bytes if rpc is not None else 0,
                      _local_kv(inputs, rpc))
    extras = [("this process", req.process_bytes)] if req.process_bytes else []
    draft = _fit_draft(table, req, model, over, extras, inputs, lendable=rpc is None)
    if draft is not None:
        extras.append(("drafting", draft.reserved_bytes))
    experts = _experts(model, req, over, req.budget_bytes - _total(extras), warnings)
    _check_options(req, model, experts, rpc)
    d = _decide(table, model, req, over, experts, extras, warnings)
    moe = _moe_runtime(req, model, experts, d.slots, inputs.replay_distinct)
    plan = _assemble(table, req.budget_bytes, req=req, model=model, over=over, experts=experts, extras=extras,
                     d=d, moe=moe, warnings=warnings)
    if draft is not None and draft.lent_bytes:
        draft.lent_weights_bytes = lent_weights(
            [t.n_bytes for t in plan.tensors if t.placement == "streamed"], draft.lent_bytes)
    plan.draft = draft
    if rpc is not None:
        plan.rpc = rpc
        plan.n_layer = inputs.table.arch.n_layer
        plan.model_bytes = inputs.table.total_bytes
    return plan


def _total(extras: list[tuple[str, int]]) -> int:
    return sum(n for _, n in extras)


# --------------------------------------------------------------------------------------------------
# The stages of make_plan, in the order it runs them


def _check_request(req: PlanRequest) -> PlanRequest:
    """Refuse a non-positive ctx or ubatch."""
    if req.ctx < 1 or req.ubatch < 1:
        raise FlashflexError(f"ctx and ubatch must be positive (got ctx={req.ctx}, ubatch={req.ubatch})",
                             "pass --ctx and --ubatch of 1 or more")
    return req


def _place_layers(req: PlanRequest, inputs: PlanInputs) -> tuple[ModelTable, RPCPlan | None, list[str]]:
    """With devices elsewhere (inputs.workers: RPC workers, this host's GPUs), the model's last layers go to them
    (planner.placement) and the rest of the plan is this host's part: (the local table, the placement, its
    warnings). Routed experts (and, for router-lookahead, the routers) stay here when a mode banks them."""
    table = inputs.table
    if not inputs.workers:
        return table, None, []
    from orchestrator.planner.placement import devices_of, local_table, place_layers

    experts_here = modes.reads_sidecar(req.mode) and any(t.role is Role.EXPERT_ROUTED for t in table.tensors)
    routers_here = experts_here and req.moe_prefetch == ROUTER_LOOKAHEAD
    layers = req.layers_elsewhere
    if layers is not None:
        layers = min(layers, table.arch.n_layer)
    try:
        rpc, warnings = place_layers(table, devices_of(inputs.workers), ctx=req.ctx, ubatch=req.ubatch,
                                     layers=layers, experts_here=experts_here, routers_here=routers_here,
                                     flag=req.layers_flag, experts_to_gpus=req.layers_optional)
    except FlashflexError as e:
        if not req.layers_optional:
            raise
        # -ngl auto: a GPU too small for one layer leaves the whole model here, said, not refused
        return table, None, [f"-ngl auto: nothing goes to the GPU: {e.problem}"]
    return (local_table(table, rpc.local_layers, experts_here, routers_here, rpc.experts_on_gpu_from), rpc,
            list(warnings))


@dataclass(frozen=True)
class _ModelFacts:
    """What planning needs to know about the model: its layers, whether it is MoE, the top-k the run uses."""

    name: str  # for messages: the first file's name, else the architecture
    is_moe: bool
    layers: list[_Layer]
    moe_layers: list[_Layer]  # the layers with routed experts
    n_expert_used: int  # the model's experts per token; 0 for a dense model
    topk: int  # experts per token this run uses

    @property
    def max_expert(self) -> int:
        """The most routed experts in any layer (0 without MoE layers)."""
        return max((layer.n_expert for layer in self.moe_layers), default=0)

    def bank_bytes(self, slots: int) -> int:
        """Bytes of a bank of `slots` in every MoE layer (see runtime_slots)."""
        return sum(runtime_slots(slots, layer.n_expert) * layer.expert_bytes for layer in self.moe_layers)


def _analyse_model(table: ModelTable, req: PlanRequest, warnings: list[str]) -> _ModelFacts:
    """Whether the model is MoE (MoE options on a dense model are refused), the top-k the run uses (refused
    outside 1..n_expert_used; a reduction warns that it is lossy), and its layers. Warns when ctx exceeds the
    training context."""
    arch = table.arch
    name = table.files[0].name if table.files else arch.arch
    is_moe = arch.is_moe or any(t.role is Role.EXPERT_ROUTED for t in table.tensors)
    if not is_moe:
        used = [f"--moe-mode {req.mode}"] if req.mode not in (modes.AUTO, modes.STOCK) else []
        used += [f"--moe-slot-bank {req.slot_bank}"] if req.slot_bank is not None else []
        used += [f"--moe-topk {req.topk}"] if req.topk is not None else []
        used += [flag for flag in req.bank_options if flag != "--moe-slot-bank"]
        used += ["--moe-shared-only"] if req.shared_only else []
        if used:
            raise FlashflexError(f"{name} is a dense model ({arch.arch}, no routed experts): "
                                 f"{', '.join(used)} applies to MoE models only", "drop the MoE options")

    n_expert_used = max(arch.n_expert_used, 1) if is_moe else 0
    topk = n_expert_used
    if is_moe and req.topk is not None:
        if req.topk < 1 or req.topk > n_expert_used:
            raise FlashflexError(f"--moe-topk {req.topk} is outside 1..{n_expert_used}",
                                 f"top-k can only reduce the model's {n_expert_used} experts per token")
        topk = int(req.topk)
        if topk < n_expert_used:
            warnings.append(f"top-k {topk} overrides the model's {n_expert_used} experts per token: lossy, "
                            "output will differ from stock")

    layers = _layers(table, arch.n_expert)
    if req.ctx > arch.n_ctx_train > 0:
        warnings.append(f"ctx {req.ctx} exceeds the model's training context {arch.n_ctx_train}")
    return _ModelFacts(name=name, is_moe=is_moe, layers=layers, moe_layers=[layer for layer in layers if layer.routed],
                  n_expert_used=n_expert_used, topk=topk)


AUTO_THREADS_WITHIN = 0.9  # -tp auto: the fewest threads within 10% of the best probed bandwidth
# Types the CPU backend keeps in a repacked layout (x86 AVX2+, Arm): a streamed one is repacked on arrival by the
# thread that read it, so that thread is busy for longer than its read (measured: about 1.0 GB/s of reads and
# repacks per thread on a device that reads 1.5 GB/s), and one more thread overlaps the repack with the next read.
REPACKED_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL"})


def _prefetch_threads(req: PlanRequest, model: _ModelFacts, probe: dict[int, float] | None) -> PlanRequest:
    """-tp auto: the fewest prefetch threads whose probed direct-read bandwidth is within 10% of the best depth
    probed on this device, plus one when streamed tensors are repacked on arrival (REPACKED_TYPES), but no more than
    the read jobs (4 MiB) of the largest layer, which is all a thread can work on ahead of compute; the probed
    bandwidth at that depth becomes the estimate's. Without a probe (no O_DIRECT, a file of a few MiB), one thread.
    Threads asked for are kept."""
    if req.threads is not None:
        return req
    largest_layer = max((layer.streamable_bytes for layer in model.layers), default=0)
    cap = max(1, largest_layer // READ_CHUNK_BYTES)
    if not probe:
        return dataclasses.replace(req, threads=1, threads_reason="auto: 1 thread (no direct-read probe of this "
                                   "device: O_DIRECT unavailable, or the file is a few MiB)")
    best = max(probe.values())
    depth = min(d for d, bw in probe.items() if bw >= AUTO_THREADS_WITHIN * best)
    repacked = sorted({t.ggml_type for layer in model.layers for t in layer.streamable} & REPACKED_TYPES
                      if not req.file_layout else ())
    threads = min(depth + (1 if repacked else 0), cap)
    rates = ", ".join(f"{d}: {format_rate(bw)}" for d, bw in sorted(probe.items()))
    why = (f"auto: {threads} thread(s); direct reads on this device by 1, 2, 4 threads: {rates}; {depth} is the "
           f"fewest within {round(100 * (1 - AUTO_THREADS_WITHIN))}% of the best")
    if repacked:
        why += f", +1 because {'/'.join(repacked)} tensors are repacked on arrival by the thread that reads them"
    if threads < depth + (1 if repacked else 0):
        why += f", capped at {threads} by the largest layer's {cap} read job(s) of 4 MiB"
    return dataclasses.replace(req, threads=threads, threads_reason=why, bandwidth=int(probe[threads]
                               if threads in probe else probe[depth]))


@dataclass(frozen=True)
class _Overheads:
    """Bytes no decision changes: the reservations, the always-resident weights, and the totals of the weights
    the later stages place."""

    kv: int
    compute: int
    source: str  # measured | estimated (kv and compute)
    load: int  # the load's peak beyond kv + compute: a tensor bound for another device, staged whole
    non_layer: int  # tensors outside the repeating blocks
    pinned: int  # 1-D tensors and routers inside them
    streamable: int  # every dense layer weight (may stream)
    routed: int  # every routed expert

    @property
    def fixed(self) -> int:
        """Taken before any weight is placed: KV cache, compute (or the load's staging where larger),
        always-resident weights."""
        return self.kv + self.compute + self.load + self.non_layer + self.pinned

    @property
    def everything(self) -> int:
        """The budget that holds every weight resident."""
        return self.fixed + self.streamable + self.routed


def _local_kv(inputs: PlanInputs, rpc: RPCPlan | None) -> int | None:
    """With layers on this host's GPUs, the KV cache of the layers left here, from the layers' KV cache a GPU's
    measurement sized (None without one)."""
    if rpc is None:
        return None
    measured = next((d.kv_layers for w in inputs.workers or [] for d in w.devices if d.kv_layers is not None), None)
    if measured is None or len(measured) != inputs.table.arch.n_layer:
        return None
    return sum(measured[:rpc.local_layers])


def _overheads(table: ModelTable, model: _ModelFacts, req: PlanRequest, measured: Any,
               load_staging: int = 0, local_kv: int | None = None) -> _Overheads:
    """The KV cache and compute reservations (what llama.cpp allocates, when measured; else the estimates, compute
    sized for the run's top-k; the KV cache of the layers left here when a GPU's measurement sized them,
    `local_kv`), the always-resident weights, and the totals of the streamable dense weights and of the routed
    experts."""
    if measured is not None:
        kv, compute, source = int(measured.kv_bytes), int(measured.compute_bytes), "measured"
    else:
        kv = kv_cache_bytes(table, req.ctx) if local_kv is None else local_kv
        compute = compute_bytes(table, req.ctx, req.ubatch, model.topk if model.is_moe else None, req.outputs)
        source = "estimated"
    return _Overheads(
        kv=kv,
        compute=compute,
        source=source,
        # the load reads a device-bound tensor into a host buffer and frees it before the context allocates the KV
        # cache and compute buffers, so only what exceeds those is extra
        load=max(0, load_staging - kv - compute),
        non_layer=sum(t.n_bytes for t in table.tensors if t.layer is None),
        pinned=sum(t.n_bytes for layer in model.layers for t in layer.pinned),
        streamable=sum(layer.streamable_bytes for layer in model.layers),
        routed=sum(t.n_bytes for layer in model.moe_layers for t in layer.routed),
    )


@dataclass(frozen=True)
class _Experts:
    """Where routed experts live: the mode the runtime runs, whether in slot banks, and the smallest banks."""

    mode: str  # the requested mode, auto resolved (a dense model keeps the request's)
    banked: bool  # routed experts in slot banks; False = every expert resident, or no experts
    min_slots: int  # the smallest bank per layer: top-k, or the slot bank asked for
    min_bank_bytes: int  # bytes of the smallest banks; 0 unless banked

    def fixed_weights(self, over: _Overheads) -> int:
        """What the budget pays before the dense split: the fixed overheads, plus every routed expert when the
        mode keeps them all resident."""
        return over.fixed + (0 if self.banked else over.routed)


def _experts(model: _ModelFacts, req: PlanRequest, over: _Overheads, budget: int, warnings: list[str]) -> _Experts:
    """The MoE mode and the minimum banks. auto = stock when every weight fits (and no slot bank is asked for),
    else slot-bank. A mode that keeps every expert resident refuses a slot bank and a budget it does not fit;
    a banked mode refuses a slot bank below top-k and warns when it exceeds the expert count."""
    mode = req.mode
    if model.is_moe:
        if mode == modes.AUTO:
            mode = modes.STOCK if over.everything <= budget and req.slot_bank is None else modes.SLOT_BANK
        if modes.keeps_every_expert(mode):
            if req.slot_bank is not None:
                raise FlashflexError(f"--moe-slot-bank applies to slot-bank and oracle modes, not {mode}",
                                     "drop --moe-slot-bank or use --moe-mode slot-bank")
            if over.everything > budget:
                raise FlashflexError(
                    f"mode {mode} keeps every expert resident and needs "
                    f"{format_size(over.everything, round_up=True)}; the budget is {format_size(budget)}",
                    "use --moe-mode slot-bank, or raise --budget")
    banked = model.is_moe and not modes.keeps_every_expert(mode)

    min_slots = model.topk
    if banked and req.slot_bank is not None:
        if req.slot_bank < model.topk:
            raise FlashflexError(f"--moe-slot-bank {req.slot_bank} is below top-k {model.topk}: every token needs "
                                 f"{model.topk} experts resident at once", f"use a slot bank of at least {model.topk}")
        if req.slot_bank > model.max_expert:
            warnings.append(f"slot bank {req.slot_bank} capped at the expert count {model.max_expert}")
        min_slots = int(req.slot_bank)
    return _Experts(mode=mode, banked=banked, min_slots=min_slots,
                    min_bank_bytes=model.bank_bytes(min_slots) if banked else 0)


def _check_options(req: PlanRequest, model: _ModelFacts, experts: _Experts, rpc: RPCPlan | None) -> None:
    """The option rules that need the model or the resolved mode (rules on the settings alone are RunConfig
    validators; MoE options on a dense model are refused by _analyse_model). Each is one line naming the option."""
    if not model.is_moe:
        return
    mode = experts.mode
    if not modes.reads_sidecar(mode) and req.bank_options:  # stock, resident, or auto resolved to stock
        given = list(req.bank_options)
        raise FlashflexError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to runs with expert "
                             f"banks (resident-bank, slot-bank, oracle modes), and this run is {mode}",
                             "add --moe-mode slot-bank (on a MoE model with a sidecar) or drop "
                             + ("it" if len(given) == 1 else "them"))
    if req.shared_only and mode != modes.SLOT_BANK:
        raise FlashflexError("--moe-shared-only is a slot-bank diagnostic", "add --moe-mode slot-bank (and a sidecar)")
    if req.moe_prefetch != "none" and mode != modes.SLOT_BANK:
        raise FlashflexError(f"--moe-prefetch {req.moe_prefetch} applies to slot-bank runs, not {mode}",
                             "use --moe-mode slot-bank (the oracle modes bring their own prefetch)")
    if req.records_trace and mode != modes.SLOT_BANK:
        raise FlashflexError(f"--moe-trace records slot-bank runs; {mode} routes nothing through banks",
                             "use --moe-mode slot-bank")
    if rpc is not None and modes.reads_sidecar(mode) and not rpc.experts_here:
        raise FlashflexError(f"the layers left here need --moe-mode {mode}, and with --rpc expert banks hold every "
                             "layer's experts only when asked for",
                             f"add --moe-mode {mode} (every layer's experts then stay here, in banks), or raise "
                             "--budget")


# The verification rows may cost at most this share of a token's time without drafting: where drafts fail
# everywhere, adaptive lengths fall to 0 and what is left is the memory the rows took from the resident weights
# (each token then reads that much more) and the rare probes (about 1%, tests/test_speculative_unit.py). 3%:
# drafting is on by default (run, chat), and text it cannot draft should lose at most that.
FAILING_DRAFT_SHARE = 0.03
# The share of the probed direct-read bandwidth the prefetch threads reach while compute runs on the same cores
# (they also repack what they read). Measured: Gemma 3 270M under 215 MiB with 2 compute and 2 prefetch threads,
# read-bound, received 1.18-1.39 GB/s; the probe read 1.95 GB/s with 2 threads.
RUNTIME_READ_SHARE = 0.6


def draft_row_allowance(streamed: int, profile: Any, probed_bandwidth: float | None) -> tuple[int, str]:
    """Bytes of logits rows drafting may take off the resident weights, and how they were priced. A token takes
    about max(reads, compute) while the prefetch threads read ahead, so the rows (read again each token) may cost
    FAILING_DRAFT_SHARE of that time: all of it in bytes where decode is read-bound, and besides, where compute
    takes longer than the reads, the bytes that fit in its shadow. The compute comes from earlier runs
    (computespeed.DecodeProfile), the read rate from them too (what a read-bound run received) or from the device's
    probe (RUNTIME_READ_SHARE of it), whichever is faster. Without a measured run, the share of the bytes alone."""
    if profile is None:
        return int(FAILING_DRAFT_SHARE * streamed), (
            "priced in bytes: no streamed run of this model with these threads has measured its decode yet")
    compute = profile.step_compute_seconds
    rate = max(profile.read_bytes_per_second, RUNTIME_READ_SHARE * (probed_bandwidth or 0.0))
    shadow = int(compute * rate)  # bytes read while one step computes
    allowance = int((1 + FAILING_DRAFT_SHARE) * max(streamed, shadow)) - streamed
    measured = f"a step computes in {compute * 1e3:.1f} ms (measured) and reads arrive at about {format_rate(rate)}"
    if shadow <= streamed:
        return allowance, f"priced in time: decode is read-bound ({measured})"
    return allowance, f"priced in time: {measured}, so {format_size(shadow)} are read in a step's compute"


def lent_weights(streamed_bytes: list[int], lent_bytes: int) -> int:
    """Bytes of streamed tensors the runtime keeps in `lent_bytes` of lent memory while drafting idles: the largest
    first, each in whole pages, as llama-flashflex-stream.cpp's allocate_lent picks them (an estimate: the runtime
    also skips tensors whose ring home shares bytes with no other, which keep their bytes anyway)."""
    used = 0
    for n in sorted(streamed_bytes, reverse=True):
        pages = -(-n // DIRECT_IO_ALIGNMENT) * DIRECT_IO_ALIGNMENT
        if used + pages <= lent_bytes:
            used += pages
    return used


def _rows_lendable(model: _ModelFacts, rows: int, lendable: bool) -> bool:
    """Whether streamed weights can hold drafting's rows while it idles (llama_flashflex_lend_rows): every layer on
    this host (a GPU's or a worker's buffers are not lent), and some streamable tensor small enough to fit."""
    smallest = min((t.n_bytes for layer in model.layers for t in layer.streamable), default=None)
    return lendable and rows > 0 and smallest is not None and smallest <= rows


def _fit_draft(table: ModelTable, req: PlanRequest, model: _ModelFacts, over: _Overheads,
               extras: list[tuple[str, int]], inputs: PlanInputs, lendable: bool = True) -> DraftPlan | None:
    """What drafting reserves: the draft model (weights, KV cache, compute) and one logits row per drafted token.
    Where weights stream on this host, the rows' memory is lent to streamed weights while no verification runs
    (text where drafts fail then reads what it reads without drafting), so the length is the one asked for.
    Elsewhere, unless the length was given, it is capped so that the rows cost at most FAILING_DRAFT_SHARE of a
    token's time without drafting (draft_row_allowance, against the plan at this budget without the reservation;
    nothing to cap when that streams nothing or is refused). Refused when drafting alone needs the whole budget."""
    if req.draft is None:
        return None
    d = req.draft
    length, note, pricing = d.max_tokens, None, None
    if d.optional and _streamed_without_draft(table, req, model, over, extras) <= 0:
        return None  # nothing streams: a pass costs what it costs stock, drafting by default stays off
    lent = _rows_lendable(model, length * d.row_bytes, lendable and d.lendable) and _streamed_without_draft(
        table, req, model, over, extras) > 0
    if lent:
        pricing = ("lent: while no verification runs, streamed weights keep their bytes in the rows' memory, so "
                   "text where drafts fail reads what it reads without drafting")
    elif not d.length_fixed and d.row_bytes > 0:
        streamed = _streamed_without_draft(table, req, model, over, extras)
        probed = req.bandwidth if req.threads and inputs.read_probe else None  # -tp auto probed the device
        allowance, pricing = draft_row_allowance(streamed, inputs.decode_profile, probed)
        allowed = allowance // d.row_bytes if streamed > 0 else length
        if d.optional and allowed < 1:
            return None  # one drafted token's rows would cost more than the share where drafts fail
        if allowed < length:
            length = max(1, allowed)
            why = (f"each drafted token keeps {format_size(d.row_bytes)} of logits rows, taken off the resident "
                   f"weights, and a token streams {format_size(streamed)} without drafting; {pricing}")
            note = (f"drafting 1 token per verification costs more than {FAILING_DRAFT_SHARE:.0%} of a token's time "
                    f"where drafts fail ({why}); give --draft-max to choose the length yourself") if allowed < 1 else (
                    f"up to {length} drafted tokens per verification (not {d.max_tokens}), so text where drafts fail "
                    f"costs at most {FAILING_DRAFT_SHARE:.0%} more time ({why}); --draft-max overrides")
    reserved = d.model_bytes + length * d.row_bytes
    total = req.budget_bytes - _total(extras)
    if reserved >= total:
        what = d.kind + (f": {d.name}" if d.name else "")
        raise FlashflexError(f"drafting needs {format_size(reserved)} resident ({what}: weights, KV cache, compute, "
                             "verification logits), more than the budget of "
                             f"{format_size(total)}", "raise --budget, use a smaller draft model, or --draft "
                             "prompt-lookup")
    return DraftPlan(kind=d.kind, max_tokens=length, capped_from=d.max_tokens if length < d.max_tokens else None,
                     row_bytes=d.row_bytes, logits_bytes=length * d.row_bytes, model_bytes=d.model_bytes,
                     reserved_bytes=reserved, note=note, optional=d.optional, pricing=pricing,
                     lent_bytes=length * d.row_bytes if lent else 0)


def _streamed_without_draft(table: ModelTable, req: PlanRequest, model: _ModelFacts, over: _Overheads,
                            extras: list[tuple[str, int]]) -> int:
    """Bytes a token streams under this budget with nothing reserved for drafting (0 when that is refused)."""
    try:
        experts = _experts(model, req, over, req.budget_bytes - _total(extras), [])
        d = _decide(table, model, req, over, experts, extras, [])
    except FlashflexError:
        return 0
    return _estimates(model, experts, d.slots, d.placed.dense_streamed, req.bandwidth).streamed_bytes_per_token


def _minimum_budget(model: _ModelFacts, req: PlanRequest, over: _Overheads, experts: _Experts, staging: int,
                    budget: int, extras: list[tuple[str, int]]) -> int:
    """The smallest budget that runs: the fixed weights, the minimum banks, and the cheaper of every dense layer
    weight resident or everything streamed through the prefetch buffers (for auto on a MoE model, the cheaper
    of stock and slot-bank at top-k), plus the `extras` reserved beside the model (drafting, this process).
    `budget` is what the extras leave for the model. A budget below the minimum is refused, naming each part."""
    fixed = experts.fixed_weights(over)
    n_buf0, buf0, ring0 = _buffers(model.layers, 0, req.effective_window, req.prefetch_threads, req.mirrored_ring)
    stream_all = _prefetch_cost(ring0, staging)
    minimum = fixed + experts.min_bank_bytes + min(over.streamable, stream_all)
    if model.is_moe and req.mode == modes.AUTO and not experts.banked:  # auto falls back to slot-bank below stock
        auto_min = fixed - over.routed + model.bank_bytes(model.topk) + min(over.streamable, stream_all)
        minimum = min(minimum, auto_min)
    if budget < minimum:
        parts = [f"KV cache {format_size(over.kv)}", f"compute {format_size(over.compute)}",
                 *([f"loading {format_size(over.load)}"] if over.load else []),
                 f"always-resident weights "
                 f"{format_size(over.non_layer + over.pinned + (0 if experts.banked else over.routed))}"]
        if over.streamable > stream_all:
            parts.append(f"prefetch ring {format_size(ring0)}"
                         + (f" + staging {format_size(staging)}" if staging else ""))
        else:
            parts.append(f"layer weights {format_size(over.streamable)}")
        if experts.banked:
            parts.append(f"{experts.min_slots} expert slots x {len(model.moe_layers)} layers "
                         f"{format_size(experts.min_bank_bytes)}")
        parts += [f"{what} {format_size(n)}" for what, n in extras]
        whole = minimum + _total(extras)
        raise BudgetBelowMinimum(
            f"budget {format_size(budget + _total(extras))} is below the {format_size(whole, round_up=True)} "
            f"minimum for {model.name} ({' + '.join(parts)})",
            f"give --budget {format_size(whole, round_up=True).replace(' ', '')} or more, or lower --ctx, "
            "--ubatch or --prefetch-window")
    return minimum + _total(extras)


@dataclass(frozen=True)
class _Dense:
    """How the dense layer weights split between resident and streamed, and what streaming reserves."""

    avail: int  # budget left for dense weights beside the fixed weights and the minimum banks
    quota: int | None  # per-layer quota (the water level); None = every dense weight resident
    buffers: int  # layer-sized buffers an explicit window asks for (1 for auto); 0 when nothing streams
    buffer_bytes: int  # the largest streamed layer with page padding
    ring_bytes: int  # what the runtime allocates (see _buffers)
    staging: int  # see _staging_bytes; reserved only when something streams
    raised: tuple[tuple[int, int], ...] = ()  # (layer index, quota): layers given one more step from the leftover

    @property
    def prefetch_bytes(self) -> int:
        return _prefetch_cost(self.ring_bytes, self.staging)

    def quota_of(self, layer: int) -> int | None:
        return dict(self.raised).get(layer, self.quota)


def _spend_leftover(layers: list[_Layer], quota: int, leftover: int) -> tuple[tuple[int, int], ...]:
    """What an even quota leaves unspent (less than one more step in every layer) keeps more weights anyway: round
    by round, each layer in turn takes its next step when the bytes it adds still fit. Keeping more only lowers
    what streams, so the ring the even quota paid for stays large enough."""
    level = {layer.index: quota for layer in layers}
    raised: dict[int, int] = {}
    changed = True
    while changed:
        changed = False
        for layer in layers:
            steps = layer.steps
            i = steps.at(level[layer.index])
            nxt = next((j for j in range(i + 1, len(steps.breakpoints)) if steps.resident[j] > steps.resident[i]), None)
            if nxt is None:
                continue
            cost = steps.resident[nxt] - steps.resident[i]
            if cost <= leftover:
                leftover -= cost
                level[layer.index] = raised[layer.index] = steps.breakpoints[nxt]
                changed = True
    return tuple(sorted(raised.items()))


def _split_dense(model: _ModelFacts, req: PlanRequest, over: _Overheads, experts: _Experts, staging: int,
                 budget: int) -> _Dense:
    """Dense layer weights: all resident when they fit beside the fixed weights and the minimum banks, else
    water-filled to a per-layer quota that also pays for the prefetch buffers the rest needs (_dense_fill)."""
    avail = budget - experts.fixed_weights(over) - experts.min_bank_bytes
    if over.streamable <= avail:
        return _Dense(avail=avail, quota=None, buffers=0, buffer_bytes=0, ring_bytes=0, staging=staging)
    quota, n_buf, buf, ring = _dense_fill(model.layers, avail, req.effective_window, staging, req.prefetch_threads,
                                          req.mirrored_ring)
    kept = sum(layer.steps.resident[layer.steps.at(quota)] for layer in model.layers)
    raised = _spend_leftover(model.layers, quota, avail - kept - _prefetch_cost(ring, staging))
    return _Dense(avail=avail, quota=quota, buffers=n_buf, buffer_bytes=buf, ring_bytes=ring, staging=staging,
                  raised=raised)


def _bank_slots(model: _ModelFacts, req: PlanRequest, over: _Overheads, experts: _Experts, dense: _Dense,
                warnings: list[str]) -> int:
    """Slots per MoE layer: the minimum, grown evenly by whatever is left once every dense weight is resident
    (unless a slot bank was asked for), up to the expert count. Warns when a bank is within BANK_WARN_FACTOR x
    top-k."""
    slots = experts.min_slots
    if experts.banked and dense.quota is None and req.slot_bank is None and model.moe_layers:
        left = dense.avail + experts.min_bank_bytes - over.streamable
        lo, hi = experts.min_slots, model.max_expert
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if model.bank_bytes(mid) <= left:
                lo = mid
            else:
                hi = mid - 1
        slots = lo
    if experts.banked and model.moe_layers:
        top = model.max_expert
        if min(slots, top) < BANK_WARN_FACTOR * model.topk and min(slots, top) < top:
            warnings.append(f"slot bank {min(slots, top)} is within {BANK_WARN_FACTOR}x top-k {model.topk}: most "
                            "expert reads will miss; raise the budget or lower --moe-topk")
    return slots


@dataclass(frozen=True)
class _Placements:
    """Each tensor's placement and reason, each layer's plan, and the totals the Plan reports."""

    decision: dict[str, tuple[Placement, str]]  # tensor name -> (placement, reason)
    layers: list[LayerPlan]
    dense_streamed: int  # dense bytes read per token
    dense_kept: int  # streamable bytes kept resident
    unaligned: int  # streamed tensors whose offset is not direct-I/O aligned


def _place_tensors(table: ModelTable, model: _ModelFacts, experts: _Experts, dense: _Dense,
                   slots: int) -> _Placements:
    """Where each tensor lives: a layer's streamable tensors in the quota's selection stay resident and the
    rest stream (all resident with no quota); pinned and non-layer tensors are resident; routed experts go to
    the banks, or stay resident when the mode keeps every expert."""
    decision: dict[str, tuple[Placement, str]] = {}
    layer_plans: list[LayerPlan] = []
    dense_streamed = 0
    dense_kept = 0
    unaligned = 0
    for layer in model.layers:
        quota = dense.quota_of(layer.index)
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
            decision[t.name] = ("bank", "expert-bank") if experts.banked else ("resident", "expert-resident")
        kept_bytes = sum(layer.streamable[i].n_bytes for i in kept)
        dense_kept += kept_bytes
        lp = LayerPlan(
            layer=layer.index, regime=cast(Regime, regime if layer.streamable else "all"),
            resident_bytes=sum(t.n_bytes for t in layer.pinned) + kept_bytes,
            streamed_bytes=layer.streamable_bytes - kept_bytes,
            attention_bytes=sum(t.n_bytes for t in layer.streamable if t.role not in _FFN_ROLES),
            ffn_bytes=sum(t.n_bytes for t in layer.streamable if t.role in _FFN_ROLES),
        )
        if layer.routed:
            s = min(slots, layer.n_expert) if experts.banked else layer.n_expert
            lp.n_expert, lp.expert_bytes = layer.n_expert, layer.expert_bytes
            lp.slot_bank = s if experts.banked else None
            lp.bank_bytes = (runtime_slots(s, layer.n_expert) * layer.expert_bytes if experts.banked
                             else sum(t.n_bytes for t in layer.routed))
        layer_plans.append(lp)
    for t in table.tensors:
        if t.layer is None:
            decision[t.name] = ("resident", "non-layer")
    return _Placements(decision, layer_plans, dense_streamed, dense_kept, unaligned)


def _direct_io(req: PlanRequest, model: _ModelFacts, unaligned: int, warnings: list[str]) -> bool:
    """Whether streamed reads use O_DIRECT: off as asked; auto = on unless a streamed tensor is unaligned (with a
    warning); on = on, unaligned tensors read through the page cache (a warning); strict refuses unaligned
    streamed tensors."""
    if req.direct_io == "strict" and unaligned:
        raise FlashflexError(f"{unaligned} streamed tensors of {model.name} are not {DIRECT_IO_ALIGNMENT}-byte "
                             "aligned, and direct I/O is strict",
                             "rewrite the model with `flashflex gguf realign`, or use --direct-io auto")
    if req.direct_io == "off":
        return False
    if req.direct_io == "auto":
        if unaligned:
            warnings.append(f"direct I/O off: {unaligned} streamed tensors are not {DIRECT_IO_ALIGNMENT}-byte "
                            "aligned (rewrite with `flashflex gguf realign`)")
        return unaligned == 0
    if unaligned:
        warnings.append(f"{unaligned} unaligned streamed tensors are read through the page cache")
    return True


@dataclass(frozen=True)
class _Decisions:
    """What the budget left for the model decides: the minimum, the dense split, the banks, each tensor's place."""

    minimum: int
    dense: _Dense
    slots: int
    placed: _Placements
    direct_io: bool


def _decide(table: ModelTable, model: _ModelFacts, req: PlanRequest, over: _Overheads, experts: _Experts,
            extras: list[tuple[str, int]], warnings: list[str]) -> _Decisions:
    """The budget stages, with what `extras` leave of the budget for the model."""
    budget = req.budget_bytes - _total(extras)
    staging = 0 if req.file_layout else _staging_bytes(model.layers, req.prefetch_threads)
    minimum = _minimum_budget(model, req, over, experts, staging, budget, extras)
    dense = _split_dense(model, req, over, experts, staging, budget)
    slots = _bank_slots(model, req, over, experts, dense, warnings)
    placed = _place_tensors(table, model, experts, dense, slots)
    return _Decisions(minimum, dense, slots, placed, _direct_io(req, model, placed.unaligned, warnings))


def _moe_runtime(req: PlanRequest, model: _ModelFacts, experts: _Experts, slots: int,
                 replay_distinct: int | None) -> dict[str, Any]:
    """What the MoE runtime allocates and does, as MoEPlan fields: where experts come from (the GGUF or the
    sidecar), banked or all resident, which trace replay; the slots it allocates per layer (0 = every expert,
    from the sidecar; oracle-all-hit: every expert the trace uses, whatever the budget: the hit path's ceiling),
    preload, the prefetch policy and router-lookahead's ranks (a quarter of top-k by default)."""
    mode = experts.mode
    sidecar = modes.reads_sidecar(mode)
    replay = modes.replay_of(mode)
    runtime: int | None
    if mode == modes.RESIDENT_BANK:
        runtime = 0
    elif replay == modes.REPLAY_ALL_HIT:
        runtime = min(model.max_expert, max(model.topk, replay_distinct or 0))
    else:
        runtime = min(slots, model.max_expert) if experts.banked else None
    prefetch = "oracle" if replay == modes.REPLAY_PREFETCH else req.moe_prefetch if sidecar else "none"
    ranks = min(model.topk, req.prefetch_ranks or (model.topk + 3) // 4) if prefetch == ROUTER_LOOKAHEAD else None
    return dict(experts=modes.SIDECAR if sidecar else modes.GGUF, banked=experts.banked, replay=replay,
                runtime_slots=runtime if sidecar else None, preload=replay == modes.REPLAY_ALL_HIT, prefetch=prefetch,
                prefetch_ranks=ranks, io_threads=req.io_threads, verify=req.verify, shared_only=req.shared_only)


def _estimates(model: _ModelFacts, experts: _Experts, slots: int, dense_streamed: int, bandwidth: int) -> Estimates:
    """Bytes read per token (streamed dense tensors, plus expert misses under uniform independent routing: a
    layer misses top-k x (1 - slots/experts) experts), the hit rate that implies, and the I/O-bound tokens/s."""
    expert_miss = 0.0
    expert_reads = 0.0
    if experts.banked:
        for layer in model.moe_layers:
            s = min(slots, layer.n_expert)
            expert_reads += model.topk * layer.expert_bytes
            expert_miss += model.topk * layer.expert_bytes * (1 - s / layer.n_expert)
    expert_miss_bytes = int(round(expert_miss))
    streamed_per_token = dense_streamed + expert_miss_bytes
    hit_rate = None if not model.is_moe else (1.0 if expert_reads == 0 else 1 - expert_miss / expert_reads)
    return Estimates(
        dense_streamed_bytes_per_token=dense_streamed,
        expert_miss_bytes_per_token=expert_miss_bytes,
        streamed_bytes_per_token=streamed_per_token,
        expected_hit_rate=hit_rate,
        hit_rate_model="uniform independent routing: hit rate = slots / experts" if model.is_moe else "none",
        read_bandwidth=bandwidth,
        io_bound_tokens_per_s=(bandwidth / streamed_per_token) if streamed_per_token else None,
    )


def _assemble(table: ModelTable, budget: int, *, req: PlanRequest, model: _ModelFacts, over: _Overheads,
              experts: _Experts, extras: list[tuple[str, int]], d: _Decisions, moe: dict[str, Any],
              warnings: list[str]) -> Plan:
    """The Plan: the stages' decisions with their totals (resident, reserved, used) and the estimates."""
    arch = table.arch
    estimates = _estimates(model, experts, d.slots, d.placed.dense_streamed, req.bandwidth)
    banks = model.bank_bytes(d.slots) if experts.banked else over.routed
    resident_weights = over.non_layer + over.pinned + d.placed.dense_kept + banks
    reserved = over.kv + over.compute + over.load + d.dense.prefetch_bytes + _total(extras)
    file_index = {str(f): i for i, f in enumerate(table.files)}
    extra = dict(extras)
    return Plan(
        files=[str(f) for f in table.files],
        arch=arch.arch,
        kind="moe" if model.is_moe else "dense",
        n_layer=arch.n_layer,
        budget_bytes=budget,
        minimum_budget_bytes=d.minimum,
        ctx=req.ctx,
        ubatch=req.ubatch,
        fits_entirely=estimates.streamed_bytes_per_token == 0 and (not experts.banked or all(
            min(d.slots, layer.n_expert) >= layer.n_expert for layer in model.moe_layers)),
        layer_quota_bytes=d.dense.quota,
        model_bytes=table.total_bytes,
        resident_bytes=resident_weights,
        reserved_bytes=reserved,
        used_bytes=resident_weights + reserved,
        reservations=Reservations(kv_cache_bytes=over.kv, compute_bytes=over.compute,
                                  prefetch_buffer_bytes=d.dense.prefetch_bytes, load_staging_bytes=over.load,
                                  draft_bytes=extra.get("drafting", 0), process_bytes=extra.get("this process", 0),
                                  source=cast(Literal["measured", "estimated"], over.source)),
        prefetch=PrefetchPlan(threads=req.prefetch_threads, threads_reason=req.threads_reason,
                              window=req.window if req.window is not None else "auto",
                              buffers=d.dense.buffers, buffer_bytes=d.dense.buffer_bytes,
                              ring_bytes=d.dense.ring_bytes, mirrored=req.mirrored_ring,
                              file_layout=req.file_layout and d.dense.buffers > 0,
                              staging_bytes=d.dense.staging if d.dense.buffers else 0,
                              direct_io_requested=req.direct_io, direct_io=d.direct_io,
                              unaligned_tensors=d.placed.unaligned),
        moe=None if not model.is_moe else MoEPlan(
            requested_mode=cast(MoEMode, req.mode), mode=cast(PlannedMoEMode, experts.mode), n_expert=model.max_expert,
            n_expert_used=model.n_expert_used, topk=model.topk, topk_lossy=model.topk < model.n_expert_used,
            slot_bank=min(d.slots, max((lay.n_expert for lay in model.moe_layers), default=d.slots))
            if experts.banked else None,
            bank_bytes=banks, moe_layers=len(model.moe_layers), **moe),
        estimates=estimates,
        layers=d.placed.layers,
        tensors=[
            TensorDecision(name=t.name, layer=t.layer, role=t.role.value, n_bytes=t.n_bytes,
                           file=file_index.get(str(t.file), 0), offset=t.offset,
                           placement=d.placed.decision[t.name][0], reason=d.placed.decision[t.name][1])
            for t in table.tensors
        ],
        warnings=warnings,
    )
