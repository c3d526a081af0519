"""Expert sidecars: layout byte for byte against the GGUF, the cheap pre-run check, full verification, atomic
extraction, filters, and the CLI."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from orchestrator import sidecar, synth
from orchestrator.errors import FlashflexError
from orchestrator.modelfile.reader import read_model_table

from conftest import flashflex

PAGE = 4096


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny models. qwen3moe is written converter-style (32-byte alignment), so no source offset is
    page-aligned and the sidecar has to do real work."""
    root = tmp_path_factory.mktemp("models")
    specs = {
        "qwen3moe": synth.preset("tiny-qwen3moe", alignment=32),
        "qwen3moe-seed1": synth.preset("tiny-qwen3moe", alignment=32, seed=1),
        "qwen2moe": synth.preset("tiny-qwen2moe"),
        "dense": synth.preset("tiny-dense"),
    }
    return {name: synth.write_synth_model(spec, root / f"{name}.gguf") for name, spec in specs.items()}


def _split_moe_model(directory: Path) -> list[Path]:
    """A two-shard qwen3moe-shaped model (gguf-py's writer splits it: one layer per shard). F32 experts of
    6 KiB each, so every slot carries padding."""
    writer = GGUFWriter(directory / "moe.gguf", "qwen3moe", split_max_tensors=4)
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_context_length(128)
    writer.add_expert_count(4)
    writer.add_expert_used_count(2)
    writer.add_expert_feed_forward_length(24)
    rng = np.random.default_rng(7)
    for layer in range(2):
        # numpy shapes are outermost first: (n_expert, rows, row length) is ggml [row length, rows, n_expert]
        writer.add_tensor(f"blk.{layer}.ffn_gate_inp.weight", rng.standard_normal((4, 64), dtype=np.float32))
        writer.add_tensor(f"blk.{layer}.ffn_gate_exps.weight", rng.standard_normal((4, 24, 64), dtype=np.float32))
        writer.add_tensor(f"blk.{layer}.ffn_up_exps.weight", rng.standard_normal((4, 24, 64), dtype=np.float32))
        writer.add_tensor(f"blk.{layer}.ffn_down_exps.weight", rng.standard_normal((4, 64, 24), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shards = sorted(directory.glob("moe-*-of-*.gguf"))
    assert [p.name for p in shards] == ["moe-00001-of-00002.gguf", "moe-00002-of-00002.gguf"]
    return shards


def _gguf_tensors(paths: list[Path]) -> dict[str, tuple[Path, int, int]]:
    """name -> (file, absolute data offset, bytes), read with gguf-py directly (not through flashflex)."""
    out = {}
    for path in paths:
        for t in GGUFReader(path).tensors:
            out[t.name] = (path, int(t.data_offset), int(t.n_bytes))
    return out


def _assert_layout_matches(out: Path, model_files: list[Path]) -> None:
    """Every byte of every layer file is the header, a GGUF expert slice, or zero padding."""
    manifest = json.loads((out / "manifest.json").read_text())
    source = _gguf_tensors(model_files)
    maps = {p: np.memmap(p, dtype=np.uint8, mode="r") for p in model_files}
    for layer in manifest["layers"]:
        data = np.fromfile(out / layer["file"], dtype=np.uint8)
        assert len(data) == layer["size"] and layer["size"] % PAGE == 0
        covered = np.zeros(len(data), dtype=bool)
        in_file = [sidecar.SidecarTensor.model_validate(t) for t in manifest["tensors"] if t["file"] == layer["file"]]
        head = sidecar.HEADER_MAGIC + json.dumps(
            {"extraction_id": manifest["extraction_id"], "layer": layer["layer"],
             "tensors": sidecar.placement_digest(in_file)}, separators=(",", ":")
        ).encode() + b"\n"
        assert data[:len(head)].tobytes() == head
        covered[:len(head)] = True
        for t in (t for t in manifest["tensors"] if t["file"] == layer["file"]):
            path, offset, n_bytes = source[t["name"]]
            assert t["source_offset"] == offset and model_files[t["source_file"]] == path
            assert t["offset"] % PAGE == 0 and t["expert_stride"] % PAGE == 0
            assert t["bytes_per_expert"] * t["n_expert"] == n_bytes
            for e in range(t["n_expert"]):
                at = t["offset"] + e * t["expert_stride"]
                assert at % PAGE == 0
                want = maps[path][offset + e * t["bytes_per_expert"]:offset + (e + 1) * t["bytes_per_expert"]]
                assert np.array_equal(data[at:at + t["bytes_per_expert"]], want), (t["name"], e)
                covered[at:at + t["bytes_per_expert"]] = True
        assert not data[~covered].any(), f"{layer['file']}: padding is not zero"
        assert hashlib.sha256(data.tobytes()).hexdigest() == layer["sha256"]


def _flip(path: Path, at: int, keep_mtime: bool = True) -> None:
    """Flip one byte in place; with keep_mtime, the cheap check cannot see it."""
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _one_line(exc: pytest.ExceptionInfo[FlashflexError]) -> str:
    line = exc.value.one_line()
    assert "\n" not in line
    return line


# ------------------------------------------------------------------------------------------ extraction


def test_extract_writes_the_documented_manifest(models, tmp_path):
    model = models["qwen3moe"]
    out = tmp_path / "sc"
    manifest = sidecar.extract(model, out)
    table = read_model_table(model)

    on_disk = json.loads((out / "manifest.json").read_text())
    assert list(on_disk) == ["format_version", "extraction_id", "model", "families", "layers", "tensors"]
    assert (out / "manifest.json").read_text() == json.dumps(on_disk, indent=2) + "\n"
    assert list(on_disk["tensors"][0]) == ["name", "layer", "family", "ggml_type", "shape", "n_expert",
                                           "bytes_per_expert", "expert_stride", "source_file", "source_offset",
                                           "file", "offset", "checksums"]
    assert on_disk["format_version"] == 3
    assert re.fullmatch(r"[0-9a-f]{32}", on_disk["extraction_id"])
    assert on_disk["model"] == {
        "architecture": "qwen3moe", "n_expert": 16, "n_expert_used": 4, "n_layer": table.arch.n_layer,
        "fingerprint": sidecar.fingerprint([model]), "files": [model.name], "file_sizes": [model.stat().st_size],
        "file_mtimes_ns": [model.stat().st_mtime_ns],
    }
    assert on_disk["families"] == ["gate", "up", "down"]
    assert [entry["file"] for entry in on_disk["layers"]] == \
           [f"layer-{i:03d}.bin" for i in range(table.arch.n_layer)]
    for entry in on_disk["layers"]:
        st = (out / entry["file"]).stat()
        assert entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns
    assert len(on_disk["tensors"]) == 3 * table.arch.n_layer
    by_name = {t.name: t for t in table.tensors}
    for t in on_disk["tensors"]:
        src = by_name[t["name"]]
        assert t["shape"] == list(src.shape) and t["n_expert"] == src.shape[2] == 16
        assert t["ggml_type"] == src.ggml_type and t["source_offset"] == src.offset
        assert t["expert_stride"] == -(-t["bytes_per_expert"] // PAGE) * PAGE
    assert any(t["source_offset"] % PAGE for t in on_disk["tensors"])  # copied from 32-byte-aligned offsets
    assert manifest.model_dump() == on_disk
    assert manifest.directory == out
    _assert_layout_matches(out, [model])


def test_shared_experts_only_when_asked(models, tmp_path):
    model = models["qwen2moe"]
    routed = sidecar.extract(model, tmp_path / "routed")
    assert routed.families == ["gate", "up", "down"]
    assert not any(sidecar.is_shared(t.family) for t in routed.tensors)

    both = sidecar.extract(model, tmp_path / "both", include_shared=True)
    assert both.families == ["gate", "up", "down", "gate_shexp", "up_shexp", "down_shexp"]
    shared = [t for t in both.tensors if sidecar.is_shared(t.family)]
    assert shared and all(t.n_expert == 1 and len(t.shape) == 2 for t in shared)
    assert {t.name for t in shared} >= {"blk.0.ffn_gate_shexp.weight", "blk.2.ffn_down_shexp.weight"}
    _assert_layout_matches(tmp_path / "both", [model])
    assert sidecar.verify(tmp_path / "both", model).ok


def test_small_copy_chunks_split_large_experts(models, tmp_path, monkeypatch):
    # 1000-byte reads: every expert (over 4 KiB) takes several reads, none aligned; the result is the same.
    monkeypatch.setattr(sidecar, "COPY_CHUNK", 1000)
    model = models["qwen3moe"]
    sidecar.extract(model, tmp_path / "sc")
    _assert_layout_matches(tmp_path / "sc", [model])
    report = sidecar.verify(tmp_path / "sc", model)
    assert report.ok, [p.message for p in report.problems]


def test_filters_select_layers_and_families(models, tmp_path):
    model = models["qwen3moe"]
    manifest = sidecar.extract(model, tmp_path / "sc", layers={0, 2}, families={"down", "gate"})
    assert manifest.families == ["gate", "down"]  # canonical order, whatever order was asked
    assert [e.file for e in manifest.layers] == ["layer-000.bin", "layer-002.bin"]
    assert sorted(os.listdir(tmp_path / "sc")) == ["layer-000.bin", "layer-002.bin", "manifest.json"]
    assert [t.name for t in manifest.tensors] == [
        "blk.0.ffn_gate_exps.weight", "blk.0.ffn_down_exps.weight",
        "blk.2.ffn_gate_exps.weight", "blk.2.ffn_down_exps.weight",
    ]
    assert manifest.tensors[0].offset == PAGE
    assert manifest.tensors[1].offset == PAGE + 16 * manifest.tensors[0].expert_stride
    _assert_layout_matches(tmp_path / "sc", [model])
    assert sidecar.verify(tmp_path / "sc", model).ok


def test_progress_reaches_the_total(models, tmp_path):
    seen: list[tuple[int, int]] = []
    manifest = sidecar.extract(models["qwen3moe"], tmp_path / "sc", progress=lambda d, t: seen.append((d, t)))
    total = sum(t.n_bytes for t in manifest.tensors)
    assert seen[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))


def test_bad_requests_are_refused(models, tmp_path):
    model = models["qwen3moe"]
    with pytest.raises(FlashflexError) as exc:
        sidecar.extract(models["dense"], tmp_path / "a")
    assert "has no routed expert tensors; sidecars are for MoE models" in _one_line(exc)
    with pytest.raises(FlashflexError, match="unknown expert family 'gates'"):
        sidecar.extract(model, tmp_path / "b", families={"gates"})
    with pytest.raises(FlashflexError, match=r"has no ffn_gate_up_exps tensors \(family gate_up\)"):
        sidecar.extract(model, tmp_path / "c", families={"gate_up"})
    with pytest.raises(FlashflexError, match="layer 3 is out of range: the model has 3 layers"):
        sidecar.extract(model, tmp_path / "d", layers={0, 3})
    with pytest.raises(FlashflexError, match="model file not found"):
        sidecar.extract(tmp_path / "nope.gguf", tmp_path / "e")
    assert not any(tmp_path.iterdir())

    sidecar.extract(model, tmp_path / "sc")
    with pytest.raises(FlashflexError, match="already exists"):
        sidecar.extract(model, tmp_path / "sc")
    first = sidecar.load_manifest(tmp_path / "sc").extraction_id
    again = sidecar.extract(model, tmp_path / "sc", force=True)
    assert again.extraction_id != first  # a new id for every extraction
    sidecar.check_sidecar(tmp_path / "sc", model)

    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(FlashflexError, match="is not a sidecar"):
        sidecar.extract(model, other, force=True)
    assert (other / "notes.txt").read_text() == "keep"
    with pytest.raises(FlashflexError, match="not a directory"):
        sidecar.extract(model, other / "notes.txt", force=True)


def test_an_interrupted_extraction_leaves_nothing(models, tmp_path, monkeypatch):
    model = models["qwen3moe"]
    real_copy = sidecar._copy_tensor
    calls = []

    def failing_copy(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # midway: layer 0 is done, layer 1 has started
            raise KeyboardInterrupt
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(sidecar, "_copy_tensor", failing_copy)
    with pytest.raises(KeyboardInterrupt):
        sidecar.extract(model, tmp_path / "sc")
    assert list(tmp_path.iterdir()) == []  # no sidecar, no temp directory

    # Over an existing sidecar (--force), the old one survives intact.
    monkeypatch.setattr(sidecar, "_copy_tensor", real_copy)
    old = sidecar.extract(model, tmp_path / "sc")
    monkeypatch.setattr(sidecar, "_copy_tensor", failing_copy)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        sidecar.extract(model, tmp_path / "sc", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sc"]
    assert sidecar.check_sidecar(tmp_path / "sc", model).extraction_id == old.extraction_id


def test_a_write_error_is_one_line(models, tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sidecar, "_copy_tensor", no_space)
    with pytest.raises(FlashflexError) as exc:
        sidecar.extract(models["qwen3moe"], tmp_path / "sc")
    assert "No space left on device" in _one_line(exc) and "free space" in exc.value.fix
    assert list(tmp_path.iterdir()) == []


def test_multi_shard_model(tmp_path):
    shards = _split_moe_model(tmp_path)
    out = tmp_path / "sc"
    manifest = sidecar.extract(shards[0], out)
    assert manifest.model.files == [p.name for p in shards]
    assert manifest.model.file_sizes == [p.stat().st_size for p in shards]
    assert manifest.model.fingerprint == sidecar.fingerprint(shards)
    assert {t.layer: t.source_file for t in manifest.tensors} == {0: 0, 1: 1}
    assert all(t.bytes_per_expert == 6144 and t.expert_stride == 8192 for t in manifest.tensors)
    _assert_layout_matches(out, shards)
    for shard in shards:  # any shard names the whole model
        assert sidecar.verify(out, shard).ok
        sidecar.check_sidecar(out, shard)


# ------------------------------------------------------------------------------------------ fingerprint


def test_fingerprint_tells_models_apart(models, tmp_path):
    a, b = models["qwen3moe"], models["qwen3moe-seed1"]
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(a, copy)
    assert sidecar.fingerprint([a]) == sidecar.fingerprint([copy])
    # Same header (the seed is not in the metadata), different weights.
    head = min(int(t.data_offset) for t in GGUFReader(a).tensors)
    assert a.read_bytes()[:head] == b.read_bytes()[:head]
    assert sidecar.fingerprint([a]) != sidecar.fingerprint([b])
    assert sidecar.fingerprint([a, copy]) != sidecar.fingerprint([a])
    # One changed byte inside a sample (the last sample ends at the end of the file) changes it.
    _flip(copy, copy.stat().st_size - 1, keep_mtime=False)
    assert sidecar.fingerprint([a]) != sidecar.fingerprint([copy])


# ------------------------------------------------------------------------------------------ cheap check


def test_check_and_verify_accept_a_fresh_sidecar(models, tmp_path):
    model = models["qwen2moe"]
    manifest = sidecar.extract(model, tmp_path / "sc", include_shared=True)
    assert sidecar.check_sidecar(tmp_path / "sc", model).extraction_id == manifest.extraction_id
    assert sidecar.check_sidecar(manifest, read_model_table(model)) is manifest  # what the runner holds
    report = sidecar.verify(tmp_path / "sc", model)
    assert report.ok and report.layers_checked == 3
    assert report.bytes_checked == sum(e.size for e in manifest.layers)


def test_sidecar_of_another_model_is_refused(models, tmp_path):
    sidecar.extract(models["qwen3moe"], tmp_path / "sc")
    with pytest.raises(FlashflexError) as exc:
        sidecar.check_sidecar(tmp_path / "sc", models["qwen3moe-seed1"])
    line = _one_line(exc)
    assert "was extracted from another model (fingerprint" in line and "≠" in line
    assert "flashflex sidecar extract" in exc.value.fix
    with pytest.raises(FlashflexError, match=r"another model \(architecture qwen3moe≠qwen2moe"):
        sidecar.check_sidecar(tmp_path / "sc", models["qwen2moe"])
    report = sidecar.verify(tmp_path / "sc", models["qwen3moe-seed1"])
    assert not report.ok and [p.kind for p in report.problems] == ["identity"]


def test_a_layer_file_from_another_extraction_is_refused(models, tmp_path):
    model = models["qwen3moe"]
    sidecar.extract(model, tmp_path / "a")
    sidecar.extract(model, tmp_path / "b")
    shutil.copy2(tmp_path / "b" / "layer-001.bin", tmp_path / "a" / "layer-001.bin")  # same size, same bytes
    with pytest.raises(FlashflexError) as exc:
        sidecar.check_sidecar(tmp_path / "a", model)
    assert "layer-001.bin belongs to another extraction" in _one_line(exc)
    # Renamed layer files are caught too: the header names its layer.
    os.replace(tmp_path / "b" / "layer-002.bin", tmp_path / "b" / "layer-000.bin")
    with pytest.raises(FlashflexError, match="holds layer 2, not layer 0"):
        sidecar.check_sidecar(tmp_path / "b", model)


def test_a_truncated_layer_file_is_refused(models, tmp_path):
    model = models["qwen3moe"]
    manifest = sidecar.extract(model, tmp_path / "sc")
    path = tmp_path / "sc" / "layer-002.bin"
    size = manifest.layers[2].size
    os.truncate(path, size - PAGE)
    with pytest.raises(FlashflexError) as exc:
        sidecar.check_sidecar(tmp_path / "sc", model)
    assert f"layer-002.bin is truncated ({size - PAGE:,} of {size:,} bytes)" in _one_line(exc)
    report = sidecar.verify(tmp_path / "sc", model)
    assert not report.ok and any("truncated" in p.message for p in report.problems)
    path.unlink()
    with pytest.raises(FlashflexError, match="layer-002.bin is missing"):
        sidecar.check_sidecar(tmp_path / "sc", model)


def test_a_touched_layer_file_fails_the_cheap_check_until_verified(models, tmp_path):
    model = models["qwen3moe"]
    manifest = sidecar.extract(model, tmp_path / "sc")
    path = tmp_path / "sc" / "layer-000.bin"
    os.utime(path, ns=(manifest.layers[0].mtime_ns, manifest.layers[0].mtime_ns + 5_000_000_000))
    with pytest.raises(FlashflexError) as exc:
        sidecar.check_sidecar(tmp_path / "sc", model)
    assert "layer-000.bin was modified after extraction" in _one_line(exc)
    assert "flashflex sidecar verify" in exc.value.fix

    report = sidecar.verify(tmp_path / "sc", model)  # the bytes are intact: the recorded mtime comes back
    assert report.ok and report.restamped == ["layer-000.bin"]
    assert path.stat().st_mtime_ns == manifest.layers[0].mtime_ns
    sidecar.check_sidecar(tmp_path / "sc", model)


def test_a_changed_tensor_in_the_model_is_refused(models, tmp_path):
    model = models["qwen3moe"]
    sidecar.extract(model, tmp_path / "sc")
    data = json.loads((tmp_path / "sc" / "manifest.json").read_text())
    data["tensors"][4]["source_offset"] += 32
    (tmp_path / "sc" / "manifest.json").write_text(json.dumps(data, indent=2))
    with pytest.raises(FlashflexError, match=r"tensor blk\.1\.ffn_up_exps\.weight differs from the model \(offset"):
        sidecar.check_sidecar(tmp_path / "sc", model)


# ------------------------------------------------------------------------------------------ verify


def test_verify_finds_a_flipped_byte_the_cheap_check_cannot_see(models, tmp_path):
    model = models["qwen3moe"]
    manifest = sidecar.extract(model, tmp_path / "sc")
    t = next(t for t in manifest.tensors if t.name == "blk.1.ffn_up_exps.weight")
    _flip(tmp_path / "sc" / t.file, t.offset + 3 * t.expert_stride + 1234)

    sidecar.check_sidecar(tmp_path / "sc", model)  # size, mtime and header are all as recorded
    report = sidecar.verify(tmp_path / "sc", model)
    messages = [p.message for p in report.problems]
    assert not report.ok
    assert any(m.startswith("layer-001.bin: blk.1.ffn_up_exps.weight expert 3 differs from the model at byte "
                            "1,234 of its slice") for m in messages), messages
    assert any(m.startswith("layer-001.bin: sha256") for m in messages)
    assert report.restamped == []
    assert not any("layer-000" in m or "layer-002" in m for m in messages)


def test_verify_finds_nonzero_padding(models, tmp_path):
    model = models["qwen3moe"]
    manifest = sidecar.extract(model, tmp_path / "sc")
    t = manifest.tensors_in("layer-002.bin")[-1]
    assert t.expert_stride > t.bytes_per_expert
    _flip(tmp_path / "sc" / t.file, t.offset + 5 * t.expert_stride + t.bytes_per_expert + 7)
    _flip(tmp_path / "sc" / "layer-000.bin", PAGE - 1)  # the header page's padding
    report = sidecar.verify(tmp_path / "sc", model)
    messages = [p.message for p in report.problems]
    assert any(f"padding after {t.name} expert 5 is not zero" in m for m in messages), messages
    assert any(m.startswith("layer-000.bin: the header page's padding") for m in messages), messages


def test_verify_checks_the_recorded_sha256(models, tmp_path):
    model = models["qwen3moe"]
    sidecar.extract(model, tmp_path / "sc")
    data = json.loads((tmp_path / "sc" / "manifest.json").read_text())
    sha = data["layers"][1]["sha256"]
    data["layers"][1]["sha256"] = ("0" if sha[0] != "0" else "1") + sha[1:]
    (tmp_path / "sc" / "manifest.json").write_text(json.dumps(data, indent=2))
    sidecar.check_sidecar(tmp_path / "sc", model)  # no full read, so not seen here
    report = sidecar.verify(tmp_path / "sc", model)
    assert [p.message.split(":")[0] for p in report.problems] == ["layer-001.bin"]
    assert "sha256" in report.problems[0].message and "does not match the manifest" in report.problems[0].message


# ------------------------------------------------------------------------------------------ manifest


def _edit_manifest(directory: Path, edit) -> None:
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d["tensors"][3].pop("offset"), "tensors.3.offset: field required"),
    (lambda d: d["model"].pop("fingerprint"), "model.fingerprint: field required"),
    (lambda d: d["layers"][0].update(size="1097728"), "layers.0.size: input should be a valid integer"),
    (lambda d: d.update(comment="hi"), "comment: extra inputs are not permitted"),
    (lambda d: d.pop("format_version"), "format_version: field required"),
    (lambda d: d["tensors"][0].update(offset=4097), "offset 4097 is not page-aligned"),
    (lambda d: d["tensors"][0].update(family="down"), "family 'down' does not fit"),
    (lambda d: d.update(families=["gate", "experts"]), "unknown family 'experts'"),
])
def test_a_broken_manifest_is_one_clear_line(models, tmp_path, edit, expected):
    sidecar.extract(models["qwen3moe"], tmp_path / "sc")
    _edit_manifest(tmp_path / "sc", edit)
    with pytest.raises(FlashflexError) as exc:
        sidecar.load_manifest(tmp_path / "sc")
    line = _one_line(exc)
    assert f"sidecar manifest {tmp_path / 'sc' / 'manifest.json'} is invalid: " in line
    assert expected in line, line
    assert "flashflex sidecar extract" in exc.value.fix
    with pytest.raises(FlashflexError, match="is invalid"):
        sidecar.check_sidecar(tmp_path / "sc", models["qwen3moe"])


def test_manifest_version_json_and_presence(models, tmp_path):
    sidecar.extract(models["qwen3moe"], tmp_path / "sc")
    _edit_manifest(tmp_path / "sc", lambda d: d.update(format_version=2))
    with pytest.raises(FlashflexError, match="has format version 2; this flashflex reads version 3"):
        sidecar.load_manifest(tmp_path / "sc")
    (tmp_path / "sc" / "manifest.json").write_text('{"format_version": 1,')
    with pytest.raises(FlashflexError, match="is invalid: not JSON"):
        sidecar.load_manifest(tmp_path / "sc")
    (tmp_path / "sc" / "manifest.json").unlink()
    with pytest.raises(FlashflexError, match="is not a sidecar: it has no manifest.json"):
        sidecar.load_manifest(tmp_path / "sc")
    with pytest.raises(FlashflexError, match="not found"):
        sidecar.load_manifest(tmp_path / "nowhere")


def test_inspect_summarises_the_manifest(models, tmp_path):
    manifest = sidecar.extract(models["qwen2moe"], tmp_path / "sc", include_shared=True)
    summary = sidecar.inspect(tmp_path / "sc")
    assert summary["extraction_id"] == manifest.extraction_id
    assert summary["model"]["architecture"] == "qwen2moe"
    assert summary["n_layers"] == 3 and summary["n_tensors"] == 18
    assert summary["total_bytes"] == sum(f.stat().st_size for f in (tmp_path / "sc").glob("layer-*.bin"))
    row = summary["layers"][0]
    routed = [t for t in manifest.tensors_in("layer-000.bin") if not sidecar.is_shared(t.family)]
    assert row["n_expert"] == 8 and row["present"]
    assert row["bytes_per_expert"] == sum(t.bytes_per_expert for t in routed)
    assert row["stride_per_expert"] == sum(t.expert_stride for t in routed)
    assert row["shared_bytes"] > 0
    json.dumps(summary)


# ------------------------------------------------------------------------------------------ CLI


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode != 0
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    return lines[0]


def test_cli_round_trip(models, tmp_path):
    model, out = models["qwen2moe"], tmp_path / "sc"
    result = flashflex("sidecar", "extract", str(model), str(out), "--include-shared", "--layers", "0-1",
                       "--json")
    assert result.returncode == 0, result.stderr
    extracted = json.loads(result.stdout)
    assert extracted["layers"] == [0, 1] and extracted["n_tensors"] == 12
    assert extracted["families"] == ["gate", "up", "down", "gate_shexp", "up_shexp", "down_shexp"]

    result = flashflex("sidecar", "inspect", str(out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["extraction_id"] == extracted["extraction_id"] and summary["total_bytes"] == extracted["bytes"]
    result = flashflex("sidecar", "inspect", str(out))
    assert result.returncode == 0 and "layer-001.bin" in result.stdout

    result = flashflex("sidecar", "verify", str(out), "--model", str(model), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] is True
    result = flashflex("sidecar", "verify", str(out), "-m", str(model))
    assert result.returncode == 0 and result.stdout.startswith("ok")

    manifest = sidecar.load_manifest(out)
    t = manifest.tensors[0]
    _flip(out / t.file, t.offset + 10)
    result = flashflex("sidecar", "verify", str(out), "-m", str(model))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert any(f"{t.name} expert 0 differs" in ln for ln in lines[:-1]), result.stderr
    assert lines[-1].startswith("error: sidecar") and "failed verification (2 problems)" in lines[-1]
    result = flashflex("sidecar", "verify", str(out), "-m", str(model), "--json")
    assert result.returncode == 1 and json.loads(result.stdout)["ok"] is False
    assert "failed verification" in _one_error_line(result)


@pytest.mark.parametrize("args, expected", [
    (["extract", "{dense}", "{tmp}/a"], "sidecars are for MoE models"),
    (["extract", "{moe}", "{tmp}/a", "--layers", "3-1"], "--layers '3-1' is not a list of layers"),
    (["extract", "{moe}", "{tmp}/a", "--families", "gate,nope"], "unknown expert family 'nope'"),
    (["extract", "{tmp}/missing.gguf", "{tmp}/a"], "model file not found"),
    (["inspect", "{tmp}/nowhere"], "not found"),
    (["verify", "{tmp}", "--model", "{moe}"], "has no manifest.json"),
])
def test_cli_bad_input_is_one_line(models, tmp_path, args, expected):
    values = {"dense": str(models["dense"]), "moe": str(models["qwen3moe"]), "tmp": str(tmp_path)}
    line = _one_error_line(flashflex("sidecar", *(a.format(**values) for a in args)))
    assert expected in line, line
    assert not (tmp_path / "a").exists()


def test_cli_verify_against_another_model(models, tmp_path):
    sidecar.extract(models["qwen3moe"], tmp_path / "sc")
    result = flashflex("sidecar", "verify", str(tmp_path / "sc"), "--model", str(models["qwen3moe-seed1"]))
    assert result.returncode == 1
    assert "another model" in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error: ")
    result = flashflex("sidecar", "verify", str(tmp_path / "sc"))  # --model is required
    assert result.returncode == 2 and "--model" in result.stderr


def test_every_expert_has_the_runtimes_checksum(models, tmp_path):
    """Checksums are computed from the GGUF's expert slices (the same function the runtime applies to what it
    reads), one per expert, and covered by the layer headers' digest."""
    model = models["qwen3moe"]
    manifest = sidecar.extract(model, tmp_path / "sc")
    data = model.read_bytes()
    for t in manifest.tensors:
        assert len(t.checksums) == t.n_expert
        for e in (0, t.n_expert - 1):
            start = t.source_offset + e * t.bytes_per_expert
            assert t.checksums[e] == sidecar.expert_checksum(data[start:start + t.bytes_per_expert])

