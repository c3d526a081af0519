"""Atomic file and directory writes: temp path, fsync, rename. Nothing half-written survives a crash."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(dest: Path, mode: str = "wb") -> Iterator[BinaryIO]:
    """Write `dest` through a temp file in the same directory; rename only on success."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished file gets the usual mode
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Build a directory at a temp path beside `dest`; swap it in only on success."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def safe_extractall(tar, dest: Path, members=None) -> None:
    """tar.extractall refusing absolute paths, `..` and links out of `dest` (on every Python version)."""
    import tarfile

    if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.10.12
        tar.extractall(dest, members=members, filter="data")
        return
    root = Path(dest).resolve()
    chosen = list(members) if members is not None else tar.getmembers()
    for m in chosen:
        target = (root / m.name).resolve()
        if not (target == root or root in target.parents) or m.issym() or m.islnk() or m.isdev():
            raise tarfile.TarError(f"refusing unsafe archive member {m.name!r}")
    tar.extractall(dest, members=chosen)
