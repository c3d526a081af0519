"""One plan for two memories (issue 24): the device budget of this host's GPUs beside the host RAM budget, -ngl auto
as the default where a GPU is present, and the refusals that go with them. The planning here is pure (devices are
described, not found); what a GPU build does with it is in tests/test_gpu.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import api, native, rpc, synth
from orchestrator.config import load_run_config
from orchestrator.errors import FlashflexError
from orchestrator.modelfile.reader import read_model_table
from orchestrator.planner import PlanInputs, PlanRequest, make_plan
from orchestrator.planner.buffers import kv_layer_bytes
from orchestrator.planner.explain import device_lines
from orchestrator.planner.placement import DeviceMemory, place_layers

from conftest import flashflex, one_error

CTX = 256
MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu-plan")
    return synth.write_synth_model(synth.preset("tiny-dense", quant="q8_0", n_layer=6, n_embd=512, n_ff=1536),
                                   out / "dense.gguf")


def _gpu(capacity: int | None, compute: int | None = None, free: int = 2 * GiB) -> DeviceMemory:
    return DeviceMemory(rpc.LOCAL, 0, free, free, name="Vulkan0", capacity=capacity, compute=compute)


# --------------------------------------------------------------------------------------------------
# The settings


@pytest.mark.parametrize("given,expected", [(None, None), ("auto", "auto"), ("AUTO", "auto"), (0, 0), ("12", 12)])
def test_gpu_layers_take_a_count_auto_or_none(given, expected):
    cfg = load_run_config(None, {"gpu.layers": given})
    assert cfg.gpu.layers == expected
    assert cfg.offloads is (isinstance(expected, int) and expected > 0)


def test_gpu_budget_is_a_size():
    assert load_run_config(None, {"gpu.budget": "1.5GiB"}).gpu.budget_bytes == 3 * GiB // 2
    assert load_run_config(None, {}).gpu.budget_bytes is None
    with pytest.raises(FlashflexError, match="gpu.budget"):
        load_run_config(None, {"gpu.budget": "lots"})
    with pytest.raises(FlashflexError, match="gpu.layers: must be >= 0"):
        load_run_config(None, {"gpu.layers": -2})


def test_llama_cpp_python_s_all_layers_is_every_layer():
    """Code ported from Llama(n_gpu_layers=-1) means every layer; -ngl 999 says it to llama.cpp."""
    ours, _ = api.split_llama_kwargs({"n_gpu_layers": -1})
    assert ours == {"gpu_layers": 999}


def test_the_default_device_budget_leaves_a_margin():
    assert rpc.device_budget(80 * GiB, None) == 79 * GiB
    assert rpc.device_budget(2 * GiB, None) == 3 * GiB // 2  # a quarter of a small device's free memory
    assert rpc.device_budget(80 * GiB, 8 * GiB) == 8 * GiB


@pytest.mark.parametrize("settings,uses", [
    ({}, True), ({"gpu.layers": "auto"}, True), ({"gpu.layers": 3}, True), ({"gpu.layers": 0}, False),
    ({"rpc.servers": "10.0.0.1:50052"}, False), ({"rpc.servers": "10.0.0.1:50052", "gpu.layers": "auto"}, True),
])
def test_which_settings_use_this_host_s_gpus(settings, uses):
    """-ngl unset is auto where there is a GPU, unless RPC workers are given alone (they keep their own count)."""
    assert rpc.uses_local_gpus(load_run_config(None, settings)) is uses


def _fake_gpu(monkeypatch, free: int = 2 * GiB) -> None:
    monkeypatch.setattr(native, "is_patched", lambda: True)
    monkeypatch.setattr(native, "local_accelerators", lambda: [1])
    monkeypatch.setattr(native, "devices", lambda: [
        {"index": 0, "name": "CPU", "type": "cpu", "backend": "CPU", "free": 0, "total": 0},
        {"index": 1, "name": "Vulkan0", "type": "gpu", "backend": "Vulkan", "free": free, "total": free}])
    monkeypatch.setattr(rpc, "library_protocol", lambda: rpc.RPC_PROTOCOL)


def test_offload_targets_give_the_gpu_its_budget(monkeypatch):
    _fake_gpu(monkeypatch)
    (local,) = rpc.offload_targets(load_run_config(None, {})) or []
    assert local.endpoint == rpc.LOCAL
    assert [(d.index, d.name, d.capacity) for d in local.devices] == [(1, "Vulkan0", 3 * GiB // 2)]
    (local,) = rpc.offload_targets(load_run_config(None, {"gpu.budget": "512MiB"})) or []
    assert local.devices[0].capacity == 512 * MiB
    assert rpc.offload_targets(load_run_config(None, {"gpu.layers": 0})) is None


def test_a_device_budget_above_the_free_memory_is_refused(monkeypatch):
    _fake_gpu(monkeypatch, free=GiB)
    with pytest.raises(FlashflexError, match=r"--gpu-budget 4.00 GiB is more than Vulkan0 has free \(1.00 GiB"):
        rpc.offload_targets(load_run_config(None, {"gpu.budget": "4GiB"}))


def test_a_device_budget_with_nothing_to_use_it_is_refused(monkeypatch):
    _fake_gpu(monkeypatch)
    with pytest.raises(FlashflexError, match="-ngl 0 puts nothing there"):
        rpc.offload_targets(load_run_config(None, {"gpu.layers": 0, "gpu.budget": "1GiB"}))
    monkeypatch.setattr(native, "local_accelerators", lambda: [])
    with pytest.raises(FlashflexError, match="build sees no GPU"):
        rpc.offload_targets(load_run_config(None, {"gpu.budget": "1GiB"}))
    assert rpc.offload_targets(load_run_config(None, {"gpu.layers": "auto"})) is None  # auto: nothing to place


# --------------------------------------------------------------------------------------------------
# Placement under the device budget


def test_the_device_budget_and_its_measured_compute_decide_the_layers(model):
    table = read_model_table(model)
    everything, _ = place_layers(table, [_gpu(1 * GiB)], ctx=CTX, ubatch=32)
    assert everything.local_layers == 0 and everything.devices[0].output
    layer = everything.devices[0].weight_bytes // 7  # six layers and the output layer, about the same size
    small = 3 * layer + 4 * MiB
    measured, _ = place_layers(table, [_gpu(small, compute=MiB)], ctx=CTX, ubatch=32)
    d = measured.devices[0]
    assert d.compute_bytes == MiB and d.compute_source == "measured" and d.budget_bytes == small
    assert d.used_bytes <= small and measured.local_layers == 6 - d.n_layers
    # the planner's estimate reserves more than the measured buffer, so no more layers can fit with it
    estimated, _ = place_layers(table, [_gpu(small)], ctx=CTX, ubatch=32)
    assert estimated.devices[0].compute_source == "estimated"
    assert estimated.devices[0].compute_bytes > MiB and estimated.devices[0].n_layers <= d.n_layers


def test_the_measured_kv_cache_of_each_layer_decides_the_layers(model):
    """Per-layer KV as llama.cpp sized it replaces the f16 whole-context formula: a model whose sliding-window layers
    hold fewer cells puts more layers on the same device budget, and the plan says which figure it used; the KV of
    the layers left on this host comes from the same measurement."""
    table = read_model_table(model)
    formula = kv_layer_bytes(table, CTX)
    formula_plan, _ = place_layers(table, [_gpu(GiB, compute=MiB)], ctx=CTX, ubatch=32)
    assert formula_plan.devices[0].kv_source == "estimated"
    assert formula_plan.devices[0].kv_cache_bytes == 6 * formula
    # big KV layers, every third one small (a sliding-window pattern): the budget holds weights + the measured KV
    kv = tuple(formula * 40 if i % 3 == 2 else formula * 4 for i in range(6))
    layer = formula_plan.devices[0].weight_bytes // 7
    budget = 3 * layer + kv[5] + kv[4] + kv[3] + MiB + layer  # the last three layers, compute and the output layer
    measured, _ = place_layers(table, [DeviceMemory(rpc.LOCAL, 0, 2 * GiB, 2 * GiB, name="Vulkan0", capacity=budget,
                                                    compute=MiB, kv_layers=kv)], ctx=CTX, ubatch=32)
    d = measured.devices[0]
    assert d.kv_source == "measured" and d.kv_cache_bytes == sum(kv[d.first_layer:])
    assert d.used_bytes <= budget and d.n_layers >= 2
    # the whole-context formula per layer would have fitted a different count: the measurement is what decided
    uniform, _ = place_layers(table, [_gpu(budget, compute=MiB)], ctx=CTX, ubatch=32)
    assert uniform.devices[0].n_layers != d.n_layers
    # a measurement of another layer count (another model's) is ignored, not misapplied
    other, _ = place_layers(table, [DeviceMemory(rpc.LOCAL, 0, 2 * GiB, 2 * GiB, name="Vulkan0", capacity=budget,
                                                 compute=MiB, kv_layers=kv[:5])], ctx=CTX, ubatch=32)
    assert other.devices[0].kv_source == "estimated"
    # the host's share: the layers left here reserve their measured KV, not the formula's
    gpu = rpc.Worker(rpc.LOCAL, rpc.RPC_PROTOCOL, [rpc.WorkerDevice(1, 2 * GiB, 2 * GiB, name="Vulkan0",
                                                                    capacity=budget, compute=MiB, kv_layers=kv)])
    plan = _plan(model, [gpu], layers_optional=True)
    assert plan.rpc is not None and plan.rpc.local_layers > 0
    assert plan.reservations.kv_cache_bytes == sum(kv[:plan.rpc.local_layers])


def test_a_count_the_device_budget_cannot_hold_is_refused_with_the_sizes(model):
    table = read_model_table(model)
    with pytest.raises(FlashflexError) as e:
        place_layers(table, [_gpu(8 * MiB, compute=MiB)], ctx=CTX, ubatch=32, layers=6, flag="-ngl")
    text = e.value.one_line()
    assert "this host's Vulkan0 8.00 MiB budget" in text and "not -ngl 6" in text, text
    assert "a layer needs" in text and "--gpu-budget" in text and "--rpc-layers" not in text, text


def _plan(model: Path, workers: list, **request):
    table = read_model_table(model)
    req = PlanRequest(budget_bytes=GiB, ctx=CTX, ubatch=32, threads=1, **request)
    return make_plan(req, PlanInputs(table=table, workers=workers))


def test_auto_on_a_gpu_too_small_for_a_layer_keeps_everything_here_and_says_so(model):
    tiny = rpc.Worker(rpc.LOCAL, rpc.RPC_PROTOCOL, [rpc.WorkerDevice(1, 2 * GiB, 2 * GiB, name="Vulkan0",
                                                                     capacity=MiB, compute=MiB // 2)])
    plan = _plan(model, [tiny], layers_optional=True)
    assert plan.rpc is None and plan.n_layer == 6
    assert any(w.startswith("-ngl auto: nothing goes to the GPU") and "holds no layer" in w for w in plan.warnings)
    with pytest.raises(FlashflexError, match="holds 0 of .* not -ngl 2"):  # asked for explicitly: refused
        _plan(model, [tiny], layers_elsewhere=2, layers_flag="-ngl")


def test_explain_shows_both_memories(model):
    gpu = rpc.Worker(rpc.LOCAL, rpc.RPC_PROTOCOL, [rpc.WorkerDevice(1, 2 * GiB, 2 * GiB, name="Vulkan0",
                                                                    capacity=12 * MiB, compute=MiB)])
    plan = _plan(model, [gpu], layers_optional=True)
    assert plan.rpc is not None and 0 < plan.rpc.local_layers < 6
    (line,) = device_lines(plan)
    assert line.startswith("this host's Vulkan0: layers ") and "+ output" in line, line
    assert "device budget 12.0 MiB (free 2.00 GiB of 2.00 GiB): used " in line and "(measured)" in line, line


# --------------------------------------------------------------------------------------------------
# On this build (a CPU build in CI): nothing to put a device budget on


@pytest.mark.native
def test_gpu_budget_without_a_gpu_is_one_line(patched_llama, model):
    if native.local_accelerators():
        pytest.skip("this build sees a local GPU device (a GPU build): --gpu-budget has somewhere to go")
    result = flashflex("plan", str(model), "--budget", "1GiB", "--gpu-budget", "1GiB", timeout=60)
    one_error(result, "--gpu-budget 1GiB", "sees no GPU", "flashflex build --backend")
    auto = flashflex("plan", str(model), "--budget", "1GiB", "-ngl", "auto", "--json", timeout=60)
    assert auto.returncode == 0, auto.stderr  # auto with no GPU: everything here, no error
    assert '"rpc": null' in auto.stdout


# --------------------------------------------------------------------------------------------------
# -ngl auto on a MoE in a bank mode: dense parts first, then whole layers' experts while room is left


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    return synth.write_synth_model(synth.preset("tiny-qwen3moe", n_layer=4),
                                   tmp_path_factory.mktemp("gpu-plan-moe") / "moe.gguf")


def _experts_of(table, layer: int) -> int:
    from orchestrator.planner.placement import is_expert_here

    return sum(t.n_bytes for t in table.tensors if t.layer == layer and is_expert_here(t))


def test_auto_moves_whole_layers_experts_to_the_gpu_while_room_is_left(moe):
    """The dense parts of every layer fit with room for the experts of the last two layers: those follow their
    layers to the GPU (llama.cpp is told to keep only layers 0-1's experts in the CPU buffer type), the host banks
    layers 0-1, and the device's weights count the moved experts."""
    import re

    from orchestrator.planner.placement import local_table

    table = read_model_table(moe)
    dense, _ = place_layers(table, [_gpu(GiB, compute=MiB)], ctx=CTX, ubatch=32, experts_here=True)
    assert dense.experts_on_gpu_from is None and dense.local_layers == 0  # not asked: every expert stays here
    room = dense.devices[0].used_bytes + _experts_of(table, 3) + _experts_of(table, 2) + MiB // 2
    plan, _ = place_layers(table, [_gpu(room, compute=MiB)], ctx=CTX, ubatch=32, experts_here=True,
                           experts_to_gpus=True)
    assert plan.experts_on_gpu_from == 2, plan
    assert plan.devices[0].weight_bytes == dense.devices[0].weight_bytes + _experts_of(table, 3) + _experts_of(table, 2)
    assert plan.devices[0].used_bytes <= room
    (pattern,) = plan.cpu_tensors
    assert re.search(pattern, "blk.1.ffn_up_exps.weight") and re.search(pattern, "blk.0.ffn_down_exps.weight")
    assert not re.search(pattern, "blk.2.ffn_up_exps.weight") and not re.search(pattern, "blk.12.ffn_up_exps.weight")
    banked = {t.layer for t in local_table(table, 0, True, False, plan.experts_on_gpu_from).tensors
              if t.layer is not None}
    assert banked == {0, 1}
    # however large the GPU, layer 0 keeps its experts in the bank mode that was asked for
    everything, _ = place_layers(table, [_gpu(GiB, compute=MiB)], ctx=CTX, ubatch=32, experts_here=True,
                                 experts_to_gpus=True)
    assert everything.experts_on_gpu_from == 1


def test_experts_never_go_to_a_worker(moe):
    table = read_model_table(moe)
    worker = DeviceMemory("10.0.0.1:50052", 0, GiB, GiB)
    plan, _ = place_layers(table, [_gpu(GiB, compute=MiB), worker], ctx=CTX, ubatch=32, layers=4, experts_here=True,
                           experts_to_gpus=True)
    assert plan.devices[-1].endpoint == worker.endpoint and plan.experts_on_gpu_from is None
