"""One benchmark run, in its own process (so a memory cgroup can hold it): `python -m orchestrator.bench_worker
'<json>'`. Prints one JSON object on its last stdout line. Started by orchestrator.bench."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psutil


def main(arg: str) -> None:
    payload = json.loads(arg)
    point, spec = payload["point"], payload["spec"]
    from orchestrator import exact, native, runner
    from orchestrator.bench import PROCESS_SLACK
    from orchestrator.config import PrefetchConfig
    from orchestrator.modelfile.reader import read_model_table
    from orchestrator.planner import make_plan

    model = Path(spec["model"])
    native.llama_cpp_module()  # import llama_cpp before measuring what the process itself occupies
    settings = runner.GenerationSettings(model=model, ctx=spec["ctx"], batch=max(spec["ubatch"], 32),
                                         ubatch=spec["ubatch"], threads=spec["threads"], seed=spec["seed"])
    plan = None
    out: dict = {}
    if point["mode"] == "flashflex":
        # The cgroup holds the whole process: plan with what is left after the interpreter and libraries.
        overhead = psutil.Process().memory_info().rss + PROCESS_SLACK
        budget = (point["budget_bytes"] or 1 << 50) - overhead
        table = read_model_table(model)
        plan = make_plan(table, budget, ctx=spec["ctx"], ubatch=spec["ubatch"],
                         prefetch=PrefetchConfig(threads=point["prefetch_threads"], window=spec["window"]))
        out.update(planned_budget_bytes=budget, process_overhead_bytes=overhead,
                   resident_bytes=plan.resident_bytes,
                   streamed_bytes_per_token=plan.estimates.dense_streamed_bytes_per_token)
        if plan.fits_entirely or not runner.streamed_tensors(plan):
            plan = None  # the model fits: flashflex runs the stock path
    repack = point["mode"] != "stock-mmap"
    t0 = time.perf_counter()
    llm = runner.open_model(settings, plan, repack=repack)
    load_s = time.perf_counter() - t0
    # Teacher-forced pseudo-random tokens: the same work for every mode, no early end of text.
    tokens = exact.teacher_tokens(spec["prompt_tokens"] + spec["gen_tokens"], llm.n_vocab(), spec["seed"])
    prompt, gen = tokens[: spec["prompt_tokens"]], tokens[spec["prompt_tokens"]:]
    if plan is not None:
        native.model_stats_reset(llm.model)
    t1 = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - t1
    if plan is not None:
        native.model_stats_reset(llm.model)
    t2 = time.perf_counter()
    for tok in gen:
        llm.eval([tok])
    decode_s = time.perf_counter() - t2
    stream = native.model_stats(llm.model) if plan is not None else None
    llm.close()
    out.update(
        load_s=load_s, prompt_s=prompt_s, decode_s=decode_s,
        prompt_tok_per_s=len(prompt) / prompt_s, decode_tok_per_s=len(gen) / decode_s,
        peak_rss_bytes=runner.peak_rss_bytes(), stream=stream, streaming=plan is not None,
        bytes_read_per_token=(stream["bytes_read"] / len(gen)) if stream else None,
        wait_s=stream["wait_seconds"] if stream else None,
    )
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
