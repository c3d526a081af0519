"""Read GGUF files into a ModelTable: every tensor located on disk, classified by role, without reading data.

Built on gguf-py's GGUFReader, which memory-maps the file and parses only the header; tensor data is never
touched here. Tensor names are classified through the templates in `gguf.constants.TENSOR_NAMES`, and
metadata keys come from `gguf.Keys`, so a gguf-py upgrade that renames something shows up as a diff there,
not as a silently misclassified tensor.

Multi-shard models (`name-00001-of-00003.gguf`, as written by llama.cpp's gguf-split) are read as one table:
pass any shard and the others are found beside it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUF_MAGIC, MODEL_TENSOR, TENSOR_NAMES, GGUFReader, GGUFValueType, Keys

from orchestrator.errors import FlashflexError
from orchestrator.modelfile.table import ArchInfo, ModelTable, Role, TensorInfo

# Arrays longer than this (the vocabulary, merges, scores) are summarised in ModelTable.metadata.
MAX_INLINE_ARRAY = 16

_SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
_SHARD_FORMAT = "{prefix}-{index:05d}-of-{count:05d}.gguf"  # llama.cpp's gguf-split naming

_REGENERATE = "re-download or re-convert the model, or make a test model with `flashflex gguf synth`"


# --------------------------------------------------------------------------------------------------
# Tensor roles


def _members(*names: str) -> list[MODEL_TENSOR]:
    """MODEL_TENSOR members by enum name, skipping ones this gguf-py version does not have."""
    return [getattr(MODEL_TENSOR, n) for n in names if hasattr(MODEL_TENSOR, n)]


_ROLE_OF_KIND: dict[MODEL_TENSOR, Role] = {}
for _role, _names in (
    (Role.TOKEN_EMBD, ("TOKEN_EMBD",)),
    (Role.OUTPUT, ("OUTPUT",)),
    (Role.ATTN_Q, ("ATTN_Q", "ATTN_Q_A", "ATTN_Q_B")),
    (Role.ATTN_K, ("ATTN_K", "ATTN_K_B")),
    (Role.ATTN_V, ("ATTN_V", "ATTN_V_B")),
    (Role.ATTN_QKV, ("ATTN_QKV", "ATTN_KV_A_MQA", "ATTN_KV_B")),
    (Role.ATTN_O, ("ATTN_OUT",)),
    (Role.FFN_DENSE, ("FFN_GATE", "FFN_UP", "FFN_DOWN")),
    (Role.EXPERT_ROUTED, ("FFN_GATE_EXP", "FFN_UP_EXP", "FFN_DOWN_EXP", "FFN_GATE_UP_EXP")),
    (Role.EXPERT_SHARED, ("FFN_GATE_SHEXP", "FFN_UP_SHEXP", "FFN_DOWN_SHEXP")),
    (Role.ROUTER, ("FFN_GATE_INP", "FFN_GATE_INP_SHEXP", "FFN_EXP_PROBS_B")),
):
    for _kind in _members(*_names):
        _ROLE_OF_KIND[_kind] = _role


def _role_of_kind(kind: MODEL_TENSOR) -> Role:
    role = _ROLE_OF_KIND.get(kind)
    if role is not None:
        return role
    if "NORM" in kind.name:  # every normalisation weight, whatever block it sits in
        return Role.NORM
    return Role.OTHER


_LAYER_INDEX_RE = re.compile(r"\.(\d+)(?=\.|$)")


@lru_cache(maxsize=1)
def _kind_by_template() -> dict[str, MODEL_TENSOR]:
    """Tensor base name (with `{bid}` left in for per-layer tensors) -> tensor kind; first template wins."""
    table: dict[str, MODEL_TENSOR] = {}
    for kind, template in TENSOR_NAMES.items():
        table.setdefault(template, kind)
    return table


def classify_tensor(name: str) -> tuple[int | None, Role]:
    """(layer index or None, role) of a GGUF tensor name such as `blk.3.ffn_up_exps.weight`."""
    templates = _kind_by_template()
    match = _LAYER_INDEX_RE.search(name)
    layer = int(match.group(1)) if match else None
    generic = _LAYER_INDEX_RE.sub(".{bid}", name, count=1) if match else name
    # Names end in a suffix (`.weight`, `.bias`, `.scale`, ...); templates do not.
    candidates = [generic]
    while "." in candidates[-1]:
        candidates.append(candidates[-1].rsplit(".", 1)[0])
    for candidate in candidates:
        kind = templates.get(candidate)
        if kind is not None:
            in_block = "{bid}" in candidate
            return (layer if in_block else None), _role_of_kind(kind)
    return layer, Role.OTHER


# --------------------------------------------------------------------------------------------------
# Shards


def shard_paths(path: Path) -> list[Path]:
    """All shards of the model `path` belongs to, in order; [path] for a single-file model."""
    match = _SHARD_RE.match(path.name)
    if not match:
        return [path]
    prefix, count = match.group("prefix"), int(match.group("count"))
    if count < 1:
        raise FlashflexError(f"{path.name}: shard name says the model has {count} shards",
                             "rename the file to NAME-00001-of-0000N.gguf as gguf-split writes them")
    paths = [path.with_name(_SHARD_FORMAT.format(prefix=prefix, index=i, count=count)) for i in range(1, count + 1)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        found = count - len(missing)
        names = ", ".join(p.name for p in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise FlashflexError(
            f"model shard {names} is missing ({found} of {count} shards found beside {path.name})",
            f"put all {count} shards in {path.parent}",
        )
    return paths


# --------------------------------------------------------------------------------------------------
# Opening one file


class _DataPastEndOfFile(Exception):
    """The header parsed, but some tensor's data lies beyond the end of the file."""


class _CheckedReader(GGUFReader):
    """GGUFReader whose failure while mapping tensor data is told apart from a broken header, and which
    parses large vocabularies about 3x faster."""

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        # GGUFReader._get, but slicing a plain ndarray view of the same map: numpy's memmap subclass runs
        # Python code on every slice, which dominated parsing a 150k-token vocabulary (8 s -> 2.5 s).
        plain = self.__dict__.get("_plain_map")
        if plain is None:
            plain = self._plain_map = self.data.view(np.ndarray)
        count = int(count)
        arr = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:  # gguf-py internal hook
        try:
            super()._build_tensors(start_offs, fields)
        except (ValueError, IndexError) as exc:
            raise _DataPastEndOfFile(_first_tensor_past_end(self, start_offs, fields)) from exc


def _first_tensor_past_end(reader: GGUFReader, start_offs: int, fields: list[Any]) -> str:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = len(reader.data)
    for field in fields:
        try:
            _name, _n, _nd, dims, raw_type, offset = (field.parts[i] for i in range(6))
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
            end = start_offs + int(offset[0]) + int(np.prod(dims, dtype=np.int64)) * type_size // block
        except Exception:  # the layout of gguf-py internals changed: fall back to the generic message
            return "tensor data runs past the end of the file"
        if end > size:
            return f"tensor {field.name} data ends at byte {end:,} but the file has {size:,} bytes"
    return "tensor data runs past the end of the file"


def open_gguf(path: Path) -> GGUFReader:
    """A GGUFReader for `path`, or a FlashflexError naming what is wrong with the file."""
    from orchestrator.fsutil import require_input_file

    path = require_input_file(Path(path), "model file", "pass the path of a .gguf model file (make a test model "
                                                        "with `flashflex gguf synth`)")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if 0 < len(magic) < 4 and GGUF_MAGIC.to_bytes(4, "little").startswith(magic):
        raise FlashflexError(f"{path} is truncated: it ends after {len(magic)} bytes, inside the GGUF magic",
                             _REGENERATE)
    if len(magic) < 4 or int.from_bytes(magic, "little") != GGUF_MAGIC:
        what = f"it starts with bytes {magic.hex()}, not the magic 'GGUF'" if magic else "the file is empty"
        raise FlashflexError(
            f"{path} is not a GGUF file ({what})",
            "pass a .gguf model file (convert other formats with llama.cpp's convert_hf_to_gguf.py)",
        )
    from orchestrator.modelfile.validate import read_layout

    read_layout(path)  # llama.cpp's layout rules and data accounting, before gguf-py parses anything
    try:
        return _CheckedReader(path, "r")
    except _DataPastEndOfFile as exc:
        raise FlashflexError(f"{path} is truncated: {exc}", _REGENERATE) from exc
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, MemoryError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "version" in detail:
            raise FlashflexError(f"{path}: unsupported GGUF version ({detail})",
                                 "upgrade the gguf package or re-convert the model") from exc
        # numpy's complaints about short views mean the header runs past the end of the file
        ran_out = isinstance(exc, IndexError) or any(w in detail for w in ("dtype", "reshape", "size"))
        reason = f"it ends at byte {size:,}, inside the header" if ran_out else detail
        raise FlashflexError(f"{path} is truncated or corrupt: its GGUF header cannot be parsed ({reason})",
                             _REGENERATE) from exc


# --------------------------------------------------------------------------------------------------
# Metadata


def field_value(field: Any, max_array: int | None = MAX_INLINE_ARRAY) -> Any:
    """A KV field as plain Python; arrays longer than `max_array` become a one-line summary."""
    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        length = len(field.data)
        sub = types[-1].name.lower() if len(types) > 1 else "unknown"
        if max_array is not None and length > max_array:
            return f"<array of {length} {sub}>"
        if len(types) > 2:  # nested arrays: gguf-py flattens them, so only the summary is honest
            return f"<nested array of {length}>"
        return _plain(field.contents())
    return _plain(field.contents())


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_metadata(reader: GGUFReader, max_array: int | None = MAX_INLINE_ARRAY) -> dict[str, Any]:
    """Every KV pair of the file (the GGUF.* header pseudo-fields left out)."""
    return {name: field_value(f, max_array) for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def _scalar(reader: GGUFReader, key: str, default: int = 0) -> int:
    """An integer metadata value; per-layer arrays (e.g. head counts that vary) give their maximum."""
    field = reader.fields.get(key)
    if field is None or not field.types:
        return default
    value = field.contents()
    if isinstance(value, list):
        return int(max(value)) if value else default
    return int(value)


def _string(reader: GGUFReader, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None or not field.types or field.types[0] != GGUFValueType.STRING:
        return None
    return str(field.contents())


def read_arch(reader: GGUFReader, path: Path, tensors: list[TensorInfo] | None = None) -> ArchInfo:
    """ArchInfo from the `{arch}.*` keys; shared-expert figures fall back to the tensor shapes."""
    arch = _string(reader, Keys.General.ARCHITECTURE)
    if not arch:
        raise FlashflexError(f"{path} has no {Keys.General.ARCHITECTURE} key",
                             "the file is not a llama.cpp model; re-convert it with convert_hf_to_gguf.py")

    def key(template: str) -> str:
        return template.format(arch=arch)

    n_embd = _scalar(reader, key(Keys.LLM.EMBEDDING_LENGTH))
    n_head = _scalar(reader, key(Keys.Attention.HEAD_COUNT))
    default_head_dim = n_embd // n_head if n_head else 0
    n_expert = _scalar(reader, key(Keys.LLM.EXPERT_COUNT))
    n_shared = _scalar(reader, key(Keys.LLM.EXPERT_SHARED_COUNT))
    expert_ffn = _scalar(reader, key(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH))
    shared_ffn = _scalar(reader, key(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH))

    shared_up = [t for t in (tensors or []) if t.role is Role.EXPERT_SHARED and len(t.shape) >= 2]
    if shared_up:
        if not n_shared:
            n_shared = 1  # qwen2moe-style models carry one shared expert without saying so
        if not shared_ffn:
            # gate/up are [n_embd, width]; down is [width, n_embd]
            shared_ffn = max(t.shape[1] if t.shape[0] == n_embd else t.shape[0] for t in shared_up)
    elif n_shared and not shared_ffn:
        shared_ffn = n_shared * expert_ffn

    return ArchInfo(
        arch=arch,
        n_layer=_scalar(reader, key(Keys.LLM.BLOCK_COUNT)),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=_scalar(reader, key(Keys.Attention.HEAD_COUNT_KV), n_head),
        n_ctx_train=_scalar(reader, key(Keys.LLM.CONTEXT_LENGTH)),
        head_dim_k=_scalar(reader, key(Keys.Attention.KEY_LENGTH), default_head_dim),
        head_dim_v=_scalar(reader, key(Keys.Attention.VALUE_LENGTH), default_head_dim),
        n_expert=n_expert,
        n_expert_used=_scalar(reader, key(Keys.LLM.EXPERT_USED_COUNT)),
        expert_ffn=expert_ffn,
        n_leading_dense=_scalar(reader, key(Keys.LLM.LEADING_DENSE_BLOCK_COUNT)),
        n_shared_expert=n_shared,
        shared_expert_ffn=shared_ffn,
        n_swa=_scalar(reader, key(Keys.Attention.SLIDING_WINDOW)),
        recurrent=any(name.startswith(tuple(f"{arch}.{group}." for group in ("ssm", "wkv", "shortconv")))
                      for name in reader.fields),
    )


# --------------------------------------------------------------------------------------------------
# The table


def read_tensors(reader: GGUFReader, path: Path) -> list[TensorInfo]:
    """The tensor rows of one file, in file order."""
    alignment = int(reader.alignment)
    size = len(reader.data)
    rows = []
    for t in reader.tensors:
        offset, n_bytes = int(t.data_offset), int(t.n_bytes)
        if offset + n_bytes > size:  # gguf-py maps lazily on some versions; check explicitly
            raise FlashflexError(
                f"{path} is truncated: tensor {t.name} data ends at byte {offset + n_bytes:,} "
                f"but the file has {size:,} bytes", _REGENERATE)
        layer, role = classify_tensor(t.name)
        rows.append(TensorInfo(
            name=t.name,
            layer=layer,
            role=role,
            ggml_type=t.tensor_type.name,
            shape=tuple(int(d) for d in t.shape),
            n_bytes=n_bytes,
            file=path,
            offset=offset,
            alignment=alignment,
        ))
    return rows


def read_model_table(path: os.PathLike[str] | str) -> ModelTable:
    """The tensor table and architecture of a GGUF model (any shard of a split model names the whole), parsed once per
    version of its files (a 262k-token vocabulary's header takes seconds to parse, and planning may try several
    micro-batches or slot counts), a copy of its lists for each caller."""
    path = Path(path).expanduser()
    if not path.exists():
        if path.is_symlink():  # exists() is False for a dangling link and for a loop of links alike
            try:
                path.resolve(strict=True)
            except (OSError, RuntimeError) as exc:
                raise FlashflexError(f"model file {path} is a symbolic link that leads nowhere: "
                                     f"{getattr(exc, 'strerror', None) or exc}", "point it at a GGUF file") from None
        raise FlashflexError(f"model file not found: {path}",
                             "check the path (make a test model with `flashflex gguf synth`)")
    files = [p.resolve() for p in shard_paths(path)]
    versions = tuple((str(f), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for f in files
                     for st in [f.stat()])
    table = _table_of(versions)
    return dataclasses.replace(table, files=list(table.files), tensors=list(table.tensors),
                               metadata=dict(table.metadata))


@lru_cache(maxsize=8)
def _table_of(versions: tuple[tuple[str, int, int, int, int], ...]) -> ModelTable:
    """read_model_table's parse of the files named in `versions` (what a version is: read_model_table's key)."""
    files = [Path(v[0]) for v in versions]
    tensors: list[TensorInfo] = []
    first: GGUFReader | None = None
    for index, file in enumerate(files):
        reader = open_gguf(file)
        if len(files) > 1:
            _check_shard(reader, file, index, len(files))
        if first is None:
            first = reader
        tensors.extend(read_tensors(reader, file))
    assert first is not None
    _check_unique(tensors)
    arch = read_arch(first, files[0], tensors)
    return ModelTable(files=files, arch=arch, tensors=tensors, metadata=read_metadata(first))


def _check_shard(reader: GGUFReader, file: Path, index: int, count: int) -> None:
    said_count = _scalar(reader, Keys.Split.LLM_KV_SPLIT_COUNT, count)
    said_index = _scalar(reader, Keys.Split.LLM_KV_SPLIT_NO, index)
    if said_count != count or said_index != index:
        raise FlashflexError(
            f"{file.name} says it is shard {said_index + 1} of {said_count}, but its name says {index + 1} of {count}",
            "restore the original shard file names written by gguf-split",
        )


def _check_unique(tensors: list[TensorInfo]) -> None:
    seen: dict[str, Path] = {}
    for t in tensors:
        if t.name in seen:
            raise FlashflexError(f"tensor {t.name} appears in both {seen[t.name].name} and {t.file.name}",
                                 "the shards belong to different models; re-split the model")
        seen[t.name] = t.file


def _summary_of(path: Path) -> tuple[int, ArchInfo]:
    """The vocabulary size and architecture of a model file (from read_model_table's parse, once per file version)."""
    table = read_model_table(path)
    return next((int(t.shape[1]) for t in table.tensors if t.role is Role.TOKEN_EMBD), 1 << 31), table.arch


def vocab_size(path: Path) -> int:
    """The model's vocabulary size (its token embedding's rows), cached per file version."""
    return _summary_of(path)[0]


def arch_of(path: Path) -> ArchInfo:
    """The model's architecture metadata, cached per file version."""
    return _summary_of(path)[1]
