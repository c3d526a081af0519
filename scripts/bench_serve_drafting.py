"""Drafting inside llama-server's slots: `flashflex serve` drafting as it does by default (prompt lookup in every slot,
up to draft.max_tokens per slot, its rows lent to streamed weights between verifications, each pass's draft length
from the runtime; --draft-flags such as --draft-max 3 change it) against the same server with `--draft none` and,
with `--modes draft,none,fixed`, with a fixed length (`--no-draft-adaptive`), with `kept`, the rows' memory kept for
the whole run (`draft.lend_rows: false`), and with `upstream`, drafting by llama.cpp's own ngram-simple lookup in
place of flashflex's (`draft.lookup: upstream`), at the same budget, on the written-down text tasks of
`bench speculative`.

The model is read as under a budget below its size: by default the serve model (SmolLM2) realigned to 4096 bytes, so
the weights the plan does not keep resident are read from disk (O_DIRECT) at every pass, not from the page cache.
Per repetition and mode (interleaved, each repetition's modes in another order from the last), one server is
started, answers one unmeasured request (the last task, 32 tokens), and is asked, with completions of exactly
--tokens tokens each (EOS ignored; greedy, the sampled tasks at their temperature with seed 42), at every client
count of --clients: 1 (every task alone, one after another),
then the tasks in groups of that many at once (4 tasks at 2 clients: two groups). Reported per mode: generated
tokens/s of each task alone (its decode, from the server's timings), and per client count the aggregate (all tokens
over the groups' wall time), with the drafted tokens the server kept (its /v1/completions `timings`) and the
runtime's draft-length figures (/flashflex/stats). The ratios are each drafted mode over undrafted, medians of the
repetitions. Writes results.json (every request) and summary.md (the table `flashflex bench all` puts on the
benchmarks page).

    python scripts/bench_serve_drafting.py --budget 110MiB --reps 3 --modes draft,none,upstream \
        --out bench-results/serve-drafting
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

from orchestrator.bench.servers import free_port  # noqa: E402
from orchestrator.bench.speculative import TASKS, TEMPERATURE, realigned_copy  # noqa: E402
from orchestrator.fsutil import atomic_file  # noqa: E402
from orchestrator.modelfile.locate import default_chat_model_path  # noqa: E402

DEFAULT_TASKS = "rewrite,edit-function,extract,free-chat"


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
    # every request generates exactly `tokens` tokens: a drafted batch rounds differently from a single step, so a
    # greedy answer may end (EOS) elsewhere than undrafted, and aggregates of unequal work would not compare; the
    # sampled tasks (story-sampled, letter-sampled: text that does not repeat its context) at their temperature
    body = json.dumps({"model": "m", "prompt": TASKS[task][1], "max_tokens": tokens,
                       "temperature": TEMPERATURE.get(task, 0), "seed": 42, "ignore_eos": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.load(r)
    timings = out.get("timings") or {}
    return {"task": task, "seconds": time.perf_counter() - t0, "tokens": out["usage"]["completion_tokens"],
            "decode_tok_per_s": timings.get("predicted_per_second"), "draft_n": timings.get("draft_n", 0),
            "draft_accepted": timings.get("draft_n_accepted", 0)}


def draft_config(out: Path, key: str, value: str) -> Path:
    """A RunConfig that sets one draft option, flags aside: lookup upstream (llama-server drafts by upstream's own
    ngram-simple lookup), lend_rows false (the rows keep their memory for the whole run)."""
    path = out / f"draft-{key}-{value}.yaml"
    path.write_text(f"draft:\n  {key}: {value}\n")
    return path


def one_server(args, mode: str, rep: int) -> dict:
    port = free_port()
    draft = {"none": ["--draft", "none"], "draft": args.draft_flags,
             "fixed": ["--draft", "prompt-lookup", "--no-draft-adaptive", *args.draft_flags],
             "upstream": [str(draft_config(args.out, "lookup", "upstream")), *args.draft_flags],
             "kept": [str(draft_config(args.out, "lend_rows", "false")), *args.draft_flags]}[mode]
    log = args.out / f"server-{mode}-{rep}.log"
    proc = start(args, draft, port, log)
    try:
        if mode != "none" and "drafts by prompt lookup" not in log.read_text():
            raise SystemExit(f"the drafted server does not draft (its plan left drafting off): {log}")
        # one request first, not measured: a server that has served before (under a plan the runtime has priced its
        # passes and drafts by then, as in a server that has been up for a while)
        ask(port, args.tasks[-1], 32)
        alone = [ask(port, t, args.tokens) for t in args.tasks]
        together = {}
        for clients in (c for c in args.clients if c > 1):
            groups = [args.tasks[i:i + clients] for i in range(0, len(args.tasks), clients)]
            answers, wall = [], 0.0
            for group in groups:
                t0 = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(len(group)) as pool:
                    answers += list(pool.map(lambda t: ask(port, t, args.tokens), group))
                wall += time.perf_counter() - t0
            together[str(clients)] = {"answers": answers, "wall_s": wall,
                                      "tok_per_s": sum(r["tokens"] for r in answers) / wall}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/flashflex/stats", timeout=10) as r:
            stats = json.load(r)
        length = ((stats["models"][stats["default"]].get("runtime") or {}).get("draft"))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    return {"mode": mode, "rep": rep, "alone": alone, "together": together, "draft_length": length}


def summarise(runs: list[dict], args) -> tuple[dict, dict]:
    summary = {}
    for mode in args.modes:
        mine = [r for r in runs if r["mode"] == mode]
        answers = [x for r in mine for x in r["alone"] + [a for g in r["together"].values() for a in g["answers"]]]
        summary[mode] = {
            "lone_decode_tok_per_s": {t: statistics.median(x["decode_tok_per_s"] or 0 for r in mine for x in r["alone"]
                                                           if x["task"] == t) for t in args.tasks},
            "together_tok_per_s": {c: statistics.median(r["together"][c]["tok_per_s"] for r in mine)
                                   for c in mine[0]["together"]},
            "drafted": sum(x["draft_n"] for x in answers),
            "kept": sum(x["draft_accepted"] for x in answers),
        }
    n = summary["none"]
    ratios = {mode: {"lone": {t: d["lone_decode_tok_per_s"][t] / n["lone_decode_tok_per_s"][t] for t in args.tasks},
                     "together": {c: d["together_tok_per_s"][c] / n["together_tok_per_s"][c]
                                  for c in d["together_tok_per_s"]}}
              for mode, d in summary.items() if mode != "none"}
    return summary, ratios


LABELS = {"none": "undrafted", "draft": "drafted, length per pass (serve's default)", "fixed": "drafted, fixed length",
          "upstream": "drafted by upstream's lookup, length per pass",
          "kept": "drafted, rows kept (not lent), length per pass"}


def markdown(result: dict) -> str:
    """The page's table: decode tok/s of each task alone and the aggregate at each client count, drafted and not,
    and the ratio."""
    a, s, r = result["args"], result["summary"], result["ratios"]
    tasks, counts = a["tasks"], list(s["none"]["together_tok_per_s"])
    kept = "; ".join(f"{LABELS[m]}: {s[m]['kept']} of {s[m]['drafted']}" for m in r)
    lines = [f"Model {Path(a['model']).name}, budget {a['budget']}, {len(tasks)} slots of {a['ctx']} tokens, ubatch "
             f"{a['ubatch']}, {a['tokens']} tokens a request, drafted flags `{' '.join(a['draft_flags']) or '(none)'}`;"
             f" medians of {a['reps']} repetitions, started {result['started']}; drafted tokens kept: {kept}.", "",
             row("", [f"{t} alone" for t in tasks] + [f"{c} clients at once (aggregate)" for c in counts]),
             "|---|" + "---|" * (len(tasks) + len(counts))]
    for mode in s:
        lines.append(row(f"{LABELS[mode]}, tok/s", [f"{s[mode]['lone_decode_tok_per_s'][t]:.1f}" for t in tasks]
                         + [f"{s[mode]['together_tok_per_s'][c]:.1f}" for c in counts]))
    for mode, q in r.items():
        lines.append(row(f"{LABELS[mode]} / undrafted", [f"{q['lone'][t]:.2f}" for t in tasks]
                         + [f"{q['together'][c]:.2f}" for c in counts]))
    return "\n".join(lines) + "\n"


def row(label: str, cells: list[str]) -> str:
    return "|" + "|".join(f" {c} " if c else " " for c in [label, *cells]) + "|"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF (default: serve's default chat model, realigned to 4096)")
    ap.add_argument("--budget", default="100MiB")
    ap.add_argument("--ctx", type=int, default=640, help="context per slot")
    ap.add_argument("--ubatch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--clients", default="1,2,4", help="client counts (1: every task alone)")
    ap.add_argument("--modes", default="draft,none", help="draft (serve's default), none (--draft none), fixed "
                    "(--draft prompt-lookup --no-draft-adaptive), upstream (draft.lookup upstream: llama.cpp's "
                    "ngram-simple lookup in place of flashflex's), kept (draft.lend_rows false: the rows keep their "
                    "memory)")
    ap.add_argument("--draft-flags", default="", help="more serve flags for the drafted servers, e.g. '--draft-max 7'")
    ap.add_argument("--out", type=Path, default=Path("bench-results/serve-drafting"))
    args = ap.parse_args()
    args.tasks = args.tasks.split(",")
    args.clients = sorted({int(c) for c in args.clients.split(",")} | {1})
    args.draft_flags = args.draft_flags.split()
    args.modes = list(dict.fromkeys(["none", *args.modes.split(",")]))
    if set(args.modes) - set(LABELS):
        raise SystemExit(f"--modes: {', '.join(sorted(set(args.modes) - set(LABELS)))} is not one of "
                         f"{', '.join(LABELS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        # read from disk at every pass, as a model larger than RAM is (the published file is 32-aligned: its reads
        # would be buffered, and served from the page cache)
        args.model = str(realigned_copy(default_chat_model_path()))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs = []
    for rep in range(args.reps):
        k = rep % len(args.modes)
        for mode in args.modes[k:] + args.modes[:k]:
            r = one_server(args, mode, rep)
            runs.append(r)
            print(f"rep {rep + 1}/{args.reps} {mode}: alone "
                  f"{statistics.median(x['decode_tok_per_s'] or 0 for x in r['alone']):.1f} tok/s (median of tasks), "
                  + ", ".join(f"{c} at once {g['tok_per_s']:.1f} tok/s" for c, g in r["together"].items())
                  + f"; drafted kept {sum(x['draft_accepted'] for x in r['alone'])}/"
                  f"{sum(x['draft_n'] for x in r['alone'])} alone", flush=True)
    summary, ratios = summarise(runs, args)
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "started": started, "summary": summary, "ratios": ratios,
              "runs": runs}
    with atomic_file(args.out / "results.json") as f:
        f.write(json.dumps(result, indent=1).encode())
    with atomic_file(args.out / "summary.md") as f:
        f.write(markdown(result).encode())
    print(json.dumps({"summary": summary, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
