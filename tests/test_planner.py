"""The planner: budget -> Plan, on in-memory tensor tables (no files)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import typer
from gguf import MODEL_TENSOR, TENSOR_NAMES
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from orchestrator.cli import plan_cmd
from orchestrator.computespeed import DecodeProfile
from orchestrator.config import MoEConfig, PrefetchConfig
from orchestrator.errors import FlashflexError
from orchestrator.modelfile.table import ArchInfo, ModelTable, Role, TensorInfo
from orchestrator.planner import (
    DraftPlan,
    DraftRequest,
    Plan,
    PlanInputs,
    PlanRequest,
    buffers,
    compute_bytes,
    explain,
    kv_cache_bytes,
    make_plan,
)
from orchestrator.planner.make import FAILING_DRAFT_SHARE, RUNTIME_READ_SHARE, draft_row_allowance, lent_weights
from orchestrator.sizes import GiB, MiB
from tests.helpers import plan_config, plan_table

# --------------------------------------------------------------------------------------------------
# Table factory: llama-style dense GQA, qwen3moe, MoE with shared experts and leading dense layers


def q4_0(*shape: int) -> int:
    n = 1
    for d in shape:
        n *= d
    return n // 32 * 18


def f32(*shape: int) -> int:
    n = 1
    for d in shape:
        n *= d
    return 4 * n


class TableBuilder:
    def __init__(self, alignment: int = 4096, file: str = "model.gguf"):
        self.file = Path(file)
        self.alignment = alignment
        self.offset = 2 * alignment  # after a header
        self.tensors: list[TensorInfo] = []

    def add(self, kind: MODEL_TENSOR, layer: int | None, role: Role, shape: tuple[int, ...], n_bytes: int) -> None:
        name = TENSOR_NAMES[kind].format(bid=layer) + ".weight"
        self.tensors.append(TensorInfo(name, layer, role, "Q4_0", shape, n_bytes, self.file, self.offset,
                                       self.alignment))
        self.offset += -(-n_bytes // self.alignment) * self.alignment

    def attention(self, layer: int, n_embd: int, head_dim: int, n_head: int, n_head_kv: int) -> None:
        self.add(MODEL_TENSOR.ATTN_NORM, layer, Role.NORM, (n_embd,), f32(n_embd))
        self.add(MODEL_TENSOR.ATTN_Q, layer, Role.ATTN_Q, (n_embd, head_dim * n_head), q4_0(n_embd, head_dim * n_head))
        kv = head_dim * n_head_kv
        self.add(MODEL_TENSOR.ATTN_K, layer, Role.ATTN_K, (n_embd, kv), q4_0(n_embd, kv))
        self.add(MODEL_TENSOR.ATTN_V, layer, Role.ATTN_V, (n_embd, kv), q4_0(n_embd, kv))
        q = head_dim * n_head
        self.add(MODEL_TENSOR.ATTN_OUT, layer, Role.ATTN_O, (q, n_embd), q4_0(q, n_embd))
        self.add(MODEL_TENSOR.FFN_NORM, layer, Role.NORM, (n_embd,), f32(n_embd))

    def dense_ffn(self, layer: int, n_embd: int, n_ff: int) -> None:
        self.add(MODEL_TENSOR.FFN_GATE, layer, Role.FFN_DENSE, (n_embd, n_ff), q4_0(n_embd, n_ff))
        self.add(MODEL_TENSOR.FFN_UP, layer, Role.FFN_DENSE, (n_embd, n_ff), q4_0(n_embd, n_ff))
        self.add(MODEL_TENSOR.FFN_DOWN, layer, Role.FFN_DENSE, (n_ff, n_embd), q4_0(n_ff, n_embd))

    def experts(self, layer: int, n_embd: int, n_expert: int, expert_ffn: int, shexp_ffn: int) -> None:
        self.add(MODEL_TENSOR.FFN_GATE_INP, layer, Role.ROUTER, (n_embd, n_expert), f32(n_embd, n_expert))
        for kind, shape in ((MODEL_TENSOR.FFN_GATE_EXP, (n_embd, expert_ffn, n_expert)),
                            (MODEL_TENSOR.FFN_UP_EXP, (n_embd, expert_ffn, n_expert)),
                            (MODEL_TENSOR.FFN_DOWN_EXP, (expert_ffn, n_embd, n_expert))):
            self.add(kind, layer, Role.EXPERT_ROUTED, shape, q4_0(*shape))
        if shexp_ffn:
            for kind, shape in ((MODEL_TENSOR.FFN_GATE_SHEXP, (n_embd, shexp_ffn)),
                                (MODEL_TENSOR.FFN_UP_SHEXP, (n_embd, shexp_ffn)),
                                (MODEL_TENSOR.FFN_DOWN_SHEXP, (shexp_ffn, n_embd))):
                self.add(kind, layer, Role.EXPERT_SHARED, shape, q4_0(*shape))

    def ends(self, n_embd: int, n_vocab: int, first: bool) -> None:
        if first:
            self.add(MODEL_TENSOR.TOKEN_EMBD, None, Role.TOKEN_EMBD, (n_embd, n_vocab), q4_0(n_embd, n_vocab))
        else:
            self.add(MODEL_TENSOR.OUTPUT_NORM, None, Role.NORM, (n_embd,), f32(n_embd))
            self.add(MODEL_TENSOR.OUTPUT, None, Role.OUTPUT, (n_embd, n_vocab), q4_0(n_embd, n_vocab))


def dense_table(n_layer: int = 8, n_embd: int = 512, n_head: int = 8, n_head_kv: int = 2, n_ff: int = 1536,
                n_vocab: int = 2048, alignment: int = 4096) -> ModelTable:
    """Llama-style dense model with grouped-query attention."""
    b = TableBuilder(alignment)
    hd = n_embd // n_head
    b.ends(n_embd, n_vocab, first=True)
    for layer in range(n_layer):
        b.attention(layer, n_embd, hd, n_head, n_head_kv)
        b.dense_ffn(layer, n_embd, n_ff)
    b.ends(n_embd, n_vocab, first=False)
    return ModelTable([b.file], ArchInfo("llama", n_layer, n_embd, n_head, n_head_kv, 4096, hd, hd), b.tensors)


def moe_table(n_layer: int = 6, n_embd: int = 512, n_head: int = 8, n_head_kv: int = 2, n_expert: int = 32,
              n_expert_used: int = 4, expert_ffn: int = 256, n_leading_dense: int = 0, dense_ff: int = 1536,
              shexp_ffn: int = 0, n_vocab: int = 2048, alignment: int = 4096, arch: str = "qwen3moe") -> ModelTable:
    """qwen3moe shapes by default; shared experts and leading dense layers (deepseek-style) on request."""
    b = TableBuilder(alignment)
    hd = n_embd // n_head
    b.ends(n_embd, n_vocab, first=True)
    for layer in range(n_layer):
        b.attention(layer, n_embd, hd, n_head, n_head_kv)
        if layer < n_leading_dense:
            b.dense_ffn(layer, n_embd, dense_ff)
        else:
            b.experts(layer, n_embd, n_expert, expert_ffn, shexp_ffn)
    b.ends(n_embd, n_vocab, first=False)
    info = ArchInfo(arch, n_layer, n_embd, n_head, n_head_kv, 4096, hd, hd, n_expert, n_expert_used, expert_ffn,
                    n_leading_dense, 1 if shexp_ffn else 0, shexp_ffn)
    return ModelTable([b.file], info, b.tensors)


def minimum(table: ModelTable, **kw) -> int:
    return plan_table(table, 1 << 50, **kw).minimum_budget_bytes


def placements(plan: Plan, layer: int) -> dict[str, str]:
    return {t.name.split(".")[2]: t.placement for t in plan.tensors if t.layer == layer}


def check_invariants(table: ModelTable, plan: Plan, budget: int) -> None:
    assert plan.used_bytes == plan.resident_bytes + plan.reserved_bytes
    assert plan.used_bytes <= budget
    assert [t.name for t in plan.tensors] == [t.name for t in table.tensors]  # each exactly once, in order
    by_name = {t.name: t for t in table.tensors}
    resident = sum(t.n_bytes for t in plan.tensors if t.placement == "resident")
    banks = sum(lp.bank_bytes for lp in plan.layers if lp.slot_bank is not None)
    assert plan.resident_bytes == resident + banks
    for d in plan.tensors:
        t = by_name[d.name]
        assert d.n_bytes == t.n_bytes and d.offset == t.offset
        if t.layer is None or len(t.shape) == 1:
            assert d.placement == "resident"
        if d.placement == "bank":
            assert t.role is Role.EXPERT_ROUTED
    if plan.prefetch.buffers:
        streamed_by_layer: dict[int, int] = {}
        for d in plan.tensors:
            if d.placement == "streamed":
                streamed_by_layer[d.layer] = streamed_by_layer.get(d.layer, 0) + d.n_bytes
        assert plan.prefetch.buffer_bytes >= max(streamed_by_layer.values())
    else:
        assert not any(d.placement == "streamed" for d in plan.tensors)
    if plan.moe is not None and plan.moe.slot_bank is not None:
        for lp in plan.layers:
            if lp.n_expert is not None:
                assert plan.moe.topk <= lp.slot_bank <= lp.n_expert
            else:
                assert lp.slot_bank is None
    # the JSON is the contract: it must round-trip
    assert Plan.model_validate_json(plan.model_dump_json()) == plan


# --------------------------------------------------------------------------------------------------
# Reservations


def test_kv_cache_is_f16_k_and_v_for_every_layer():
    t = dense_table(n_layer=8, n_embd=512, n_head=8, n_head_kv=2)
    assert kv_cache_bytes(t, 1024) == 8 * 1024 * 2 * (64 + 64) * 2


def test_compute_grows_with_ubatch_and_ctx():
    t = dense_table()
    assert compute_bytes(t, 512, 64) > compute_bytes(t, 512, 8)
    assert compute_bytes(t, 4096, 64) > compute_bytes(t, 512, 64)


def test_reservations_are_part_of_the_plan():
    t = dense_table()
    plan = plan_table(t, 1 << 40, ctx=256, ubatch=16)
    r = plan.reservations
    assert r.kv_cache_bytes == kv_cache_bytes(t, 256)
    assert r.compute_bytes == compute_bytes(t, 256, 16, outputs=1)  # a decode asks for one row of logits
    assert compute_bytes(t, 256, 16) - r.compute_bytes == 15 * 4 * buffers.n_vocab(t)  # not a row per token
    assert plan.reserved_bytes == r.kv_cache_bytes + r.compute_bytes + r.prefetch_buffer_bytes


# --------------------------------------------------------------------------------------------------
# Dense: balanced locking and flexible preservation


def test_everything_fits_streams_nothing_and_needs_no_buffers():
    t = dense_table()
    plan = plan_table(t, 1 << 40, ctx=256, ubatch=16)
    assert plan.fits_entirely and plan.layer_quota_bytes is None
    assert {d.placement for d in plan.tensors} == {"resident"}
    assert plan.prefetch.buffers == 0 and plan.reservations.prefetch_buffer_bytes == 0
    assert plan.estimates.streamed_bytes_per_token == 0 and plan.estimates.io_bound_tokens_per_s is None
    check_invariants(t, plan, 1 << 40)


def _budget_for_quota(t: ModelTable, per_layer: int, **kw) -> int:
    """A budget whose per-layer quota is about `per_layer` (the prefetch buffers of streaming everything)."""
    return minimum(t, **kw) + t.arch.n_layer * per_layer


def test_small_quota_keeps_k_and_v_first_under_gqa():
    t = dense_table()
    k = q4_0(512, 128)
    plan = plan_table(t, _budget_for_quota(t, 2 * k + 100, ctx=256, ubatch=16), ctx=256, ubatch=16)
    for layer in range(8):
        p = placements(plan, layer)
        assert p["attn_k"] == p["attn_v"] == "resident"
        assert p["attn_q"] == p["attn_output"] == p["ffn_up"] == "streamed"
    assert {lp.regime for lp in plan.layers} == {"attention"}
    check_invariants(t, plan, plan.budget_bytes)


def test_quota_is_balanced_evenly_across_layers():
    t = dense_table()
    plan = plan_table(t, _budget_for_quota(t, 3 * q4_0(512, 512), ctx=256, ubatch=16), ctx=256, ubatch=16)
    # even, but for what the even quota leaves over: that goes to some layers as one more tensor each
    sizes = sorted({lp.resident_bytes for lp in plan.layers})
    largest = max(d.n_bytes for d in plan.tensors if d.layer is not None)
    assert len(sizes) <= 2 and sizes[-1] - sizes[0] <= largest
    assert sizes[0] - 2 * f32(512) <= plan.layer_quota_bytes


def test_what_the_even_quota_leaves_holds_weights():
    """Budget the even quota cannot use (less than one more step in every layer) keeps tensors in some layers: over
    a sweep of budgets, some plans keep more in some layers than the even level, and every plan stays in budget."""
    t = dense_table()
    base = _budget_for_quota(t, 3 * q4_0(512, 512), ctx=256, ubatch=16)
    uneven = 0
    for extra in range(0, 8 * q4_0(512, 512), q4_0(512, 512) // 4):
        plan = plan_table(t, base + extra, ctx=256, ubatch=16)
        sizes = [lp.resident_bytes for lp in plan.layers]
        uneven += max(sizes) > min(sizes)
        assert plan.used_bytes <= plan.budget_bytes
        check_invariants(t, plan, plan.budget_bytes)
    assert uneven > 0


def test_large_quota_keeps_ffn_first():
    t = dense_table(n_layer=32)  # many layers: the buffers freed by keeping FFN barely raise the quota
    ffn = 3 * q4_0(512, 1536)
    plan = plan_table(t, _budget_for_quota(t, ffn, ctx=256, ubatch=16), ctx=256, ubatch=16)
    for layer in range(32):
        p = placements(plan, layer)
        assert p["ffn_gate"] == p["ffn_up"] == p["ffn_down"] == "resident"
        assert p["attn_q"] == p["attn_output"] == "streamed"
    assert {lp.regime for lp in plan.layers} == {"ffn"}


def test_between_the_thresholds_ffn_where_it_fits_and_attention_fills_gaps():
    t = dense_table()
    attention = 2 * q4_0(512, 512) + 2 * q4_0(512, 128)
    one_ffn = q4_0(512, 1536)
    quota = one_ffn + 2 * q4_0(512, 128) + 100  # above A, below F: one FFN tensor plus K and V
    assert attention < quota < 3 * one_ffn
    plan = plan_table(t, _budget_for_quota(t, quota, ctx=256, ubatch=16), ctx=256, ubatch=16)
    for lp in plan.layers:
        p = placements(plan, lp.layer)
        assert sum(p[n] == "resident" for n in ("ffn_gate", "ffn_up", "ffn_down")) >= 1
        assert p["attn_k"] == p["attn_v"] == "resident"
        assert lp.regime == "mixed"


def test_tensors_are_resident_whole_or_streamed_whole():
    t = dense_table()
    plan = plan_table(t, _budget_for_quota(t, 100_000, ctx=256, ubatch=16), ctx=256, ubatch=16)
    assert {d.placement for d in plan.tensors} <= {"resident", "streamed"}
    assert plan.estimates.dense_streamed_bytes_per_token == sum(
        d.n_bytes for d in plan.tensors if d.placement == "streamed")


def test_non_layer_and_one_dimensional_tensors_stay_resident():
    t = dense_table()
    plan = plan_table(t, minimum(t, ctx=256, ubatch=16), ctx=256, ubatch=16)
    for d in plan.tensors:
        if d.layer is None:
            assert (d.placement, d.reason) == ("resident", "non-layer")
        elif d.role == "norm":
            assert (d.placement, d.reason) == ("resident", "pinned")
        else:
            assert d.placement == "streamed"


def test_prefetch_buffers_are_window_times_largest_streamed_layer():
    t = dense_table()
    budget = minimum(t, ctx=256, ubatch=16, prefetch=PrefetchConfig(window=2))
    plan = plan_table(t, budget, ctx=256, ubatch=16, prefetch=PrefetchConfig(window=2))
    layer_bytes = sum(d.n_bytes for d in plan.tensors if d.layer == 0 and d.placement == "streamed")
    assert plan.prefetch.buffers == 2
    assert layer_bytes <= plan.prefetch.buffer_bytes <= layer_bytes + 2 * 4096 * 7
    # window x the largest layer, at least the slack a wrap may waste (two largest tensors)
    largest = max(d.n_bytes for d in plan.tensors if d.placement == "streamed")
    assert plan.prefetch.ring_bytes == max(2 * plan.prefetch.buffer_bytes, 2 * (largest + 2 * 4096))
    sync = plan_table(t, budget, ctx=256, ubatch=16, prefetch=PrefetchConfig(threads=0, window=5))
    assert sync.prefetch.buffers == 1  # synchronous reads still need one buffer
    assert sync.prefetch.ring_bytes <= plan.prefetch.ring_bytes
    assert sync.resident_bytes >= plan.resident_bytes


@pytest.mark.parametrize(("mirror", "n_largest"), [(True, 2), (False, 3)])
def test_auto_ring_is_two_largest_tensors_and_one_read_per_thread(mirror, n_largest):
    """The default read-ahead is a ring sized in bytes, not in layers: compute holds one weight at a time, so the
    ring holds the one computing and the one arriving, plus a wrap's slack where it is flat (not mapped twice);
    what it does not need holds weights."""
    t = dense_table(n_layer=16)
    budget = minimum(t, ctx=256, ubatch=16, prefetch=PrefetchConfig(window=3)) + (1 << 20)
    auto = plan_table(t, budget, ctx=256, ubatch=16, prefetch=PrefetchConfig(threads=2, mirror=mirror))
    layers3 = plan_table(t, budget, ctx=256, ubatch=16, prefetch=PrefetchConfig(threads=2, window=3, mirror=mirror))
    p = auto.prefetch
    assert p.window == "auto" and p.buffers == 1 and p.mirrored is mirror
    largest = max(d.n_bytes for d in auto.tensors if d.placement == "streamed") + 2 * 4096
    streamed = sum(d.n_bytes + 2 * 4096 for d in auto.tensors if d.placement == "streamed")
    assert p.ring_bytes == min(n_largest * largest + 2 * min(4 << 20, largest), streamed)
    assert p.ring_bytes < p.buffer_bytes + 2 * largest  # less than the old floor: a layer and its slack
    assert auto.reservations.prefetch_buffer_bytes == p.ring_bytes + p.staging_bytes
    assert p.ring_bytes < layers3.prefetch.ring_bytes
    assert auto.resident_bytes > layers3.resident_bytes  # the bytes a deeper ring would cost hold weights


def test_a_mirrored_ring_leaves_a_largest_tensor_to_the_weights():
    t = dense_table(n_layer=16)
    budget = minimum(t, ctx=256, ubatch=16, prefetch=PrefetchConfig(mirror=False)) + (8 << 20)
    flat = plan_table(t, budget, ctx=256, ubatch=16, prefetch=PrefetchConfig(threads=2, mirror=False))
    mirrored = plan_table(t, budget, ctx=256, ubatch=16, prefetch=PrefetchConfig(threads=2))
    largest = max(d.n_bytes for d in flat.tensors if d.placement == "streamed") + 2 * 4096
    assert flat.prefetch.ring_bytes - mirrored.prefetch.ring_bytes == largest
    assert mirrored.resident_bytes > flat.resident_bytes
    assert mirrored.estimates.dense_streamed_bytes_per_token < flat.estimates.dense_streamed_bytes_per_token


def test_window_never_exceeds_the_streaming_layers():
    t = dense_table(n_layer=2)
    plan = plan_table(t, minimum(t, ctx=64, ubatch=8, prefetch={"window": 8}), ctx=64, ubatch=8,
                     prefetch={"window": 8})
    assert plan.prefetch.buffers <= 2


def test_budget_below_minimum_is_refused_in_human_units():
    t = dense_table()
    low = minimum(t, ctx=256, ubatch=16)
    plan_table(t, low, ctx=256, ubatch=16)
    with pytest.raises(FlashflexError) as info:
        plan_table(t, low - 1, ctx=256, ubatch=16)
    line = info.value.one_line()
    assert "minimum" in line and "MiB" in line and "\n" not in line
    assert "--budget" in (info.value.fix or "")


def test_direct_io_settings():
    t = dense_table(alignment=32)
    budget = minimum(t, ctx=64, ubatch=8)
    auto = plan_table(t, budget, ctx=64, ubatch=8)
    assert not auto.prefetch.direct_io and auto.prefetch.unaligned_tensors > 0
    assert any("realign" in w for w in auto.warnings)
    assert plan_table(t, budget, ctx=64, ubatch=8, prefetch={"direct_io": "on"}).prefetch.direct_io
    with pytest.raises(FlashflexError, match="aligned"):
        plan_table(t, budget, ctx=64, ubatch=8, prefetch={"direct_io": "strict"})
    aligned = dense_table()
    assert plan_table(aligned, minimum(aligned, ctx=64, ubatch=8), ctx=64, ubatch=8).prefetch.direct_io


def test_io_bound_estimate_uses_the_bandwidth():
    t = dense_table()
    budget = minimum(t, ctx=64, ubatch=8)
    plan = plan_table(t, budget, ctx=64, ubatch=8, read_bandwidth="1GB/s")
    assert plan.estimates.io_bound_tokens_per_s == pytest.approx(1e9 / plan.estimates.streamed_bytes_per_token)
    faster = plan_table(t, budget, ctx=64, ubatch=8, read_bandwidth=2_000_000_000)
    assert faster.estimates.io_bound_tokens_per_s == pytest.approx(2 * plan.estimates.io_bound_tokens_per_s)


def test_moe_options_on_a_dense_model_are_refused():
    t = dense_table()
    for moe in ({"slot_bank": 4}, {"topk": 2}, {"mode": "slot-bank"}):
        with pytest.raises(FlashflexError, match="dense model") as info:
            plan_table(t, 1 << 40, moe=moe)
        assert "drop the MoE options" in info.value.one_line()
    plan_table(t, 1 << 40, moe=MoEConfig())  # defaults are fine


def test_ctx_above_training_context_warns():
    t = dense_table()
    assert any("training context" in w for w in plan_table(t, 1 << 40, ctx=8192).warnings)


# --------------------------------------------------------------------------------------------------
# MoE: dense weights first, slot banks from the rest


def test_moe_dense_weights_resident_and_banks_take_the_rest():
    t = moe_table()
    low = minimum(t, ctx=256, ubatch=16)
    plan = plan_table(t, low + 8 * MiB, ctx=256, ubatch=16)
    assert plan.moe.mode == "slot-bank"
    assert plan.layer_quota_bytes is None  # every dense weight resident
    assert plan.moe.topk < plan.moe.slot_bank < 32
    for d in plan.tensors:
        assert d.placement == ("bank" if d.role == "expert_routed" else "resident")
    check_invariants(t, plan, plan.budget_bytes)


def test_moe_bank_never_below_topk_and_capped_at_expert_count():
    t = moe_table()
    at_min = plan_table(t, minimum(t, ctx=256, ubatch=16), ctx=256, ubatch=16)
    assert at_min.moe.slot_bank == 4
    assert any("1.25x top-k" in w for w in at_min.warnings)
    big = plan_table(t, 1 << 40, ctx=256, ubatch=16, moe={"mode": "slot-bank"})
    assert big.moe.slot_bank == 32 and big.fits_entirely
    assert big.estimates.expert_miss_bytes_per_token == 0


def test_moe_auto_mode_is_stock_when_everything_fits():
    t = moe_table()
    plan = plan_table(t, 1 << 40, ctx=256, ubatch=16)
    assert (plan.moe.requested_mode, plan.moe.mode, plan.moe.slot_bank) == ("auto", "stock", None)
    assert all(d.placement == "resident" for d in plan.tensors)


def test_moe_resident_modes_must_fit():
    t = moe_table()
    with pytest.raises(FlashflexError, match="mode resident keeps every expert resident"):
        plan_table(t, minimum(t, ctx=256, ubatch=16), ctx=256, ubatch=16, moe={"mode": "resident"})


def test_moe_leading_dense_layers_get_no_bank_and_shared_experts_stay_resident():
    t = moe_table(n_layer=5, n_leading_dense=2, shexp_ffn=512, arch="deepseek2")
    plan = plan_table(t, minimum(t, ctx=256, ubatch=16) + 4 * MiB, ctx=256, ubatch=16, moe={"mode": "slot-bank"})
    for lp in plan.layers:
        if lp.layer < 2:
            assert lp.slot_bank is None and lp.n_expert is None
        else:
            assert lp.slot_bank is not None and lp.slot_bank >= 4
    assert all(d.placement == "resident" for d in plan.tensors if d.role == "expert_shared")
    assert "no routed experts, no bank" in "\n".join(explain(plan))
    check_invariants(t, plan, plan.budget_bytes)


def test_moe_streams_dense_weights_when_they_do_not_fit_one_budget_for_both():
    t = moe_table(n_layer=12, n_leading_dense=1, shexp_ffn=512, arch="deepseek2")
    plan = plan_table(t, minimum(t, ctx=256, ubatch=16) + 200_000, ctx=256, ubatch=16)
    assert plan.moe.slot_bank == plan.moe.topk  # banks stay at their minimum while dense weights stream
    assert plan.layer_quota_bytes is not None and plan.prefetch.buffers > 0
    assert any(d.placement == "streamed" for d in plan.tensors)
    assert all(d.placement != "streamed" for d in plan.tensors if d.role in ("router", "norm", "expert_routed"))
    check_invariants(t, plan, plan.budget_bytes)


def test_moe_expected_miss_bytes_follow_uniform_routing():
    t = moe_table()
    plan = plan_table(t, minimum(t, ctx=256, ubatch=16) + 32 * MiB, ctx=256, ubatch=16)
    s, e, k = plan.moe.slot_bank, plan.moe.n_expert, plan.moe.topk
    per_expert = plan.layers[0].expert_bytes
    assert plan.estimates.expert_miss_bytes_per_token == pytest.approx(6 * k * per_expert * (1 - s / e), abs=2)
    assert plan.estimates.expected_hit_rate == pytest.approx(s / e)


def test_moe_slot_bank_override():
    t = moe_table()
    plan = plan_table(t, 1 << 40, ctx=256, ubatch=16, moe={"mode": "slot-bank", "slot_bank": 8})
    assert plan.moe.slot_bank == 8 and all(lp.slot_bank == 8 for lp in plan.layers)
    with pytest.raises(FlashflexError, match="below top-k"):
        plan_table(t, 1 << 40, moe={"mode": "slot-bank", "slot_bank": 2})
    capped = plan_table(t, 1 << 40, moe={"mode": "slot-bank", "slot_bank": 100})
    assert capped.moe.slot_bank == 32 and all(lp.slot_bank == 32 for lp in capped.layers)
    assert any("capped" in w for w in capped.warnings)
    with pytest.raises(FlashflexError, match="minimum"):
        plan_table(t, minimum(t, ctx=256, ubatch=16), ctx=256, ubatch=16, moe={"slot_bank": 16})


def test_moe_topk_override_is_reduction_only_and_lossy():
    t = moe_table()
    plan = plan_table(t, 1 << 40, moe={"mode": "slot-bank", "topk": 2})
    assert plan.moe.topk == 2 and plan.moe.topk_lossy
    assert any("lossy" in w for w in plan.warnings)
    with pytest.raises(FlashflexError, match="top-k"):
        plan_table(t, 1 << 40, moe={"topk": 8})
    assert minimum(t, moe={"topk": 2}) < minimum(t)


def test_moe_below_minimum_names_the_expert_slots():
    t = moe_table()
    with pytest.raises(FlashflexError, match="expert slots"):
        plan_table(t, minimum(t, ctx=256, ubatch=16) - 1, ctx=256, ubatch=16)


def test_explain_says_what_is_kept_and_why():
    t = dense_table()
    lines = explain(plan_table(t, _budget_for_quota(t, 2 * q4_0(512, 128) + 100, ctx=256, ubatch=16), ctx=256,
                              ubatch=16))
    text = "\n".join(lines)
    assert "layers 0-7: keep attn_k, attn_v; stream attn_q" in text
    assert "attention regime" in text and "balanced" in text and "tok/s" in text


# --------------------------------------------------------------------------------------------------
# Properties over random tables and budgets


@st.composite
def tables(draw) -> ModelTable:
    n_head = draw(st.sampled_from([2, 4, 8]))
    n_embd = draw(st.sampled_from([64, 128, 256]))
    n_head_kv = draw(st.sampled_from([k for k in (1, 2, 4, 8) if n_head % k == 0]))
    common = dict(n_layer=draw(st.integers(1, 6)), n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                  n_vocab=draw(st.sampled_from([256, 1024])), alignment=draw(st.sampled_from([32, 4096])))
    if draw(st.booleans()):
        return dense_table(n_ff=draw(st.sampled_from([64, 192, 512, 1024])), **common)
    n_expert = draw(st.sampled_from([4, 8, 16, 64]))
    return moe_table(n_expert=n_expert, n_expert_used=draw(st.integers(1, min(8, n_expert))),
                     expert_ffn=draw(st.sampled_from([32, 64, 128])),
                     n_leading_dense=draw(st.integers(0, common["n_layer"] - 1)),
                     shexp_ffn=draw(st.sampled_from([0, 0, 64, 256])), dense_ff=draw(st.sampled_from([128, 512])),
                     **common)


@st.composite
def plan_settings(draw) -> dict:
    return dict(ctx=draw(st.sampled_from([32, 128, 512])), ubatch=draw(st.sampled_from([1, 8, 32])),
                prefetch={"threads": draw(st.integers(0, 2)), "window": draw(st.integers(1, 4))})


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# budgets above the minimum at every scale: streaming (bytes to KiB above), banks growing (MiB), all fits
EXTRA = st.one_of(st.integers(0, 1 << 16), st.integers(0, 1 << 22), st.integers(0, 1 << 26))


@PROPERTY
@given(tables(), plan_settings(), EXTRA)
def test_never_over_budget_and_every_tensor_placed_once(table, kw, extra):
    budget = minimum(table, **kw) + extra
    plan = plan_table(table, budget, **kw)
    check_invariants(table, plan, budget)


@PROPERTY
@given(tables(), plan_settings(), EXTRA, st.one_of(st.integers(1, 1 << 12), EXTRA))
def test_resident_bytes_never_shrink_as_the_budget_grows(table, kw, extra, more):
    small = minimum(table, **kw) + extra
    assert plan_table(table, small, **kw).resident_bytes <= plan_table(table, small + more, **kw).resident_bytes


@PROPERTY
@given(tables(), plan_settings(), st.integers(1, 1 << 20))
def test_below_the_minimum_is_refused_at_the_minimum_accepted(table, kw, gap):
    low = minimum(table, **kw)
    plan_table(table, low, **kw)
    assume(low - gap > 0)
    with pytest.raises(FlashflexError, match="minimum"):
        plan_table(table, low - gap, **kw)


@PROPERTY
@given(tables(), plan_settings(), EXTRA, st.data())
def test_banks_between_topk_and_expert_count(table, kw, extra, data):
    assume(table.arch.is_moe)
    moe = {"mode": data.draw(st.sampled_from(["auto", "slot-bank", "oracle-prefetch"])),
           "topk": data.draw(st.one_of(st.none(), st.integers(1, table.arch.n_expert_used)))}
    budget = minimum(table, moe=moe, **kw) + extra
    plan = plan_table(table, budget, moe=moe, **kw)
    check_invariants(table, plan, budget)
    if plan.moe.slot_bank is not None:
        for lp in plan.layers:
            if lp.n_expert:
                assert plan.moe.topk <= lp.slot_bank <= table.arch.n_expert


# --------------------------------------------------------------------------------------------------
# flashflex plan


@pytest.fixture
def cli(monkeypatch):
    tables_by_name = {"dense.gguf": dense_table(), "moe.gguf": moe_table()}
    monkeypatch.setattr(plan_cmd, "_load_table", lambda path: tables_by_name[Path(path).name])
    # no file behind these tables: nothing to measure or probe (the planner keeps its estimates, -tp auto 1 thread)
    from orchestrator import overheads, readspeed

    monkeypatch.setattr(overheads, "measure", lambda *a, **k: None)
    monkeypatch.setattr(readspeed, "measured", lambda *a, **k: None)
    app = typer.Typer()
    plan_cmd.register(app)
    app.command("noop")(lambda: None)  # keep `plan` a named subcommand
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["plan", *args])


def test_cli_json_is_the_plan(cli):
    result = cli("dense.gguf", "--budget", "1GiB", "--ctx", "256", "--json")
    assert result.exit_code == 0, result.output
    plan = Plan.model_validate(json.loads(result.stdout))
    assert plan.budget_bytes == GiB and plan.ctx == 256


def test_cli_table_and_explain(cli):
    result = cli("moe.gguf", "-am", "20MiB", "--ctx", "256", "--ubatch", "16", "--explain")
    assert result.exit_code == 0, result.output
    assert "slot-bank" in result.stdout and "layers" in result.stdout and "slot bank" in result.stdout
    said = " ".join(result.stdout.split())
    assert "expert prefetch: off" in said and "--moe-prefetch router-lookahead turns it on" in said


def test_explain_says_what_reads_experts_ahead():
    """Issue 27: lookahead is on only where asked (it lost its A/B), and the explanation says which is which."""
    from types import SimpleNamespace

    from orchestrator.planner.explain import _expert_prefetch_line

    asked = _expert_prefetch_line(SimpleNamespace(prefetch="router-lookahead", prefetch_ranks=2, io_threads=4))
    assert asked.startswith("expert prefetch: router-lookahead, asked for") and "top 2" in asked
    assert "oracle" in _expert_prefetch_line(SimpleNamespace(prefetch="oracle", prefetch_ranks=None, io_threads=4))
    off = _expert_prefetch_line(SimpleNamespace(prefetch="none", prefetch_ranks=None, io_threads=3))
    assert off.startswith("expert prefetch: off") and "3 I/O threads" in off


def test_cli_draft_reserves_the_verification_batch_as_run_would(cli):
    result = cli("dense.gguf", "--budget", "1GiB", "--ctx", "256", "--ubatch", "8", "--draft", "prompt-lookup",
                 "--draft-max", "3", "--json")
    assert result.exit_code == 0, result.output
    plan = Plan.model_validate(json.loads(result.stdout))
    assert plan.draft is not None and plan.draft.max_tokens == 3
    assert plan.draft.logits_bytes == 3 * plan.draft.row_bytes == plan.reservations.draft_bytes
    explained = cli("dense.gguf", "--budget", "1GiB", "--ctx", "256", "--ubatch", "8", "--draft", "prompt-lookup",
                    "--draft-max", "3", "--explain")
    assert "one reservation for the verification batch, 3 drafted tokens at most" in " ".join(explained.stdout.split())
    without = Plan.model_validate(json.loads(cli("dense.gguf", "--budget", "1GiB", "--ctx", "256", "--json").stdout))
    assert without.draft is None and without.reservations.draft_bytes == 0


def test_cli_refuses_moe_options_on_dense(cli):
    result = cli("dense.gguf", "--budget", "1GiB", "--moe-slot-bank", "4")
    assert isinstance(result.exception, FlashflexError)
    assert "dense model" in result.exception.one_line()


def test_cli_bad_budget_is_a_flashflex_error(cli):
    result = cli("dense.gguf", "--budget", "2XB")
    assert isinstance(result.exception, FlashflexError)
    assert "budget.size" in result.exception.one_line()


def test_cli_budget_below_minimum(cli):
    result = cli("dense.gguf", "--budget", "1MiB")
    assert isinstance(result.exception, FlashflexError)
    assert "minimum" in result.exception.one_line()


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-qwen3moe", "tiny-deepseek"])
def test_plans_real_gguf_tables_from_the_reader(tmp_path, preset):
    """The planner on tables read from synthetic GGUF files, at the minimum budget and with room to spare."""
    synth = pytest.importorskip("orchestrator.synth")
    from orchestrator.modelfile.reader import read_model_table

    path = synth.write_synth_model(synth.preset(preset), tmp_path / f"{preset}.gguf")
    table = read_model_table(path)
    low = minimum(table, ctx=64, ubatch=1)
    for budget in (low, low + 1 * MiB, low + table.total_bytes):
        plan = plan_table(table, budget, ctx=64, ubatch=1)
        check_invariants(table, plan, budget)
        assert plan.prefetch.direct_io  # synth writes 4096-aligned files
    assert (plan.moe is not None) == table.arch.is_moe


def test_staging_is_one_read_job_of_rows_and_a_layer_held_whole_keeps_the_layer_floor():
    """Repacked matrices are staged a row group (about one 4 MiB read job) at a time, other tensors whole; a layer
    that streams a tensor the graph does not use through build_lora_mm (3-D) is held whole, so the ring keeps
    that layer plus the wrap's slack."""
    from pathlib import Path

    from orchestrator.modelfile.table import Role, TensorInfo
    from orchestrator.planner import make as mk

    def tensor(shape, n_bytes, name="blk.0.ffn_up.weight"):
        return TensorInfo(name, 0, Role.FFN_DENSE, "Q4_0", shape, n_bytes, Path("m.gguf"), 0, 4096)

    row = 512 // 32 * 18  # a Q4_0 row of 512
    big = tensor((512, 16384), 16384 * row)  # 4.7 MB: 14,528-row groups (4 MiB // 288 rounded down to 64s)
    assert mk._staging_job_bytes(big) == 14528 * row + 2 * 4096
    small = tensor((512, 1024), 1024 * row)  # one job
    assert mk._staging_job_bytes(small) == small.n_bytes + 2 * 4096
    cube = tensor((512, 64, 8), 8 * 64 * row)  # not a matrix: whole
    assert mk._staging_job_bytes(cube) == cube.n_bytes + 2 * 4096
    assert mk._held_with_layer(cube) and not mk._held_with_layer(big)

    t = dense_table(n_layer=4)
    layers = mk._layers(t, 0)
    _, buf, ring = mk._buffers(layers, 0, None, threads=0, mirrored=False)
    largest = mk._largest_streamed_tensor(layers, 0)
    assert ring == min(3 * largest, sum(mk._streamed_layer_buffer(x, 0) for x in layers)) and ring < buf + 2 * largest
    held = [dataclasses.replace(x, streamable=[*x.streamable, dataclasses.replace(cube, layer=x.index)])
            for x in layers]
    _, buf_h, ring_h = mk._buffers(held, 0, None, threads=0, mirrored=False)
    assert ring_h >= buf_h + 2 * mk._largest_streamed_tensor(held, 0)
    # mapped twice, the ring needs no wrap slack: two largest, and a held layer plus the one arriving
    assert mk._buffers(layers, 0, None, threads=0)[2] == min(2 * largest, ring)
    assert mk._buffers(held, 0, None, threads=0)[2] >= buf_h + mk._largest_streamed_tensor(held, 0)


def test_a_split_reserves_the_load_staging_of_the_largest_tensor_sent():
    """llama.cpp reads each tensor bound for another device whole into a host buffer while loading, before the
    context allocates the KV cache and compute buffers: a plan with layers elsewhere reserves what the largest
    (here the output matrix of a large vocabulary) needs beyond those, and its minimum includes it."""
    from orchestrator import rpc
    from orchestrator.config import load_run_config

    t = dense_table(n_layer=4, n_vocab=200_000)
    output = next(x.n_bytes for x in t.tensors if x.name == "output.weight")
    worker = rpc.Worker("10.0.0.1:50052", rpc.RPC_PROTOCOL, [rpc.WorkerDevice(0, 1 << 30, 1 << 30)])
    cfg = load_run_config(None, {"context.ctx": 64, "context.ubatch": 8, "budget.size": "1GiB",
                                 "rpc.servers": "10.0.0.1:50052", "rpc.layers": 2})
    plan = plan_config(t, cfg, workers=[worker])
    r = plan.reservations
    assert plan.rpc.load_staging_bytes == output
    assert r.load_staging_bytes == output - r.kv_cache_bytes - r.compute_bytes > 0
    assert plan.reserved_bytes == r.kv_cache_bytes + r.compute_bytes + r.load_staging_bytes + r.prefetch_buffer_bytes
    alone = plan_table(t, 1 << 30, ctx=64, ubatch=8)  # nothing sent anywhere: nothing staged
    assert alone.reservations.load_staging_bytes == 0
    with pytest.raises(FlashflexError, match="loading"):
        plan_config(t, cfg.model_copy(update={"budget": cfg.budget.model_copy(
            update={"size": f"{plan.minimum_budget_bytes - 1}B"})}), workers=[worker])


# --------------------------------------------------------------------------------------------------
# Drafting and a benchmark's process: reservations of the one plan


def _drafted(table: ModelTable, budget: int, draft: DraftRequest | None, process: int = 0, **inputs) -> Plan:
    threads = None if inputs.get("read_probe") else 1  # -tp auto where a probe is given
    return make_plan(PlanRequest(budget_bytes=budget, ctx=256, ubatch=16, draft=draft, process_bytes=process,
                                 threads=threads), PlanInputs(table=table, **inputs))


def test_drafting_is_a_reservation_the_model_plans_around():
    t = dense_table()
    minimum = plan_table(t, 1 << 40, ctx=256, ubatch=16).minimum_budget_bytes
    budget = minimum + 8 * MiB
    draft = DraftRequest(kind="model", max_tokens=4, row_bytes=8192, model_bytes=2 * MiB, length_fixed=True)
    drafted = _drafted(t, budget, draft)
    need = 2 * MiB + 4 * 8192
    assert drafted.reservations.draft_bytes == need and drafted.draft.reserved_bytes == need
    assert drafted.budget_bytes == budget and drafted.used_bytes <= budget
    assert drafted.minimum_budget_bytes == minimum + need
    # the model is planned exactly as it would be with the budget less the reservation
    alone = plan_table(t, budget - need, ctx=256, ubatch=16)
    assert [x.placement for x in drafted.tensors] == [x.placement for x in alone.tensors]
    assert drafted.reserved_bytes == alone.reserved_bytes + need
    with pytest.raises(FlashflexError, match=r"below the .* minimum .*drafting"):
        _drafted(t, minimum + need - 1, draft)
    with pytest.raises(FlashflexError, match="more than the budget"):
        _drafted(t, need, draft)


def test_a_benchmark_process_is_reserved_before_the_model():
    t = dense_table()
    minimum = plan_table(t, 1 << 40, ctx=256, ubatch=16).minimum_budget_bytes
    plan = _drafted(t, minimum + 20 * MiB, None, process=20 * MiB)
    assert plan.reservations.process_bytes == 20 * MiB and plan.minimum_budget_bytes == minimum + 20 * MiB
    with pytest.raises(FlashflexError, match="this process"):
        _drafted(t, minimum + 20 * MiB - 1, None, process=20 * MiB)


def test_the_draft_length_is_capped_so_failing_drafts_cost_at_most_their_share_of_the_reads():
    t = dense_table()
    budget = plan_table(t, 1 << 40, ctx=256, ubatch=16).minimum_budget_bytes + 2 * MiB
    streamed = plan_table(t, budget, ctx=256, ubatch=16).estimates.streamed_bytes_per_token
    assert streamed > 0
    row = int(FAILING_DRAFT_SHARE * streamed / 2.5)  # the share of a token's reads holds two rows, not three

    def fit(**kw) -> Plan:
        return _drafted(t, budget, DraftRequest(kind="prompt-lookup", max_tokens=7, lendable=False,
                                                **{"row_bytes": row, **kw}))

    capped = fit().draft
    assert (capped.max_tokens, capped.logits_bytes, capped.capped_from) == (2, 2 * row, 7)
    assert "up to 2 drafted tokens" in capped.note and "--draft-max" in capped.note
    assert fit(length_fixed=True).draft.max_tokens == 7 and fit(length_fixed=True).draft.note is None
    assert fit(row_bytes=1).draft.max_tokens == 7  # rows cheap next to what streams: no cap
    roomy = _drafted(t, 1 << 40, DraftRequest(kind="prompt-lookup", max_tokens=7, lendable=False, row_bytes=row))
    assert roomy.draft.max_tokens == 7  # nothing streams: nothing to cap
    tiny = fit(row_bytes=streamed // 20).draft  # one row is 5% of the reads
    assert tiny.max_tokens == 1 and f"more than {FAILING_DRAFT_SHARE:.0%}" in tiny.note
    for r in (row // 3, row, 3 * row):
        d = fit(row_bytes=r).draft
        assert d.logits_bytes <= FAILING_DRAFT_SHARE * streamed or d.max_tokens == 1


def test_rows_are_lent_to_streamed_weights_so_the_length_is_not_capped():
    """Where weights stream on this host, the rows' memory holds streamed weights while no verification runs, so
    failing drafts cost what no drafting costs: drafting by default stays on at the length asked for, the spec
    names the memory, and the estimate of what the lent memory keeps follows the runtime's pick (largest first,
    whole pages). Rows no streamed tensor fits in, or a runtime that cannot lend, fall back to the cap."""
    t = dense_table()
    budget = plan_table(t, 1 << 40, ctx=256, ubatch=16).minimum_budget_bytes + 2 * MiB
    streamed = plan_table(t, budget, ctx=256, ubatch=16).estimates.streamed_bytes_per_token
    smallest = min(x.n_bytes for x in t.tensors if x.name.startswith("blk.") and len(x.shape) > 1)
    row = max(smallest, streamed // 20)  # one row is 5% of the reads: capped to nothing without lending
    budget += 7 * row  # room for the rows beside what streams

    def auto(row_bytes: int, **kw) -> Plan:
        return _drafted(t, budget, DraftRequest(kind="prompt-lookup", max_tokens=7, row_bytes=row_bytes,
                                                optional=True, **kw))

    plan = auto(row)
    d = plan.draft
    assert d is not None and d.max_tokens == 7 and d.capped_from is None and d.note is None
    assert d.lent_bytes == d.logits_bytes == 7 * row and "lent" in d.pricing
    sizes = [x.n_bytes for x in plan.tensors if x.placement == "streamed"]
    assert d.lent_weights_bytes == lent_weights(sizes, d.lent_bytes) and 0 < d.lent_weights_bytes <= d.lent_bytes
    assert "lent to streamed weights" in "\n".join(explain(plan))
    assert auto(row, lendable=False).draft is None  # the cap: not one row fits the share of the reads
    small = auto(smallest // 8).draft  # seven rows hold no streamed tensor
    assert small is None or small.lent_bytes == 0
    assert lent_weights([10, 5000, 9000, 4096], 8192) == 8192  # 9000 takes 3 pages; 5000 two; nothing else fits


def test_drafting_by_default_drafts_shorter_where_the_whole_lengths_rows_do_not_fit():
    """Lent rows are still reserved: where 7 drafted tokens' rows do not fit beside the model's minimum, drafting
    by default halves the length until they do (said in the plan), and drafts nothing where not one fits; the
    minimum the plan reports stays the undrafted one."""
    t = dense_table()
    minimum = plan_table(t, 1 << 40, ctx=256, ubatch=16).minimum_budget_bytes
    smallest = min(x.n_bytes for x in t.tensors if x.name.startswith("blk.") and len(x.shape) > 1)
    row = smallest  # one row holds a streamed tensor: lent

    def auto(total: int) -> Plan:
        return _drafted(t, total, DraftRequest(kind="prompt-lookup", max_tokens=7, row_bytes=row, optional=True))

    full = auto(minimum + 8 * row).draft
    assert full is not None and full.max_tokens == 7 and full.capped_from is None and full.lent_bytes == 7 * row
    half = auto(minimum + 5 * row)
    assert half.draft is not None and (half.draft.max_tokens, half.draft.capped_from) == (3, 7)
    assert half.draft.lent_bytes == 3 * row and "not 7" in half.draft.note
    assert half.minimum_budget_bytes == minimum
    assert auto(minimum + row // 2).draft is None and auto(minimum + row // 2).minimum_budget_bytes == minimum


def test_drafting_by_default_only_where_it_streams_and_a_row_fits_the_share():
    """draft.kind auto (run, chat): the same cap, but where nothing streams or not one drafted token's rows fit
    the share of the reads, no drafting at all rather than one token."""
    t = dense_table()
    budget = plan_table(t, 1 << 40, ctx=256, ubatch=16).minimum_budget_bytes + 2 * MiB
    streamed = plan_table(t, budget, ctx=256, ubatch=16).estimates.streamed_bytes_per_token
    row = int(FAILING_DRAFT_SHARE * streamed / 2.5)

    def auto(total: int, row_bytes: int) -> Plan:
        return _drafted(t, total, DraftRequest(kind="prompt-lookup", max_tokens=7, lendable=False, row_bytes=row_bytes,
                                               optional=True))

    on = auto(budget, row).draft
    assert on is not None and on.optional and on.max_tokens == 2
    assert auto(budget, streamed // 20).draft is None  # one row is 5% of the reads
    assert auto(1 << 40, row).draft is None  # nothing streams: stock stays stock
    assert auto(1 << 40, row).reservations.draft_bytes == 0


def test_rows_are_priced_in_time_once_a_run_has_measured_its_decode():
    """A token takes about max(its reads, its compute) while the prefetch threads read ahead: where compute takes
    longer, the rows' extra bytes are read in its shadow, and the cap is what keeps a token within 3% of that
    time. Read-bound, or never measured: 3% of the bytes. The read rate is the faster of what the runs received
    and a share of the device's probe."""
    t = dense_table()
    budget = plan_table(t, 1 << 40, ctx=256, ubatch=16).minimum_budget_bytes + 2 * MiB
    streamed = plan_table(t, budget, ctx=256, ubatch=16).estimates.streamed_bytes_per_token
    row = int(FAILING_DRAFT_SHARE * streamed / 2.5)
    rate = 1e9  # bytes/s the runs' reads arrived at

    def fit(compute: float | None, probe: float | None = None) -> DraftPlan:
        profile = DecodeProfile(compute, rate) if compute is not None else None
        return _drafted(t, budget, DraftRequest(kind="prompt-lookup", max_tokens=7, lendable=False, row_bytes=row),
                        decode_profile=profile, read_probe={1: probe, 2: probe, 4: probe} if probe else None).draft

    unmeasured = fit(None)
    assert unmeasured.max_tokens == 2 and "priced in bytes" in unmeasured.pricing
    read_bound = fit(0.5 * streamed / rate)  # compute takes half the reads' time
    assert read_bound.max_tokens == 2 and "read-bound" in read_bound.pricing
    # compute takes 10% longer than the reads: its shadow holds 10% more bytes, plus 3% of the whole
    shadow = int(1.1 * streamed)
    compute_bound = fit(shadow / rate)
    allowance = int(1.03 * shadow) - streamed
    assert compute_bound.max_tokens == min(7, allowance // row) > 2
    assert "read in a step's compute" in compute_bound.pricing
    assert compute_bound.logits_bytes <= allowance
    assert fit(1.0).max_tokens == 7  # far compute-bound: the length asked for
    # read-bound by what the runs received, but the device reads three times as fast: the probe's share decides
    assert fit(0.5 * streamed / rate, probe=3 * rate / RUNTIME_READ_SHARE).max_tokens > 2
    assert fit(0.5 * streamed / rate, probe=0.5 * rate).max_tokens == 2  # a slower probe changes nothing
    assert draft_row_allowance(streamed, None, 1e9)[0] == int(FAILING_DRAFT_SHARE * streamed)


def test_a_server_gathers_requests_for_a_few_percent_of_a_planned_pass(tmp_path):
    """The spec's gather_ms (llama-server's window when a request wakes it from idle): 3% of the plan's estimated
    pass over the streamed weights, at most 50 ms; 0 where nothing streams (stock stays stock)."""
    from orchestrator import synth
    from orchestrator.run.spec import GATHER_MAX_MS, gather_window_ms

    assert gather_window_ms(None) == 0 and gather_window_ms(0.0) == 0
    assert gather_window_ms(1 / 1.3) == 39  # the 7B shape under half its size: ~1.3 s a pass
    assert gather_window_ms(100.0) == 0 and gather_window_ms(0.01) == GATHER_MAX_MS
    from orchestrator.modelfile.reader import read_model_table
    from orchestrator.run.settings import GenerationSettings
    from tests.helpers import prepared_of

    path = synth.write_synth_model(synth.preset("tiny-dense"), tmp_path / "m.gguf")
    table = read_model_table(path)
    settings = GenerationSettings(model=path, ctx=128, batch=8, ubatch=8, threads=2)
    minimum = plan_table(table, 1 << 40, ctx=128, ubatch=8).minimum_budget_bytes
    plan = plan_table(table, minimum, ctx=128, ubatch=8)
    streamed = prepared_of(settings, plan)
    assert streamed.spec.stream is not None
    assert streamed.spec.gather_ms == gather_window_ms(plan.estimates.io_bound_tokens_per_s)
    assert prepared_of(settings, plan_table(table, 1 << 40, ctx=128, ubatch=8)).spec.gather_ms == 0
