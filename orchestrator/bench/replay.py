"""The drafting controller replayed over recorded texts, with a cost model instead of a machine: what it would draft
and what that would cost, deterministically (a decode on this host swings by up to 70% between hours, which hides a
controller's few percent).

A text is a recorded run's prompt and output tokens. At every call the drafter sees the context so far and drafts;
the model "keeps" the drafted tokens that equal the text's and adds its own; each decode is charged in single-step
units (Costs) and reported to the drafter as `attach`'s eval would, so the controller measures what it is charged.
Drafting does not change the text here (with sampling the text would differ, with the same statistics; greedy
ones may flip at near ties), so the replay prices decisions, not outputs.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

STEP_SECONDS = 0.03  # what a unit is reported as (the controller works in ratios)


@dataclass
class Costs:
    """A decode's cost in plain steps. Defaults: Gemma 3 270M at 215 MiB, lent rows (docs/benchmarks.md, 2026-12-07
    night): a plain step 37.8 ms; two tokens after a verification 46.5 ms (+0.23), each more token +3%; a
    verification after plain steps 9.5 ms more (+0.25, the lent memory taken back); the steps after a verification
    11.7, 1.9, 2.4 and 2.8 ms slower than plain ones (the memory lent again)."""

    verify: float = 0.23  # a second token, beyond a plain step
    per_token: float = 0.03  # each token after the second
    entry: float = 0.25  # a verification after a plain step, more
    after: tuple[float, ...] = (0.31, 0.05, 0.06, 0.07)  # the plain steps after a verification, more

    def verification(self, n_tokens: int, after_plain: bool) -> float:
        return 1.0 + self.verify + self.per_token * (n_tokens - 2) + (self.entry if after_plain else 0.0)


@dataclass
class Replay:
    """One text replayed: tokens generated, their cost in plain steps, and every call as (the context's length, the
    length of the draft sent)."""

    tokens: int
    cost: float
    calls: list[tuple[int, int]] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        return [k for _, k in self.calls]

    @property
    def speedup(self) -> float:
        return self.tokens / self.cost if self.cost else 0.0


def replay(drafter: Any, text: Sequence[int], prompt: int, costs: Costs | None = None) -> Replay:
    """Generate text[prompt:] after text[:prompt] with `drafter` (a speculative.Drafter), as llama-cpp-python's
    generate calls it."""
    costs = costs or Costs()
    ids = np.asarray(text, dtype=np.intc)
    n, total, calls, since = prompt, 0.0, [], None  # since: plain steps since the last verification
    while n < len(ids):
        draft = np.asarray(drafter(ids[:n]), dtype=np.intc)
        kept = 0
        while kept < len(draft) and n + kept < len(ids) and draft[kept] == ids[n + kept]:
            kept += 1
        if len(draft):
            cost = costs.verification(1 + len(draft), after_plain=since is None or since > 0)
            since = 0
        else:
            cost = 1.0 + (costs.after[since] if since is not None and since < len(costs.after) else 0.0)
            since = None if since is None else since + 1
        drafter.observe_eval(1 + len(draft), cost * STEP_SECONDS)
        total += cost
        calls.append((n, len(draft)))
        n += kept + 1
    drafter.finish(ids)
    return Replay(tokens=len(ids) - prompt, cost=total, calls=calls)


def summary(replays: list[Replay]) -> dict[str, Any]:
    return {"texts": len(replays), "speedup_median": statistics.median(r.speedup for r in replays),
            "speedup_min": min(r.speedup for r in replays),
            "drafts_per_text": statistics.median(sum(1 for k in r.lengths if k) for r in replays),
            "drafted_tokens_per_text": statistics.median(sum(r.lengths) for r in replays)}
