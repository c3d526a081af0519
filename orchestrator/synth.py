"""Synthetic random-weight GGUF models that the pinned llama.cpp loads and runs.

Tests and benchmarks need models of a known shape, from a few MB to many GB, without downloading anything.
A SynthSpec describes one (architecture, sizes, quant type, alignment, seed); `write_synth_model` streams it
to disk tensor by tensor and chunk by chunk, so even a 7B-shaped file never sits in memory.

Weights are random but scaled so activations stay O(1) through every layer (fan-in scaling after each RMS
norm): logits are finite and differ from position to position, which is all the exactness tests need.
Quantized tensors are written as ready-made blocks (an f16 scale plus random quants) instead of quantizing
floats, which keeps generation at disk speed. Every tensor gets its own random stream keyed by the seed and
the tensor's name, so a model's bytes depend only on its spec.

The vocabulary is a small SentencePiece-style ("llama") one: control tokens, the 256 byte-fallback tokens,
printable ASCII, and merges learned from a short built-in text, padded with filler pieces up to `n_vocab`.
"""

from __future__ import annotations

import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    TokenType,
    WriterState,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.errors import FlashflexError
from orchestrator.fsutil import atomic_file

ArchName = Literal["llama", "qwen3moe", "qwen2moe", "deepseek"]
QuantName = Literal["f16", "q8_0", "q4_0"]

ProgressCallback = Callable[[int, int], None]  # (bytes written so far, total bytes)

_QTYPE: dict[str, GGMLQuantizationType] = {
    "f16": GGMLQuantizationType.F16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
}
_FILE_TYPE: dict[str, LlamaFileType] = {
    "f16": LlamaFileType.MOSTLY_F16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
    "q4_0": LlamaFileType.MOSTLY_Q4_0,
}

# Generation works in chunks of this many bytes of output per tensor, bounding memory on any model size.
CHUNK_BYTES = 16 << 20


class SynthSpec(BaseModel):
    """The shape of a synthetic model. Presets are in PRESETS; any field can be overridden."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("synthetic", description="general.name written into the file")
    arch: ArchName = Field(description="llama.cpp architecture: dense llama, or MoE qwen3moe/qwen2moe/deepseek")
    n_layer: int = Field(gt=0, le=512, description="number of transformer blocks")
    n_embd: int = Field(gt=0, description="hidden size")
    n_head: int = Field(gt=0, description="attention (query) heads")
    n_head_kv: int = Field(gt=0, description="key/value heads (GQA when fewer than n_head)")
    head_dim: int | None = Field(None, gt=0, description="per-head size; default n_embd // n_head")
    n_ff: int = Field(0, ge=0, description="dense FFN width (llama layers; deepseek leading dense layers)")
    n_expert: int = Field(0, ge=0, le=1024, description="routed experts per MoE layer (llama.cpp allows 1024)")
    n_expert_used: int = Field(0, ge=0, description="experts picked per token (top-k)")
    expert_ffn: int = Field(0, ge=0, description="FFN width of one routed expert")
    n_shared_expert: int = Field(0, ge=0, description="deepseek: shared experts (each expert_ffn wide)")
    shared_expert_ffn: int = Field(0, ge=0, description="qwen2moe: width of the one shared expert")
    n_leading_dense: int = Field(0, ge=0, description="deepseek: leading layers with a dense FFN instead of MoE")
    n_vocab: int = Field(512, ge=1, le=1 << 20,
                         description="vocabulary size (filler pieces pad the built-in vocabulary; at most 1Mi)")
    n_ctx_train: int = Field(4096, gt=0, description="context length written to the metadata")
    quant: QuantName = Field("q4_0", description="type of every matrix; norms and routers stay F32")
    alignment: int = Field(4096, gt=0, description="general.alignment; 4096 lets O_DIRECT read tensors")
    seed: int = Field(0, ge=0, description="random seed; same spec and seed give the same bytes")
    tie_embeddings: bool = Field(False, description="omit output.weight (llama.cpp reuses token_embd)")
    rope_freq_base: float = Field(10000.0, gt=0)
    rms_eps: float = Field(1e-6, gt=0)

    @property
    def head_size(self) -> int:
        """Derived: head_dim, or n_embd // n_head when unset."""
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def is_moe(self) -> bool:
        return self.arch != "llama"

    def moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer >= self.n_leading_dense

    @model_validator(mode="after")
    def _consistent(self) -> SynthSpec:
        problems = _spec_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def with_overrides(self, **overrides: object) -> SynthSpec:
        """A copy with some fields changed (None values are ignored), validated again."""
        data = self.model_dump()
        data.update({k: v for k, v in overrides.items() if v is not None})
        return make_spec(data)


def _spec_problems(s: SynthSpec) -> list[str]:
    problems = []
    if s.alignment & (s.alignment - 1):
        problems.append(f"alignment {s.alignment} is not a power of two")
    if s.n_head % s.n_head_kv:
        problems.append(f"n_head {s.n_head} is not a multiple of n_head_kv {s.n_head_kv}")
    if s.head_size % 2 or s.head_size == 0:
        problems.append(f"head_dim {s.head_size} must be even and non-zero (RoPE rotates pairs)")
    if s.arch in ("qwen2moe", "deepseek") and s.head_size * s.n_head != s.n_embd:
        problems.append(f"{s.arch} needs head_dim * n_head == n_embd")
    if s.n_vocab < min_vocab_size():
        problems.append(f"n_vocab {s.n_vocab} is below the built-in vocabulary's {min_vocab_size()} tokens")
    if s.arch == "llama":
        if s.n_expert or s.n_expert_used or s.expert_ffn:
            problems.append("llama presets here are dense: set n_expert/n_expert_used/expert_ffn to 0")
        if not s.n_ff:
            problems.append("llama needs n_ff > 0")
    else:
        if not (0 < s.n_expert_used <= s.n_expert):
            problems.append(f"{s.arch} needs 0 < n_expert_used <= n_expert (got {s.n_expert_used} of {s.n_expert})")
        if not s.expert_ffn:
            problems.append(f"{s.arch} needs expert_ffn > 0")
    if s.arch == "qwen2moe" and not s.shared_expert_ffn:
        problems.append("qwen2moe needs shared_expert_ffn > 0 (it always has one shared expert)")
    if s.arch != "qwen2moe" and s.shared_expert_ffn:
        problems.append("shared_expert_ffn applies to qwen2moe only (deepseek uses n_shared_expert)")
    if s.arch == "deepseek":
        if not s.n_shared_expert:
            problems.append("deepseek needs n_shared_expert >= 1")
        if s.n_leading_dense >= s.n_layer:
            problems.append("n_leading_dense must leave at least one MoE layer")
        if s.n_leading_dense and not s.n_ff:
            problems.append("leading dense layers need n_ff > 0")
    else:
        if s.n_leading_dense:
            problems.append("n_leading_dense applies to deepseek only")
        if s.n_shared_expert and not (s.arch == "qwen2moe" and s.n_shared_expert == 1):
            problems.append("n_shared_expert applies to deepseek (qwen2moe always has exactly one)")
    if s.arch == "qwen2moe" and s.tie_embeddings:
        problems.append("qwen2moe always has its own output.weight: tie_embeddings must be false")
    if s.quant != "f16":
        block = GGML_QUANT_SIZES[_QTYPE[s.quant]][0]
        rows = {"n_embd": s.n_embd, "n_head*head_dim": s.n_head * s.head_size, "n_ff": s.n_ff,
                "expert_ffn": s.expert_ffn, "shared expert width": _shared_width(s)}
        bad = [f"{k}={v}" for k, v in rows.items() if v % block]
        if bad:
            problems.append(f"{s.quant} packs rows in blocks of {block}: {', '.join(bad)} not a multiple")
    return problems


def _shared_width(s: SynthSpec) -> int:
    if s.arch == "qwen2moe":
        return s.shared_expert_ffn
    if s.arch == "deepseek":
        return s.n_shared_expert * s.expert_ffn
    return 0


def make_spec(data: dict) -> SynthSpec:
    """Validate a dict into a SynthSpec; errors become one FlashflexError line."""
    try:
        return SynthSpec.model_validate(data)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
        raise FlashflexError(f"invalid synthetic model spec: {'; '.join(parts)}",
                             "fix the listed fields (see `flashflex gguf synth --help`)") from None


PRESETS: dict[str, dict] = {
    # A few MB: fast enough to generate in every test.
    "tiny-dense": dict(name="tiny-dense", arch="llama", n_layer=4, n_embd=256, n_head=8, n_head_kv=2,
                       n_ff=768, quant="q8_0"),
    "tiny-qwen3moe": dict(name="tiny-qwen3moe", arch="qwen3moe", n_layer=3, n_embd=256, n_head=8, n_head_kv=2,
                          head_dim=64, n_expert=16, n_expert_used=4, expert_ffn=128, quant="q8_0"),
    "tiny-qwen2moe": dict(name="tiny-qwen2moe", arch="qwen2moe", n_layer=3, n_embd=256, n_head=8, n_head_kv=2,
                          n_expert=8, n_expert_used=2, expert_ffn=128, shared_expert_ffn=256, quant="q8_0"),
    "tiny-deepseek": dict(name="tiny-deepseek", arch="deepseek", n_layer=3, n_embd=256, n_head=8, n_head_kv=8,
                          n_ff=512, n_expert=8, n_expert_used=2, expert_ffn=128, n_shared_expert=2,
                          n_leading_dense=1, quant="q8_0"),
    # Benchmark shapes.
    "dense-7b-q4_0": dict(name="dense-7b-shaped", arch="llama", n_layer=32, n_embd=4096, n_head=32,
                          n_head_kv=32, n_ff=11008, n_vocab=32000, quant="q4_0", rms_eps=1e-5),
    # wide layers (a 13B-class layer shape, fewer of them): the shape #15's benchmark found the ring wasting budget on
    "dense-wide-16l-q4_0": dict(name="dense-wide-16l", arch="llama", n_layer=16, n_embd=5120, n_head=40,
                                n_head_kv=8, n_ff=13824, n_vocab=32000, quant="q4_0", rms_eps=1e-5),
    # wider still (a 20B-class layer, 12 of them): the shape #27 measured 1.13x the streaming floor on
    "dense-wide-12l-6144-q4_0": dict(name="dense-wide-12l-6144", arch="llama", n_layer=12, n_embd=6144, n_head=48,
                                     n_head_kv=8, n_ff=16384, n_vocab=32000, quant="q4_0", rms_eps=1e-5),
    "moe-a3b-12l-q4_0": dict(name="qwen3-30b-a3b-shaped-12l", arch="qwen3moe", n_layer=12, n_embd=2048,
                             n_head=32, n_head_kv=4, head_dim=128, n_expert=128, n_expert_used=8,
                             expert_ffn=768, n_vocab=151936, n_ctx_train=40960, quant="q4_0",
                             rope_freq_base=1000000.0),
    # Fewer, wider experts and top-4 routing (64 experts, 16 layers, ~3.9 GiB): a layer misses at most 4 experts a
    # token, so small banks have few reads in flight (issue 27's small-bank case)
    "moe-64x4-16l-q4_0": dict(name="moe-64x4-shaped-16l", arch="qwen3moe", n_layer=16, n_embd=2048, n_head=32,
                              n_head_kv=4, head_dim=128, n_expert=64, n_expert_used=4, expert_ffn=1024,
                              n_vocab=151936, n_ctx_train=40960, quant="q4_0", rope_freq_base=1000000.0),
    # Draft models for speculative decoding on the benchmark shapes: small dense llama models with the target's
    # n_vocab (the vocabulary is made from n_vocab alone, so speculative.check_vocab accepts them), resident
    # when drafting. Random weights: what they draft is not what the target picks; they are for the mechanics.
    "draft-for-7b": dict(name="draft-for-7b", arch="llama", n_layer=2, n_embd=512, n_head=8, n_head_kv=8,
                         n_ff=1536, n_vocab=32000, quant="q8_0", rms_eps=1e-5),
    "draft-for-a3b": dict(name="draft-for-a3b", arch="llama", n_layer=2, n_embd=256, n_head=4, n_head_kv=4,
                          n_ff=768, n_vocab=151936, n_ctx_train=40960, quant="q8_0", tie_embeddings=True),
    "tiny-draft": dict(name="tiny-draft", arch="llama", n_layer=1, n_embd=128, n_head=4, n_head_kv=4, n_ff=256,
                       quant="q8_0"),  # the tiny presets' vocabulary: a draft for smoke tests
}


def cached_preset(name: str, log=print) -> Path:
    """The preset's model (seed 0) in the cache, generated there once (benchmarks; deterministic by seed)."""
    from orchestrator.paths import cache_root

    path = cache_root() / "models" / "synth" / f"{name}-seed0.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"generating the synthetic model {name} (once) at {path}")
        write_synth_model(preset(name), path)
    return path


def preset(preset_name: str, /, **overrides: object) -> SynthSpec:
    """A preset spec, optionally with fields overridden (`name` among them: positional-only above)."""
    if preset_name not in PRESETS:
        raise FlashflexError(f"unknown synthetic model preset {preset_name!r}",
                             f"use one of: {', '.join(PRESETS)}")
    return make_spec(PRESETS[preset_name]).with_overrides(**overrides)


# --------------------------------------------------------------------------------------------------
# Vocabulary

_CORPUS = """
the model reads its weights from the disk when they are needed and keeps the rest in memory so that a
large network can run on a small machine . each layer has attention and a feed forward part ; in a mixture
of experts only a few experts are used for every token , and the router picks them . we test that the
output is the same with and without streaming , token by token , for the first and the last position .
when the budget is small the planner moves more tensors to the stream and the prefetch threads read them
ahead of time . there is one file for the model and one for the experts , and both are aligned to pages .
hello world ! this is a small test of the tokenizer with some numbers 0 1 2 3 4 5 6 7 8 9 10 100 2024 .
"""

SPACE = "\u2581"  # SentencePiece's visible space


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 0


_CONTROL_TOKENS = (("<unk>", 0.0, TokenType.UNKNOWN), ("<s>", 0.0, TokenType.CONTROL), ("</s>", 0.0, TokenType.CONTROL))


def _single_chars() -> list[str]:
    return [SPACE] + [chr(c) for c in range(33, 127)]


@lru_cache(maxsize=1)
def _base_vocab() -> tuple[tuple[str, float, int], ...]:
    """Control tokens, byte fallbacks, single characters and learned merges, best merge first."""
    entries: list[tuple[str, float, int]] = list(_CONTROL_TOKENS)
    entries += [(f"<0x{b:02X}>", 0.0, TokenType.BYTE) for b in range(256)]
    entries += [(c, -1000.0, TokenType.NORMAL) for c in _single_chars()]
    known = {e[0] for e in entries}
    # Learn merges the way BPE does: repeatedly join the most frequent adjacent pair inside words.
    words = Counter(SPACE + w for w in _CORPUS.split())
    splits = {w: list(w) for w in words}
    score = 0.0
    for _ in range(400):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            parts = splits[word]
            for a, b in zip(parts, parts[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        (a, b), _count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merged = a + b
        for word in words:
            parts, out, i = splits[word], [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[word] = out
        if merged not in known:
            score -= 1.0
            entries.append((merged, score, TokenType.NORMAL))
            known.add(merged)
    return tuple(entries)


def min_vocab_size() -> int:
    """Control + byte + single-character tokens: the smallest vocabulary that tokenizes any text."""
    return len(_CONTROL_TOKENS) + 256 + len(_single_chars())


def build_vocab(n_vocab: int) -> Vocab:
    """A SentencePiece-style vocabulary of exactly n_vocab tokens."""
    base = list(_base_vocab())[:n_vocab]
    known = {t for t, _s, _ty in base}
    filler: list[tuple[str, float, TokenType]] = []
    i = 0
    while len(base) + len(filler) < n_vocab:
        piece = f"{SPACE}tok{i}"
        i += 1
        if piece not in known:
            filler.append((piece, -10000.0 - i, TokenType.NORMAL))
    entries = base + filler
    return Vocab(tokens=[e[0] for e in entries], scores=[e[1] for e in entries], types=[int(e[2]) for e in entries])


# --------------------------------------------------------------------------------------------------
# Tensor plan


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] (the row length) first
    qtype: GGMLQuantizationType
    std: float  # 0 means "all ones" (normalisation weights)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def n_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return self.n_elements // block * size


def _tname(kind: MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    base = TENSOR_NAMES[kind]
    return (base.format(bid=layer) if layer is not None else base) + "." + suffix


def plan_tensors(s: SynthSpec) -> list[PlannedTensor]:
    """Every tensor of the model in file order, with shape, type and init scale."""
    q = _QTYPE[s.quant]
    f32 = GGMLQuantizationType.F32
    T = MODEL_TENSOR
    embd, hd = s.n_embd, s.head_size
    q_dim, kv_dim = s.n_head * hd, s.n_head_kv * hd
    fan = 1.0 / np.sqrt(embd)

    out = [PlannedTensor(_tname(T.TOKEN_EMBD), (embd, s.n_vocab), q, 1.0)]
    for i in range(s.n_layer):
        out += [
            PlannedTensor(_tname(T.ATTN_NORM, i), (embd,), f32, 0.0),
            PlannedTensor(_tname(T.ATTN_Q, i), (embd, q_dim), q, fan),
            PlannedTensor(_tname(T.ATTN_K, i), (embd, kv_dim), q, fan),
            PlannedTensor(_tname(T.ATTN_V, i), (embd, kv_dim), q, fan),
            PlannedTensor(_tname(T.ATTN_OUT, i), (q_dim, embd), q, 1.0 / np.sqrt(q_dim)),
        ]
        if s.arch == "qwen3moe":
            out += [
                PlannedTensor(_tname(T.ATTN_Q_NORM, i), (hd,), f32, 0.0),
                PlannedTensor(_tname(T.ATTN_K_NORM, i), (hd,), f32, 0.0),
            ]
        out.append(PlannedTensor(_tname(T.FFN_NORM, i), (embd,), f32, 0.0))
        if not s.moe_layer(i):
            out += [
                PlannedTensor(_tname(T.FFN_GATE, i), (embd, s.n_ff), q, fan),
                PlannedTensor(_tname(T.FFN_UP, i), (embd, s.n_ff), q, fan),
                PlannedTensor(_tname(T.FFN_DOWN, i), (s.n_ff, embd), q, 1.0 / np.sqrt(s.n_ff)),
            ]
            continue
        ne, ef = s.n_expert, s.expert_ffn
        # The router stays F32, as llama.cpp's quantizer leaves it.
        out += [
            PlannedTensor(_tname(T.FFN_GATE_INP, i), (embd, ne), f32, fan),
            PlannedTensor(_tname(T.FFN_GATE_EXP, i), (embd, ef, ne), q, fan),
            PlannedTensor(_tname(T.FFN_UP_EXP, i), (embd, ef, ne), q, fan),
            PlannedTensor(_tname(T.FFN_DOWN_EXP, i), (ef, embd, ne), q, 1.0 / np.sqrt(ef)),
        ]
        width = _shared_width(s)
        if width:
            if s.arch == "qwen2moe":
                out.append(PlannedTensor(_tname(T.FFN_GATE_INP_SHEXP, i), (embd,), f32, fan))
            out += [
                PlannedTensor(_tname(T.FFN_GATE_SHEXP, i), (embd, width), q, fan),
                PlannedTensor(_tname(T.FFN_UP_SHEXP, i), (embd, width), q, fan),
                PlannedTensor(_tname(T.FFN_DOWN_SHEXP, i), (width, embd), q, 1.0 / np.sqrt(width)),
            ]
    out.append(PlannedTensor(_tname(T.OUTPUT_NORM), (embd,), f32, 0.0))
    if not s.tie_embeddings:
        out.append(PlannedTensor(_tname(T.OUTPUT), (embd, s.n_vocab), q, fan))
    return out


def estimate_bytes(s: SynthSpec) -> int:
    """Size of the tensor data (the file adds a small header and alignment padding)."""
    return sum(t.n_bytes for t in plan_tensors(s))


# --------------------------------------------------------------------------------------------------
# Data


# Standard deviation of the quant integers drawn below (uniform bytes, the most negative value moved to 0).
_Q4_STD = float(np.sqrt(sum(v * v for v in range(-7, 8)) / 16))
_Q8_STD = float(np.sqrt(sum(v * v for v in range(-127, 128)) / 256))
_Q4_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
_Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(name.encode())])))


def _block_scales(rng: np.random.Generator, n: int, std: float, q_std: float) -> np.ndarray:
    # A little spread in the scales, as real quantized blocks have.
    return (rng.uniform(0.75, 1.25, n) * (std / q_std)).astype("<f2")


def tensor_chunks(t: PlannedTensor, seed: int) -> Iterator[np.ndarray]:
    """The tensor's bytes, in chunks of at most about CHUNK_BYTES."""
    if t.std == 0.0:
        yield np.ones(t.n_elements, dtype="<f4")
        return
    rng = _rng(seed, t.name)
    if t.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        dtype = "<f4" if t.qtype == GGMLQuantizationType.F32 else "<f2"
        per_chunk = CHUNK_BYTES // np.dtype(dtype).itemsize
        for start in range(0, t.n_elements, per_chunk):
            n = min(per_chunk, t.n_elements - start)
            yield (rng.standard_normal(n, dtype=np.float32) * np.float32(t.std)).astype(dtype)
        return
    block_dtype = _Q4_0_BLOCK if t.qtype == GGMLQuantizationType.Q4_0 else _Q8_0_BLOCK
    n_blocks = t.n_elements // 32
    per_chunk = max(1, CHUNK_BYTES // block_dtype.itemsize)
    for start in range(0, n_blocks, per_chunk):
        n = min(per_chunk, n_blocks - start)
        blocks = np.empty(n, dtype=block_dtype)
        raw = np.frombuffer(rng.bytes(n * block_dtype["qs"].itemsize), dtype=np.uint8).reshape(n, -1).copy()
        if t.qtype == GGMLQuantizationType.Q4_0:
            blocks["d"] = _block_scales(rng, n, t.std, _Q4_STD)
            # A nibble q stands for q - 8; move the lone -8 (q = 0) to 0 so the values are symmetric and
            # no bias creeps into every dot product.
            raw |= ((raw & 0x0F) == 0).view(np.uint8) << 3
            raw |= (raw < 0x10).view(np.uint8) << 7
            blocks["qs"] = raw
        else:
            blocks["d"] = _block_scales(rng, n, t.std, _Q8_STD)
            signed = raw.view(np.int8)
            signed[signed == -128] = 0  # symmetric around 0, as above
            blocks["qs"] = signed
        yield blocks


# --------------------------------------------------------------------------------------------------
# Writing


def _add_metadata(w: GGUFWriter, s: SynthSpec) -> None:
    w.add_name(s.name)
    w.add_file_type(_FILE_TYPE[s.quant])
    w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_custom_alignment(s.alignment)
    w.add_context_length(s.n_ctx_train)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_vocab_size(s.n_vocab)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_key_length(s.head_size)
    w.add_value_length(s.head_size)
    w.add_rope_dimension_count(s.head_size)
    w.add_rope_freq_base(s.rope_freq_base)
    w.add_layer_norm_rms_eps(s.rms_eps)
    if s.n_ff:
        w.add_feed_forward_length(s.n_ff)
    if s.is_moe:
        w.add_expert_count(s.n_expert)
        w.add_expert_used_count(s.n_expert_used)
        w.add_expert_feed_forward_length(s.expert_ffn)
    if s.arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(s.shared_expert_ffn)
    if s.arch == "deepseek":
        w.add_leading_dense_block_count(s.n_leading_dense)
        w.add_expert_shared_count(s.n_shared_expert)
        w.add_expert_weights_scale(1.0)

    vocab = build_vocab(s.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_unk_token_id(vocab.unk_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def write_synth_model(
    spec: SynthSpec, out: os.PathLike[str] | str, progress: ProgressCallback | None = None
) -> Path:
    """Write `spec` as a GGUF file at `out` (atomically: a crash leaves no partial file). Returns the path."""
    out = Path(out)
    tensors = plan_tensors(spec)
    total = sum(t.n_bytes for t in tensors)
    writer = GGUFWriter(path=None, arch=spec.arch)
    _add_metadata(writer, spec)
    for t in tensors:
        # gguf-py takes shapes outermost first (numpy order), the reverse of ggml's
        writer.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.n_bytes, raw_dtype=t.qtype)

    done = 0
    try:
        with atomic_file(out) as fh:
            # GGUFWriter serialises the header, metadata and tensor infos into our temp file; the data
            # we stream ourselves, chunk by chunk, instead of handing it whole arrays.
            writer.fout = [fh]  # type: ignore[list-item]  # gguf-py annotates BufferedWriter; it only writes
            writer.state = WriterState.EMPTY
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tensors:
                _pad_to(fh, spec.alignment)
                written = 0
                for chunk in tensor_chunks(t, spec.seed):
                    data = np.ascontiguousarray(chunk).view(np.uint8).data
                    fh.write(data)
                    written += len(data)
                    done += len(data)
                    if progress:
                        progress(done, total)
                if written != t.n_bytes:  # a bug in the generator, never the user's fault
                    raise AssertionError(f"{t.name}: wrote {written} bytes, planned {t.n_bytes}")
            _pad_to(fh, spec.alignment)
    except OSError as exc:
        raise FlashflexError(f"cannot write {out}: {exc.strerror or exc}",
                             f"check free space ({total / 2**30:.2f} GiB needed) and permissions") from exc
    finally:
        writer.fout = None  # the file belongs to atomic_file; keep GGUFWriter from touching it again
    return out


def _pad_to(fh: BinaryIO, alignment: int) -> None:
    pad = -fh.tell() % alignment
    if pad:
        fh.write(b"\0" * pad)
