"""Rewrite a GGUF so every tensor starts on a large boundary (4096 by default), for direct I/O.

llama.cpp's converters align tensor data to 32 bytes. Reading a tensor with O_DIRECT needs its offset (and
length) aligned to the device block size, so the streaming and sidecar paths want page-aligned files.
`realign` copies a file with a new `general.alignment`: the metadata bytes are copied verbatim (only the
alignment value changes or is added), tensor infos keep their order with new offsets, and tensor bytes are
streamed in chunks. Before the new file replaces anything, every tensor is compared byte for byte with
the source, and the written header is read back and checked against the plan.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUF_MAGIC, GGUFValueType, Keys

from orchestrator.errors import FlashflexError
from orchestrator.fsutil import atomic_file, check_free_space
from orchestrator.modelfile.reader import open_gguf, read_metadata, read_model_table, read_tensors

ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes total)

COPY_CHUNK = 16 << 20


@dataclass(frozen=True)
class RealignResult:
    src: Path
    dst: Path
    alignment: int
    n_tensors: int
    tensor_bytes: int  # bytes of tensor data copied (and verified)
    size_before: int
    size_after: int
    was_aligned: bool  # the source already satisfied the requested alignment


MAX_ALIGNMENT = 1 << 20  # 1 MiB: more only pads every tensor for nothing (O_DIRECT needs 4096)


def _check_alignment(alignment: int) -> None:
    if alignment <= 0 or alignment & (alignment - 1):
        raise FlashflexError(f"alignment {alignment} is not a power of two",
                             "pass a power of two such as 4096 (the usual page and block size)")
    if alignment > MAX_ALIGNMENT:
        raise FlashflexError(f"alignment {alignment} is above the 1 MiB limit (every tensor would be padded to it)",
                             "pass 4096, the page size O_DIRECT needs")


def is_aligned(path: os.PathLike[str] | str, alignment: int = 4096) -> bool:
    """True when the file declares an alignment that is a multiple of `alignment` and every tensor's data
    (of every shard) starts on such a boundary."""
    _check_alignment(alignment)
    table = read_model_table(path)
    return all(t.alignment % alignment == 0 and t.offset % alignment == 0 for t in table.tensors)


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _field_size(field) -> int:
    return sum(int(part.nbytes) for part in field.parts)


@contextlib.contextmanager
def byte_progress(description: str, enabled: bool = True) -> Iterator[ProgressCallback | None]:
    """A rich progress bar on stderr, driven by a (done, total) bytes callback; None when disabled."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def realign(
    src: os.PathLike[str] | str,
    dst: os.PathLike[str] | str,
    alignment: int = 4096,
    progress: ProgressCallback | bool | None = None,
) -> RealignResult:
    """Copy the GGUF `src` to `dst` with every tensor's data on an `alignment` boundary.

    `progress` is a (done, total) bytes callback, or True for a rich bar on stderr.
    """
    src, dst = Path(src), Path(dst)
    _check_alignment(alignment)
    if progress is True:
        with byte_progress(f"realign {src.name}") as bar:
            return realign(src, dst, alignment, bar)
    callback = progress if callable(progress) else None

    reader = open_gguf(src)  # refuses a corrupt or truncated source (orchestrator.modelfile.validate)
    tensors = read_tensors(reader, src)
    split = reader.fields.get("split.count")
    if split is not None and int(split.contents()) > 1:
        raise FlashflexError(f"{src} is one shard of a {int(split.contents())}-shard model; realigning it alone "
                             "would write a file that claims the other shards",
                             "merge the shards first (llama-gguf-split --merge) and realign the merged file")
    if dst.exists() and dst.resolve() == src.resolve():
        raise FlashflexError(f"realign would overwrite its input {src}",
                             "write to a new path, then move it over the original")
    if reader.byte_order != "I":
        raise FlashflexError(f"{src} is a byte-swapped (big-endian) GGUF", "realign only handles little-endian files")

    header, new_offsets, data_start = _plan_header(reader, alignment)
    total = sum(t.n_bytes for t in tensors)
    check_free_space(dst.parent if dst.parent.exists() else Path("."), data_start + total + len(tensors) * alignment,
                     f"realign {src.name}")
    was_aligned = all(t.alignment % alignment == 0 and t.offset % alignment == 0 for t in tensors)

    done = 0
    with open(src, "rb") as source, atomic_file(dst, "w+b") as out:
        if hasattr(os, "fchmod"):  # a copy keeps the source's permissions, not the temp file's 0600
            os.fchmod(out.fileno(), stat.S_IMODE(src.stat().st_mode))
        out.write(header)
        _zero_fill(out, data_start - len(header))
        for t, rel in zip(tensors, new_offsets):
            _zero_fill(out, data_start + rel - out.tell())
            source.seek(t.offset)
            remaining = t.n_bytes
            while remaining:
                chunk = source.read(min(COPY_CHUNK, remaining))
                if not chunk:
                    raise FlashflexError(f"{src} shrank while being copied (at tensor {t.name})",
                                         "do not modify the model while realigning it")
                out.write(chunk)
                remaining -= len(chunk)
                done += len(chunk)
                if callback:
                    callback(done, 2 * total)
        _zero_fill(out, -out.tell() % alignment)  # a padded tail lets O_DIRECT read the last tensor whole
        out.flush()
        done = _verify_data(source, out, tensors, [data_start + r for r in new_offsets], done, 2 * total, callback)

    _verify_header(src, dst, reader, tensors, data_start, new_offsets, alignment)
    return RealignResult(
        src=src, dst=dst, alignment=alignment, n_tensors=len(tensors), tensor_bytes=total,
        size_before=src.stat().st_size, size_after=dst.stat().st_size, was_aligned=was_aligned,
    )


def _plan_header(reader, alignment: int) -> tuple[bytes, list[int], int]:
    """(header bytes, each tensor's offset relative to the data section, where the data section starts)."""
    data = reader.data
    kv_fields = [f for name, f in reader.fields.items() if not name.startswith("GGUF.")]
    version = int(reader.fields["GGUF.version"].parts[0][0])
    kv_start = 24  # magic, version, tensor count, kv count
    kv_end = kv_fields[-1].offset + _field_size(kv_fields[-1]) if kv_fields else kv_start

    # The metadata is copied as raw bytes (exact types and order); only general.alignment is set.
    kv_bytes = bytearray(data[kv_start:kv_end].tobytes())
    n_kv = len(kv_fields)
    align_field = reader.fields.get(Keys.General.ALIGNMENT)
    if align_field is not None:
        value_at = align_field.offset + _field_size(align_field) - 4 - kv_start  # a UINT32 at the end
        kv_bytes[value_at:value_at + 4] = struct.pack("<I", alignment)
    else:
        key = Keys.General.ALIGNMENT.encode()
        kv_bytes += struct.pack("<Q", len(key)) + key + struct.pack("<II", GGUFValueType.UINT32, alignment)
        n_kv += 1

    # Tensor infos keep their order; only the trailing u64 offset of each changes.
    infos = bytearray()
    offsets, running = [], 0
    for t in reader.tensors:
        raw = bytearray(data[t.field.offset:t.field.offset + _field_size(t.field)].tobytes())
        raw[-8:] = struct.pack("<Q", running)
        infos += raw
        offsets.append(running)
        running += _pad(int(t.n_bytes), alignment)

    header = struct.pack("<IIQQ", GGUF_MAGIC, version, len(reader.tensors), n_kv) + bytes(kv_bytes) + bytes(infos)
    return header, offsets, _pad(len(header), alignment)


def _zero_fill(fh, n: int) -> None:
    if n < 0:
        raise AssertionError("realign layout overlaps")  # a bug here, never the input's fault
    if n:
        fh.write(b"\0" * n)


def _verify_data(source, out, tensors, dst_offsets, done, total, callback) -> int:
    for t, dst_at in zip(tensors, dst_offsets):
        checked = 0
        while checked < t.n_bytes:
            n = min(COPY_CHUNK, t.n_bytes - checked)
            source.seek(t.offset + checked)
            out.seek(dst_at + checked)
            if source.read(n) != out.read(n):
                raise FlashflexError(
                    f"realign verification failed: tensor {t.name} differs from the source near byte {checked:,}",
                    "check the disk (dmesg, free space) and run realign again; nothing was written")
            checked += n
            done += n
            if callback:
                callback(done, total)
    return done


def _verify_header(src: Path, dst: Path, reader, tensors, data_start: int, offsets: list[int],
                   alignment: int) -> None:
    """Read the new file back as GGUF and check it says what was planned; remove it if not."""
    try:
        new = open_gguf(dst)
        problems = []
        if int(new.alignment) != alignment:
            problems.append(f"general.alignment is {new.alignment}")
        if [t.name for t in new.tensors] != [t.name for t in tensors]:
            problems.append("tensor names or order differ")
        for old_t, new_t, rel in zip(reader.tensors, new.tensors, offsets):
            if (int(new_t.data_offset) != data_start + rel or new_t.tensor_type != old_t.tensor_type
                    or list(new_t.shape) != list(old_t.shape)):
                problems.append(f"tensor {new_t.name} is misplaced or changed")
                break
        old_meta, new_meta = read_metadata(reader, None), read_metadata(new, None)
        old_meta.pop(Keys.General.ALIGNMENT, None)
        new_meta.pop(Keys.General.ALIGNMENT, None)
        if old_meta != new_meta:
            problems.append("metadata differs")
        if problems:
            raise FlashflexError(f"realign verification failed for {dst}: {'; '.join(problems)}",
                                 "report this bug with the source file's `flashflex gguf inspect --json`")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            dst.unlink()
        raise
