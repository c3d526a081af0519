"""The words for modes, defined once: what each vocabulary is for, its values, and the questions asked of them.

A run is described by axes, and the mode words are labels of their combinations:

- MoEMode, the MoE mode a user asks for: `moe.mode` in a RunConfig, `--moe-mode`, Plan.moe.requested_mode.
  auto | stock | resident | resident-bank | slot-bank | oracle-all-hit | oracle-prefetch.
- PlannedMoEMode, the mode the plan resolves that to: Plan.moe.mode. The same without auto (the planner turns auto
  into stock when every weight fits, else slot-bank). The plan also states its axes (Plan.moe): where routed
  experts are read from (ExpertSource: gguf | sidecar), whether they live in slot banks, and which trace replay
  (Replay: none | all-hit | prefetch) — the knobs the C API takes.
- The execution label, how a run executes (`mode` in run stats, `run --dry-run`, `chat`'s /stats and the server's
  /flashflex/stats): `label(...)` derives it from a RuntimeSpec's axes: dense-stream when only dense tensors stream
  (stock llama.cpp otherwise), the bank's mode word when experts are banked, stock or resident when neither.
- BenchMode, the label of a benchmark point and of its result record (bench.runs.Point.mode): the stock
  baselines stock-mmap (repack off, weights in the page cache) and stock-resident (stock's default), resident
  (stock without mmap), flashflex (a dense plan), and the banked MoE modes slot-bank, oracle-prefetch,
  oracle-all-hit.

Compare against the constants and helpers here, never against a spelled-out string (tests/test_modes.py checks
that no other module quotes a mode word).
"""

from __future__ import annotations

import typing
from typing import Final, Literal

# --------------------------------------------------------------------------------------------------
# The words

AUTO: Final = "auto"
STOCK: Final = "stock"
RESIDENT: Final = "resident"
RESIDENT_BANK: Final = "resident-bank"
SLOT_BANK: Final = "slot-bank"
ORACLE_ALL_HIT: Final = "oracle-all-hit"
ORACLE_PREFETCH: Final = "oracle-prefetch"
DENSE_STREAM: Final = "dense-stream"
STOCK_MMAP: Final = "stock-mmap"
STOCK_RESIDENT: Final = "stock-resident"
FLASHFLEX: Final = "flashflex"

# --------------------------------------------------------------------------------------------------
# The vocabularies (Literal types for pydantic and readers; tuples of their values, in that order)

MoEMode = Literal["auto", "stock", "resident", "resident-bank", "slot-bank", "oracle-all-hit", "oracle-prefetch"]
MOE_MODES: tuple[str, ...] = typing.get_args(MoEMode)

PlannedMoEMode = Literal["stock", "resident", "resident-bank", "slot-bank", "oracle-all-hit", "oracle-prefetch"]
PLANNED_MOE_MODES: tuple[str, ...] = typing.get_args(PlannedMoEMode)

EXECUTION_MODES: tuple[str, ...] = (STOCK, RESIDENT, DENSE_STREAM, RESIDENT_BANK, SLOT_BANK, ORACLE_ALL_HIT,
                                     ORACLE_PREFETCH)
"""Every execution label (`label`)."""

SIDECAR_MODES = frozenset({RESIDENT_BANK, SLOT_BANK, ORACLE_ALL_HIT, ORACLE_PREFETCH})
"""Modes whose routed experts the runtime reads from the sidecar."""

BenchMode = Literal["stock-mmap", "stock-resident", "resident", "flashflex", "slot-bank", "oracle-prefetch",
                    "oracle-all-hit"]
BENCH_MODES: tuple[str, ...] = typing.get_args(BenchMode)

# --------------------------------------------------------------------------------------------------
# The axes (Plan.moe, RuntimeSpec.banks)

GGUF: Final = "gguf"
SIDECAR: Final = "sidecar"
ExpertSource = Literal["gguf", "sidecar"]

REPLAY_NONE: Final = "none"
REPLAY_ALL_HIT: Final = "all-hit"
REPLAY_PREFETCH: Final = "prefetch"
Replay = Literal["none", "all-hit", "prefetch"]

ROUTER_LOOKAHEAD: Final = "router-lookahead"
MoEPrefetch = Literal["none", "router-lookahead", "oracle"]
"""Expert read-ahead the runtime does: what moe.prefetch asks for (none | router-lookahead), or oracle, which a
replayed trace brings (oracle-prefetch)."""

# --------------------------------------------------------------------------------------------------
# Groups and the questions asked of a mode

ALL_RESIDENT_MODES = frozenset({STOCK, RESIDENT, RESIDENT_BANK})
"""Planned modes that keep every routed expert resident (they must fit the budget; no slot bank)."""
BANKED_MODES = frozenset({SLOT_BANK, ORACLE_ALL_HIT, ORACLE_PREFETCH})
"""Modes whose routed experts live in per-layer slot banks sized by the plan (also the banked bench labels)."""
TRACE_REPLAY_MODES = frozenset({ORACLE_ALL_HIT, ORACLE_PREFETCH})
"""Modes that replay a routing trace (moe.trace is required)."""
STOCK_LOADER_MODES = frozenset({STOCK, RESIDENT})
"""Modes in which llama.cpp loads every weight from the GGUF itself, as stock does (resident: without mmap): no
sidecar, no banks. A run in one of them whose plan streams dense tensors executes as dense-stream."""
STOCK_BASELINES = (STOCK_MMAP, STOCK_RESIDENT)
"""Bench labels of the stock llama.cpp baselines."""
PLANNED_BENCH_MODES = (FLASHFLEX, SLOT_BANK, ORACLE_PREFETCH, ORACLE_ALL_HIT)
"""Bench labels of points flashflex plans (the others run stock llama.cpp)."""


def keeps_every_expert(mode: str) -> bool:
    """A planned MoE mode that holds every routed expert resident (stock, resident, resident-bank)."""
    return mode in ALL_RESIDENT_MODES


def is_banked(mode: str) -> bool:
    """A mode (or bench label) whose routed experts live in slot banks: slot-bank and the oracle modes."""
    return mode in BANKED_MODES


def is_oracle(mode: str) -> bool:
    """An oracle mode: replays a routing trace (a ceiling, not a product)."""
    return mode in TRACE_REPLAY_MODES


def reads_sidecar(mode: str) -> bool:
    """A mode whose routed experts the runtime reads from the sidecar: resident-bank, slot-bank, the oracles."""
    return mode in SIDECAR_MODES


def is_stock_baseline(label: str) -> bool:
    """A bench label of a stock llama.cpp baseline (stock-mmap, stock-resident)."""
    return label in STOCK_BASELINES


def replay_of(mode: str) -> str:
    """The trace replay a planned mode does: all-hit, prefetch or none."""
    return {ORACLE_ALL_HIT: REPLAY_ALL_HIT, ORACLE_PREFETCH: REPLAY_PREFETCH}.get(mode, REPLAY_NONE)


def label(*, banked_slots: int | None, replay: str = REPLAY_NONE, streams: bool = False,
          use_mmap: bool | None = None) -> str:
    """The execution label of a run's axes (RuntimeSpec.mode): the bank's word when experts come from the sidecar
    (`banked_slots` not None; 0 = every expert resident: resident-bank; an oracle word for a replay; else slot-bank);
    dense-stream when only dense tensors stream; resident for stock without mmap; stock."""
    if banked_slots is not None:
        if banked_slots == 0:
            return RESIDENT_BANK
        return {REPLAY_ALL_HIT: ORACLE_ALL_HIT, REPLAY_PREFETCH: ORACLE_PREFETCH}.get(replay, SLOT_BANK)
    if streams:
        return DENSE_STREAM
    return RESIDENT if use_mmap is False else STOCK
