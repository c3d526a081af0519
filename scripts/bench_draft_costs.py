"""Drafting against two settings that change what it costs, each arm with and without prompt-lookup drafting, on
Gemma 3 270M under one budget. `--compare layout` (the default): the streamed weights in the file's layout (read
straight into their homes) against `prefetch.repack: true` (staged, then repacked by the reading thread). `--compare
lending`: the verification rows' memory lent to streamed weights between verifications (the default) against
`draft.lend_rows: false` (kept for the rows the whole run). Every configuration runs --repeats times, interleaved
(the order turned every repetition), in this process through `run`'s own path (orchestrator.run.execution.run); the
table gives medians of decode tok/s, drafted over undrafted, and what a two-token verification cost in single steps
as the drafting controller measured it.

    python scripts/bench_draft_costs.py --tasks story-sampled,rewrite --repeats 3 --out bench-results/draft-layout.json
    python scripts/bench_draft_costs.py --compare lending --tasks story-sampled,letter-sampled --repeats 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ARMS: dict[str, dict[str, dict[str, object]]] = {
    "layout": {"file": {}, "repacked": {"prefetch.repack": True}},
    "lending": {"lent": {}, "reserved": {"draft.lend_rows": False}},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=sorted(ARMS), default="layout")
    parser.add_argument("--tasks", default="story-sampled,rewrite", help="tasks of `flashflex bench speculative`")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", default="215MiB")
    parser.add_argument("--draft-max", type=int, default=None, help="the drafted arms' length cap (the plan's)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/draft-costs.json"))
    args = parser.parse_args(argv)

    from orchestrator import api
    from orchestrator.bench import speculative as sb
    from orchestrator.config import load_run_config
    from orchestrator.fsutil import atomic_file
    from orchestrator.run import execution
    from orchestrator.sizes import parse_size

    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in sb.TASKS]
    if unknown:
        parser.error(f"unknown task {', '.join(unknown)} (use some of {', '.join(sb.TASKS)})")
    bench = sb.SpeculativeBench(model=sb.default_model(print), draft_max=args.draft_max)
    budget = parse_size(args.budget, what="--budget")
    prepared = {}
    arms = ARMS[args.compare]
    for arm, overrides in arms.items():
        for mode in ("none", "draft"):
            for task in tasks:
                prepared[(arm, mode, task)] = api.prepare(
                    load_run_config(None, overrides), budget_bytes=budget, prompt=sb.TASKS[task][1],
                    own_decodes=True, **sb._options(bench, mode == "draft", task))
    rows = []
    order = list(prepared)
    for rep in range(args.repeats):
        for key in order if rep % 2 == 0 else order[::-1]:
            result = execution.run(prepared[key])
            ratios = ((result.stats.get("draft") or {}).get("length") or {}).get("cost_ratios") or {}
            rows.append({"arm": key[0], "mode": key[1], "task": key[2], "repeat": rep,
                         "decode_tok_per_s": result.decode_tok_per_s, "r2": ratios.get(2, ratios.get("2"))})
            print(json.dumps(rows[-1]), flush=True)
    with atomic_file(args.out, "w") as fh:
        fh.write(json.dumps(rows, indent=1))

    def median(task: str, arm: str, mode: str, key: str = "decode_tok_per_s") -> float | None:
        values = [r[key] for r in rows if (r["task"], r["arm"], r["mode"]) == (task, arm, mode) and r[key]]
        return statistics.median(values) if values else None

    print(f"| task | {args.compare} | no draft tok/s | draft tok/s | x | 2-token verification / step |")
    print("|---|---|---:|---:|---:|---:|")
    for task in tasks:
        for arm in arms:
            plain, drafted = median(task, arm, "none"), median(task, arm, "draft")
            r2 = median(task, arm, "draft", "r2")
            assert plain and drafted
            cost = f"{r2:.2f}" if r2 else ""
            print(f"| {task} | {arm} | {plain:.2f} | {drafted:.2f} | {drafted / plain:.2f}x | {cost} |")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
