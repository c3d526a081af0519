"""Speculative decoding without a model: prompt lookup, the adaptive draft length (acceptance and cost, measured),
acceptance inferred from the next call's input ids, the `draft` settings and what drafting takes off the budget."""

from __future__ import annotations

import random
import statistics

import numpy as np
import pytest

from orchestrator.errors import FlashflexError
from orchestrator.speculative import Drafter, DraftLength, lookup

# --------------------------------------------------------------------------------------------------
# prompt lookup


def ids(*xs: int) -> np.ndarray:
    return np.array(xs, dtype=np.intc)


def test_lookup_takes_the_most_recent_occurrence_of_the_longest_ngram():
    seq = ids(1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3)
    assert lookup(seq, 3, 4).tolist() == [7, 8, 5, 1]  # the later "1 2 3" wins over the first
    assert lookup(seq, 3, 1).tolist() == [7]


def test_lookup_falls_back_to_shorter_ngrams_and_may_find_nothing():
    assert lookup(ids(4, 5, 6, 7, 5), 3, 3).tolist() == [6, 7, 5]  # only the 1-gram "5" matches
    assert lookup(ids(1, 2, 3, 4), 3, 3).tolist() == []
    assert lookup(ids(1), 3, 3).tolist() == []
    assert lookup(ids(), 3, 3).tolist() == []


def test_lookup_goes_on_copying_after_a_token_that_changed():
    # a numbered list: "NL - 1 . a b c NL - 2": "- 2" occurs nowhere before, "NL - <any>" does: go on after the "1"
    assert lookup(ids(10, 50, 1, 60, 7, 8, 9, 10, 50, 2), 2, 4).tolist() == [60, 7, 8, 9]
    # an edited word in a copy: "x y OLD z w" copied as "x y NEW" drafts "z w"
    assert lookup(ids(3, 4, 5, 6, 7, 1, 3, 4, 9), 2, 2).tolist() == [6, 7]
    # an exact match of the full n-gram wins over a substitution, even an older one
    assert lookup(ids(3, 4, 9, 11, 3, 4, 5, 6, 3, 4, 9), 3, 2).tolist() == [11, 3]
    # a substitution (n tokens of context) wins over a shorter exact match
    assert lookup(ids(9, 7, 1, 2, 3, 8, 5, 6, 1, 2, 3, 9), 3, 2).tolist() == [5, 6]  # not [7, 1] after the "9"


def _lookup_by_definition(seq: list[int], ngram: int, k: int) -> list[int]:
    """The lookup's definition, written out plainly: the oracle the runtime's lookup is checked against."""
    n = len(seq)

    def after_last(hay: list[int], pattern: list[int]) -> int | None:
        starts = [s for s in range(len(hay) - len(pattern) + 1) if pattern and hay[s:s + len(pattern)] == pattern]
        return starts[-1] + len(pattern) if starts else None

    start = after_last(seq[:n - 1], seq[n - ngram:]) if n > ngram else None
    if start is None and n > ngram + 1:
        hit = after_last(seq[:n - 2], seq[n - 1 - ngram:n - 1])
        start = None if hit is None else hit + 1
    for m in range(min(ngram - 1, n - 1), 0, -1):
        if start is not None:
            break
        start = after_last(seq[:n - 1], seq[n - m:])
    return [] if start is None else seq[start:start + k]


def test_lookup_agrees_with_its_definition_on_random_contexts():
    """Contexts over a few distinct tokens (so n-grams repeat, match partly, or match only after a changed token),
    every n-gram 1-4 and draft length 1-8."""
    rng = random.Random(7)
    for _ in range(3000):
        seq = [rng.randrange(rng.choice((2, 4, 9))) for _ in range(rng.randrange(0, 40))]
        ngram, k = rng.randint(1, 4), rng.randint(1, 8)
        assert lookup(ids(*seq), ngram, k).tolist() == _lookup_by_definition(seq, ngram, k), (seq, ngram, k)


def test_lookup_draft_stops_at_the_end_of_the_context():
    assert lookup(ids(1, 2, 1, 2), 2, 8).tolist() == [1, 2]


# --------------------------------------------------------------------------------------------------
# the draft length


def simulate(length: DraftLength, n_tokens: int, p: float, slope: float, draft_ratio: float = 0.0,
             seed: int = 0, step: float = 0.05) -> tuple[float, int]:
    """Generate n_tokens with drafts kept with probability p each (geometric) and a verification of n tokens
    costing step * (1 + slope (n - 1)) plus draft_ratio * step per drafted token. Returns (seconds, verifications)."""
    rng = random.Random(seed)
    made, seconds, verifications = 0, 0.0, 0
    while made < n_tokens:
        k = length.propose()
        length.drafted(k)
        if k:
            length.observe_draft_cost(k, draft_ratio * step * k)
        kept = 0
        while kept < k and rng.random() < p:
            kept += 1
        cost = step * (1 + slope * k)
        length.observe_cost(k + 1, cost)
        length.observe(k, kept)
        seconds += cost + draft_ratio * step * k
        made += kept + 1
        verifications += 1
    return seconds, verifications


def test_fixed_length_always_drafts_the_maximum():
    length = DraftLength(6, adaptive=False)
    for _ in range(5):
        length.observe(6, 0)
        assert length.propose() == 6


def prime(length: DraftLength, slope: float = 0.02, times: int = 10) -> None:
    """Measured verification costs: a step of 50 ms, each more token `slope` of it."""
    for _ in range(times):
        length.observe_cost(1, 0.05)
        length.observe_cost(5, 0.05 * (1 + 4 * slope))


def test_a_plain_step_then_one_token_are_measured_before_longer_drafts():
    length = DraftLength(8)
    assert length.propose() == 0  # nothing measured yet
    length.drafted(0)
    length.observe_cost(1, 0.05)
    assert length.propose() == 1  # the first draft: one token, which measures the cost of a longer batch
    length.drafted(1)
    length.observe_cost(2, 0.051)
    length.observe(1, 1)
    assert length.propose() > 1


def test_failing_drafts_shrink_the_length_to_zero():
    length = DraftLength(8)
    prime(length, slope=0.2)
    assert 0 < length.best() < 8  # the prior (p = 0.5) drafts a little where drafting goes on
    for _ in range(6):
        k = length.propose() or 1
        length.drafted(k)
        length.observe_cost(k + 1, 0.05 * (1 + 0.2 * k))
        length.observe(k, 0)
    assert length.best() == 0
    assert length.acceptance < 0.15


def test_hits_grow_the_length_to_the_maximum():
    length = DraftLength(8)
    prime(length)
    for _ in range(8):
        k = length.propose()
        length.drafted(k)
        length.observe_cost(k + 1, 0.05 * (1 + 0.02 * k))
        length.observe(k, k)
    assert length.propose() == 8
    assert length.acceptance > 0.9


def test_one_repeated_phrase_in_free_text_does_not_start_drafting():
    """Prompt lookup on sampled free text: a draft's first token kept a quarter of the time, a token after a kept one
    half the time. A name the text repeats (four tokens kept) is not a copy starting; three drafts kept whole are."""
    length = DraftLength(7)
    for _ in range(9):  # read-bound verifications: a second token costs half a step, each one after 3%
        for n, t in ((1, 0.040), (2, 0.060), (3, 0.062), (8, 0.075)):
            length.observe_cost(n, t)
    for i in range(40):
        length.observe(7, 2 if i % 4 == 1 else 0)
    assert length.acceptance == pytest.approx(0.25, abs=0.06) and length.continued == pytest.approx(0.5, abs=0.05)
    assert length.best() == 0
    length.observe(7, 4)
    assert length.best() == 0
    for _ in range(3):
        length.observe(7, 7)
    assert length.best() == 7


def test_expensive_verification_keeps_drafts_short():
    """Drafts that hit half the time are worth little when each drafted token costs as much as a step."""
    length = DraftLength(8, prior_slope=1.0)
    for _ in range(20):
        length.observe_cost(2, 0.1)
        length.observe_cost(1, 0.05)
        length.observe(4, 1)
    assert length.cost_ratio(2) == pytest.approx(2.0)
    assert length.cost_ratio(5) == pytest.approx(5.0)  # the prior slope above the one size measured, at most n
    assert length.best() <= 1


def test_probes_back_off_when_they_fail_and_reset_when_they_hit():
    length = DraftLength(8)
    prime(length, slope=0.01, times=30)
    for _ in range(20):  # a draft's first token always rejected: at verifications this cheap, 20 say so
        length.observe(8, 0)
    assert length.best() == 0
    gaps = []
    idle = 0
    for _ in range(400):
        k = length.propose()
        length.drafted(k)
        if k:
            gaps.append(idle)
            idle = 0
            length.observe(k, 0)
        else:
            idle += 1
    assert gaps[:5] == [4, 8, 16, 32, 64]
    assert set(gaps[5:]) == {64}
    # a probe that hits brings the gap back to its minimum
    while not length.propose():
        length.drafted(0)
    length.drafted(1)
    length.observe(1, 1)
    assert length.state()["probe_gap"] == 4


def test_one_verification_slowed_by_another_process_does_not_turn_drafting_off():
    length = DraftLength(8)
    prime(length, slope=0.02)
    for _ in range(5):
        length.observe(8, 6)
    assert length.best() == 8
    length.observe_cost(9, 5.0)  # 100x a normal verification: the machine was busy
    length.observe_cost(5, 5.0)
    assert length.best() == 8


def test_probes_are_rarer_where_a_longer_batch_costs_more():
    length = DraftLength(8)
    prime(length, slope=0.5, times=30)
    for _ in range(10):
        length.observe(8, 0)
    assert length.probe_gap() >= 45  # a probe costs ~half a step: at most 1% of the time


def test_a_probe_that_drafted_nothing_is_tried_again():
    length = DraftLength(4)
    prime(length, slope=0.01, times=30)
    for _ in range(20):
        length.observe(4, 0)
    for _ in range(4):
        assert length.propose() == 0
        length.drafted(0)
    assert length.propose() == 1
    length.drafted(0)  # prompt lookup found no match
    assert length.propose() == 1


@pytest.mark.parametrize("slope", [0.01, 0.1, 0.3, 1.0])
@pytest.mark.parametrize("draft_ratio", [0.0, 0.3])
def test_drafts_that_never_hit_cost_at_most_five_percent(slope, draft_ratio):
    n = 256
    seconds, _ = simulate(DraftLength(8), n, p=0.0, slope=slope, draft_ratio=draft_ratio)
    assert seconds <= 1.05 * n * 0.05, seconds / (n * 0.05)


@pytest.mark.parametrize("seed", range(3))
def test_drafts_that_hit_save_verifications(seed):
    n = 256
    seconds, verifications = simulate(DraftLength(8), n, p=0.9, slope=0.02, seed=seed)
    assert verifications < n / 3
    assert seconds < 0.5 * n * 0.05


def test_the_cost_model_follows_measurements():
    length = DraftLength(8, prior_slope=0.1)
    length.observe_cost(1, 0.10)
    assert length.cost_ratio(5) == pytest.approx(1.4)  # nothing but the step measured: the prior slope
    for _ in range(20):
        length.observe_cost(1, 0.10)
        length.observe_cost(5, 0.12)  # streaming: four more tokens cost 20 %
    assert length.cost_ratio(5) == pytest.approx(1.2)
    assert length.cost_ratio(9) == pytest.approx(1.2 + 4 * 0.05)  # one size measured: its mean slope beyond it
    for _ in range(20):
        length.observe_cost(9, 0.13)
    assert length.cost_ratio(9) == pytest.approx(1.3, abs=0.01)
    assert length.cost_ratio(7) == pytest.approx(1.25, abs=0.01)
    without_t1 = DraftLength(8, prior_slope=0.1)
    for _ in range(20):
        without_t1.observe_cost(3, 0.14)
        without_t1.observe_cost(7, 0.22)  # t = 0.10 + 0.02 (n - 1)
    assert without_t1.step_seconds() == pytest.approx(0.10, rel=0.05)  # the line's t(1): no step measured
    assert without_t1.batch_seconds(5) == pytest.approx(0.18, rel=0.02)


def test_a_second_token_dearer_than_the_ones_after_it_does_not_price_long_drafts_like_short_ones():
    """Measured on Gemma 3 270M under a streaming budget: t(1) 30 ms, t(2) 39, t(3) 41, t(8) 45 ms. A line
    through t(1) and t(2) would price 8 tokens at 93 ms and keep drafts short."""
    length = DraftLength(7)
    for _ in range(9):
        length.observe_cost(1, 0.030)
        length.observe_cost(2, 0.039)
        length.observe_cost(3, 0.041)
        length.observe_cost(8, 0.050)
    assert length.cost_ratio(2) == pytest.approx(1.3, abs=0.02)
    assert length.cost_ratio(8) == pytest.approx(1.65, abs=0.05)
    for _ in range(10):
        length.observe(7, 6)
    assert length.best() == 7


def simulate_noisy(length: DraftLength, n_tokens: int, p: float, seed: int, noise: float = 0.3,
                   step: float = 0.030, jump: float = 0.3, slope: float = 0.03) -> tuple[float, list[int]]:
    """Like simulate, with the concave costs measured on Gemma (a second token `jump` of a step, each one after
    `slope`) and every verification slowed by up to `noise` (another process on a 2-core machine). Returns
    (seconds, the length of every verification)."""
    rng = random.Random(seed)
    made, seconds, lengths = 0, 0.0, []
    while made < n_tokens:
        k = length.propose()
        length.drafted(k)
        kept = 0
        while kept < k and rng.random() < p:
            kept += 1
        cost = step * (1 + (jump + slope * (k - 1) if k else 0.0)) * (1 + noise * rng.random())
        length.observe_cost(k + 1, cost)
        length.observe(k, kept)
        seconds += cost
        made += kept + 1
        lengths.append(k)
    return seconds, lengths


@pytest.mark.parametrize("seed", range(5))
def test_high_acceptance_on_a_noisy_machine_keeps_drafting_long(seed):
    """The issue's collapse: at 92% acceptance one run's controller sat at length 0 for 47 of 72 calls."""
    _, lengths = simulate_noisy(DraftLength(7), 256, p=0.92, seed=seed)
    assert sum(1 for k in lengths if k == 0) <= 4  # the first plain step, and not much else
    assert statistics.median(lengths) == 7


@pytest.mark.parametrize("seed", range(3))
def test_failing_drafts_on_a_noisy_machine_cost_little(seed):
    n = 256
    seconds, lengths = simulate_noisy(DraftLength(7), n, p=0.0, seed=seed)
    plain, _ = simulate_noisy(DraftLength(0), n, p=0.0, seed=seed)
    assert seconds <= 1.03 * plain, seconds / plain
    assert sum(1 for k in lengths if k) <= 10  # the first draft, then probes 4, 8, 16, 32, 64, 64 ... apart


# --------------------------------------------------------------------------------------------------
# acceptance inferred from the next call


class Scripted(Drafter):
    kind = "scripted"

    def __init__(self, proposals, adaptive=False, max_tokens=4):
        super().__init__(DraftLength(max_tokens, adaptive=adaptive))
        self.proposals = list(proposals)

    def draft(self, ids, k):
        return np.array(self.proposals.pop(0)[:k], dtype=np.intc)


def test_acceptance_is_inferred_from_the_next_calls_input_ids():
    d = Scripted([[5, 6, 7, 8], [9, 9], [1, 2, 3, 4]])
    assert d(ids(1, 2, 3)).tolist() == [5, 6, 7, 8]
    d.observe_eval(5, 0.1)  # the verification: last token + 4 drafted
    # the model kept 5 and 6, then picked 4 instead of 7
    assert d(ids(1, 2, 3, 5, 6, 4)).tolist() == [9, 9]
    d.observe_eval(3, 0.1)
    # every drafted token kept, plus the model's own next one
    d(ids(1, 2, 3, 5, 6, 4, 9, 9, 0))
    s = d.stats
    assert (s.judged_drafts, s.judged_tokens, s.accepted_tokens) == (2, 5, 4)
    assert s.drafted_tokens == 10 and s.verifications == 2 and s.verified_tokens == 8
    assert d.report()["acceptance_rate"] == pytest.approx(4 / 5)


def test_the_last_draft_is_judged_by_what_the_run_took():
    d = Scripted([[5, 6, 7, 8], [9, 9, 9, 9]])
    d(ids(1, 2, 3))
    d(ids(1, 2, 3, 5, 6, 7, 8, 4))  # all four kept
    d.finish(ids(1, 2, 3, 5, 6, 7, 8, 4, 9, 9))  # the run stopped after two more tokens: both the draft's
    s = d.stats
    assert (s.judged_drafts, s.judged_tokens, s.accepted_tokens) == (2, 6, 6)
    d = Scripted([[5, 6, 7, 8]])
    d(ids(1, 2, 3))
    d.finish(ids(1, 2, 3, 5, 0))  # one kept, the next one rejected
    assert (d.stats.judged_tokens, d.stats.accepted_tokens) == (2, 1)
    d = Scripted([[5, 6]])
    d(ids(1, 2, 3))
    d.finish(ids(1, 2, 3))  # nothing taken after it: nothing judged
    assert d.stats.judged_drafts == 0


def test_a_new_sequence_is_not_counted_as_a_verification():
    d = Scripted([[5, 6], [7, 8]])
    d(ids(1, 2, 3))
    d(ids(4, 4, 4, 5))  # another request: same length growth, different context
    assert d.stats.judged_drafts == 0
    d2 = Scripted([[5, 6], [7, 8]])
    d2(ids(1, 2, 3))
    d2(ids(1, 2, 3, 7, 1))  # grew by two but the first new token is not the draft's
    assert d2.stats.judged_drafts == 0


def test_a_prompt_eval_is_not_a_verification_cost():
    d = Scripted([[5, 6]])
    d.observe_eval(40, 1.0)  # the prompt
    d(ids(1, 2, 3))
    d.observe_eval(3, 0.2)
    assert d.stats.verifications == 1 and d.length.state()["verification_seconds"] == {3: 0.2}


def test_what_a_verification_makes_the_steps_after_it_pay_is_part_of_its_cost():
    """With lent rows, the plain steps after a verification move the memory back to streamed weights: the time they
    take beyond a plain step counts as the verification's (AFTERMATH_STEPS of them), and not as plain steps', so
    drafts that fail between plain steps price it."""
    from orchestrator.speculative import AFTERMATH_STEPS

    d = Scripted([[]] * 2 + [[5, 6]] + [[]] * AFTERMATH_STEPS + [[7, 8], [9, 9]])
    tokens = [1, 2, 3]

    def call(eval_tokens, seconds, take=1):
        d(ids(*tokens))
        d.observe_eval(eval_tokens, seconds)
        tokens.extend([0] * take)

    call(1, 0.1)  # plain steps measure t(1)
    call(1, 0.1)
    call(3, 0.2)  # a verification of two drafted tokens (neither kept)
    call(1, 0.16)  # the steps after it: 0.06, then 0.01 each more than a plain one, then one faster
    for _ in range(AFTERMATH_STEPS - 2):
        call(1, 0.11)
    call(1, 0.095)
    extra = 0.06 + 0.01 * (AFTERMATH_STEPS - 2) - 0.005
    # it came after plain steps: an entry's cost
    # (as its ratio to the plain steps just before it)
    assert d.length.state()["entry_cost_ratios"] == pytest.approx({3: (0.2 + extra) / 0.1}, abs=1e-4)
    assert list(d.length._samples[1]) == [0.1, 0.1]  # those steps are not plain steps' samples
    call(3, 0.2)
    call(3, 0.25, take=3)  # verifications in a row: the first's aftermath is nothing, the second goes on drafting
    assert sorted(d.length._entries[3]) == pytest.approx([2.0, (0.2 + extra) / 0.1])
    assert list(d.length._samples[3]) == pytest.approx([0.25])


def test_a_draft_after_plain_steps_is_priced_at_what_starting_costs():
    """Verifications after a plain step cost more than those after a verification (lent memory taken back): a
    draft's first token kept 40% of the time, each after it 60%, pays where drafts go on, not as a start."""
    length = DraftLength(7)
    for _ in range(9):
        length.observe_cost(1, 0.040)
        for n in (2, 3, 8):
            length.observe_cost(n, 0.040 * (1.15 + 0.02 * (n - 2)))  # going on
            length.observe_cost(n, 0.040 * (1.9 + 0.02 * (n - 2)), entry=True)  # after a plain step
    for i in range(30):
        length.observe(7, 2 if i % 5 < 2 else 0)
    assert length.best(entry=False) > 0 and length.best(entry=True) == 0
    length.drafted(0)
    assert length.propose() == 0  # after a plain step
    length._drafting = True
    assert length.propose() > 0  # after a draft


def test_drafts_stop_at_the_tokens_still_wanted_and_the_context():
    d = Scripted([[5, 6, 7, 8]] * 3)
    d.stop_at = 6
    assert d(ids(1, 2, 3)).tolist() == [5, 6]  # 3 tokens still wanted: 2 drafted + the model's own
    d.reset(stop_at=None)
    d.n_ctx = 5
    assert d(ids(1, 2, 3)).tolist() == [5, 6]


# --------------------------------------------------------------------------------------------------
# shadows: what prompt lookup would have drafted, judged without a verification


def drive(drafter: Drafter, text: list[int], prompt: int) -> list[tuple[int, int]]:
    """Every call of a replay (orchestrator.bench.replay) of `text` after its first `prompt` tokens: (the context's
    length, the length of the draft sent)."""
    from orchestrator.bench.replay import replay

    return replay(drafter, text, prompt).calls


def free_then_copy(seed: int, free: int = 300, copied: int = 120) -> list[int]:
    """A prompt of 60 tokens, `free` tokens of new text (drawn from 1000 tokens as often as words are, the r-th
    most frequent with weight 1 / r: prompt lookup nearly always finds the last token earlier, but what followed it
    there comes next only about 3% of the time), then a copy of `copied` tokens of the prompt and what followed."""
    rng = random.Random(seed)
    text = rng.choices(range(1000), weights=[1 / r for r in range(1, 1001)], k=60 + free)
    return text + text[:copied]


@pytest.mark.parametrize("seed", range(3))
def test_shadows_replace_probes_where_drafts_fail_and_start_drafting_as_a_copy_starts(seed):
    from orchestrator.speculative import PromptLookupDrafter

    class Probing(PromptLookupDrafter):
        shadows = False  # the same lookup, learning acceptance from probes

    text, copy_at = free_then_copy(seed), 360
    shadowed, probing = PromptLookupDrafter(DraftLength(7), ngram=3), Probing(DraftLength(7), ngram=3)
    calls, probed = drive(shadowed, text, prompt=60), drive(probing, text, prompt=60)
    s = shadowed.stats
    assert shadowed.length.probes == 0 and shadowed.report()["length"]["probe_gap"] is None
    assert s.shadow_judged_tokens >= 150 and s.shadow_accepted_tokens < 0.15 * s.shadow_judged_tokens

    def drafted_in_free_text(calls):
        return sum(1 for at, k in calls if k and at < copy_at - 10)

    def copy_drafted_from(calls):
        return min(at for at, k in calls if k and at >= copy_at)

    assert drafted_in_free_text(calls) <= 5  # the first drafts (on the prior cost), and one where the text repeats
    assert probing.length.probes >= 4 and drafted_in_free_text(probed) >= 6
    # the copy: drafting once its 3-grams are found (3 tokens in) and a few shadows were kept whole (a start pays
    # taking memory back from streamed weights: it takes a copy, not one repeated phrase), then 7 at a time
    assert copy_drafted_from(calls) <= copy_at + 24 < copy_drafted_from(probed)
    copying = [k for at, k in calls if at > copy_at + 30]
    assert min(copying) >= 5 and statistics.median(copying) == 7, copying


def test_a_shadow_is_judged_as_a_sent_draft_would_be():
    def shadowed(proposals):
        d = Scripted(proposals, adaptive=True, max_tokens=3)
        d.length.shadowed = True
        return d

    d = shadowed([[5, 6, 7]])
    assert d(ids(1, 2, 3)).tolist() == []  # no step measured yet: length 0, the shadow [5, 6, 7] made instead
    d.finish(ids(1, 2, 3, 5, 6, 9))  # 5 and 6 kept, then 9 instead of 7
    s = d.stats
    assert (s.drafts, s.judged_tokens, s.shadow_judged_tokens, s.shadow_accepted_tokens) == (0, 0, 3, 2)
    assert d.length.acceptance == pytest.approx((0.85 * 1.0 + 1) / (0.85 * 2.0 + 1))  # its first token kept
    assert d.length.continued == pytest.approx((0.97 ** 2 * 1.0 + 1) / (0.97 ** 2 * 2.0 + 2))  # then 1 of 2
    d = shadowed([[5, 6, 7]])
    d(ids(1, 2, 3))
    d.finish(ids(1, 2, 3, 5))  # the sequence ended after one token, kept: one judged, one kept
    assert (d.stats.shadow_judged_tokens, d.stats.shadow_accepted_tokens) == (1, 1)
    d = shadowed([[5, 6, 7], [8]])
    d(ids(1, 2, 3))
    d(ids(4, 4, 4, 4))  # another sequence: nothing judged, its own shadow made
    assert d.stats.shadow_judged_tokens == 0 and d._shadow[:2] == (4, 4)


# --------------------------------------------------------------------------------------------------
# settings and the budget


def test_bench_summary_takes_medians_and_compares_with_no_drafting():
    from orchestrator.bench import speculative as spec_bench

    def rec(mode, tps, ids, **kw):
        return {"task": "rewrite", "mode": mode, "prompt_tokens": 100, "tokens": 8, "token_ids": ids,
                "decode_tok_per_s": tps, "bytes_read_per_token": 60 << 20, **kw}

    runs = [rec("no draft", 4.0, [1, 2]), rec("no draft", 5.0, [1, 2]), rec("no draft", 6.0, [1, 2]),
            *[rec("draft", t, [1, 2], acceptance_rate=0.8, accepted_per_verification=2.0,
                  verified_per_verification=v, tokens_per_verification=3.0) for t, v in ((9.0, 4), (10.0, 5),
                                                                                         (20.0, 8))]]
    rows = spec_bench.summarise(runs, ["rewrite"])
    assert rows[0]["decode_tok_per_s"] == 5.0 and rows[1]["decode_tok_per_s"] == 10.0
    assert rows[1]["speedup"] == pytest.approx(2.0) and rows[1]["same_tokens"]
    assert "experts_per_verification" not in rows[1]  # a dense run has no expert columns
    table = spec_bench.markdown({"summary": rows})
    assert "| rewrite | draft | 100 | 8 | 10.00 | 2.00× | 80% | 2.00 | 5.00 | 3.00 | 60.0 | yes |" in table
    assert "Expert banks" not in table
    assert {"rewrite", "edit-function", "document-qa", "free-chat"} <= set(spec_bench.TASKS)
    assert set(spec_bench.TEMPERATURE) <= set(spec_bench.TASKS)


def _moe_decode(hits, misses, layers=4, top_k=8, slots=32, bytes_read=0):
    """The part of a decode phase's native expert-bank counters (run stats["moe"]["decode"]) the bench reads."""
    return {"hits": hits, "misses": misses, "banked_layers": layers, "n_expert_used": top_k, "slots": slots,
            "bytes_read": bytes_read, "hit_rate": hits / (hits + misses) if hits + misses else 0.0}


def test_moe_columns_count_distinct_experts_per_decode_call_and_layer():
    from orchestrator.bench import speculative as spec_bench

    # 16 single-token steps over 4 layers, top-8: 16 * 4 * 8 experts resolved, 3/4 of them hits
    plain = spec_bench.moe_columns(_moe_decode(384, 128, bytes_read=128 * 5 << 20), tokens=16, decode_calls=16)
    assert plain["experts_per_verification"] == 8.0 == plain["experts_per_token"]  # top-k per step
    assert plain["expert_hit_rate"] == 0.75 and plain["expert_misses_per_token"] == 2.0
    assert plain["expert_miss_bytes_per_token"] == 8 * 5 << 20
    # 4 verifications of 8 tokens each resolving the union of their experts (20 per layer, not 64), 2 tokens each
    drafted = spec_bench.moe_columns(_moe_decode(240, 80, bytes_read=80 << 20), tokens=8, decode_calls=4)
    assert drafted["experts_per_verification"] == 20.0 and drafted["experts_per_token"] == 10.0
    assert drafted["expert_misses_per_token"] == 2.5 and drafted["expert_miss_bytes_per_token"] == 10 << 20
    assert (drafted["top_k"], drafted["expert_slots"]) == (8, 32)
    # no banks (a dense model, a MoE model that fits): no columns; nothing generated: nothing per token
    assert spec_bench.moe_columns(None, 8, 8) == {} and spec_bench.moe_columns({"banked_layers": 0}, 8, 8) == {}
    empty = spec_bench.moe_columns(_moe_decode(0, 0), tokens=0, decode_calls=0)
    assert empty["experts_per_verification"] is None and empty["expert_hit_rate"] is None


def test_bench_reports_expert_columns_for_banked_runs():
    from orchestrator.bench import speculative as spec_bench

    def rec(mode, calls, decode, **kw):
        return {"task": "free-chat", "mode": mode, "prompt_tokens": 20, "tokens": 8, "token_ids": [3] * 8,
                "decode_tok_per_s": 1.0, "bytes_read_per_token": 100 << 20,
                **spec_bench.moe_columns(decode, 8, calls), **kw}

    runs = [rec("no draft", 8, _moe_decode(128, 128, bytes_read=128 << 20), tokens_per_verification=1.0),
            rec("draft", 2, _moe_decode(10, 70, bytes_read=70 << 20), acceptance_rate=1.0,
                accepted_per_verification=3.0, verified_per_verification=4.0, tokens_per_verification=4.0),
            rec("draft", 4, _moe_decode(20, 100, bytes_read=100 << 20), acceptance_rate=0.5,
                accepted_per_verification=1.0, verified_per_verification=4.0, tokens_per_verification=2.0)]
    rows = spec_bench.summarise(runs, ["free-chat"])
    plain, drafted = rows
    assert plain["experts_per_verification"] == 8.0 and plain["expert_miss_bytes_per_token"] == 16 << 20
    # medians over the two drafted runs: (10 + 7.5) / 2 experts per verification, (2.5 + 3.75) / 2 per token,
    # hit rates 1/8 and 1/6
    assert drafted["experts_per_verification"] == pytest.approx(8.75)
    assert drafted["experts_per_token"] == pytest.approx(3.125)
    assert drafted["expert_miss_bytes_per_token"] == pytest.approx(((70 + 100) / 2 / 8) * 2**20)
    table = spec_bench.markdown({"summary": rows})
    assert "Expert banks" in table
    assert "| free-chat | no draft | 8 | 32 | 8.00 | 8.00 | 50.0% | 4.00 | 16.0 |" in table
    assert "| free-chat | draft | 8 | 32 | 8.75 | 3.12 | 14.6% | 2.66 | 10.6 |" in table


def test_bench_models_may_be_synthetic_presets(tmp_path, monkeypatch):
    from orchestrator import sidecar, synth
    from orchestrator.bench import speculative as spec_bench

    monkeypatch.setenv("FLASHFLEX_HOME", str(tmp_path / "home"))  # not the models dir the suite shares
    assert spec_bench.resolve_model(tmp_path / "m.gguf") == tmp_path / "m.gguf"  # a path is taken as given
    with pytest.raises(FlashflexError, match="unknown synthetic model preset"):
        spec_bench.resolve_model("synth:no-such-preset", lambda _m: None)
    notes: list[str] = []
    moe = spec_bench.resolve_model("synth:tiny-qwen3moe", notes.append)
    assert moe == synth.cached_preset("tiny-qwen3moe") and sidecar.default_path(moe).is_dir()
    assert any("sidecar" in n for n in notes)
    draft = spec_bench.resolve_model("synth:tiny-draft", notes.append)
    assert not sidecar.default_path(draft).exists()  # a dense model has no experts to extract
    before = (moe.stat().st_mtime_ns, len(notes))
    assert spec_bench.resolve_model("synth:tiny-qwen3moe", notes.append) == moe
    assert (moe.stat().st_mtime_ns, len(notes)) == before  # made once


# --------------------------------------------------------------------------------------------------
# drafting inside llama-server's slots


def test_drafting_in_server_slots_reserves_rows_for_every_slot_and_lends_them_as_run_does(tmp_path):
    from orchestrator import synth
    from orchestrator.config import RunConfig
    from orchestrator.run.settings import GenerationSettings
    from orchestrator.speculative import rows_lendable_here, setup_for

    model = synth.write_synth_model(synth.preset("tiny-dense"), tmp_path / "tiny.gguf")

    def setup(slots, ubatch, **draft):
        cfg = RunConfig.model_validate({"draft": draft or {"kind": "auto"}, "context": {"ubatch": ubatch}})
        return setup_for(cfg, GenerationSettings(model=model, ubatch=ubatch), log=lambda _m: None, auto=True,
                         slots=slots)

    one = setup(None, 32)
    four = setup(4, 32)
    assert one is not None and four is not None
    assert four.row_bytes == 4 * one.row_bytes  # a drafted position is a row in every slot
    assert four.max_tokens == 32 // 4 - 1 and one.max_tokens == 8  # a pass of 4 x (1 + 7) tokens is one micro-batch
    # llama-server lends them too (llama_flashflex_draft_lengths before each pass), where run would
    assert four.lendable is one.lendable is rows_lendable_here()
    assert not setup(4, 32, kind="auto", lend_rows=False).lendable  # draft.lend_rows false: kept (the A/B)
    assert setup(4, 6) is None  # by default: no room for one drafted token per slot, so none
    with pytest.raises(FlashflexError, match="drafting in 4 slots needs a micro-batch of at least 8 tokens"):
        setup(4, 6, kind="prompt-lookup")


@pytest.mark.parametrize("lookup", ["flashflex", "upstream"])
def test_a_plan_that_drafts_by_prompt_lookup_asks_for_flashflexs_lookup_unless_told(tmp_path, lookup):
    """The spec's prompt_lookup (llama.cpp's programs draft by flashflex's lookup) follows draft.lookup."""
    from orchestrator import synth
    from tests.helpers import prepare

    path = synth.write_synth_model(synth.preset("tiny-dense"), tmp_path / "m.gguf")
    prepared = prepare({"model.path": path, "budget.size": "8MiB", "context.ctx": 128, "context.ubatch": 8,
                        "draft.kind": "prompt-lookup", "draft.lookup": lookup})
    assert prepared.plan is not None and prepared.plan.draft is not None
    assert prepared.spec.prompt_lookup is (lookup == "flashflex")
    undrafted = prepare({"model.path": path, "budget.size": "8MiB", "context.ctx": 128, "context.ubatch": 8,
                         "draft.kind": "none"})
    assert undrafted.spec.prompt_lookup is False


def test_llama_server_looks_up_the_plans_ngram_and_no_longer_one_than_it_drafts_without_a_plan():
    """Under a plan (spec prompt_lookup) llama-server drafts by flashflex's lookup, which falls back to shorter
    n-grams: it gets the plan's n-gram whatever the length. Without one it drafts by upstream's ngram-simple, which
    drafts nothing shorter than its n-gram: a length of 1 or 2 looks up that many tokens, or it would never draft."""
    from types import SimpleNamespace

    from orchestrator.llama_server import draft_args
    from orchestrator.speculative import DraftSetup

    def args(max_tokens: int, ngram: int = 3, planned: bool = True) -> list[str]:
        setup = DraftSetup(kind="prompt-lookup", max_tokens=max_tokens, adaptive=False, ngram=ngram)
        return draft_args(SimpleNamespace(draft=setup, spec=SimpleNamespace(prompt_lookup=planned)))

    assert args(7) == ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
                       "--spec-ngram-simple-size-m", "7"]
    assert args(1)[3:] == ["3", "--spec-ngram-simple-size-m", "1"]
    assert args(7, planned=False)[3] == "3"
    assert args(1, planned=False)[3:] == ["1", "--spec-ngram-simple-size-m", "1"]
    assert args(2, ngram=4, planned=False)[3] == "2"
