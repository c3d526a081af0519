"""Load on `flashflex serve`: many concurrent OpenAI clients against a slot-bank MoE model under a budget.

The server runs in a memory cgroup whose limit is the budget plus what the interpreter and libraries take
(where cgroups are available: root on Linux). N clients (the real `openai` package, one thread each) send chat
completions for the given duration, alternating streaming and not, max_tokens drawn from 16..64; then every
request still in flight is waited for. Reported: requests sent, completed, failed (with their HTTP status),
lost (no answer and no error: must be 0), time to first token p50/p95 (streaming), completion tokens per second
over the run, whether the server stayed up, its peak memory against the limit.

    python scripts/bench_serve_load.py --clients 32 --seconds 60 --out bench-results/serve-load

Writes results.json and summary.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from orchestrator import sidecar, synth
from orchestrator.bench.isolation import MemoryCgroup, cgroup_version
from orchestrator.bench.servers import free_port
from orchestrator.paths import cache_root
from orchestrator.sizes import format_size, parse_size

# A mid-sized MoE (qwen3moe shape, 8 layers, 64 experts of which 8 per token): big enough that a bank of a
# fraction of the experts misses often, small enough that 32 clients get answers inside a minute on 2 cores.
MODEL = dict(n_layer=8, n_embd=512, n_head=8, n_head_kv=2, head_dim=64, n_expert=64, n_expert_used=8,
             expert_ffn=256, n_vocab=4096, quant="q4_0")
PROCESS_OVERHEAD = 512 << 20  # interpreter, numpy, FastAPI, uvicorn, llama_cpp's libraries (measured ~400 MiB)


def model_and_sidecar() -> tuple[Path, Path]:
    path = cache_root() / "models" / "synth" / "serve-load-moe.gguf"
    sc = path.with_suffix(".sidecar")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        synth.write_synth_model(synth.preset("tiny-qwen3moe", **MODEL), path)
    if not sc.exists():
        sidecar.extract(path, sc)
    return path, sc


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def client_loop(base: str, model: str, until: float, rng: random.Random, out: list, lock: threading.Lock) -> None:
    from openai import APIConnectionError, APIStatusError, APITimeoutError, OpenAI

    client = OpenAI(base_url=base + "/v1", api_key="unused", timeout=600, max_retries=0)
    i = 0
    while time.monotonic() < until:
        stream = i % 2 == 0
        i += 1
        max_tokens = rng.randint(16, 64)
        messages = [{"role": "user", "content": f"request {rng.random():.6f}: tell me about the model"}]
        rec = {"stream": stream, "max_tokens": max_tokens, "sent": time.monotonic()}
        try:
            if stream:
                tokens, first = 0, None
                finish = None
                for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                            temperature=0, stream=True):
                    if chunk.choices and chunk.choices[0].delta.content:
                        tokens += 1
                        first = first or time.monotonic()
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                rec.update(ok=finish is not None, tokens=tokens, finish=finish,
                           ttft=(first - rec["sent"]) if first else None)
            else:
                r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                   temperature=0)
                rec.update(ok=r.choices[0].finish_reason is not None, tokens=r.usage.completion_tokens,
                           finish=r.choices[0].finish_reason)
        except APIStatusError as exc:
            rec.update(ok=False, status=exc.status_code, error=str(exc)[:200])
        except (APIConnectionError, APITimeoutError) as exc:
            rec.update(ok=False, status=None, error=f"{type(exc).__name__}: {exc}"[:200])
        rec["done"] = time.monotonic()
        with lock:
            out.append(rec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--budget", default=None, help="the server's budget (default: half the model file)")
    ap.add_argument("--out", type=Path, default=Path("bench-results/serve-load"))
    args = ap.parse_args()
    path, sc = model_and_sidecar()
    budget = parse_size(args.budget) if args.budget else path.stat().st_size // 2
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cgroup = None
    if cgroup_version():
        cgroup = MemoryCgroup(f"flashflex-serve-load-{os.getpid()}", budget + PROCESS_OVERHEAD)
    cmd = [sys.executable, "-m", "orchestrator", "serve", "-m", str(path), "--moe-sidecar", str(sc), "--moe-mode",
           "slot-bank", "--budget", f"{budget}B", "--ctx", "1024", "--ubatch", "32", "--port", str(port),
           "--draft", "none"]  # the load on the banks, not drafting (random weights repeat a token: drafts always hit)
    log_path = args.out / "server.log"
    args.out.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as server_log:
        proc = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT,
                                preexec_fn=cgroup.preexec if cgroup else None)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if json.loads(r.read())["status"] == "ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                print(log_path.read_text(), file=sys.stderr)
                return 1
            time.sleep(0.3)
        records: list[dict] = []
        lock = threading.Lock()
        t0 = time.monotonic()
        until = t0 + args.seconds
        threads = [threading.Thread(target=client_loop, args=(base, path.name, until, random.Random(i), records, lock))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        alive = proc.poll() is None
        with urllib.request.urlopen(base + "/flashflex/stats", timeout=10) as r:
            stats = json.loads(r.read())["models"][path.name]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    ok = [r for r in records if r.get("ok")]
    failed = [r for r in records if not r.get("ok")]
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
    result = {
        "clients": args.clients, "seconds": args.seconds, "wall_seconds": wall, "model": str(path),
        "model_bytes": path.stat().st_size, "budget_bytes": budget,
        "cgroup_limit_bytes": cgroup.limit if cgroup else None,
        "cgroup_peak_bytes": cgroup.peak_bytes() if cgroup else None,
        "oom_killed": cgroup.oom_killed() if cgroup else None,
        "sent": len(records), "completed": len(ok), "failed": len(failed),
        "failed_statuses": sorted({str(r.get("status")) for r in failed}),
        "lost": sum(1 for r in records if "ok" not in r),
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
        "completion_tokens": sum(r.get("tokens", 0) for r in ok),
        "tok_per_s": sum(r.get("tokens", 0) for r in ok) / wall if wall else None,
        "server_alive_after": alive, "bank_hit_rate": stats.get("bank_hit_rate"),
        "slots": (stats.get("moe") or {}).get("slots"), "mode": stats.get("mode"),
    }
    if cgroup:
        cgroup.remove()
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    table = (
        "| clients | run | sent | completed | failed | lost | TTFT p50 | TTFT p95 | tok/s | server up "
        "| peak / limit |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {args.clients} | {args.seconds:.0f} s (+{wall - args.seconds:.0f} s draining) | {result['sent']} | "
        f"{result['completed']} | {result['failed']} {result['failed_statuses'] if failed else ''} | "
        f"{result['lost']} | {_s(result['ttft_p50_s'])} | {_s(result['ttft_p95_s'])} | {result['tok_per_s']:.1f} | "
        f"{'yes' if alive else 'NO'} | "
        + (f"{format_size(result['cgroup_peak_bytes'])} / {format_size(result['cgroup_limit_bytes'])}"
           if cgroup else "no cgroup") + " |\n")
    (args.out / "summary.md").write_text(table)
    print(json.dumps(result, indent=2))
    print(table)
    return 0 if alive and not result["lost"] else 1


def _s(x: float | None) -> str:
    return f"{x:.2f} s" if x is not None else "-"


if __name__ == "__main__":
    sys.exit(main())
