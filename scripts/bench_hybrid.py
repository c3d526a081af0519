"""Hybrid placement on a local GPU (issue 24): a synthetic Qwen3-30B-A3B-shaped MoE (fewer layers), each run its own
process with the page cache dropped first, runs interleaved, medians reported.

    python scripts/bench_hybrid.py --out bench-results/hybrid              # needs a GPU build (flashflex build)
    python scripts/bench_hybrid.py --out /tmp/x --dry-run                  # the configurations, nothing run

The configurations (CONFIGS): stock llama.cpp with every layer on the GPU (only where the model fits the GPU's free
memory); stock with attention and dense weights on the GPU and the routed experts in host RAM, mmapped (llama.cpp's
--cpu-moe shape), in a host memory cgroup; flashflex with the same placement and the experts in slot banks, in a
cgroup of the same size; and the same pair with only the last half of the layers on the GPU (partial -ngl: the
host's dense layers are streamed under the budget). A host cgroup holds the process (measured in a calibration run:
interpreter, libllama, the CUDA context), a margin for host buffers, half of the routed experts and the dense
weights left on the host (half of those with partial -ngl): so stock pages its weights through less memory than
they need, and flashflex plans its banks and its stream into the same bytes.

Results: bench.json (every run, the medians, the ratios the issue's targets ask about) and bench.md in --out.
scripts/gpu_check.sh runs this as its last step, with a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: the orchestrator package is the checkout's
    sys.path.insert(0, str(REPO))

Log = Callable[[str], None]

PRESET = "moe-a3b-12l-q4_0"
ALL_LAYERS = 99  # llama.cpp's -ngl for "every layer and the output layer"
HOST_MARGIN = 256 << 20  # host compute buffers and the planner's slack, beside the measured process
GPU_MARGIN = 2 << 30  # what stock-gpu leaves free on the device (KV cache, compute buffers, CUDA's own)
RUN_TIMEOUT_S = 240.0


@dataclass(frozen=True)
class Config:
    name: str
    flashflex: bool  # planned by flashflex (slot banks, dense streaming) or stock llama.cpp
    partial: bool  # only the last half of the layers on the GPU (else every layer: -ngl 99)
    experts_on_host: bool  # routed experts in host memory (--cpu-moe shape); else everything on the GPU
    cgroup: bool  # in a host memory cgroup (half the host's experts)
    what: str


CONFIGS: tuple[Config, ...] = (
    Config("stock-gpu", False, False, False, False, "stock, every layer on the GPU (where the model fits it)"),
    Config("stock-cpumoe-mmap", False, False, True, True,
           "stock, -ngl 99, routed experts in host RAM (mmap), host cgroup"),
    Config("ff-slotbank", True, False, True, True,
           "flashflex, -ngl 99, routed experts in host slot banks, same host cgroup"),
    Config("stock-partial-mmap", False, True, True, True,
           "stock, -ngl half, host layers and every expert in host RAM (mmap), host cgroup"),
    Config("ff-partial-stream", True, True, True, True,
           "flashflex, -ngl half, experts in slot banks, host dense layers streamed as the budget needs, same cgroup"),
)
CONFIG_NAMES = tuple(c.name for c in CONFIGS)


# --------------------------------------------------------------------------------------------------------
# The model and what each configuration leaves on the host


def model_spec(layers: int):
    from orchestrator import synth

    return synth.preset(PRESET, n_layer=layers)


def gpu_layers(config: Config, n_layer: int) -> int:
    return n_layer // 2 if config.partial else ALL_LAYERS


def host_bytes(tensors: list[tuple[str, int]], n_layer: int, ngl: int) -> tuple[int, int]:
    """(dense bytes, routed-expert bytes) that stay in host memory when the last `ngl` layers go to the GPU and the
    routed experts stay on the host. llama.cpp keeps the token embedding on the host always, and the output layer
    unless ngl exceeds the layer count."""
    first_gpu = max(0, n_layer - ngl)
    dense = experts = 0
    for name, n in tensors:
        if "_exps" in name:
            experts += n
        elif name.startswith("blk."):
            if int(name.split(".")[1]) < first_gpu:
                dense += n
        elif name.startswith("token_embd") or ngl <= n_layer:
            dense += n
    return dense, experts


def cgroup_bytes(process_bytes: int, dense_host: int, experts_host: int, partial: bool) -> int:
    """The process, a margin, half the host's routed experts and the host's dense weights: all of them with every
    layer on the GPU (the token embedding, little else), half of them with partial -ngl (so that flashflex streams
    the dense layers left on the host, as the configuration means to show)."""
    return process_bytes + HOST_MARGIN + (dense_host // 2 if partial else dense_host) + experts_host // 2


def plan_points(configs: list[Config], tensors: list[tuple[str, int]], n_layer: int, model_bytes: int,
                process_bytes: int, gpu_free_bytes: int | None) -> list[dict[str, Any]]:
    """One dict per configuration: its -ngl, its cgroup limit (None: no cgroup) and, for one that cannot run here,
    why it is skipped."""
    points = []
    for c in configs:
        ngl = gpu_layers(c, n_layer)
        dense, experts = host_bytes(tensors, n_layer, ngl)
        point: dict[str, Any] = {"config": c.name, "what": c.what, "flashflex": c.flashflex, "gpu_layers": ngl,
                                 "experts_on_host": c.experts_on_host, "host_dense_bytes": dense,
                                 "host_expert_bytes": experts, "skip": None,
                                 "cgroup_bytes": cgroup_bytes(process_bytes, dense, experts, c.partial)
                                 if c.cgroup else None}
        if not c.experts_on_host and gpu_free_bytes is not None and model_bytes + GPU_MARGIN > gpu_free_bytes:
            point["skip"] = (f"the model ({model_bytes / 2**30:.1f} GiB) and a {GPU_MARGIN >> 30} GiB margin do not "
                             f"fit the GPU's {gpu_free_bytes / 2**30:.1f} GiB free")
        points.append(point)
    return points


# --------------------------------------------------------------------------------------------------------
# Medians and ratios


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def median_rows(records: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Per configuration (in `names` order): runs, runs ok, and the median of each measure over the runs that
    completed (a median of 2 is their mean; of 1, that run)."""
    rows = []
    for name in names:
        mine = [r for r in records if r.get("config") == name]
        ok = [r for r in mine if r.get("status") == "ok"]
        row: dict[str, Any] = {"config": name, "runs": len(mine), "ok": len(ok),
                               "statuses": sorted({r.get("status", "?") for r in mine if r.get("status") != "ok"})}
        for key in ("decode_tok_per_s", "prompt_tok_per_s", "load_s", "hit_rate", "miss_bytes_per_token",
                    "bytes_read_per_token", "cgroup_peak_bytes", "gpu_model_bytes", "host_model_bytes"):
            row[key] = _median([float(r[key]) for r in ok if r.get(key) is not None])
        first = mine[0] if mine else {}
        for key in ("gpu_layers", "cgroup_bytes", "flashflex", "what", "bank_slots", "streaming"):
            row[key] = next((r.get(key) for r in ok if r.get(key) is not None), first.get(key))
        rows.append(row)
    return rows


def add_ratios(rows: list[dict[str, Any]], read_bandwidth: float | None) -> dict[str, Any]:
    """The issue's two targets, from the medians: flashflex slot banks against stock with mmapped experts in the same
    cgroup (target >= 3x), and the hybrid's time per token against its roofline, the GPU-resident time per token
    plus the expert miss bytes read at the measured parallel bandwidth (target <= 1.3x). Also partial -ngl against
    stock with the same placement. Returns the targets; each is None where a run it needs did not complete."""
    by = {r["config"]: r for r in rows}

    def tps(name: str) -> float | None:
        row = by.get(name)
        return row["decode_tok_per_s"] if row and row.get("decode_tok_per_s") else None

    targets: dict[str, Any] = {"slotbank_over_stock_mmap": None, "slotbank_over_roofline": None,
                               "partial_over_stock_partial": None, "read_bandwidth_bytes_per_s": read_bandwidth}
    bank, stock_mmap, gpu = tps("ff-slotbank"), tps("stock-cpumoe-mmap"), tps("stock-gpu")
    if bank and stock_mmap:
        targets["slotbank_over_stock_mmap"] = bank / stock_mmap
        by["ff-slotbank"]["ratio_to_stock"] = bank / stock_mmap
    miss = by.get("ff-slotbank", {}).get("miss_bytes_per_token")
    if bank and gpu and read_bandwidth and miss is not None:
        roofline_s = 1 / gpu + miss / read_bandwidth
        targets["roofline_tok_per_s"] = 1 / roofline_s
        targets["slotbank_over_roofline"] = (1 / bank) / roofline_s
        by["ff-slotbank"]["time_over_roofline"] = targets["slotbank_over_roofline"]
    part, stock_part = tps("ff-partial-stream"), tps("stock-partial-mmap")
    if part and stock_part:
        targets["partial_over_stock_partial"] = part / stock_part
        by["ff-partial-stream"]["ratio_to_stock"] = part / stock_part
    return targets


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _gib(value: Any) -> str:
    return "-" if not value else f"{value / 2**30:.2f} GiB"


def markdown(rows: list[dict[str, Any]], targets: dict[str, Any], context: dict[str, Any]) -> str:
    lines = [
        f"Model `{context.get('model_name', '?')}` ({_gib(context.get('model_bytes'))}, routed experts "
        f"{_gib(context.get('expert_bytes'))}) · GPU {context.get('gpu', '?')} · {context.get('cores', '?')} cores · "
        f"process {_gib(context.get('process_bytes'))} (calibrated) · medians of up to {context.get('repeats')} "
        f"interleaved runs, {context.get('gen_tokens')} decoded tokens each",
        "",
        "| run | -ngl | host cgroup | decode tok/s | × stock (same placement, same cgroup) | prompt tok/s | "
        "bank slots | hit rate | miss MiB/token | streamed MiB/token | GPU weights | cgroup peak | runs ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        miss = r.get("miss_bytes_per_token")
        streamed = r.get("bytes_read_per_token")
        lines.append("| " + " | ".join([
            r["config"], str(r.get("gpu_layers") or "-"),
            _gib(r.get("cgroup_bytes")) if r.get("cgroup_bytes") else "none",
            _fmt(r.get("decode_tok_per_s"), ".2f"), _fmt(r.get("ratio_to_stock"), ".2f"),
            _fmt(r.get("prompt_tok_per_s"), ".1f"), _fmt(r.get("bank_slots"), "d"), _fmt(r.get("hit_rate"), ".1%"),
            _fmt(miss / 2**20 if miss is not None else None, ".1f"),
            _fmt(streamed / 2**20 if streamed is not None else None, ".1f"), _gib(r.get("gpu_model_bytes")),
            _gib(r.get("cgroup_peak_bytes")),
            f"{r['ok']}/{r['runs']}" + (f" ({'; '.join(r['statuses'])})" if r.get("statuses") else ""),
        ]) + " |")
    bw = targets.get("read_bandwidth_bytes_per_s")
    lines += ["", f"Parallel direct-read bandwidth of the sidecar, measured in this run: "
              f"{bw / 1e9:.2f} GB/s" if bw else "Parallel direct-read bandwidth: not measured", ""]
    lines.append(f"- flashflex slot banks ÷ stock with mmapped experts, same cgroup: "
                 f"{_fmt(targets.get('slotbank_over_stock_mmap'), '.2f')}× (target ≥ 3×)")
    lines.append(f"- slot-bank time per token ÷ (GPU-resident time + miss bytes ÷ bandwidth): "
                 f"{_fmt(targets.get('slotbank_over_roofline'), '.2f')}× (target ≤ 1.3×)")
    lines.append(f"- partial -ngl, flashflex ÷ stock with the same placement and cgroup: "
                 f"{_fmt(targets.get('partial_over_stock_partial'), '.2f')}×")
    for note in context.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# One run, in its own process


def worker(payload: dict[str, Any]) -> dict[str, Any]:
    """Open the model as the point says and measure it (orchestrator.bench.worker's measurement)."""
    import psutil

    from orchestrator import api, modes, native
    from orchestrator.bench.isolation import PROCESS_SLACK
    from orchestrator.bench.worker import _measure

    native.llama_cpp_module()
    native.devices()  # start the GPU backend first, so the process measured below includes the CUDA context
    out: dict[str, Any] = {}
    if payload.get("calibrate"):
        out["process_bytes"] = psutil.Process().memory_info().rss
        return out
    p = payload["point"]
    options: dict[str, Any] = {"model": Path(payload["model"]), "ctx": payload["ctx"], "ubatch": payload["ubatch"],
                               "batch": max(payload["ubatch"], 32), "threads": payload["threads"], "seed": 0,
                               "gpu_layers": p["gpu_layers"]}
    if p["experts_on_host"]:
        options.update(moe_mode=modes.SLOT_BANK, moe_sidecar=Path(payload["sidecar"]),
                       moe_io_threads=payload["io_threads"])
    else:
        options.update(moe_mode=modes.STOCK)
    if p["flashflex"]:
        overhead = psutil.Process().memory_info().rss + PROCESS_SLACK
        prepared = api.prepare(budget_bytes=p["cgroup_bytes"] or 1 << 50, process_bytes=overhead, **options)
        if prepared.spec.banks is not None:
            out["bank_slots"] = prepared.spec.banks.slots
    else:
        # stock llama.cpp with the placement flashflex computes for these settings (the same -ngl, the experts kept
        # in the CPU buffer type), weights mmapped and not repacked: what a user of llama.cpp would run
        prepared = api.prepare(budget_bytes=1 << 50, **options).stock()
    out["mode"] = prepared.spec.mode
    with prepared.session(repack=p["flashflex"]) as handle:
        spec = {"prompt_tokens": payload["prompt_tokens"], "gen_tokens": payload["gen_tokens"], "seed": 0}
        t0 = time.perf_counter()
        _measure(handle, spec, out)
        out["measure_s"] = time.perf_counter() - t0
        buffers = native.memory_breakdown(handle.llm.ctx) or []
        out["gpu_model_bytes"] = sum(int(b["model"]) for b in buffers if not b.get("host")
                                     and not str(b.get("device", "")).upper().startswith("CPU"))
        out["host_model_bytes"] = sum(int(b["model"]) for b in buffers) - out["gpu_model_bytes"]
        out["buffers"] = buffers
    return out


def run_in_process(payload: dict[str, Any], cgroup_limit: int | None, timeout_s: float, log: Log) -> dict[str, Any]:
    """One worker process, in a memory cgroup of `cgroup_limit` (where the platform has them), page cache dropped."""
    from orchestrator.bench.isolation import MemoryCgroup, cgroup_version, drop_page_cache
    from orchestrator.bench.runs import run_isolated

    cg = MemoryCgroup(f"flashflex-hybrid-{os.getpid()}", cgroup_limit) if cgroup_limit and cgroup_version() else None
    rec: dict[str, Any] = {"cgroup": cg.version if cg else None, "cold_cache": drop_page_cache()}
    return run_isolated([sys.executable, __file__, "--worker", json.dumps(payload)], cg, timeout_s, rec)


def gpu_free_bytes() -> tuple[int | None, str]:
    """(free bytes, name) of GPU 0 from nvidia-smi; (None, '?') without it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free,name", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        free, name = out[0].split(",", 1)
        return int(float(free)) << 20, name.strip()
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None, "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="result directory (bench.json, bench.md)")
    ap.add_argument("--layers", type=int, default=4, help=f"layers of the {PRESET} shape (default 4: about 1.7 GB)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of each configuration (default 3)")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--ubatch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 2))
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--configs", default=",".join(CONFIG_NAMES), help="comma-separated subset of the configurations")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="stop starting runs when fewer seconds than a run takes are left (medians of what ran)")
    ap.add_argument("--work", type=Path, default=None, help="where the model and its sidecar go (default: --out)")
    ap.add_argument("--dry-run", action="store_true", help="print the configurations and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    chosen = [c for c in CONFIGS if c.name in args.configs.split(",")]
    unknown = sorted(set(args.configs.split(",")) - set(CONFIG_NAMES))
    if unknown or not chosen:
        print(f"error: unknown configuration {', '.join(unknown) or repr(args.configs)} — use some of "
              f"{', '.join(CONFIG_NAMES)}", file=sys.stderr)
        return 2
    if args.repeats < 1 or args.layers < 2:
        print("error: --repeats must be >= 1 and --layers >= 2 — the partial configurations need two layers",
              file=sys.stderr)
        return 2
    if args.dry_run:
        return dry_run(args, chosen)
    if args.out is None:
        print("error: --out is required — name a result directory", file=sys.stderr)
        return 2
    return run(args, chosen)


def _tensors(spec) -> list[tuple[str, int]]:
    from orchestrator import synth

    return [(t.name, t.n_bytes) for t in synth.plan_tensors(spec)]


def dry_run(args: argparse.Namespace, chosen: list[Config]) -> int:
    spec = model_spec(args.layers)
    tensors = _tensors(spec)
    total = sum(n for _, n in tensors)
    experts = sum(n for name, n in tensors if "_exps" in name)
    print(f"model: synthetic {PRESET} with {args.layers} layers, {total / 2**30:.2f} GiB "
          f"(routed experts {experts / 2**30:.2f} GiB), its sidecar extracted beside it")
    print(f"runs: {len(chosen)} configurations x {args.repeats} repeats, interleaved; {args.prompt_tokens} prompt + "
          f"{args.gen_tokens} decoded tokens each, ctx {args.ctx}, ubatch {args.ubatch}, page cache dropped first")
    print("host cgroups: process (measured by a calibration run; shown with 1.00 GiB) + 256 MiB + half the host's "
          "routed experts + the host's dense weights (-ngl 99) or half of them (partial -ngl)")
    for p in plan_points(chosen, tensors, args.layers, total, 1 << 30, None):
        limit = f"cgroup {p['cgroup_bytes'] / 2**30:.2f} GiB" if p["cgroup_bytes"] else "no cgroup"
        print(f"  {p['config']}: -ngl {p['gpu_layers']}, {limit} — {p['what']}")
    return 0


def run(args: argparse.Namespace, chosen: list[Config]) -> int:
    from orchestrator import sidecar, synth
    from orchestrator.bench.isolation import direct_read_bandwidth

    started = time.monotonic()
    deadline = started + args.deadline_s if args.deadline_s else None
    out: Path = args.out
    work: Path = args.work or out
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []

    def log(msg: str) -> None:
        print(f"[bench {time.monotonic() - started:6.1f}s] {msg}", flush=True)

    spec = model_spec(args.layers)
    model = work / f"{PRESET}-{args.layers}l.gguf"
    if not model.exists():
        log(f"writing the synthetic model ({synth.estimate_bytes(spec) / 2**30:.2f} GiB) to {model}")
        synth.write_synth_model(spec, model)
    sc = work / f"{model.stem}.sidecar"
    if not (sc / "manifest.json").exists():
        log(f"extracting its sidecar to {sc}")
        sidecar.extract(model, sc)
    tensors = _tensors(spec)
    expert_bytes = sum(n for name, n in tensors if "_exps" in name)
    manifest = sidecar.load_manifest(sc)
    stride = max(t.expert_stride for t in manifest.tensors)
    largest = max(sc.glob("layer-*.bin"), key=lambda p: p.stat().st_size)
    bandwidth = direct_read_bandwidth(largest, args.io_threads, total_bytes=256 << 20, chunk=stride)
    log(f"parallel direct-read bandwidth ({args.io_threads} threads, {stride >> 10} KiB reads): "
        f"{bandwidth / 1e9:.2f} GB/s")
    base = {"model": str(model), "sidecar": str(sc), "ctx": args.ctx, "ubatch": args.ubatch, "threads": args.threads,
            "io_threads": args.io_threads, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens}
    cal = run_in_process({**base, "calibrate": True}, None, 120, log)
    if cal.get("status") != "ok":
        log(f"calibration failed ({cal.get('status')}); assuming 1 GiB for the process")
        notes.append(f"calibration failed ({cal.get('status')}); the process was taken as 1 GiB")
    process_bytes = int(cal.get("process_bytes") or 1 << 30) + (64 << 20)
    free, gpu_name = gpu_free_bytes()
    points = plan_points(chosen, tensors, args.layers, model.stat().st_size, process_bytes, free)
    context = {"model_name": model.name, "model_bytes": model.stat().st_size, "expert_bytes": expert_bytes,
               "gpu": gpu_name, "gpu_free_bytes": free, "cores": os.cpu_count(), "process_bytes": process_bytes,
               "repeats": args.repeats, "gen_tokens": args.gen_tokens, "prompt_tokens": args.prompt_tokens,
               "ctx": args.ctx, "ubatch": args.ubatch, "threads": args.threads, "notes": notes,
               "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    records: list[dict[str, Any]] = []
    for p in points:
        if p["skip"]:
            log(f"{p['config']}: skipped, {p['skip']}")
            notes.append(f"{p['config']} skipped: {p['skip']}")
    runnable = [p for p in points if not p["skip"]]
    longest = 30.0
    for rep in range(args.repeats):
        for p in runnable:
            left = deadline - time.monotonic() if deadline else None
            if left is not None and left < longest * 1.5:
                notes.append(f"stopped at the deadline in repeat {rep + 1} ({left:.0f}s left, a run takes up to "
                             f"{longest:.0f}s)")
                log(notes[-1])
                break
            timeout = min(RUN_TIMEOUT_S, left) if left is not None else RUN_TIMEOUT_S
            rec = {"config": p["config"], "repeat": rep, **p,
                   **run_in_process({**base, "point": p}, p["cgroup_bytes"], timeout, log)}
            longest = max(longest, rec.get("wall_s") or 0.0)
            log(f"{p['config']} #{rep + 1}: {rec['status']}"
                + (f", decode {rec['decode_tok_per_s']:.2f} tok/s" if rec["status"] == "ok" else ""))
            records.append(rec)
            _write(out, records, points, context, bandwidth)
        else:
            continue
        break
    _write(out, records, points, context, bandwidth)
    print((out / "bench.md").read_text())
    return 0


def _write(out: Path, records: list[dict[str, Any]], points: list[dict[str, Any]], context: dict[str, Any],
           bandwidth: float) -> None:
    """bench.json and bench.md from what ran so far (rewritten after every run: a stopped run leaves both)."""
    rows = median_rows(records, [p["config"] for p in points])
    targets = add_ratios(rows, bandwidth)
    (out / "bench.json").write_text(json.dumps({"context": context, "points": points, "medians": rows,
                                                "targets": targets, "runs": records}, indent=1, default=str))
    (out / "bench.md").write_text(markdown(rows, targets, context))


if __name__ == "__main__":
    sys.exit(main())

