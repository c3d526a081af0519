"""Dense streaming under a memory cgroup: today's defaults (streamed weights in the file's layout, read straight into
their homes; a byte-sized ring mapped twice back to back; `-tp auto`) against the same with the streamed weights
repacked on arrival (prefetch.repack: staged, then set into the CPU backend's repacked layout by the reading thread)
and stock llama.cpp (mmap), in the same run; `--flat` adds the flat ring that wraps (prefetch.mirror false: a
largest tensor more of ring, that much less resident), `--layer-slots` the older default (3 layer slots, 1 thread).

Each configuration runs `--repeats` times, interleaved (stock, repacked, auto, stock, ...), each in a fresh process
inside a cgroup of the budget with the page cache dropped (orchestrator.bench.runs.run_point); the table reports
medians. Also, with `--full`, a budget above the model's size: flashflex auto against stock resident.

    python scripts/bench_ring.py --model dense-7b-q4_0 --budget 1.8GiB --repeats 3 --out bench-results/ring-7b

Streamed bytes per token are what the runtime read during decode, divided by the tokens; the floor is
model bytes - (budget - runtime overhead), what a plan with no prefetch memory at all would stream, where the
runtime overhead is measured: the process before it loads anything, and the KV cache and compute buffers llama.cpp
allocates (what no weight can use). `x floor` is streamed / floor (issue 27's goal: at most 1.10). The roofline is
the streamed bytes over the direct-read bandwidth probed in the same run at the run's thread count (the deepest
probed queue not above it). "read from disk/token" is every run's own count (/proc/self/io over decode): for
stock, the page-cache misses its mmap faults read. Writes runs.jsonl and summary.md to --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from orchestrator import modes, readspeed
from orchestrator.bench.runs import Isolation, Point, RunSpec, check_isolation, run_point
from orchestrator.sizes import format_size, parse_size


def model_path(name: str) -> Path:
    if Path(name).exists():
        return Path(name)
    from orchestrator import synth

    return synth.cached_preset(name, log=lambda msg: print(msg, file=sys.stderr))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a synth preset or a GGUF path")
    ap.add_argument("--budget", required=True, help="the cgroup limit, e.g. 1.8GiB (about half the model)")
    ap.add_argument("--full", action="store_true", help="also a budget above the model's size (vs stock resident)")
    ap.add_argument("--flat", action="store_true", help="also the flat ring that wraps (prefetch.mirror false)")
    ap.add_argument("--layer-slots", action="store_true", help="also the older default: 3 layer slots, 1 thread")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gen-tokens", type=int, default=12)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model = model_path(args.model)
    model_bytes = model.stat().st_size
    budget = parse_size(args.budget, what="--budget")
    sweep = Isolation()
    check_isolation(sweep, print)
    probed = readspeed.probe(model)  # (bytes/s by queue depth, distinct bytes read), or None without O_DIRECT
    probe = probed[0] if probed is not None else {}
    print("direct-read bandwidth: " + ", ".join(f"QD{d} {bw / 1e9:.2f} GB/s" for d, bw in sorted(probe.items())))

    auto = RunSpec(model=model, gen_tokens=args.gen_tokens, window="auto")
    repacked = RunSpec(model=model, gen_tokens=args.gen_tokens, window="auto", repack=True)
    configs = [("stock mmap", Point(modes.STOCK_MMAP, budget), auto),
               ("repacked on arrival, tp auto", Point(modes.FLASHFLEX, budget, "auto"), repacked),
               ("auto: file layout, mirrored ring, tp auto", Point(modes.FLASHFLEX, budget, "auto"), auto)]
    if args.flat:
        flat = RunSpec(model=model, gen_tokens=args.gen_tokens, window="auto", mirror=False)
        configs.insert(1, ("flat ring, tp auto", Point(modes.FLASHFLEX, budget, "auto"), flat))
    if args.layer_slots:
        previous = RunSpec(model=model, gen_tokens=args.gen_tokens, window=3, mirror=False)
        configs.insert(1, ("3 layer slots, tp 1", Point(modes.FLASHFLEX, budget, 1), previous))
    if args.full:
        full = model_bytes + (1 << 30)
        configs += [("stock resident (full)", Point(modes.STOCK_RESIDENT, full), auto),
                    ("auto (full)", Point(modes.FLASHFLEX, full, "auto"), auto)]
    args.out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    with open(args.out / "runs.jsonl", "w") as log:
        for rep in range(args.repeats):
            for name, point, spec in configs:
                rec = {"config": name, "repeat": rep,
                       **run_point(point, spec, sweep.use_cgroup, sweep.drop_caches, lambda m: print(m, flush=True))}
                stream = rec.get("stream") or {}
                if stream:
                    rec["decode_streamed_bytes_per_token"] = stream["bytes_read"] / args.gen_tokens
                    rec["ring_bytes"] = stream["ring_bytes"]
                    rec["threads_used"] = stream["prefetch_threads"]
                log.write(json.dumps(rec) + "\n")
                log.flush()
                records.append(rec)

    def median(name: str, key: str) -> float | None:
        vals = [r[key] for r in records if r["config"] == name and r.get("status") == "ok" and r.get(key) is not None]
        return statistics.median(vals) if vals else None

    # the roofline divides by the probe at the run's threads or by the fastest any run here read its weights (bytes
    # over decode seconds), whichever is faster: a probe slower than the runs would measure the probe (issue 27)
    achieved = max((r["decode_streamed_bytes_per_token"] * r["decode_tok_per_s"] for r in records
                    if r.get("status") == "ok" and r.get("decode_streamed_bytes_per_token")
                    and r.get("decode_tok_per_s")), default=0.0)
    lines = [f"Model `{model.name}` ({format_size(model_bytes)}), cgroup {format_size(budget)}; medians of "
             f"{args.repeats} interleaved runs; direct reads "
             + ", ".join(f"QD{d} {bw / 1e9:.2f} GB/s" for d, bw in sorted(probe.items()))
             + f"; the fastest a run read its weights {achieved / 1e9:.2f} GB/s (the roofline divides by the faster "
             "of that and the probe at the run's threads)", "",
             "| run | decode tok/s | × stock | streamed/token | × floor | read from disk/token | resident weights "
             "| ring | tp | time/token ÷ roofline | runs ok |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    stock = {False: median("stock mmap", "decode_tok_per_s"), True: median("stock resident (full)", "decode_tok_per_s")}
    for name, point, _ in configs:
        dec = median(name, "decode_tok_per_s")
        ok = sum(1 for r in records if r["config"] == name and r.get("status") == "ok")
        full = point.budget_bytes > model_bytes
        ref = stock[full]
        streamed = median(name, "decode_streamed_bytes_per_token")
        overhead = None
        if median(name, "process_overhead_bytes") is not None:
            overhead = sum(median(name, key) or 0 for key in ("process_overhead_bytes", "kv_cache_bytes",
                                                              "compute_bytes"))
        floor = model_bytes - (point.budget_bytes - overhead) if overhead and not full else None
        tp = median(name, "threads_used")
        depths = [d for d in probe if tp is not None and d <= max(1, int(tp))]
        bw = max(probe[max(depths)], achieved) if depths else None
        roof = (1 / dec) / (streamed / bw) if dec and streamed and bw else None

        def fmt(x, f=".3f"):
            return "-" if x is None else format(x, f)
        ratio = dec / ref if dec and ref and not name.startswith("stock") else None
        lines.append(f"| {name} | {fmt(dec)} | {fmt(ratio, '.2f')}"
                     f" | {format_size(streamed) if streamed else '-'} | "
                     f"{fmt(streamed / floor if streamed and floor else None, '.3f')} | "
                     f"{'-' if (disk := median(name, 'disk_read_bytes_per_token')) is None else format_size(disk)} | "
                     f"{format_size(median(name, 'resident_bytes')) if median(name, 'resident_bytes') else '-'} | "
                     f"{format_size(median(name, 'ring_bytes')) if median(name, 'ring_bytes') else '-'} | "
                     f"{fmt(tp, '.0f')} | {fmt(roof, '.2f')} | {ok}/{args.repeats} |")
    table = "\n".join(lines) + "\n"
    (args.out / "summary.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
