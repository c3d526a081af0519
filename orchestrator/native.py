"""ctypes bindings for OUR C API (include/llama-flashflex.h), on the libllama that llama_cpp loaded.

Nothing else in flashflex calls C. Each binding carries its C declaration, so a change to the header is a
mechanical diff here. Upstream functions are reached through llama_cpp's own bindings.
"""

from __future__ import annotations

import ctypes
import json
from functools import lru_cache
from typing import Any

from orchestrator.errors import FlashflexError


class NotPatched(FlashflexError):
    """The installed llama_cpp is stock (or missing): flashflex's execution paths are unavailable."""


def llama_cpp_module():
    try:
        import llama_cpp  # noqa: F401
        import llama_cpp.llama_cpp as lowlevel
    except ImportError as exc:
        raise NotPatched("llama_cpp (llama-cpp-python) is not installed in this environment",
                         "run: flashflex build") from exc
    return lowlevel


@lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    """The shared library llama_cpp loaded, with our symbols bound, or NotPatched."""
    lowlevel = llama_cpp_module()
    cdll: ctypes.CDLL = lowlevel._lib
    try:
        # int32_t llama_flashflex_api_version(void);
        cdll.llama_flashflex_api_version.argtypes = []
        cdll.llama_flashflex_api_version.restype = ctypes.c_int32
        # const char * llama_flashflex_info(void);
        cdll.llama_flashflex_info.argtypes = []
        cdll.llama_flashflex_info.restype = ctypes.c_char_p
    except AttributeError as exc:
        raise NotPatched("the installed llama_cpp is stock: it lacks the flashflex C API",
                         "run: flashflex build (it installs the patched build into this environment)") from exc
    return cdll


def is_patched() -> bool:
    try:
        lib()
    except NotPatched:
        return False
    return True


def info() -> dict[str, Any]:
    """llama_flashflex_info() decoded: api_version, series_hash, features, backends."""
    raw = lib().llama_flashflex_info()
    return json.loads(raw.decode())


def system_info() -> str:
    """Upstream's llama_print_system_info(): the CPU features the backend was compiled for and detected."""
    lowlevel = llama_cpp_module()
    return lowlevel.llama_print_system_info().decode(errors="replace").strip()
