"""Budget -> Plan: which tensors stay resident, which stream, how big each MoE slot bank is.

`make_plan(PlanRequest, PlanInputs)` is a pure function: the settings, and the facts gathered about the model and
the machine (orchestrator.run.inputs). The Plan it returns is JSON-serialisable (`flashflex plan --json`) and states
every decision, including what the MoE runtime allocates; orchestrator.run.spec turns it into the RuntimeSpec, the
contract with the native runtimes, which execute it and never re-plan.

## Reservations (taken from the budget first)

- KV cache: f16 K and V for every layer and the whole context, in the cells llama.cpp allocates (ctx rounded up
  to a multiple of 256): `n_layer x cells x n_head_kv x (head_dim_k + head_dim_v) x 2` bytes. What llama.cpp
  itself sizes replaces it where measured (orchestrator.overheads; per layer for this host's GPUs).
- Compute buffers (a conservative upper estimate of what llama.cpp's graph allocator needs for one ubatch,
  all F32): `4 x ubatch x (n_vocab + 6 n_embd + 3 n_ff + n_head x ctx) + 4 MiB` — logits for the ubatch,
  the residual stream and its temporaries, the widest FFN activations (for MoE: top-k x expert width plus
  the shared experts), attention scores without flash attention, and a fixed allowance for graph metadata.
- Prefetch buffers (only when a dense tensor streams): `w x` the largest streamed layer plus two 4096-byte
  pages per streamable tensor of it (an O_DIRECT read covers whole pages), where `w` = the prefetch window
  (1 with 0 threads: synchronous reads still need one buffer), never more than the number of layers that
  stream. Expert misses are read straight into their victim slots and need no buffer.
- Always-resident weights: every tensor outside the repeating blocks (token embedding, output, output norm:
  the embedding is only read by row lookups and could stream, but it is kept resident for simplicity and
  because tied models use it as the output head too), every 1-D tensor (norms, biases, scales: one read each
  would cost more than it saves) and MoE routers (a layer's expert reads cannot start before routing, so a
  streamed router would serialise two reads).

## Dense layers (FlexInfer)

Balanced memory locking: the rest of the budget is split EVENLY across the layers as one per-layer quota (a
water level: a layer that cannot use its whole quota leaves the remainder to the others, never more than the
level to any one). Flexible tensor preservation picks which tensors of a layer fill its quota; each tensor
is resident whole or streamed whole. With A = the layer's attention bytes and F = its FFN bytes (FFN = dense
FFN and shared experts), checked in this order:

- quota <= A → `attention` regime: attention tensors first, in the order K, V, Q, fused QKV, O, other
  (GQA makes K and V the smallest: keeping them removes the most reads per byte), then FFN smallest first;
- A < quota < F → `mixed`: FFN tensors largest first where they fit, the gaps filled with attention (K, V,
  Q, O);
- quota >= F → `ffn`: every FFN tensor, then attention fills the rest.

A tensor that does not fit is skipped and later ones may fill the gap. Per-layer resident bytes are made
non-decreasing in the quota by keeping the best selection found at any smaller quota, so more budget never
means fewer resident bytes.

## MoE layers (Flash-MoE)

Dense, shared-expert, router and norm weights come first; routed experts (`*_exps`) live in per-layer slot
banks of N resident slots, N x bytes-per-expert (summed over the layer's routed tensors), plus one zero slot
while N is below the expert count (see runtime_slots). Every MoE layer
gets at least top-k slots (a token needs k experts resident at once); if the non-expert weights do not fit
after those minimum banks, they stream exactly like a dense model (one budget for both). Otherwise whatever
is left grows every bank evenly, capped at the expert count. Leading dense layers get no bank. A bank within
1.25x top-k draws a warning. Flash-MoE reports the best bank as "a peak, not as big as fits", because a
bank that starves the page cache loses when misses are buffered reads; our misses are direct reads into
slots, so the banks take what is left (cap them with --moe-slot-bank). Modes stock / resident /
resident-bank keep every expert resident and must fit; auto = stock when everything fits, else slot-bank.
The oracle modes are planned like slot-bank.

## Minimum budget

KV cache + compute + always-resident weights + (for MoE) top-k slots per MoE layer (or the slot bank asked
for) + the cheaper of: every dense layer weight resident, or everything streamed through the prefetch
buffers. Below it make_plan raises FlashflexError naming the minimum; at it, a plan always exists.

## Estimates

Expected streamed bytes per token: every streamed dense tensor, plus expert misses under a uniform
independent routing model — a routed expert is in a bank of N of E slots with probability N/E, so a layer
misses `k x (1 - N/E)` experts per token. Real routing is skewed, so real hit rates are higher (Flash-MoE
measured 58-85 % where this model says 6-50 %). I/O-bound tokens/s = read bandwidth / streamed bytes per
token (1.1 GB/s by default: direct reads at queue depth 4 on the reference machine).

Beside the budget: drafting's RAM (a draft model, and a drafted token's logits rows, in the compute buffers and
llama.cpp's output buffer: where weights stream on this host, lent to streamed weights while no verification
runs, so text where drafts fail reads what it reads undrafted; elsewhere the length capped so the rows cost at most
3% of a token's reads, and drafting by default dropped where not one token fits that) and a benchmark process's own
memory are reservations of the plan.

The package: `request` (PlanRequest, PlanInputs), `schema` (the Plan and its parts), `make` (make_plan), `buffers`
(KV cache and compute estimates), `placement` (layers on other devices), `explain` (for people).
"""

from orchestrator.planner.buffers import compute_bytes, kv_cache_bytes
from orchestrator.planner.explain import explain, format_tokens_per_s
from orchestrator.planner.make import make_plan, runtime_slots
from orchestrator.planner.request import DraftRequest, PlanInputs, PlanRequest
from orchestrator.planner.schema import (
    DIRECT_IO_ALIGNMENT,
    SCHEMA_VERSION,
    DraftPlan,
    Estimates,
    LayerPlan,
    MoEPlan,
    Plan,
    PrefetchPlan,
    Reservations,
    RPCDevicePlan,
    RPCPlan,
    TensorDecision,
)

__all__ = ["DIRECT_IO_ALIGNMENT", "SCHEMA_VERSION", "DraftPlan", "DraftRequest", "Estimates", "LayerPlan", "MoEPlan",
           "Plan", "PlanInputs", "PlanRequest", "PrefetchPlan", "Reservations", "RPCDevicePlan", "RPCPlan",
           "TensorDecision", "compute_bytes", "explain", "format_tokens_per_s", "kv_cache_bytes", "make_plan",
           "runtime_slots"]
