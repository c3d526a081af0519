"""Drafting inside llama-server's slots: `flashflex serve` with prompt lookup in every slot against the same server
with `--draft none`, at the same budget, on the written-down text tasks of `bench speculative`.

Per repetition and mode (interleaved: drafted, then undrafted, then the next repetition), one server is started and
asked, with greedy completions of --tokens tokens each: every task alone (one client at a time), then every task at
once (as many clients as tasks, one slot each). Reported per mode: generated tokens/s of the lone requests (median
over tasks and repetitions) and of the burst (all tokens over the burst's wall time), and the drafted tokens the
server kept (its /v1/completions `timings`). The ratio is drafted over undrafted, medians of the repetitions.
Writes results.json (every request) and summary.md (the table `flashflex bench all` puts on the benchmarks page).

    python scripts/bench_serve_drafting.py --budget 100MiB --reps 3 --out bench-results/serve-drafting
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.bench.speculative import TASKS  # noqa: E402
from orchestrator.fsutil import atomic_file  # noqa: E402

DEFAULT_TASKS = "rewrite,edit-function,extract,free-chat"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, draft: list[str], port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "orchestrator", "serve", "--engine", "llama-server", "--budget", args.budget,
           "--ctx", str(args.ctx), "--ubatch", str(args.ubatch), "--parallel", str(len(args.tasks)),
           "--threads", str(args.threads), "--port", str(port), *draft]
    if args.model:
        cmd += ["-m", args.model]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not answer /health within 300 s: {log}")


def ask(port: int, task: str, tokens: int) -> dict:
    body = json.dumps({"model": "m", "prompt": TASKS[task][1], "max_tokens": tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.load(r)
    timings = out.get("timings") or {}
    return {"task": task, "seconds": time.perf_counter() - t0, "tokens": out["usage"]["completion_tokens"],
            "decode_tok_per_s": timings.get("predicted_per_second"), "draft_n": timings.get("draft_n", 0),
            "draft_accepted": timings.get("draft_n_accepted", 0)}


def one_server(args, mode: str, rep: int) -> dict:
    port = free_port()
    draft = ["--draft", "none"] if mode == "none" else ["--draft", "prompt-lookup", *args.draft_flags]
    proc = start(args, draft, port, args.out / f"server-{mode}-{rep}.log")
    try:
        alone = [ask(port, t, args.tokens) for t in args.tasks]
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(args.tasks)) as pool:
            burst = list(pool.map(lambda t: ask(port, t, args.tokens), args.tasks))
        wall = time.perf_counter() - t0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    return {"mode": mode, "rep": rep, "alone": alone, "burst": burst,
            "burst_tok_per_s": sum(r["tokens"] for r in burst) / wall, "burst_wall_s": wall}


def markdown(result: dict) -> str:
    """The page's table: decode tok/s of each task alone and the burst's aggregate, drafted and not, and the ratio."""
    a, s, r = result["args"], result["summary"], result["ratios"]
    tasks = a["tasks"]
    model = Path(a["model"]).name if a["model"] else "serve's default model"
    lines = [f"Model {model}, budget {a['budget']}, {len(tasks)} slots of {a['ctx']} tokens, ubatch {a['ubatch']}, "
             f"{a['tokens']} tokens a request, drafted flags `{' '.join(a['draft_flags']) or '(none)'}`; medians of "
             f"{a['reps']} repetitions, started {result['started']}; drafted tokens kept: {s['draft']['kept']} of "
             f"{s['draft']['drafted']}.", "",
             "| | " + " | ".join(tasks) + f" | {len(tasks)} clients at once (aggregate) |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for mode, label in (("none", "undrafted, decode tok/s"), ("draft", "drafted, decode tok/s")):
        lines.append(f"| {label} | " + " | ".join(f"{s[mode]['lone_decode_tok_per_s'][t]:.1f}" for t in tasks)
                     + f" | {s[mode]['burst_tok_per_s']:.1f} |")
    lines.append("| drafted / undrafted | " + " | ".join(f"{r['lone'][t]:.2f}" for t in tasks)
                 + f" | {r['burst']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF (default: serve's default chat model)")
    ap.add_argument("--budget", default="100MiB")
    ap.add_argument("--ctx", type=int, default=640, help="context per slot")
    ap.add_argument("--ubatch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--draft-flags", default="", help="more serve flags for the drafted server, e.g. '--draft-max 7'")
    ap.add_argument("--out", type=Path, default=Path("bench-results/serve-drafting"))
    args = ap.parse_args()
    args.tasks = args.tasks.split(",")
    args.draft_flags = args.draft_flags.split()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for rep in range(args.reps):
        for mode in ("draft", "none"):
            r = one_server(args, mode, rep)
            runs.append(r)
            print(f"rep {rep + 1}/{args.reps} {mode}: lone decode "
                  f"{statistics.median(x['decode_tok_per_s'] or 0 for x in r['alone']):.1f} tok/s (median of tasks), "
                  f"burst {r['burst_tok_per_s']:.1f} tok/s, drafted kept "
                  f"{sum(x['draft_accepted'] for x in r['alone'])}/{sum(x['draft_n'] for x in r['alone'])}",
                  flush=True)
    summary = {}
    for mode in ("draft", "none"):
        mine = [r for r in runs if r["mode"] == mode]
        summary[mode] = {
            "lone_decode_tok_per_s": {t: statistics.median(x["decode_tok_per_s"] or 0 for r in mine for x in r["alone"]
                                                           if x["task"] == t) for t in args.tasks},
            "burst_tok_per_s": statistics.median(r["burst_tok_per_s"] for r in mine),
            "drafted": sum(x["draft_n"] for r in mine for x in r["alone"] + r["burst"]),
            "kept": sum(x["draft_accepted"] for r in mine for x in r["alone"] + r["burst"]),
        }
    ratios = {"lone": {t: summary["draft"]["lone_decode_tok_per_s"][t] / summary["none"]["lone_decode_tok_per_s"][t]
                       for t in args.tasks},
              "burst": summary["draft"]["burst_tok_per_s"] / summary["none"]["burst_tok_per_s"]}
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "summary": summary, "ratios": ratios,
              "runs": runs}
    with atomic_file(args.out / "results.json") as f:
        f.write(json.dumps(result, indent=1).encode())
    with atomic_file(args.out / "summary.md") as f:
        f.write(markdown(result).encode())
    print(json.dumps({"summary": summary, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
