"""MoE expert slot banks: bitwise-identical logits against stock for resident-bank and for slot-bank at every
bank size from top-k to the expert count, at ubatch 1 and 32 (where a ubatch uses more distinct experts than
the bank holds, so the matmuls run in passes), on qwen3moe and on qwen2moe (shared experts); stats; knobs;
bad input refused before the run; an I/O error during a run ends it with an error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from orchestrator import exact, native, sidecar, synth
from orchestrator.errors import FlashflexError
from orchestrator.modelfile.reader import read_model_table
from orchestrator.run import execution, loader
from orchestrator.run.handle import Prepared
from orchestrator.run.settings import GenerationSettings
from tests.helpers import open_plan, prepare, prepared_of, with_settings

from conftest import flashflex

pytestmark = pytest.mark.native

CTX = 128


@pytest.fixture(scope="module")
def banks(patched_llama):
    if "slot-bank" not in patched_llama.info()["features"]:
        pytest.skip("the installed build predates MoE slot banks; run flashflex build")
    return patched_llama


def _execution(path: Path, sc: Path, mode: str, slots: int | None = None, ubatch: int = 1, **moe) -> Prepared:
    return prepare({"model.path": path, "budget.size": "64GiB", "context.ctx": CTX, "context.ubatch": ubatch,
                    "moe.mode": mode, "moe.sidecar": sc, "moe.slot_bank": slots,
                    **{f"moe.{k}": v for k, v in moe.items()}}, _settings(path, ubatch))


def _settings(path: Path, ubatch: int) -> GenerationSettings:
    return GenerationSettings(model=path, ctx=CTX, batch=64, ubatch=ubatch, threads=2)


def _bank_sizes(path: Path) -> list[int]:
    """Top-k, top-k + 1, the middle, and the expert count and one below it."""
    arch = read_model_table(path).arch
    k, e = arch.n_expert_used, arch.n_expert
    return sorted({k, k + 1, (k + e) // 2, e - 1, e})


@pytest.mark.parametrize("family", ["qwen3moe", "qwen2moe", "qwen3moe-q4_0"])
@pytest.mark.parametrize("ubatch", [1, 32])
def test_slot_bank_is_bitwise_exact_at_every_bank_size(banks, moe_models, family, ubatch):
    path, sc = moe_models[family]
    settings = _settings(path, ubatch)
    tokens = exact.teacher_tokens(40, 512, seed=1)
    stock = exact.logits(prepared_of(settings), tokens)
    for slots in _bank_sizes(path):
        ex = _execution(path, sc, "slot-bank", slots, ubatch)
        assert ex.spec.banks is not None and ex.spec.banks.slots == slots
        result = exact.compare(stock, exact.logits(ex, tokens))
        assert result.identical, (family, ubatch, slots, result)


def test_many_passes_fit_in_the_graph(banks, tmp_path):
    """128 experts, top-8, a bank of 8 and ubatch 64: 16 passes for each of 36 banked tensors, more nodes than
    llama.cpp's default graph budget holds unless the runtime counts them."""
    spec = synth.preset("tiny-qwen3moe", n_layer=12, n_expert=128, n_expert_used=8, expert_ffn=32)
    path = synth.write_synth_model(spec, tmp_path / "wide.gguf")
    sc = tmp_path / "wide.sidecar"
    sidecar.extract(path, sc)
    ex = _execution(path, sc, "slot-bank", 8, ubatch=64)
    assert exact.verify(ex, 64).identical


@pytest.mark.parametrize("family", ["qwen3moe", "qwen2moe"])
def test_resident_bank_is_bitwise_exact(banks, moe_models, family):
    path, sc = moe_models[family]
    ex = _execution(path, sc, "resident-bank", ubatch=32)
    assert ex.spec.mode == "resident-bank" and ex.spec.banks.slots == 0
    assert exact.verify(ex, 40).identical


def test_run_reports_bank_stats_per_layer(banks, moe_models):
    path, sc = moe_models["qwen3moe"]
    r = flashflex("run", "-m", str(path), "--moe-mode", "slot-bank", "--moe-sidecar", str(sc), "--moe-slot-bank",
                  "6", "--ctx", str(CTX), "-n", "6", "--prompt", "one two three", "--draft", "none", "--json",
                  check=True)  # one decode call per token (drafting verifies several per call)
    stats = json.loads(r.stdout)["stats"]
    assert stats["mode"] == "slot-bank" and stats["lossy"] == []
    for phase in ("prompt", "decode"):
        m = stats["moe"][phase]
        assert m["slots"] == 6 and m["error"] is None
        assert len(m["layers"]) == 3  # every layer of tiny-qwen3moe is MoE
        assert m["hits"] == sum(layer["hits"] for layer in m["layers"])
        assert m["misses"] == sum(layer["misses"] for layer in m["layers"])
        assert m["bytes_read"] == sum(layer["bytes_read"] for layer in m["layers"])
        # one call per layer and token in decode; every call resolves top-k experts
        assert m["hits"] + m["misses"] >= m["tokens"] * 4 * 3 if phase == "decode" else m["calls"] >= 3
        assert 0.0 <= m["hit_rate"] <= 1.0
    decode = stats["moe"]["decode"]
    assert decode["calls"] == decode["tokens"] * 3
    # a decode pass resolves one token's top-4 experts in one layer; a prompt pass the union of its tokens' (between
    # one token's 4 and the bank's 6 slots: a union larger than the bank is split into passes)
    assert decode["passes"] == decode["calls"] and decode["experts_resolved_per_pass"] == 4
    assert decode["experts_resolved_per_token"] == 4 * 3
    prompt = stats["moe"]["prompt"]
    assert 4 <= prompt["experts_resolved_per_pass"] <= 6, prompt
    # a miss reads one expert slice of each of the three routed tensors
    per_miss = sum(t.bytes_per_expert for t in sidecar.load_manifest(sc).tensors if t.layer == 0)
    assert decode["bytes_read"] == decode["misses"] * per_miss


def test_a_bank_of_every_expert_stops_missing(banks, moe_models):
    path, sc = moe_models["qwen3moe"]
    ex = _execution(path, sc, "slot-bank", 16)
    result = execution.run(with_settings(ex, GenerationSettings(model=path, prompt="a b c d e f", n_predict=8,
                                                                ctx=CTX, threads=2)))
    decode = result.stats["moe"]["decode"]
    # 16 slots hold all 16 experts: once the prompt has installed what it used, decode misses only experts
    # the prompt never routed to, never one it already read
    assert decode["misses"] <= 16 * 3
    assert decode["hit_rate"] > 0.5


def test_topk_is_labelled_lossy_and_changes_output(banks, moe_models):
    path, sc = moe_models["qwen3moe"]
    ex = _execution(path, sc, "slot-bank", 4, topk=2)
    assert ex.lossy and "topk" in ex.lossy[0]
    assert ex.spec.kv_overrides == {"qwen3moe.expert_used_count": 2}
    result = exact.verify(ex, 16)
    assert not result.identical
    r = flashflex("run", "-m", str(path), "--moe-mode", "slot-bank", "--moe-sidecar", str(sc), "--moe-topk", "2",
                  "--ctx", str(CTX), "-n", "2")
    assert r.returncode == 0 and "LOSSY" in r.stderr


def test_shared_only_reads_nothing(banks, moe_models):
    path, sc = moe_models["qwen2moe"]
    ex = _execution(path, sc, "slot-bank", 2, shared_only=True)
    result = execution.run(with_settings(ex, GenerationSettings(model=path, prompt="a b c", n_predict=4, ctx=CTX,
                                                                threads=2)))
    for phase in ("prompt", "decode"):
        assert result.stats["moe"][phase]["bytes_read"] == 0
        assert result.stats["moe"][phase]["shared_only"] is True
    assert any("shared-only" in reason for reason in result.stats["lossy"])


# --------------------------------------------------------------------------------------------------
# bad input: one clear line before the run starts


def _copy_sidecar(sc: Path, to: Path) -> Path:
    """A copy that the cheap pre-run check still accepts (same sizes and mtimes)."""
    to.mkdir()
    for f in sc.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
        os.utime(to / f.name, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns))
    return to


def _run_error(*args: str) -> str:
    r = flashflex("run", *args, "--ctx", str(CTX), "-n", "2")
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_slot_bank_without_a_sidecar_is_refused(banks, moe_models, tmp_path):
    path, _ = moe_models["qwen3moe"]
    line = _run_error("-m", str(path), "--moe-mode", "slot-bank", "--moe-sidecar", str(tmp_path / "none"))
    assert "sidecar" in line and "flashflex sidecar extract" in line


def test_sidecar_of_another_model_is_refused(banks, moe_models):
    path, _ = moe_models["qwen3moe"]
    _, other = moe_models["qwen3moe-q4_0"]
    line = _run_error("-m", str(path), "--moe-mode", "slot-bank", "--moe-sidecar", str(other))
    assert "another model" in line


def test_bank_below_topk_is_refused(banks, moe_models):
    path, sc = moe_models["qwen3moe"]
    line = _run_error("-m", str(path), "--moe-mode", "slot-bank", "--moe-sidecar", str(sc), "--moe-slot-bank", "3")
    assert "below top-k" in line


def test_truncated_layer_file_is_refused(banks, moe_models, tmp_path):
    path, sc = moe_models["qwen3moe"]
    copy = _copy_sidecar(sc, tmp_path / "sc")
    victim = copy / sidecar.load_manifest(sc).layers[1].file
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size - 4096)
    line = _run_error("-m", str(path), "--moe-mode", "slot-bank", "--moe-sidecar", str(copy))
    assert victim.name in line and "truncated" in line


def test_shared_only_on_a_dense_model_is_refused(banks, tmp_path):
    dense = synth.write_synth_model(synth.preset("tiny-dense"), tmp_path / "dense.gguf")
    line = _run_error("-m", str(dense), "--moe-shared-only")
    assert "MoE" in line


def test_an_io_error_during_the_run_ends_it_with_an_error(banks, moe_models, tmp_path):
    """A layer file that shrinks after the load (what a vanishing or rewritten file looks like to pread):
    the next miss fails, llama_decode is aborted, and the run reports the file instead of crashing."""
    path, sc = moe_models["qwen3moe"]
    copy = _copy_sidecar(sc, tmp_path / "sc")
    ex = _execution(path, copy, "slot-bank", 4)
    llm = loader.open_model(_settings(path, 1), ex.spec)
    try:
        for layer in sidecar.load_manifest(copy).layers:
            os.truncate(copy / layer.file, 4096)  # only the header page is left
        with pytest.raises(RuntimeError):
            llm.eval(exact.teacher_tokens(8, llm.n_vocab(), seed=3))
        error = native.model_error(llm.model)
        assert error is not None and "ended early" in error
    finally:
        llm.close()


def test_stock_stays_stock_without_a_configuration(banks, moe_models):
    """No flashflex configuration: a MoE model opens through upstream's path (no bank stats exist)."""
    path, _ = moe_models["qwen3moe"]
    llm = open_plan(_settings(path, 1), None)
    try:
        assert native.moe_stats(llm.model) is None
    finally:
        llm.close()


def test_verify_exact_cli_on_slot_bank(banks, moe_models):
    path, sc = moe_models["qwen2moe"]
    r = flashflex("verify-exact", "-m", str(path), "--moe-mode", "slot-bank", "--moe-sidecar", str(sc),
                  "--moe-slot-bank", "2", "-ub", "32", "--ctx", str(CTX), "--tokens", "40", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["identical"] and out["mode"] == "slot-bank (2 slots)"


def test_execution_errors_are_flashflex_errors(banks, moe_models):
    path, sc = moe_models["qwen3moe"]
    with pytest.raises(FlashflexError, match="trace"):
        _execution(path, sc, "oracle-all-hit", 4, trace=Path("/nonexistent.jsonl"))
