#!/usr/bin/env python3
"""How fast prompt lookup could make a task at best: the greedy answer's passes under an oracle lookup.

Drafting's speedup on a task is bounded by its text, not by the drafter: a pass that verifies a draft yields the
tokens kept plus one, so an answer of T tokens that kept K drafted tokens took T - K passes, and decode is at most
T / (T - K) times faster (when a verification costs what a plain pass does). This script generates each task's
greedy answer without drafting (ignoring EOS, as the serve benchmarks do) and replays it against lookups:

- oracle: at every pass the best continuation any earlier occurrence of the last 3, 2 or 1 tokens gives (the most
  any n-gram lookup could keep, with drafts of at most --draft-max tokens);
- oracle n>=2: the same without single-token keys;
- latest n>=2: the latest occurrence of the longest matching key (3, then 2), as a plain lookup drafts.

    python scripts/lookup_ceiling.py --tasks rewrite,edit-function,extract,free-chat
    python scripts/lookup_ceiling.py --model path/to/model.gguf --json ceiling.json

The answers differ a little from a drafted server's (a drafted batch rounds differently, which can flip a near-tie),
so read the ceilings as the text's, measured beside the benchmark, not as a bound on one run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.bench.speculative import TASKS  # noqa: E402
from orchestrator.modelfile.locate import default_chat_model_path  # noqa: E402


def replay(context: list[int], answer: list[int], min_key: int, draft_max: int, oracle: bool) -> tuple[int, int]:
    """(passes, tokens kept from drafts) for `answer` after `context` under one lookup rule."""
    seq, i, passes, kept = list(context), 0, 0, 0
    while i < len(answer):
        best = 0
        for n in range(3, min_key - 1, -1):
            if len(seq) < n:
                continue
            key = seq[-n:]
            starts = [j for j in range(len(seq) - n) if seq[j:j + n] == key]
            for j in starts if oracle else starts[-1:]:
                run = 0
                while (run < draft_max and j + n + run < len(seq) and i + run < len(answer)
                       and seq[j + n + run] == answer[i + run]):
                    run += 1
                best = max(best, run)
            if best or (starts and not oracle):
                break
        seq += answer[i:i + best + 1]
        i += best + 1
        passes += 1
        kept += best
    return passes, kept


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: serve's default chat model)")
    ap.add_argument("--tasks", default="rewrite,edit-function,extract,free-chat",
                    help=f"comma-separated, of: {', '.join(TASKS)}")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--draft-max", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = ap.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        print(f"error: unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}", file=sys.stderr)
        return 2
    model = args.model or default_chat_model_path()
    if not Path(model).is_file():
        print(f"error: no model file at {model}; pass --model PATH", file=sys.stderr)
        return 2

    from llama_cpp import Llama  # the build's library; imported late so --help works without it

    llm = Llama(str(model), n_ctx=2048, verbose=False)
    results = []
    for task in tasks:
        context = llm.tokenize(TASKS[task][1].encode())
        llm.reset()
        answer: list[int] = []
        for token in llm.generate(context, top_k=1, temp=0):
            answer.append(token)
            if len(answer) == args.tokens:
                break
        row = {"task": task, "tokens": len(answer)}
        for name, min_key, oracle in (("oracle", 1, True), ("oracle_n2", 2, True), ("latest_n2", 2, False)):
            passes, kept = replay(context, answer, min_key, args.draft_max, oracle)
            row[name] = {"passes": passes, "kept": kept, "ceiling": len(answer) / passes}
        results.append(row)
        print(f"{task:14s} {len(answer)} tokens; ceiling x plain decode: oracle {row['oracle']['ceiling']:.2f} "
              f"(kept {row['oracle']['kept']}), oracle n>=2 {row['oracle_n2']['ceiling']:.2f}, "
              f"latest n>=2 {row['latest_n2']['ceiling']:.2f}")
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps({"model": str(model), "draft_max": args.draft_max, "tasks": results}, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
