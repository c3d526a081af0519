"""`flashflex bench all`: every benchmark whose table is on the benchmarks page (docs/benchmarks.md), run one after
the other with the page's settings, and the page's tables and plots regenerated from their results.

Each benchmark is the command a reader of the page would run (a `flashflex bench` command or a script under
scripts/), in its own process with its own log, so one that fails leaves the others' results. Each measures stock
beside flashflex in the same run, interleaved, medians of 3, as the page promises; this module only runs them in
turn, records the machine and the hour, and replaces each table on the page between its two markers:

    <!-- bench all: NAME -->
    ...generated...
    <!-- /bench all: NAME -->

Benchmarks that compare two builds of this project's history (build times, before/after a refactor) are not here:
they measure a change, not the current code, and cannot be re-run without the old build.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from orchestrator import fsutil
from orchestrator.errors import FlashflexError
from orchestrator.paths import repo_root

Log = Callable[[str], None]


@dataclass(frozen=True)
class Benchmark:
    name: str
    what: str  # one line
    argv: tuple[str, ...]  # "flashflex", "scripts/NAME.py" or "python" first; {out} is the result directory
    table: str  # the file under {out} holding its Markdown table
    minutes: int  # about how long it takes on the reference machine (2 cores)
    plots: tuple[tuple[str, str], ...] = ()  # (file under {out}, name under docs/) copied onto the page
    needs: str | None = None  # "vulkan": runs only where the installed library has that backend


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("dense-7b", "dense streaming vs stock mmap and resident, 7B shape, budgets 1-3 GiB and full",
              ("flashflex", "bench", "dense", "--tp", "auto,0", "--out-dir", "{out}"), "results.md", 16,
              (("tok_s_vs_budget.png", "dense-7b-tok_s_vs_budget.png"),)),
    Benchmark("moe-a3b", "MoE slot banks vs stock mmap, A3B shape, 2 GiB cgroup",
              ("flashflex", "bench", "moe", "--banks", "8,16,24,32,auto", "--out-dir", "{out}"), "results.md", 6,
              (("slot_bank.png", "moe-a3b-slot_bank.png"),)),
    Benchmark("moe-64x4", "MoE slot banks vs stock mmap, 64 experts top-4 (few misses a layer), 1.5 GiB cgroup",
              ("flashflex", "bench", "moe", "-m", "synth:moe-64x4-16l-q4_0", "--budget", "1.5GiB", "--banks",
               "8,16,auto", "--out-dir", "{out}"), "results.md", 8),
    Benchmark("prefetch-a3b", "expert prefetch policies against their oracles, A3B shape",
              ("flashflex", "bench", "prefetch", "--banks", "32", "--ranks", "auto,2", "--repeats", "3",
               "--out-dir", "{out}"), "results.md", 45, (("prefetch.png", "moe-a3b-prefetch.png"),)),
    Benchmark("ring-6144", "the byte ring on wide layers (6144/16384), 1.3 GiB cgroup",
              ("scripts/bench_ring.py", "--model", "dense-wide-12l-6144-q4_0", "--budget", "1.3GiB", "--repeats",
               "3", "--out", "{out}"), "summary.md", 4),
    Benchmark("ring-5120", "the byte ring on wide layers (5120/13824), 1.2 GiB cgroup",
              ("scripts/bench_ring.py", "--model", "dense-wide-16l-q4_0", "--budget", "1.2GiB", "--repeats", "3",
               "--out", "{out}"), "summary.md", 4),
    Benchmark("ring-7b", "the byte ring on the 7B shape, 1.8 GiB cgroup",
              ("scripts/bench_ring.py", "--model", "dense-7b-q4_0", "--budget", "1.8GiB", "--repeats", "3",
               "--out", "{out}"), "summary.md", 4),
    Benchmark("speculative-gemma", "prompt-lookup drafting vs none, Gemma 3 270M under 215 MiB, real text tasks",
              ("flashflex", "bench", "speculative", "--budget", "215MiB", "--tasks",
               "rewrite,edit-function,free-chat,extract,story-sampled,letter-sampled", "--repeats", "3", "--out-dir",
               "{out}"),
              "results.md", 4),
    Benchmark("serve-batching", "llama-server under the plan vs stock llama-server, 1/4/8 clients, 7B shape",
              ("scripts/bench_serve_batching.py", "--clients", "1,4,8", "--reps", "3", "--tokens", "16", "--out",
               "{out}"), "summary.md", 25, (("serve-batching.png", "serve-batching.png"),)),
    Benchmark("serve-batching-moe", "llama-server under the plan vs stock llama-server, 1/4/8 clients, A3B-shape MoE",
              ("scripts/bench_serve_batching.py", "--preset", "moe-a3b-12l-q4_0", "--clients", "1,4,8", "--reps", "3",
               "--tokens", "16", "--out", "{out}"), "summary.md", 10,
              (("serve-batching.png", "serve-batching-moe.png"),)),
    Benchmark("serve-drafting", "serve's drafting (flashflex's lookup, each slot's length from the runtime) and "
              "upstream's lookup vs none inside llama-server's 4 slots at 1, 2 and 4 clients, SmolLM2 read from disk "
              "under 110 MiB",
              ("scripts/bench_serve_drafting.py", "--budget", "110MiB", "--reps", "3", "--modes", "draft,none,upstream",
               "--out", "{out}"), "summary.md", 8),
    Benchmark("serve-drafting-sampled", "serve's drafting where drafts fail (two sampled texts) and on free text, "
              "each alone, SmolLM2 read from disk under 110 MiB",
              ("scripts/bench_serve_drafting.py", "--budget", "110MiB", "--reps", "5", "--tasks",
               "story-sampled,letter-sampled,free-chat", "--clients", "1", "--modes", "draft,none", "--out", "{out}"),
              "summary.md", 6),
    Benchmark("serve-checkpoints", "llama-server's sliding-window cache and context checkpoints as planned, "
              "window-sized without checkpoints, and upstream's: Gemma 3 270M under 280 MiB, 4 three-turn chats",
              ("scripts/bench_serve_checkpoints.py", "--budget", "280MiB", "--ctx", "1024", "--clients", "4",
               "--reps", "3", "--facts", "6", "--overhead-mib", "2048", "--out", "{out}"), "summary.md", 2),
    Benchmark("serve-checkpoints-cgroup", "the same with a first message past Gemma's window, in the plan's cgroup",
              ("scripts/bench_serve_checkpoints.py", "--budget", "280MiB", "--ctx", "1024", "--clients", "4",
               "--reps", "3", "--facts", "40", "--out", "{out}"), "summary.md", 2),
    Benchmark("checksum", "checking every expert read against its checksum, on and off",
              ("scripts/bench_checksum.py", "--slots", "32", "--pairs", "3", "--out", "{out}"), "summary.md", 2),
    Benchmark("rpc-dense", "two memory cgroups over RPC on loopback, dense",
              ("scripts/bench_rpc.py", "--model", "dense-wide-16l-q4_0", "--cgroup", "1.5GiB", "--repeats", "3",
               "--out", "{out}"), "summary.md", 4),
    Benchmark("hybrid-vulkan", "dense layers on the GPU, experts in host banks (Vulkan build only)",
              ("scripts/bench_hybrid.py", "--out", "{out}"), "bench.md", 30, needs="vulkan"),
)


def by_name(names: list[str] | None, benchmarks: tuple[Benchmark, ...] = BENCHMARKS) -> list[Benchmark]:
    """The benchmarks named (all when None), in the page's order; an unknown name is one line naming the known."""
    if not names:
        return list(benchmarks)
    known = {b.name: b for b in benchmarks}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise FlashflexError(f"no benchmark named {', '.join(unknown)}",
                             f"choose from {', '.join(known)} (flashflex bench all --list)")
    return [b for b in benchmarks if b.name in names]


def command(b: Benchmark, out: Path) -> list[str]:
    """The benchmark's command line, run by this Python (the flashflex CLI as `python -m orchestrator`)."""
    argv = [a.replace("{out}", str(out)) for a in b.argv]
    if argv[0] == "flashflex":
        return [sys.executable, "-m", "orchestrator", *argv[1:]]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    return [sys.executable, str(repo_root() / argv[0]), *argv[1:]]


def shown(b: Benchmark, out: Path) -> str:
    """The command as the page shows it (relative paths, `flashflex`, `python`)."""
    argv = [a.replace("{out}", str(out)) for a in b.argv]
    return " ".join(["python", *argv] if argv[0].startswith("scripts/") else argv)


@dataclass
class Outcome:
    name: str
    command: str
    status: str  # ok | failed (exit N) | skipped (why)
    started: str = ""
    seconds: float = 0.0
    out_dir: str = ""
    log: str = ""
    tail: list[str] = field(default_factory=list)  # the log's last lines, when it failed


def _backends() -> set[str]:
    """The installed library's backends, lower case (cpu, vulkan, cuda, rpc, ...); none without a patched one."""
    try:
        from orchestrator import native

        return {str(b).lower() for b in native.info().get("backends", [])}
    except Exception:  # no patched library: the benchmarks say so themselves
        return set()


def run_one(b: Benchmark, out_root: Path, backends: set[str]) -> Outcome:
    out = out_root / b.name
    outcome = Outcome(name=b.name, command=shown(b, out), status="ok", out_dir=str(out))
    if b.needs is not None and b.needs not in backends:
        has = ", ".join(sorted(backends)) or "no patched library"
        outcome.status = f"skipped (needs a {b.needs} build; this one has {has}: flashflex build --backend {b.needs})"
        return outcome
    out.mkdir(parents=True, exist_ok=True)
    logfile = out / "log.txt"
    outcome.log, outcome.started = str(logfile), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.monotonic()
    with open(logfile, "w") as fh:
        rc = subprocess.call(command(b, out), stdout=fh, stderr=subprocess.STDOUT, cwd=repo_root())
    outcome.seconds = round(time.monotonic() - t0, 1)
    if rc != 0:
        outcome.status = f"failed (exit {rc})"
        outcome.tail = logfile.read_text(errors="replace").splitlines()[-5:]
    elif not (out / b.table).is_file():
        outcome.status = f"failed (it wrote no {b.table})"
    return outcome


def run_all(benchmarks: list[Benchmark], out_root: Path, log: Log = print) -> dict[str, Any]:
    """Run each benchmark in turn; write summary.json beside their result directories; return it."""
    from orchestrator.bench.runs import machine_info

    out_root.mkdir(parents=True, exist_ok=True)
    backends = _backends()
    summary: dict[str, Any] = {"bench": "all", "machine": machine_info(), "backends": sorted(backends),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "benchmarks": []}
    total = sum(b.minutes for b in benchmarks)
    for i, b in enumerate(benchmarks, 1):
        log(f"[{i}/{len(benchmarks)}] {b.name}: {b.what} (about {b.minutes} min; {total} min left in all)")
        outcome = run_one(b, out_root, backends)
        total -= b.minutes
        log(f"  {outcome.status}" + (f" in {outcome.seconds / 60:.1f} min" if outcome.seconds else "")
            + (f"; log {outcome.log}" if outcome.status != "ok" and outcome.log else ""))
        for line in outcome.tail:
            log(f"    {line}")
        summary["benchmarks"].append(asdict(outcome))
        _write_json(out_root / "summary.json", summary)  # after each: an interrupted run keeps what finished
    summary["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    _write_json(out_root / "summary.json", summary)
    return summary


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    with fsutil.atomic_file(path, "w") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench all: {name} -->", f"<!-- /bench all: {name} -->"


def block(b: Benchmark, outcome: dict[str, Any], machine: dict[str, Any]) -> str:
    """What goes between a benchmark's markers: the measurement's provenance, its table, its plots."""
    out = Path(outcome["out_dir"])
    cores, ram = machine.get("cores"), machine.get("ram_bytes") or 0
    lines = [f"Measured by `flashflex bench all` on {outcome['started']}: {machine.get('cpu')}, {cores} cores, "
             f"{ram / 2**30:.0f} GiB ({outcome['seconds'] / 60:.1f} min). Command: `{outcome['command']}`.", "",
             (out / b.table).read_text().strip(), ""]
    for src, dest in b.plots:
        if (out / src).is_file():
            lines += [f"![{b.name}]({dest})", ""]
    return "\n".join(lines)


def regenerate(page: Path, summary: dict[str, Any], benchmarks: list[Benchmark] | None = None,
               log: Log = print) -> list[str]:
    """Replace, on the page, the block of every benchmark that succeeded in `summary` (plots copied beside the
    page); the page is written whole or not at all. Returns the names replaced. A succeeded benchmark without its
    markers on the page is one line saying where to add them, before anything is written."""
    known = {b.name: b for b in (benchmarks or BENCHMARKS)}
    text = page.read_text()
    done = [o for o in summary["benchmarks"] if o["status"] == "ok" and o["name"] in known]
    missing = [o["name"] for o in done if _markers(o["name"])[0] not in text or _markers(o["name"])[1] not in text]
    if missing:
        raise FlashflexError(f"{page} has no markers for {', '.join(missing)}",
                             "add `<!-- bench all: NAME -->` and `<!-- /bench all: NAME -->` where each table goes "
                             "(the results are kept; rerun with --regenerate-only)")
    copies: list[tuple[Path, Path]] = []
    for o in done:
        b = known[o["name"]]
        begin, end = _markers(b.name)
        body = block(b, o, summary["machine"])
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        text = pattern.sub(lambda _m: f"{begin}\n{body}\n{end}", text, count=1)
        copies += [(Path(o["out_dir"]) / src, page.parent / dest) for src, dest in b.plots
                   if (Path(o["out_dir"]) / src).is_file()]
    with fsutil.atomic_file(page, "w") as fh:
        fh.write(text)
    for src, dest in copies:
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(dest)
    for o in done:
        log(f"{page}: {o['name']} regenerated")
    return [o["name"] for o in done]
