"""The GGUF model layer: tensor table, roles, architecture metadata, shards, and bad-input errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer
from gguf import GGUFWriter, Keys
from typer.testing import CliRunner

from orchestrator import synth
from orchestrator.cli import gguf_cmd
from orchestrator.errors import FlashflexError
from orchestrator.modelfile.reader import classify_tensor, read_model_table, shard_paths
from orchestrator.modelfile.table import Role


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("models")
    return {name: synth.write_synth_model(synth.preset(name), out / f"{name}.gguf")
            for name in ("tiny-dense", "tiny-qwen3moe", "tiny-qwen2moe", "tiny-deepseek")}


def _one_line_error(exc: pytest.ExceptionInfo[FlashflexError]) -> str:
    text = exc.value.one_line()
    assert "\n" not in text
    assert exc.value.fix, "every user-facing error says how to fix it"
    return text


# ---------------------------------------------------------------------------------------------- roles


@pytest.mark.parametrize("name, layer, role", [
    ("token_embd.weight", None, Role.TOKEN_EMBD),
    ("output.weight", None, Role.OUTPUT),
    ("output_norm.weight", None, Role.NORM),
    ("blk.0.attn_norm.weight", 0, Role.NORM),
    ("blk.7.attn_q.weight", 7, Role.ATTN_Q),
    ("blk.7.attn_q.bias", 7, Role.ATTN_Q),
    ("blk.7.attn_k.weight", 7, Role.ATTN_K),
    ("blk.7.attn_v.weight", 7, Role.ATTN_V),
    ("blk.7.attn_qkv.weight", 7, Role.ATTN_QKV),
    ("blk.7.attn_output.weight", 7, Role.ATTN_O),
    ("blk.2.attn_q_norm.weight", 2, Role.NORM),
    ("blk.12.ffn_gate.weight", 12, Role.FFN_DENSE),
    ("blk.12.ffn_up.weight", 12, Role.FFN_DENSE),
    ("blk.12.ffn_down.weight", 12, Role.FFN_DENSE),
    ("blk.3.ffn_gate_exps.weight", 3, Role.EXPERT_ROUTED),
    ("blk.3.ffn_up_exps.weight", 3, Role.EXPERT_ROUTED),
    ("blk.3.ffn_down_exps.weight", 3, Role.EXPERT_ROUTED),
    ("blk.3.ffn_gate_up_exps.weight", 3, Role.EXPERT_ROUTED),
    ("blk.3.ffn_gate_shexp.weight", 3, Role.EXPERT_SHARED),
    ("blk.3.ffn_down_shexp.weight", 3, Role.EXPERT_SHARED),
    ("blk.3.ffn_gate_inp.weight", 3, Role.ROUTER),
    ("blk.3.ffn_gate_inp_shexp.weight", 3, Role.ROUTER),
    ("blk.3.exp_probs_b.bias", 3, Role.ROUTER),
    ("rope_freqs.weight", None, Role.OTHER),
    ("something.unknown", None, Role.OTHER),
])
def test_tensor_names_map_to_roles_and_layers(name, layer, role):
    assert classify_tensor(name) == (layer, role)


# ---------------------------------------------------------------------------------------------- tables


def test_dense_table_matches_the_spec(models):
    spec = synth.preset("tiny-dense")
    table = read_model_table(models["tiny-dense"])
    arch = table.arch
    assert (arch.arch, arch.n_layer, arch.n_embd, arch.n_head, arch.n_head_kv) == ("llama", 4, 256, 8, 2)
    assert (arch.head_dim_k, arch.head_dim_v, arch.n_ctx_train) == (32, 32, 4096)
    assert not arch.is_moe and arch.n_leading_dense == 0
    assert table.files == [models["tiny-dense"].resolve()]
    assert len(table.tensors) == len(synth.plan_tensors(spec))
    assert table.total_bytes == synth.estimate_bytes(spec)
    assert {t.layer for t in table.tensors} == {None, 0, 1, 2, 3}
    assert sum(t.role is Role.FFN_DENSE for t in table.tensors) == 3 * 4
    assert all(t.aligned and t.alignment == 4096 for t in table.tensors)
    q = next(t for t in table.tensors if t.name == "blk.1.attn_k.weight")
    assert (q.ggml_type, q.shape, q.n_bytes) == ("Q8_0", (256, 64), 256 * 64 // 32 * 34)


def test_offsets_point_at_the_tensor_data(models):
    table = read_model_table(models["tiny-dense"])
    size = models["tiny-dense"].stat().st_size
    with open(models["tiny-dense"], "rb") as fh:
        for t in table.tensors:
            assert t.offset + t.n_bytes <= size
            if t.role is Role.NORM:  # synthetic norms are all ones
                fh.seek(t.offset)
                assert np.all(np.frombuffer(fh.read(t.n_bytes), dtype="<f4") == 1.0)


def test_qwen3moe_table_reports_experts_and_head_dim(models):
    table = read_model_table(models["tiny-qwen3moe"])
    arch = table.arch
    assert arch.is_moe
    assert (arch.n_expert, arch.n_expert_used, arch.expert_ffn) == (16, 4, 128)
    assert (arch.head_dim_k, arch.n_head, arch.n_embd) == (64, 8, 256)  # head_dim * n_head != n_embd
    assert arch.n_shared_expert == 0 and arch.shared_expert_ffn == 0
    routed = [t for t in table.tensors if t.role is Role.EXPERT_ROUTED]
    assert len(routed) == 3 * 3
    assert all(t.shape[2] == 16 for t in routed)
    assert sum(t.role is Role.ROUTER for t in table.tensors) == 3


def test_qwen2moe_shared_expert_is_inferred_from_tensors(models):
    arch = read_model_table(models["tiny-qwen2moe"]).arch
    assert (arch.n_expert, arch.n_expert_used, arch.expert_ffn) == (8, 2, 128)
    assert (arch.n_shared_expert, arch.shared_expert_ffn) == (1, 256)


def test_deepseek_leading_dense_layers(models):
    table = read_model_table(models["tiny-deepseek"])
    arch = table.arch
    assert (arch.n_leading_dense, arch.n_shared_expert, arch.shared_expert_ffn) == (1, 2, 256)
    dense_layers = {t.layer for t in table.tensors if t.role is Role.FFN_DENSE}
    expert_layers = {t.layer for t in table.tensors if t.role is Role.EXPERT_ROUTED}
    assert dense_layers == {0} and expert_layers == {1, 2}


def test_metadata_summarises_long_arrays(models):
    meta = read_model_table(models["tiny-dense"]).metadata
    assert meta[Keys.General.ARCHITECTURE] == "llama"
    assert meta[Keys.General.ALIGNMENT] == 4096
    assert meta[Keys.Tokenizer.LIST] == "<array of 512 string>"
    json.dumps(meta)  # JSON-ready


@pytest.mark.parametrize("arch,keys,n_swa,recurrent", [
    ("gemma3", {"attention.sliding_window": 512}, 512, False),
    ("mamba", {"ssm.conv_kernel": 4, "ssm.state_size": 16}, 0, True),
    ("lfm2", {"shortconv.l_cache": 3}, 0, True),
    ("llama", {}, 0, False),
])
def test_sliding_windows_and_recurrent_layers_are_read(tmp_path, arch, keys, n_swa, recurrent):
    """What decides llama.cpp's programs' flags under a plan (tools.plan_args: --swa-full; serve: what a recurrent
    model cannot roll back)."""
    from orchestrator.modelfile.reader import arch_of

    writer = GGUFWriter(tmp_path / "m.gguf", arch)
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    for key, value in keys.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_tensor("token_embd.weight", np.zeros((32, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = arch_of(tmp_path / "m.gguf")
    assert (info.n_swa, info.recurrent) == (n_swa, recurrent)


# ---------------------------------------------------------------------------------------------- shards


def test_a_file_is_parsed_once_per_version_and_each_caller_gets_its_own_lists(tmp_path, models, monkeypatch):
    """Planning reads the table once per micro-batch or slot count it tries (Gemma's header: seconds to parse)."""
    from orchestrator.modelfile import reader

    path = tmp_path / "m.gguf"
    shutil.copy(models["tiny-dense"], path)
    opened: list[Path] = []
    real = reader.open_gguf
    monkeypatch.setattr(reader, "open_gguf", lambda p: opened.append(p) or real(p))
    first = read_model_table(path)
    first.tensors.clear()  # a caller's own list
    second = read_model_table(path)
    assert len(opened) == 1 and second.tensors and second.arch == first.arch
    # another version of the file (rewritten: a new inode, as a converter's temp-and-rename writes it) is read again
    synth.write_synth_model(synth.preset("tiny-dense", n_layer=3), tmp_path / "other.gguf").replace(path)
    third = read_model_table(path)
    assert len(opened) == 2 and third.arch.n_layer == 3 != second.arch.n_layer


def _write_split_model(directory: Path, n_shards: int = 3) -> list[Path]:
    """A small llama-shaped model split by gguf-py's writer, one tensor group per shard."""
    writer = GGUFWriter(directory / "split.gguf", "llama", split_max_tensors=2)
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_context_length(128)
    rng = np.random.default_rng(0)
    for i in range(2 * n_shards):
        writer.add_tensor(f"blk.{i // 2}.ffn_{'up' if i % 2 else 'gate'}.weight",
                          rng.standard_normal((16, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    paths = sorted(directory.glob("split-*-of-*.gguf"))
    assert len(paths) == n_shards
    return paths


def test_any_shard_opens_the_whole_split_model(tmp_path):
    shards = _write_split_model(tmp_path)
    for shard in shards:
        table = read_model_table(shard)
        assert table.files == [p.resolve() for p in shards]
        assert len(table.tensors) == 6
        assert {t.file for t in table.tensors} == set(table.files)
        assert table.arch.n_embd == 64
    assert shard_paths(shards[1]) == shards


def test_missing_shard_is_named(tmp_path):
    shards = _write_split_model(tmp_path)
    shards[1].unlink()
    with pytest.raises(FlashflexError) as exc:
        read_model_table(shards[0])
    line = _one_line_error(exc)
    assert "split-00002-of-00003.gguf" in line and "missing" in line


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(FlashflexError) as exc:
        read_model_table(tmp_path / "nope.gguf")
    assert "not found" in _one_line_error(exc)


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    with pytest.raises(FlashflexError) as exc:
        read_model_table(bogus)
    assert "not a GGUF file" in _one_line_error(exc)


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.touch()
    with pytest.raises(FlashflexError) as exc:
        read_model_table(empty)
    assert "not a GGUF file" in _one_line_error(exc)


def test_truncated_tensor_data(tmp_path, models):
    cut = tmp_path / "cut.gguf"
    data = models["tiny-dense"].read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(FlashflexError) as exc:
        read_model_table(cut)
    line = _one_line_error(exc)
    assert "truncated" in line and "tensor" in line and str(cut) in line


def test_truncated_header(tmp_path, models):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(models["tiny-dense"].read_bytes()[:300])
    with pytest.raises(FlashflexError) as exc:
        read_model_table(cut)
    assert "truncated or corrupt" in _one_line_error(exc)


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture()
def cli() -> typer.Typer:
    app = typer.Typer()
    gguf_cmd.register(app)

    @app.callback()
    def _root() -> None:  # keeps `gguf` a sub-command, as in the real app
        pass

    return app


def test_inspect_json_reports_tensors_and_totals(cli, models):
    result = CliRunner().invoke(cli, ["gguf", "inspect", str(models["tiny-qwen2moe"]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["arch"]["arch"] == "qwen2moe"
    assert report["n_tensors"] == len(report["tensors"])
    assert sum(report["bytes_by_role"].values()) == report["total_bytes"]
    assert len(report["bytes_by_layer"]) == 3
    assert report["bytes_by_role"]["expert_shared"] > 0
    assert report["all_page_aligned"] is True


def test_inspect_table_for_people(cli, models):
    result = CliRunner().invoke(cli, ["gguf", "inspect", str(models["tiny-deepseek"])])
    assert result.exit_code == 0, result.output
    for word in ("bytes by role", "bytes by layer", "expert_routed", "blk.0.ffn_down", "deepseek.expert_count"):
        assert word in result.stdout


def test_inspect_missing_file_raises_one_line(cli, tmp_path):
    result = CliRunner().invoke(cli, ["gguf", "inspect", str(tmp_path / "x.gguf")])
    assert isinstance(result.exception, FlashflexError)
    assert "\n" not in result.exception.one_line()


def test_last_shard_missing_after_a_partial_copy(tmp_path):
    (tmp_path / "a").mkdir()
    shards = _write_split_model(tmp_path / "a")
    moved = tmp_path / "b"
    moved.mkdir()
    for s in shards[:2]:
        shutil.copy(s, moved / s.name)
    with pytest.raises(FlashflexError) as exc:
        read_model_table(moved / shards[0].name)
    assert "split-00003-of-00003.gguf" in _one_line_error(exc)
