"""`make demo`'s main job: the default model stock, then under a RAM budget well below what it needs resident.

Every run uses the same prompt, context and micro-batch, through the `flashflex run --json` command a user
would type. The budgeted run keeps the tied 170 MiB embedding/output resident (the planner's floor) and streams
most of the 18 layers' weights from the GGUF on every token. As a user runs it, it drafts by prompt lookup (the
default where weights stream): verifications compute several tokens in one batch, whose rounding differs from a
single step's, so where two logits nearly tie its greedy text may differ from stock's, and which steps verify
depends on measured timings. The exactness check is therefore the same budget without drafting: greedy decoding
must give stock's tokens. Exit 1 when they differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from orchestrator.modes import DENSE_STREAM

PROMPT = "The capital of France is"
SHARED = ["--prompt", PROMPT, "-n", "32", "--ctx", "128", "--ubatch", "8"]
BUDGET = "200MiB"


def run(*extra: str) -> dict:
    cmd = [sys.executable, "-m", "orchestrator", "run", *SHARED, *extra, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        sys.exit(proc.returncode)
    return json.loads(proc.stdout)


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> int:
    print(f"stock: flashflex run {' '.join(SHARED[2:])} --prompt {PROMPT!r}")
    stock = run()
    print(f"  {PROMPT}{stock['text']}")
    print(f"  mode {stock['stats']['mode']} · decode {stock['decode_tok_per_s']:.1f} tok/s · "
          f"peak RSS {mib(stock['peak_rss_bytes'])}")
    print(f"\nunder a budget: the same run with --budget {BUDGET}")
    flex = run("--budget", BUDGET)
    s = flex["stats"]
    if s["mode"] != DENSE_STREAM:
        print(f"error: expected the budget to stream weights, but the run was {s['mode']}", file=sys.stderr)
        return 1
    decode = s["decode"]
    print(f"  {PROMPT}{flex['text']}")
    size = os.path.getsize(flex["model"])
    print(f"  mode {s['mode']} · budget {mib(s['budget_bytes'])} · weights resident {mib(s['resident_bytes'])} · "
          f"streamed {mib(decode['bytes_read_per_token'])} per token ({decode['bytes_read_per_token'] / size:.0%} of "
          f"the {mib(size)} model) · waited {decode['wait_seconds']:.2f}s on reads")
    draft = s.get("draft")
    drafting = (f" · drafted {draft['drafted_tokens']} tokens, kept {draft['accepted_tokens']}" if draft else "")
    print(f"  decode {flex['decode_tok_per_s']:.1f} tok/s ({flex['decode_tok_per_s'] / stock['decode_tok_per_s']:.2f}× "
          f"stock) · peak RSS of the whole process {mib(flex['peak_rss_bytes'])}{drafting}")
    if draft and flex["tokens"] != stock["tokens"]:
        print("  (other tokens than stock: a verification batch rounds differently from a single step where two "
              "logits nearly tie)")

    print("\nexactness: the same budget without drafting (--draft none) must give stock's tokens")
    exact = run("--budget", BUDGET, "--draft", "none")
    same = exact["tokens"] == stock["tokens"]
    print(f"  tokens equal to the stock run's: {'yes' if same else 'NO'} ({len(exact['tokens'])} tokens)")
    if not same:
        print("error: the budgeted run generated other tokens than stock — run flashflex verify-exact "
              f"--budget {BUDGET} to compare logits", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
