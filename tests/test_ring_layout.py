"""The dense-streaming ring layout on its own (issue 23): patches/llama.cpp/overlay/src/llama-flashflex-ring.{h,cpp}
are pure bookkeeping (no ggml, no llama.cpp, no threads), so a small driver (tests/cpp/ring_layout_driver.cpp) is
compiled with g++ against those two files alone and fed scenarios; the properties are checked here.

Properties: homes follow the order of use and wrap to the ring's start; homes that are in use together (a run of
consecutive homes that fits) never share bytes; the overlap lists are exactly the homes that share bytes;
learning a graph's order of use puts each layer's once-used tensors in use order after the others, and learning
it again changes nothing; a ring too small to hold what a layer holds at once is reported (the model's
layout_error); ring sizes hold at least the largest home and never more than what the ring streams."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from orchestrator import patches
from tests.helpers import overlay_driver

from conftest import REPO

DRIVER = Path(__file__).parent / "cpp" / "ring_layout_driver.cpp"


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    # Only the ring layout's own files and the standard library: no include path into ggml or llama.cpp.
    return overlay_driver(tmp_path_factory.mktemp("ring"), DRIVER, "llama-flashflex-ring.cpp")


class Layout:
    """A scenario for the driver: rings (mirrored or flat), homes (ring, len, layer index, by_use) and layers."""

    def __init__(self, rings: list[int], mirrored: list[bool] | None = None):
        self.rings = rings
        self.mirrored = mirrored or []
        self.homes: list[tuple[int, int, int, bool]] = []
        self.layers: list[tuple[int, int, int]] = []

    def layer(self, *homes: tuple[int, int] | tuple[int, int, bool]) -> Layout:
        """A streamed layer of homes (ring, len[, by_use])."""
        li, first = len(self.layers), len(self.homes)
        for h in homes:
            self.homes.append((h[0], h[1], li, bool(h[2]) if len(h) > 2 else False))
        self.layers.append((li, first, len(homes)))
        return self

    def lines(self) -> list[str]:
        out = ["rings " + " ".join(map(str, self.rings))]
        if self.mirrored:
            out.append("mirror " + " ".join(str(int(m)) for m in self.mirrored))
        out += [f"home {r} {n} {li} {int(u)}" for r, n, li, u in self.homes]
        out += [f"layer {layer} {first} {count}" for layer, first, count in self.layers]
        return out


def run(driver: Path, layout: Layout, *commands: str) -> list[dict]:
    """The driver's answers to the scenario's commands (the set-up lines' answers dropped)."""
    lines = layout.lines()
    out = subprocess.run([str(driver)], input="\n".join(lines + list(commands)) + "\n", capture_output=True,
                         text=True, check=True)
    answers = [json.loads(ln) for ln in out.stdout.splitlines()]
    assert all(a == {"ok": True} for a in answers[: len(lines)])
    return answers[len(lines):]


def shares_bytes(a: dict, b: dict, size: int | None = None) -> bool:
    """Whether two homes share bytes; `size`: their ring is mirrored, of that size (bytes counted modulo it)."""
    if a["ring"] != b["ring"]:
        return False
    if size is None:
        return a["off"] < b["off"] + b["len"] and b["off"] < a["off"] + a["len"]
    cells = lambda h: {(h["off"] + i) % size for i in range(h["len"])}  # noqa: E731
    return bool(cells(a) & cells(b))


def check_placement(homes: list[dict], rings: list[int]) -> None:
    """Consecutive in order of use per ring, wrapping to 0 exactly when the next home would run past the end; the
    overlap lists are exactly the pairs that share bytes."""
    pos = [0] * len(rings)
    for h in homes:
        r = h["ring"]
        expect = 0 if pos[r] + h["len"] > rings[r] else pos[r]
        assert h["off"] == expect
        pos[r] = expect + h["len"]
        if h["len"] <= rings[r]:
            assert h["off"] + h["len"] <= rings[r], "a home runs past its ring's end"
    for k, a in enumerate(homes):
        assert sorted(a["overlaps"]) == [j for j, b in enumerate(homes) if j != k and shares_bytes(a, b)]


def check_in_use_homes_are_disjoint(homes: list[dict], rings: list[int]) -> None:
    """Homes used one after another in a ring never share bytes while they can all be in use: any run of
    consecutive homes of one ring whose bytes plus the largest home fit in the ring (what the wrap may waste is
    less than one home)."""
    for r, size in enumerate(rings):
        idx = [k for k, h in enumerate(homes) if h["ring"] == r]
        largest = max((homes[k]["len"] for k in idx), default=0)
        for i in range(len(idx)):
            total = 0
            for j in range(i, len(idx)):
                total += homes[idx[j]]["len"]
                if total + largest > size:
                    break
                for m in range(i, j):
                    assert not shares_bytes(homes[idx[m]], homes[idx[j]]), (idx[m], idx[j], homes)


def test_homes_follow_the_order_of_use_and_wrap_to_the_ring_start(driver):
    layout = Layout([100]).layer((0, 30), (0, 30)).layer((0, 30), (0, 30))
    (placed,) = run(driver, layout, "place")
    homes = placed["homes"]
    assert [h["off"] for h in homes] == [0, 30, 60, 0]  # the 4th would end at 120 > 100: it wraps
    assert homes[3]["overlaps"] == [0] and homes[0]["overlaps"] == [3]
    check_placement(homes, [100])


def test_a_ring_that_holds_everything_never_wraps_and_no_home_shares_bytes(driver):
    layout = Layout([120]).layer((0, 30), (0, 30)).layer((0, 30), (0, 30))
    (placed,) = run(driver, layout, "place")
    assert [h["off"] for h in placed["homes"]] == [0, 30, 60, 90]
    assert all(h["overlaps"] == [] for h in placed["homes"])


def test_each_ring_places_its_own_homes(driver):
    layout = Layout([64, 40]).layer((0, 32), (1, 40), (0, 32)).layer((1, 40), (0, 32))
    (placed,) = run(driver, layout, "place")
    assert [(h["ring"], h["off"]) for h in placed["homes"]] == [(0, 0), (1, 0), (0, 32), (1, 0), (0, 0)]
    check_placement(placed["homes"], [64, 40])
    assert placed["homes"][1]["overlaps"] == [3]  # ring 1 holds one home at a time


@pytest.mark.parametrize("seed", range(40))
def test_random_layouts_place_consecutively_and_keep_in_use_homes_apart(driver, seed):
    rnd = random.Random(seed)
    n_rings = rnd.randint(1, 3)
    layout = Layout([0] * n_rings)
    for _ in range(rnd.randint(1, 6)):
        layout.layer(*[(rnd.randrange(n_rings), rnd.choice([4096, 8192, 12288, rnd.randint(1, 20000)]))
                       for _ in range(rnd.randint(1, 5))])
    largest = [max([n for r2, n, _, _ in layout.homes if r2 == r], default=1) for r in range(n_rings)]
    layout.rings = [largest[r] * rnd.choice([1, 2, 3]) + rnd.randint(0, 9000) for r in range(n_rings)]
    (placed,) = run(driver, layout, "place")
    check_placement(placed["homes"], layout.rings)
    check_in_use_homes_are_disjoint(placed["homes"], layout.rings)


def test_learning_the_order_of_use_moves_homes_once(driver):
    # layer 0: tensors 0, 1, 2; the graph uses 2 then 0 (1 has no use node: held with its layer);
    # layer 1: tensors 3, 4; the graph uses 4 twice (held with its layer) and 3 once
    layout = Layout([1000]).layer((0, 10), (0, 20), (0, 30)).layer((0, 40), (0, 50))
    _, first = run(driver, layout, "place", "learn 2 0 4 3 4")
    assert first["changed"] is True
    assert first["n_uses"] == [1, 0, 1, 1, 2]
    # per layer: the tensors without exactly one use first, then the others in use order
    assert first["order"] == [1, 2, 0, 4, 3]
    homes = first["homes"]
    assert [h["len"] for h in homes] == [20, 30, 10, 50, 40]
    assert [h["by_use"] for h in homes] == [False, True, True, False, True]
    assert [h["li"] for h in homes] == [0, 0, 0, 1, 1]
    check_placement(homes, [1000])
    # the same graph, its uses now at the new indices: nothing moves
    new_index = {old: new for new, old in enumerate(first["order"])}
    seq = " ".join(str(new_index[k]) for k in [2, 0, 4, 3, 4])
    (second,) = run(driver, _relaid(layout, first), f"learn {seq}")
    assert second["changed"] is False and second["order"] == [0, 1, 2, 3, 4]


def _relaid(layout: Layout, learned: dict) -> Layout:
    """The scenario as it stands after a learn: homes in their new order with their by_use flags."""
    out = Layout(layout.rings)
    out.homes = [(h["ring"], h["len"], h["li"], h["by_use"]) for h in learned["homes"]]
    out.layers = layout.layers
    return out


def test_a_graph_in_the_current_order_changes_nothing(driver):
    layout = Layout([1000]).layer((0, 10, True), (0, 20, True)).layer((0, 30, True))
    _, learned = run(driver, layout, "place", "learn 0 1 2")
    assert learned["changed"] is False
    assert learned["order"] == [0, 1, 2] and learned["n_uses"] == [1, 1, 1]


def test_a_ring_too_small_for_what_a_layer_holds_at_once_is_reported(driver):
    # layer 0 holds both tensors for the whole layer (no use nodes) but the ring holds one at a time
    small = Layout([60]).layer((0, 40), (0, 40))
    _, answer = run(driver, small, "place", "conflict")
    assert answer["conflict"] == [0, 1]
    # room for both: no conflict
    _, answer = run(driver, Layout([80]).layer((0, 40), (0, 40)), "place", "conflict")
    assert answer["conflict"] is None


def test_tensors_held_by_their_use_may_share_bytes_with_those_used_before_them(driver):
    # one home at a time is enough when every tensor is held only by its own use node
    layout = Layout([40]).layer((0, 40, True), (0, 40, True)).layer((0, 40, True))
    placed, answer = run(driver, layout, "place", "conflict")
    assert all(h["off"] == 0 for h in placed["homes"])
    assert answer["conflict"] is None
    # but not a tensor held with its layer: it is still held when the next one is used
    layout = Layout([40]).layer((0, 40), (0, 40, True))
    _, answer = run(driver, layout, "place", "conflict")
    assert answer["conflict"] == [0, 1]


def test_a_mirrored_ring_runs_homes_on_across_its_end_and_wastes_nothing(driver):
    # the flat ring of test_homes_follow...: the 4th home wraps to 0 and the 10 bytes at the end are lost
    layout = Layout([100], [True]).layer((0, 30), (0, 30)).layer((0, 30), (0, 30), (0, 30))
    (placed,) = run(driver, layout, "place")
    homes = placed["homes"]
    assert [h["off"] for h in homes] == [0, 30, 60, 90, 20]  # the 4th covers [90, 100) and [0, 20)
    assert homes[3]["overlaps"] == [0] and homes[4]["overlaps"] == [0, 1]
    assert homes[2]["overlaps"] == []  # [60, 90) is free until the next cycle


def test_two_largest_homes_in_a_mirrored_ring_keep_each_home_apart_from_the_one_before(driver):
    # what the planner sizes an auto ring for: compute holds one weight while the next arrives. In a flat ring of
    # two largest homes a wrapped home lands on the one computing (it waits); mirrored, never.
    big, small = 56, 21
    homes = [(0, small), (0, 4), (0, 4), (0, small), (0, big), (0, big), (0, big)] * 3
    for mirrored, ok in ((True, True), (False, False)):
        layout = Layout([2 * big], [mirrored])
        for i in range(0, len(homes), 7):
            layout.layer(*homes[i:i + 7])
        (placed,) = run(driver, layout, "place")
        apart = all(k - 1 not in h["overlaps"] for k, h in enumerate(placed["homes"]) if k)
        assert apart is ok


@pytest.mark.parametrize("seed", range(30))
def test_random_mirrored_layouts_are_consecutive_modulo_the_ring(driver, seed):
    rnd = random.Random(1000 + seed)
    layout = Layout([0], [True])
    for _ in range(rnd.randint(1, 5)):
        layout.layer(*[(0, rnd.randint(1, 300)) for _ in range(rnd.randint(1, 5))])
    largest = max(n for _, n, _, _ in layout.homes)
    size = layout.rings[0] = largest + rnd.randint(0, 2 * largest)
    (placed,) = run(driver, layout, "place")
    homes, pos, total = placed["homes"], 0, 0
    for h in homes:
        assert h["off"] == pos % size and h["off"] < size
        pos += h["len"]
    for k, a in enumerate(homes):
        assert sorted(a["overlaps"]) == [j for j, b in enumerate(homes) if j != k and shares_bytes(a, b, size)]
    # any run of consecutive homes that fits the ring shares no byte (no slack needed)
    for i in range(len(homes)):
        total = 0
        for j in range(i, len(homes)):
            total += homes[j]["len"]
            if total > size:
                break
            assert all(j not in homes[m]["overlaps"] for m in range(i, j))


def test_a_mirrored_window_ring_needs_no_wrap_slack(driver):
    layout = Layout([]).layer((0, 5000), (0, 7000)).layer((0, 6000), (0, 6000)).layer((0, 1000))
    (flat,) = run(driver, layout, "sizes 1 0 1 1")
    (mirrored,) = run(driver, layout, "sizes 1 0 1 1 1")
    assert flat["size"] == [12000 + 7000] and mirrored["size"] == [12000]


def test_ring_sizes_hold_the_largest_home_and_never_more_than_the_ring_streams(driver):
    layout = Layout([]).layer((0, 5000), (1, 9000)).layer((0, 7000), (1, 3000)).layer((0, 6000))
    # asked below what the largest homes need: each ring gets its largest home, rounded to the page
    (small,) = run(driver, layout, "sizes 2 100 3 4096")
    assert small["need"] == 7000 + 9000
    assert small["size"] == [8192, 12288]
    # a generous ask: the extra is shared in proportion to what each ring streams, capped at its total
    (big,) = run(driver, layout, "sizes 2 1000000 3 4096")
    assert big["size"] == [20480, 12288]  # 18000 and 12000 bytes stream, rounded up: they never wrap
    (mid,) = run(driver, layout, "sizes 2 20000 3 4096")
    extra = 20000 - 16000
    assert mid["size"] == [
        -(-(7000 + int(extra * 18000 / 30000)) // 4096) * 4096,
        -(-(9000 + int(extra * 12000 / 30000)) // 4096) * 4096,
    ]
    # no byte size: `window` layers' worth plus the largest home
    (win,) = run(driver, layout, "sizes 2 0 1 1")
    assert win["size"] == [7000 + 7000, 12000]  # ring 1: 9000 + 9000, capped at the 12000 bytes it streams
    for answer in (small, big, mid, win):
        assert all(s >= n for s, n in zip(answer["size"], [7000, 9000]))


def test_the_ring_layout_needs_neither_ggml_nor_llama_cpp():
    src = patches.overlay_dir(REPO) / "src"
    for name in ("llama-flashflex-ring.h", "llama-flashflex-ring.cpp"):
        includes = [ln for ln in (src / name).read_text().splitlines() if ln.startswith("#include")]
        assert all(ln.startswith("#include <") or "llama-flashflex-ring.h" in ln for ln in includes), includes


def test_homes_kept_elsewhere_take_no_ring_bytes(driver):
    """Tensors lent a home outside the ring (drafting's rows, llama_flashflex_lend_rows) leave the layout: the others
    are placed as if they were not there, and nothing shares bytes with them."""
    layout = Layout([100]).layer((0, 30), (0, 30)).layer((0, 30), (0, 30))
    (placed,) = run(driver, layout, "unplace 1 2", "place")[1:]
    homes = placed["homes"]
    assert [h["off"] for h in homes if h is not homes[1] and h is not homes[2]] == [0, 30]
    assert homes[1]["overlaps"] == [] and homes[2]["overlaps"] == []
    assert all(1 not in h["overlaps"] and 2 not in h["overlaps"] for h in homes)
    (full,) = run(driver, layout, "place")  # all placed: the fourth home wraps onto the first
    assert [h["off"] for h in full["homes"]] == [0, 30, 60, 0] and full["homes"][3]["overlaps"] == [0]
