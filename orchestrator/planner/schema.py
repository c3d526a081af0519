"""The Plan: what a budget becomes (JSON-serialisable; `flashflex plan --json` prints it), and the planner's
constants. The algorithm that makes it is in orchestrator.planner.make; explanations in .explain."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.config import DEFAULT_BANDWIDTH
from orchestrator.modes import ExpertSource, MoEMode, MoEPrefetch, PlannedMoEMode, Replay
from orchestrator.sizes import MiB, parse_rate

SCHEMA_VERSION = 1
DIRECT_IO_ALIGNMENT = 4096
READ_CHUNK_BYTES = 4 << 20  # one read job of the runtime (k_chunk in llama-flashflex-stream.cpp)
COMPUTE_FIXED_BYTES = 4 * MiB
BANK_WARN_FACTOR = 1.25
DEFAULT_READ_BANDWIDTH = parse_rate(DEFAULT_BANDWIDTH)  # prefetch.read_bandwidth's default, in bytes/s
DEFAULT_N_VOCAB = 32000


Placement = Literal["resident", "streamed", "bank"]
Regime = Literal["all", "attention", "mixed", "ffn", "none"]


# --------------------------------------------------------------------------------------------------
# The Plan (the contract with the native side)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorDecision(_Model):
    """Where one tensor lives during the run."""

    name: str = Field(description="GGUF tensor name.")
    layer: int | None = Field(description="Block index; null outside the repeating blocks.")
    role: str = Field(description="Role from the tensor table (attn_k, ffn_dense, expert_routed, ...).")
    n_bytes: int = Field(description="Size of the tensor data in the file.")
    file: int = Field(description="Index into Plan.files of the file holding the data.")
    offset: int = Field(description="Absolute byte offset of the data in that file.")
    placement: Placement = Field(
        description="resident = loaded once and kept; streamed = read every token into a prefetch buffer; "
        "bank = routed experts: a slot bank of LayerPlan.slot_bank experts resident, misses read on demand.")
    reason: str = Field(description="Short code saying why (non-layer, pinned, fits, quota:<regime>, "
                        "over-quota, expert-bank, expert-resident).")


class LayerPlan(_Model):
    """One repeating block."""

    layer: int = Field(description="Block index.")
    regime: Regime = Field(description="Which preservation order filled the quota: all (nothing streams), "
                           "attention, mixed, ffn, or none (no quota).")
    resident_bytes: int = Field(description="Resident non-expert weights of the layer, pinned ones included.")
    streamed_bytes: int = Field(description="Dense weights of the layer read every token.")
    attention_bytes: int = Field(description="Streamable attention bytes (threshold A of the regimes).")
    ffn_bytes: int = Field(description="Streamable FFN bytes (threshold F of the regimes).")
    n_expert: int | None = Field(default=None, description="Routed experts in this layer; null if not MoE.")
    expert_bytes: int | None = Field(default=None, description="Bytes of one expert over the routed tensors.")
    slot_bank: int | None = Field(default=None, description="Resident expert slots; null if not MoE.")
    bank_bytes: int = Field(default=0, description="Bytes of the bank: see runtime_slots.")


class PrefetchPlan(_Model):
    """Dense streaming settings the runtime applies."""

    threads: int = Field(description="Prefetch I/O threads; 0 = synchronous reads.")
    threads_reason: str = Field(default="asked", description="Why this many threads (-tp auto says what it "
                                "measured).")
    window: int | Literal["auto"] = Field(description="Requested look-ahead in layers; auto = a ring sized in bytes.")
    buffers: int = Field(description="Layer-sized buffers an explicit window asks for (1 for auto); 0 if nothing "
                         "streams.")
    buffer_bytes: int = Field(description="The largest streamed layer plus page padding (an upper bound on the "
                              "aligned spans of its tensors).")
    ring_bytes: int = Field(default=0, description="The ring the runtime allocates: two largest streamed tensors "
                            "(one computing, one arriving), a third where the ring is flat (the slack a wrap may "
                            "waste), and a read per prefetch thread (see planner/make.py _buffers).")
    mirrored: bool = Field(default=True, description="The runtime maps the ring twice back to back, so a tensor "
                           "runs on across its end and no slack is needed (prefetch.mirror, on Linux).")
    file_layout: bool = Field(default=False, description="Streamed weights stay in the file's layout "
                              "(RuntimeSpec.file_layout; resident ones are repacked as stock repacks them): read "
                              "straight into their homes. false = nothing streams, or the buffer type llama.cpp picks "
                              "(prefetch.repack: "
                              "the CPU backend's repacked layout; with layers on this host's GPU, its pinned host "
                              "type), staged.")
    direct_io_requested: str = Field(description="auto | on | off | strict, as asked.")
    direct_io: bool = Field(description="Whether streamed reads use O_DIRECT.")
    staging_bytes: int = Field(default=0, description="Staging for tensors set into their homes by their buffer type "
                               "(without `file_layout`): "
                               "one read job of the largest streamable tensor per prefetch thread (or one for "
                               "synchronous reads).")
    alignment: int = Field(default=DIRECT_IO_ALIGNMENT, description="Direct I/O alignment in bytes.")
    unaligned_tensors: int = Field(default=0, description="Streamed tensors whose offset is not aligned.")


class Reservations(_Model):
    """Budget taken before any weight is placed."""

    kv_cache_bytes: int = Field(description="K and V cache for the whole context.")
    compute_bytes: int = Field(description="Compute buffers for one ubatch.")
    prefetch_buffer_bytes: int = Field(description="ring_bytes + staging_bytes.")
    load_staging_bytes: int = Field(default=0, description="While loading, llama.cpp reads each tensor bound for "
                                    "another device (an RPC worker, a GPU) whole into a host buffer: what the "
                                    "largest needs beyond the KV cache and compute buffers, allocated after the "
                                    "load.")
    draft_bytes: int = Field(default=0, description="Speculative decoding beside the model: a draft model's weights, "
                             "KV cache and compute, and one logits row per drafted token (DraftPlan).")
    process_bytes: int = Field(default=0, description="The process around the model (a benchmark worker's "
                               "interpreter and libraries), when the budget is a whole cgroup.")
    source: Literal["measured", "estimated"] = Field(
        default="estimated", description="measured = KV and compute are what llama.cpp allocates for these settings "
        "(orchestrator.overheads); estimated = the planner's formulas.")


class MoEPlan(_Model):
    """MoE execution settings."""

    requested_mode: MoEMode = Field(description="Mode asked for (auto resolves to stock or slot-bank).")
    mode: PlannedMoEMode = Field(description="Mode the runtime runs.")
    n_expert: int = Field(description="Routed experts per MoE layer.")
    n_expert_used: int = Field(description="The model's experts per token.")
    topk: int = Field(description="Experts per token the run uses.")
    topk_lossy: bool = Field(description="True when topk < n_expert_used (output differs from stock).")
    slot_bank: int | None = Field(description="Slots per MoE layer (the same in every MoE layer); null when all "
                                  "experts are resident.")
    bank_bytes: int = Field(description="Total bytes of all banks (or of all routed experts when resident).")
    moe_layers: int = Field(description="Layers with routed experts.")
    # What the runtime allocates and does: the axes the C API takes (`mode` above is their label)
    experts: ExpertSource = Field(default="gguf", description="Where routed experts are read from: gguf = llama.cpp "
                                  "loads them with the model; sidecar = flashflex's runtime reads them.")
    banked: bool = Field(default=False, description="Routed experts live in per-layer slot banks (misses read on "
                         "demand); false = every expert resident.")
    replay: Replay = Field(default="none", description="A recorded routing trace replayed: all-hit = every expert it "
                           "uses pre-installed; prefetch = perfect one-step look-ahead; none.")
    runtime_slots: int | None = Field(default=None, description="Slots per MoE layer the runtime allocates (before its "
                                      "zero slot): 0 = every expert, read from the sidecar at load; oracle-all-hit: "
                                      "every expert the trace uses, whatever the budget. null = no sidecar.")
    preload: bool = Field(default=False, description="Install the replayed trace's experts at load (all-hit).")
    prefetch: MoEPrefetch = Field(default="none", description="Expert read-ahead: router-lookahead, oracle (a "
                                  "replayed trace's next call), none.")
    prefetch_ranks: int | None = Field(default=None, description="router-lookahead: each token's top this-many "
                                       "predicted experts are read ahead.")
    io_threads: int = Field(default=4, description="Parallel readers of bank misses.")
    verify: bool = Field(default=False, description="Check every expert read against its checksum.")
    shared_only: bool = Field(default=False, description="Diagnostic: routed experts contribute nothing (lossy).")


class DraftPlan(_Model):
    """Speculative decoding's share of the budget."""

    kind: str = Field(description="prompt-lookup or model.")
    max_tokens: int = Field(description="Drafted tokens per verification at most.")
    capped_from: int | None = Field(default=None, description="The length asked for, when the budget capped it.")
    row_bytes: int = Field(description="A drafted token's logits: 4 bytes per vocabulary entry, in the compute "
                           "buffers and in llama.cpp's output buffer.")
    logits_bytes: int = Field(description="max_tokens rows: what a verification batch adds.")
    model_bytes: int = Field(default=0, description="A draft model's weights, KV cache and compute buffers.")
    reserved_bytes: int = Field(description="logits_bytes + model_bytes (Reservations.draft_bytes).")
    note: str | None = Field(default=None, description="Why the length was capped, when it was.")
    optional: bool = Field(default=False, description="Drafting by default (draft.kind auto), not asked for.")
    pricing: str | None = Field(default=None, description="How the rows' cost was judged when the length was not "
                                "given: in time (a measured decode step beside the probed reads) or in bytes; or "
                                "that they are lent.")
    lent_bytes: int = Field(default=0, description="The rows' memory lent to streamed weights while no verification "
                            "runs (the runtime's lent memory; 0: not lent, the rows cost their bytes on every "
                            "token).")
    lent_weights_bytes: int = Field(default=0, description="Streamed weights expected to keep their bytes there "
                                    "while drafting idles: each token then reads that much less.")


class Estimates(_Model):
    """What the plan predicts; not used by the runtime."""

    dense_streamed_bytes_per_token: int = Field(description="Dense tensors read per token.")
    expert_miss_bytes_per_token: int = Field(description="Expected expert bytes read per token.")
    streamed_bytes_per_token: int = Field(description="Sum of the two.")
    expected_hit_rate: float | None = Field(description="Expected bank hit rate; null for dense models.")
    hit_rate_model: str = Field(description="How the hit rate was estimated.")
    read_bandwidth: int = Field(description="Assumed read bandwidth in bytes per second.")
    io_bound_tokens_per_s: float | None = Field(description="read_bandwidth / streamed bytes per token; null "
                                                "when nothing streams (not I/O bound).")


class RPCDevicePlan(_Model):
    """One device that layers go to (an RPC worker's, or one of this host's GPUs) and the layers placed on it."""

    endpoint: str = Field(description="The worker, HOST:PORT; `local` for this host's GPUs.")
    device: int = Field(description="The device's index on its worker (this host's GPUs: in the library's device "
                        "list).")
    name: str = Field(default="", description="The backend's name for this host's GPU (Vulkan0, CUDA0); empty for a "
                      "worker's device.")
    free_bytes: int = Field(description="Memory the device announced as free when planned.")
    total_bytes: int = Field(description="Memory the device announced in total.")
    budget_bytes: int | None = Field(default=None, description="This host's GPU: the device budget the plan kept "
                                     "within (--gpu-budget, or free memory minus a margin); null for a worker's "
                                     "device (its announced free memory is the limit).")
    first_layer: int = Field(description="First layer placed here; its layers are first_layer .. first_layer + "
                             "n_layers - 1.")
    n_layers: int = Field(description="Layers placed here.")
    output: bool = Field(description="Whether the output layer (output norm and matrix) is placed here.")
    weight_bytes: int = Field(description="Weights placed here (the output layer's included).")
    kv_cache_bytes: int = Field(description="KV cache of its layers.")
    kv_source: Literal["measured", "estimated"] = Field(
        default="estimated", description="measured = llama.cpp sized each layer's KV cache for this model and these "
        "settings (no_alloc; sliding-window layers hold fewer cells); estimated = f16 for the whole context.")
    compute_bytes: int = Field(description="Compute buffers reserved for it.")
    compute_source: Literal["measured", "estimated"] = Field(
        default="estimated", description="measured = llama.cpp sized the device's compute buffer for this model and "
        "these settings (no_alloc); estimated = the planner's upper estimate.")
    used_bytes: int = Field(description="weights + KV cache + compute: never above the budget (or free_bytes).")


class RPCPlan(_Model):
    """Where the layers of a model split across RPC workers go: what llama.cpp is told, and per device."""

    devices: list[RPCDevicePlan] = Field(description="Devices that get layers, in llama.cpp's device order.")
    local_layers: int = Field(description="Layers 0 .. local_layers - 1 stay on this host.")
    remote_layers: int = Field(description="Layers on the workers (the model's last ones).")
    n_gpu_layers: int = Field(description="llama.cpp's n_gpu_layers: remote layers + the output layer.")
    tensor_split: list[float] = Field(description="llama.cpp's tensor_split: layers per device in device order (the "
                                      "last device's count includes the output layer).")
    requested_layers: int | None = Field(description="rpc.layers as given; null = as many as fit.")
    remote_weight_bytes: int = Field(description="Weights placed on the workers.")
    local_model_bytes: int = Field(description="Weights that stay on this host (planned under the budget).")
    experts_here: bool = Field(default=False, description="Every layer's routed experts stay on this host, in slot "
                               "banks; the workers get the rest of their layers (llama.cpp's --cpu-moe shape).")
    experts_on_gpu_from: int | None = Field(
        default=None, description="-ngl auto with room left on this host's GPUs after every layer's dense part: the "
        "routed experts of this layer and the ones after it went to the GPU with their layers; the layers before it "
        "keep theirs in host banks. null = every layer's routed experts stay here (with experts_here).")
    routers_here: bool = Field(default=False, description="Every layer's router stays on this host too "
                               "(router-lookahead prefetch applies it here).")
    load_staging_bytes: int = Field(default=0, description="The largest tensor sent to a device while loading "
                                    "(llama.cpp stages each whole in host memory first).")
    cpu_tensors: list[str] = Field(default_factory=list, description="Patterns of tensors llama.cpp keeps in the "
                                   "CPU buffer type whatever their layer's device (tensor_buft_overrides).")


class Plan(_Model):
    """A budget turned into placements: what stays resident, what streams, the banks and reservations."""

    schema_version: int = Field(default=SCHEMA_VERSION, description="Bumped on incompatible changes.")
    files: list[str] = Field(description="Model files, in TensorDecision.file order.")
    arch: str = Field(description="general.architecture.")
    kind: Literal["dense", "moe"] = Field(description="dense or moe.")
    n_layer: int = Field(description="Repeating blocks.")
    budget_bytes: int = Field(description="The RAM budget planned for.")
    minimum_budget_bytes: int = Field(description="The smallest budget this model and settings can run in.")
    ctx: int = Field(description="Context length the KV cache is reserved for.")
    ubatch: int = Field(description="Micro-batch the compute buffers are sized for.")
    fits_entirely: bool = Field(description="Every weight is resident (nothing streams, no bank misses).")
    layer_quota_bytes: int | None = Field(description="Per-layer quota for dense weights (the water level); null "
                                          "when every dense weight is resident.")
    model_bytes: int = Field(description="All tensor data of the model.")
    resident_bytes: int = Field(description="Weights held in RAM: resident tensors plus slot banks.")
    reserved_bytes: int = Field(description="KV cache + compute + prefetch buffers.")
    used_bytes: int = Field(description="resident_bytes + reserved_bytes; never above budget_bytes.")
    reservations: Reservations
    prefetch: PrefetchPlan
    moe: MoEPlan | None = Field(description="null for dense models.")
    estimates: Estimates
    layers: list[LayerPlan]
    tensors: list[TensorDecision]
    warnings: list[str] = Field(default_factory=list, description="Things the user should know.")
    draft: DraftPlan | None = Field(default=None, description="Speculative decoding's reservation; null without "
                                    "drafting.")
    rpc: RPCPlan | None = Field(default=None, description="Layers placed on RPC workers; null = this host runs every "
                                "layer. With it, the rest of the plan (layers, tensors, reservations) is this host's "
                                "part: layers 0 .. rpc.local_layers - 1 and the input embedding.")


# --------------------------------------------------------------------------------------------------
# Per-layer preservation: a step function of the quota


