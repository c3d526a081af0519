"""The bad-input corpus: every case the 2026-12-01 reliability review found, generated here and pinned.

Each case runs the `flashflex` command as a user would and expects one `error:` line naming the problem and the
fix, a non-zero exit, no traceback, no hang (every call has a timeout) and nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gguf import GGUFReader

from orchestrator import synth
from orchestrator.errors import FlashflexError
from orchestrator.modelfile.validate import read_layout

from conftest import REPO, flashflex, one_error


def no_partials(directory: Path) -> None:
    left = [p.name for p in directory.iterdir() if p.name.endswith(".partial")]
    assert not left, left


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return synth.write_synth_model(synth.preset("tiny-dense"), tmp_path_factory.mktemp("dense") / "dense.gguf")


def _tensor_info(path: Path, name: str) -> tuple[int, int]:
    """(file position of the tensor's type field, of its offset field)."""
    t = next(t for t in GGUFReader(path).tensors if t.name == name)
    pos = t.field.offset + sum(p.nbytes for p in t.field.parts[:4])
    return pos, pos + t.field.parts[4].nbytes


def _patched(src: Path, dst: Path, edits: dict[int, bytes]) -> Path:
    data = bytearray(src.read_bytes())
    for pos, value in edits.items():
        data[pos:pos + len(value)] = value
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture(scope="module")
def corrupt(dense, tmp_path_factory) -> dict[str, Path]:
    """GGUFs llama.cpp would refuse or misread: overlapping offset, unknown type, a lowered tensor count,
    trailing bytes, a cut-off end."""
    d = tmp_path_factory.mktemp("corrupt")
    names = [t.name for t in GGUFReader(dense).tensors]
    type_pos, offset_pos = _tensor_info(dense, names[3])
    offset = struct.unpack("<Q", dense.read_bytes()[offset_pos:offset_pos + 8])[0]
    count = struct.unpack("<Q", dense.read_bytes()[8:16])[0]
    return {
        "overlap": _patched(dense, d / "overlap.gguf", {offset_pos: struct.pack("<Q", offset - 4096)}),
        "type": _patched(dense, d / "type.gguf", {type_pos: struct.pack("<I", 250)}),
        "count": _patched(dense, d / "count.gguf", {8: struct.pack("<Q", count - 1)}),
        "trailing": _patched(dense, d / "trailing.gguf", {dense.stat().st_size: b"\x01" * 8192}),
        "truncated": (d / "truncated.gguf").write_bytes(dense.read_bytes()[:-5000]) and d / "truncated.gguf",
    }


# -- GGUF layout: one validator for every command --------------------------------------------------


@pytest.mark.parametrize("case,needle", [
    ("overlap", "overlaps the tensor before it"),
    ("type", "unknown type 250"),
    ("count", "bytes after the last declared tensor"),
    ("trailing", "bytes after the last declared tensor"),
    ("truncated", "truncated"),
])
def test_corrupt_gguf_is_refused_by_inspect_plan_realign_and_extract(corrupt, tmp_path, case, needle):
    path = corrupt[case]
    with pytest.raises(FlashflexError, match=needle):
        read_layout(path)
    one_error(flashflex("gguf", "inspect", str(path)), needle)
    one_error(flashflex("plan", str(path), "--budget", "1GiB"), needle)
    one_error(flashflex("gguf", "realign", str(path), str(tmp_path / "out.gguf")), needle)
    assert not (tmp_path / "out.gguf").exists()
    no_partials(tmp_path)


def test_a_lowered_tensor_count_does_not_run(corrupt, patched_llama):
    """llama.cpp itself would load it and silently use the embedding as the output matrix."""
    one_error(flashflex("run", "-m", str(corrupt["count"]), "-p", "Hello", "-n", "2"), "after the last declared")


@pytest.mark.parametrize("case", ["truncated", "overlap"])
def test_corrupt_models_are_refused_by_run_and_serve_before_serving(corrupt, case):
    for args in (["run", "-m", str(corrupt[case]), "-n", "1"], ["serve", "-m", str(corrupt[case]), "--port", "1"],
                 ["chat", "-m", str(corrupt[case]), "--once", "hi"]):
        result = flashflex(*args, timeout=120)
        one_error(result, str(corrupt[case].name))
        assert "serving" not in result.stderr


def test_realign_refuses_unsafe_destinations_and_sizes(dense, tmp_path):
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    one_error(flashflex("gguf", "realign", str(dense), str(fifo), "--force", timeout=60), "not a regular file")
    assert fifo.is_fifo()  # not replaced by a regular file
    (tmp_path / "somedir").mkdir()
    one_error(flashflex("gguf", "realign", str(dense), str(tmp_path / "somedir"), "--force"), "is a directory")
    one_error(flashflex("gguf", "realign", str(dense), str(tmp_path / "a.gguf"), "-a", str(1 << 30)), "1 MiB limit")
    one_error(flashflex("gguf", "realign", str(dense), str(tmp_path / "no" / "such" / "x.gguf")), "does not exist")
    no_partials(tmp_path)


def test_realign_refuses_one_shard_of_a_split_model(tmp_path):
    from test_modelfile import _write_split_model

    shards = _write_split_model(tmp_path)
    one_error(flashflex("gguf", "realign", str(shards[0]), str(tmp_path / "one.gguf")), "one shard of a 3-shard")
    assert not (tmp_path / "one.gguf").exists()


def test_synth_refuses_sizes_it_cannot_hold(tmp_path):
    one_error(flashflex("gguf", "synth", str(tmp_path / "v.gguf"), "--vocab", "100000000"), "n_vocab")
    one_error(flashflex("gguf", "synth", str(tmp_path / "e.gguf"), "--set", "n_embd=1000000", "--set",
                        "n_ff=1000000"), "GiB free")
    (tmp_path / "d").mkdir()
    one_error(flashflex("gguf", "synth", str(tmp_path / "d"), "--force"), "is a directory")
    no_partials(tmp_path)


# -- inputs that are not regular files: one line, never a hang -------------------------------------


def test_fifos_as_inputs_are_refused_quickly(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    cfg = tmp_path / "config.yaml"
    os.mkfifo(cfg)
    for args in (["run", "-m", str(fifo), "-n", "1"], ["verify-exact", "-m", str(fifo), "--tokens", "2"],
                 ["serve", "-m", str(fifo), "--port", "1"], ["run", str(cfg)], ["gguf", "inspect", str(fifo)]):
        t0 = time.monotonic()
        one_error(flashflex(*args, timeout=60), "not a regular file")
        assert time.monotonic() - t0 < 30


def test_empty_model_path_says_so():
    one_error(flashflex("run", "-m", "", "-n", "1"), "--model is empty")


# -- YAML ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,needle", [
    ("a: &a ['lol', 'lol']\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]\n", "anchors and aliases"),
    ("a: &a [*a]\n", "anchors and aliases"),
    ("model: {path: x.gguf}\nmodel: {path: y.gguf}\n", "duplicate key 'model' (first on line 1)"),
    ("# nothing but a comment\n", "is empty"),
])
def test_yaml_bombs_duplicates_and_empty_files(tmp_path, text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    one_error(flashflex("run", str(cfg), "-n", "1", timeout=60), needle)


# -- options that do not apply to the run ----------------------------------------------------------


def test_bank_options_on_runs_without_banks_are_refused(dense, moe_models, tmp_path):
    moe, sc = moe_models["qwen3moe"]
    banks, moe_only = "applies to runs with expert banks", "applies to MoE models only"
    cases = [
        (["-m", str(moe), "--moe-mode", "stock", "--moe-trace", str(tmp_path / "t.jsonl")], "--moe-trace", banks),
        (["-m", str(moe), "--moe-trace", str(tmp_path / "t.jsonl")], "--moe-trace", banks),
        (["-m", str(dense), "--moe-trace", str(tmp_path / "t.jsonl")], "a dense model", moe_only),
        (["-m", str(moe), "--moe-mode", "stock", "--moe-slot-bank", "8"], "--moe-slot-bank",
         "applies to slot-bank and oracle modes, not stock"),
        (["-m", str(moe), "--moe-mode", "stock", "--moe-prefetch", "router-lookahead"], "--moe-prefetch", banks),
        (["-m", str(moe), "--moe-mode", "stock", "--moe-sidecar", str(sc)], "--moe-sidecar", banks),
        (["-m", str(dense), "--moe-sidecar", str(sc)], "--moe-sidecar", moe_only),
    ]
    for args, needle, rule in cases:
        one_error(flashflex("run", *args, "-n", "1"), needle, rule)
    assert not (tmp_path / "t.jsonl").exists()


def test_budget_above_ram_and_too_many_threads_warn(dense, patched_llama):
    result = flashflex("run", "-m", str(dense), "--budget", "1TB", "-t", "1000", "-n", "1")
    assert result.returncode == 0, result.stderr
    assert "more than this machine's" in result.stderr and "more compute threads than" in result.stderr


@pytest.mark.parametrize("args", [
    ["run", "--ctx", "1"], ["run", "--moe-slot-bank", "0"], ["run", "--moe-slot-bank", "abc"],
    ["run", "-n", "-5"], ["run", "--ubatch", "0"], ["run", "--frobnicate"], ["gguf", "synth", "x", "--type", "bogus"],
    ["verify-exact", "--tokens", "0"], ["serve", "--port", "0"],
])
def test_usage_errors_are_one_line(args):
    result = flashflex(*args)
    assert result.returncode == 2
    one_error(result, "--help")


def test_a_prompt_that_is_not_utf8_still_runs(dense, patched_llama):
    result = subprocess.run([sys.executable, "-m", "orchestrator", "run", "-m", str(dense), "-n", "2", "-p",
                             os.fsdecode(b"\x01\x02\xff\xfe")], capture_output=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")


# -- sidecars -------------------------------------------------------------------------------------------


def _copy_sidecar(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, copy_function=shutil.copy2)  # copy2 keeps the mtimes the manifest records
    return dst


def test_a_manifest_edited_after_extraction_is_refused(moe_models, tmp_path, patched_llama):
    model, sc = moe_models["qwen3moe"]
    edited = _copy_sidecar(sc, tmp_path / "edited.sidecar")
    manifest = json.loads((edited / "manifest.json").read_text())
    a, b = (t for t in manifest["tensors"] if t["layer"] == 1 and t["family"] in ("gate", "up"))
    a["offset"], b["offset"] = b["offset"], a["offset"]
    (edited / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    one_error(flashflex("run", "-m", str(model), "--moe-mode", "slot-bank", "--moe-slot-bank", "4", "--moe-sidecar",
                        str(edited), "-n", "2"), "manifest.json was edited after extraction")


def test_a_model_edited_after_extraction_is_refused_until_verified(moe_models, tmp_path, patched_llama):
    import shutil

    model, sc = moe_models["qwen3moe"]
    copy = tmp_path / model.name
    shutil.copy2(model, copy)
    side = tmp_path / (model.stem + ".sidecar")
    from orchestrator import sidecar

    sidecar.extract(copy, side)
    os.utime(copy, ns=(time.time_ns(), time.time_ns()))  # touched (or edited) after extraction
    run = ["run", "-m", str(copy), "--moe-mode", "slot-bank", "--moe-slot-bank", "4", "-n", "2"]
    one_error(flashflex(*run), "was modified after the sidecar was extracted", "sidecar verify")
    verified = flashflex("sidecar", "verify", str(side), "--model", str(copy))
    assert verified.returncode == 0, verified.stderr  # every expert still matches: the new mtime is recorded
    assert flashflex(*run).returncode == 0


def test_bit_rot_in_a_layer_file_stops_the_run_naming_layer_tensor_and_expert(moe_models, tmp_path, patched_llama):
    """One flipped byte in an expert slot, the file's mtime restored (what `sidecar verify` alone used to catch):
    the runtime checks every expert it reads against its checksum."""
    if "expert-checksum" not in patched_llama.info()["features"]:
        pytest.skip("the installed build predates expert checksums; run flashflex build")
    model, sc = moe_models["qwen3moe"]
    rotten = _copy_sidecar(sc, tmp_path / "rotten.sidecar")
    manifest = json.loads((rotten / "manifest.json").read_text())
    t = next(t for t in manifest["tensors"] if t["layer"] == 1 and t["family"] == "up")
    layer_file = rotten / t["file"]
    st = layer_file.stat()
    data = bytearray(layer_file.read_bytes())
    for e in range(t["n_expert"]):  # every expert, so whichever the prompt routes to is rotten
        data[t["offset"] + e * t["expert_stride"] + 100] ^= 0x10
    layer_file.write_bytes(bytes(data))
    os.utime(layer_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    run = ["run", "-m", str(model), "--moe-mode", "slot-bank", "--moe-slot-bank", "4", "--moe-sidecar", str(rotten),
           "-n", "4"]
    one_error(flashflex(*run), "layer 1, tensor blk.1.ffn_up_exps.weight, expert",  # on by default
              "does not match its checksum", "sidecar verify")
    assert flashflex(*run, "--no-moe-verify").returncode == 0  # the opt-out reads without checking
    cfg = tmp_path / "verify.yaml"
    cfg.write_text("moe: {verify: false}\n")
    assert flashflex(*run[:1], str(cfg), *run[1:]).returncode == 0  # the YAML key
    one_error(flashflex(*run[:1], str(cfg), *run[1:], "--moe-verify"), "does not match its checksum")  # flag wins


# -- traces ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded(moe_models, tmp_path_factory, patched_llama) -> Path:
    model, sc = moe_models["qwen3moe"]
    out = tmp_path_factory.mktemp("trace") / "t.jsonl"
    result = flashflex("run", "-m", str(model), "--moe-sidecar", str(sc), "--moe-mode", "slot-bank",
                       "--moe-slot-bank", "6", "--moe-trace", str(out), "-n", "4")
    assert result.returncode == 0, result.stderr
    return out


def test_cut_and_edited_traces_are_refused(recorded, tmp_path):
    lines = recorded.read_text().splitlines(keepends=True)
    assert json.loads(lines[-1]) == {"end": True, "records": len(lines) - 2}
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:5]))
    one_error(flashflex("trace", "analyze", str(cut)), "no end record")
    dup = tmp_path / "dup.jsonl"
    rec = json.loads(lines[1])
    rec["ids"][1] = rec["ids"][0]
    dup.write_text("".join([lines[0], json.dumps(rec) + "\n", *lines[2:]]))
    one_error(flashflex("trace", "analyze", str(dup)), "twice")
    one_error(flashflex("trace", "analyze", str(tmp_path)), "is a directory")


def test_trace_outputs_need_force_and_a_regular_file(recorded, moe_models, tmp_path):
    model, sc = moe_models["qwen3moe"]
    base = ["run", "-m", str(model), "--moe-sidecar", str(sc), "--moe-mode", "slot-bank", "--moe-slot-bank", "6",
            "-n", "2", "--moe-trace"]
    existing = tmp_path / "existing.jsonl"
    existing.write_text("keep me\n")
    one_error(flashflex(*base, str(existing)), "already exists", "--force")
    assert existing.read_text() == "keep me\n"
    assert flashflex(*base, str(existing), "--force").returncode == 0
    assert existing.read_text() != "keep me\n"
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    one_error(flashflex(*base, str(fifo), "--force", timeout=60), "not a regular file")
    assert fifo.is_fifo()
    one_error(flashflex("trace", "analyze", str(recorded), "--png", str(tmp_path / "no" / "x.png")), "does not exist")
    (tmp_path / "pngdir").mkdir()
    one_error(flashflex("trace", "analyze", str(recorded), "--png", str(tmp_path / "pngdir")), "is a directory")
    one_error(flashflex("trace", "analyze", str(recorded), "--budget", "1GiB"), "--budget needs --manifest")
    no_partials(tmp_path)


# -- signals and interrupted writes ------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_during_a_write_leaves_nothing_half_written(tmp_path, sig):
    out = tmp_path / "big.gguf"
    # SIGINT at its default in the child: a suite started in the background (sh -c '... &') inherits it ignored,
    # and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "gguf", "synth", str(out), "--preset",
                             "dense-7b-q4_0", "--layers", "4"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".partial") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, f"the signal did not stop the write: {err}"
    assert err.strip().splitlines()[-1].startswith("error:"), err
    assert not out.exists()
    no_partials(tmp_path)


def test_a_partial_left_by_a_killed_writer_is_swept_by_the_next(dense, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".copy.gguf.{dead.pid}.abc123.partial"
    stale.write_bytes(b"half")
    result = flashflex("gguf", "realign", str(dense), str(tmp_path / "copy.gguf"))
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    no_partials(tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_long_prompt_stops_the_run_within_seconds(patched_llama, tmp_path, sig):
    """The prompt is one llama_decode of a few seconds: SIGINT (Ctrl-C) or SIGTERM must stop it at the next graph
    node, not after."""
    if "interrupt" not in patched_llama.info()["features"]:
        pytest.skip("the installed build predates the interrupt flag; run flashflex build")
    from orchestrator.modelfile.locate import default_model_path

    default_model_path(log=lambda _msg: None)  # assembled now if it is not yet: the signal must land in the decode
    prompt = "The history of the printing press is long and full of detail. " * 220  # ~3,000 tokens
    cfg = tmp_path / "long.yaml"
    cfg.write_text(json.dumps({"prompt": prompt, "context": {"ctx": 4096, "batch": 4096, "ubatch": 4096},
                               "sampling": {"n_predict": 1}}))  # one ubatch: a single llama_decode
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(cfg)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)  # loaded, inside the prompt's decode (which takes several seconds on 2 cores)
    assert proc.poll() is None, proc.communicate()
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    waited = time.monotonic() - t0
    expected = (130, "error: interrupted") if sig == signal.SIGINT else (128 + sig, f"error: stopped by {sig.name}")
    assert (proc.returncode, err.strip()) == expected, err
    assert waited < 2.5, f"took {waited:.1f} s to stop"


_OUT_OF_MEMORY_AT_LOAD = """
import resource, sys
from pathlib import Path
from orchestrator.errors import FlashflexError
from orchestrator.run.loader import open_model
from orchestrator.run.settings import GenerationSettings

import llama_cpp  # loaded before the limit: only the model's buffers should meet it
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
try:
    open_model(GenerationSettings(model=Path(sys.argv[1]), ctx=int(sys.argv[2]), batch=32, ubatch=32, threads=1),
               None)
except FlashflexError as e:
    print(e.one_line())
    sys.exit(3)
print("loaded")
"""


def test_out_of_memory_at_load_is_one_line_naming_the_buffer(dense, patched_llama):
    """A buffer llama.cpp cannot allocate while loading (here the KV cache of a 4M-token context, under an address
    space limit of 1 GiB more than the process already maps; on a GPU, a device out of memory) is one line saying
    so, quoting llama.cpp's own error, with the fix, instead of "Failed to create llama_context"."""
    probe = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY_AT_LOAD, str(dense), str(1 << 22)],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert probe.returncode == 3, (probe.stdout, probe.stderr)
    line = probe.stdout.strip()
    assert line.startswith(f"out of memory loading {dense}: ") and "allocate" in line, line
    assert "--ctx" in line and "ulimit" in line and "\n" not in line, line


def test_a_run_without_memory_is_one_line_not_a_bug_report(tmp_path):
    """Memory that cannot be had outside a buffer llama.cpp names (C++'s bad_alloc while creating the context under
    ulimit -v; Python's MemoryError, as from arrays llama-cpp-python sizes by the context) is an out-of-memory line
    with the fix, not "unexpected MemoryError ... report it"."""
    model = synth.write_synth_model(synth.preset("tiny-dense"), tmp_path / "m.gguf")
    run = "sys.argv = ['flashflex', 'run', '--model', sys.argv[1], '--budget', '20GiB', '--ctx', str(1 << 22)]\n"
    limited = ("import resource, sys; from orchestrator.cli.main import main\n"
               "vm = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
               "resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))\n"
               + run + "main()\n")
    python_s = ("import sys; from orchestrator import api; from orchestrator.cli.main import main\n"
                "def prepare(*a, **k): raise MemoryError('Unable to allocate 15.3 MiB for an array')\n"
                "api.prepare = prepare\n" + run + "main()\n")
    for code in (limited, python_s):
        r = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, timeout=120,
                           cwd=REPO)
        one_error(r, "out of memory", "--ctx", "ulimit")
        assert "unexpected" not in r.stderr and "report it" not in r.stderr, r.stderr
