"""Flash-MoE expert sidecars: a model's expert weights copied into page-aligned per-layer files.

The slot-bank runtime reads one expert at a time with O_DIRECT. In a GGUF the experts of a layer sit inside
one 3-D tensor per family (`blk.N.ffn_up_exps.weight` is [n_embd, ffn, n_expert]), at offsets that are
aligned to 32 bytes at best, so a single expert cannot be read without reading around it. A sidecar copies
every expert slice to its own 4096-byte-aligned slot, and records where each one came from, so the runtime can
trust it without reading it all.

Layout of a sidecar directory (the C++ runtime depends on it exactly):

    manifest.json      SidecarManifest: the model's identity, one entry per layer file, one per tensor
    layer-007.bin      page 0: b"FFSIDECAR1\\n" + {"extraction_id":"…","layer":7} + b"\\n", zero-padded to 4096;
                       then each extracted tensor of layer 7 in GGUF order; expert e of a tensor lies at
                       `offset + e * expert_stride` and holds the GGUF bytes
                       [source_offset + e * bytes_per_expert, + bytes_per_expert); padding is zeros

Trust comes in two prices. `check_sidecar` is what a run pays: the manifest parses, the model's fingerprint
(sizes plus a few sampled MiB, never a full read) matches, every tensor still sits where the manifest says,
and every layer file has its recorded size and mtime and a header naming this extraction. `verify` is the
full audit: it re-hashes every layer file and compares every expert slice byte for byte with the GGUF.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, model_validator

from orchestrator.errors import FlashflexError
from orchestrator.fsutil import atomic_dir, atomic_file, check_free_space
from orchestrator.modelfile.reader import read_model_table
from orchestrator.modelfile.table import ModelTable, TensorInfo
from orchestrator.sizes import format_size

ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes total)

FORMAT_VERSION = 3  # 2: layer header digests, model mtimes; 3: a checksum per expert (checked on every read)
MANIFEST_NAME = "manifest.json"
PAGE = 4096  # every expert slot, tensor and file size is a multiple of this (O_DIRECT's usual block)
HEADER_MAGIC = b"FFSIDECAR1\n"
COPY_CHUNK = 8 << 20  # bytes read per system call while copying or verifying

# Family name -> the GGUF base name of its tensors (`blk.{layer}.{base}.weight`).
ROUTED_FAMILIES: dict[str, str] = {
    "gate": "ffn_gate_exps",
    "up": "ffn_up_exps",
    "down": "ffn_down_exps",
    "gate_up": "ffn_gate_up_exps",
}
SHARED_FAMILIES: dict[str, str] = {
    "gate_shexp": "ffn_gate_shexp",
    "up_shexp": "ffn_up_shexp",
    "down_shexp": "ffn_down_shexp",
}
FAMILIES: dict[str, str] = {**ROUTED_FAMILIES, **SHARED_FAMILIES}

_FAMILY_OF_BASE = {base: family for family, base in FAMILIES.items()}
# Only `.weight`: expert biases and scales (a few models have them) are small and stay in the GGUF.
_EXPERT_NAME_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")
_LAYER_FILE_RE = re.compile(r"^layer-\d{3,}\.bin$")

# A fingerprint reads each shard's head (header, metadata, tensor infos) and this many evenly spaced samples.
FINGERPRINT_HEAD = 1 << 20
FINGERPRINT_SAMPLE = 64 << 10
FINGERPRINT_SAMPLES = 16

_REEXTRACT = "re-extract with `flashflex sidecar extract`"


def family_of(name: str) -> str | None:
    """The sidecar family of a GGUF tensor name (`blk.3.ffn_up_exps.weight` -> "up"); None for other tensors."""
    match = _EXPERT_NAME_RE.match(name)
    return _FAMILY_OF_BASE.get(match.group(2)) if match else None


def is_shared(family: str) -> bool:
    return family in SHARED_FAMILIES


def layer_file_name(layer: int) -> str:
    return f"layer-{layer:03d}.bin"


def _round_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


# --------------------------------------------------------------------------------------------------
# Manifest


class _Strict(BaseModel):
    # strict: a manifest written by hand or by another tool gets no silent coercion ("3" is not 3)
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelIdentity(_Strict):
    """The model a sidecar was extracted from."""

    architecture: str
    n_expert: int
    n_expert_used: int
    n_layer: int
    fingerprint: str
    files: list[str]  # basenames of the GGUF shards, in order
    file_sizes: list[int]
    file_mtimes_ns: list[int]  # a GGUF edited after extraction feeds the same run its dense part: refuse it


class LayerFile(_Strict):
    layer: int
    file: str
    size: int
    mtime_ns: int  # st_mtime_ns once written and fsynced: a later edit shows without reading the file
    sha256: str


class SidecarTensor(_Strict):
    name: str
    layer: int
    family: str
    ggml_type: str
    shape: list[int]  # ggml order (ne0 first)
    n_expert: int  # shape[2] for routed tensors, 1 for shared ones
    bytes_per_expert: int
    expert_stride: int  # bytes_per_expert rounded up to PAGE
    source_file: int  # index into model.files
    source_offset: int  # absolute offset of the tensor's data in that file
    file: str  # the layer file holding it
    offset: int  # where expert 0 starts in the layer file
    checksums: list[int] = []  # one per expert (expert_checksum); the runtime checks every expert it reads

    @property
    def n_bytes(self) -> int:
        return self.n_expert * self.bytes_per_expert

    @property
    def end(self) -> int:
        """Where this tensor's slots end in the layer file."""
        return self.offset + self.n_expert * self.expert_stride


class SidecarManifest(_Strict):
    format_version: int = FORMAT_VERSION
    extraction_id: str
    model: ModelIdentity
    families: list[str]
    layers: list[LayerFile]
    tensors: list[SidecarTensor]

    # The directory it was loaded from or written to (not serialised); check_sidecar finds layer files there.
    _directory: Path | None = PrivateAttr(default=None)

    @property
    def directory(self) -> Path | None:
        return self._directory

    def tensors_in(self, file: str) -> list[SidecarTensor]:
        """The tensors of one layer file, in file order."""
        return sorted((t for t in self.tensors if t.file == file), key=lambda t: t.offset)

    @model_validator(mode="after")
    def _consistent(self) -> SidecarManifest:
        """Cross-field rules: what the runtime would otherwise trip over (or read out of bounds with)."""
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version {self.format_version} is not supported (this flashflex reads "
                             f"{FORMAT_VERSION})")
        if not self.model.files or not (len(self.model.files) == len(self.model.file_sizes)
                                        == len(self.model.file_mtimes_ns)):
            raise ValueError("model.files, file_sizes and file_mtimes_ns must be non-empty and of equal length")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"families: unknown family {unknown[0]!r}")
        files: dict[str, LayerFile] = {}
        for entry in self.layers:
            if entry.file != layer_file_name(entry.layer):
                raise ValueError(f"layers: layer {entry.layer} is in {entry.file!r}, expected "
                                 f"{layer_file_name(entry.layer)!r}")
            if entry.file in files:
                raise ValueError(f"layers: {entry.file} is listed twice")
            if entry.size % PAGE:
                raise ValueError(f"layers: {entry.file} size {entry.size} is not a multiple of {PAGE}")
            files[entry.file] = entry
        for i, t in enumerate(self.tensors):
            where = f"tensors.{i} ({t.name})"
            layer_file = files.get(t.file)
            if layer_file is None:
                raise ValueError(f"{where}: file {t.file!r} is not among the layers")
            if t.layer != layer_file.layer:
                raise ValueError(f"{where}: layer {t.layer} stored in {t.file}")
            if t.family not in self.families or family_of(t.name) != t.family:
                raise ValueError(f"{where}: family {t.family!r} does not fit the name or the families list")
            if not 0 <= t.source_file < len(self.model.files):
                raise ValueError(f"{where}: source_file {t.source_file} is out of range")
            if t.n_expert < 1 or t.bytes_per_expert < 1:
                raise ValueError(f"{where}: n_expert and bytes_per_expert must be positive")
            expected = 1 if is_shared(t.family) else (t.shape[2] if len(t.shape) == 3 else None)
            if t.n_expert != expected:
                raise ValueError(f"{where}: n_expert {t.n_expert} does not fit shape {t.shape}")
            if t.expert_stride != _round_up(t.bytes_per_expert):
                raise ValueError(f"{where}: expert_stride {t.expert_stride} is not bytes_per_expert rounded "
                                 f"up to {PAGE}")
            if len(t.checksums) != t.n_expert or any(not 0 <= c < 1 << 64 for c in t.checksums):
                raise ValueError(f"{where}: checksums must hold one 64-bit value per expert ({t.n_expert})")
            if t.offset % PAGE or t.offset < PAGE or t.end > entry.size:
                raise ValueError(f"{where}: offset {t.offset} is not page-aligned inside {t.file}")
        for file in files:
            in_file = self.tensors_in(file)
            for a, b in itertools.pairwise(in_file):
                if a.end > b.offset:
                    raise ValueError(f"tensors: {a.name} and {b.name} overlap in {file}")
        return self

    def to_json(self) -> str:
        # model_dump keeps declaration order, so the key order is stable from run to run
        return json.dumps(self.model_dump(), indent=2) + "\n"


def _as_path(path: os.PathLike[str] | str) -> Path:
    return Path(path).expanduser()


def load_manifest(sidecar_dir: os.PathLike[str] | str) -> SidecarManifest:
    """The manifest of the sidecar at `sidecar_dir`, validated; any defect is one FlashflexError line."""
    directory = _as_path(sidecar_dir)
    if not directory.exists():
        raise FlashflexError(f"sidecar {directory} not found",
                             "extract one with `flashflex sidecar extract MODEL OUT`")
    if not directory.is_dir():
        raise FlashflexError(f"{directory} is not a sidecar (a sidecar is a directory with {MANIFEST_NAME})",
                             "pass the directory written by `flashflex sidecar extract`")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise FlashflexError(f"{directory} is not a sidecar: it has no {MANIFEST_NAME}", _REEXTRACT)

    def invalid(detail: str) -> FlashflexError:
        return FlashflexError(f"sidecar manifest {path} is invalid: {detail}", _REEXTRACT)

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise invalid(f"not JSON ({exc.msg} at line {exc.lineno})") from exc
    except (UnicodeDecodeError, OSError) as exc:
        raise invalid(f"unreadable ({exc})") from exc
    if not isinstance(data, dict):
        raise invalid("not a JSON object")
    # The version is looked at first: a newer format deserves "unsupported version", not a list of fields.
    version = data.get("format_version")
    if version is None:
        raise invalid("format_version: field required")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise FlashflexError(f"sidecar {directory} has format version {version!r}; this flashflex reads "
                             f"version {FORMAT_VERSION}",
                             "re-extract it with this flashflex (`flashflex sidecar extract`), or upgrade flashflex")
    try:
        manifest = SidecarManifest.model_validate(data)
    except ValidationError as exc:
        raise invalid(_first_error(exc)) from exc
    manifest._directory = directory
    return manifest


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = ".".join(str(part) for part in first["loc"])
    msg = str(first["msg"]).removeprefix("Value error, ")
    msg = msg[:1].lower() + msg[1:]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return (f"{loc}: {msg}" if loc else msg) + more


# --------------------------------------------------------------------------------------------------
# Fingerprint


def _read_at(fd: int, offset: int, n: int) -> bytes:
    """Exactly the n bytes at `offset`, or fewer only at the end of the file."""
    parts, got = [], 0
    while got < n:
        chunk = os.pread(fd, n - got, offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def fingerprint(files: Iterable[os.PathLike[str] | str]) -> str:
    """Identity of a (possibly multi-shard) GGUF model, cheap enough for every run.

    sha256 over, for each shard in order: its size (8 bytes, little-endian), its first min(size, 1 MiB) bytes
    (header, metadata, tensor infos), and 16 samples of 64 KiB at evenly spaced offsets from the start to the
    end of the file. About 2 MiB read per shard, yet two models that share a header but not their weights
    (a different seed, a different fine-tune) almost surely differ in some sample.
    """
    digest = hashlib.sha256()
    for file in files:
        path = Path(file)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise FlashflexError(f"cannot read model file {path}: {exc.strerror or exc}",
                                 "check the path and permissions") from exc
        try:
            size = os.fstat(fd).st_size
            digest.update(size.to_bytes(8, "little"))
            digest.update(_read_at(fd, 0, min(size, FINGERPRINT_HEAD)))
            sample = min(size, FINGERPRINT_SAMPLE)
            for i in range(FINGERPRINT_SAMPLES):
                digest.update(_read_at(fd, (size - sample) * i // (FINGERPRINT_SAMPLES - 1), sample))
        finally:
            os.close(fd)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Layer file headers


def placement_digest(tensors: Iterable[SidecarTensor]) -> str:
    """A digest of a layer file's tensor table as the manifest states it (names, offsets, strides, sizes,
    shapes, types, sources). The layer file's header carries it, so a manifest edited after extraction (two
    tensors' offsets swapped) no longer matches its files."""
    rows = [t.model_dump() for t in sorted(tensors, key=lambda t: t.offset)]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def header_page(extraction_id: str, layer: int, tensors_digest: str) -> bytes:
    """Page 0 of a layer file: magic, one compact JSON line naming the extraction, the layer and the digest of
    its tensor table, zeros."""
    line = json.dumps({"extraction_id": extraction_id, "layer": layer, "tensors": tensors_digest},
                      separators=(",", ":")).encode()
    head = HEADER_MAGIC + line + b"\n"
    if len(head) > PAGE:
        raise AssertionError("sidecar header does not fit its page")  # an extraction id is 32 hex digits
    return head + bytes(PAGE - len(head))


def _parse_header(page: bytes) -> tuple[dict[str, Any] | None, bool]:
    """(the JSON object of a header page or None if it is not one, whether its padding is all zeros)."""
    if not page.startswith(HEADER_MAGIC):
        return None, False
    end = page.find(b"\n", len(HEADER_MAGIC))
    if end < 0:
        return None, False
    try:
        info = json.loads(page[len(HEADER_MAGIC):end])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, False
    if not isinstance(info, dict):
        return None, False
    return info, page.count(0, end + 1) == len(page) - end - 1


# --------------------------------------------------------------------------------------------------
# Extraction


def _select(table: ModelTable, model_path: Path, include_shared: bool, layers: set[int] | None,
            families: set[str] | None) -> list[tuple[TensorInfo, str]]:
    """The (tensor, family) pairs to extract, in GGUF order; every request checked against the model."""
    present = [(t, f) for t in table.tensors if (f := family_of(t.name)) is not None]
    if not any(not is_shared(f) for _t, f in present):
        raise FlashflexError(f"{model_path.name} has no routed expert tensors; sidecars are for MoE models",
                             "pass a mixture-of-experts model (ffn_*_exps tensors)")
    have = {f for _t, f in present}

    if families is not None:
        unknown = sorted(set(families) - set(FAMILIES))
        if unknown:
            raise FlashflexError(f"unknown expert family {unknown[0]!r}", f"use any of: {', '.join(FAMILIES)}")
        if not families:
            raise FlashflexError("no expert family selected", f"name some of: {', '.join(FAMILIES)}")
        absent = [f for f in FAMILIES if f in families and f not in have]
        if absent:
            raise FlashflexError(f"{model_path.name} has no {FAMILIES[absent[0]]} tensors (family {absent[0]})",
                                 f"choose from the families it has: {', '.join(f for f in FAMILIES if f in have)}")
        wanted = set(families)
    else:
        wanted = set(ROUTED_FAMILIES)
    if include_shared:
        wanted |= set(SHARED_FAMILIES)

    n_layer = table.arch.n_layer
    if layers is not None:
        bad = sorted(n for n in layers if not 0 <= n < n_layer)
        if bad:
            raise FlashflexError(f"layer {bad[0]} is out of range: the model has {n_layer} layers "
                                 f"(0-{n_layer - 1})", "pass layers that exist, e.g. --layers 0-3")

    chosen = [(t, f) for t, f in present if f in wanted and (layers is None or t.layer in layers)]
    if not chosen:
        raise FlashflexError(f"nothing to extract from {model_path.name}: the selected layers have none of the "
                             "selected expert tensors", "widen --layers or --families")
    for t, f in chosen:
        if not is_shared(f) and (len(t.shape) != 3 or t.shape[2] < 1 or t.n_bytes % t.shape[2]):
            raise FlashflexError(f"tensor {t.name} has shape {list(t.shape)}; an expert tensor needs "
                                 "[…, …, n_expert] with whole experts", "report this model's layout")
    return chosen


def _plan(chosen: list[tuple[TensorInfo, str]], files: list[Path]) -> dict[int, list[SidecarTensor]]:
    """Where each tensor goes: layer -> its tensors with their offsets in the layer file, in GGUF order."""
    plan: dict[int, list[SidecarTensor]] = {}
    cursor: dict[int, int] = {}
    for t, family in chosen:
        assert t.layer is not None  # family_of only matches `blk.N.` names
        n_expert = 1 if is_shared(family) else t.shape[2]
        per_expert = t.n_bytes // n_expert
        offset = cursor.get(t.layer, PAGE)  # page 0 is the header
        entry = SidecarTensor(
            name=t.name, layer=t.layer, family=family, ggml_type=t.ggml_type, shape=list(t.shape),
            n_expert=n_expert, bytes_per_expert=per_expert, expert_stride=_round_up(per_expert),
            source_file=files.index(t.file), source_offset=t.offset, file=layer_file_name(t.layer), offset=offset,
        )
        plan.setdefault(t.layer, []).append(entry)
        cursor[t.layer] = entry.end
    return dict(sorted(plan.items()))


def _read_exact(fd: int, offset: int, n: int, t: SidecarTensor, expert: int, source_name: str) -> memoryview:
    data = _read_at(fd, offset, n)
    if len(data) != n:
        raise FlashflexError(f"model file {source_name} ended inside tensor {t.name} (expert {expert})",
                             "do not modify the model while a sidecar is extracted or verified")
    return memoryview(data)


def _source_pieces(fd: int, t: SidecarTensor, source_name: str) -> Iterator[tuple[int, int, memoryview]]:
    """(expert, offset inside its slice, bytes): tensor t's GGUF data in order, read about COPY_CHUNK at a
    time -- several small experts per read, or one large expert in several reads."""
    bpe = t.bytes_per_expert
    if bpe <= COPY_CHUNK:
        per_read = COPY_CHUNK // bpe
        for first in range(0, t.n_expert, per_read):
            count = min(per_read, t.n_expert - first)
            data = _read_exact(fd, t.source_offset + first * bpe, count * bpe, t, first, source_name)
            for j in range(count):
                yield first + j, 0, data[j * bpe:(j + 1) * bpe]
        return
    for expert in range(t.n_expert):
        for start in range(0, bpe, COPY_CHUNK):
            n = min(COPY_CHUNK, bpe - start)
            yield expert, start, _read_exact(fd, t.source_offset + expert * bpe + start, n, t, expert, source_name)


_MASK64 = (1 << 64) - 1


class ExpertChecksum:
    """The runtime's per-expert checksum (expert_checksum in the native runtime), fed in pieces: the bytes as
    little-endian 64-bit words w_i (the last zero-padded), sum of w_i * (2i + 1) mod 2^64."""

    def __init__(self) -> None:
        self.total = 0
        self.words = 0
        self.tail = b""

    def update(self, data) -> None:
        data = self.tail + bytes(data) if self.tail else data
        n = len(data) // 8
        if n:
            words = np.frombuffer(data, dtype="<u8", count=n)
            weights = np.arange(self.words, self.words + n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
            self.total = (self.total + int((words * weights).sum(dtype=np.uint64))) & _MASK64
            self.words += n
        self.tail = bytes(data[n * 8:])

    def digest(self) -> int:
        if self.tail:
            last = int.from_bytes(self.tail.ljust(8, b"\0"), "little")
            return (self.total + last * (2 * self.words + 1)) & _MASK64
        return self.total


def expert_checksum(data) -> int:
    c = ExpertChecksum()
    c.update(data)
    return c.digest()


class _HashingWriter:
    """Sequential writes to a layer file, hashed on the way."""

    def __init__(self, fh):
        self.fh = fh
        self.sha = hashlib.sha256()
        self.pos = 0

    def write(self, data: bytes | memoryview) -> None:
        self.fh.write(data)
        self.sha.update(data)
        self.pos += len(data)

    def zeros(self, n: int) -> None:
        if n:
            self.write(bytes(n))


def _copy_tensor(fd: int, source_name: str, sink: _HashingWriter, t: SidecarTensor,
                 advance: Callable[[int], None]) -> None:
    """Copy tensor t's experts from the GGUF into their slots, zero-padding each to expert_stride."""
    if sink.pos != t.offset:
        raise AssertionError(f"{t.name}: writing at {sink.pos}, planned {t.offset}")
    for _expert, start, piece in _source_pieces(fd, t, source_name):
        sink.write(piece)
        if start + len(piece) == t.bytes_per_expert:
            sink.zeros(t.expert_stride - t.bytes_per_expert)
        advance(len(piece))


def _checksums(fd: int, source_name: str, t: SidecarTensor) -> list[int]:
    """The checksum of each of tensor t's experts, read from the GGUF."""
    sums: list[int] = []
    check = ExpertChecksum()
    for _expert, start, piece in _source_pieces(fd, t, source_name):
        check.update(piece)
        if start + len(piece) == t.bytes_per_expert:
            sums.append(check.digest())
            check = ExpertChecksum()
    return sums


def _refuse_existing(out_dir: Path, force: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FlashflexError(f"{out_dir} exists and is not a directory", "choose another path for the sidecar")
    if not force:
        raise FlashflexError(f"{out_dir} already exists", "pass --force to replace it, or choose another path")
    # --force replaces a sidecar, never a directory of anything else (a typo must not delete a home dir).
    foreign = [p.name for p in out_dir.iterdir() if p.name != MANIFEST_NAME and not _LAYER_FILE_RE.match(p.name)]
    if foreign:
        raise FlashflexError(f"{out_dir} is not a sidecar (it holds {foreign[0]}); refusing to replace it",
                             "choose another path, or remove the directory yourself")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def extract(
    model_path: os.PathLike[str] | str,
    out_dir: os.PathLike[str] | str,
    *,
    include_shared: bool = False,
    layers: set[int] | None = None,
    families: set[str] | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> SidecarManifest:
    """Copy the model's expert tensors into a new sidecar at `out_dir` and return its manifest.

    By default every routed family the model has (gate, up, down, gate_up) of every layer; `include_shared`
    adds the shared experts; `layers` / `families` narrow the selection. The directory is built beside
    `out_dir` and renamed into place only when complete, so an interrupted extraction leaves nothing behind.
    """
    model_path, out_dir = _as_path(model_path), _as_path(out_dir)
    table = read_model_table(model_path)
    chosen = _select(table, model_path, include_shared, layers, families)
    _refuse_existing(out_dir, force)

    files = list(table.files)
    model_fp = fingerprint(files)
    plan = _plan(chosen, files)
    total = sum(t.n_bytes for tensors in plan.values() for t in tensors)
    check_free_space(out_dir.parent if out_dir.parent.exists() else Path("."),
                     sum(max(t.end for t in ts) for ts in plan.values()), f"the sidecar of {model_path.name}")
    extraction_id = uuid.uuid4().hex
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    try:
        with atomic_dir(out_dir) as tmp, contextlib.ExitStack() as stack:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a finished sidecar gets the usual mode
            fds = [os.open(f, os.O_RDONLY) for f in files]
            for fd in fds:
                stack.callback(os.close, fd)
            entries = [_write_layer(tmp, layer, tensors, extraction_id, fds, files, advance)
                       for layer, tensors in plan.items()]
            if fingerprint(files) != model_fp:
                raise FlashflexError(f"{model_path.name} changed while the sidecar was extracted",
                                     "extract again once nothing writes to the model")
            manifest = SidecarManifest(
                extraction_id=extraction_id,
                model=ModelIdentity(
                    architecture=table.arch.arch, n_expert=table.arch.n_expert,
                    n_expert_used=table.arch.n_expert_used, n_layer=table.arch.n_layer, fingerprint=model_fp,
                    files=[f.name for f in files], file_sizes=[f.stat().st_size for f in files],
                    file_mtimes_ns=[f.stat().st_mtime_ns for f in files],
                ),
                families=[f for f in FAMILIES if any(t.family == f for ts in plan.values() for t in ts)],
                layers=entries,
                tensors=[t for tensors in plan.values() for t in tensors],
            )
            (tmp / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")  # atomic_dir fsyncs it
    except OSError as exc:
        raise FlashflexError(f"cannot write sidecar {out_dir}: {exc.strerror or exc}",
                             f"check free space ({format_size(total)} needed) and permissions") from exc
    manifest._directory = out_dir
    return manifest


def _write_layer(directory: Path, layer: int, tensors: list[SidecarTensor], extraction_id: str,
                 fds: list[int], files: list[Path], advance: Callable[[int], None]) -> LayerFile:
    name = layer_file_name(layer)
    path = directory / name
    with open(path, "wb") as fh:
        sink = _HashingWriter(fh)
        # the checksums are part of the tensor table the header's digest covers: compute them first
        for i, t in enumerate(tensors):
            sums = _checksums(fds[t.source_file], files[t.source_file].name, t)
            tensors[i] = t.model_copy(update={"checksums": sums})
        sink.write(header_page(extraction_id, layer, placement_digest(tensors)))
        for t in tensors:
            _copy_tensor(fds[t.source_file], files[t.source_file].name, sink, t, advance)
        fh.flush()
        os.fsync(fh.fileno())
    st = path.stat()  # mtime after the last write and fsync: what check_sidecar compares against
    if st.st_size != sink.pos or st.st_size % PAGE:
        raise AssertionError(f"{name}: {st.st_size} bytes on disk, {sink.pos} written")
    return LayerFile(layer=layer, file=name, size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=sink.sha.hexdigest())


# --------------------------------------------------------------------------------------------------
# Checking


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a sidecar; `file` and `tensor` name what it concerns, where that applies."""

    message: str
    fix: str = _REEXTRACT
    file: str | None = None
    tensor: str | None = None
    kind: str = "other"  # "identity", "tensor", "missing", "size", "header", "mtime", "data", "sha256"


def _as_manifest(sidecar: SidecarManifest | os.PathLike[str] | str) -> SidecarManifest:
    if isinstance(sidecar, SidecarManifest):
        if sidecar.directory is None:
            raise ValueError("this SidecarManifest was not loaded from a directory; pass the directory instead")
        return sidecar
    return load_manifest(sidecar)


def _as_table(model: ModelTable | os.PathLike[str] | str) -> ModelTable:
    return model if isinstance(model, ModelTable) else read_model_table(model)


def _short(digest: str) -> str:
    return digest[:12] + "…"


def _identity_problem(manifest: SidecarManifest, table: ModelTable, model_fp: str) -> Problem | None:
    want = manifest.model
    differences = [
        f"{what} {ours}≠{theirs}" for what, ours, theirs in (
            ("architecture", want.architecture, table.arch.arch),
            ("n_expert", want.n_expert, table.arch.n_expert),
            ("n_expert_used", want.n_expert_used, table.arch.n_expert_used),
            ("n_layer", want.n_layer, table.arch.n_layer),
            ("shards", len(want.files), len(table.files)),
        ) if ours != theirs
    ]
    if want.fingerprint != model_fp:
        differences.append(f"fingerprint {_short(want.fingerprint)}≠{_short(model_fp)}")
    if not differences:
        return None
    first = table.files[0]
    return Problem(
        f"sidecar {manifest.directory} was extracted from another model ({', '.join(differences)})",
        f"extract one from this model: flashflex sidecar extract {first} OUT",
        kind="identity",
    )


def _tensor_problems(manifest: SidecarManifest, table: ModelTable) -> list[Problem]:
    by_name = {t.name: t for t in table.tensors}
    problems = []
    for t in manifest.tensors:
        src = by_name.get(t.name)
        if src is None:
            problems.append(Problem(f"tensor {t.name} of sidecar {manifest.directory} is not in the model",
                                    file=t.file, tensor=t.name, kind="tensor"))
            continue
        differences = [
            f"{what} {ours}≠{theirs}" for what, ours, theirs in (
                ("type", t.ggml_type, src.ggml_type),
                ("shape", t.shape, list(src.shape)),
                ("bytes", t.n_bytes, src.n_bytes),
                ("shard", t.source_file, table.files.index(src.file)),  # names may change; order may not
                ("offset", t.source_offset, src.offset),
            ) if ours != theirs
        ]
        if differences:
            problems.append(Problem(f"tensor {t.name} differs from the model ({', '.join(differences)})",
                                    file=t.file, tensor=t.name, kind="tensor"))
    return problems


def _layer_problems(manifest: SidecarManifest) -> list[Problem]:
    """Cheap checks of every layer file: exists, size, header page, mtime. Reads one page per file."""
    assert manifest.directory is not None
    problems = []
    for entry in manifest.layers:
        path = manifest.directory / entry.file
        try:
            st = path.stat()
        except FileNotFoundError:
            problems.append(Problem(f"sidecar layer file {path} is missing", file=entry.file, kind="missing"))
            continue
        if not stat.S_ISREG(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, device or socket)"
            problems.append(Problem(f"sidecar layer file {path} is {what}", "re-extract the sidecar",
                                    file=entry.file, kind="missing"))
            continue
        if st.st_size < entry.size:
            problems.append(Problem(f"{path} is truncated ({st.st_size:,} of {entry.size:,} bytes)",
                                    file=entry.file, kind="size"))
            continue
        if st.st_size > entry.size:
            problems.append(Problem(f"{path} has {st.st_size:,} bytes, {entry.size:,} recorded: it was modified "
                                    "after extraction", file=entry.file, kind="size"))
            continue
        with open(path, "rb") as fh:
            info, _zeros = _parse_header(fh.read(PAGE))
        if info is None:
            problems.append(Problem(f"{path} is not a sidecar layer file (its first page is not a "
                                    f"{HEADER_MAGIC.strip().decode()} header)", file=entry.file, kind="header"))
            continue
        if info.get("extraction_id") != manifest.extraction_id:
            problems.append(Problem(f"{path} belongs to another extraction ({info.get('extraction_id')!r}, "
                                    f"manifest says {manifest.extraction_id!r})", file=entry.file, kind="header"))
            continue
        if info.get("layer") != entry.layer:
            problems.append(Problem(f"{path} holds layer {info.get('layer')!r}, not layer {entry.layer}",
                                    file=entry.file, kind="header"))
            continue
        if info.get("tensors") != placement_digest(manifest.tensors_in(entry.file)):
            problems.append(Problem(f"the tensor table of {entry.file} in {manifest.directory / MANIFEST_NAME} does "
                                    f"not match the one {path.name} was written with (manifest.json was edited "
                                    "after extraction)", "re-extract the sidecar (flashflex sidecar extract "
                                    "--force)", file=entry.file, kind="header"))
            continue
        if st.st_mtime_ns != entry.mtime_ns:
            problems.append(Problem(f"{path} was modified after extraction (its mtime changed)",
                                    "run `flashflex sidecar verify` or re-extract", file=entry.file, kind="mtime"))
    return problems


def _model_file_problems(manifest: SidecarManifest, table: ModelTable) -> list[Problem]:
    """The GGUF shards as recorded at extraction: same size and mtime (an edit the sampled fingerprint misses
    would otherwise run with the sidecar's experts beside changed dense weights)."""
    problems = []
    for path, size, mtime in zip(table.files, manifest.model.file_sizes, manifest.model.file_mtimes_ns):
        st = Path(path).stat()
        if st.st_size != size or st.st_mtime_ns != mtime:
            what = "size" if st.st_size != size else "mtime"
            problems.append(Problem(
                f"model file {path} was modified after the sidecar was extracted (its {what} changed)",
                f"run `flashflex sidecar verify {manifest.directory} --model {path}` (it compares every expert and "
                "records the new mtime when they match) or re-extract", file=Path(path).name, kind="model-mtime"))
    return problems


def _cheap_problems(manifest: SidecarManifest, table: ModelTable) -> list[Problem]:
    identity = _identity_problem(manifest, table, fingerprint(table.files))
    if identity:
        return [identity]  # every other comparison against another model is noise
    return _model_file_problems(manifest, table) + _tensor_problems(manifest, table) + _layer_problems(manifest)


def default_path(model: Path) -> Path:
    """Where `flashflex sidecar extract` writes, and runs look, when no sidecar is named: beside the model."""
    return model.with_name(model.name.removesuffix(".gguf") + ".sidecar")


def beside(model: Path, log: Callable[[str], None] = print) -> Path:
    """The model's sidecar at the default place beside it (default_path), extracted there once when missing
    (benchmarks of a MoE model), checked against the model."""
    where = default_path(model)
    if not where.exists():
        log(f"extracting the expert sidecar (once) to {where}")
        extract(model, where)
    check_sidecar(where, model)
    return where


def check_sidecar(sidecar: SidecarManifest | os.PathLike[str] | str,
                  model: ModelTable | os.PathLike[str] | str) -> SidecarManifest:
    """The cheap pre-run check: raise FlashflexError unless the sidecar can serve this model as it is.

    `sidecar` is a directory or a manifest from load_manifest/extract; `model` a path (any shard) or a
    ModelTable already read. Reads the manifest, the model's fingerprint (about 2 MiB per shard) and one page
    per layer file; never a whole file. Returns the manifest.
    """
    manifest = _as_manifest(sidecar)
    problems = _cheap_problems(manifest, _as_table(model))
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise FlashflexError(problems[0].message + more, problems[0].fix)
    return manifest


# --------------------------------------------------------------------------------------------------
# Full verification


# More differing experts than this in one layer file are summarised in one line.
MAX_DATA_PROBLEMS_PER_FILE = 10


@dataclass
class VerifyReport:
    sidecar: Path
    model: list[Path]
    problems: list[Problem] = field(default_factory=list)
    restamped: list[str] = field(default_factory=list)  # intact layer files whose recorded mtime was restored
    layers_checked: int = 0
    bytes_checked: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "sidecar": str(self.sidecar),
            "model": [str(p) for p in self.model],
            "problems": [p.message for p in self.problems],
            "restamped": self.restamped,
            "layers_checked": self.layers_checked,
            "bytes_checked": self.bytes_checked,
            "seconds": round(self.seconds, 3),
        }


def verify(sidecar_dir: os.PathLike[str] | str, model_path: ModelTable | os.PathLike[str] | str,
           progress: ProgressCallback | None = None, *, restamp: bool = True) -> VerifyReport:
    """Everything check_sidecar checks, plus a full read: every layer file re-hashed against the manifest and
    every expert slice compared byte for byte with the GGUF (padding must be zeros).

    A layer file whose bytes all verify but whose mtime changed (touched, copied without keeping times) gets
    its recorded mtime back when `restamp` is on, so the cheap pre-run check accepts it again.
    """
    started = time.monotonic()
    manifest = load_manifest(sidecar_dir)
    table = _as_table(model_path)
    assert manifest.directory is not None
    report = VerifyReport(sidecar=manifest.directory, model=list(table.files))
    cheap = _cheap_problems(manifest, table)
    if any(p.kind == "identity" for p in cheap):
        report.problems = cheap
        report.seconds = time.monotonic() - started
        return report

    # Files that are missing or have the wrong size are reported already; reading them would only repeat it.
    unreadable = {p.file for p in cheap if p.kind in ("missing", "size")}
    bad_tensors = {p.tensor for p in cheap if p.kind == "tensor" and p.tensor}
    stale = {p.file: p for p in cheap if p.kind == "mtime"}
    model_stale = [p for p in cheap if p.kind == "model-mtime"]
    # an mtime change (of a layer file or the model) is judged once the bytes are read
    report.problems = [p for p in cheap if p.kind not in ("mtime", "model-mtime")]
    to_read = [e for e in manifest.layers if e.file not in unreadable]
    total = sum(e.size for e in to_read)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    fds = [os.open(f, os.O_RDONLY) for f in table.files]
    try:
        for entry in to_read:
            path = manifest.directory / entry.file
            before = path.stat().st_mtime_ns
            report.problems += _verify_layer(manifest, entry, path, fds, table.files, bad_tensors, advance)
            report.layers_checked += 1
            if entry.file in stale:
                intact = not any(p.file == entry.file for p in report.problems)
                # restamp only if nothing touched the file while it was being read
                if intact and restamp and _restamp(path, before, entry.mtime_ns):
                    report.restamped.append(entry.file)
                else:
                    report.problems.append(stale[entry.file])
    finally:
        for fd in fds:
            os.close(fd)
    if model_stale:
        if not report.problems and restamp:  # every expert matches the model as it is now: record its new state
            _record_model_state(manifest, table)
            report.restamped += [p.file for p in model_stale if p.file]
        else:
            report.problems += model_stale
    report.bytes_checked = done
    report.seconds = time.monotonic() - started
    return report


def _record_model_state(manifest: SidecarManifest, table: ModelTable) -> None:
    """Rewrite manifest.json (atomically) with the model files' current sizes and mtimes."""
    assert manifest.directory is not None
    stats = [Path(f).stat() for f in table.files]
    model = manifest.model.model_copy(update={"file_sizes": [st.st_size for st in stats],
                                              "file_mtimes_ns": [st.st_mtime_ns for st in stats]})
    updated = manifest.model_copy(update={"model": model})
    with atomic_file(manifest.directory / MANIFEST_NAME, "w") as fh:
        fh.write(updated.to_json())


def _restamp(path: Path, seen_mtime_ns: int, mtime_ns: int) -> bool:
    try:
        st = path.stat()
        if st.st_mtime_ns != seen_mtime_ns:
            return False
        os.utime(path, ns=(st.st_atime_ns, mtime_ns))
        return True
    except OSError:
        return False


def _verify_layer(manifest: SidecarManifest, entry: LayerFile, path: Path, fds: list[int], files: list[Path],
                  bad_tensors: set[str], advance: Callable[[int], None]) -> list[Problem]:
    """Read one layer file start to end: hash it, compare each slot with the GGUF, check padding is zero."""
    name = entry.file
    problems: list[Problem] = []
    data_problems = 0
    sha = hashlib.sha256()

    def note(message: str) -> None:
        nonlocal data_problems
        data_problems += 1
        if data_problems <= MAX_DATA_PROBLEMS_PER_FILE:
            problems.append(Problem(f"{name}: {message}", file=name, kind="data"))

    with open(path, "rb") as fh:
        def take(n: int) -> bytes:
            data = fh.read(n)
            sha.update(data)
            advance(len(data))
            if len(data) != n:  # the size was checked a moment ago: the file is changing under us
                raise FlashflexError(f"{path} shrank while it was verified", "do not modify a sidecar in use")
            return data

        info, zeros = _parse_header(take(PAGE))
        if info is not None and not zeros:  # a header naming the wrong extraction is a cheap-check problem
            note("the header page's padding is not zero")
        pos = PAGE
        for t in manifest.tensors_in(name):
            if t.offset > pos and take(t.offset - pos).count(0) != t.offset - pos:
                note(f"the gap before {t.name} is not zero")
            pos = t.end
            if t.name in bad_tensors:  # no longer matches the model: hash the bytes, skip the comparison
                for _ in range(t.n_expert):
                    _skip_in_chunks(take, t.expert_stride)
                continue
            flagged = -1
            check = ExpertChecksum()
            for expert, start, want in _source_pieces(fds[t.source_file], t, files[t.source_file].name):
                got = take(len(want))
                check.update(got)
                if start + len(want) == t.bytes_per_expert:
                    # bytes that differ from the model are reported below; a wrong checksum of right bytes here
                    if check.digest() != t.checksums[expert] and flagged != expert and got == bytes(want):
                        note(f"the manifest's checksum of {t.name} expert {expert} does not match its bytes")
                    check = ExpertChecksum()
                # bytes against bytes is a memcmp; against a memoryview it is ~80x slower, element by element
                if got != bytes(want) and flagged != expert:
                    flagged = expert
                    at = start + _first_difference(got, bytes(want))
                    note(f"{t.name} expert {expert} differs from the model at byte {at:,} of its slice "
                         f"(file offset {t.offset + expert * t.expert_stride + at:,})")
                if start + len(want) == t.bytes_per_expert:
                    pad = t.expert_stride - t.bytes_per_expert
                    if pad and take(pad).count(0) != pad:
                        note(f"the padding after {t.name} expert {expert} is not zero")
        tail = entry.size - pos
        if tail > 0 and take(tail).count(0) != tail:
            note("the padding at the end of the file is not zero")

    if data_problems > MAX_DATA_PROBLEMS_PER_FILE:
        problems.append(Problem(f"{name}: … and {data_problems - MAX_DATA_PROBLEMS_PER_FILE} more differences",
                                file=name, kind="data"))
    if sha.hexdigest() != entry.sha256:
        problems.append(Problem(f"{name}: sha256 {_short(sha.hexdigest())} does not match the manifest's "
                                f"{_short(entry.sha256)}", file=name, kind="sha256"))
    return problems


def _skip_in_chunks(take: Callable[[int], bytes], n: int) -> None:
    while n:
        step = min(n, COPY_CHUNK)
        take(step)
        n -= step


def _first_difference(a: bytes, b: bytes) -> int:
    """Index of the first differing byte of two equal-length buffers (only called when they differ)."""
    lo, hi = 0, len(a)
    # Binary search over prefix equality: a few slice compares instead of a Python loop over megabytes.
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return lo


# --------------------------------------------------------------------------------------------------
# Inspection


def inspect(sidecar_dir: os.PathLike[str] | str) -> dict[str, Any]:
    """A JSON-ready summary of a sidecar, from its manifest (and one stat per layer file)."""
    manifest = load_manifest(sidecar_dir)
    assert manifest.directory is not None
    layers = []
    for entry in manifest.layers:
        tensors = manifest.tensors_in(entry.file)
        routed = [t for t in tensors if not is_shared(t.family)]
        path = manifest.directory / entry.file
        layers.append({
            "layer": entry.layer,
            "file": entry.file,
            "size": entry.size,
            "present": path.is_file(),
            "sha256": entry.sha256,
            "n_tensors": len(tensors),
            "families": [t.family for t in tensors],
            "n_expert": max((t.n_expert for t in routed), default=0),
            # what one expert costs across the layer's routed families: in bytes, and read with O_DIRECT
            "bytes_per_expert": sum(t.bytes_per_expert for t in routed),
            "stride_per_expert": sum(t.expert_stride for t in routed),
            "shared_bytes": sum(t.n_bytes for t in tensors if is_shared(t.family)),
        })
    return {
        "sidecar": str(manifest.directory),
        "format_version": manifest.format_version,
        "extraction_id": manifest.extraction_id,
        "model": manifest.model.model_dump(),
        "families": manifest.families,
        "n_layers": len(manifest.layers),
        "n_tensors": len(manifest.tensors),
        "total_bytes": sum(e.size for e in manifest.layers),
        "data_bytes": sum(t.n_bytes for t in manifest.tensors),
        "layers": layers,
    }
