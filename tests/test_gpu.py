"""Layers on this host's GPU beside flashflex's runtimes (issue 24). With `-ngl N` llama.cpp puts the model's last N
layers on the device and keeps the others' weights in the GPU's pinned host buffer type (Vulkan_Host, CUDA_Host):
host memory, which dense streaming and slot banks take over as they do CPU memory. Exactness is against stock
llama.cpp with the same -ngl on the same backend, at ubatch 1 and 32 (at 32 ggml hands a host layer's matmuls to the
GPU, op offload, copying the weights there from the host buffer: the streamed bytes must be in place before that).

Needs a GPU build and a device it sees; skipped otherwise: `make test-gpu` builds the Vulkan variant beside the
venv's library and runs these on lavapipe (Mesa's software Vulkan, GGML_VK_VISIBLE_DEVICES=0)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import synth

from conftest import flashflex, one_error

pytestmark = [pytest.mark.gpu, pytest.mark.native]

CTX = 256
N_LAYER = 6
NGL = 2  # of the models' 6 layers: 2 on the device, 4 left on the host (with a prefetch window of 2, some stream)


@pytest.fixture(scope="module")
def dense_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny dense models of tests/test_stream.py with 6 layers: a quant the CPU backend repacks (Q4_0: the host
    layers' weights go to its repacked buffer type) and a plain one (Q8_0: they go to the GPU's host buffer type)."""
    out = tmp_path_factory.mktemp("gpu-dense")
    return {q: synth.write_synth_model(synth.preset("tiny-dense", quant=q, n_layer=N_LAYER, n_embd=512, n_ff=1536),
                                       out / f"{q}.gguf")
            for q in ("q4_0", "q8_0")}


def _minimum_budget(path: str, settings: list[str]) -> str:
    """The plan's minimum budget (the most it streams) for this host's part of the model."""
    planned = flashflex("plan", path, "--budget", "1GiB", *settings, "--json", timeout=300)
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert plan["rpc"]["local_layers"] == N_LAYER - NGL, plan["rpc"]
    return f"{plan['minimum_budget_bytes']}B"


def _on_device(stats: dict, devices: list[dict]) -> tuple[int, int]:
    """(model bytes in the GPU's own buffers, model bytes in host memory: the CPU's, the GPU's host buffer type) of a
    run's stats."""
    names = {d["name"] for d in devices}
    mine = [b for b in stats["devices"] if b["device"] in names and not b["host"]]
    return sum(int(b["model"]) for b in mine), sum(int(b["model"]) for b in stats["devices"] if b not in mine)


def _assert_exact(args: list[str], mode: str, tokens: int = 40) -> None:
    """`verify-exact` with `args`: logits bitwise identical to stock with the same placement, in `mode`."""
    result = flashflex("verify-exact", *args, "--tokens", str(tokens), "--json", timeout=600)
    assert result.returncode == 0, (args, result.stderr)
    out = json.loads(result.stdout)
    assert out["identical"] and out["max_abs_diff"] == 0.0 and out["mode"].startswith(mode), (args, out)


@pytest.mark.parametrize("ubatch", [1, 32])
@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_partial_offload_streams_the_host_layers_exactly(gpu_build, dense_models, quant, ubatch):
    """-ngl 2 and a budget that streams the layers left on the host: logits bitwise identical to stock with the
    same -ngl, and the run really has layers on the device (not silently all on the CPU) and reads from disk."""
    _backend, mine = gpu_build
    path = str(dense_models[quant])
    settings = ["-ngl", str(NGL), "--ctx", str(CTX), "--ubatch", str(ubatch), "-tp", "2", "--prefetch-window", "2"]
    common = ["--model", path, "--budget", _minimum_budget(path, settings), *settings]
    _assert_exact(common, "dense-stream")

    run = flashflex("run", *common, "-n", "4", "--json", timeout=600)
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout)["stats"]
    assert stats["mode"] == "dense-stream" and stats["decode"]["bytes_read"] > 0, stats
    assert stats["decode"]["streamed_layers"] > 0 and stats["decode"]["error"] is None, stats["decode"]
    on_device, elsewhere = _on_device(stats, mine)
    assert on_device > 0 and elsewhere > 0, stats["devices"]
    if quant == "q8_0":  # the case this is about: the host layers' weights in the GPU's host buffer type
        names = {d["name"] for d in mine}
        assert any(b["host"] and b["device"] in names and int(b["model"]) > 0 for b in stats["devices"]), stats


@pytest.mark.parametrize("ubatch,slots", [
    (1, 8),  # below ggml's op-offload batch: the expert matmuls run on the CPU in stock and here
    (8, 8),
    (32, 16),  # one pass (a slot per expert): offloaded to the GPU like stock's, copying the slots the batch uses
    # passes (more experts than slots): each pass's matmul offloaded like stock's, through a weight of its own (ggml
    # copies an offloaded weight once per graph, with the slots of the first matmul using it), merged on the CPU
    (32, 8),
])
def test_moe_slot_banks_beside_layers_on_the_device(gpu_build, moe_models, ubatch, slots):
    """Attention and the dense parts of every layer on the device (-ngl 99), the routed experts in this host's slot
    banks (llama.cpp's --cpu-moe shape: `exps` tensors kept in the CPU buffer type): logits bitwise identical to
    stock with the same placement, and the run really has its layers on the device."""
    _backend, mine = gpu_build
    path, sidecar = moe_models["qwen3moe"]  # 16 experts, top-4
    common = ["--model", str(path), "--moe-mode", "slot-bank", "--moe-slot-bank", str(slots), "--moe-sidecar",
              str(sidecar), "-ngl", "99", "--ctx", str(CTX), "--ubatch", str(ubatch), "-t", "1"]
    _assert_exact(common, "slot-bank")

    run = flashflex("run", *common, "-n", "4", "--json", timeout=600)
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout)["stats"]
    assert stats["rpc"]["experts_here"] and stats["rpc"]["local_layers"] == 0, stats["rpc"]
    on_device, elsewhere = _on_device(stats, mine)
    assert on_device > 0 and elsewhere > 0, stats["devices"]  # elsewhere: the banks' experts


# --------------------------------------------------------------------------------------------------
# Speculative decoding with layers on the device (issue 24, item 2)

LONG_PROMPT = " ".join(["the cat sat on the mat, and the dog sat on the log."] * 4)  # over 32 tokens: op offload


@pytest.mark.parametrize("ubatch", [1, 32])
def test_prompt_lookup_drafts_with_layers_on_the_device_are_bitwise_exact(gpu_build, dense_models, ubatch):
    """-ngl 2 with the host layers streamed under the minimum budget and prompt-lookup drafting: every decode call
    (the prompt, single tokens, verification batches) has the same tokens and bitwise-identical logits as stock
    llama.cpp with the same -ngl and the same drafts, and the greedy tokens are the same."""
    from orchestrator import speculative
    from orchestrator.run.settings import GenerationSettings
    from tests.helpers import prepare
    from tests.test_speculative import _assert_same_batches_and_logits, _drafted

    path = dense_models["q8_0"]
    settings = ["-ngl", str(NGL), "--ctx", str(CTX), "--ubatch", str(ubatch), "-tp", "2", "--prefetch-window", "2"]
    budget = _minimum_budget(str(path), settings)
    gen = GenerationSettings(model=path, ctx=CTX, batch=64, ubatch=ubatch, threads=2, temperature=0.0)
    # planned as `plan` (and run) plan it, one logits row per decode; the harness's contexts keep every row (gen)
    streamed = prepare({"model.path": path, "budget.size": budget, "context.ctx": CTX, "context.ubatch": ubatch,
                        "context.outputs": 1, "prefetch.threads": 2, "prefetch.window": 2, "gpu.layers": NGL}, gen)
    assert streamed.spec.stream is not None and streamed.spec.placement is not None, streamed.spec
    assert streamed.spec.placement.local_layers == N_LAYER - NGL
    draft = speculative.DraftSetup(kind="prompt-lookup", ngram=2, max_tokens=4, adaptive=False)
    for prompt in (LONG_PROMPT, "one two three four five six, one two three four five six, one two"):
        stock = _drafted(gen, streamed.stock(), draft, prompt)
        mine = _drafted(gen, streamed, draft, prompt)
        _assert_same_batches_and_logits(stock, mine, f"-ngl {NGL}, dense-stream, prompt-lookup, {prompt[:20]!r}")
        assert mine.report["verifications"] >= 1
        assert any(len(batch) > 1 for batch, _n_past, _ in mine.calls[1:]), "no verification batch ran"
        if prompt == LONG_PROMPT:  # the prompt's decode call is a batch ggml offloads to the device at ubatch 32
            assert len(mine.calls[0][0]) >= 32, len(mine.calls[0][0])


# --------------------------------------------------------------------------------------------------
# RPC workers beside the local GPU (issue 24, item 2)

NGL_BOTH = 4  # of the 6 layers: 2 on the local GPU, then 2 on the worker; 2 left on the host, streamed


@pytest.mark.parametrize("ubatch", [1, 32])
def test_layers_on_the_gpu_and_a_worker_with_host_layers_streamed_are_bitwise_exact(gpu_build, dense_models,
                                                                                      tmp_path, monkeypatch, ubatch):
    """-ngl 4 with a local `flashflex rpc-server` on 127.0.0.1: llama.cpp's device order is this host's GPU first,
    then the workers, so the GPU takes layers 2-3 and the worker layers 4-5 and the output layer, and the 2 layers
    left on the host stream under the minimum budget. Logits bitwise identical to stock llama.cpp with the same
    devices and split; the run's memory shows weights on the GPU, on the worker and in host memory."""
    from tests.test_rpc import Worker

    _backend, mine = gpu_build
    # The worker serves its CPU, as another machine would serve its own devices: without GGML_VK_VISIBLE_DEVICES it
    # skips lavapipe. (A worker serving lavapipe, even ggml's bare ggml_backend_rpc_start_server, aborts with heap
    # corruption in lavapipe's queue thread when one client loads a second model at ubatch 16 or 32, as verify-exact
    # does: stock, then flashflex.) It announces memory like the GPU's, so that the split gives both devices layers
    # (it is in proportion to memory).
    gpu_free = max(int(d["free"]) for d in mine)
    with monkeypatch.context() as env:
        env.delenv("GGML_VK_VISIBLE_DEVICES", raising=False)
        worker = Worker(tmp_path / "worker.log", f"{gpu_free}B", 1)
    assert worker.announcement["devices"][0]["type"] == "cpu", worker.announcement
    try:
        path = str(dense_models["q8_0"])
        settings = ["-ngl", str(NGL_BOTH), "--rpc", worker.endpoint, "--ctx", str(CTX), "--ubatch", str(ubatch),
                    "-tp", "2", "--prefetch-window", "1"]  # a window of 1 of the 2 host layers: they stream
        planned = flashflex("plan", path, "--budget", "1GiB", *settings, "--json", timeout=300)
        assert planned.returncode == 0, planned.stderr
        plan = json.loads(planned.stdout)["rpc"]
        assert plan["local_layers"] == N_LAYER - NGL_BOTH, plan
        devices = [(d["endpoint"], d["n_layers"]) for d in plan["devices"]]
        assert devices == [("local", 2), (worker.endpoint, 2)], devices
        budget = f"{json.loads(planned.stdout)['minimum_budget_bytes']}B"
        common = ["--model", path, "--budget", budget, *settings, "-t", "1"]

        _assert_exact(common, "dense-stream")

        run = flashflex("run", *common, "-n", "4", "--json", timeout=600)
        assert run.returncode == 0, run.stderr
        stats = json.loads(run.stdout)["stats"]
        assert stats["mode"] == "dense-stream" and stats["decode"]["bytes_read"] > 0, stats["decode"]
        on_gpu, _elsewhere = _on_device(stats, mine)
        remote = [b for b in stats["devices"] if b["device"].startswith("RPC")]
        assert on_gpu > 0, stats["devices"]
        assert len(remote) == 1 and remote[0]["description"] == worker.endpoint, stats["devices"]
        assert remote[0]["model"] == plan["devices"][1]["weight_bytes"], (remote, plan)  # layers 4-5 and the output
        assert any(b["host"] and int(b["model"]) > 0 for b in stats["devices"]), stats["devices"]
    finally:
        worker.stop()


def _plan_json(path: str, *settings: str) -> dict:
    planned = flashflex("plan", path, "--budget", "1GiB", "--ctx", str(CTX), *settings, "--json", timeout=300)
    assert planned.returncode == 0, planned.stderr
    return json.loads(planned.stdout)


def test_auto_is_the_default_and_the_device_budget_decides_the_layers(gpu_build, dense_models):
    """No -ngl on a GPU build: as many layers as the device budget holds go to the GPU (all of them by default),
    the device's compute buffer and KV cache measured by llama.cpp (no_alloc on that backend); a smaller
    --gpu-budget keeps some layers here, and a run with it is bitwise identical to stock with the same placement while
    streaming them."""
    _backend, mine = gpu_build
    path = str(dense_models["q8_0"])
    everything = _plan_json(path, "--ubatch", "32")["rpc"]
    (device,) = everything["devices"]
    assert everything["local_layers"] == 0 and device["output"] and device["compute_source"] == "measured"
    assert device["kv_source"] == "measured"  # each layer's KV cache as llama.cpp sized it on that backend
    assert device["name"] in {d["name"] for d in mine} and device["used_bytes"] <= device["budget_bytes"]
    assert device["budget_bytes"] < device["free_bytes"]  # the default leaves a margin

    budget = device["weight_bytes"] // 2  # about half the layers
    half = _plan_json(path, "--ubatch", "32", "--gpu-budget", f"{budget}B")["rpc"]
    assert 0 < half["local_layers"] < N_LAYER and half["devices"][0]["used_bytes"] <= budget, half

    for ubatch in (1, 32):
        settings = ["--gpu-budget", f"{budget}B", "--ctx", str(CTX), "--ubatch", str(ubatch), "-tp", "2",
                    "--prefetch-window", "2"]
        planned = _plan_json(path, *settings)
        common = ["--model", path, "--budget", f"{planned['minimum_budget_bytes']}B", *settings]
        _assert_exact(common, "dense-stream", tokens=24)

    run = flashflex("run", "--model", path, "--ctx", str(CTX), "-n", "2", "--json", timeout=600)
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout)["stats"]
    on_device, _ = _on_device(stats, mine)
    assert on_device > 0 and stats["rpc"]["local_layers"] == 0, stats
    # the KV cache the plan reserved on the device is the one the run allocated there
    kv_there = sum(int(b["context"]) for b in stats["devices"] if b["device"] == device["name"] and not b["host"])
    assert kv_there == device["kv_cache_bytes"], (kv_there, device)


def test_what_the_device_budget_cannot_hold_is_refused_before_loading(gpu_build, dense_models):
    path = str(dense_models["q8_0"])
    refused = flashflex("run", "--model", path, "--ctx", str(CTX), "-ngl", str(N_LAYER), "--gpu-budget", "5MiB",
                        "-n", "1", timeout=300)
    one_error(refused, "5.00 MiB budget", f"not -ngl {N_LAYER}", "a layer needs", "--gpu-budget")
    too_big = flashflex("plan", path, "--ctx", str(CTX), "--gpu-budget", "100TiB", timeout=300)
    one_error(too_big, "--gpu-budget 100 TiB is more than", "has free")
    # auto with a budget that holds no layer: everything here, said once
    nothing = flashflex("plan", path, "--budget", "1GiB", "--ctx", str(CTX), "--gpu-budget", "1MiB", timeout=300)
    assert nothing.returncode == 0, nothing.stderr
    assert "-ngl auto: nothing goes to the GPU" in nothing.stdout.replace("\n", " "), nothing.stdout


@pytest.mark.parametrize("ubatch", [1, 32])
def test_every_lossless_moe_mode_beside_layers_on_the_device(gpu_build, moe_models, tmp_path, ubatch):
    """Flash-MoE's layout on a GPU for the bank modes test_moe_slot_banks_beside_layers_on_the_device does not
    cover: resident banks (with shared experts, qwen2moe), router-lookahead prefetch (the routers stay here with
    the experts), and a routing trace recorded there and replayed by both oracles. Every layer's dense part on the
    device (-ngl 99), logits bitwise identical to stock with the same placement, at ubatch 1 and 32."""
    qwen2, qwen2_sidecar = moe_models["qwen2moe"]
    qwen3, qwen3_sidecar = moe_models["qwen3moe"]
    placed = ["-ngl", "99", "--ctx", str(CTX), "--ubatch", str(ubatch), "-t", "1"]
    trace = tmp_path / f"trace-{ubatch}.jsonl"
    runs = [
        ["--model", str(qwen2), "--moe-sidecar", str(qwen2_sidecar), "--moe-mode", "resident-bank"],
        ["--model", str(qwen3), "--moe-sidecar", str(qwen3_sidecar), "--moe-mode", "slot-bank", "--moe-slot-bank",
         "8", "--moe-prefetch", "router-lookahead"],
        # record (slot-bank), then replay the trace twice
        *[["--model", str(qwen3), "--moe-sidecar", str(qwen3_sidecar), "--moe-mode", mode, "--moe-slot-bank", "8",
           "--moe-trace", str(trace)] for mode in ("slot-bank", "oracle-all-hit", "oracle-prefetch")],
    ]
    for args in runs:
        _assert_exact([*args, *placed], args[args.index("--moe-mode") + 1])
    assert trace.exists()


@pytest.mark.parametrize("ubatch", [1, 32])
def test_auto_gives_the_gpu_whole_layers_experts_when_room_is_left(gpu_build, moe_models, ubatch):
    """-ngl auto (the default here) with slot banks and a device that holds more than every layer's dense part: the
    routed experts of the last layers follow them to the GPU, layer 0's stay in host banks; bitwise identical to
    stock with the same placement (the same device list, split and narrower expert override)."""
    _backend, mine = gpu_build
    path, sidecar = moe_models["qwen3moe"]
    common = ["--model", str(path), "--moe-mode", "slot-bank", "--moe-slot-bank", "8", "--moe-sidecar", str(sidecar),
              "--ctx", str(CTX), "--ubatch", str(ubatch), "-t", "1"]
    planned = flashflex("plan", str(path), "--budget", "1GiB", "--moe-mode", "slot-bank", "--moe-slot-bank", "8",
                        "--ctx", str(CTX), "--ubatch", str(ubatch), "--explain", "--json", timeout=300)
    assert planned.returncode == 0, planned.stderr
    placement = json.loads(planned.stdout)["rpc"]
    assert placement["local_layers"] == 0 and placement["experts_on_gpu_from"] == 1, placement
    assert "went to the GPU with their layers" in planned.stderr.replace("\n", " ")
    _assert_exact(common, "slot-bank")
    run = flashflex("run", *common, "-n", "4", "--json", timeout=600)
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout)["stats"]
    on_device, _ = _on_device(stats, mine)
    assert on_device == placement["devices"][0]["weight_bytes"], (on_device, placement)  # the moved experts too
    assert stats["moe"]["decode"]["banked_layers"] == 1, stats["moe"]["decode"]


# --------------------------------------------------------------------------------------------------
# A server's slots decoded together with layers on the device (serving several clients on a GPU under the budget)


@pytest.mark.parametrize("ubatch", [1, 32])
@pytest.mark.parametrize("layout", ["dense -ngl 2, host layers streamed", "moe -ngl 99, experts in slot banks"])
def test_slots_decoded_together_with_layers_on_the_device_are_bitwise_exact(gpu_build, dense_models, moe_models,
                                                                             layout, ubatch):
    """4 sequences as llama-server's slots decode them (their prompts in one batch of 40 tokens: at ubatch 32 ggml
    offloads its first micro-batch's host matmuls to the device; then one token each per pass), with layers on the
    device: the dense model's 4 host layers streamed under the minimum budget, or the MoE model's dense parts all on
    the device and its routed experts in banks of 4 slots, fewer than a pass's union of experts (the pass runs in
    groups). Every sequence's logits bitwise identical to stock's with the same placement."""
    from orchestrator import exact
    from orchestrator.run.settings import GenerationSettings
    from tests.helpers import prepare

    if layout.startswith("dense"):
        path = dense_models["q8_0"]
        settings = ["-ngl", str(NGL), "--ctx", str(CTX), "--ubatch", str(ubatch), "-tp", "2", "--prefetch-window", "2"]
        # planned as `plan` plans it (one logits row a decode); the harness's contexts keep every row
        config = {"budget.size": _minimum_budget(str(path), settings), "prefetch.threads": 2, "prefetch.window": 2,
                  "gpu.layers": NGL, "context.outputs": 1}
    else:
        path, sidecar = moe_models["qwen3moe"]  # 16 experts, top-4: 4 sequences route to more than 4
        config = {"budget.size": "64GiB", "moe.mode": "slot-bank", "moe.sidecar": sidecar, "moe.slot_bank": 4,
                  "gpu.layers": 99}
    gen = GenerationSettings(model=path, ctx=CTX, batch=64, ubatch=ubatch, threads=2)
    mine = prepare({"model.path": path, "context.ctx": CTX, "context.ubatch": ubatch, **config}, gen)
    assert mine.spec.placement is not None and mine.spec.native, mine.spec
    assert (mine.spec.stream is not None) == layout.startswith("dense"), mine.spec
    seqs = [exact.teacher_tokens(16, 512, seed=20 + s) for s in range(4)]
    stock = exact.batched_logits(mine.stock(), seqs, prompt=10)
    ours = exact.batched_logits(mine, seqs, prompt=10)
    result = exact.compare(stock.reshape(-1, stock.shape[-1]), ours.reshape(-1, ours.shape[-1]))
    assert result.identical, (layout, ubatch, result)
    assert not (stock[0] == stock[1]).all()  # each sequence's logits are its own


@pytest.mark.parametrize("layout", ["dense -ngl 2, host layers streamed", "moe -ngl 99, experts in slot banks"])
def test_llama_server_serves_slots_with_layers_on_the_device(gpu_build, dense_models, moe_models, layout):
    """`flashflex serve --engine llama-server --parallel 2` with layers on the device: llama.cpp's own server (the GPU
    build's) under the plan, answering concurrent clients (the `openai` package on 127.0.0.1) from both slots, with
    the dense model's 2 last layers on the device and its 4 host layers streamed under the minimum budget, or the
    MoE model's dense parts all on the device and its routed experts in host slot banks (misses read from disk)."""
    import concurrent.futures

    from tests.test_llama_server import LlamaServer

    _backend, mine = gpu_build
    if layout.startswith("dense"):
        path = str(dense_models["q8_0"])
        placement = ["-ngl", str(NGL), "--ubatch", "32", "-tp", "2", "--prefetch-window", "2"]
        # the server's context is 2 slots of CTX, planned as such; a little over run's minimum for the server's own
        # logits rows (one per slot), still far from holding the host layers
        minimum = int(_minimum_budget(path, [*placement, "--ctx", str(2 * CTX)]).removesuffix("B"))
        args = ["--model", path, "--budget", f"{minimum + 2**22}B", *placement]
    else:
        model, sidecar = moe_models["qwen3moe"]
        args = ["--model", str(model), "--budget", "1GiB", "--moe-mode", "slot-bank", "--moe-slot-bank", "4",
                "--moe-sidecar", str(sidecar), "-ngl", "99", "--ubatch", "32"]
    srv = LlamaServer("--engine", "llama-server", "--parallel", "2", "--threads", "2", "--draft", "none",
                      "--ctx", str(CTX), *args)
    try:
        client = srv.client()
        name = client.models.list().data[0].id

        def ask(i: int):
            return client.completions.create(model=name, prompt=f"{i} {i + 1} {i + 2}", max_tokens=8, temperature=0)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, range(4)))  # 4 requests, 2 slots
        assert all(a.usage.completion_tokens >= 1 for a in answers), answers
        stats = srv.get("/flashflex/stats")
        served = stats["models"][stats["default"]]
        if layout.startswith("dense"):
            assert served["mode"] == "dense-stream" and served["runtime"]["stream"]["bytes_read"] > 0, served
        else:
            assert served["mode"] == "slot-bank" and served["runtime"]["moe"]["misses"] > 0, served
        # where llama-server put the weights and KV cache: layers on the device (lavapipe counts as one once made
        # visible), the rest in host memory
        on_device, elsewhere = _on_device(served, mine)
        assert on_device > 0 and elsewhere > 0, served["devices"]
        assert any(b["context"] > 0 for b in served["devices"] if b["device"] in {d["name"] for d in mine}), served
    finally:
        err = srv.stop_cleanly()
    # the startup says where the layers go, as plan --explain does
    assert f"this host's {mine[0]['name']}: layer" in err.replace("\n", " "), err[:3000]
