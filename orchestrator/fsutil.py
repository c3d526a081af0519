"""Atomic file and directory writes: temp path, fsync, rename. Nothing half-written survives a crash.

Temp paths are `.NAME.PID.XXXX.partial` beside the destination. A writer interrupted by SIGINT, SIGTERM or
SIGHUP removes its own (the CLI turns those signals into exceptions, see orchestrator.cli.main); one killed
outright (SIGKILL, power loss) leaves it behind, and the next write to the same destination sweeps partials
whose process is gone. A destination that exists but is not a regular file (a device, FIFO, socket or
directory) is refused: renaming over it would replace, say, /dev/full with a file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, ContextManager, Iterator, Literal, TextIO, overload

from orchestrator.errors import FlashflexError


def require_input_file(path: Path, what: str, fix: str) -> Path:
    """`path` as a readable regular file, or one line: missing, empty name, directory, FIFO/device."""
    if str(path) in ("", "."):
        raise FlashflexError(f"{what} is empty", fix)
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FlashflexError(f"{what} {path} does not exist", fix) from None
    except OSError as exc:
        raise FlashflexError(f"cannot read {what} {path}: {exc.strerror}", fix) from None
    if stat.S_ISDIR(mode):
        raise FlashflexError(f"{what} {path} is a directory", fix)
    if not stat.S_ISREG(mode):
        raise FlashflexError(f"{what} {path} is not a regular file (a FIFO, device or socket)", fix)
    return path


def check_output_path(dest: Path, *, force: bool = False, kind: str = "file", flag: str = "--force") -> Path:
    """Refuse, before any work, a destination that cannot or must not be replaced: an empty name, a missing
    parent directory, a non-regular file (or, for kind "dir", a non-directory), or an existing one without
    `flag`."""
    if str(dest) in ("", "."):
        raise FlashflexError("the output path is empty", "give a file path")
    dest = Path(dest).expanduser()
    if not dest.parent.is_dir():
        raise FlashflexError(f"cannot write {dest}: {dest.parent} does not exist", "create it or pick another path")
    if dest.exists() or dest.is_symlink():
        try:
            mode = dest.stat().st_mode
        except OSError:
            mode = 0
        if kind == "file" and stat.S_ISDIR(mode):
            raise FlashflexError(f"{dest} is a directory", "give a file path (a new file, or --force over a file)")
        if kind == "file" and not stat.S_ISREG(mode):
            raise FlashflexError(f"{dest} is not a regular file (a device, FIFO or socket); refusing to replace it",
                                 "write to a regular file path")
        if kind == "dir" and not stat.S_ISDIR(mode):
            raise FlashflexError(f"{dest} exists and is not a directory; refusing to replace it",
                                 "pick another output path")
        if not force:
            raise FlashflexError(f"{dest} already exists", f"pass {flag} to overwrite it")
    return dest


def check_free_space(directory: Path, need: int, what: str) -> None:
    """Refuse up front a write that cannot fit on the disk (with 1% or 64 MiB of headroom)."""
    free = shutil.disk_usage(directory).free
    if need + max(need // 100, 64 << 20) > free:
        raise FlashflexError(f"{what} needs {need / 2**30:.2f} GiB but {directory} has {free / 2**30:.2f} GiB free",
                             "free some space or write elsewhere")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_partials(dest: Path) -> list[Path]:
    """Remove `.NAME.PID.*.partial` temp paths of `dest` left by processes that no longer run."""
    dest = Path(dest)
    removed: list[Path] = []
    if not dest.parent.is_dir():
        return removed
    prefix = f".{dest.name}."
    for entry in dest.parent.iterdir():
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".partial")):
            continue
        pid_text = name[len(prefix):].split(".", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def _refuse_non_regular(dest: Path, kind: str) -> None:
    try:
        mode = os.stat(dest).st_mode
    except FileNotFoundError:
        return
    ok = stat.S_ISDIR(mode) if kind == "dir" else stat.S_ISREG(mode)
    if not ok:
        what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise FlashflexError(f"{dest} is {what}; refusing to replace it", "write to another path")


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


@overload
def atomic_file(dest: Path, mode: Literal["wb", "w+b"] = "wb") -> ContextManager[BinaryIO]: ...
@overload
def atomic_file(dest: Path, mode: Literal["w"]) -> ContextManager[TextIO]: ...


@contextlib.contextmanager
def atomic_file(dest: Path, mode: str = "wb") -> Iterator[Any]:  # the overloads above give the file type
    """Write `dest` through a temp file in the same directory; rename only on success."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _refuse_non_regular(dest, "file")
    sweep_stale_partials(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".partial", dir=dest.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished file gets the usual mode
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        with signals_deferred(), contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP are held back and delivered at its end: a cleanup that a second
    signal interrupted would leave a partial file behind. Main thread only; elsewhere signals never reach Python."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    sigs = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {sig: signal.signal(sig, lambda signum, _frame: held.append(signum)) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(held):
            signal.raise_signal(sig)


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Build a directory at a temp path beside `dest`; swap it in only on success."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _refuse_non_regular(dest, "dir")
    sweep_stale_partials(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".partial", dir=dest.parent))
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
        with signals_deferred():
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
