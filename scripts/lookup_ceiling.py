#!/usr/bin/env python3
"""How fast prompt lookup could make a task at best: the greedy answer's passes under an oracle lookup.

Drafting's speedup on a task is bounded by its text, not by the drafter: a pass that verifies a draft yields the
tokens kept plus one, so an answer of T tokens that kept K drafted tokens took T - K passes, and decode is at most
T / (T - K) times faster (when a verification costs what a plain pass does). This script generates each task's
greedy answer without drafting (ignoring EOS, as the serve benchmarks do) and replays it against lookups:

- oracle: at every pass the longest start of the rest of the answer found anywhere in the text so far (the most
  any drafter copying from its context could keep, with drafts of at most --draft-max tokens);
- flashflex: the runtime's own lookup (`llama_flashflex_prompt_lookup`, what `run`, `chat` and llama-server draft
  with under a plan): the latest occurrence of the last 3 tokens, past a changed token, then shorter keys.

    python scripts/lookup_ceiling.py --tasks rewrite,edit-function,extract,free-chat
    python scripts/lookup_ceiling.py --model path/to/model.gguf --json ceiling.json

The answers differ a little from a drafted server's (a drafted batch rounds differently, which can flip a near-tie),
so read the ceilings as the text's, measured beside the benchmark, not as a bound on one run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.bench.speculative import TASKS  # noqa: E402
from orchestrator.modelfile.locate import default_chat_model_path  # noqa: E402


def oracle_draft(seq: list[int], future: list[int], draft_max: int) -> int:
    """The longest start of `future` (at most draft_max tokens) found anywhere in `seq`: what the best possible
    copy from the context drafts, whatever its key."""
    best = 0
    for j in range(len(seq)):
        run = 0
        while run < min(draft_max, len(future)) and j + run < len(seq) and seq[j + run] == future[run]:
            run += 1
        best = max(best, run)
    return best


def flashflex_draft(seq: list[int], future: list[int], draft_max: int) -> int:
    """Tokens of `future` the runtime's own lookup drafts right."""
    from orchestrator.speculative import lookup

    draft = lookup(np.asarray(seq, dtype=np.int32), 3, draft_max)
    run = 0
    while run < min(len(draft), len(future)) and int(draft[run]) == future[run]:
        run += 1
    return run


def replay(context: list[int], answer: list[int], drafted: Callable[[list[int], list[int]], int]) -> tuple[int, int]:
    """(passes, tokens kept from drafts) for `answer` after `context`, `drafted(seq, future)` being the tokens of
    the future a pass's draft gets right."""
    seq, i, passes, kept = list(context), 0, 0, 0
    while i < len(answer):
        best = drafted(seq, answer[i:])
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
        rules: dict[str, Callable[[list[int], list[int]], int]] = {
            "oracle": lambda seq, fut: oracle_draft(seq, fut, args.draft_max),
            "flashflex": lambda seq, fut: flashflex_draft(seq, fut, args.draft_max),
        }
        for name, rule in rules.items():
            passes, kept = replay(context, answer, rule)
            row[name] = {"passes": passes, "kept": kept, "ceiling": len(answer) / passes}
        results.append(row)
        print(f"{task:14s} {len(answer)} tokens; ceiling x plain decode: oracle {row['oracle']['ceiling']:.2f} "
              f"(kept {row['oracle']['kept']}), "
              f"flashflex's lookup {row['flashflex']['ceiling']:.2f} (kept {row['flashflex']['kept']})")
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps({"model": str(model), "draft_max": args.draft_max, "tasks": results}, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
