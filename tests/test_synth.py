"""Synthetic models: valid specs, exact layout, deterministic bytes, bounded memory, and llama.cpp runs them."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import typer
from gguf import GGUFReader, Keys
from gguf.quants import dequantize
from typer.testing import CliRunner

from orchestrator import synth
from orchestrator.cli import gguf_cmd
from orchestrator.errors import FlashflexError
from orchestrator.modelfile.reader import read_model_table
from orchestrator.modelfile.table import Role

TINY = ["tiny-dense", "tiny-qwen3moe", "tiny-qwen2moe", "tiny-deepseek"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("synth")
    return {name: synth.write_synth_model(synth.preset(name), out / f"{name}.gguf") for name in TINY}


# ---------------------------------------------------------------------------------------------- specs


def test_every_preset_is_valid():
    for name in synth.PRESETS:
        spec = synth.preset(name)
        assert synth.plan_tensors(spec)


def test_benchmark_presets_have_the_advertised_shapes():
    dense = synth.preset("dense-7b-q4_0")
    assert (dense.n_layer, dense.n_embd, dense.n_ff, dense.n_head, dense.quant) == (32, 4096, 11008, 32, "q4_0")
    assert 3.7e9 < synth.estimate_bytes(dense) < 3.9e9  # the size of a real 7B Q4_0
    moe = synth.preset("moe-a3b-12l-q4_0")
    assert (moe.n_layer, moe.n_embd, moe.n_expert, moe.n_expert_used, moe.expert_ffn) == (12, 2048, 128, 8, 768)
    assert (moe.n_head, moe.n_head_kv, moe.head_size) == (32, 4, 128)
    experts = [t for t in synth.plan_tensors(moe) if "_exps" in t.name]
    assert len(experts) == 3 * 12
    assert experts[0].shape == (2048, 768, 128)
    top4 = synth.preset("moe-64x4-16l-q4_0")  # issue 27's small-bank case: few misses a layer
    assert (top4.n_layer, top4.n_expert, top4.n_expert_used) == (16, 64, 4)
    assert 3.7 * 2**30 < synth.estimate_bytes(top4) < 4.1 * 2**30


@pytest.mark.parametrize("draft, target", [("draft-for-7b", "dense-7b-q4_0"), ("draft-for-a3b", "moe-a3b-12l-q4_0"),
                                           ("tiny-draft", "tiny-dense"), ("tiny-draft", "tiny-qwen3moe")])
def test_draft_presets_share_their_targets_vocabulary_and_are_small(draft, target):
    d, t = synth.preset(draft), synth.preset(target)
    assert d.n_vocab == t.n_vocab and d.arch == "llama"
    assert synth.build_vocab(d.n_vocab) == synth.build_vocab(t.n_vocab)  # the vocabulary comes from n_vocab alone
    assert synth.estimate_bytes(d) < 0.02 * synth.estimate_bytes(t) or target.startswith("tiny")


@pytest.mark.parametrize("overrides, message", [
    ({"n_embd": 100}, "multiple"),
    ({"n_head_kv": 3}, "n_head_kv"),
    ({"n_expert_used": 99}, "n_expert_used"),
    ({"alignment": 1000}, "power of two"),
    ({"n_vocab": 50}, "n_vocab"),
    ({"bogus_field": 1}, "bogus_field"),
    ({"n_layer": "many"}, "n_layer"),
])
def test_bad_specs_are_one_line_errors(overrides, message):
    with pytest.raises(FlashflexError) as exc:
        synth.preset("tiny-qwen3moe", **overrides)
    line = exc.value.one_line()
    assert message in line and "\n" not in line


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(FlashflexError, match="tiny-dense"):
        synth.preset("huge")


def test_arch_specific_rules():
    with pytest.raises(FlashflexError, match="head_dim"):
        synth.preset("tiny-qwen2moe", head_dim=64)
    with pytest.raises(FlashflexError, match="n_shared_expert"):
        synth.preset("tiny-deepseek", n_shared_expert=0)
    with pytest.raises(FlashflexError, match="n_leading_dense"):
        synth.preset("tiny-qwen3moe", n_leading_dense=1)
    synth.preset("tiny-dense", quant="f16", n_embd=240, n_head=8, n_ff=300)  # f16 has no block constraint


# ---------------------------------------------------------------------------------------------- vocab


def test_vocab_is_exact_unique_and_complete():
    for n in (synth.min_vocab_size(), 512, 5000):
        vocab = synth.build_vocab(n)
        assert len(vocab.tokens) == len(vocab.scores) == len(vocab.types) == n
        assert len(set(vocab.tokens)) == n
    vocab = synth.build_vocab(512)
    assert vocab.tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert "<0x0A>" in vocab.tokens and "\u2581the" in vocab.tokens


# ---------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("name", TINY)
def test_file_layout_matches_the_plan(tiny, name):
    spec = synth.preset(name)
    table = read_model_table(tiny[name])
    planned = synth.plan_tensors(spec)
    assert [t.name for t in table.tensors] == [p.name for p in planned]
    assert [t.shape for t in table.tensors] == [p.shape for p in planned]
    assert [t.n_bytes for t in table.tensors] == [p.n_bytes for p in planned]
    assert all(t.offset % spec.alignment == 0 for t in table.tensors)
    assert table.arch.arch == spec.arch and table.arch.n_layer == spec.n_layer
    assert tiny[name].stat().st_size % spec.alignment == 0
    for t in table.tensors:
        assert t.ggml_type == ("F32" if t.role in (Role.NORM, Role.ROUTER) else "Q8_0")


@pytest.mark.parametrize("quant", ["q4_0", "q8_0", "f16"])
def test_weights_have_the_planned_scale(tmp_path, quant):
    spec = synth.preset("tiny-dense", quant=quant)
    path = synth.write_synth_model(spec, tmp_path / "m.gguf")
    reader = GGUFReader(path)
    planned = {p.name: p for p in synth.plan_tensors(spec)}
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type).astype(np.float64)
        p = planned[t.name]
        if p.std == 0.0:
            assert np.all(values == 1.0)
            continue
        assert np.all(np.isfinite(values))
        assert abs(values.mean()) < 0.05 * p.std
        assert 0.9 * p.std < values.std() < 1.15 * p.std


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = synth.write_synth_model(synth.preset("tiny-qwen3moe"), tmp_path / "a.gguf")
    b = synth.write_synth_model(synth.preset("tiny-qwen3moe"), tmp_path / "b.gguf")
    c = synth.write_synth_model(synth.preset("tiny-qwen3moe", seed=7), tmp_path / "c.gguf")
    assert a.read_bytes() == b.read_bytes()
    ta, tc = read_model_table(a), read_model_table(c)
    assert [t.offset for t in ta.tensors] == [t.offset for t in tc.tensors]
    embd = ta.tensors[0]
    with open(a, "rb") as fa, open(c, "rb") as fc:
        fa.seek(embd.offset)
        fc.seek(embd.offset)
        assert fa.read(embd.n_bytes) != fc.read(embd.n_bytes)


def test_a_tensor_depends_only_on_seed_and_name(tmp_path):
    """Growing the model keeps the existing layers' bytes, so shapes can be compared layer by layer."""
    small = synth.write_synth_model(synth.preset("tiny-dense", n_layer=2), tmp_path / "s.gguf")
    big = synth.write_synth_model(synth.preset("tiny-dense", n_layer=4), tmp_path / "b.gguf")

    def blob(path: Path, name: str) -> bytes:
        t = next(t for t in read_model_table(path).tensors if t.name == name)
        with open(path, "rb") as fh:
            fh.seek(t.offset)
            return fh.read(t.n_bytes)

    assert blob(small, "blk.1.ffn_up.weight") == blob(big, "blk.1.ffn_up.weight")


def test_generation_streams_in_bounded_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "CHUNK_BYTES", 1 << 20)
    spec = synth.preset("tiny-dense", n_embd=1024, n_head=16, n_head_kv=4, n_ff=4096, n_layer=4, quant="f16")
    assert synth.estimate_bytes(spec) > 100 << 20
    tracemalloc.start()
    try:
        synth.write_synth_model(spec, tmp_path / "m.gguf")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_failed_generation_leaves_no_file(tmp_path, monkeypatch):
    def broken(t, seed):
        yield np.zeros(16, dtype=np.uint8)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(synth, "tensor_chunks", broken)
    with pytest.raises(RuntimeError):
        synth.write_synth_model(synth.preset("tiny-dense"), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_custom_alignment(tmp_path):
    path = synth.write_synth_model(synth.preset("tiny-dense", alignment=64), tmp_path / "m.gguf")
    reader = GGUFReader(path)
    assert reader.get_field(Keys.General.ALIGNMENT).contents() == 64
    assert all(t.data_offset % 64 == 0 for t in reader.tensors)
    assert any(t.data_offset % 4096 for t in reader.tensors)


def test_cli_synth_json_and_overrides(tmp_path):
    app = typer.Typer()
    gguf_cmd.register(app)
    app.callback()(lambda: None)
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(app, ["gguf", "synth", str(out), "--preset", "tiny-qwen2moe", "--type", "q4_0",
                                      "--layers", "2", "--seed", "3", "--alignment", "512",
                                      "--set", "n_vocab=600", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["spec"]["quant"] == "q4_0" and report["spec"]["n_layer"] == 2 and report["spec"]["seed"] == 3
    assert report["spec"]["n_vocab"] == 600 and report["bytes"] == out.stat().st_size
    table = read_model_table(out)
    assert table.arch.n_layer == 2 and table.tensors[0].alignment == 512
    bad = CliRunner().invoke(app, ["gguf", "synth", str(tmp_path / "x.gguf"), "--set", "n_embd"])
    assert isinstance(bad.exception, FlashflexError)


# ---------------------------------------------------------------------------------------------- llama.cpp


def _teacher_forced_logits(llama_cpp, path: Path, text: bytes) -> tuple[list[int], np.ndarray, bytes]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, seed=0)
    try:
        tokens = llm.tokenize(text, add_bos=True)
        llm.eval(tokens)
        logits = np.array(llm.scores[: len(tokens)], copy=True)
        return tokens, logits, llm.detokenize(tokens[1:])
    finally:
        llm.close()


@pytest.mark.native
@pytest.mark.parametrize("name", TINY)
def test_llama_cpp_runs_the_model(tiny, name):
    llama_cpp = pytest.importorskip("llama_cpp")
    text = b"hello world, the experts are small"
    tokens, logits, back = _teacher_forced_logits(llama_cpp, tiny[name], text)
    assert back.strip() == text
    assert len(tokens) > 5 and logits.shape == (len(tokens), synth.preset(name).n_vocab)
    assert np.all(np.isfinite(logits))
    # every position predicts something different
    for i in range(1, len(tokens)):
        assert not np.allclose(logits[i], logits[i - 1])
    assert logits.std(axis=1).min() > 0.1


@pytest.mark.native
@pytest.mark.parametrize("quant", ["q4_0", "f16"])
def test_llama_cpp_runs_every_quant_type(tmp_path, quant):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = synth.write_synth_model(synth.preset("tiny-dense", quant=quant), tmp_path / "m.gguf")
    _tokens, logits, _ = _teacher_forced_logits(llama_cpp, path, b"the model reads its weights")
    assert np.all(np.isfinite(logits)) and logits.std(axis=1).min() > 0.1
