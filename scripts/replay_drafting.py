"""The drafting controller replayed over the texts of recorded `bench speculative` results, with a cost model instead
of the machine (orchestrator.bench.replay): per task, the median speed over plain decoding it would reach, and how
much it would draft. Deterministic, so a change to the controller can be compared on the same texts and costs.

    python scripts/replay_drafting.py docs/spec-gemma-215/*.json
    python scripts/replay_drafting.py docs/spec-gemma-215/*.json --entry 0 --after 0   # no lent-memory costs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="bench speculative results.json files")
    parser.add_argument("--max-tokens", type=int, default=7, help="the longest draft (the plan's at 215 MiB: 7)")
    parser.add_argument("--ngram", type=int, default=3)
    parser.add_argument("--verify", type=float, default=None, help="a second token's cost beyond a plain step")
    parser.add_argument("--per-token", type=float, default=None, help="each token after the second")
    parser.add_argument("--entry", type=float, default=None, help="a verification after a plain step, more")
    parser.add_argument("--after", default=None, help="the plain steps after a verification, more (comma list)")
    parser.add_argument("--texts", type=int, default=40, help="texts per task at most")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from orchestrator.bench import speculative as sb
    from orchestrator.bench.replay import Costs, replay, summary
    from orchestrator.run import loader
    from orchestrator.run.settings import GenerationSettings
    from orchestrator.speculative import DraftLength, PromptLookupDrafter

    costs = Costs()
    for name in ("verify", "per_token", "entry"):
        if getattr(args, name) is not None:
            setattr(costs, name, getattr(args, name))
    if args.after is not None:
        costs.after = tuple(float(x) for x in args.after.split(",") if x)

    texts: dict[str, dict[tuple[int, ...], str]] = {}  # task -> output tokens -> the model that made them
    for path in args.results:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"{path}: not a results file ({exc})")
        if not isinstance(data, dict) or "runs" not in data:
            continue
        for run in data["runs"]:
            if run.get("token_ids") and run.get("task") in sb.TASKS:
                texts.setdefault(run["task"], {})[tuple(run["token_ids"])] = data.get("model") or ""
    if not texts:
        parser.error("no runs with token ids in those files")
    prompts: dict[tuple[str, str], list[int]] = {}
    out = {}
    for task, outputs in texts.items():
        replays = []
        for tokens, model in list(outputs.items())[:args.texts]:
            if (task, model) not in prompts:
                llm = loader.open_model(GenerationSettings(model=Path(model), ctx=64), None, vocab_only=True)
                prompts[(task, model)] = llm.tokenize(sb.TASKS[task][1].encode(), add_bos=True, special=False)
                llm.close()
            prompt = prompts[(task, model)]
            drafter = PromptLookupDrafter(DraftLength(args.max_tokens), ngram=args.ngram)
            replays.append(replay(drafter, prompt + list(tokens), len(prompt), costs))
        out[task] = summary(replays)
    if args.json:
        print(json.dumps({"costs": vars(costs), "tasks": out}, indent=1))
        return 0
    print(f"costs (plain steps): {vars(costs)}")
    print("| task | texts | speed / plain, median | lowest | drafts a text | drafted tokens a text |")
    print("|---|---:|---:|---:|---:|---:|")
    for task, s in out.items():
        print(f"| {task} | {s['texts']} | {s['speedup_median']:.3f}x | {s['speedup_min']:.3f}x | "
              f"{s['drafts_per_text']:g} | {s['drafted_tokens_per_text']:g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
