"""Where flashflex keeps user state.

Everything (sdists, build trees, wheels, ccache, the default model) lives under one cache root,
relocatable with FLASHFLEX_HOME, never inside the repository.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The user cache dir: $FLASHFLEX_HOME, else $XDG_CACHE_HOME/flashflex, else ~/.cache/flashflex."""
    env = os.environ.get("FLASHFLEX_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "flashflex"


def repo_root() -> Path:
    """The flashflex checkout this package runs from (holds vendor/ and patches/)."""
    env = os.environ.get("FLASHFLEX_REPO")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parent.parent
    return here
