"""The strict GGUF layout check every command shares: llama.cpp's own rules, and the data accounting it skips.

A fast walk over the header (no numpy, no metadata objects: the 262k-token vocabulary of Gemma is skipped in a
fraction of a second), then, per tensor, the rules llama.cpp's gguf loader applies:

- a known tensor type, 1..4 dimensions, each at least 1, a row length that is a multiple of the type's block;
- names unique and at most 63 bytes;
- offsets exactly where llama.cpp expects them: tensor i starts where tensor i-1 ends, padded to the file's
  alignment (so no tensor overlaps another or sits out of place);
- the file holds every declared byte (not truncated)

and one llama.cpp does not: the data section ends with the last declared tensor (plus at most its padding).
Bytes beyond it mean the header declares fewer tensors than the file carries: a header whose tensor count was
lowered makes llama.cpp silently drop a tensor (and fall back to another, e.g. the tied embedding for the
output), so flashflex refuses it.

Every problem is one FlashflexError naming the file, the tensor and the rule.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from orchestrator.errors import FlashflexError

_REGENERATE = "re-download or re-convert the model, or make a test model with `flashflex gguf synth`"
GGUF_MAGIC = b"GGUF"
GGML_MAX_NAME = 64
GGML_MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32

# GGUF value types → fixed size in bytes (strings and arrays are variable).
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorLayout:
    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int  # absolute, in the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFLayout:
    path: Path
    version: int
    alignment: int
    data_offset: int
    tensors: tuple[TensorLayout, ...]
    file_size: int


class _Corrupt(Exception):
    pass


class _Cursor:
    def __init__(self, buf, size: int):
        self.buf = buf
        self.size = size
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise _Corrupt(f"truncated or corrupt: the header runs past the end of the file while reading {what} "
                           f"(byte {self.pos:,} + {n:,} > {self.size:,})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        n = self.u64(f"the length of {what}")
        return self.take(n, what)

    def skip_value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _FIXED:
            self.take(_FIXED[vtype], what)
        elif vtype == _STRING:
            self.string(what)
        elif vtype == _ARRAY:
            if depth > 4:
                raise _Corrupt(f"corrupt: {what}: arrays nested more than 4 deep")
            sub = self.u32(f"the element type of {what}")
            count = self.u64(f"the length of {what}")
            if sub in _FIXED:
                self.take(_FIXED[sub] * count, what)
            else:
                for _ in range(count):
                    self.skip_value(sub, what, depth + 1)
        else:
            raise _Corrupt(f"corrupt: {what} has an unknown value type {vtype}")


def _type_size(ggml_type: int, name: str) -> tuple[int, int]:
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise _Corrupt(f"corrupt: tensor {name} has an unknown type {ggml_type} (a corrupt header, or a type "
                       "newer than this gguf package)") from None


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def read_layout(path: Path) -> GGUFLayout:
    """The checked layout of one GGUF file, or FlashflexError naming the first rule it breaks."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            if size == 0:
                raise _Corrupt("not a GGUF file: the file is empty")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _walk(path, _Cursor(buf, size))
    except _Corrupt as exc:
        raise FlashflexError(f"{path} is {exc}", _REGENERATE) from None


def _walk(path: Path, cur: _Cursor) -> GGUFLayout:
    if cur.take(4, "the magic") != GGUF_MAGIC:
        raise _Corrupt("not a GGUF file: it does not start with the magic 'GGUF'")
    version = cur.u32("the version")
    if version not in (2, 3):
        raise _Corrupt(f"an unsupported GGUF version {version} (llama.cpp reads 2 and 3)")
    n_tensors = cur.u64("the tensor count")
    n_kv = cur.u64("the key count")
    # every tensor info takes at least 8 + 1 + 4 + 8 + 4 + 8 bytes, every KV at least 8 + 1 + 4 + 1
    if n_tensors * 33 > cur.size or n_kv * 14 > cur.size:
        raise _Corrupt(f"truncated or corrupt: it declares {n_tensors:,} tensors and {n_kv:,} keys, more than "
                       f"{cur.size:,} bytes can hold")
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = cur.string(f"key {i}").decode("utf-8", "replace")
        vtype = cur.u32(f"the type of {key}")
        if key == "general.alignment":
            if vtype != 4:
                raise _Corrupt("corrupt: general.alignment is not a uint32")
            alignment = cur.u32("general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise _Corrupt(f"corrupt: general.alignment {alignment} is not a power of two")
        else:
            cur.skip_value(vtype, key)
    infos = []
    seen: set[str] = set()
    for i in range(n_tensors):
        raw = cur.string(f"the name of tensor {i}")
        name = raw.decode("utf-8", "replace")
        if len(raw) >= GGML_MAX_NAME:
            raise _Corrupt(f"corrupt: tensor {i} has a name of {len(raw)} bytes (llama.cpp allows {GGML_MAX_NAME - 1})")
        if name in seen:
            raise _Corrupt(f"corrupt: tensor {name} is declared twice")
        seen.add(name)
        n_dims = cur.u32(f"the dimensions of {name}")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise _Corrupt(f"corrupt: tensor {name} has {n_dims} dimensions (1..{GGML_MAX_DIMS} allowed)")
        shape = tuple(cur.u64(f"the shape of {name}") for _ in range(n_dims))
        if any(d < 1 or d >= 1 << 62 for d in shape):
            raise _Corrupt(f"corrupt: tensor {name} has shape {list(shape)}")
        ggml_type = cur.u32(f"the type of {name}")
        rel = cur.u64(f"the offset of {name}")
        infos.append((name, ggml_type, shape, rel))
    data_offset = _pad(cur.pos, alignment)
    expected = 0
    tensors = []
    for name, ggml_type, shape, rel in infos:
        block, type_size = _type_size(ggml_type, name)
        if shape[0] % block:
            raise _Corrupt(f"corrupt: tensor {name}: row length {shape[0]} is not a multiple of its type's block "
                           f"of {block}")
        elements = 1
        for d in shape:
            elements *= d
        n_bytes = elements // block * type_size
        if rel != expected:
            how = "overlaps the tensor before it" if rel < expected else "leaves a gap after the tensor before it"
            raise _Corrupt(f"corrupt: tensor {name} has data offset {rel:,}, expected {expected:,} (it {how})")
        tensors.append(TensorLayout(name, ggml_type, shape, data_offset + rel, n_bytes))
        expected = rel + _pad(n_bytes, alignment)
    end = data_offset + expected
    last_end = tensors[-1].offset + tensors[-1].n_bytes if tensors else data_offset
    if cur.size < last_end:
        last = tensors[-1]
        raise _Corrupt(f"truncated: tensor {last.name} data ends at byte {last_end:,} but the file has "
                       f"{cur.size:,} bytes")
    if cur.size > max(end, last_end):
        raise _Corrupt(f"corrupt: the file has {cur.size - max(end, last_end):,} bytes after the last declared tensor "
                       f"({len(tensors)} declared): the header's tensor count or a tensor's shape was changed")
    return GGUFLayout(path, version, alignment, data_offset, tuple(tensors), cur.size)
