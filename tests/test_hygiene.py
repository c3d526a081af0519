"""Inputs that are clumsy rather than wrong get one line, quickly, and an interrupted cleanup still cleans up (the
2026-12-04 reliability review: H1, H2, M16, M17, L6)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import MAX_PROBLEMS_SHOWN, load_run_config
from orchestrator.errors import FlashflexError

from conftest import REPO


def _refused(path: Path) -> str:
    with pytest.raises(FlashflexError) as info:
        load_run_config(path)
    line = info.value.one_line()
    assert "\n" not in line
    return line


def test_deeply_nested_yaml_is_one_line(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert "nests too deeply" in _refused(deep)


def test_a_giant_integer_is_one_line(tmp_path):
    big = tmp_path / "bigint.yaml"
    big.write_text("context:\n  ctx: " + "9" * 5000 + "\n")
    line = _refused(big)
    assert "invalid YAML" in line and len(line) < 600


def test_many_unknown_keys_are_counted_not_listed(tmp_path):
    many = tmp_path / "keys.yaml"
    many.write_text("".join(f"key{i}: 1\n" for i in range(20_000)))
    line = _refused(many)
    assert "20000 invalid settings" in line and f"and {20_000 - MAX_PROBLEMS_SHOWN} more" in line
    assert len(line) < 2000


def test_a_huge_config_file_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    import yaml

    def never(*_args, **_kwargs):
        raise AssertionError("the YAML parser was reached")

    monkeypatch.setattr(yaml, "compose", never)
    monkeypatch.setattr(yaml, "load", never)
    huge = tmp_path / "huge.yaml"
    huge.write_text("prompt: " + "x" * (17 << 20) + "\n")
    assert "a RunConfig is a few KiB" in _refused(huge)


def test_a_long_rejected_value_is_cut(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("context:\n  ctx: '" + "y" * 10_000 + "'\n")
    line = _refused(bad)
    assert "…" in line and len(line) < 600


def test_a_second_signal_does_not_interrupt_a_writers_cleanup(tmp_path):
    """The first SIGTERM stops the writer; a second one arriving while its partial directory is removed waits until
    the removal is done (it used to leave the partial directory behind)."""
    script = f"""
import os, shutil, signal, sys, time
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
from orchestrator import fsutil

class Stop(BaseException):
    pass

def stop(signum, frame):
    raise Stop(signum)

signal.signal(signal.SIGTERM, stop)
remove = shutil.rmtree

def remove_slowly(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # the second signal, during the cleanup
    time.sleep(0.05)
    remove(*args, **kwargs)

shutil.rmtree = remove_slowly
out = Path(sys.argv[1])
try:
    with fsutil.atomic_dir(out / "result") as tmp:
        (tmp / "part").write_bytes(b"x" * 4096)
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal, while writing
        time.sleep(5)
except Stop:
    print("stopped")
print(sorted(p.name for p in out.iterdir()))
"""
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["stopped", "[]"], proc.stdout


@pytest.mark.native
def test_a_prompt_far_beyond_the_context_is_refused_before_tokenizing(patched_llama, tmp_path):
    from orchestrator import synth

    from conftest import flashflex, one_error

    model = synth.write_synth_model(synth.preset("tiny-dense"), tmp_path / "m.gguf")
    one_error(flashflex("run", "-m", str(model), "--ctx", "64", "-n", "1", "--prompt", "word " * 4000),
              "far more than a context of 64 tokens", "--ctx")


def test_strings_from_files_are_printable_and_bounded():
    """An error quoting a file's bytes (a corrupt key of 3 MB, a tensor name with terminal escapes) prints as one
    bounded line without control characters (M14, X6)."""
    line = FlashflexError("corrupt: general.architecture\x08\x00" + "\x1b[2J" * 1_000_000, "fix it").one_line()
    assert "\x1b" not in line and "\x00" not in line and "\\x1b[2J" in line
    assert len(line) < 2200 and "more characters" in line and line.endswith("— fix it")


def test_gguf_inspect_escapes_a_tensor_name(tmp_path):
    from orchestrator import synth

    from conftest import flashflex

    model = synth.write_synth_model(synth.preset("tiny-dense"), tmp_path / "m.gguf")
    data = model.read_bytes()
    name = b"token_embd.weight"
    evil = b"\x1b[2J\x1b[31mtoken_em"  # same length: the file stays a valid GGUF
    assert len(evil) == len(name) and data.count(name) == 1
    model.write_bytes(data.replace(name, evil))
    out = flashflex("gguf", "inspect", str(model), "--tensors")
    assert out.returncode == 0, out.stderr
    assert "\x1b[2J" not in out.stdout and "\\x1b[2J" in out.stdout


def test_a_loop_of_links_is_named_as_such(tmp_path):
    from orchestrator.modelfile.reader import read_model_table

    loop = tmp_path / "loop.gguf"
    loop.symlink_to(loop)
    with pytest.raises(FlashflexError, match="symbolic link that leads nowhere"):
        read_model_table(loop)


def test_llama_cpp_keyword_names_are_accepted(tmp_path):
    """Code ported from `llama_cpp.Llama(...)` keeps its keyword names (review, friendliness)."""
    from orchestrator.api import split_llama_kwargs

    ours, passed = split_llama_kwargs({"n_ctx": 256, "n_batch": 64, "n_ubatch": 8, "n_threads": 2, "seed": 3,
                                       "n_gpu_layers": 2, "budget": "1GiB", "verbose": True, "chat_format": "chatml"})
    assert ours == {"ctx": 256, "batch": 64, "ubatch": 8, "threads": 2, "seed": 3, "gpu_layers": 2, "budget": "1GiB"}
    assert passed == {"verbose": True, "chat_format": "chatml"}
    with pytest.raises(FlashflexError, match="n_ctx and ctx both set"):
        split_llama_kwargs({"n_ctx": 256, "ctx": 128})


@pytest.mark.native
def test_open_llama_with_llama_cpp_names(patched_llama, tmp_path):
    import orchestrator as ff
    from orchestrator import synth

    model = synth.write_synth_model(synth.preset("tiny-dense"), tmp_path / "m.gguf")
    with ff.llama(model_path=model, n_ctx=256, n_batch=32, n_ubatch=8, n_threads=1, verbose=False,
                  chat_format="chatml") as llm:
        assert llm.n_ctx() == 256 and llm.n_batch == 32 and llm.chat_format == "chatml"
        assert llm.flashflex.prepared.settings.ubatch == 8


def test_every_ci_job_runs_one_local_command():
    """Each job of the CI matrix runs one command a person can run by hand: .ci/run or a Makefile target (no logic
    that lives only in the workflow)."""
    import re

    import yaml

    root = Path(__file__).resolve().parent.parent
    workflow = yaml.safe_load((root / ".github/workflows/ci.yml").read_text())
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", (root / "Makefile").read_text(), re.M))
    jobs = workflow["jobs"]["test"]["strategy"]["matrix"]["include"]
    assert {j["backend"] for j in jobs} == {"cpu", "metal", "vulkan", "cuda"}
    for job in jobs:
        cmd = job["command"].split()
        assert cmd == ["bash", ".ci/run"] or (cmd[0] == "make" and cmd[1] in targets), job


@pytest.mark.native
def test_the_default_ubatch_shrinks_to_fit_a_small_budget(patched_llama, tmp_path):
    """A budget that holds the model with a small ubatch but not with the default one (the Python API's contexts
    keep a row of logits per token, as stock: 64k vocabulary x 512 tokens): the largest halving that fits is used
    and said, and a logical batch set equal to the micro-batch follows it (llama-server's `-b` = `-ub`); an ubatch
    the user gave is refused as before."""
    import warnings

    from orchestrator import api, synth
    from orchestrator.errors import BudgetBelowMinimum

    model = synth.write_synth_model(synth.preset("tiny-dense", n_vocab=65536), tmp_path / "wide-vocab.gguf")
    small = api.prepare(model=model, budget="1GiB", ctx=256, ubatch=32).plan.minimum_budget_bytes
    default = api.prepare(model=model, budget="1GiB", ctx=256).plan.minimum_budget_bytes
    assert default > small + (16 << 20), (default, small)  # the default ubatch's buffers are what does not fit
    budget = f"{small + (4 << 20)}B"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = api.prepare(model=model, budget=budget, ctx=256)
    assert 32 <= prepared.settings.ubatch < 512 and prepared.plan.used_bytes <= prepared.plan.budget_bytes
    assert any(f"using ubatch {prepared.settings.ubatch}, the largest that fits" in str(w.message) for w in caught)
    assert prepared.settings.batch == 512  # the logical batch as it was
    # a batch set to the micro-batch (llama-server's, one decode call per micro-batch) shrinks with it
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        served = api.prepare(model=model, budget=budget, ctx=256, batch=512)
    assert served.settings.batch == served.settings.ubatch == prepared.settings.ubatch
    with pytest.raises(BudgetBelowMinimum):
        api.prepare(model=model, budget=budget, ctx=256, ubatch=512)
