"""One benchmark run, in its own process (so a memory cgroup can hold it): `python -m orchestrator.bench.worker
'<json>'`. Prints one JSON object on its last stdout line. Started by orchestrator.bench."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psutil

from orchestrator import modes


def main(arg: str) -> None:
    payload = json.loads(arg)
    point, spec = payload["point"], payload["spec"]
    from orchestrator import native, runner

    model = Path(spec["model"])
    native.llama_cpp_module()  # import llama_cpp before measuring what the process itself occupies
    settings = runner.GenerationSettings(model=model, ctx=spec["ctx"], batch=max(spec["ubatch"], 32),
                                         ubatch=spec["ubatch"], threads=spec["threads"], seed=spec["seed"])
    out: dict = {}
    planned = point["mode"] in modes.PLANNED_BENCH_MODES  # the others are stock baselines
    ex = _execution(point, spec, model, out) if planned else runner.Execution()
    repack = point["mode"] != modes.STOCK_MMAP
    kwargs = {"use_mmap": False} if point["mode"] == modes.RESIDENT else {}
    t0 = time.perf_counter()
    with runner.session(settings, ex, repack=repack, **kwargs) as llm:
        out["_load_s"] = time.perf_counter() - t0
        _measure(llm, settings, spec, ex, out)
    print(json.dumps(out), flush=True)


def _execution(point: dict, spec: dict, model: Path, out: dict):
    """The Execution of a flashflex point, through the same contract as `flashflex run` (a RunConfig →
    runner.execution_for_config), planned for what the cgroup leaves after this process."""
    from orchestrator import runner
    from orchestrator.bench.isolation import PROCESS_SLACK
    from orchestrator.config import load_run_config

    # The cgroup holds the whole process: plan with what is left after the interpreter and libraries.
    overhead = psutil.Process().memory_info().rss + PROCESS_SLACK
    budget = (point["budget_bytes"] or 1 << 50) - overhead
    settings = {"model.path": model, "budget.size": f"{budget}B", "context.ctx": spec["ctx"],
                "context.ubatch": spec["ubatch"]}
    banked = modes.is_banked(point["mode"])
    if banked:
        settings.update({"moe.mode": point["mode"], "moe.sidecar": spec["sidecar"],
                         "moe.slot_bank": point["slot_bank"], "moe.io_threads": spec["io_threads"],
                         "moe.prefetch": point.get("prefetch", "none"), "moe.trace": point.get("trace"),
                         "moe.trace_force": True,  # the sweep owns its result directory
                         "moe.prefetch_ranks": point.get("prefetch_ranks"),
                         "prefetch.threads": max(1, point.get("prefetch_threads") or 1)})
    else:
        settings.update({"prefetch.threads": point["prefetch_threads"], "prefetch.window": spec["window"]})
    if spec.get("rpc"):
        settings["rpc.servers"] = spec["rpc"]
    ex = runner.execution_for_config(load_run_config(None, settings), model)
    plan = ex.budget_plan
    assert plan is not None
    streamed = plan.estimates.dense_streamed_bytes_per_token
    out.update(planned_budget_bytes=budget, process_overhead_bytes=overhead, resident_bytes=plan.resident_bytes,
               kv_cache_bytes=plan.reservations.kv_cache_bytes, compute_bytes=plan.reservations.compute_bytes,
               overheads_source=plan.reservations.source,
               streamed_bytes_per_token=streamed if ex.plan is not None or not banked else 0)
    if banked:
        out.update(slot_bank=point["slot_bank"] if point["mode"] == modes.ORACLE_ALL_HIT else ex.moe.slots,
                   bank_slots=ex.moe.slots,
                   moe_prefetch_ranks=ex.moe.prefetch_ranks if ex.moe.prefetch == "router-lookahead" else None,
                   planned_hit_rate=plan.estimates.expected_hit_rate)
    return ex


def _measure(llm, settings, spec: dict, ex, out: dict) -> None:
    from orchestrator import exact, native, runner

    plan = ex.plan
    load_s = out.pop("_load_s", None)
    # Teacher-forced pseudo-random tokens: the same work for every mode, no early end of text.
    tokens = exact.teacher_tokens(spec["prompt_tokens"] + spec["gen_tokens"], llm.n_vocab(), spec["seed"])
    prompt, gen = tokens[: spec["prompt_tokens"]], tokens[spec["prompt_tokens"]:]
    banked = ex.moe is not None

    def reset() -> None:
        if plan is not None:
            native.model_stats_reset(llm.model)
        if banked:
            native.moe_stats_reset(llm.model)

    reset()
    wire = runner.RPCTraffic(ex)
    t1 = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - t1
    wire.phase("prompt", len(prompt))
    reset()
    t2 = time.perf_counter()
    for tok in gen:
        llm.eval([tok])
    decode_s = time.perf_counter() - t2
    wire.phase("decode", len(gen))
    if wire.phases:
        out.update(rpc_traffic=wire.phases, rpc_bytes_per_token=wire.phases["decode"]["bytes_per_token"])
    stream = native.model_stats(llm.model) if plan is not None else None
    moe = native.moe_stats(llm.model) if banked else None
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
        peak_rss_bytes=runner.peak_rss_bytes(), stream=stream, streaming=plan is not None,
        bytes_read_per_token=(stream["bytes_read"] / len(gen)) if stream else None,
        wait_s=stream["wait_seconds"] if stream else None,
    )


if __name__ == "__main__":
    main(sys.argv[1])
