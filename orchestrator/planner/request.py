"""What make_plan is asked (PlanRequest: settings, read once from a RunConfig) and what it is given (PlanInputs:
the facts gathered about the model and this machine). Both are plain values: make_plan reads no file."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator import modes
from orchestrator.modelfile.table import ModelTable
from orchestrator.planner.schema import DEFAULT_READ_BANDWIDTH

if TYPE_CHECKING:
    from orchestrator.config import RunConfig

# The runtime maps a streaming ring twice back to back with Linux's memfd (llama-flashflex-io.cpp map_mirrored);
# elsewhere it is flat and the plan pays its wrap slack.
MIRRORED_RING_SUPPORTED = sys.platform.startswith("linux")

# MoE options that only mean something when experts live in banks: RunConfig key → the flag a refusal names.
BANK_OPTIONS = {"sidecar": "--moe-sidecar", "slot_bank": "--moe-slot-bank", "io_threads": "--moe-io-threads",
                "trace": "--moe-trace", "prefetch": "--moe-prefetch", "prefetch_ranks": "moe.prefetch_ranks"}


@dataclass(frozen=True)
class DraftRequest:
    """What speculative decoding keeps resident beside the model: a draft model (its weights, KV cache and compute
    buffers, `model_bytes`; 0 for prompt lookup) and one logits row of `row_bytes` per drafted token."""

    kind: str
    max_tokens: int  # drafted tokens per verification, after the ubatch cap
    row_bytes: int
    model_bytes: int = 0
    length_fixed: bool = False  # max_tokens was given: the plan keeps it
    name: str = ""  # for messages: the draft model's file name
    optional: bool = False  # drafting by default: none where nothing streams or not one row fits the share
    lendable: bool = True  # the runtime may lend the rows' memory to streamed weights (llama_flashflex_lend_rows)


@dataclass(frozen=True)
class PlanRequest:
    """make_plan's settings, validated and read once."""

    budget_bytes: int  # the whole budget; the plan's reservations come out of it
    ctx: int = 2048
    ubatch: int = 512
    outputs: int = 1  # output rows a micro-batch asks for (ContextConfig.outputs), at most ubatch
    threads: int | None = 1  # prefetch I/O threads; 0 = synchronous reads; None = auto
    threads_reason: str = "asked"  # why this many threads
    window: int | None = None  # requested look-ahead in layers; None = auto (a ring sized in bytes)
    mirrored_ring: bool = True  # the runtime maps the ring twice back to back (no wrap slack): prefetch.mirror here
    repack: bool = False  # prefetch.repack: streamed weights take the CPU backend's repacked layout
    # streamed weights kept in the file's layout, read straight into their homes, resident ones repacked (make_plan
    # decides: not `repack`, and no GPU of this host, whose pinned host buffer type llama.cpp gives the host layers')
    file_layout: bool = True
    direct_io: str = "auto"  # auto | on | off | strict, as asked
    bandwidth: int = DEFAULT_READ_BANDWIDTH  # bytes/s, for the estimate only
    mode: str = modes.AUTO  # the requested MoE mode (auto is resolved by the planner)
    slot_bank: int | None = None  # slots per MoE layer asked for; None = sized from the budget
    topk: int | None = None  # experts per token asked for; None = the model's
    moe_prefetch: str = "none"  # none | router-lookahead
    prefetch_ranks: int | None = None  # router-lookahead's ranks asked for; None = a quarter of top-k
    io_threads: int = 4
    verify: bool = False
    shared_only: bool = False
    records_trace: bool = False  # a routing trace is recorded (slot-bank only)
    bank_options: tuple[str, ...] = ()  # flags of bank options given (BANK_OPTIONS), for refusals
    layers_elsewhere: int | None = None  # rpc.layers or -ngl: layers asked to go to other devices; None = fit
    layers_flag: str = "--rpc-layers"  # the option that asked for layers_elsewhere, for messages
    # -ngl auto on this host's GPUs alone: as many layers as fit, and none (a warning, everything here) when the
    # device budget holds no layer; an explicit count or RPC workers that hold nothing are refused instead
    layers_optional: bool = False
    draft: DraftRequest | None = None
    process_bytes: int = 0  # the process beside the model (a benchmark's interpreter), reserved first

    @property
    def prefetch_threads(self) -> int:
        """The prefetch threads once resolved (make_plan's _prefetch_threads stage turns auto into a number)."""
        assert self.threads is not None, "-tp auto is resolved before the budget stages"
        return self.threads

    @property
    def effective_window(self) -> int | None:
        """The layers' worth of ring an explicit window asks for (one for synchronous reads); None = auto."""
        if self.window is None:
            return None
        return max(1, self.window) if self.threads else 1

    @classmethod
    def from_config(cls, cfg: "RunConfig", budget_bytes: int, *, draft: DraftRequest | None = None,
                    process_bytes: int = 0, read_bandwidth: int | None = None) -> "PlanRequest":
        """The request of a RunConfig whose budget resolved to `budget_bytes`."""
        p, m = cfg.prefetch, cfg.moe
        given = tuple(flag for key, flag in BANK_OPTIONS.items()
                      if key in m.model_fields_set and getattr(m, key) not in (None, "none"))
        layers, flag = cfg.rpc.layers, "--rpc-layers"
        if isinstance(cfg.gpu.layers, int) and cfg.gpu.layers > 0:  # llama.cpp's -ngl: 99 means all
            layers, flag = cfg.gpu.layers, "-ngl"
        return cls(budget_bytes=budget_bytes, ctx=cfg.context.ctx, ubatch=cfg.context.ubatch,
                   outputs=cfg.context.outputs_per_ubatch,
                   threads=None if p.threads == "auto" else int(p.threads),
                   window=None if p.window in (None, "auto") else int(p.window), direct_io=str(p.direct_io),
                   mirrored_ring=p.mirror and MIRRORED_RING_SUPPORTED, repack=p.repack,
                   bandwidth=read_bandwidth if read_bandwidth is not None else p.read_bandwidth_bytes(),
                   mode=str(m.mode), slot_bank=m.slot_bank, topk=m.topk, moe_prefetch=str(m.prefetch),
                   prefetch_ranks=m.prefetch_ranks, io_threads=m.io_threads, verify=m.verify,
                   shared_only=m.shared_only, records_trace=m.trace is not None and not modes.is_oracle(m.mode),
                   bank_options=given, layers_elsewhere=layers, layers_flag=flag,
                   layers_optional=layers is None and not cfg.rpc.servers, draft=draft, process_bytes=process_bytes)


@dataclass(frozen=True)
class PlanInputs:
    """What make_plan is given besides the request, each gathered once (orchestrator.run.inputs)."""

    table: ModelTable
    overheads: Any = None  # overheads.Measured (kv_bytes, compute_bytes) or None: the planner's estimates
    read_probe: dict[int, float] | None = None  # queue depth → direct-read bytes/s of the model's device
    workers: list[Any] = field(default_factory=list)  # rpc.Worker: devices the model's last layers may go to
    replay_distinct: int | None = None  # oracle-all-hit: the most distinct experts a layer of the trace uses
    decode_profile: Any = None  # computespeed.DecodeProfile: a decode step's compute and read rate, measured
