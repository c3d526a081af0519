"""Byte sizes and rates as people write them, and back.

Conventions (one rule everywhere in flashflex: CLI flags, YAML, plan output):

- `KiB MiB GiB TiB` are binary (1024-based); `KB MB GB TB` are decimal (1000-based), as on disk labels;
- a single letter `K M G T` is binary, as in cgroup `memory.max`, `docker --memory` and `sort -S`;
- `B` (or no unit after an integer with `B`) is bytes: `4096B`;
- a BARE number is GiB: `0.5` = 512 MiB, `2` = 2 GiB. This follows FlexInfer's `-am 0.5`, whose "GB" budget
  sizes RAM, and RAM is sized in binary units; it also makes `2` and `2G` agree;
- units are case-insensitive (`2gib`, `512mb`); bits are never meant;
- `auto` (budgets only) = memory available now (psutil) minus a headroom, by default `DEFAULT_HEADROOM`.

Rates (read bandwidth) are sizes followed by `/s`: `1.1GB/s`, `500MiB/s`; a bare number is GiB/s.
Output always uses binary units (`format_size`), except rates which read better in decimal GB/s.
"""

from __future__ import annotations

import math
import re

from orchestrator.errors import FlashflexError

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

_UNITS: dict[str, int] = {
    "b": 1,
    "k": KiB, "kib": KiB, "kb": 1000,
    "m": MiB, "mib": MiB, "mb": 1000**2,
    "g": GiB, "gib": GiB, "gb": 1000**3,
    "t": TiB, "tib": TiB, "tb": 1000**4,
}  # fmt: skip

BARE_NUMBER_UNIT = GiB
"""What a number without a unit means: GiB (FlexInfer's `-am 0.5` style)."""

BARE_NUMBER_LIMIT = 64 * 1024
"""A bare number above this many GiB (64 TiB) is almost surely bytes meant without `B`; refused."""

DEFAULT_HEADROOM = GiB
"""What `auto` leaves to the OS, page cache and other processes: 1 GiB."""

_SIZE_RE = re.compile(
    r"^\s*(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE](?P<exp>[+-]?[0-9]+))?\s*(?P<unit>[a-zA-Z]*)\s*$")

_SIZE_FIX = "write a size like 2GiB, 1.5G, 512MiB, 300MB, 4096B or a bare number of GiB such as 0.5"


def parse_size(text: str | int | float, *, what: str = "size") -> int:
    """Bytes in `text` (see the module docstring for units). `auto` is not accepted here: see parse_budget.

    Raises FlashflexError naming `what` for anything else.
    """
    if isinstance(text, bool):
        raise FlashflexError(f"{what}: {text!r} is not a size", _SIZE_FIX)
    if isinstance(text, (int, float)):
        return _bare(float(text), what, str(text))
    m = _SIZE_RE.match(str(text))
    if not m:
        raise FlashflexError(f"{what}: {text!r} is not a size", _SIZE_FIX)
    value = float(m.group("num") + (f"e{m.group('exp')}" if m.group("exp") else ""))
    unit = m.group("unit").lower()
    if not unit:
        return _bare(value, what, text)
    if unit not in _UNITS:
        raise FlashflexError(f"{what}: unknown unit {m.group('unit')!r} in {text!r}",
                             "use B, K/KiB, M/MiB, G/GiB, T/TiB (binary) or KB, MB, GB, TB (decimal)")
    return _checked(value * _UNITS[unit], what, text)


def _bare(value: float, what: str, text: str) -> int:
    if value > BARE_NUMBER_LIMIT:
        raise FlashflexError(f"{what}: bare number {text} would mean {text} GiB",
                             f"a bare number is GiB; for bytes write {text}B")
    return _checked(value * BARE_NUMBER_UNIT, what, text)


def _checked(n_bytes: float, what: str, text: str) -> int:
    if not math.isfinite(n_bytes) or n_bytes < 0:
        raise FlashflexError(f"{what}: {text!r} is not a size", _SIZE_FIX)
    return int(n_bytes)


def is_auto(text: str | int | float) -> bool:
    return isinstance(text, str) and text.strip().lower() == "auto"


def available_memory() -> int:
    """Bytes of memory the kernel says are available now (free + reclaimable), via psutil."""
    import psutil

    return int(psutil.virtual_memory().available)


def parse_budget(text: str | int | float, *, headroom: str | int | float = DEFAULT_HEADROOM,
                 available: int | None = None, what: str = "budget") -> int:
    """A RAM budget in bytes: a size, or `auto` = available memory minus `headroom`.

    `available` replaces the psutil reading (tests, or a cgroup limit the caller knows).
    """
    if not is_auto(text):
        n = parse_size(text, what=what)
        if n <= 0:
            raise FlashflexError(f"{what}: {text!r} is zero", "give a positive budget such as 2GiB")
        return n
    head = headroom if isinstance(headroom, int) and not isinstance(headroom, bool) else parse_size(
        headroom, what="headroom")
    avail = available_memory() if available is None else available
    if avail - head <= 0:
        raise FlashflexError(
            f"{what}: auto found {format_size(avail)} available, not more than the {format_size(head)} headroom",
            "free some memory, lower budget.headroom, or give an explicit budget such as 2GiB")
    return avail - head


def parse_rate(text: str | int | float, *, what: str = "bandwidth") -> int:
    """Bytes per second in `1.1GB/s`, `500MiB/s`, `1.1GB` or a bare number (GiB/s)."""
    if isinstance(text, str):
        stripped = text.strip()
        if stripped.lower().endswith("/s"):
            stripped = stripped[:-2]
        text = stripped
    n = parse_size(text, what=what)
    if n <= 0:
        raise FlashflexError(f"{what}: {text!r} is zero", "give a positive rate such as 1.1GB/s")
    return n


def format_size(n_bytes: int | float, *, round_up: bool = False) -> str:
    """`1.50 GiB`, `512 MiB`, `23.4 KiB`, `300 B`: binary units, three significant digits.

    `round_up` rounds the last digit up, never down: for minimums ("needs at least 1.24 GiB").
    """
    n = float(n_bytes)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return sign + _three_digits(n / scale, round_up) + " " + unit
    return f"{sign}{math.ceil(n) if round_up else int(n)} B"


def format_rate(bytes_per_s: int | float) -> str:
    """`1.10 GB/s`: decimal, as storage bandwidth is usually quoted."""
    n = float(bytes_per_s)
    for unit, scale in (("TB/s", 1000**4), ("GB/s", 1000**3), ("MB/s", 1000**2), ("KB/s", 1000)):
        if n >= scale:
            return _three_digits(n / scale) + " " + unit
    return f"{int(n)} B/s"


def _three_digits(x: float, round_up: bool = False) -> str:
    decimals = 0 if x >= 100 else 1 if x >= 10 else 2
    if round_up:
        scale = 10**decimals
        x = math.ceil(x * scale - 1e-9) / scale
    return f"{x:.{decimals}f}"
