"""Realigning GGUF files: page-aligned offsets, metadata and tensor bytes preserved, verified, atomic."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
import typer
from gguf import GGUFReader, GGUFWriter, Keys
from typer.testing import CliRunner

from orchestrator import synth
from orchestrator.cli import gguf_cmd
from orchestrator.errors import FlashflexError
from orchestrator.modelfile import realign as realign_mod
from orchestrator.modelfile.reader import read_model_table
from orchestrator.modelfile.realign import is_aligned, realign


@pytest.fixture(scope="module")
def aligned32(tmp_path_factory) -> Path:
    """A converter-style model: tensors on 32-byte boundaries only."""
    path = tmp_path_factory.mktemp("src") / "qwen2moe-a32.gguf"
    return synth.write_synth_model(synth.preset("tiny-qwen2moe", alignment=32), path)


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    table = read_model_table(path)
    with open(path, "rb") as fh:
        out = {}
        for t in table.tensors:
            fh.seek(t.offset)
            out[t.name] = fh.read(t.n_bytes)
    return out


def test_realign_puts_every_tensor_on_a_page_boundary(aligned32, tmp_path):
    assert not is_aligned(aligned32, 4096) and is_aligned(aligned32, 32)
    dst = tmp_path / "out.gguf"
    result = realign(aligned32, dst, alignment=4096)
    assert is_aligned(dst, 4096)
    assert result.n_tensors == len(read_model_table(aligned32).tensors)
    assert not result.was_aligned
    assert dst.stat().st_size % 4096 == 0  # padded tail: O_DIRECT can read the last tensor whole
    assert GGUFReader(dst).alignment == 4096


def test_realign_keeps_metadata_and_tensor_bytes(aligned32, tmp_path):
    dst = tmp_path / "out.gguf"
    realign(aligned32, dst)
    before, after = read_model_table(aligned32), read_model_table(dst)
    assert [(t.name, t.ggml_type, t.shape, t.role, t.layer) for t in before.tensors] == \
           [(t.name, t.ggml_type, t.shape, t.role, t.layer) for t in after.tensors]
    meta_before, meta_after = dict(before.metadata), dict(after.metadata)
    assert meta_before.pop(Keys.General.ALIGNMENT) == 32
    assert meta_after.pop(Keys.General.ALIGNMENT) == 4096
    assert meta_before == meta_after
    assert list(GGUFReader(aligned32).fields) == list(GGUFReader(dst).fields)  # same keys, same order
    assert _tensor_bytes(aligned32) == _tensor_bytes(dst)


def test_realign_round_trip_is_byte_identical(aligned32, tmp_path):
    there, back = tmp_path / "4096.gguf", tmp_path / "32.gguf"
    realign(aligned32, there, alignment=4096)
    realign(there, back, alignment=32)
    assert back.read_bytes() == aligned32.read_bytes()


def test_realign_adds_the_alignment_key_when_absent(tmp_path):
    src = tmp_path / "plain.gguf"
    writer = GGUFWriter(src, "llama")  # gguf-py writes no general.alignment unless asked
    writer.add_block_count(1)
    writer.add_string("flashflex.note", "keep me")
    rng = np.random.default_rng(1)
    for name, shape in (("token_embd.weight", (10, 8)), ("output_norm.weight", (8,)), ("output.weight", (3, 8))):
        writer.add_tensor(name, rng.standard_normal(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert GGUFReader(src).get_field(Keys.General.ALIGNMENT) is None

    dst = tmp_path / "aligned.gguf"
    realign(src, dst, alignment=1024)
    reader = GGUFReader(dst)
    assert reader.get_field(Keys.General.ALIGNMENT).contents() == 1024
    assert reader.get_field("flashflex.note").contents() == "keep me"
    assert all(t.data_offset % 1024 == 0 for t in reader.tensors)
    for a, b in zip(GGUFReader(src).tensors, reader.tensors):
        assert np.array_equal(a.data, b.data)


def test_progress_reports_copy_and_verify(aligned32, tmp_path):
    seen: list[tuple[int, int]] = []
    realign(aligned32, tmp_path / "out.gguf", progress=lambda done, total: seen.append((done, total)))
    total = seen[-1][1]
    assert seen[-1][0] == total == 2 * read_model_table(aligned32).total_bytes
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))


class _CorruptingReader:
    """A source file whose first big read comes back with one byte flipped (a bad disk, say)."""

    def __init__(self, fh):
        self._fh, self._done = fh, False

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        if not self._done and len(data) > 64:
            self._done = True
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def test_a_bad_copy_is_caught_and_leaves_nothing_behind(aligned32, tmp_path, monkeypatch):
    def corrupting_open(path, mode="r", *args, **kwargs):
        fh = builtins.open(path, mode, *args, **kwargs)
        return _CorruptingReader(fh) if mode == "rb" else fh

    monkeypatch.setattr(realign_mod, "open", corrupting_open, raising=False)
    dst = tmp_path / "out.gguf"
    with pytest.raises(FlashflexError) as exc:
        realign(aligned32, dst)
    assert "verification failed" in exc.value.one_line()
    assert list(tmp_path.iterdir()) == []  # no output, no temp file


def test_realign_refuses_bad_input(aligned32, tmp_path):
    with pytest.raises(FlashflexError, match="power of two"):
        realign(aligned32, tmp_path / "x.gguf", alignment=3000)
    with pytest.raises(FlashflexError, match="overwrite its input"):
        realign(aligned32, aligned32)
    bogus = tmp_path / "bogus.gguf"
    bogus.write_text("not a model at all")
    with pytest.raises(FlashflexError, match="not a GGUF file"):
        realign(bogus, tmp_path / "y.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(aligned32.read_bytes()[:-1000])
    with pytest.raises(FlashflexError, match="truncated"):
        realign(cut, tmp_path / "z.gguf")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "z.gguf").exists()


def test_cli_realign_json(aligned32, tmp_path):
    app = typer.Typer()
    gguf_cmd.register(app)
    app.callback()(lambda: None)
    out = tmp_path / "cli.gguf"
    result = CliRunner().invoke(app, ["gguf", "realign", str(aligned32), str(out), "--alignment", "8192", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["alignment"] == 8192 and report["verified"] is True
    assert is_aligned(out, 8192)
    again = CliRunner().invoke(app, ["gguf", "realign", str(aligned32), str(out)])
    assert isinstance(again.exception, FlashflexError) and "already exists" in str(again.exception)


@pytest.mark.native
def test_realigned_model_gives_identical_logits(aligned32, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    dst = tmp_path / "aligned.gguf"
    realign(aligned32, dst)
    tokens = [1, 300, 301, 302, 400, 401]

    def logits(path: Path) -> np.ndarray:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, n_batch=32, logits_all=True, verbose=False, seed=0)
        llm.eval(tokens)
        out = np.array(llm.scores[: len(tokens)], copy=True)
        llm.close()
        return out

    assert np.array_equal(logits(aligned32), logits(dst))
