"""What llama.cpp allocates beside the weights, estimated from the tensor table: the KV cache and the compute
buffers (the planner's formulas; orchestrator.overheads measures the real ones when it can)."""

from __future__ import annotations

from orchestrator.modelfile.table import ModelTable, Role
from orchestrator.planner.schema import COMPUTE_FIXED_BYTES, DEFAULT_N_VOCAB


def n_vocab(table: ModelTable) -> int:
    """The vocabulary size: the output (or token embedding) matrix's second dimension."""
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


KV_CELL_PAD = 256  # llama.cpp rounds a context's KV cells up to a multiple of this


def kv_layer_bytes(table: ModelTable, ctx: int) -> int:
    """f16 K and V of one layer for the whole context, in the cells llama.cpp allocates for it (padded)."""
    a = table.arch
    cells = -(-ctx // KV_CELL_PAD) * KV_CELL_PAD
    return cells * a.n_head_kv * (a.head_dim_k + a.head_dim_v) * 2


def kv_cache_bytes(table: ModelTable, ctx: int) -> int:
    """f16 K and V for all layers and the whole context."""
    return table.arch.n_layer * kv_layer_bytes(table, ctx)


def compute_bytes(table: ModelTable, ctx: int, ubatch: int, topk: int | None = None,
                  outputs: int | None = None) -> int:
    """Upper estimate of llama.cpp's compute buffers for one ubatch (see the planner package docstring) whose
    `outputs` rows (None: every token) ask for logits."""
    a = table.arch
    k = topk if topk is not None else max(a.n_expert_used, 1)
    per_token = 6 * a.n_embd + 3 * _ffn_width(table, k) + a.n_head * ctx
    rows = ubatch if outputs is None else min(outputs, ubatch)
    return 4 * (ubatch * per_token + rows * n_vocab(table)) + COMPUTE_FIXED_BYTES
