"""Shortcuts the tests share: a Plan from a table and plain settings, a Prepared run from a RunConfig or a Plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.config import RunConfig, load_run_config
from orchestrator.modelfile.table import ModelTable
from orchestrator.planner import Plan, PlanInputs, PlanRequest, make_plan
from orchestrator.run.handle import Prepared
from orchestrator.run.inputs import RunInputs
from orchestrator.run.settings import GenerationSettings
from orchestrator.run.spec import RuntimeSpec


def _get(obj: Any, name: str, default: Any) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def plan_table(table: ModelTable, budget: int, *, ctx: int = 2048, ubatch: int = 512, prefetch: Any = None,
               moe: Any = None, read_bandwidth: int | str | None = None, overheads: Any = None,
               read_probe: dict[int, float] | None = None) -> Plan:
    """make_plan for `table` under `budget` bytes; `prefetch` and `moe` are config sections or dicts (missing keys
    take make_plan's defaults: one prefetch thread, an auto window, MoE mode auto)."""
    from orchestrator.sizes import parse_rate

    rate = read_bandwidth if read_bandwidth is not None else _get(prefetch, "read_bandwidth", PlanRequest.bandwidth)
    threads = _get(prefetch, "threads", 1)
    window = _get(prefetch, "window", "auto")
    request = PlanRequest(
        budget_bytes=budget, ctx=ctx, ubatch=ubatch, threads=None if threads == "auto" else int(threads),
        window=None if window in (None, "auto") else int(window), direct_io=str(_get(prefetch, "direct_io", "auto")),
        mirrored_ring=bool(_get(prefetch, "mirror", True)), repack=bool(_get(prefetch, "repack", False)),
        bandwidth=rate if isinstance(rate, int) else parse_rate(rate), mode=str(_get(moe, "mode", "auto") or "auto"),
        slot_bank=_get(moe, "slot_bank", None), topk=_get(moe, "topk", None))
    return make_plan(request, PlanInputs(table=table, overheads=overheads, read_probe=read_probe))


def plan_config(table: ModelTable, cfg: RunConfig, *, workers: list[Any] | None = None, overheads: Any = None,
                read_probe: dict[int, float] | None = None) -> Plan:
    """make_plan for `table` with a RunConfig's settings (and devices elsewhere: `workers`)."""
    return make_plan(PlanRequest.from_config(cfg, cfg.budget.resolve_bytes()),
                     PlanInputs(table=table, overheads=overheads, read_probe=read_probe, workers=workers or []))


def spec_of(plan: Plan | None, model: Path) -> RuntimeSpec:
    """The RuntimeSpec of a dense plan (no sidecar, no trace), or stock for None."""
    inputs = RunInputs(config=load_run_config(None), model=model, budget_bytes=plan.budget_bytes if plan else 0)
    return RuntimeSpec.from_plan(plan, inputs)


def prepared_of(settings: GenerationSettings, plan: Plan | None = None) -> Prepared:
    """A Prepared run of `settings` with a dense plan applied (None: stock)."""
    return Prepared(load_run_config(None), settings, plan, spec_of(plan, settings.model))


def streamed(plan: Plan) -> list[str]:
    """Names of the tensors the plan streams."""
    return [t.name for t in plan.tensors if t.placement == "streamed"]


def open_plan(settings: GenerationSettings, plan: Plan | None, **llama_kwargs: Any):
    """A llama_cpp.Llama opened with a dense plan applied (None: stock)."""
    from orchestrator.run import loader

    return loader.open_model(settings, spec_of(plan, settings.model), **llama_kwargs)


def prepare(overrides: dict[str, Any], settings: GenerationSettings | None = None) -> Prepared:
    """api.prepare of a RunConfig given as overrides; `settings` replaces the generation settings (the tests' own
    ctx, batch and threads) while the plan and spec stay the config's."""
    import dataclasses

    from orchestrator import api

    prepared = api.prepare(load_run_config(None, overrides))
    return dataclasses.replace(prepared, settings=settings) if settings is not None else prepared


def with_settings(prepared: Prepared, settings: GenerationSettings) -> Prepared:
    """The same plan and spec with other generation settings."""
    import dataclasses

    return dataclasses.replace(prepared, settings=settings)


def overlay_driver(out_dir: Path, driver: Path, *sources: str) -> Path:
    """A test driver (tests/cpp/*.cpp) compiled with owned sources of the overlay alone (`sources`: file names in
    patches/llama.cpp/overlay/src; no include path into ggml or llama.cpp), warnings as errors; skips the test
    without a C++ compiler."""
    import shutil
    import subprocess

    import pytest

    from orchestrator import patches

    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++) on PATH")
    src = patches.overlay_dir(Path(__file__).resolve().parents[1]) / "src"
    exe = out_dir / driver.stem
    cmd = [cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{src}", str(driver),
           *(str(src / name) for name in sources), "-o", str(exe)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, (f"{driver.name} does not build with {', '.join(sources)} alone:\n{' '.join(cmd)}\n"
                                 f"{out.stderr}")
    return exe
