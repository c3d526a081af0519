"""Dense streaming: bitwise-identical logits against stock for every budget from the planner's minimum to
above model size, with and without prefetch threads, at any ubatch; stats; bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from orchestrator import exact, native, synth
from orchestrator.config import PrefetchConfig
from orchestrator.errors import FlashflexError
from orchestrator.modelfile.reader import read_model_table
from orchestrator.run import execution
from orchestrator.run.settings import GenerationSettings
from tests.helpers import open_plan, plan_table, prepared_of
from tests.helpers import streamed as streamed_names

from conftest import flashflex

pytestmark = pytest.mark.native

CTX = 256


@pytest.fixture(scope="module")
def streaming(patched_llama):
    if "dense-stream" not in patched_llama.info()["features"]:
        pytest.skip("the installed build predates dense streaming; run flashflex build")
    return patched_llama


@pytest.fixture(scope="module")
def dense_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny llama-family models with GQA, in a repacked quant (Q4_0) and a plain one (Q8_0)."""
    out = tmp_path_factory.mktemp("dense")
    return {q: synth.write_synth_model(synth.preset("tiny-dense", quant=q, n_embd=512, n_ff=1536), out / f"{q}.gguf")
            for q in ("q4_0", "q8_0")}


def _plan(path: Path, where: str, threads: int, ubatch: int, repack: bool = False):
    table = read_model_table(path)
    prefetch = PrefetchConfig(threads=threads, window=2, repack=repack)
    full = plan_table(table, 1 << 40, ctx=CTX, ubatch=ubatch, prefetch=prefetch)
    lo, hi = full.minimum_budget_bytes, full.model_bytes + full.reserved_bytes
    budget = {"min": lo, "mid": (lo + hi) // 2, "above": hi + (64 << 20)}[where]
    return plan_table(table, budget, ctx=CTX, ubatch=ubatch, prefetch=prefetch)


def _settings(path: Path, ubatch: int) -> GenerationSettings:
    return GenerationSettings(model=path, ctx=CTX, batch=64, ubatch=ubatch, threads=2)


@pytest.mark.parametrize("quant", ["q4_0", "q4_0-repacked", "q8_0"])
@pytest.mark.parametrize("where", ["min", "mid", "above"])
@pytest.mark.parametrize("threads", [0, 2])
@pytest.mark.parametrize("ubatch", [1, 32])
def test_streaming_is_bitwise_exact(streaming, dense_models, quant, where, threads, ubatch):
    """Streamed weights in the file's layout (the default: the model loads without repacking, and so does stock's
    reference) and, with prefetch.repack, in the CPU backend's repacked layout (staged and repacked on arrival,
    against stock's repacked weights)."""
    path = dense_models[quant.split("-")[0]]
    plan = _plan(path, where, threads, ubatch, repack=quant.endswith("repacked"))
    streamed = streamed_names(plan)
    if where == "above":
        assert not streamed and plan.fits_entirely
    else:
        assert streamed  # the budget really is below the model: something streams
    result = exact.verify(prepared_of(_settings(path, ubatch), plan if streamed else None), n_tokens=40)
    assert result.identical, result


def test_stats_count_the_streamed_bytes(streaming, dense_models):
    path = dense_models["q8_0"]
    plan = _plan(path, "min", threads=1, ubatch=32)
    result = execution.run(prepared_of(GenerationSettings(model=path, prompt="hello world", n_predict=6, ctx=CTX,
                                                       ubatch=32, threads=2), plan))
    decode = result.stats["decode"]
    assert result.stats["mode"] == "dense-stream"
    assert decode["tokens"] == len(result.tokens) == 6
    # Every streamed tensor is read once per token (the ring is smaller than the streamed layers), plus the
    # page padding around each tensor; the phase edges shift at most one window of layers (2 of 4 here)
    # between the prompt's count and the decode's, spread over the 6 tokens.
    planned = plan.estimates.dense_streamed_bytes_per_token
    n_streamed = len(streamed_names(plan))
    edge = planned * 2 / 4 / 6
    assert planned - edge <= decode["bytes_read_per_token"] <= planned + n_streamed * 2 * 4096 + edge
    assert decode["wait_seconds"] >= 0 and decode["compute_seconds"] > 0
    assert decode["error"] is None


def test_a_run_leaves_no_sampler_chains_for_the_cycle_collector(streaming, dense_models):
    """Each sampler chain holds a vocabulary-sized buffer until it is freed; one built per token (Llama.sample
    without a sampler) is freed only by Python's cycle collector, so a long decode's heap grew outside the plan."""
    import gc

    from llama_cpp._internals import LlamaSampler

    path = dense_models["q4_0"]
    plan = _plan(path, "min", threads=1, ubatch=32)
    prepared = prepared_of(GenerationSettings(model=path, prompt="hello world", n_predict=12, ctx=CTX, ubatch=32,
                                              threads=2, temperature=0.8), plan)
    gc.collect()
    gc.disable()
    try:
        result = execution.run(prepared)
        alive = [o for o in gc.get_objects() if isinstance(o, LlamaSampler) and o.sampler is not None]
    finally:
        gc.enable()
    assert len(result.tokens) == 12
    assert alive == []


def test_real_model_realigned_is_exact(streaming, tmp_path):
    from orchestrator.modelfile.locate import default_model_path
    from orchestrator.modelfile.realign import realign

    aligned = realign(default_model_path(log=lambda m: None), tmp_path / "gemma-4096.gguf", alignment=4096).dst
    plan = _plan(aligned, "min", threads=2, ubatch=32)
    assert plan.prefetch.direct_io
    assert exact.verify(prepared_of(_settings(aligned, 32), plan), n_tokens=24).identical


def test_unaligned_file_streams_exactly_with_buffered_reads(streaming):
    from orchestrator.modelfile.locate import default_model_path

    path = default_model_path(log=lambda m: None)  # 32-aligned as published
    plan = _plan(path, "mid", threads=1, ubatch=8)
    assert not plan.prefetch.direct_io
    assert exact.verify(prepared_of(_settings(path, 8), plan), n_tokens=16).identical


def test_cli_verify_exact_and_run_json(streaming, dense_models):
    path = str(dense_models["q4_0"])
    settings = ["-tp", "2", "--prefetch-window", "2", "--ctx", str(CTX), "--ubatch", "32"]
    planned = flashflex("plan", path, "--budget", "1GiB", *settings, "--json")
    assert planned.returncode == 0, planned.stderr
    budget = f"{json.loads(planned.stdout)['minimum_budget_bytes']}B"  # plan's minimum is what run accepts
    common = ["--model", path, "--budget", budget, *settings]
    result = flashflex("verify-exact", *common, "--tokens", "24", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["identical"] and out["mode"] == "dense-stream" and out["max_abs_diff"] == 0.0
    run = flashflex("run", *common, "-n", "4", "--json")
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout)["stats"]
    assert stats["mode"] == "dense-stream" and stats["decode"]["bytes_read"] > 0


def test_budget_below_minimum_is_refused_before_loading(streaming, dense_models):
    result = flashflex("run", "--model", str(dense_models["q8_0"]), "--budget", "1MiB", "--ctx", str(CTX))
    assert result.returncode != 0
    assert "below the" in result.stderr and "minimum" in result.stderr
    assert "Traceback" not in result.stderr


def test_plan_for_another_file_is_refused(streaming, dense_models):
    plan = _plan(dense_models["q8_0"], "min", threads=1, ubatch=32)
    # Shift one streamed tensor's offset: the load must notice the plan does not describe this file.
    victim = next(t for t in plan.tensors if t.placement == "streamed")
    victim.offset += 4096
    with pytest.raises(FlashflexError, match="re-plan"):
        open_plan(_settings(dense_models["q8_0"], 32), plan)


def test_file_shrinking_mid_run_ends_with_an_error(streaming, dense_models, tmp_path):
    path = tmp_path / "victim.gguf"
    shutil.copyfile(dense_models["q8_0"], path)
    plan = _plan(path, "min", threads=1, ubatch=32)
    llm = open_plan(_settings(path, 32), plan)
    try:
        llm.eval([5, 6, 7, 8])
        os.truncate(path, path.stat().st_size // 2)
        with pytest.raises(RuntimeError):
            for tok in range(9, 20):
                llm.eval([tok])
        assert "ended early" in native.model_error(llm.model)
    finally:
        llm.close()


def test_a_second_context_on_a_streamed_model_is_refused(streaming, dense_models):
    """The ring belongs to the model and decoding changes it: a second context on the same model would evict the
    layers the first computes with, so llama.cpp refuses to create it, with the reason; once the first context is
    freed, the model serves a new one. A stock model keeps any number of contexts."""
    import llama_cpp

    def new_context(model):
        return llama_cpp.llama_init_from_model(model, llama_cpp.llama_context_default_params())

    path = dense_models["q8_0"]
    llm = open_plan(_settings(path, 32), _plan(path, "min", threads=1, ubatch=32))
    try:
        assert not new_context(llm.model)
        assert "serves one context at a time" in native.last_error()
        llm._ctx.close()  # the Llama's own context
        second = new_context(llm.model)
        assert second
        llama_cpp.llama_free(second)
    finally:
        llm.close()

    stock = open_plan(_settings(path, 32), None)
    try:
        extra = new_context(stock.model)
        assert extra
        llama_cpp.llama_free(extra)
    finally:
        stock.close()


@pytest.mark.parametrize("mirror", [True, False])
@pytest.mark.parametrize("quant", ["q4_0", "q8_0"])
def test_byte_ring_is_exact(streaming, dense_models, quant, mirror):
    """The default read-ahead is a ring sized in bytes: tensors at fixed homes laid out in compute order, a read
    issued as soon as the bytes of its home are released. At the minimum budget the ring is far smaller than what
    streams, so tensors of different layers share bytes and a layer's reads wait on the release of the layers
    before it; mirrored (the default on Linux), homes run on across the ring's end into its second mapping, flat
    they wrap. The logits stay bitwise identical and the runtime allocates the ring the plan paid for."""
    path = dense_models[quant]
    table = read_model_table(path)
    prefetch = PrefetchConfig(threads=2, mirror=mirror)  # window auto
    minimum = plan_table(table, 1 << 40, ctx=CTX, ubatch=32, prefetch=prefetch).minimum_budget_bytes
    plan = plan_table(table, minimum, ctx=CTX, ubatch=32, prefetch=prefetch)
    assert plan.prefetch.window == "auto"
    streamed = sum(d.n_bytes for d in plan.tensors if d.placement == "streamed")
    assert plan.prefetch.buffer_bytes < plan.prefetch.ring_bytes < streamed  # homes are shared across layers
    result = exact.verify(prepared_of(_settings(path, 32), plan), n_tokens=40)
    assert result.identical, result
    gen = execution.run(prepared_of(GenerationSettings(model=path, prompt="hello world", n_predict=4, ctx=CTX,
                                                    ubatch=32, threads=2), plan))
    stats = gen.stats["decode"]
    assert plan.prefetch.ring_bytes <= stats["ring_bytes"] <= plan.prefetch.ring_bytes + 2 * 4096
    assert (stats["mirrored_rings"] == stats["rings"]) if mirror else stats["mirrored_rings"] == 0, str(stats)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_prompt_of_several_ubatches_that_wants_one_output_streams(streaming, dense_models, threads):
    """A prompt longer than one ubatch, logits for its last token only: llama.cpp trims the last layer of every
    other ubatch to zero rows, so that layer's closing boundary never runs; the next ubatch must not wait for its
    release (it hung once). Run as a user would, with a time limit."""
    path = str(dense_models["q8_0"])
    settings = ["-tp", str(threads), "--ctx", str(CTX), "--ubatch", "8"]
    planned = flashflex("plan", path, "--budget", "1GiB", *settings, "--json")
    minimum = json.loads(planned.stdout)["minimum_budget_bytes"]
    prompt = " ".join(["the cat sat on the mat and the dog sat on the log"] * 4)
    result = flashflex("run", "--model", path, "--budget", f"{minimum}B", *settings, "-n", "4", "--prompt", prompt,
                       "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    assert stats["mode"] == "dense-stream" and stats["prompt"]["tokens"] > 8


@pytest.fixture(scope="module")
def wide_ffn_model(tmp_path_factory) -> Path:
    """Q4_0 (repacked on arrival on x86) with FFN matrices larger than one 4 MiB read job, in both directions."""
    out = tmp_path_factory.mktemp("wide-ffn")
    spec = synth.preset("tiny-dense", quant="q4_0", n_layer=4, n_embd=512, n_ff=16384)
    return synth.write_synth_model(spec, out / "wide-ffn.gguf")


@pytest.mark.parametrize("threads", [0, 2])
@pytest.mark.parametrize("ubatch", [1, 32])
def test_a_ring_smaller_than_a_layer_is_exact(streaming, wide_ffn_model, threads, ubatch):
    """Compute holds one matmul weight at a time (a use node before each matmul waits for its weight and releases
    the one before), so a ring of two largest tensors, less than a layer, streams every weight; the layout follows
    the order the graph uses the weights in, and repacked matrices are staged a row group (one read job) at a
    time. The logits stay bitwise identical."""
    path = wide_ffn_model
    table = read_model_table(path)
    prefetch = PrefetchConfig(threads=threads, repack=True)
    minimum = plan_table(table, 1 << 40, ctx=CTX, ubatch=ubatch, prefetch=prefetch).minimum_budget_bytes
    plan = plan_table(table, minimum, ctx=CTX, ubatch=ubatch, prefetch=prefetch)
    streamed = [d.n_bytes for d in plan.tensors if d.placement == "streamed"]
    largest = max(streamed) + 2 * 4096
    assert largest > 4 << 20  # staged in row groups
    small = plan.model_copy(update={"prefetch": plan.prefetch.model_copy(update={"ring_bytes": 2 * largest})})
    assert small.prefetch.ring_bytes < plan.prefetch.buffer_bytes  # less than the largest streamed layer
    result = exact.verify(prepared_of(_settings(path, ubatch), small), n_tokens=24)
    assert result.identical, result
    gen = execution.run(prepared_of(GenerationSettings(model=path, prompt="hello world", n_predict=4, ctx=CTX,
                                                    ubatch=ubatch, threads=2), small))
    stats = gen.stats["decode"]
    assert stats["error"] is None and stats["relayouts"] <= 1
    assert stats["ring_bytes"] <= 2 * largest + 2 * 4096
    # staging: one row group per thread (the largest matrix would be 4.7 MB a thread)
    assert 0 < stats["staging_bytes"] <= max(1, threads) * ((4 << 20) + 3 * 4096)


def _repacked_mib(prepared, monkeypatch) -> float:
    """MiB of weights the CPU backend holds in its repacked layout once `prepared` is loaded: llama.cpp's load log
    ("CPU_REPACK model buffer size = ..."), read through llama-cpp-python's log callback, which the loader's own
    capture forwards every line to."""
    import re

    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []
    forward = _logger.llama_log_callback

    @llama_cpp.llama_log_callback
    def capture(level, text, user_data):
        lines.append(text.decode("utf-8", errors="replace"))
        forward(level, text, user_data)

    with monkeypatch.context() as m:
        m.setattr(_logger, "llama_log_callback", capture)
        llama_cpp.llama_log_set(capture, None)
        try:
            with prepared.session():
                pass
        finally:
            llama_cpp.llama_log_set(forward, None)
    return sum(float(v) for v in re.findall(r"CPU_REPACK model buffer size = +([0-9.]+) MiB", "".join(lines)))


def test_streamed_weights_keep_the_files_layout_by_default(streaming, wide_ffn_model, monkeypatch):
    """A type the CPU backend repacks (Q4_0) streams in the file's layout unless prefetch.repack: the spec keeps the
    streamed weights out of the repacked layout, so the reads go straight into their homes (no staging, no repacking
    on the read path) and the plan reserves no staging, while resident weights stay repacked as stock repacks them;
    stock's reference (exactness) keeps the same weights in the file's layout, so both run the same kernels."""
    path = wide_ffn_model
    table = read_model_table(path)
    repack = {"threads": 2, "repack": True}
    full = plan_table(table, 1 << 40, ctx=CTX, ubatch=1, prefetch=repack)
    budget = (full.minimum_budget_bytes + full.model_bytes) // 2  # some weights resident, some streamed
    runs = {}
    for name, prefetch in (("file", {"threads": 2}), ("repacked", repack)):
        plan = plan_table(table, budget, ctx=CTX, ubatch=1, prefetch=prefetch)
        prepared = prepared_of(GenerationSettings(model=path, prompt="hello world", n_predict=4, ctx=CTX, ubatch=1,
                                                  threads=2), plan)
        assert prepared.stock().spec.file_layout == prepared.spec.file_layout  # exactness: the same kernels
        runs[name] = (plan, prepared, execution.run(prepared).stats["decode"])
    plan, prepared, stats = runs["file"]
    streamed, resident = streamed_names(plan), [t.name for t in plan.tensors if t.placement == "resident"
                                                and t.name.endswith(".weight") and "blk." in t.name]
    assert streamed and resident and prepared.spec.file_layout == streamed
    assert plan.prefetch.file_layout and plan.prefetch.staging_bytes == 0
    assert stats["error"] is None and stats["staging_bytes"] == 0 and stats["bytes_read_per_token"] > 0
    everything = _repacked_mib(prepared_of(prepared.settings), monkeypatch)  # stock alone: every Q4_0 matrix
    if everything == 0:
        pytest.skip("the CPU backend repacks no Q4_0 on this CPU")
    resident_repacked = _repacked_mib(prepared, monkeypatch)
    assert 0 < resident_repacked < everything  # the resident weights are repacked, the streamed ones are not
    assert _repacked_mib(prepared.stock(), monkeypatch) == resident_repacked  # and the same ones in stock's reference
    plan, prepared, stats = runs["repacked"]
    assert not plan.prefetch.file_layout and plan.prefetch.staging_bytes > 0 and not prepared.spec.file_layout
    assert stats["error"] is None and stats["staging_bytes"] > 0


def test_a_second_real_architecture_streams_exactly(streaming):
    """SmolLM2-135M-Instruct (llama architecture, Q4_1), chat's default model, under a 60 MiB budget."""
    from orchestrator.modelfile.locate import default_chat_model_path

    out = flashflex("verify-exact", "-m", str(default_chat_model_path()), "--budget", "60MiB", "--ctx", "256",
                    "--ubatch", "8", "--tokens", "32", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["identical"] and result["mode"] == "dense-stream", result
