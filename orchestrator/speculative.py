"""Speculative decoding under a budget: draft tokens cheaply, verify them in ONE batch of the model.

When weights stream from disk, a decode step costs one pass over the streamed bytes whether it computes one token
or eight, so verifying several drafted tokens in one batch multiplies the tokens generated per byte read.

Built on llama-cpp-python's draft interface: `Llama.generate` asks `llm.draft_model(input_ids)` for a draft after
every verification, evaluates [last token, *draft] as one batch, samples the model's own token at every position
and keeps drafted tokens only while they equal it (the first mismatch is replaced by the model's token and the KV
cache is cut back there). The output is therefore the model's own, token for token, for any drafter.

What this module adds:

- drafters: `PromptLookupDrafter` (the last n-gram of the context matched at its most recent earlier occurrence;
  what followed is the draft) and `ModelDrafter` (a small GGUF with the same vocabulary, opened stock and kept
  resident, drafting greedily; a model of another vocabulary is refused by `check_vocab`);
- `DraftLength`, the adaptive draft length: acceptance is inferred from the next call's input ids (how many
  drafted tokens the model kept), the cost of a verification batch of n tokens against a single-token step is
  measured on every verification, and the length maximising expected tokens per second is chosen: 0 when drafts
  fail (prompt lookup's drafts still judged, unsent, at every token; a draft model's probed now and then), up to
  max_tokens when they hit;
- `attach`, which gives an open Llama the drafter and an eval that asks llama.cpp for every row's logits only in
  verification batches (llama-cpp-python's own draft path needs logits_all, which keeps n_ctx x n_vocab floats
  and computes the output head for every prompt token: 1 MiB per token for Gemma's 262k vocabulary);
- `DraftSetup`: the checked settings and the RAM the drafting costs (draft weights, KV cache and compute
  buffers, and the verification batch's logits), which the plan reserves (planner.DraftPlan).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from orchestrator.errors import FlashflexError
from orchestrator.run.settings import GenerationSettings

if TYPE_CHECKING:
    from orchestrator.config import RunConfig

_EMPTY = np.zeros(0, dtype=np.intc)
_PRIOR_POINTS = 4.0  # the prior slope weighs as much as this many verifications one token apart
AFTERMATH_STEPS = 4
"""Single-token steps after a verification whose time beyond a plain step is that verification's: with lent rows a
verification after plain steps takes memory back from streamed weights and the steps after it lend it again, which
slows the next step by a third of a step and the three after it by a few percent each (Gemma 3 270M at 215 MiB:
37.8 ms a plain step, 49.5 ms the next, 39.6-40.6 ms the three after), so pricing only the next step let drafts
that failed between plain steps look cheaper than they were."""


# --------------------------------------------------------------------------------------------------
# The draft length: acceptance and cost, measured


class DraftLength:
    """How many tokens to draft before the next verification.

    Acceptance is two rates, as llama-server's drafting under a plan keeps them (llama-flashflex-draft.cpp): f,
    how often a draft's first token is kept, and c, how often a token is kept after a kept one, so a draft of k
    yields 1 + f (1 + c + ... + c^(k-1)) tokens per verification (the model's own token always comes with it).
    Prompt lookup's drafts differ in the two: on sampled free text a draft's first token is kept a quarter of the
    time, but a copy that starts tends to go on (c 0.55-0.65: Gemma 3 270M's stories and letters); one rate for
    both read 0.3-0.7 after one repeated name, and drafts went out that failed. Each is a decayed ratio of kept to
    judged tokens from a prior: f per draft (`decay_first`, a memory of some seven drafts, so a copy that ends stops
    the drafting within a few failures), c per judged token (`decay_next`, some thirty tokens).

    The cost of a verification of n tokens is measured per n: the median of its last `cost_window` verifications
    (so one slowed by another process does not turn drafting off), each with what it made the steps after it pay
    (AFTERMATH_STEPS), and a plain step's cost from steps clear of that; used as the ratio r(n) = t(n) / t(1).
    Verifications that come after a plain step (an entry) are measured apart, as ratios to the plain steps just
    before them: with lent rows an entry takes memory back from streamed weights and the steps after it lend it
    again, which a verification after a verification does not (Gemma 3 270M at 215 MiB: 56 against 46 ms for two
    tokens, and 22 ms more over the steps after it, against plain steps of 38 ms). So a draft after plain steps is
    priced at what starting to draft costs, and one after a draft at what going on costs. Batches of two or more
    tokens follow a line a + b n fitted through their medians, apart from the single-token step: on a CPU a
    second token costs far more than each one after it (a batch switches matrix kernels and computes one more
    output row; measured on Gemma 3 270M under a streaming budget: t(2) = 1.3 t(1), t(8) = 1.35-1.5 t(1)), so a
    straight line through t(1) and t(2) would price a long draft at twice what it costs. With one batch size m
    measured, the sizes around it add the prior slope or the mean slope from t(1) to t(m), the lower; with none,
    the prior slope from t(1). r(n) stays within [1, n] (a batch is never cheaper than a step, nor dearer than n
    of them). Drafting costs its own measured seconds per drafted token. The length chosen maximises
    (1 + f (1 + c + ... + c^(k-1))) / (r(k + 1) + k d), and must beat no drafting by `min_gain`, or at an entry
    by `entry_gain`: an entry's cost is measured against the few plain steps before it, on a machine whose steps
    swing by a third from one to the next, and one that fails pays the lent memory's round trip. So going on needs
    3% more tokens a second, starting 25%: a copy clears that at its first kept drafts (f 0.5 and c 0.9 promise
    1.8x), the phrase a story repeats does not (sampled Gemma runs drafted up to 171 tokens, 5-18% of them kept,
    with drafts after one or two kept shadows, against a quarter of the shadows' first tokens kept).

    The first verification drafts nothing, so the single-token step is measured before any draft goes out, and
    the first draft is one token, which measures a longer batch cheaply. At length 0 nothing is learnt about
    acceptance, so a probe of one token goes out after `probe_gap` verifications; a probe that fails doubles the
    gap (up to `max_probe_gap`), one that hits resets it. Where a longer batch costs more than usual, the gap
    starts longer, so that probes cost at most `probe_budget` (1%) of the time, but never beyond `max_probe_gap`
    (a cost measured during a burst of load elsewhere is measured again). A text whose drafts never hit thus pays
    one two-token batch at the start and one every 64 tokens after.

    With `shadowed` set (by a drafter whose drafts cost nothing of the model: prompt lookup), acceptance is also
    observed at length 0: the draft it would have made is judged against the tokens the model then takes (its
    "shadow", Drafter), so f and c follow the text at every token and no probe goes out. Where drafts fail that costs
    nothing, and where the text turns to copying, drafting starts at the next token instead of the next probe.

    With `adaptive` false the length is always `max_tokens` (deterministic: what exactness tests compare)."""

    def __init__(self, max_tokens: int, adaptive: bool = True, *, decay_first: float = 0.85,
                 decay_next: float = 0.97, prior_acceptance: float = 0.5, prior_weight: float = 2.0,
                 prior_slope: float = 0.1, cost_alpha: float = 0.3, min_gain: float = 0.03,
                 entry_gain: float = 0.25, probe_gap: int = 4,
                 max_probe_gap: int = 64, probe_budget: float = 0.01, cost_window: int = 9):
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        self.max_tokens = max_tokens
        self.adaptive = adaptive
        self.decay_first = decay_first
        self.decay_next = decay_next
        self.prior_slope = prior_slope
        self.cost_alpha = cost_alpha
        self.min_gain = min_gain
        self.entry_gain = entry_gain
        self.min_probe_gap = probe_gap
        self.max_probe_gap = max_probe_gap
        self.probe_budget = probe_budget
        self.cost_window = cost_window
        self._first = [prior_acceptance * prior_weight, prior_weight]  # a draft's first token: [kept, judged]
        self._next = [prior_acceptance * prior_weight, prior_weight]  # a token after a kept one: [kept, judged]
        self._samples: dict[int, deque[float]] = {}  # batch tokens -> seconds of its recent verifications
        self._entries: dict[int, deque[float]] = {}  # the same, of verifications that came after a plain step
        self._drafting = False  # the last proposal drafted
        self._pricing_entry = False
        self._draft_cost: list[float] = [0.0, 0.0]  # [mean seconds per drafted token, samples]
        self._gap = probe_gap
        self._idle = 0  # verifications at length 0 since the last draft went out
        self._probing = False
        self.probes = 0
        self.shadowed = False  # acceptance observed at length 0 too (see the class's docstring): no probes

    # -- what was measured ---------------------------------------------------------------------------
    @property
    def acceptance(self) -> float:
        """f: how often a draft's first token is kept."""
        return self._first[0] / self._first[1]

    @property
    def continued(self) -> float:
        """c: how often a drafted token is kept after a kept one."""
        return self._next[0] / self._next[1]

    def observe(self, drafted: int, kept: int, start: int = 0) -> None:
        """A verification judged a draft of `drafted` tokens and kept the first `kept` of them (`start`: the ones
        before it were judged already, a shadow judged as its tokens come). A rejected token is judged, the tokens
        after it are not."""
        if drafted <= start:
            return
        kept = max(start, min(kept, drafted))
        missed = 1 if kept < drafted else 0
        if start == 0:
            self._first = [self.decay_first * self._first[0] + (kept > 0), self.decay_first * self._first[1] + 1]
        after = max(start, 1)  # the tokens judged here that follow a kept one
        if kept >= after:
            judged = kept - after + missed
            decay = self.decay_next ** judged
            self._next = [decay * self._next[0] + kept - after, decay * self._next[1] + judged]
        if self._probing:
            self._gap = self.min_probe_gap if kept > 0 else min(2 * self._gap, self.max_probe_gap)
            self._probing = False

    def _recent_step(self) -> float | None:
        """The median of the last 3 plain steps: what an entry is measured against (the steps just before it, on
        the same hour of a machine whose speed swings)."""
        q = self._samples.get(1)
        return statistics.median(list(q)[-3:]) if q else None

    def observe_cost(self, batch_tokens: int, seconds: float, entry: bool = False) -> None:
        """One verification of `batch_tokens` tokens (the last token and the draft) took `seconds`; `entry`: it
        came after a plain step (kept as its ratio to the plain steps just before it)."""
        if batch_tokens < 1 or not (seconds > 0 and math.isfinite(seconds)):
            return
        if entry and batch_tokens > 1:
            step = self._recent_step()
            if step:
                self._entries.setdefault(batch_tokens, deque(maxlen=self.cost_window)).append(seconds / step)
            return
        self._samples.setdefault(batch_tokens, deque(maxlen=self.cost_window)).append(seconds)

    def amend_cost(self, batch_tokens: int, seconds: float, entry: bool = False) -> None:
        """The last verification of `batch_tokens` cost `seconds` in all (with what it made the steps after it pay:
        Drafter.observe_eval)."""
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        if entry and batch_tokens > 1:
            q, step = self._entries.get(batch_tokens), self._recent_step()
            if q and step:
                q[-1] = seconds / step
            return
        q = self._samples.get(batch_tokens)
        if q:
            q[-1] = seconds

    @property
    def _cost(self) -> dict[int, tuple[float, float]]:
        """Batch tokens -> (median seconds of its recent verifications, how many): a median, so one verification
        slowed by another process on the machine does not turn drafting off. While pricing an entry (the length
        after a plain step), the verifications that came after a plain step, where any was measured."""
        costs = {n: (statistics.median(q), float(len(q))) for n, q in self._samples.items()}
        if self._pricing_entry and self._entries and 1 in costs:
            t1 = costs[1][0]
            costs = {1: costs[1], **{n: (t1 * statistics.median(q), float(len(q))) for n, q in self._entries.items()}}
        return costs

    def observe_draft_cost(self, drafted: int, seconds: float) -> None:
        """Drafting `drafted` tokens took `seconds` (the draft model's steps; prompt lookup's search)."""
        if drafted <= 0 or not (seconds >= 0 and math.isfinite(seconds)):
            return
        per = seconds / drafted
        mean, n = self._draft_cost
        self._draft_cost = [per if n == 0 else mean + self.cost_alpha * (per - mean), n + 1]

    # -- the model ----------------------------------------------------------------------------------
    def _batches(self) -> dict[int, float]:
        """Batch tokens (2 or more) -> median seconds, from the sizes measured more than once once any is (a size
        seen once, perhaps while another process held the CPU, does not bend the line of the others)."""
        sizes = {n: (t, w) for n, (t, w) in self._cost.items() if n > 1}
        most = max((w for _, w in sizes.values()), default=0.0)
        return {n: t for n, (t, w) in sizes.items() if w >= min(2.0, most)}

    def _batch_line(self) -> tuple[float, float] | None:
        """(a, b) of t(n) = a + b n through the medians of the measured batches of 2 or more tokens, the slope
        pulled toward the prior slope as much as `_PRIOR_POINTS` verifications would (sizes close together, 7
        and 8 say, say little about it); None unless two sizes are measured."""
        costs = self._cost
        batches = self._batches()
        if len(batches) < 2:
            return None
        t1 = costs[1][0] if 1 in costs else None
        w = {n: costs[n][1] for n in batches}
        sw = sum(w.values())
        mx = sum(w[n] * n for n in batches) / sw
        my = sum(w[n] * t for n, t in batches.items()) / sw
        sxx = sum(w[n] * (n - mx) ** 2 for n in batches)
        sxy = sum(w[n] * (n - mx) * (t - my) for n, t in batches.items())
        prior = self.prior_slope * (t1 if t1 is not None else my / (1.0 + self.prior_slope * (mx - 1)))
        b = max(0.0, (sxy + _PRIOR_POINTS * prior) / (sxx + _PRIOR_POINTS))
        return my - b * mx, b

    def step_seconds(self) -> float | None:
        """Seconds of a single-token step: measured, or (before it is) derived from the measured batches."""
        costs = self._cost
        if 1 in costs:
            return costs[1][0]
        line = self._batch_line()
        if line is not None and line[0] + line[1] > 0:
            return line[0] + line[1]
        if not costs:
            return None
        n, (t, _) = min(costs.items())
        return t / (1.0 + self.prior_slope * (n - 1))

    def batch_seconds(self, n: int) -> float | None:
        """Estimated seconds of a verification of n tokens (see the class's cost model)."""
        t1 = self.step_seconds()
        if t1 is None:
            return None
        if n <= 1:
            return t1
        line = self._batch_line()
        if line is not None:
            t = line[0] + line[1] * n
        else:
            batches = self._batches()
            if batches:  # one size m measured: beyond it each token costs the prior slope, or less where the
                m, tm = next(iter(batches.items()))  # mean slope from t(1) to t(m) is lower (costs are concave)
                t = tm + min(self.prior_slope * t1, max(0.0, tm - t1) / (m - 1)) * (n - m)
            else:
                t = t1 * (1.0 + self.prior_slope * (n - 1))
        return min(max(t, t1), n * t1)

    def cost_ratio(self, n: int) -> float:
        """r(n) = t(n) / t(1): what a verification of n tokens costs in single-token steps."""
        t1 = self.step_seconds()
        tn = self.batch_seconds(n)
        return 1.0 + self.prior_slope * (n - 1) if not t1 or tn is None else tn / t1

    def draft_ratio(self) -> float:
        """Seconds of drafting one token, relative to a single-token step of the model."""
        step = self.step_seconds()
        if not step or self._draft_cost[1] == 0:
            return 0.0
        return self._draft_cost[0] / step

    def throughput(self, k: int) -> float:
        """Expected tokens per single-token-step time with a draft of k."""
        f, c, d = self.acceptance, self.continued, self.draft_ratio()
        expected = 1.0 + f * sum(c ** i for i in range(k))
        return expected / (self.cost_ratio(k + 1) + d * k)

    def best(self, entry: bool = False) -> int:
        """The draft length with the highest expected throughput, 0 unless it beats no drafting by min_gain;
        `entry`: priced as a draft after a plain step (see the class's docstring)."""
        if self.max_tokens == 0:
            return 0
        self._pricing_entry = entry
        try:
            scores = [self.throughput(k) for k in range(self.max_tokens + 1)]
        finally:
            self._pricing_entry = False
        k = max(range(len(scores)), key=scores.__getitem__)
        gain = max(self.min_gain, self.entry_gain) if entry else self.min_gain
        return k if scores[k] >= scores[0] * (1.0 + gain) else 0

    # -- the decision -------------------------------------------------------------------------------
    def propose(self) -> int:
        """Tokens to draft now."""
        if not self.adaptive:
            return self.max_tokens
        if 1 not in self._samples:
            return 0  # one plain step first: the cost of every verification is measured against it
        k = self.best(entry=not self._drafting)
        if k > 0:
            self._probing = False
            return k if len(self._samples) > 1 else 1  # the first draft is one token: it measures the slope cheaply
        if self.max_tokens > 0 and not self.shadowed and self._idle >= self.probe_gap():
            self._probing = True
            return 1
        return 0

    def probe_gap(self) -> int:
        """Verifications at length 0 before a probe: the backed-off gap, and never so short that probes cost more
        than `probe_budget` of the time (a probe costs one more token in a verification, and drafting it)."""
        cost = self.cost_ratio(2) - 1.0 + self.draft_ratio()
        return max(self._gap, min(self.max_probe_gap, math.ceil(cost / self.probe_budget)))

    def drafted(self, n: int) -> None:
        """What the drafter actually produced for the last proposal (prompt lookup may find nothing)."""
        self._drafting = n > 0
        if n > 0:
            self._idle = 0
            if self._probing:
                self.probes += 1
        else:
            self._idle += 1
            self._probing = False  # nothing went out: probe again at the next chance

    def state(self) -> dict[str, Any]:
        return {"acceptance_estimate": self.acceptance, "acceptance_continued": self.continued,
                "cost_ratios": {n: round(self.cost_ratio(n), 4) for n in range(2, self.max_tokens + 2)},
                "entry_cost_ratios": {n: round(statistics.median(q), 4) for n, q in sorted(self._entries.items())},
                "draft_cost_ratio": self.draft_ratio(), "next_length": self.best() if self.adaptive
                else self.max_tokens, "probe_gap": None if self.shadowed else self.probe_gap(),
                "probes": self.probes,
                "verification_seconds": {n: t for n, (t, _) in sorted(self._cost.items())}}


# --------------------------------------------------------------------------------------------------
# Drafters


@dataclass
class DraftStats:
    """What drafting did: drafts sent, tokens drafted, kept and judged (inferred at the next call), and the
    verifications (decode calls of the model) they went into."""

    calls: int = 0  # times the drafter was asked (once per verification)
    drafts: int = 0  # calls that drafted at least one token
    drafted_tokens: int = 0
    judged_tokens: int = 0  # drafted tokens whose verification was seen (the last draft of a run may not be)
    judged_drafts: int = 0
    accepted_tokens: int = 0
    verifications: int = 0  # decode calls of the model after a draft call (with or without a draft)
    verified_tokens: int = 0  # tokens in those calls
    verification_seconds: float = 0.0
    draft_seconds: float = 0.0
    lengths: dict[int, int] = field(default_factory=dict)  # draft length -> how often
    shadow_judged_tokens: int = 0  # tokens of drafts made but not sent (at length 0), judged by what came
    shadow_accepted_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lengths"] = {str(k): v for k, v in sorted(self.lengths.items())}
        out["acceptance_rate"] = self.accepted_tokens / self.judged_tokens if self.judged_tokens else None
        out["accepted_per_draft"] = self.accepted_tokens / self.judged_drafts if self.judged_drafts else None
        return out


class Drafter:
    """A llama-cpp-python draft model (`LlamaDraftModel`: called with the context's token ids, returns drafted
    ids) with the draft length chosen by a DraftLength, acceptance inferred from the next call's input ids, and
    the cost of every verification reported by `attach`'s eval. Subclasses implement `draft(ids, k)`.

    A drafter whose drafts cost nothing of the model (`shadows`: prompt lookup) still drafts, up to the longest
    length, when the length chosen is 0: that draft (its shadow) is not sent, but judged as the model's tokens
    come, as a sent one would be (the tokens kept until the first the model did not take), and tells DraftLength
    the acceptance without a probe."""

    kind = "none"
    shadows = False

    def __init__(self, length: DraftLength):
        self.length = length
        length.shadowed = self.shadows and length.adaptive
        self.stats = DraftStats()
        self.stop_at: int | None = None  # sequence length after which nothing more is wanted (the run's -n)
        self.n_ctx: int | None = None  # the context (set by attach): a draft never runs past it
        self._last: tuple[int, int, np.ndarray] | None = None  # (input length, its last id, the draft)
        self._pending: int | None = None  # tokens the next eval should hold to be this draft's verification
        # after a verification: [its tokens, its seconds, what the steps after it took beyond plain ones, steps left,
        # whether it came after a plain step]
        self._aftermath: list[Any] | None = None
        self._after_plain = False  # the last decode was a plain step
        # the draft not sent: (input length, its last id, the draft, how many of its tokens were judged kept)
        self._shadow: tuple[int, int, np.ndarray, int] | None = None
        # the latest single-token steps as (seconds, seconds waited on reads): what computespeed records
        self.steps: deque[tuple[float, float]] = deque(maxlen=256)

    def draft(self, ids: np.ndarray, k: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset(self, stop_at: int | None = None) -> None:
        """A new sequence starts (acceptance and cost knowledge carry over)."""
        self._last = None
        self._shadow = None
        self._pending = None
        self.stop_at = stop_at

    def close(self) -> None:
        pass

    def __call__(self, input_ids: Sequence[int] | np.ndarray, /, **_kwargs: Any) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.intc)
        self._account(ids)
        self._judge_shadow(ids, settle=False)
        self.stats.calls += 1
        k = proposed = self.length.propose()
        if self.stop_at is not None:
            # the verification brings one token of the model's own besides the kept draft
            k = min(k, max(0, self.stop_at - len(ids) - 1))
        if self.n_ctx is not None:
            k = min(k, max(0, self.n_ctx - len(ids)))
        out = _EMPTY
        if k > 0 and len(ids) > 0:
            t0 = time.perf_counter()
            out = np.asarray(self.draft(ids, k), dtype=np.intc)[:k]
            seconds = time.perf_counter() - t0
            self.stats.draft_seconds += seconds
            self.length.observe_draft_cost(len(out), seconds)
        self.length.drafted(len(out))
        if len(out):
            self._judge_shadow(ids, settle=True)  # one judgement at a time: what the shadow has seen so far
            self.stats.drafts += 1
            self.stats.drafted_tokens += len(out)
        elif proposed == 0 and self.length.shadowed and self._shadow is None and len(ids):
            t0 = time.perf_counter()
            shadow = np.array(self.draft(ids, self.length.max_tokens), dtype=np.intc)
            self.stats.draft_seconds += time.perf_counter() - t0
            if len(shadow):
                self._shadow = (len(ids), int(ids[-1]), shadow, 0)
        self.stats.lengths[len(out)] = self.stats.lengths.get(len(out), 0) + 1
        self._last = (len(ids), int(ids[-1]) if len(ids) else -1, out.copy())
        self._pending = 1 + len(out)
        return out

    def _account(self, ids: np.ndarray) -> None:
        """How many tokens of the previous draft the model kept: the context grew by the kept ones plus the
        model's own token, and starts with the previous context. Anything else is a new sequence."""
        last, self._last = self._last, None
        if last is None:
            return
        n0, tail, draft = last
        kept = len(ids) - n0 - 1
        if not (0 <= kept <= len(draft)) or n0 == 0 or int(ids[n0 - 1]) != tail:
            return
        if not np.array_equal(ids[n0:n0 + kept], draft[:kept]):
            return
        if len(draft):
            self.stats.judged_drafts += 1
            self.stats.judged_tokens += kept + (1 if kept < len(draft) else 0)
            self.stats.accepted_tokens += kept
        self.length.observe(len(draft), kept)

    def _judge_shadow(self, ids: np.ndarray, settle: bool) -> None:
        """Judge the shadow by the tokens taken since it was made (`ids`: the context now), each token as it comes
        (a copy that starts raises the acceptance from its second token on): the ones kept and, once the model took
        another token than the shadow's, that one; it ends there, or when all its tokens came, or with `settle` (a
        sent draft or the sequence's end takes over). A context that does not go on from it drops it."""
        if self._shadow is None:
            return
        n0, tail, draft, counted = self._shadow
        if len(ids) < n0 or int(ids[n0 - 1]) != tail:
            self._shadow = None
            return
        seen = ids[n0:n0 + len(draft)]
        kept = _kept(seen, draft)
        missed = kept < len(seen)
        if kept > counted or missed:
            self.stats.shadow_judged_tokens += kept - counted + missed
            self.stats.shadow_accepted_tokens += kept - counted
            self.length.observe(kept + missed, kept, start=counted)
        self._shadow = None if settle or missed or kept == len(draft) else (n0, tail, draft, kept)

    def finish(self, ids: Sequence[int] | np.ndarray) -> None:
        """The sequence ended (`ids`: the context and every token taken): judge what of the last draft it shows
        (a run that stops at -n may show only part of the last verification)."""
        last, self._last = self._last, None
        ids = np.asarray(ids, dtype=np.intc)
        self._judge_shadow(ids, settle=True)
        if last is None or not len(last[2]):
            return
        n0, tail, draft = last
        if n0 == 0 or len(ids) < n0 or int(ids[n0 - 1]) != tail:
            return
        seen = ids[n0:n0 + len(draft)]
        kept = _kept(seen, draft)
        judged = kept + (1 if kept < len(seen) else 0)
        if judged == 0:
            return
        self.stats.judged_drafts += 1
        self.stats.judged_tokens += judged
        self.stats.accepted_tokens += kept
        self.length.observe(judged, kept)

    def observe_eval(self, n_tokens: int, seconds: float, waited: float | None = None) -> None:
        """Called by attach's eval after every decode: a batch of 1 + the last draft is its verification.
        `waited`: of the seconds, those compute waited on streamed reads (None where nothing streams)."""
        if n_tokens == 1 and waited is not None:
            self.steps.append((seconds, waited))
        entry, self._after_plain = self._after_plain, n_tokens == 1
        after, step = self._aftermath, self.length.step_seconds()
        if after is not None and (n_tokens != 1 or not step):
            after = self._aftermath = None  # another verification (or a prompt) ends it
        if after is not None and step:  # part of the verification's cost, and not a plain step's
            after[2] += seconds - step
            after[3] -= 1
            self.length.amend_cost(after[0], after[1] + max(0.0, after[2]), entry=after[4])
            if after[3] <= 0:
                self._aftermath = None
        pending, self._pending = self._pending, None
        if pending is not None and n_tokens == pending:
            self.stats.verifications += 1
            self.stats.verified_tokens += n_tokens
            self.stats.verification_seconds += seconds
            if after is None:
                self.length.observe_cost(n_tokens, seconds, entry=entry)
            if n_tokens > 1:
                self._aftermath = [n_tokens, seconds, 0.0, AFTERMATH_STEPS, entry]

    def report(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.stats.to_dict(), "length": self.length.state()}


def _kept(seen: np.ndarray, draft: np.ndarray) -> int:
    """How many of the tokens taken after a draft was made (`seen`, at most its length) equal the draft's, up to the
    first that does not."""
    equal = seen == draft[:len(seen)]
    return len(seen) if equal.all() else int(np.argmin(equal))


class PromptLookupDrafter(Drafter):
    """Prompt lookup (n-grams from the context): the last `ngram` tokens are looked for earlier in the context,
    most recent occurrence first; where they occur nowhere, the `ngram` tokens before the last one, followed by
    another token (an edited word, the next number of a list), then shorter n-grams down to one token; the
    tokens that followed the match are the draft. Costs a vectorised scan of the context, no model."""

    kind = "prompt-lookup"
    shadows = True

    def __init__(self, length: DraftLength, ngram: int = 3):
        super().__init__(length)
        if ngram < 1:
            raise ValueError("ngram must be >= 1")
        self.ngram = ngram

    def draft(self, ids: np.ndarray, k: int) -> np.ndarray:
        return lookup(ids, self.ngram, k)


def lookup(ids: np.ndarray, ngram: int, k: int) -> np.ndarray:
    """Up to k tokens that followed the most recent earlier occurrence of the context's last `ngram` tokens; where
    there is none, of the `ngram` tokens before the last one with any token after them (the last token taken as
    a substitution: a copy that changed one token, such as a corrected word or a counter, goes on copying after
    it); then of the last n tokens for n from `ngram` - 1 down to 1. The runtime's lookup
    (llama_flashflex_prompt_lookup), the one llama.cpp's programs draft with under a plan too."""
    from orchestrator import native

    ids = np.ascontiguousarray(ids, dtype=np.intc)  # llama_token: a 32-bit int
    if k < 1:
        return _EMPTY
    out = np.empty(k, dtype=np.intc)
    return out[:native.lib().llama_flashflex_prompt_lookup(ids.ctypes.data, len(ids), ngram, k, out.ctypes.data)]


class ModelDrafter(Drafter):
    """A small model with the same vocabulary, opened stock (its own llama_cpp.Llama, resident), drafting
    greedily. Its KV cache follows the context: the common prefix with what it holds is kept (drafted tokens the
    model kept are already in it), the rest is cut and the new tokens evaluated."""

    kind = "model"

    def __init__(self, length: DraftLength, llm: Any, path: Path):
        super().__init__(length)
        self.llm = llm
        self.path = path
        self._n_vocab = llm.n_vocab()

    def _last_logits(self) -> np.ndarray:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))

    def draft(self, ids: np.ndarray, k: int) -> np.ndarray:
        llm = self.llm
        held = llm.input_ids[: llm.n_tokens]
        n = min(len(held), len(ids))
        equal = held[:n] == ids[:n]
        same = n if equal.all() else int(np.argmin(equal))  # the first position that differs
        same = min(same, len(ids) - 1)  # at least the last token is evaluated: its logits are the next draft's
        llm.n_tokens = same  # Llama.eval cuts the KV cache back to n_tokens first
        llm.eval(ids[same:].tolist())
        out: list[int] = []
        for i in range(k):
            tok = int(np.argmax(self._last_logits()))
            out.append(tok)
            if i + 1 < k:
                llm.eval([tok])
        return np.asarray(out, dtype=np.intc)

    def close(self) -> None:
        self.llm.close()


# --------------------------------------------------------------------------------------------------
# Attaching a drafter to an open model


Recorder = Callable[[list[int], int, np.ndarray], None]
"""attach's recorder: (tokens of one decode call, position of the first, logits of its output rows)."""

Lender = Callable[[int], int]
"""attach's lender, called before every decode with the rows of logits its batch asks for beyond the first:
streamed weights keep what those rows leave of the verification rows' memory (all of it at a one-row decode); returns
the bytes they hold (Handle.row_lender, over llama_flashflex_lend_rows)."""


def attach(llm: Any, drafter: Drafter, max_batch: int, recorder: Recorder | None = None,
           waited: Callable[[], float] | None = None, lend: Lender | None = None) -> None:
    """Give an open llama_cpp.Llama the drafter: `llm.generate` (so create_completion, chat, the server) drafts
    and verifies. Its eval is replaced by one that asks for every row's logits only in a verification batch (at
    most `max_batch` tokens after the prompt), keeps no copy of them (llm.scores stays unused: logprobs are not
    offered, as with logits_all off), and reports each decode's tokens and seconds to the drafter, with the
    seconds it waited on streamed reads when `waited` (the runtime's running total) is given. With `lend`, the memory
    the plan reserved for the verification rows is lent to streamed weights: all of it from a plain step on (the
    previous batch's rows are consumed by then), and before a verification what its rows leave (a one-token probe
    takes back one row's worth). Lending reads nothing extra: a lent tensor is read once into the lent memory
    instead of its ring home, then not at all; taking some back costs a cycle reading those tensors through the
    ring again, and page faults."""
    from llama_cpp.llama_speculative import LlamaDraftModel

    LlamaDraftModel.register(type(drafter))
    llm.draft_model = drafter
    drafter.n_ctx = llm.n_ctx()
    n_vocab = llm.n_vocab()

    def eval(tokens: Sequence[int]) -> None:
        tokens = list(tokens)
        llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
        every_row = llm.n_tokens > 0 and 1 < len(tokens) <= max_batch
        w0 = waited() if waited is not None else 0.0
        t0 = time.perf_counter()
        if lend is not None and tokens:  # eval([]) decodes nothing: the last batch's rows are still to be sampled
            lend(len(tokens) - 1 if every_row else 0)
        for i in range(0, len(tokens), llm.n_batch):
            batch = tokens[i: i + llm.n_batch]
            n_past = llm.n_tokens
            llm._batch.set_batch(batch=batch, n_past=n_past, logits_all=every_row)
            llm._ctx.decode(llm._batch)
            llm.input_ids[n_past: n_past + len(batch)] = batch
            llm.n_tokens += len(batch)
            llm._requires_eval = False
            if recorder is not None:
                rows = len(batch) if every_row else 1
                logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(rows * n_vocab,))
                recorder(batch, n_past, np.array(logits, dtype=np.float32, copy=True).reshape(rows, n_vocab))
        seconds = time.perf_counter() - t0
        drafter.observe_eval(len(tokens), seconds, waited() - w0 if waited is not None else None)

    llm.eval = eval


def decode(llm: Any, prompt_tokens: list[int], n_new: int, settings: "GenerationSettings",
           drafter: Drafter) -> list[int]:
    """Generate up to n_new tokens after `prompt_tokens`, which the caller has evaluated, with drafting (the
    decode phase of run.execution). Stops at end of text."""
    drafter.reset(stop_at=len(prompt_tokens) + n_new)
    out: list[int] = []
    if n_new <= 0:
        return out
    eos = llm.token_eos()
    # the prompt is already in the KV cache: generate finds it there and samples from its last logits
    gen = llm.generate(prompt_tokens, top_k=settings.top_k, top_p=settings.top_p, temp=settings.temperature,
                       reset=True)
    try:
        for tok in gen:
            if tok == eos:
                break
            out.append(int(tok))
            if len(out) >= n_new:
                break
    finally:
        gen.close()
    drafter.finish(list(prompt_tokens) + out)
    return out


# --------------------------------------------------------------------------------------------------
# Settings, checks and what drafting costs in RAM


@dataclass
class DraftSetup:
    """A checked `draft` section: what `open` makes, and the RAM it costs (taken off the model's budget)."""

    kind: str  # prompt-lookup | model
    max_tokens: int  # effective: capped at ubatch - 1
    adaptive: bool
    ngram: int | None = None
    model: Path | None = None
    weights_bytes: int = 0  # draft model file(s)
    kv_cache_bytes: int = 0  # the draft model's KV cache for the context
    compute_bytes: int = 0  # the draft model's compute buffers
    logits_bytes: int = 0  # the model's output rows a verification batch adds (one per drafted token)
    row_bytes: int = 0  # a drafted token's logits: 4 bytes per vocabulary entry, in the compute and output buffers
    capped_from: int | None = None  # max_tokens asked for, when the ubatch (or the budget) capped it
    length_fixed: bool = False  # max_tokens was given: never capped for the budget
    optional: bool = False  # drafting by default (draft.kind auto): the plan drops it where the rows cost too much
    lendable: bool = True  # the runtime can lend the rows' memory to streamed weights here (rows_lendable_here)

    @property
    def resident_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.compute_bytes + self.logits_bytes

    def summary(self) -> dict[str, Any]:
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        out["resident_bytes"] = self.resident_bytes
        return out

    def request(self) -> Any:
        """What the planner reserves for it (planner.DraftRequest)."""
        from orchestrator.planner import DraftRequest

        return DraftRequest(kind=self.kind, max_tokens=self.max_tokens, row_bytes=self.row_bytes,
                            model_bytes=self.weights_bytes + self.kv_cache_bytes + self.compute_bytes,
                            length_fixed=self.length_fixed, name=self.model.name if self.model else "",
                            optional=self.optional, lendable=self.lendable)

    def open(self, settings: "GenerationSettings") -> Drafter:
        length = DraftLength(self.max_tokens, adaptive=self.adaptive)
        if self.kind == "prompt-lookup":
            return PromptLookupDrafter(length, ngram=self.ngram or 1)
        from orchestrator.run import loader

        assert self.model is not None
        draft_settings = GenerationSettings(model=self.model, ctx=settings.ctx, batch=settings.ubatch,
                                            ubatch=settings.ubatch, threads=settings.threads, seed=settings.seed)
        return ModelDrafter(length, loader.open_model(draft_settings, None), self.model)

    def apply(self, plan: Any) -> None:
        """Take the length the plan fitted (planner.DraftPlan): its drafted tokens and their logits rows."""
        if plan is None:
            return
        self.max_tokens = plan.max_tokens
        self.logits_bytes = plan.logits_bytes
        self.capped_from = self.capped_from or plan.capped_from


def rows_lendable_here() -> bool:
    """Whether the runtime can lend a verification batch's rows' memory to streamed weights on this host: on Linux
    (pages given back at once), and not where the build sees a GPU (llama.cpp then gives the CPU backend the GPU's
    pinned host memory for its compute buffer, which cannot be given back). Elsewhere the plan caps the length."""
    import sys

    if not sys.platform.startswith("linux"):
        return False
    from orchestrator import native

    try:
        return not native.local_accelerators()
    except FlashflexError:
        return True  # no library to ask yet: the runtime says so itself if it cannot


def _n_vocab(table: Any) -> int:
    from orchestrator.modelfile.table import Role

    for role in (Role.OUTPUT, Role.TOKEN_EMBD):
        for t in table.tensors:
            if t.role is role and len(t.shape) >= 2:
                return int(t.shape[1])
    return 0


def setup_for(cfg: "RunConfig", settings: "GenerationSettings", log: Callable[[str], None] = print,
              target_table: Any = None, auto: bool = False, slots: int | None = None) -> DraftSetup | None:
    """The DraftSetup of a RunConfig (None without drafting): the draft model checked (a GGUF with the model's
    vocabulary) and the RAM drafting needs. Kind auto is prompt lookup when `auto` (a planned run or chat; the
    plan may still leave it off, DraftSetup.optional) and a verification batch fits the ubatch, else nothing.
    `slots`: llama-server drafts, for that many slots that may all verify in one pass (each drafted position is a
    row in every slot; a pass holds at most a micro-batch, so each slot drafts at most ubatch / slots - 1); the
    runtime lends the rows there too, before each pass (llama_flashflex_draft_lengths). None: flashflex's own eval
    drafts."""
    from orchestrator.modelfile.reader import read_model_table

    d = cfg.draft
    sequences = slots or 1
    kind, optional = d.kind, False
    if kind == "auto":
        if not auto or settings.ubatch < 2 * sequences:
            return None
        kind, optional = "prompt-lookup", True
    if kind == "none":
        return None
    max_tokens = max(0, min(d.max_tokens, settings.ubatch // sequences - 1))
    if max_tokens < 1:  # one sequence: the config refuses ubatch < 2 when drafting is asked
        raise FlashflexError(f"drafting in {sequences} slots needs a micro-batch of at least {2 * sequences} tokens "
                             f"(each slot's next token and one drafted token), and ubatch is {settings.ubatch}",
                             f"raise --ubatch to {2 * sequences} or more, lower --parallel, or --draft none")
    setup = DraftSetup(kind=kind, max_tokens=max_tokens, adaptive=d.adaptive, optional=optional,
                       capped_from=d.max_tokens if max_tokens < d.max_tokens else None,
                       lendable=d.lend_rows and rows_lendable_here())
    if max_tokens < d.max_tokens and "max_tokens" in d.model_fields_set:
        per = f" / {sequences} slots" if slots else ""
        log(f"note: draft.max_tokens {d.max_tokens} capped at {max_tokens} (ubatch {settings.ubatch}{per} - 1: a "
            "longer verification would take two passes over the weights)")
    table = target_table if target_table is not None else read_model_table(settings.model)
    # a drafted token's logits row, 4 bytes per vocabulary entry, twice: in the compute buffers the context sizes for
    # the verification batch's outputs, and in llama.cpp's output buffer it is copied to; once per slot
    setup.row_bytes = 2 * 4 * _n_vocab(table) * sequences
    setup.length_fixed = "max_tokens" in d.model_fields_set
    # every run keeps one row (the next token's logits, inside the runtime margin); drafting adds one per token
    setup.logits_bytes = max_tokens * setup.row_bytes
    if kind == "prompt-lookup":
        setup.ngram = d.ngram
        return setup
    from orchestrator.modelfile.locate import check_gguf_file
    from orchestrator.modelfile.reader import shard_paths
    from orchestrator.planner.buffers import compute_bytes, kv_cache_bytes

    assert d.model is not None
    draft = check_gguf_file(Path(d.model))
    if draft.resolve() == Path(settings.model).resolve():
        log("note: the draft model is the model itself (its resident copy costs as much RAM as the model)")
    draft_table = read_model_table(draft)
    setup.model = draft
    setup.weights_bytes = sum(p.stat().st_size for p in shard_paths(draft))
    setup.kv_cache_bytes = kv_cache_bytes(draft_table, settings.ctx)
    setup.compute_bytes = compute_bytes(draft_table, settings.ctx, settings.ubatch)
    check_vocab(settings.model, draft)
    return setup


def vocab_fingerprint(path: Path, samples: int = 512) -> dict[str, Any]:
    """n_vocab, BOS, EOS and the text of a sample of token ids (the first 64, the last 64 and evenly spaced
    ones), read by llama.cpp itself from a vocab-only load (no weights)."""
    from orchestrator.run import loader

    llm = loader.open_model(GenerationSettings(model=Path(path), ctx=64), None, vocab_only=True)
    try:
        model = llm._model
        n = model.n_vocab()
        ids = sorted(set(range(min(64, n))) | set(range(max(0, n - 64), n))
                     | {int(i) for i in np.linspace(0, n - 1, num=min(samples, n))})
        return {"n_vocab": n, "bos": model.token_bos(), "eos": model.token_eos(),
                "tokens": {i: model.token_get_text(i) for i in ids}}
    finally:
        llm.close()


def check_vocab(model: Path, draft: Path) -> None:
    """Refuse a draft model whose vocabulary is not the model's (a drafted id would mean another token)."""
    a, b = vocab_fingerprint(model), vocab_fingerprint(draft)
    problem = None
    if a["n_vocab"] != b["n_vocab"]:
        problem = f"{a['n_vocab']} tokens vs {b['n_vocab']}"
    elif (a["bos"], a["eos"]) != (b["bos"], b["eos"]):
        problem = f"BOS/EOS {a['bos']}/{a['eos']} vs {b['bos']}/{b['eos']}"
    else:
        diff = [i for i in a["tokens"] if a["tokens"][i] != b["tokens"].get(i)]
        if diff:
            i = diff[0]
            problem = f"token {i} is {a['tokens'][i]!r} vs {b['tokens'].get(i)!r} ({len(diff)} of {len(a['tokens'])} " \
                      "sampled ids differ)"
    if problem:
        raise FlashflexError(f"draft model {draft.name} has another vocabulary than {Path(model).name} ({problem})",
                             "use a draft model of the same family and tokenizer (or --draft prompt-lookup, "
                             "which needs no model)")
