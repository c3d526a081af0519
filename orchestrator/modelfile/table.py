"""The tensor table: what every other part of flashflex (planner, sidecar, runtimes) knows about a model.

Pure data. Reading GGUF files into these types lives in orchestrator.modelfile.reader.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Role(str, enum.Enum):
    """What a tensor does in the model; decides how the planner treats it."""

    TOKEN_EMBD = "token_embd"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_QKV = "attn_qkv"
    ATTN_O = "attn_o"
    NORM = "norm"
    FFN_DENSE = "ffn_dense"  # gate/up/down of a dense (non-MoE) FFN
    EXPERT_ROUTED = "expert_routed"  # ffn_{gate,up,down,gate_up}_exps
    EXPERT_SHARED = "expert_shared"  # ffn_{gate,up,down}_shexp
    ROUTER = "router"  # ffn_gate_inp (+ shared-expert gate)
    OUTPUT = "output"
    OTHER = "other"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF model, located on disk without reading its data."""

    name: str
    layer: int | None  # None for tensors outside the repeating blocks (embeddings, output)
    role: Role
    ggml_type: str  # e.g. "Q4_0", "F16"
    shape: tuple[int, ...]  # ggml order: ne[0] first
    n_bytes: int
    file: Path
    offset: int  # absolute byte offset of the data in `file`
    alignment: int  # the file's general.alignment

    @property
    def aligned(self) -> bool:
        return self.offset % self.alignment == 0


@dataclass(frozen=True)
class ArchInfo:
    """Architecture metadata the planner needs."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ctx_train: int
    head_dim_k: int
    head_dim_v: int
    n_expert: int = 0
    n_expert_used: int = 0
    expert_ffn: int = 0
    n_leading_dense: int = 0
    n_shared_expert: int = 0
    shared_expert_ffn: int = 0  # width of the shared-expert FFN (all shared experts together); 0 if none
    n_swa: int = 0  # attention window of sliding-window layers (Gemma 2/3: 4096/512-1024); 0 if none
    recurrent: bool = False  # some layers keep a recurrent state (SSM, RWKV, short convolutions): not rolled back

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0


@dataclass
class ModelTable:
    """A whole model: its files, architecture and every tensor."""

    files: list[Path]
    arch: ArchInfo
    tensors: list[TensorInfo] = field(default_factory=list)
    # GGUF key/value metadata of the first file; long arrays (the vocab) summarised, not copied
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)
