"""Plans explained for people: where the budget goes, what is kept and why (`flashflex plan --explain`)."""

from __future__ import annotations

import itertools

from orchestrator.modelfile.table import Role
from orchestrator.modes import ROUTER_LOOKAHEAD
from orchestrator.planner.schema import Plan, RPCDevicePlan
from orchestrator.rpc import LOCAL
from orchestrator.sizes import format_rate, format_size


def _ranges(indices: list[int]) -> str:
    out = []
    for _, group in itertools.groupby(enumerate(indices), key=lambda p: p[1] - p[0]):
        g = [i for _, i in group]
        out.append(f"{g[0]}" if len(g) == 1 else f"{g[0]}-{g[-1]}")
    return ",".join(out)


def _layers_label(indices: list[int]) -> str:
    return f"layer {indices[0]}" if len(indices) == 1 else f"layers {_ranges(indices)}"


_REGIME_WHY = {
    "attention": "attention regime: the quota is at most the layer's attention bytes, so small attention "
    "tensors go first (K, V, then Q, O), removing the most reads per byte",
    "mixed": "mixed regime: the quota is above the layer's attention bytes but below its FFN bytes, so FFN "
    "tensors go in where they fit and attention fills the gaps",
    "ffn": "FFN regime: the quota holds every FFN tensor, attention fills the rest",
    "none": "the quota holds none of the layer's tensors",
    "all": "every tensor fits",
}


def device_label(d: RPCDevicePlan) -> str:
    """This host's GPU by its backend name, an RPC worker's device by endpoint and index."""
    return f"this host's {d.name or f'GPU #{d.device}'}" if d.endpoint == LOCAL else f"{d.endpoint}#{d.device}"


def _lent_rows(plan: Plan) -> str:
    """The explain clause of rows lent to streamed weights while drafting idles."""
    assert plan.draft is not None
    d, streamed = plan.draft, plan.estimates.dense_streamed_bytes_per_token
    return (f"; the rows' memory is lent to streamed weights while no verification runs: "
            f"{format_size(d.lent_weights_bytes)} of them keep their bytes there, so a token where drafts fail "
            f"streams {format_size(max(0, streamed - d.lent_weights_bytes))} instead of {format_size(streamed)}, "
            "and it goes back to the rows before each verification")


def device_lines(plan: Plan) -> list[str]:
    """One line per device the model's last layers go to: its memory beside the host RAM budget."""
    if plan.rpc is None:
        return []
    out = []
    for d in plan.rpc.devices:
        last = d.first_layer + d.n_layers - 1
        span = f"layer {d.first_layer}" if d.n_layers == 1 else f"layers {d.first_layer}-{last}"
        limit = (f"device budget {format_size(d.budget_bytes)} (free {format_size(d.free_bytes)} of "
                 f"{format_size(d.total_bytes)})" if d.budget_bytes is not None
                 else f"announced free {format_size(d.free_bytes)}")
        out.append(f"{device_label(d)}: {span}{' + output' if d.output else ''}; {limit}: used "
                   f"{format_size(d.used_bytes)} = weights {format_size(d.weight_bytes)} + KV cache "
                   f"{format_size(d.kv_cache_bytes)} ({d.kv_source}) + compute {format_size(d.compute_bytes)} "
                   f"({d.compute_source})")
    moved = plan.rpc.experts_on_gpu_from
    if plan.rpc.experts_here and moved is None:
        out.append("routed experts of every layer stay in this host's RAM, in slot banks (the --cpu-moe shape)")
    elif plan.rpc.experts_here and moved is not None:
        out.append(f"routed experts of layers {moved}-{plan.n_layer - 1} went to the GPU with their layers (room "
                   f"left after every layer's dense part); layers 0-{moved - 1} keep theirs in host banks")
    return out


def explain(plan: Plan) -> list[str]:
    """Lines for people: where the budget goes, which tensors are kept and why."""
    r = plan.reservations
    lines = [
        f"budget {format_size(plan.budget_bytes)} (minimum {format_size(plan.minimum_budget_bytes, round_up=True)}): "
        f"used {format_size(plan.used_bytes)} = weights {format_size(plan.resident_bytes)} + KV cache "
        f"{format_size(r.kv_cache_bytes)} ({plan.ctx} tokens) + compute {format_size(r.compute_bytes)} "
        f"(ubatch {plan.ubatch}; KV and compute {r.source}"
        + (" from what llama.cpp allocates for these settings)" if r.source == "measured" else ")")
        + (f" + prefetch ring {format_size(plan.prefetch.ring_bytes)}" if plan.prefetch.buffers else "")
        + (f" + loading {format_size(r.load_staging_bytes)} (a tensor bound for another device, staged here)"
           if r.load_staging_bytes else "")
        + (f" + drafting {format_size(plan.draft.reserved_bytes)}" if plan.draft is not None else ""),
    ]
    if plan.draft is not None:
        d = plan.draft
        lines.append(
            f"drafting ({d.kind}): one reservation for the verification batch, {d.max_tokens} drafted token"
            f"{'s' if d.max_tokens != 1 else ''} at most, each keeping a {format_size(d.row_bytes)} logits row "
            f"({format_size(d.logits_bytes)})"
            + (f" and the draft model {format_size(d.model_bytes)} (weights, KV cache, compute)" if d.model_bytes
               else "")
            + "; within it the length follows the measured acceptance and verification cost"
            + (_lent_rows(plan) if d.lent_bytes else
               f". {d.note[0].upper()}{d.note[1:]}" if d.note else f"; the rows {d.pricing}" if d.pricing else ""))
    lines += device_lines(plan)
    non_layer = [t for t in plan.tensors if t.reason == "non-layer"]
    if non_layer:
        lines.append(
            f"resident outside the layers: {', '.join(t.name for t in non_layer)} "
            f"({format_size(sum(t.n_bytes for t in non_layer))}); the token embedding could stream by rows but "
            "stays resident for simplicity")
    pinned = [t for t in plan.tensors if t.reason == "pinned"]
    if pinned:
        routers = any(t.role == Role.ROUTER.value for t in pinned)
        kinds = "norm, bias and router" if routers else "norm and bias"
        lines.append(f"pinned in the layers: {len(pinned)} {kinds} tensors "
                     f"({format_size(sum(t.n_bytes for t in pinned))}): too small to be worth a read each"
                     + (", and expert reads cannot start before routing" if routers else ""))
    if plan.layer_quota_bytes is None:
        lines.append("every dense layer weight is resident: nothing streams")
    else:
        lines.append(f"per-layer quota {format_size(plan.layer_quota_bytes)}: the budget left after reservations"
                     f"{' and minimum expert banks' if plan.kind == 'moe' else ''} split evenly across "
                     f"{len(plan.layers)} layers (balanced locking)")
        groups: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[int]] = {}
        for lp in plan.layers:
            mine = [t for t in plan.tensors if t.layer == lp.layer and t.reason not in ("pinned",)
                    and t.placement != "bank" and t.reason != "expert-resident"]
            kept = tuple(_short(t.name) for t in mine if t.placement == "resident")
            streamed = tuple(_short(t.name) for t in mine if t.placement == "streamed")
            groups.setdefault((lp.regime, kept, streamed), []).append(lp.layer)
        for (regime, kept, streamed), idx in groups.items():
            lines.append(f"{_layers_label(idx)}: keep {', '.join(kept) or 'nothing'}; stream "
                         f"{', '.join(streamed) or 'nothing'} ({_REGIME_WHY[regime]})")
        p = plan.prefetch
        ring = (f"a {'mirrored' if p.mirrored else 'flat'} ring of {format_size(p.ring_bytes)} sized in bytes "
                f"(two largest streamed tensors{'' if p.mirrored else ' and the slack of a wrap'}, one read per "
                "thread)"
                if p.window == "auto" else
                f"a ring of {format_size(p.ring_bytes)} ({p.buffers} x the largest streamed layer "
                f"{format_size(p.buffer_bytes)})")
        layout = ("in the file's layout, read straight into their homes (resident ones repacked as stock repacks "
                  "them)" if p.file_layout
                  else f"staged ({format_size(p.staging_bytes)}) and set into their buffer type's layout")
        lines.append(f"prefetch: {p.threads} thread(s), window {p.window}: {ring}, direct I/O "
                     f"{'on' if p.direct_io else 'off'}; streamed weights {layout}")
        if p.threads_reason != "asked":
            lines.append(f"prefetch threads: {p.threads_reason}")
    if plan.moe is not None:
        m = plan.moe
        if m.slot_bank is None:
            lines.append(f"MoE mode {m.mode}: all {m.n_expert} experts of {m.moe_layers} layers resident "
                         f"({format_size(m.bank_bytes)})")
        else:
            moe_idx = [lp.layer for lp in plan.layers if lp.slot_bank is not None]
            eb = max((lp.expert_bytes or 0) for lp in plan.layers)
            lines.append(f"MoE mode {m.mode}: {_layers_label(moe_idx)} keep a slot bank of {m.slot_bank} of "
                         f"{m.n_expert} experts ({format_size(eb)} each, {format_size(m.bank_bytes)} in all); "
                         f"top-k {m.topk}{' (lossy override)' if m.topk_lossy else ''}")
            dense_idx = [lp.layer for lp in plan.layers if lp.slot_bank is None]
            if dense_idx:
                lines.append(f"{_layers_label(dense_idx)}: no routed experts, no bank")
            lines.append(_expert_prefetch_line(m))
    e = plan.estimates
    if e.streamed_bytes_per_token:
        hit = (f"; expected hit rate {e.expected_hit_rate:.0%} ({e.hit_rate_model})"
               if e.expected_hit_rate is not None else "")
        lines.append(f"expected reads {format_size(e.streamed_bytes_per_token)}/token (dense "
                     f"{format_size(e.dense_streamed_bytes_per_token)}, expert misses "
                     f"{format_size(e.expert_miss_bytes_per_token)}){hit} -> I/O-bound at most "
                     f"{format_tokens_per_s(e.io_bound_tokens_per_s)} tok/s at {format_rate(e.read_bandwidth)}")
    else:
        lines.append("nothing is read per token: not I/O bound")
    lines.extend(f"warning: {w}" for w in plan.warnings)
    return lines


def _expert_prefetch_line(m) -> str:
    """What reads experts ahead of their use, and why (issue 27: lookahead on only where an A/B shows it wins)."""
    if m.prefetch == ROUTER_LOOKAHEAD:
        ranks = f"each token's top {m.prefetch_ranks}" if m.prefetch_ranks else "the default ranks"
        return (f"expert prefetch: router-lookahead, asked for: layer L+1's router applied to layer L's input reads "
                f"{ranks} predicted experts ahead, behind the demand reads")
    if m.prefetch == "oracle":
        return "expert prefetch: the replayed trace's next call, read ahead (oracle)"
    return ("expert prefetch: off. Misses are read on demand, in parallel by "
            f"{m.io_threads} I/O threads (every banked tensor of a missed expert in one batch); router-lookahead "
            "lost the project's last A/B (0.91-0.97x slot-bank alone on the A3B shape, docs/benchmarks.md), so it is "
            "not a default: --moe-prefetch router-lookahead turns it on")


def format_tokens_per_s(x: float | None) -> str:
    """`0.83`, `12.4`, `2340`: three significant digits without exponents."""
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _short(name: str) -> str:
    """`blk.3.attn_k.weight` -> `attn_k`."""
    parts = name.split(".")
    if parts and parts[0] == "blk" and len(parts) >= 3:
        parts = parts[2:]
    if parts and parts[-1] in ("weight", "bias"):
        parts = parts[:-1] if parts[-1] == "weight" else parts
    return ".".join(parts)

