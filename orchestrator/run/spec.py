"""RuntimeSpec: everything flashflex's native runtime and the model load are told about a run, typed, versioned and
JSON-serialisable whole (what `flashflex run --dry-run --json` prints). The one contract between Python and C++:
`RuntimeSpec.from_plan` makes it from a Plan and the run's inputs (a pure function), orchestrator.run.loader opens a
model with it, and only native.spec_document knows the runtime's option names.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from orchestrator import modes
from orchestrator.modes import MoEPrefetch, Replay
from orchestrator.planner import Plan, RPCPlan

if TYPE_CHECKING:
    from orchestrator.config import RunConfig
    from orchestrator.sidecar import SidecarManifest
    from orchestrator.traces import Trace


class SpecInputs(Protocol):
    """What from_plan reads of a run's inputs (run.inputs.RunInputs has it)."""

    config: "RunConfig"
    model: Path
    sidecar: Path | None
    manifest: "SidecarManifest | None"
    replayed: "Trace | None"

SPEC_VERSION = 1

DirectIO = Literal["off", "on", "strict"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamedTensor(_Spec):
    """A dense tensor read from `file` (an index into RuntimeSpec.files) at `offset` ahead of every use."""

    name: str
    file: int
    offset: int
    bytes: int


class StreamSpec(_Spec):
    """Dense streaming: `tensors` read ahead by `prefetch_threads` into a ring of `ring_bytes` (fixed homes in the
    order them), mapped twice back to back when `mirror`; `window` is the plan's layer count; `lent_bytes`: the
    memory drafting reserves for a verification batch's rows, lent to streamed weights while none runs."""

    tensors: list[StreamedTensor]
    prefetch_threads: int
    window: int
    ring_bytes: int
    mirror: bool = True
    lent_bytes: int = 0


class BankedTensor(_Spec):
    """A routed-expert tensor held in slot banks: expert e is `bytes_per_expert` bytes at offset + e * expert_stride
    of sidecar file `file` (an index into RuntimeSpec.files); `checksums` per expert (empty: nothing to verify)."""

    name: str
    file: int
    offset: int
    expert_stride: int
    bytes_per_expert: int
    checksums: list[int] = Field(default_factory=list)


class BankSpec(_Spec):
    """Expert banks: `slots` per MoE layer (0 = every expert resident, read from the sidecar at load), misses read by
    `io_threads`; the prefetch policy, a replayed trace's `schedule`, and a trace recorded to `trace`."""

    sidecar: str
    tensors: list[BankedTensor]
    slots: int
    io_threads: int
    shared_only: bool = False
    preload: bool = False
    verify: bool = False
    prefetch: MoEPrefetch = "none"
    prefetch_ranks: int | None = None
    replay: Replay = "none"
    schedule: list[int] | None = None
    trace: str | None = None  # the trace this run records (to a temp file of its own meanwhile: run.loader)
    trace_header: dict[str, Any] | None = None


class RuntimeSpec(_Spec):
    """How one model is loaded and run. With no `stream` and no `banks`, stock llama.cpp loads it (with the
    `placement` and load options below, which stock runs share: exactness compares against `stock()`)."""

    version: int = SPEC_VERSION
    model: str
    files: list[str] = Field(default_factory=list, description="Files the runtime reads: the model's, then the "
                             "sidecar's layer files.")
    direct_io: DirectIO = "on"
    stream: StreamSpec | None = None
    banks: BankSpec | None = None
    placement: RPCPlan | None = None
    rpc_timeout_s: float = 3.0  # each worker's check before the load
    rpc_answer_timeout_s: float | None = 120.0  # each worker's answer during the run; None: no limit
    use_mmap: bool | None = None  # None: llama.cpp's default
    file_layout: list[str] = Field(default_factory=list, description="Weights kept in the file's layout (never "
                                   "repacked by the CPU backend): the streamed ones where the plan reads them straight "
                                   "into their homes (prefetch.repack false); resident weights stay repacked as stock "
                                   "repacks them. stock() keeps the same list, so exactness compares the same kernels.")
    kv_overrides: dict[str, int] = Field(default_factory=dict)
    draft_adaptive: bool = Field(default=True, description="A program drafting for several sequences (llama-server's "
                                 "slots) drafts as long as the measured passes afford (the runtime's draft length); "
                                 "False: its own fixed length.")
    prompt_lookup: bool = Field(default=False, description="The plan drafts by prompt lookup: llama.cpp's programs "
                                "draft with flashflex's lookup (past a changed token, then shorter n-grams) in place "
                                "of upstream's ngram-simple.")
    gather_ms: int = Field(default=0, ge=0, le=1000, description="A server waking from idle with a request waits "
                           "this long for more before its first pass (llama_flashflex_gather): a few percent of a "
                           "pass over the streamed weights (gather_window_ms); 0 where nothing streams.")
    lossy: list[str] = Field(default_factory=list, description="Why this run's output may differ from stock.")

    @property
    def native(self) -> bool:
        """True when flashflex's runtime (not stock llama.cpp) loads part of the model."""
        return self.stream is not None or self.banks is not None

    @property
    def needs_spec_file(self) -> bool:
        """True when the load reads a spec file: the runtime loads part of the model, or the layout of some weights
        differs from stock's default (stock's reference of a plan that streams them)."""
        return self.native or bool(self.file_layout)

    @property
    def mode(self) -> str:
        """The execution label, derived from the axes (modes.label)."""
        banks = self.banks
        return modes.label(banked_slots=banks.slots if banks is not None else None,
                           replay=banks.replay if banks is not None else modes.REPLAY_NONE,
                           streams=self.stream is not None, use_mmap=self.use_mmap)

    def stock(self) -> "RuntimeSpec":
        """Stock llama.cpp with the same placement (the same devices and layer split) and the same weights in the
        file's layout: what exactness compares against."""
        return RuntimeSpec(model=self.model, placement=self.placement, rpc_timeout_s=self.rpc_timeout_s,
                           rpc_answer_timeout_s=self.rpc_answer_timeout_s, file_layout=list(self.file_layout))

    @classmethod
    def from_plan(cls, plan: Plan | None, inputs: SpecInputs) -> "RuntimeSpec":
        """The spec of a plan (None: stock, the model fits) and the run's inputs. Pure: reads nothing; refuses a
        replayed trace recorded with other settings."""
        cfg = inputs.config
        spec = cls(model=str(inputs.model), rpc_timeout_s=cfg.rpc.timeout_s,
                   rpc_answer_timeout_s=cfg.rpc.answer_timeout_s)
        if plan is None:
            spec.use_mmap = False if cfg.moe.mode == modes.RESIDENT else None
            return spec
        spec.placement = plan.rpc
        spec.draft_adaptive = cfg.draft.adaptive
        spec.prompt_lookup = (plan.draft is not None and plan.draft.kind == "prompt-lookup"
                              and cfg.draft.lookup == "flashflex")
        streamed = [StreamedTensor(name=t.name, file=t.file, offset=t.offset, bytes=t.n_bytes)
                    for t in plan.tensors if t.placement == "streamed"]
        if streamed and not plan.fits_entirely:
            spec.files = list(plan.files)
            spec.stream = StreamSpec(tensors=streamed, prefetch_threads=plan.prefetch.threads,
                                     window=plan.prefetch.buffers, ring_bytes=plan.prefetch.ring_bytes,
                                     mirror=plan.prefetch.mirrored,
                                     lent_bytes=plan.draft.lent_bytes if plan.draft is not None else 0)
            requested = plan.prefetch.direct_io_requested
            spec.direct_io = "strict" if requested == "strict" else "on" if plan.prefetch.direct_io else "off"
            spec.gather_ms = gather_window_ms(plan.estimates.io_bound_tokens_per_s)
            if plan.prefetch.file_layout:
                spec.file_layout = [t.name for t in streamed]
        if plan.moe is not None:
            if plan.moe.topk_lossy:
                spec.kv_overrides[f"{plan.arch}.expert_used_count"] = plan.moe.topk
                spec.lossy.append(f"--moe-topk {plan.moe.topk} < the model's {plan.moe.n_expert_used} experts per "
                                  "token")
            if plan.moe.shared_only:
                spec.lossy.append("--moe-shared-only drops every routed expert")
            if plan.moe.experts == modes.SIDECAR:
                assert inputs.sidecar is not None and inputs.manifest is not None, "RunInputs.with_sidecar(plan)"
                spec.banks = _banks(plan, inputs, first_file=len(spec.files))
                spec.files += [str(inputs.sidecar / layer.file) for layer in inputs.manifest.layers]
                # sidecar slices are page-aligned: the setting as asked decides
                asked = plan.prefetch.direct_io_requested
                spec.direct_io = "off" if asked == "off" else "strict" if asked == "strict" else "on"
        if spec.native or (plan.moe is not None and plan.moe.mode == modes.RESIDENT):
            spec.use_mmap = False  # our runtime reads what it needs; resident = stock without mmap
        return spec


GATHER_SHARE = 0.03  # of a pass over the streamed weights: what a lone request's first token may wait for company
GATHER_MAX_MS = 50


def gather_window_ms(io_bound_tokens_per_s: float | None) -> int:
    """How long a server waking from idle waits for more requests before its first pass: a pass reads the streamed
    weights once however many prompts it carries, so requests sent together should share it; GATHER_SHARE of the
    plan's estimated pass (its reads at the assumed bandwidth), at most GATHER_MAX_MS (the 7B shape under half its
    size: ~1.3 s a pass, so 40 ms); 0 where nothing streams."""
    if not io_bound_tokens_per_s:
        return 0
    return min(GATHER_MAX_MS, round(1000 * GATHER_SHARE / io_bound_tokens_per_s))


def _banks(plan: Plan, inputs: SpecInputs, first_file: int) -> BankSpec:
    """The banks of a plan whose experts come from the sidecar: every routed tensor of the manifest (its file
    numbered after the model's) but those of layers whose experts went to a GPU with their layer (-ngl auto), and
    the trace the run replays or records."""
    from orchestrator import traces

    moe, manifest, cfg = plan.moe, inputs.manifest, inputs.config
    assert moe is not None and manifest is not None and inputs.sidecar is not None
    index = {layer.file: first_file + i for i, layer in enumerate(manifest.layers)}
    on_gpu_from = plan.rpc.experts_on_gpu_from if plan.rpc is not None else None
    tensors = [BankedTensor(name=t.name, file=index[t.file], offset=t.offset, expert_stride=t.expert_stride,
                            bytes_per_expert=t.bytes_per_expert, checksums=list(t.checksums))
               for t in manifest.tensors if t.n_expert > 1 and (on_gpu_from is None or t.layer < on_gpu_from)]
    banks = BankSpec(sidecar=str(inputs.sidecar), tensors=tensors, slots=moe.runtime_slots or 0,
                     io_threads=moe.io_threads, shared_only=moe.shared_only, preload=moe.preload, verify=moe.verify,
                     prefetch=moe.prefetch, prefetch_ranks=moe.prefetch_ranks, replay=moe.replay)
    if inputs.replayed is not None:
        traces.check_replay(inputs.replayed, manifest, k=moe.topk, ubatch=plan.ubatch)
        banks.schedule = traces.schedule(inputs.replayed.records)
    elif cfg.moe.trace is not None:
        banks.trace = str(cfg.moe.trace)
        banks.trace_header = traces.header_for(manifest, k=moe.topk, ubatch=plan.ubatch, slots=banks.slots,
                                               prefetch=cfg.moe.prefetch, mode=moe.mode).model_dump(mode="json")
    return banks
