#!/usr/bin/env python3
"""What llama-server's sliding-window cache and context checkpoints cost a model served under a budget.

For a model whose memory cannot be rolled back (sliding-window attention such as Gemma 3's, recurrent layers)
upstream's server keeps the window-sized cache and copies its state per slot to roll back (up to 32 checkpoints a
slot, memory outside any plan) and, to make them, splits every prompt at the user's turn and at ubatch + 4 and 4
tokens before its end: each split is one more pass over the streamed weights. `flashflex serve` runs llama-server
with the full-size cache the plan measured (`--swa-full`) and `--ctx-checkpoints 0` (orchestrator/tools.py). Arms,
from the same planned command line, interleaved (the order alternating): as planned; the window-sized cache without
checkpoints (`--swa-full` dropped); upstream's cache and checkpoints (`--swa-full` dropped, `-ctxcp 32`; the prompt
cache stays off in all). Each runs in a memory cgroup of the budget plus the process's own overhead, the page cache
dropped first. N clients at once each hold a three-turn conversation (a first message of --facts facts: 40 are ~690
tokens, past Gemma's 512-token window; 6 are ~140), then two short follow-ups). Reported per arm, medians over
repetitions: TTFT per turn, prompt tokens read from the slot's cache in the follow-ups, llama_decode calls
(llama-server's /metrics), the server's peak resident memory, the cgroup's peak (page cache included) and whether it
was OOM-killed. Drafting is off (its passes would blur the count of prompt passes). --overhead-mib widens the cgroup,
so that every arm lives to be measured.

    python scripts/bench_serve_checkpoints.py --budget 280MiB --ctx 1024 --clients 4 --reps 3 \\
        --out bench-results/serve-checkpoints
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from orchestrator.bench.isolation import MemoryCgroup, cgroup_version, drop_page_cache
from orchestrator.bench.servers import free_port, stop, wait_health
from orchestrator.sizes import parse_size

PROCESS_OVERHEAD = 256 << 20  # llama-server's own heap, HTTP threads and libraries beside the plan's budget


def _window_cache(argv: list[str]) -> list[str]:
    return [a for a in argv if a != "--swa-full"]


def _upstream(argv: list[str]) -> list[str]:
    argv = _window_cache(argv)
    i = argv.index("-ctxcp")
    return [*argv[:i + 1], "32", *argv[i + 2:]]


ARMS = {"planned (full cache, -ctxcp 0)": lambda argv: argv, "window cache, -ctxcp 0": _window_cache,
        "upstream (window cache, -ctxcp 32)": _upstream}
FRUIT = ["apple", "banana", "cherry", "date", "elderberry", "fig", "grape", "kiwi", "lemon", "mango", "nectarine"]


def conversation(client: int, facts: int) -> list[str]:
    """Three user turns, the first `facts` facts long (40: ~690 tokens, past a 512-token window), different per
    client."""
    text = " ".join(f"Box {i} of shelf {client} is {['red', 'blue', 'green', 'gold'][(i + client) % 4]} and holds "
                     f"{(i * 7 + client) % 13} {FRUIT[(i + client) % len(FRUIT)]}s." for i in range(facts))
    return [text + "\nWhich box holds the most fruit? Answer in one sentence.",
            "And which holds the fewest?", "Name the colour of box 3."]


def decode_calls(base: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        line = next(x for x in r.read().decode().splitlines() if x.startswith("llamacpp:n_decode_total"))
    return float(line.split()[-1])


def rss_peak(pid: int) -> int:
    """The process's peak resident memory (VmHWM): with the weights loaded by reads (-lm none), its heap, the KV cache
    and any checkpoints; not the page cache, which the cgroup's peak also counts."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise RuntimeError("no VmHWM")


def chat(base: str, client: int, tokens: int, facts: int, out: dict) -> None:
    try:
        out[client] = conversation_turns(base, client, tokens, facts)
    except Exception as exc:  # an HTTP error, a connection cut: counted, not raised in the thread
        out[client] = {"error": f"{type(exc).__name__}: {exc}"}


def conversation_turns(base: str, client: int, tokens: int, facts: int) -> list[dict]:
    from openai import OpenAI

    api = OpenAI(base_url=base + "/v1", api_key="unused", timeout=900, max_retries=0)
    messages: list[dict] = []
    turns = []
    for text in conversation(client, facts):
        messages.append({"role": "user", "content": text})
        sent, first, answer, timings = time.monotonic(), None, "", {}
        for chunk in api.chat.completions.create(model="m", messages=messages, max_tokens=tokens, temperature=0,
                                                 stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.monotonic()
                answer += chunk.choices[0].delta.content
            timings = (chunk.model_extra or {}).get("timings") or timings  # llama-server's, on the last chunk
        turns.append({"ttft_s": (first or time.monotonic()) - sent, "total_s": time.monotonic() - sent,
                      "prompt_tokens": timings.get("prompt_n", 0) + timings.get("cache_n", 0),
                      "cached_tokens": timings.get("cache_n")})
        messages.append({"role": "assistant", "content": answer})
    return turns


def run_arm(command: list[str], clients: int, tokens: int, facts: int, limit: int, log: Path) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    argv = [*command, "--host", "127.0.0.1", "--port", str(port), "--metrics", "--no-webui"]
    cgroup = MemoryCgroup(f"ff-ckpt-{port}", limit) if cgroup_version() else None
    dropped = drop_page_cache()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=cgroup.preexec if cgroup else None)
    result: dict = {"argv": argv, "page_cache_dropped": dropped}
    try:
        wait_health(base, proc, log, timeout=300)
        calls0 = decode_calls(base)
        turns: dict = {}
        threads = [threading.Thread(target=chat, args=(base, c, tokens, facts, turns)) for c in range(clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        result["wall_s"] = time.monotonic() - t0
        result["alive"] = proc.poll() is None
        result["decode_calls"] = decode_calls(base) - calls0 if result["alive"] else None
        result["rss_peak_bytes"] = rss_peak(proc.pid) if result["alive"] else None
        answered = {c: t for c, t in turns.items() if isinstance(t, list)}
        result["answered"] = len(answered)
        result["errors"] = sorted({t["error"] for t in turns.values() if isinstance(t, dict)})
        for k in range(3):
            ttfts = [answered[c][k]["ttft_s"] for c in answered]
            result[f"ttft_turn{k + 1}_s"] = statistics.median(ttfts) if ttfts else None
        # of the follow-ups' prompt tokens, the share the slots' caches held (the rest was read again)
        follow = [t for c in answered for t in answered[c][1:] if t["cached_tokens"] is not None]
        result["prompt_tokens_turn1"] = statistics.median([answered[c][0]["prompt_tokens"] for c in answered]) \
            if answered else None
        result["followup_cached_share"] = sum(t["cached_tokens"] for t in follow) / \
            max(1, sum(t["prompt_tokens"] for t in follow)) if follow else None
    finally:
        stop(proc)
    if cgroup:
        result["cgroup_limit_bytes"], result["cgroup_peak_bytes"] = cgroup.limit, cgroup.peak_bytes()
        result["oom_killed"] = cgroup.oom_killed()
        cgroup.remove()
    return result


def planned_command(model: Path, budget: str, clients: int, ctx: int) -> list[str]:
    """flashflex serve's llama-server command line for this model and budget (its spec file written)."""
    from orchestrator import llama_server, tools
    from orchestrator.run import loader

    slots = llama_server.plan_slots(None, {"model": str(model), "budget": budget, "ctx": ctx, "draft": "none"},
                                    clients, log=lambda m: None)
    spec = loader.write_native_spec(slots.prepared.spec) if slots.prepared.spec.native else None
    return tools.command_for(slots.prepared, "llama-server", spec, [], parallel=slots.parallel)


def summarize(runs: list[dict], model: str, budget: str, limit: int, clients: int, tokens: int, reps: int,
              started: str) -> str:
    """The Markdown table of medians per arm (an arm no repetition of which lived to answer shows dashes)."""
    keys = ("ttft_turn1_s", "ttft_turn2_s", "ttft_turn3_s", "followup_cached_share", "prompt_tokens_turn1",
            "decode_calls", "rss_peak_bytes", "cgroup_peak_bytes", "wall_s")
    rows = []
    for name in ARMS:
        mine = [r for r in runs if r["arm"] == name]
        med = {k: statistics.median([r[k] for r in mine if r.get(k) is not None] or [float("nan")]) for k in keys}
        ooms = sum(1 for r in mine if r.get("oom_killed"))
        answered = sum(r.get("answered") or 0 for r in mine)
        if any(math.isnan(med[k]) for k in ("ttft_turn1_s", "decode_calls", "rss_peak_bytes")):
            measured = "- | - | - | - | "  # no repetition lived to answer
        else:
            measured = (f"{med['ttft_turn1_s']:.2f} / {med['ttft_turn2_s']:.2f} / {med['ttft_turn3_s']:.2f} s | "
                        f"{med['followup_cached_share']:.0%} | {med['decode_calls']:.0f} | "
                        f"{med['rss_peak_bytes'] / 2**20:.0f} MiB | ")
        rows.append(f"| {name} | {measured}{med['cgroup_peak_bytes'] / 2**20:.0f} MiB | {med['wall_s']:.1f} s | "
                    f"{answered}/{clients * len(mine)} | {ooms}/{len(mine)} |")
    first = statistics.median([r["prompt_tokens_turn1"] for r in runs if r.get("prompt_tokens_turn1")] or [0])
    return (f"Model {model}, budget {budget}, cgroup {limit / 2**20:.0f} MiB, {clients} "
               f"clients x 3 turns (a first prompt of {first:.0f} tokens), {tokens} tokens an answer; "
               f"started {started}; medians of {reps} "
               "interleaved repetitions.\n\n"
               "| llama-server | TTFT turn 1 / 2 / 3 (median client) | follow-ups' prompt from cache | "
               "llama_decode calls | peak RSS | "
               "cgroup peak | wall | conversations answered | OOM-killed |\n"
               "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="a model with sliding-window attention (default: "
                    "Gemma 3 270M, run's default model, realigned to 4096 once)")
    ap.add_argument("--budget", default="280MiB")
    ap.add_argument("--clients", type=int, default=4, help="slots, and conversations held at once")
    ap.add_argument("--ctx", type=int, default=1024, help="context per slot (40 facts: ~800 tokens a conversation)")
    ap.add_argument("--facts", type=int, default=40, help="length of each conversation's first message")
    ap.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--overhead-mib", type=int, default=PROCESS_OVERHEAD >> 20,
                    help="the cgroup's room beside the budget for llama-server's own heap, threads and libraries")
    ap.add_argument("--out", type=Path, default=Path("bench-results/serve-checkpoints"))
    args = ap.parse_args()
    if args.model is None:
        from orchestrator.bench.speculative import default_model

        args.model = default_model()
    args.out.mkdir(parents=True, exist_ok=True)
    command = planned_command(args.model.expanduser(), args.budget, args.clients, args.ctx)
    limit = parse_size(args.budget) + (args.overhead_mib << 20)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs = []
    for rep in range(args.reps):
        arms = list(ARMS.items()) if rep % 2 == 0 else list(reversed(ARMS.items()))  # order alternates
        for name, arm in arms:
            r = run_arm(arm(command), args.clients, args.tokens, args.facts, limit,
                        args.out / f"server-{name.split()[0]}-{rep}.log")
            r.update(arm=name, rep=rep)
            runs.append(r)
            print(json.dumps(r), flush=True)
    summary = summarize(runs, args.model.name, args.budget, limit, args.clients, args.tokens, args.reps, started)
    meta = {"model": str(args.model), "budget": args.budget, "clients": args.clients, "facts": args.facts,
            "started": started}
    (args.out / "results.json").write_text(json.dumps({**meta, "runs": runs}, indent=1))
    (args.out / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
