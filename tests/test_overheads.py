"""Overheads measured, not guessed: the KV cache and compute buffers a plan reserves are what llama.cpp allocates
for the model and settings (within 5% of a real run's context, dense streaming and slot banks alike), and the
minimum `plan` reports is the smallest budget `run` accepts for the same settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import api, modes, native, overheads, synth
from orchestrator.config import RunConfig, load_run_config
from orchestrator.errors import FlashflexError
from orchestrator.run.handle import Prepared
from orchestrator.run.settings import GenerationSettings
from tests.helpers import with_settings

pytestmark = pytest.mark.native

CTX, UBATCH = 256, 32
BATCH = RunConfig().context.batch  # what `flashflex plan` assumes


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dense")
    return synth.write_synth_model(synth.preset("tiny-dense", quant="q8_0", n_embd=512, n_ff=1536), out / "m.gguf")


@pytest.fixture(scope="module")
def measuring(patched_llama):
    if "devices" not in patched_llama.info()["features"]:
        pytest.skip("the installed build cannot measure a context's memory; run flashflex build")
    return patched_llama


def _config(path: Path, budget: str, **more):
    return load_run_config(None, {"model.path": path, "budget.size": budget, "context.ctx": CTX,
                                  "context.ubatch": UBATCH, "context.batch": BATCH, **more})


def _allocated(ex: Prepared, path: Path) -> dict:
    """What the run's own context allocates (llama.cpp's buffers, not an estimate)."""
    settings = GenerationSettings(model=path, ctx=CTX, batch=BATCH, ubatch=UBATCH, threads=2,
                                  outputs=ex.settings.outputs)
    with with_settings(ex, settings).session() as handle:
        return native.context_memory(handle.llm.ctx)


def _check_within_5_percent(ex: Prepared, path: Path) -> None:
    r = ex.plan.reservations
    assert r.source == "measured"
    real = _allocated(ex, path)
    assert real["context"] > 0 and real["compute"] > 0
    assert abs(r.kv_cache_bytes - real["context"]) <= 0.05 * real["context"], (r, real)
    # compute: never less than allocated; over by 5% or by 256 KiB, whichever is more (sized for one output row the
    # compute buffers are small, and the measurement's stock graph differs from a streamed one by a few tensors)
    assert real["compute"] <= r.compute_bytes <= real["compute"] + max(0.05 * real["compute"], 256 << 10), (r, real)


def test_dense_streaming_reserves_what_llama_cpp_allocates(measuring, dense_model):
    path = dense_model
    budget = api.prepare(_config(path, "1GiB")).plan.minimum_budget_bytes
    ex = api.prepare(_config(path, f"{budget}B"))
    assert ex.spec.mode == modes.DENSE_STREAM
    _check_within_5_percent(ex, path)


def test_slot_banks_reserve_what_llama_cpp_allocates(measuring, moe_models):
    path, sc = moe_models["qwen3moe"]
    ex = api.prepare(_config(path, "64GiB", **{"moe.mode": "slot-bank", "moe.sidecar": sc}))
    assert ex.spec.mode == modes.SLOT_BANK
    _check_within_5_percent(ex, path)


def test_real_model_reserves_what_llama_cpp_allocates(measuring):
    from orchestrator.modelfile.locate import default_model_path

    path = default_model_path()
    if path is None or not path.exists():
        pytest.skip("the default model is not installed (make demo installs it)")
    ex = api.prepare(_config(path, "230MiB"), own_decodes=True)
    assert ex.spec.mode == modes.DENSE_STREAM
    _check_within_5_percent(ex, path)
    # sized for the one output row a decode asks for, not a row per token of the micro-batch (1 MiB each with
    # Gemma's 262k vocabulary): at ubatch 8, 1.2 MiB instead of 8
    assert ex.plan.reservations.compute_bytes < 2 << 20


def test_measurement_is_cached_per_model_and_settings(measuring, dense_model):
    first = overheads.measure(dense_model, ctx=CTX, ubatch=UBATCH, batch=BATCH)
    where = overheads.cache_file(dense_model, ctx=CTX, ubatch=UBATCH, batch=BATCH)
    assert first is not None and where.is_file()
    assert overheads.measure(dense_model, ctx=CTX, ubatch=UBATCH, batch=BATCH) == first
    bigger = overheads.measure(dense_model, ctx=4 * CTX, ubatch=UBATCH, batch=BATCH)
    assert bigger.kv_bytes > first.kv_bytes  # another ctx is another entry, with its own answer
    where.write_text("{not json")
    assert overheads.measure(dense_model, ctx=CTX, ubatch=UBATCH, batch=BATCH) == first  # a damaged entry re-measures


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_plan_minimum_is_what_run_accepts(measuring, dense_model, tmp_path, threads):
    """`flashflex plan --json` and `run` plan the same settings the same way: the reported minimum runs, one byte
    less is refused (with the same minimum in the message)."""
    import json

    from conftest import flashflex

    out = flashflex("plan", str(dense_model), "--budget", "1GiB", "--ctx", str(CTX), "--ubatch", str(UBATCH),
                    "-tp", str(threads), "--json")
    minimum = json.loads(out.stdout)["minimum_budget_bytes"]
    common = {"prefetch.threads": threads}
    ex = api.prepare(_config(dense_model, f"{minimum}B", **common), own_decodes=True)
    assert ex.plan.minimum_budget_bytes == minimum
    with pytest.raises(FlashflexError, match="below the"):
        api.prepare(_config(dense_model, f"{minimum - 1}B", **common), own_decodes=True)


def _kv_layers_and_context(path: Path, ctx: int, **context: object) -> tuple[list[int] | None, int]:
    from llama_cpp import Llama

    from orchestrator.llamacpp import model_params, quiet_native_stderr

    with quiet_native_stderr(), model_params(no_alloc=True):
        llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=BATCH, n_ubatch=UBATCH, use_mmap=False, verbose=False,
                    **context)
    try:
        return native.kv_layers(llm.ctx), native.context_memory(llm.ctx)["context"]
    finally:
        llm.close()


def test_each_layer_s_kv_cache_adds_up_to_what_llama_cpp_allocates(measuring, dense_model):
    """The per-layer KV cache a GPU placement plans with is llama.cpp's own: it sums to the context's KV buffers,
    each layer of a uniform model alike, and follows the context as llama.cpp pads it (to 256 cells), which the
    planner's formula now does too."""
    from orchestrator.modelfile.reader import read_model_table
    from orchestrator.planner import kv_cache_bytes

    table = read_model_table(dense_model)
    for ctx in (100, CTX, 300):
        layers, total = _kv_layers_and_context(dense_model, ctx)
        assert layers is not None and len(layers) == table.arch.n_layer
        assert sum(layers) == total and len(set(layers)) == 1 and layers[0] > 0
        assert kv_cache_bytes(table, ctx) == total, ctx


def test_sliding_window_layers_hold_fewer_cells_than_the_context(measuring):
    """Gemma 3 without a full-size window cache (llama-server's default): five of every six layers attend within a
    window, so past it their KV cache is smaller than the global layers' and the measurement says so per layer."""
    from orchestrator.modelfile.locate import default_model_path

    path = default_model_path()
    if path is None or not path.exists():
        pytest.skip("the default model is not installed (make demo installs it)")
    layers, total = _kv_layers_and_context(path, 4096, swa_full=False)
    assert layers is not None and sum(layers) == total
    small, large = min(layers), max(layers)
    assert small < large / 2, layers
    assert layers.count(large) == len(layers) // 6, layers  # the global layers: one in six
    full, _ = _kv_layers_and_context(path, 4096)  # llama-cpp-python's default: a full-size window cache
    assert full is not None and len(set(full)) == 1 and full[0] == large


def test_compute_is_sized_for_the_rows_a_micro_batch_asks_for(measuring):
    """llama.cpp reserves logits for every token of a micro-batch unless told how many rows a batch asks for: a
    plain decode asks for one, a verification batch one more per drafted token, llama-server one per slot, logits
    of every position (exactness, the Python API's logits_all) all of them. On Gemma (1 MiB a row) the rows are
    most of the compute buffers."""
    from orchestrator.modelfile.locate import default_model_path

    path = default_model_path()
    if path is None or not path.exists():
        pytest.skip("the default model is not installed (make demo installs it)")
    mib = 1 << 20
    plain = api.prepare(_config(path, "230MiB"), own_decodes=True)
    every = api.prepare(_config(path, "1GiB"))  # the Python API's default: every token, as stock
    assert (plain.settings.outputs, every.settings.outputs) == (1, None)
    grown = every.plan.reservations.compute_bytes - plain.plan.reservations.compute_bytes
    assert abs(grown - (UBATCH - 1) * mib) < 0.05 * grown  # a row of 262144 floats per output
    drafted = api.prepare(_config(path, "230MiB", **{"draft.kind": "prompt-lookup", "draft.max_tokens": 4}),
                          own_decodes=True)
    assert drafted.draft is not None and drafted.draft.max_tokens == 4 and drafted.draft.row_bytes == 2 * mib
    with drafted.session() as handle:
        real = native.context_memory(handle.llm.ctx)
    r = drafted.plan.reservations
    # the context holds the verification batch's 5 rows: the plan reserved one in compute and the four drafted
    # rows in drafting's reservation (each twice: compute, and the output buffer llama.cpp copies it to)
    assert r.compute_bytes + 3.5 * mib < real["compute"] <= r.compute_bytes + r.draft_bytes // 2 + (256 << 10), \
        (r, real)


def test_llama_server_plans_a_row_per_slot(measuring, dense_model):
    from orchestrator import llama_server

    slots = llama_server.plan_slots(_config(dense_model, "1GiB"), {}, 4, log=lambda _m: None)
    assert slots.prepared.settings.outputs == 4  # as llama-server sizes its context: one output per slot


def test_llama_server_decodes_a_micro_batch_per_call_unless_a_config_sets_the_batch(measuring, dense_model):
    """Prompts that arrive together get their first tokens as their micro-batch finishes, not after all of them:
    the logical batch is the micro-batch; a batch the config sets is kept."""
    from orchestrator import llama_server

    def planned(**more):
        cfg = load_run_config(None, {"model.path": dense_model, "budget.size": "1GiB", "context.ctx": CTX,
                                     "context.ubatch": UBATCH, **more})
        return llama_server.plan_slots(cfg, {}, 2, log=lambda _m: None).prepared.settings

    default = planned()
    assert (default.batch, default.ubatch) == (UBATCH, UBATCH)
    assert planned(**{"context.batch": BATCH}).batch == BATCH


def test_llama_servers_slots_are_planned_when_nothing_sets_the_context(measuring, dense_model):
    """A config with no context section (`flashflex serve --budget B`): the plan still holds parallel x ctx tokens of
    KV cache and decodes a micro-batch per call (a value assigned into a section the config did not set used to be
    dropped, planning one slot's context for all of them and a 512-token logical batch)."""
    from orchestrator import llama_server

    cfg = load_run_config(None, {"model.path": dense_model, "budget.size": "1GiB"})
    settings = llama_server.plan_slots(cfg, {}, 2, log=lambda _m: None).prepared.settings
    assert settings.ctx == 2 * cfg.context.ctx and settings.outputs == 2
    assert settings.batch == settings.ubatch
