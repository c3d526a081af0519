"""A run, from a RunConfig to tokens: one forward pass.

    inputs = gather(cfg)                          run.inputs: everything read from disk and the machine, once
    plan   = make_plan(request, inputs)           orchestrator.planner: pure
    spec   = RuntimeSpec.from_plan(plan, inputs)  run.spec: pure; the one contract with the native side
    handle = Prepared(...).session()              run.handle: open (run.loader) and close, one lifecycle
    result = generate(handle)                     run.execution: tokens, timings, statistics

orchestrator.api.prepare strings the first three together; `run`, `verify-exact`, `serve`, `chat`, the Python API
and the benchmarks all go through it.
"""
