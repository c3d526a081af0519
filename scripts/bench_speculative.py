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

Synthetic models (`synth:PRESET`, orchestrator.synth: generated once into the cache; a MoE preset's sidecar is
extracted once beside it) measure the mechanics: random weights draft what the target rarely picks, so give fixed
draft lengths (--no-draft-adaptive) to see what a verification batch of --draft-max + 1 tokens costs — dense bytes
per generated token and, on a MoE model run from expert banks, the experts a batch resolves (the union of its
tokens') against top-k for a single-token step, and the bytes of expert misses per generated token:

    python scripts/bench_speculative.py --model synth:moe-a3b-12l-q4_0 --draft-model synth:draft-for-a3b \
        --no-draft-adaptive --draft-max 7 --budget 2.1GiB --ctx 256 --tasks free-chat -n 64 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestrator.bench import speculative as spec_bench
from orchestrator.errors import FlashflexError


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF or synth:PRESET (default: Gemma 3 270M realigned to 4096)")
    ap.add_argument("--draft", default="prompt-lookup", help="prompt-lookup[:N] (ignored with --draft-model)")
    ap.add_argument("--draft-model", default=None, help="a small GGUF (or synth:PRESET) with the same vocabulary")
    ap.add_argument("--draft-max", type=int, default=None, help="most tokens drafted per verification")
    ap.add_argument("--no-draft-adaptive", dest="draft_adaptive", action="store_false", default=None,
                    help="always draft --draft-max tokens (the adaptive length falls to 0 where drafts fail)")
    ap.add_argument("--moe-mode", default=None, help="MoE mode (default auto: slot banks when the model does not fit)")
    ap.add_argument("--moe-slot-bank", type=int, default=None, help="expert slots per MoE layer (default: planned)")
    ap.add_argument("--budget", default="min", help="total budget; min = the smallest the planner accepts")
    ap.add_argument("--tasks", default=",".join(spec_bench.TASKS), help="comma-separated tasks")
    ap.add_argument("-n", "--n-predict", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", "-t", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--ubatch", type=int, default=8)
    ap.add_argument("--prefetch-threads", "-tp", default="auto", help="prefetch I/O threads (-tp), or auto")
    ap.add_argument("--out", type=Path, default=Path("bench-results/speculative"))
    args = ap.parse_args()
    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    try:
        bench = spec_bench.SpeculativeBench(
            model=spec_bench.resolve_model(args.model, log) if args.model else spec_bench.default_model(log),
            draft=args.draft,
            draft_model=spec_bench.resolve_model(args.draft_model, log) if args.draft_model else None,
            draft_max=args.draft_max, draft_adaptive=args.draft_adaptive, budget=args.budget,
            tasks=[t for t in args.tasks.split(",") if t], n_predict=args.n_predict, repeats=args.repeats,
            threads=args.threads, ctx=args.ctx, ubatch=args.ubatch,
            prefetch_threads=args.prefetch_threads if args.prefetch_threads == "auto" else int(args.prefetch_threads),
            moe_mode=args.moe_mode, moe_slot_bank=args.moe_slot_bank)
        results = spec_bench.run(bench, args.out, log=log)
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
