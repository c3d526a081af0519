"""Speculative decoding under a budget on the real Gemma 3 270M: drafting vs none, same run, same total budget.

Four written-down tasks (orchestrator/bench/speculative.py: rewrite a paragraph, edit a function, answer from a long
quoted document, free chat), each generated greedily with and without drafting, --repeats times, interleaved; the
table gives medians of decode tok/s (and the ratio), the share of drafted tokens kept, accepted drafted tokens per
verification, generated tokens per verification and MiB read per generated token (the runtime's stream counters).

The default budget is the smallest the planner accepts with drafting (the model's minimum plus drafting's RAM);
the default model is Gemma realigned to 4096 bytes, so its streamed tensors are read with O_DIRECT (from disk, not
the page cache). Gemma ties its output matrix to its 170 MiB token embedding, which stays resident, so even the
smallest budget streams only about a quarter of its 241 MiB of weights per token.

    python scripts/bench_speculative.py                       # prompt lookup, all tasks, 3 runs each
    python scripts/bench_speculative.py --draft prompt-lookup:2 --repeats 5 --out bench-results/speculative
    python scripts/bench_speculative.py --draft-model SMALL.gguf --model MODEL.gguf --budget 2GiB
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestrator.bench import speculative as spec_bench
from orchestrator.errors import FlashflexError


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: Gemma 3 270M realigned to 4096)")
    ap.add_argument("--draft", default="prompt-lookup", help="prompt-lookup[:N] (ignored with --draft-model)")
    ap.add_argument("--draft-model", type=Path, default=None, help="a small GGUF with the same vocabulary")
    ap.add_argument("--draft-max", type=int, default=None, help="most tokens drafted per verification")
    ap.add_argument("--budget", default="min", help="total budget; min = the smallest the planner accepts")
    ap.add_argument("--tasks", default=",".join(spec_bench.TASKS), help="comma-separated tasks")
    ap.add_argument("-n", "--n-predict", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", "-t", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--ubatch", type=int, default=8)
    ap.add_argument("--prefetch-threads", "-tp", type=int, default=1, help="prefetch I/O threads (-tp)")
    ap.add_argument("--out", type=Path, default=Path("bench-results/speculative"))
    args = ap.parse_args()
    try:
        bench = spec_bench.SpeculativeBench(
            model=args.model or spec_bench.default_model(), draft=args.draft, draft_model=args.draft_model,
            draft_max=args.draft_max, budget=args.budget, tasks=[t for t in args.tasks.split(",") if t],
            n_predict=args.n_predict, repeats=args.repeats, threads=args.threads, ctx=args.ctx, ubatch=args.ubatch,
            prefetch_threads=args.prefetch_threads)
        results = spec_bench.run(bench, args.out, log=lambda msg: print(msg, file=sys.stderr))
    except FlashflexError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 1
    for mode, plan in results["plans"].items():
        print(f"{mode}: budget {results['budget_bytes'] / 2**20:.1f} MiB, model's share "
              f"{plan['budget_bytes'] / 2**20:.1f} MiB, resident weights {plan['resident_bytes'] / 2**20:.1f} MiB, "
              f"streamed {plan['streamed_bytes_per_token'] / 2**20:.1f} MiB/token "
              f"({plan['streamed_fraction']:.0%} of weights)")
    print(spec_bench.markdown(results))
    print(f"results: {args.out}/results.json, results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
