"""The runtime's draft length for a program that drafts for several sequences decoded together (llama-server's slots
under a plan; patches/llama.cpp/overlay/src/llama-flashflex-draft.h). Mostly through a small C++ driver compiled
with it alone (tests/cpp/draft_length_driver.cpp): simulated passes whose seconds follow a cost model, drafts kept
as a seeded coin says (no ggml, no llama.cpp, no clock: the times are the simulation's); then through the built
library's C API: a stock context keeps the program's length, a planned one gets the controller its spec asks for."""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import synth
from tests.helpers import overlay_driver

DRIVER = Path(__file__).parent / "cpp" / "draft_length_driver.cpp"


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    return overlay_driver(tmp_path_factory.mktemp("draft"), DRIVER, "llama-flashflex-draft.cpp",
                          "llama-flashflex-json.cpp")


class Controller:
    """One controller in a driver process, asked and told line by line."""

    def __init__(self, driver: Path, adaptive: bool = True):
        self.proc = subprocess.Popen([str(driver)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.now = 0.0
        assert self.ask(f"new {int(adaptive)}") == {"ok": True}

    def ask(self, line: str) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def propose_each(self, n: int, n_max: int, drafts: list[int]) -> list[int]:
        """What sequences 0, 1, ... of the n in the pass keep of drafts of these lengths."""
        return self.ask(f"propose {n} {n_max} {self.now:.9f} " + " ".join(map(str, drafts)))["lengths"]

    def propose(self, n: int, n_max: int, drafting: int | None = None) -> int:
        """The longest that any of the `drafting` (default: all n) sequences, each with a draft of n_max tokens,
        keeps."""
        m = n if drafting is None else drafting
        return max(self.propose_each(n, n_max, [n_max] * m), default=0)

    def passed(self, rows: int, seconds: float, generation_only: bool = True) -> None:
        self.now += seconds
        assert self.ask(f"pass {rows} {int(generation_only)} {self.now:.9f}") == {"ok": True}

    def state(self) -> dict:
        return self.ask("state")

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=10)


@pytest.fixture
def controller(driver):
    made: list[Controller] = []

    def make(adaptive: bool = True) -> Controller:
        made.append(Controller(driver, adaptive))
        return made[-1]

    yield make
    for c in made:
        c.close()


def serve(c: Controller, n: int, passes: int, cost: Callable[[int, int], float], acceptance: float | list[float],
          n_max: int = 7, seed: int = 0, drafting: int | None = None) -> list[int]:
    """`passes` passes of n sequences, `drafting` of them (default: all) with a draft of n_max tokens, each cut to
    what the controller proposes for it; a pass of R rows takes cost(n, R) seconds; each drafted token of sequence i
    is kept with probability acceptance (or acceptance[i]) given the ones before it were. Returns the longest
    proposed length of each pass."""
    rng = random.Random(seed)
    m = n if drafting is None else drafting
    p = acceptance if isinstance(acceptance, list) else [acceptance] * m
    longest = []
    for _ in range(passes):
        ks = c.propose_each(n, n_max, [n_max] * m)
        longest.append(max(ks, default=0))
        for seq, k in enumerate(ks):
            if k:
                kept = 0
                while kept < k and rng.random() < p[seq]:
                    kept += 1
                assert c.ask(f"verified {seq} {k} {kept}") == {"ok": True}
        c.passed(n + sum(ks), cost(n, n + sum(ks)))
    return longest


def read_bound(n: int, rows: int) -> float:
    """A pass that waits for its reads: 40 ms however many rows, plus 0.5 ms a row computed."""
    return 0.040 + 0.0005 * rows


def compute_bound(n: int, rows: int) -> float:
    """A pass whose reads are hidden: every row costs 10 ms."""
    return 0.010 * rows


def test_a_plain_pass_is_measured_before_any_draft_and_the_first_draft_is_one_token(controller):
    c = controller()
    assert c.propose(1, 7) == 0
    c.passed(1, 0.040)
    assert c.propose(1, 7) == 1
    assert c.ask("verified 0 1 1") == {"ok": True}
    c.passed(2, 0.041)
    assert c.propose(1, 7) > 1  # a row that rode on the reads: longer drafts now


def test_a_lone_sequence_whose_drafts_ride_on_the_reads_drafts_the_longest(controller):
    lengths = serve(controller(), 1, 40, read_bound, acceptance=0.9)
    assert set(lengths[-20:]) <= {0, 7} and lengths[-20:].count(0) <= 1, lengths  # 0: a plain pass re-measured


def test_sequences_that_fill_each_pass_stop_drafting_and_probe_rarely(controller):
    lengths = serve(controller(), 4, 400, compute_bound, acceptance=0.7)
    # a draft of k costs k + 1 plain passes and gives at most 1 + 0.7 + ... tokens: never worth it; once two draft
    # lengths are priced only one-token probes go out, at most one every 64 passes
    drafted = [k for k in lengths[20:] if k]
    assert len(drafted) <= 380 // 64 + 1 and set(drafted) <= {1}, lengths


def test_each_number_of_sequences_is_priced_on_its_own(controller):
    c = controller()
    serve(c, 4, 60, compute_bound, acceptance=0.8)
    lone = serve(c, 1, 30, read_bound, acceptance=0.8, seed=1)
    assert lone[-10:] == [7] * 10, lone
    four = serve(c, 4, 30, compute_bound, acceptance=0.8, seed=2)
    assert sum(1 for k in four if k) <= 1, four


def test_drafts_that_fail_back_off_to_rare_probes(controller):
    lengths = serve(controller(), 1, 600, read_bound, acceptance=0.0)
    # where rows ride on the reads even a draft kept one time in three pays, so the first few go out before the
    # first token's rate falls (two tokens while the rate after a kept one, never judged, is its prior's); then
    # only one-token probes
    probes = [i for i, k in enumerate(lengths) if k and i >= 30]
    assert set(lengths[i] for i in probes) == {1}
    late = [i for i in probes if i >= 200]
    # the gap between probes doubles while they fail, up to 64 passes
    assert len(late) <= 400 // 64 + 1, probes
    assert all(b - a >= 32 for a, b in zip(late, late[1:])), probes


def test_one_slow_pass_does_not_turn_drafting_off(controller):
    c = controller()
    serve(c, 1, 40, read_bound, acceptance=0.9)
    k = c.propose(1, 7)
    assert k == 7
    assert c.ask(f"verified 0 {k} {k}") == {"ok": True}
    c.passed(1 + k, 10 * read_bound(1, 1 + k))  # another process held the CPU
    assert c.propose(1, 7) == 7


def test_drafts_do_not_slow_the_sequences_without_one(controller):
    """Four sequences, two copying (95% of drafts kept), two with nothing to draft; each row costs 8.5 ms against a
    plain pass's 55 ms (as measured in llama-server, SmolLM2 at 4 slots). Drafts of 1-4 would lift the copying two
    2-4x, but the other two would wait 31-124% longer for each token: nothing but probes goes out."""
    def measured(n: int, rows: int) -> float:
        return 0.055 + 0.0085 * (rows - n)

    c = controller()
    serve(c, 1, 30, read_bound, acceptance=0.95)  # a lone request first: the acceptance is known
    lengths = serve(c, 4, 200, measured, acceptance=0.95, drafting=2, seed=1)
    assert set(lengths[20:]) <= {0, 1} and sum(lengths[20:]) <= 180 // 32 + 1, lengths


def test_drafts_take_the_rows_a_pass_computes_while_it_waits_for_its_reads(controller):
    """Four sequences, two copying; the pass waits 50 ms for its reads and computes 8 ms a row: six rows are free,
    so each copying sequence drafts one token, and no more (a seventh row would slow the others)."""
    def hinge(n: int, rows: int) -> float:
        return max(0.050, 0.008 * rows)

    c = controller()
    serve(c, 1, 30, read_bound, acceptance=0.95)
    lengths = serve(c, 4, 100, hinge, acceptance=0.95, drafting=2, seed=1)
    assert set(lengths[-40:]) <= {0, 1} and lengths[-40:].count(0) <= 2, lengths  # 0: a plain pass re-measured


def test_sequences_that_all_draft_are_not_held_to_free_rows(controller):
    """The same passes with all four copying: each gains from its own draft, so the rows may cost time."""
    def measured(n: int, rows: int) -> float:
        return 0.055 + 0.0085 * (rows - n)

    c = controller()
    serve(c, 1, 30, read_bound, acceptance=0.95)
    lengths = serve(c, 4, 100, measured, acceptance=0.95, seed=1)
    late = sorted(lengths[40:])
    assert late[len(late) // 2] >= 2, lengths


def test_no_draft_no_question(controller):
    c = controller()
    c.propose(1, 7)
    c.passed(1, 0.040)
    assert c.propose(1, 7, drafting=0) == 0  # nothing to cut: no probe either
    c.passed(1, 0.040)
    assert c.propose(1, 7) == 1


def test_a_pass_with_prompt_tokens_prices_nothing(controller):
    c = controller()
    assert c.propose(2, 7) == 0
    c.passed(40, 0.5, generation_only=False)
    assert c.propose(2, 7) == 0  # still no plain pass of two sequences measured
    assert c.state()["by_sequences"] == [] or all(s["passes_by_rows"] == [] for s in c.state()["by_sequences"])


def test_a_fixed_length_is_the_programs_own(controller):
    c = controller(adaptive=False)
    assert [c.propose(n, 5) for n in (1, 4, 1)] == [5, 5, 5]
    assert c.propose(0, 5) == 0 and c.propose(3, 0) == 0 and c.propose(3, 5, drafting=0) == 0
    assert c.state()["adaptive"] is False


def test_the_state_reports_what_was_measured(controller):
    c = controller()
    serve(c, 2, 30, read_bound, acceptance=0.9)
    s = c.state()
    assert s["adaptive"] is True and 0.5 < s["acceptance_estimate"] <= 1.0
    assert s["kept"] <= s["drafted"] and s["drafted"] > 0
    (two,) = s["by_sequences"]
    assert two["sequences"] == 2 and two["next_length_all_drafting"] == 7
    rows = {p["rows"]: p for p in two["passes_by_rows"]}
    assert rows[2]["median_seconds"] == pytest.approx(read_bound(2, 2), abs=1e-6)
    assert all(p["passes"] <= 9 for p in rows.values())


def test_a_pass_whose_reads_hide_a_few_rows_drafts_about_as_many(controller):
    """Two sequences; the pass waits 40 ms for its reads and computes 8 ms a row: up to 5 rows are free, so drafts
    of 1-2 tokens each cost (nearly) nothing, and longer ones cost their rows."""
    def hinge(n: int, rows: int) -> float:
        return max(0.040, 0.008 * rows) + 0.0002 * rows

    lengths = serve(controller(), 2, 200, hinge, acceptance=0.8)
    late = sorted(lengths[100:])
    assert 1 <= late[len(late) // 2] <= 3, lengths


def _two_sequences(c: Controller, acceptance: tuple[float, float], cost: Callable[[int, int], float],
                   passes: int = 100, rates: list | None = None) -> tuple[list[int], list[int]]:
    """Two sequences, both with 7-token drafts, each drafted token kept as a seeded coin with that sequence's
    acceptance says; returns what each kept per pass (and appends to `rates` each sequence's (first, continued)
    estimates as the controller saw them before the pass)."""
    rng = random.Random(3)
    first, second = [], []
    for _ in range(passes):
        if rates is not None:
            rates.append({a["sequence"]: (a["estimate"], a["continued"]) for a in c.state()["acceptance_by_sequence"]})
        k = c.propose_each(2, 7, [7, 7])
        first.append(k[0])
        second.append(k[1])
        for seq, (ki, p) in enumerate(zip(k, acceptance)):
            if ki:
                kept = 0
                while kept < ki and rng.random() < p:
                    kept += 1
                assert c.ask(f"verified {seq} {ki} {kept}") == {"ok": True}
        c.passed(2 + sum(k), cost(2, 2 + sum(k)))
    return first, second


def test_each_sequence_drafts_by_its_own_acceptance(controller):
    """Two sequences, one copying (90% of drafted tokens kept), one whose drafts are kept now and then (35%); a
    drafted row costs 2 ms against a plain pass's 40 ms. The copying one keeps the longer drafts; the other keeps a
    token, whose expected gain pays for the rows it lets the first one draft, and never expects less than 0.97x."""
    def measured(n: int, rows: int) -> float:
        return 0.040 + 0.002 * (rows - n)

    c = controller()
    serve(c, 2, 30, measured, acceptance=[0.9, 0.35])
    rates: list = []
    copying, weak = _two_sequences(c, (0.9, 0.35), measured, rates=rates)
    assert sorted(copying)[50] >= 3, copying
    assert sorted(weak)[50] <= 2 and sorted(weak)[50] < sorted(copying)[50], weak
    by_seq = {a["sequence"]: a["estimate"] for a in c.state()["acceptance_by_sequence"]}
    assert by_seq[0] > 0.75 and by_seq[1] < 0.6, by_seq
    for k0, k1, seen in zip(copying, weak, rates):  # the weak one's expected rate, as the controller expected it
        f, p = seen[1]
        expected = 1 + f * sum(p ** j for j in range(k1))  # at least 0.97x a plain pass's (the line fitted: ~exact)
        assert expected * 0.040 >= 0.97 * measured(2, 2 + k0 + k1) - 0.0005, (k0, k1, seen)


def test_a_weak_sequences_first_token_is_priced_apart_from_the_tokens_after_it(controller):
    """Prompt lookup's weak drafts (shorter n-grams where the text does not repeat) are seldom right at their first
    token, but once one is, the copy tends to go on: a sequence whose first drafted token is kept 15% of the time and
    each one after it 90%. Priced as one rate per token, it would count as ~0.5 and be handed one-token drafts to
    lift the floor while the copying sequence beside it drafts long (a 1.15x gain expected as 1.5x); priced apart, it
    keeps its rate within the floor's 3% (plus the simulation's noise) of a plain pass's, and the copying one still
    drafts."""
    def measured(n: int, rows: int) -> float:
        return 0.040 + 0.003 * (rows - n)

    c = controller()
    rng = random.Random(5)
    weak_tokens, copy_tokens, seconds = 0, 0, 0.0
    for i in range(400):
        k = c.propose_each(2, 7, [7, 7])
        kept = [0, 0]
        for seq, ki in enumerate(k):
            while kept[seq] < ki and rng.random() < (0.9 if seq == 0 or kept[seq] else 0.15):
                kept[seq] += 1
            if ki:
                assert c.ask(f"verified {seq} {ki} {kept[seq]}") == {"ok": True}
        t = measured(2, 2 + sum(k))
        c.passed(2 + sum(k), t)
        if i >= 100:  # once both estimates have settled
            copy_tokens += 1 + kept[0]
            weak_tokens += 1 + kept[1]
            seconds += t
    plain_rate = 1 / measured(2, 2)
    assert weak_tokens / seconds >= 0.95 * plain_rate, (weak_tokens / seconds / plain_rate)
    assert copy_tokens / seconds >= 1.5 * plain_rate, (copy_tokens / seconds / plain_rate)
    (weak,) = [a for a in c.state()["acceptance_by_sequence"] if a["sequence"] == 1]
    assert weak["estimate"] < 0.3 and weak["continued"] > 0.6, weak


def test_a_sequence_that_ends_its_request_starts_the_next_from_the_prior(controller):
    """A slot that copied a document (90% kept) and then takes a chat: the copy's estimate is forgotten when its
    request ends (llama_flashflex_draft_end at the slot's release), so the chat's drafts are priced from the prior,
    not from the copy's 90% for the ~30 tokens the estimate would take to decay; the other slot's stays."""
    def measured(n: int, rows: int) -> float:
        return 0.040 + 0.002 * (rows - n)

    c = controller()
    serve(c, 2, 30, measured, acceptance=[0.9, 0.5])
    _two_sequences(c, (0.9, 0.5), measured)
    before = {a["sequence"]: a["estimate"] for a in c.state()["acceptance_by_sequence"]}
    assert before[0] > 0.75, before
    assert c.ask("ended 0") == {"ok": True}
    after = {a["sequence"]: a["estimate"] for a in c.state()["acceptance_by_sequence"]}
    assert 0 not in after and after[1] == before[1], after
    fresh = c.propose_each(2, 7, [7, 7])
    assert c.ask("verified 0 1 0") == {"ok": True}
    prior = {a["sequence"]: a["estimate"] for a in c.state()["acceptance_by_sequence"]}
    assert prior[0] < 0.5, (fresh, prior)  # the prior (0.5 over two tokens) and one failed token, not 0.9's memory
    assert c.ask("ended 7") == {"ok": True}  # a sequence never seen: nothing to forget


def test_a_sequence_whose_drafts_fail_holds_the_pass_to_its_plain_speed(controller):
    """The same, with the second sequence's drafts never kept and a row costing 5 ms of a 40 ms pass: any row
    would slow it by more than 3%, so the first drafts nothing beyond rare probes, however well it copies."""
    def measured(n: int, rows: int) -> float:
        return 0.040 + 0.005 * (rows - n)

    c = controller()
    serve(c, 2, 30, measured, acceptance=[0.9, 0.0])
    copying, failing = _two_sequences(c, (0.9, 0.0), measured)
    assert sum(1 for k in copying[20:] if k) <= 80 // 32 + 1 and set(copying[20:]) <= {0, 1}, copying


def test_a_plain_pass_is_measured_again_where_every_pass_drafts(controller):
    """Four copying sequences whose first plain passes were slowed by another process (100 ms against 40): priced
    against those, drafted rows (10 ms each) looked free. Every 32 drafted passes one goes out plain, so the plain
    cost is the machine's again within some of those, and the drafts shrink to what the rows are worth."""
    def cost(n: int, rows: int) -> float:
        return 0.040 + 0.010 * (rows - n)

    c = controller()
    for _ in range(9):  # the slowed plain passes
        c.propose(4, 7)
        c.passed(4, 0.100)
    early = serve(c, 4, 20, cost, acceptance=0.9)
    late = serve(c, 4, 200, cost, acceptance=0.9, seed=1)
    plain = [p for p in c.state()["by_sequences"][0]["passes_by_rows"] if p["rows"] == 4]
    assert plain and plain[0]["median_seconds"] == pytest.approx(0.040, abs=1e-6), plain
    assert 0 in late[100:]  # the plain passes measured again
    assert max(late[150:]) < max(early), (early, late)


def gemma_like(n: int, rows: int) -> float:
    """Passes as llama-server measured them with Gemma 3 270M under 280 MiB (one slot): a plain pass 18 ms, a second
    row (its 262k-wide logits, and the CPU's switch to batched kernels) doubles it, each row after that ~4.5 ms."""
    return 0.018 if rows <= n else 0.035 + 0.0045 * (rows - n - 1)


def test_a_new_request_that_copies_drafts_where_rows_cost_a_pass(controller):
    """Where a drafted row costs as much as a plain pass, drafts of the prior acceptance (0.5 for the first token
    and each after it) do not pay, and one-token probes only ever measure the first token: a request that copies
    its context (95% kept) was held to rare one-token probes for its whole answer (llama-server with Gemma: the
    copy-edit alone drafted 1 token in 128, 1.10x undrafted). A new request's first drafts measure it instead: a
    one-token draft at its first pass and, when kept, one of the whole length, so the tokens after a kept one are
    judged too; then the copy drafts long for the rest of its answer."""
    c = controller()
    serve(c, 1, 60, gemma_like, acceptance=0.3)  # an earlier request that did not copy: every size is priced
    assert c.ask("ended 0") == {"ok": True}
    lengths = serve(c, 1, 40, gemma_like, acceptance=0.95, seed=3)
    assert lengths[:2] == [1, 7], lengths  # the new request measured: a token, then the whole length
    assert sum(1 for k in lengths[5:] if k >= 4) >= 25, lengths


def test_a_new_request_that_does_not_copy_costs_at_most_three_rows(controller):
    """The same measurement for a request whose drafts fail: one-token drafts at its 1st, 5th and 21st passes,
    nothing longer, then only the rare probes."""
    c = controller()
    serve(c, 1, 60, gemma_like, acceptance=0.3)
    assert c.ask("ended 0") == {"ok": True}
    lengths = serve(c, 1, 60, gemma_like, acceptance=0.0, seed=3)
    drafted = [i for i, k in enumerate(lengths) if k]
    # beside the measurements, at most the one probe of a controller whose drafts were cut to 0 for 64 passes
    assert {0, 4, 20} <= set(drafted) and len(drafted) <= 4 and max(lengths) == 1, drafted


def test_a_copy_edit_whose_first_word_is_corrected_is_measured_again(controller):
    """A copy-edit's first drafted word is often the one it corrects (Gemma rewriting "comittee" as "committee"):
    its first one-token measurement fails, the one four passes later is kept, then it drafts long."""
    c = controller()
    serve(c, 1, 60, gemma_like, acceptance=0.3)
    assert c.ask("ended 0") == {"ok": True}
    rng, lengths = random.Random(6), []
    for i in range(40):
        (k,) = c.propose_each(1, 7, [7])
        lengths.append(k)
        kept = 0
        while i > 0 and kept < k and rng.random() < 0.95:
            kept += 1
        if k:
            assert c.ask(f"verified 0 {k} {kept}") == {"ok": True}
        c.passed(1 + k, gemma_like(1, 1 + k))
    assert lengths[:6] == [1, 0, 0, 0, 1, 7], lengths
    assert sum(1 for k in lengths[6:] if k >= 4) >= 25, lengths


def test_a_new_request_beside_busy_slots_measures_one_token_only(controller):
    """Beside three slots whose drafts fail, where a row costs 8.5 ms of a 55 ms pass, no draft pays even if every
    token were kept (each would slow the other three by more than 3%): a new copying request measures one token and
    then drafts no more than the probes."""
    def measured(n: int, rows: int) -> float:
        return 0.055 + 0.0085 * (rows - n)

    c = controller()
    serve(c, 4, 60, measured, acceptance=0.0)
    assert c.ask("ended 3") == {"ok": True}
    lengths = serve(c, 4, 40, measured, acceptance=[0.0, 0.0, 0.0, 0.95], seed=4)
    assert max(lengths) <= 1 and sum(lengths) <= 3, lengths


def test_a_sequence_passed_over_drafts_again_later(controller):
    """A slot whose drafts failed keeps its estimate into its next request: passes that cut its draft to nothing
    bring it back toward the prior, so it is judged again within some dozens of passes, and drafts once it copies."""
    def measured(n: int, rows: int) -> float:
        return 0.040 + 0.005 * (rows - n)

    c = controller()
    serve(c, 2, 40, measured, acceptance=[0.9, 0.0])
    lengths = serve(c, 2, 80, measured, acceptance=[0.9, 0.95], seed=1)  # the second slot's next request copies
    c.propose_each(2, 7, [0, 0])  # a plain pass: the next one is not the plain pass measured again
    c.passed(2, measured(2, 2))
    again = [c.propose_each(2, 7, [7, 7])[1]]
    s = c.state()
    by_seq = {a["sequence"]: a["estimate"] for a in s["acceptance_by_sequence"]}
    assert by_seq[1] > 0.6, (by_seq, lengths)
    assert again[0] >= 2, (again, by_seq)


# --------------------------------------------------------------------------------------------------
# Shadows: the program gives its drafts' tokens and the tokens each sequence takes (llama-server does)


def drafts_line(c: Controller, n: int, n_max: int, drafts: list[list[int]]) -> list[int]:
    """What sequences 0, 1, ... keep of these drafts, given with their tokens."""
    words = [",".join(map(str, d)) or "-" for d in drafts]
    return c.ask(f"drafts {n} {n_max} {c.now:.9f} " + " ".join(words))["lengths"]


def decode_text(c: Controller, text: list[int], draft_at: Callable[[int], list[int]],
                cost: Callable[[int, int], float], shadows: bool, n_max: int = 7) -> list[tuple[int, int, int]]:
    """A lone sequence taking the tokens of `text`, drafting draft_at(position) before each pass (with its tokens
    given when `shadows`, else its length only); a sent draft keeps its tokens that match the text. Returns the
    sent drafts as (position, length, kept)."""
    pos, sent = 0, []
    while pos < len(text):
        d = draft_at(pos)[:n_max]
        k = drafts_line(c, 1, n_max, [d])[0] if shadows else c.propose_each(1, n_max, [len(d)])[0]
        if k:
            kept = 0
            while kept < k and pos + kept < len(text) and d[kept] == text[pos + kept]:
                kept += 1
            assert c.ask(f"verified 0 {k} {kept}") == {"ok": True}
            sent.append((pos, k, kept))
            pos += kept + 1
        else:
            if shadows:
                assert c.ask(f"taken 0 {text[pos]}") == {"ok": True}
            pos += 1
        c.passed(1 + k, cost(1, 1 + k))
    return sent


FREE = list(range(1000, 1200))  # 200 tokens of a text that never repeats ...
COPY = FREE[:100]               # ... then a copy of its first 100


def free_then_copy(seed: int) -> Callable[[int], list[int]]:
    """Prompt lookup over FREE + COPY: in the free part a weak draft whose first token is right one time in five
    (the rest never), in the copy the text's next tokens."""
    rng, text = random.Random(seed), FREE + COPY

    def draft_at(pos: int) -> list[int]:
        if pos >= len(FREE):
            return text[pos:pos + 7]
        return [text[pos] if rng.random() < 0.2 else 5] + [6] * 6
    return draft_at


def test_a_draft_cut_to_nothing_is_judged_by_the_tokens_the_sequence_takes(controller):
    """Its shadow is judged token by token as the sequence takes them, as a sent draft would have been: the first
    token's rate, then each token after a kept one, until the first the sequence did not take; a new shadow is made
    only once the last one is judged out."""
    c = controller()
    assert drafts_line(c, 1, 7, [[5, 6, 7]]) == [0]  # no plain pass priced yet: the draft is cut to nothing
    for token in (5, 6):
        assert c.ask(f"taken 0 {token}") == {"ok": True}
    assert drafts_line(c, 1, 7, [[1, 2, 3]]) == [0]  # the shadow [5, 6, 7] is still being judged: not replaced
    assert c.ask("taken 0 9") == {"ok": True}  # not 7: the shadow ends here
    s = c.state()
    assert s["shadowed"] is True
    assert (s["shadow_judged"], s["shadow_kept"], s["drafted"]) == (3, 2, 0)
    # from the prior (1 of 2 each), decayed by 0.97 per pass (here a token taken) and per judged token: the first
    # token kept; then one kept, one missed
    assert s["acceptance_estimate"] == pytest.approx(1.97 / 2.94)
    assert s["acceptance_continued"] == pytest.approx(0.97 * 1.97 / (0.97 * 2.94 + 1))
    assert c.ask("taken 0 1") == {"ok": True}  # no shadow now (the next draft makes one): nothing judged
    assert c.state()["shadow_judged"] == 3
    assert drafts_line(c, 1, 7, [[1, 2, 3]]) == [0]
    assert c.ask("taken 0 1") == {"ok": True}
    assert (c.state()["shadow_judged"], c.state()["shadow_kept"]) == (4, 3)


def test_shadows_replace_probes_where_drafts_fail(controller):
    """On text that does not repeat, the drafts made and cut to nothing are judged unsent: no probe and no one-token
    measurement goes out (the controller told only lengths sends both), and where the text turns to copying its
    drafts start within a few shadows of it."""
    results = {}
    for shadows in (True, False):
        c = controller()
        sent = decode_text(c, FREE + COPY, free_then_copy(seed=3), read_bound, shadows)
        free_sent = [s for s in sent if s[0] < len(FREE)]
        copy_sent = [s for s in sent if s[0] >= len(FREE)]
        results[shadows] = (sum(s[1] for s in free_sent), copy_sent[0][0] - len(FREE) if copy_sent else None,
                            sum(s[2] for s in copy_sent), c.state())
    drafted_free, copy_start, copy_kept, state = results[True]
    assert state["by_sequences"][0]["probes"] == 0 and state["shadow_judged"] >= 200
    assert drafted_free <= 0.1 * results[False][0], (drafted_free, results[False][:3])
    assert copy_start is not None and copy_start <= 40 and copy_kept >= 40, results[True][:3]


def test_a_drafted_pass_measured_slow_once_is_forgotten_after_plain_passes(controller):
    """With shadows no probe goes out, so a drafted pass slowed once (another process holding the CPU) would price
    drafts out for good: after 64 plain passes in a row what drafted passes cost is forgotten, and a text that copies
    drafts again."""
    slowed = []

    def cost(n: int, rows: int) -> float:
        if rows > n and not slowed:
            slowed.append(rows)
            return 0.5  # 12x a plain pass
        return read_bound(n, rows)

    text = list(range(2000, 2400))  # every draft right: a copy throughout
    sent = decode_text(controller(), text, lambda pos: text[pos:pos + 7], cost, shadows=True)
    first = sent[0][0]
    later = [s for s in sent if s[0] > first + 1]
    assert slowed and later, sent
    assert 64 <= later[0][0] - first <= 80, sent[:3]  # the plain passes in between, then drafting again
    assert sum(s[2] for s in later) >= 250, sent[:5]


# --------------------------------------------------------------------------------------------------
# The C API of the built library (llama_flashflex_draft_*)


def _c_api():
    import ctypes

    from orchestrator import native

    cdll = native.lib()
    if "draft-length" not in native.info()["features"]:
        pytest.skip("the installed build predates the draft length (C API 9); run flashflex build")
    cdll.llama_flashflex_draft_lengths.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32,
                                                   ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int32),
                                                   ctypes.c_int32]
    cdll.llama_flashflex_draft_lengths.restype = None
    cdll.llama_flashflex_draft_pass.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_bool]
    cdll.llama_flashflex_draft_pass.restype = None
    cdll.llama_flashflex_draft_stats.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    cdll.llama_flashflex_draft_stats.restype = ctypes.c_int32
    cdll.llama_flashflex_prompt_lookup_planned.argtypes = []
    cdll.llama_flashflex_prompt_lookup_planned.restype = ctypes.c_bool
    cdll.llama_flashflex_gather.argtypes = []
    cdll.llama_flashflex_gather.restype = ctypes.c_int32
    return cdll


def _lengths(cdll, ctx, n: int, n_max: int, drafts: list[int]) -> list[int]:
    """What sequences 0, 1, ... keep of drafts of these lengths (llama_flashflex_draft_lengths)."""
    import ctypes

    ids = (ctypes.c_int32 * len(drafts))(*range(len(drafts)))
    lengths = (ctypes.c_int32 * len(drafts))(*drafts)
    cdll.llama_flashflex_draft_lengths(ctx, n, n_max, ids, lengths, len(drafts))
    return list(lengths)


def _stats(cdll, ctx) -> dict | None:
    import ctypes

    n = cdll.llama_flashflex_draft_stats(ctx, None, 0)
    if n < 0:
        return None
    buf = ctypes.create_string_buffer(n + 1)
    cdll.llama_flashflex_draft_stats(ctx, buf, n + 1)
    return json.loads(buf.value)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return synth.write_synth_model(synth.preset("tiny-dense"), tmp_path_factory.mktemp("draftlen") / "m.gguf")


def _prepared(path: Path, planned: bool, adaptive: bool = True, prompt_lookup: bool = False):
    """A stock run of the model, or one planned at its minimum budget (most weights streamed) with draft.adaptive and
    the spec's prompt_lookup."""
    import dataclasses

    from orchestrator.config import PrefetchConfig
    from orchestrator.modelfile.reader import read_model_table
    from orchestrator.run.settings import GenerationSettings
    from tests.helpers import plan_table, prepared_of

    settings = GenerationSettings(model=path, ctx=128, batch=8, ubatch=8, threads=2)
    if not planned:
        return prepared_of(settings)
    table, prefetch = read_model_table(path), PrefetchConfig(threads=1, window=2)
    minimum = plan_table(table, 1 << 40, ctx=128, ubatch=8, prefetch=prefetch).minimum_budget_bytes
    prepared = prepared_of(settings, plan_table(table, minimum, ctx=128, ubatch=8, prefetch=prefetch))
    assert prepared.spec.stream is not None
    return dataclasses.replace(prepared, spec=prepared.spec.model_copy(update={"draft_adaptive": adaptive,
                                                                                "prompt_lookup": prompt_lookup}))


def test_a_stock_context_keeps_the_programs_length(patched_llama, small_model):
    cdll = _c_api()
    with _prepared(small_model, planned=False).session() as handle:
        ctx = handle.llm.ctx
        assert [_lengths(cdll, ctx, n, 7, [7, 3][:n]) for n in (1, 4, 1)] == [[7], [7, 3], [7]]  # kept whole
        cdll.llama_flashflex_draft_pass(ctx, 4, True)  # nothing to tell: a no-op
        assert _stats(cdll, ctx) is None


@pytest.mark.parametrize("adaptive", [True, False])
def test_a_planned_context_drafts_as_its_spec_says(patched_llama, small_model, adaptive):
    cdll = _c_api()
    with _prepared(small_model, planned=True, adaptive=adaptive).session() as handle:
        ctx = handle.llm.ctx
        # adaptive: a plain pass is priced before any draft goes out; fixed: the program's own length
        assert _lengths(cdll, ctx, 2, 7, [7, 0]) == ([0, 0] if adaptive else [7, 0])
        cdll.llama_flashflex_draft_pass(ctx, 2, True)
        stats = _stats(cdll, ctx)
        assert stats is not None and stats["adaptive"] is adaptive
        (two,) = stats["by_sequences"]
        assert two["sequences"] == 2 and [p["rows"] for p in two["passes_by_rows"]] == [2]


def test_a_planned_context_judges_the_drafts_it_cuts_by_the_tokens_taken(patched_llama, small_model):
    """llama-server gives its drafts' tokens (llama_flashflex_draft_lengths_with_tokens) and each token a slot takes
    without a sent draft (llama_flashflex_draft_taken): a planned context judges the drafts it cut to nothing by
    them; a stock context keeps the drafts whole and has nothing to judge."""
    import ctypes

    from orchestrator import native

    cdll = _c_api()
    if "draft-shadows" not in native.info()["features"]:
        pytest.skip("the installed build predates drafts judged unsent (C API 13); run flashflex build")
    token_p = ctypes.POINTER(ctypes.c_int32)
    cdll.llama_flashflex_draft_lengths_with_tokens.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32,
                                                              token_p, ctypes.POINTER(token_p), token_p,
                                                              ctypes.c_int32]
    cdll.llama_flashflex_draft_lengths_with_tokens.restype = None
    cdll.llama_flashflex_draft_taken.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]
    cdll.llama_flashflex_draft_taken.restype = None

    def cut(ctx, draft: list[int]) -> int:
        tokens = (ctypes.c_int32 * len(draft))(*draft)
        drafts = (token_p * 1)(ctypes.cast(tokens, token_p))
        lengths = (ctypes.c_int32 * 1)(len(draft))
        cdll.llama_flashflex_draft_lengths_with_tokens(ctx, 1, 7, (ctypes.c_int32 * 1)(0), drafts, lengths, 1)
        return lengths[0]

    with _prepared(small_model, planned=False).session() as handle:
        assert cut(handle.llm.ctx, [5, 6, 7]) == 3  # kept whole
        cdll.llama_flashflex_draft_taken(handle.llm.ctx, 0, 5)  # a no-op
        assert _stats(cdll, handle.llm.ctx) is None
    with _prepared(small_model, planned=True).session() as handle:
        ctx = handle.llm.ctx
        assert cut(ctx, [5, 6, 7]) == 0  # a plain pass is priced first
        for token in (5, 6, 9):
            cdll.llama_flashflex_draft_taken(ctx, 0, token)
        stats = _stats(cdll, ctx)
        assert stats is not None and stats["shadowed"] is True
        assert (stats["shadow_judged"], stats["shadow_kept"], stats["drafted"]) == (3, 2, 0)


@pytest.mark.parametrize("prompt_lookup", [True, False])
def test_llama_cpps_prompt_lookup_drafts_by_flashflexs_while_a_plan_asks(patched_llama, small_model, prompt_lookup):
    """The spec's prompt_lookup option reaches the runtime: llama.cpp's ngram-simple drafter asks
    llama_flashflex_prompt_lookup_planned while a model whose plan drafts by prompt lookup is loaded, and only then;
    a stock model never turns it on."""
    cdll = _c_api()
    assert cdll.llama_flashflex_prompt_lookup_planned() is False
    with _prepared(small_model, planned=False).session():
        assert cdll.llama_flashflex_prompt_lookup_planned() is False
    with _prepared(small_model, planned=True, prompt_lookup=prompt_lookup).session():
        assert cdll.llama_flashflex_prompt_lookup_planned() is prompt_lookup
    assert cdll.llama_flashflex_prompt_lookup_planned() is False  # the model freed


def test_a_server_waking_from_idle_waits_the_window_a_plan_asks_for(patched_llama, small_model):
    """llama-server calls llama_flashflex_gather when a request wakes its empty queue: it waits the largest window
    a loaded model's spec asks for (gather_ms), so requests sent together share the first pass, and returns at once
    (0) with none: stock, a plan without a window, the model freed."""
    import dataclasses
    import time

    cdll = _c_api()
    assert cdll.llama_flashflex_gather() == 0
    with _prepared(small_model, planned=False).session():
        assert cdll.llama_flashflex_gather() == 0
    planned = _prepared(small_model, planned=True)
    windowed = dataclasses.replace(planned, spec=planned.spec.model_copy(update={"gather_ms": 40}))
    with windowed.session():
        t0 = time.monotonic()
        assert cdll.llama_flashflex_gather() == 40
        assert time.monotonic() - t0 >= 0.039
    assert cdll.llama_flashflex_gather() == 0  # the model freed

