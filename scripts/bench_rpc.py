"""A model that fits in neither of two memory cgroups alone, but in both together: flashflex split across the two
(this process in one, an RPC worker on loopback in the other) against flashflex streaming in one cgroup and stock
llama.cpp (mmap) in one cgroup, in the same run.

    python scripts/bench_rpc.py --model dense-wide-16l-q4_0 --cgroup 1.5GiB --repeats 3 --out bench-results/rpc
    python scripts/bench_rpc.py --model moe-a3b-12l-q4_0 --cgroup 2.1GiB --repeats 3 --out bench-results/rpc-moe

A MoE model runs its routed experts here in slot banks (its sidecar extracted once beside it) in both flashflex
configurations; split over RPC, the worker holds the other tensors of its layers (attention, norms, router, the
output layer: llama.cpp's --cpu-moe shape), so the experts get the memory those leave here.

The worker (`flashflex rpc-server --mem`, announcing what its cgroup leaves after its own process) runs for the
whole invocation inside its own cgroup; each measured run is a fresh process in a cgroup of the same size with the
page cache dropped (orchestrator.bench.runs.run_point), runs interleaved, medians reported. Bytes over RPC per
token are measured (the kernel's byte counters on ggml's connections to the worker, orchestrator.rpc.traffic) and
set beside the computed floor: a split after layer L sends the hidden state (n_embd float32 per token) to the
worker, which holds the last layers and the output layer and sends back the logits (n_vocab float32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from orchestrator import modes, synth
from orchestrator.bench.isolation import MemoryCgroup
from orchestrator.bench.runs import Isolation, Point, RunSpec, check_isolation, run_point
from orchestrator.bench.servers import free_port
from orchestrator.modelfile.reader import read_model_table
from orchestrator.sizes import format_size, parse_size

WORKER_SLACK = 256 << 20  # the worker's interpreter and libraries, kept out of what it announces


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a synth preset or a GGUF path")
    ap.add_argument("--cgroup", required=True, help="each cgroup's limit (the model must not fit in one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gen-tokens", type=int, default=12)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model = Path(args.model) if Path(args.model).exists() else synth.cached_preset(args.model)
    model_bytes = model.stat().st_size
    sidecar = None
    if read_model_table(model).arch.is_moe:
        from orchestrator import sidecar as sidecar_mod

        sidecar = sidecar_mod.beside(model)
    limit = parse_size(args.cgroup, what="--cgroup")
    sweep = Isolation()
    check_isolation(sweep, print)
    port = free_port()
    cg = MemoryCgroup(f"flashflex-bench-rpc-worker-{port}", limit) if sweep.use_cgroup else None
    announce = limit - WORKER_SLACK
    worker = subprocess.Popen([sys.executable, "-m", "orchestrator", "rpc-server", "--port", str(port), "--mem",
                               f"{announce}B", "-t", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, preexec_fn=cg.preexec if cg else None)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = worker.stdout.readline()
            print("worker: " + line.rstrip())
            if "serving on" in line:
                break
        endpoint = f"127.0.0.1:{port}"
        spec = RunSpec(model=model, gen_tokens=args.gen_tokens, sidecar=sidecar)
        split = RunSpec(model=model, gen_tokens=args.gen_tokens, sidecar=sidecar, rpc=endpoint)
        here = Point(modes.SLOT_BANK, limit) if sidecar else Point(modes.FLASHFLEX, limit, "auto")
        configs = [("stock mmap, one cgroup", Point(modes.STOCK_MMAP, limit), spec),
                   (f"flashflex {'slot banks' if sidecar else 'streaming'}, one cgroup", here, spec),
                   ("flashflex split over RPC, two cgroups", here, split)]
        args.out.mkdir(parents=True, exist_ok=True)
        records = []
        with open(args.out / "runs.jsonl", "w") as log:
            for rep in range(args.repeats):
                for name, point, rspec in configs:
                    rec = {"config": name, "repeat": rep, **run_point(point, rspec, sweep.use_cgroup,
                                                                      sweep.drop_caches, print)}
                    stream = rec.get("stream") or {}
                    # read from disk here per token: streamed dense tensors and expert misses
                    rec["decode_streamed_bytes_per_token"] = (stream.get("bytes_read", 0) / args.gen_tokens
                                                              + (rec.get("miss_bytes_per_token") or 0))
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    records.append(rec)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
        if cg:
            cg.remove()

    def median(name: str, key: str):
        vals = [r[key] for r in records if r["config"] == name and r.get("status") == "ok" and r.get(key) is not None]
        return statistics.median(vals) if vals else None

    table_info = read_model_table(model)
    n_embd = table_info.arch.n_embd
    n_vocab = next((t.shape[1] for t in table_info.tensors if t.name == "token_embd.weight"), 0)
    floor = (n_embd + n_vocab) * 4  # the hidden state to the worker, the logits back, float32, per token
    stock = median("stock mmap, one cgroup", "decode_tok_per_s")
    lines = [f"Model `{model.name}` ({format_size(model_bytes)}); each cgroup {format_size(limit)}; worker on "
             f"127.0.0.1 announcing {format_size(announce)}; medians of {args.repeats} interleaved runs", "",
             "| run | decode tok/s | × stock | read from disk here per token | over RPC per token (measured) "
             "| runs ok |",
             "|---|---|---|---|---|---|"]
    for name, _, _ in configs:
        dec = median(name, "decode_tok_per_s")
        st = median(name, "decode_streamed_bytes_per_token")
        wire = median(name, "rpc_bytes_per_token")
        ok = sum(1 for r in records if r["config"] == name and r.get("status") == "ok")
        lines.append(f"| {name} | {dec:.3f} | {dec / stock:.2f} |" if dec and stock else f"| {name} | - | - |")
        lines[-1] += (f" {format_size(st) if st else '-'} | {format_size(wire) if wire else '-'} |"
                      f" {ok}/{args.repeats} |")
    wire = median("flashflex split over RPC, two cgroups", "rpc_bytes_per_token")
    measured = f"{format_size(wire)} measured (both directions, ggml's commands included)" if wire else "not measured"
    lines += ["", f"Over RPC per decoded token: {measured}, against a floor of {format_size(floor)} computed (the "
              f"hidden state out, n_embd {n_embd} × 4 B, and the logits back, n_vocab {n_vocab} × 4 B)."]
    if wire:
        lines += [f"Computed from the measured bytes: {wire * 8 / 1e9 * 1e3:.3f} ms per token on a 1 Gb/s link, "
                  f"{wire * 8 / 10e9 * 1e3:.4f} ms on 10 Gb/s, before round-trip latency (a few round trips per "
                  "token: one per graph split, plus the logits)."]
    table = "\n".join(lines) + "\n"
    (args.out / "summary.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
