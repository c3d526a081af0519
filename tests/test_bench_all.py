"""`flashflex bench all` (orchestrator.bench.suite): each benchmark run in turn in its own process, a summary with
machine and hour, and the page's tables regenerated between their markers, whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.bench import suite
from orchestrator.errors import FlashflexError

from conftest import flashflex, one_error

WRITE_TABLE = "import pathlib, sys; d = pathlib.Path(sys.argv[1]); (d / 't.md').write_text('| a |\\n|---|\\n| {} |\\n')"


def _bench(name: str, code: str, **kw) -> suite.Benchmark:
    return suite.Benchmark(name, f"the {name} benchmark", ("python", "-c", code, "{out}"), "t.md", 1, **kw)


def _page(tmp_path: Path, names: list[str]) -> Path:
    page = tmp_path / "docs" / "benchmarks.md"
    page.parent.mkdir()
    page.write_text("# Benchmarks\n\n" + "".join(f"## {n}\n\nprose stays\n\n<!-- bench all: {n} -->\n| old |\n"
                                                   f"<!-- /bench all: {n} -->\n\nafter\n\n" for n in names))
    return page


def test_each_benchmark_runs_in_its_own_process_and_the_page_is_regenerated(tmp_path: Path):
    plot = ("import pathlib, sys; d = pathlib.Path(sys.argv[1]); (d / 't.md').write_text('| new |\\n');"
            "(d / 'p.png').write_bytes(b'png')")
    benchmarks = [_bench("one", plot, plots=(("p.png", "one.png"),)),
                  _bench("broken", "import sys; print('it broke here'); sys.exit(3)"),
                  _bench("gpu", WRITE_TABLE, needs="vulkan-that-is-not-here")]
    page = _page(tmp_path, ["one", "broken", "gpu"])
    lines: list[str] = []
    summary = suite.run_all(benchmarks, tmp_path / "out", log=lines.append)
    status = {o["name"]: o["status"] for o in summary["benchmarks"]}
    assert status["one"] == "ok" and status["broken"] == "failed (exit 3)" and status["gpu"].startswith("skipped")
    broken = next(o for o in summary["benchmarks"] if o["name"] == "broken")
    assert broken["tail"] == ["it broke here"] and any("it broke here" in line for line in lines)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["benchmarks"] == summary["benchmarks"]
    assert summary["machine"]["cores"] and summary["started"] and summary["finished"]

    assert suite.regenerate(page, summary, benchmarks, log=lines.append) == ["one"]
    text = page.read_text()
    one = text[text.index("<!-- bench all: one -->"):text.index("<!-- /bench all: one -->")]
    assert "| new |" in one and "Measured by `flashflex bench all` on" in one and "![one](one.png)" in one
    assert "| old |" not in one and text.count("| old |") == 2  # the failed and the skipped keep their tables
    assert text.count("prose stays") == 3 and text.count("after") == 3
    assert (page.parent / "one.png").read_bytes() == b"png"


def test_a_page_without_a_benchmark_s_markers_is_left_whole(tmp_path: Path):
    benchmarks = [_bench("one", WRITE_TABLE), _bench("two", WRITE_TABLE)]
    page = _page(tmp_path, ["one"])
    before = page.read_text()
    summary = suite.run_all(benchmarks, tmp_path / "out", log=lambda _: None)
    with pytest.raises(FlashflexError, match="no markers for two"):
        suite.regenerate(page, summary, benchmarks)
    assert page.read_text() == before


def test_every_benchmark_on_the_page_has_its_markers_and_an_unknown_name_is_one_line(tmp_path: Path):
    page = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
    text = page.read_text()
    for b in suite.BENCHMARKS:
        begin, end = f"<!-- bench all: {b.name} -->", f"<!-- /bench all: {b.name} -->"
        assert text.count(begin) == 1 and text.count(end) == 1 and text.index(begin) < text.index(end), b.name
    one_error(flashflex("bench", "all", "--only", "ring-7b,nope", "--out-dir", str(tmp_path)), "nope", "--list")
    listed = json.loads(flashflex("bench", "all", "--list", "--json").stdout)
    assert [r["name"] for r in listed] == [b.name for b in suite.BENCHMARKS]
    assert all(r["command"].startswith(("flashflex bench", "python scripts/")) for r in listed)
    dry = flashflex("bench", "all", "--only", "ring-7b", "--dry-run", "--out-dir", str(tmp_path / "x"))
    assert dry.returncode == 0 and "scripts/bench_ring.py --model dense-7b-q4_0" in dry.stdout
    assert not (tmp_path / "x").exists()  # nothing ran


def test_regenerate_only_with_only_replaces_those_tables_alone(tmp_path: Path):
    """`--regenerate-only --only NAME` rewrites NAME's table from the summary and leaves the others the summary holds
    as the page has them."""
    out = tmp_path / "out"
    outcomes = []
    for name in ("ring-7b", "ring-5120"):
        (out / name).mkdir(parents=True)
        (out / name / "summary.md").write_text(f"| {name} new |\n")
        outcomes.append({"name": name, "command": f"python scripts/bench_ring.py ({name})", "status": "ok",
                         "started": "2026-12-06 07:00:00 UTC", "seconds": 60.0, "out_dir": str(out / name)})
    (out / "summary.json").write_text(json.dumps({"machine": {"cores": 2, "ram_bytes": 24 << 30, "cpu": "a CPU"},
                                                  "benchmarks": outcomes}))
    page = _page(tmp_path, ["ring-7b", "ring-5120"])
    done = flashflex("bench", "all", "--regenerate-only", "--only", "ring-7b", "--out-dir", str(out), "--docs",
                     str(page))
    assert done.returncode == 0, done.stderr
    text = page.read_text()
    assert "| ring-7b new |" in text and "| ring-5120 new |" not in text and text.count("| old |") == 1
