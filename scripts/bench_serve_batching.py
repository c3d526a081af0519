"""Serving many clients from one budget: llama.cpp's server under flashflex's plan (`flashflex serve --engine
llama-server`, dense streaming under a memory cgroup of about half the model) against stock llama-server (mmap, weights
not repacked so they stay in the page cache: repacking copies them all into process memory) with the same --parallel
and flags in the same cgroup, at 1, 4 and 8 concurrent greedy clients of fixed lengths.

Each client sends one streaming completion (a short distinct prompt, `--tokens` tokens with end-of-text ignored), all
at once. Reported per point: aggregate generated tokens/s (all tokens over the wall time from the first request to
the last token), time to first token and inter-token latency p50/p95, bytes the server read from disk per generated
token (/proc/PID/io read_bytes, the page cache dropped before each run where we may), the cgroup's peak memory.
Runs are interleaved (for each repetition: every client count, flashflex then stock) and each figure is the median of
the repetitions; ratios are against stock and against 1 client, measured in the same run.

    python scripts/bench_serve_batching.py --clients 1,4,8 --reps 3 --out bench-results/serve-batching

Writes results.json (every run) and summary.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from orchestrator import synth
from orchestrator.bench.isolation import MemoryCgroup, cgroup_version, drop_page_cache
from orchestrator.bench.servers import free_port, stop, wait_health
from orchestrator.sizes import format_size

PROCESS_OVERHEAD = 384 << 20  # the flashflex wrapper (Python) + llama-server's own heap, HTTP threads, libraries


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def one_request(client, i: int, tokens: int) -> dict:
    sent = time.monotonic()
    stamps: list[float] = []
    for chunk in client.completions.create(model="m", prompt=f"Client {i} says:", max_tokens=tokens,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.monotonic())
    return {"sent": sent, "stamps": stamps, "client": i}


def one_client(base: str, i: int, tokens: int, out: list, lock: threading.Lock, until: float | None = None) -> None:
    """One request (`until` None), or requests one after another until the monotonic time `until`: a 503 (the
    server's wait queue full) is retried after its Retry-After and counted as `busy`; any other error, or an answer
    with fewer than `tokens` tokens, is a lost request."""
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=base + "/v1", api_key="unused", timeout=1800, max_retries=0)
    while True:
        try:
            record = one_request(client, i, tokens)
            record["lost"] = len(record["stamps"]) < tokens
        except openai.APIStatusError as e:
            if e.status_code != 503:
                record = {"client": i, "stamps": [], "lost": True, "error": f"HTTP {e.status_code}"}
            else:
                with lock:
                    out.append({"client": i, "stamps": [], "busy": True, "lost": False})
                time.sleep(float(e.response.headers.get("Retry-After", "1")))
                if until is None or time.monotonic() < until:
                    continue
                return
        except openai.APIError as e:  # connection reset, a stream cut short
            record = {"client": i, "stamps": [], "lost": True, "error": type(e).__name__}
        with lock:
            out.append(record)
        if until is None or time.monotonic() >= until:
            return


def server_read_bytes(proc: subprocess.Popen) -> int:
    """Bytes llama-server (the process, or the flashflex wrapper's child) has read from storage so far."""
    p = psutil.Process(proc.pid)
    children = p.children()
    return (children[0] if children else p).io_counters().read_bytes


def run_point(engine: str, model: Path, budget: int, clients: int, tokens: int, ctx: int, threads: int,
              out_dir: Path, ubatch: int = 32, parallel: int | None = None, duration: float | None = None) -> dict:
    """One server (`parallel` slots: as many as clients unless given) and `clients` concurrent clients: one request
    each, or requests back to back for `duration` seconds."""
    parallel = parallel or clients
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # flashflex: the plan's budget; stock: a budget above the model (the planner picks stock, mmap), same cgroup
    if engine.startswith("flashflex"):
        # flashflex-nogather: the same without the window a request waking the idle server waits for others
        # (server.gather_ms 0, a serve file), the A/B of that window; flashflex-repacked: the CPU backend's
        # repacked layout kept where weights stream (prefetch.repack), the A/B of the file's layout
        served = []
        variants = {"flashflex-nogather": "server:\n  gather_ms: 0\nmodels:\n  - {}\n",
                    "flashflex-repacked": "models:\n  - prefetch: {repack: true}\n"}
        if engine in variants:
            served = [str(out_dir / f"{engine}.yaml")]
            (out_dir / f"{engine}.yaml").write_text(variants[engine])
        cmd = [sys.executable, "-m", "orchestrator", "serve", *served, "--engine", "llama-server", "-m", str(model),
               "--budget", f"{budget}B", "--ctx", str(ctx), "--ubatch", str(ubatch), "--parallel", str(parallel),
               "--threads", str(threads), "--port", str(port),
               "--draft", "none"]  # batching against stock's batching: drafting is measured by bench speculative
    else:  # stock llama-server from the same build, the same flags (one micro-batch per decode call, as flashflex
        # serve runs it); mmap, weights not repacked (page cache only)
        from orchestrator import tools

        cmd = [str(tools.locate("llama-server")), "-m", str(model), "-c", str(ctx * parallel), "-b", str(ubatch),
               "-ub", str(ubatch), "-t", str(threads), "-tb", str(threads), "-fit", "off", "-ngl", "0",
               "-np", str(parallel), "-kvu",
               "-cram", "0", "--no-repack", "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
    cgroup = MemoryCgroup(f"ff-serve-batch-{os.getpid()}-{engine}-{clients}", budget + PROCESS_OVERHEAD) \
        if cgroup_version() else None
    dropped = drop_page_cache()
    log = out_dir / f"server-{engine}-{clients}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=cgroup.preexec if cgroup else None)
    try:
        wait_health(base, proc, log)
        read0 = server_read_bytes(proc)
        records: list[dict] = []
        lock = threading.Lock()
        t0 = time.monotonic()
        until = t0 + duration if duration else None
        workers = [threading.Thread(target=one_client, args=(base, i, tokens, records, lock, until))
                   for i in range(clients)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.monotonic() - t0
        read = server_read_bytes(proc) - read0
        alive = proc.poll() is None
    finally:
        stop(proc)
    generated = sum(len(r["stamps"]) for r in records)
    ttft = [r["stamps"][0] - r["sent"] for r in records if r["stamps"]]
    itl = [b - a for r in records for a, b in zip(r["stamps"], r["stamps"][1:])]
    point = {
        "engine": engine, "clients": clients, "tokens_per_client": tokens, "generated": generated,
        "wall_s": wall, "tok_per_s": generated / wall if wall else None,
        "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
        "itl_p50_s": pct(itl, 0.5), "itl_p95_s": pct(itl, 0.95),
        "read_bytes": read, "read_bytes_per_token": read / generated if generated else None,
        "cgroup_limit_bytes": cgroup.limit if cgroup else None,
        "cgroup_peak_bytes": cgroup.peak_bytes() if cgroup else None,
        "oom_killed": cgroup.oom_killed() if cgroup else None,
        "page_cache_dropped": dropped, "server_alive_after": alive,
        "parallel": parallel, "duration_s": duration,
        "requests": len([r for r in records if not r.get("busy")]),
        "busy_503": len([r for r in records if r.get("busy")]),
        "lost": len([r for r in records if r["lost"]]),
        "errors": sorted({r["error"] for r in records if r.get("error")}),
    }
    if cgroup:
        cgroup.remove()
    return point


def ensure_sidecar(model: Path) -> None:
    """A MoE model's routed experts extracted beside it (where `flashflex serve` looks), once: flashflex serves it
    from slot banks; stock reads the experts through mmap as always."""
    from orchestrator import sidecar
    from orchestrator.modelfile.reader import read_model_table
    from orchestrator.modelfile.table import Role

    if not any(t.role is Role.EXPERT_ROUTED for t in read_model_table(model).tensors):
        return
    if not sidecar.default_path(model).is_dir():
        subprocess.run([sys.executable, "-m", "orchestrator", "sidecar", "extract", str(model)], check=True)


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(points: list[dict], clients: list[int], model: Path, budget: int, started: str) -> str:
    rows = []
    med: dict[tuple[str, int], dict] = {}
    engines = list(dict.fromkeys(p["engine"] for p in points))
    for engine in engines:
        for n in clients:
            runs = [p for p in points if p["engine"] == engine and p["clients"] == n]
            med[engine, n] = {k: median_of(runs, k) for k in ("tok_per_s", "ttft_p50_s", "ttft_p95_s", "itl_p50_s",
                                                              "itl_p95_s", "read_bytes_per_token",
                                                              "cgroup_peak_bytes")}
            med[engine, n]["runs"] = len(runs)
            for key in ("requests", "lost", "busy_503"):
                med[engine, n][key] = sum(p.get(key) or 0 for p in runs)
    one = clients[0]
    for engine in engines:
        for n in clients:
            m = med[engine, n]
            vs_one = (m["tok_per_s"] / med[engine, one]["tok_per_s"]) \
                if m["tok_per_s"] and med[engine, one]["tok_per_s"] else None
            stock = med.get(("stock", n), {}).get("tok_per_s")
            vs_stock = m["tok_per_s"] / stock if m["tok_per_s"] and stock else None
            rows.append(f"| {engine} | {n} | {_x(m['tok_per_s'], '')} | {_x(vs_one)} | "
                        f"{_x(vs_stock)} | {_s(m['ttft_p50_s'])} / {_s(m['ttft_p95_s'])} | "
                        f"{_s(m['itl_p50_s'])} / {_s(m['itl_p95_s'])} | "
                        f"{format_size(int(m['read_bytes_per_token'] or 0))} | "
                        f"{format_size(int(m['cgroup_peak_bytes'] or 0))} | {m['requests']} / {m['lost']} / "
                        f"{m['busy_503']} | {m['runs']} |")
    return (f"Model {model.name} ({format_size(model.stat().st_size)}), cgroup {format_size(budget)} + "
            f"{format_size(PROCESS_OVERHEAD)} for the processes; started {started}.\n\n"
            "| engine | clients | tok/s (median) | vs 1 client | vs stock | TTFT p50 / p95 | inter-token p50 / p95 "
            "| read per token | peak memory | requests / lost / 503 | runs |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def plot(points: list[dict], clients: list[int], path: Path) -> None:
    """Aggregate tok/s and TTFT p50 against clients, both engines (medians), into one PNG."""
    from orchestrator.plotting import pyplot

    plt = pyplot(print)
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for engine, style in (("flashflex", "o-"), ("stock", "s--"), ("flashflex-nogather", "^:"),
                          ("flashflex-repacked", "d-.")):
        xs = [n for n in clients if any(p["engine"] == engine and p["clients"] == n for p in points)]
        runs = {n: [p for p in points if p["engine"] == engine and p["clients"] == n] for n in xs}
        left.plot(xs, [median_of(runs[n], "tok_per_s") or 0 for n in xs], style, label=engine)
        right.plot(xs, [median_of(runs[n], "ttft_p50_s") or 0 for n in xs], style, label=engine)
    left.set(xlabel="concurrent clients", ylabel="aggregate tok/s (median)", xscale="log", xticks=clients)
    right.set(xlabel="concurrent clients", ylabel="time to first token p50 (s)", xscale="log", xticks=clients)
    for ax in (left, right):
        ax.set_xticklabels([str(n) for n in clients])
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _x(x: float | None, unit: str = "x") -> str:
    return f"{x:.2f}{unit}" if x is not None else "-"


def _s(x: float | None) -> str:
    return f"{x:.2f} s" if x is not None else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="dense-7b-q4_0", help="a synthetic model preset (orchestrator.synth)")
    ap.add_argument("--model", type=Path, default=None, help="a GGUF instead of the preset")
    ap.add_argument("--budget-share", type=float, default=0.5, help="the cgroup's share of the model's size")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=128, help="context per client")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--engines", default="flashflex,stock")
    ap.add_argument("--ubatch", type=int, default=32, help="micro-batch of both servers: the prompts of clients "
                    "arriving together are processed in passes of this many tokens (one weight pass each)")
    ap.add_argument("--parallel", type=int, default=None,
                    help="slots of both servers (default: as many as clients)")
    ap.add_argument("--duration", type=float, default=None,
                    help="each client sends requests back to back for this many seconds (a 503 is retried after "
                    "its Retry-After) instead of one request")
    ap.add_argument("--out", type=Path, default=Path("bench-results/serve-batching"))
    args = ap.parse_args()
    model = args.model or synth.cached_preset(args.preset)
    ensure_sidecar(model)
    budget = int(model.stat().st_size * args.budget_share)
    clients = [int(x) for x in args.clients.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    points: list[dict] = []
    for rep in range(args.reps):
        for n in clients:
            for engine in args.engines.split(","):
                p = run_point(engine, model, budget, n, args.tokens, args.ctx, args.threads, args.out, args.ubatch,
                              args.parallel, args.duration)
                p["ubatch"] = args.ubatch
                p["rep"] = rep
                points.append(p)
                print(json.dumps(p), flush=True)
                (args.out / "results.json").write_text(json.dumps({"model": str(model), "budget_bytes": budget,
                                                                   "started": started, "points": points}, indent=1))
    summary = summarize(points, clients, model, budget, started)
    (args.out / "summary.md").write_text(summary)
    plot(points, clients, args.out / "serve-batching.png")
    print(summary)
    return 0 if all(p["server_alive_after"] and not p["lost"] for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
