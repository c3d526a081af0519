"""One benchmark run, in its own process (so a memory cgroup can hold it): `python -m orchestrator.bench.worker
'<json>'`. Prints one JSON object on its last stdout line. Started by orchestrator.bench."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from orchestrator import modes


def main(arg: str) -> None:
    payload = json.loads(arg)
    point, spec = payload["point"], payload["spec"]
    from orchestrator import native

    native.llama_cpp_module()  # import llama_cpp before measuring what the process itself occupies
    out: dict = {}
    prepared = _prepare(point, spec, out)
    repack = point["mode"] != modes.STOCK_MMAP
    t0 = time.perf_counter()
    with prepared.session(repack=repack) as handle:
        out["_load_s"] = time.perf_counter() - t0
        _measure(handle, spec, out)
    print(json.dumps(out), flush=True)


def _prepare(point: dict, spec: dict, out: dict):
    """The Prepared run of a point, through the same path as `flashflex run` (api.prepare): a flashflex point planned
    for its cgroup with this process's own memory reserved in the plan; a stock baseline as llama.cpp opens it."""
    from orchestrator import api
    from orchestrator.bench.isolation import PROCESS_SLACK

    options: dict[str, Any] = {"model": Path(spec["model"]), "ctx": spec["ctx"], "ubatch": spec["ubatch"],
                               "batch": max(spec["ubatch"], 32), "threads": spec["threads"], "seed": spec["seed"]}
    if point["mode"] not in modes.PLANNED_BENCH_MODES:  # the stock baselines: nothing planned
        return api.prepare_stock(use_mmap=False if point["mode"] == modes.RESIDENT else None, **options)
    # The cgroup holds the whole process: the interpreter and libraries are a reservation of the plan.
    overhead = psutil.Process().memory_info().rss + PROCESS_SLACK
    budget = point["budget_bytes"] or 1 << 50
    if modes.is_banked(point["mode"]):
        options.update(moe_mode=point["mode"], moe_sidecar=spec["sidecar"], moe_slot_bank=point["slot_bank"],
                       moe_io_threads=spec["io_threads"], moe_prefetch=point.get("prefetch", "none"),
                       moe_trace=point.get("trace"), moe_trace_force=True,  # the sweep owns its result directory
                       moe_prefetch_ranks=point.get("prefetch_ranks"),
                       prefetch_threads=max(1, point.get("prefetch_threads") or 1))
    else:
        options.update(prefetch_threads=point["prefetch_threads"], prefetch_window=spec["window"],
                       prefetch_mirror=spec.get("mirror", True), prefetch_repack=spec.get("repack", False))
    if spec.get("rpc"):
        options["rpc"] = spec["rpc"]
    prepared = api.prepare(budget_bytes=budget, process_bytes=overhead, own_decodes=True, **options)
    plan = prepared.plan
    assert plan is not None
    banks = prepared.spec.banks
    out.update(planned_budget_bytes=budget - overhead, process_overhead_bytes=overhead,
               resident_bytes=plan.resident_bytes, kv_cache_bytes=plan.reservations.kv_cache_bytes,
               compute_bytes=plan.reservations.compute_bytes, overheads_source=plan.reservations.source,
               streamed_bytes_per_token=plan.estimates.dense_streamed_bytes_per_token
               if prepared.spec.stream is not None or banks is None else 0)
    if prepared.spec.stream is not None and point.get("prefetch_threads") == "auto":
        out.update(prefetch_threads=prepared.spec.stream.prefetch_threads, prefetch_threads_auto=True)
    if banks is not None:
        out.update(slot_bank=point["slot_bank"] if point["mode"] == modes.ORACLE_ALL_HIT else banks.slots,
                   bank_slots=banks.slots, moe_prefetch_ranks=banks.prefetch_ranks,
                   planned_hit_rate=plan.estimates.expected_hit_rate)
    return prepared


def _measure(handle, spec: dict, out: dict) -> None:
    from orchestrator import exact
    from orchestrator.llamacpp import disk_read_bytes, peak_rss_bytes
    from orchestrator.run.execution import RPCTraffic, reset_stats, runtime_stats

    llm, run_spec = handle.llm, handle.prepared.spec
    load_s = out.pop("_load_s", None)
    # Teacher-forced pseudo-random tokens: the same work for every mode, no early end of text.
    tokens = exact.teacher_tokens(spec["prompt_tokens"] + spec["gen_tokens"], llm.n_vocab(), spec["seed"])
    prompt, gen = tokens[: spec["prompt_tokens"]], tokens[spec["prompt_tokens"]:]
    reset_stats(llm, run_spec)
    wire = RPCTraffic(run_spec)
    t1 = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - t1
    wire.phase("prompt", len(prompt))
    reset_stats(llm, run_spec)
    disk0 = disk_read_bytes()
    t2 = time.perf_counter()
    for tok in gen:
        llm.eval([tok])
    decode_s = time.perf_counter() - t2
    disk1 = disk_read_bytes()
    if disk0 is not None and disk1 is not None:  # every run, stock's page-cache misses included
        out["disk_read_bytes_per_token"] = (disk1 - disk0) / len(gen)
    wire.phase("decode", len(gen))
    if wire.phases:
        out.update(rpc_traffic=wire.phases, rpc_bytes_per_token=wire.phases["decode"]["bytes_per_token"])
    stream, moe = runtime_stats(llm, run_spec)
    if moe is not None:
        moe.pop("layers", None)  # per-layer detail stays out of the benchmark records
        out.update(moe=moe, hit_rate=moe["hit_rate"], miss_bytes_per_token=moe["bytes_read"] / len(gen),
                   misses_per_token=moe["misses"] / len(gen),
                   trace_share_of_decode=moe["trace_seconds"] / decode_s,
                   miss_bandwidth_bytes_per_s=moe["bytes_read"] / moe["install_seconds"]
                   if moe["install_seconds"] > 0 else None)
    out.update(
        load_s=load_s, prompt_s=prompt_s, decode_s=decode_s,
        prompt_tok_per_s=len(prompt) / prompt_s, decode_tok_per_s=len(gen) / decode_s,
        peak_rss_bytes=peak_rss_bytes(), stream=stream, streaming=run_spec.stream is not None,
        bytes_read_per_token=(stream["bytes_read"] / len(gen)) if stream else None,
        wait_s=stream["wait_seconds"] if stream else None,
    )


if __name__ == "__main__":
    main(sys.argv[1])
