"""The plan as one spec file: what the runtime reads at load through the "flashflex.spec" key override, for the
Python API and for llama.cpp's own programs alike (`flashflex exec`). Bad specs (edited, another version, another
series, another model, out-of-range values) are refused with the file and the problem named; several sequences
decoded together (continuous batching) give logits bitwise equal to stock's for the same batches."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import exact, native, synth
from orchestrator.errors import FlashflexError
from orchestrator.run import loader
from orchestrator.run.settings import GenerationSettings
from tests.helpers import prepare, prepared_of

from conftest import flashflex, one_error

pytestmark = pytest.mark.native

CTX = 128


@pytest.fixture(scope="module")
def specs(patched_llama):
    if "spec-file" not in patched_llama.info()["features"]:
        pytest.skip("the installed build predates spec files; run flashflex build")
    return patched_llama


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spec")
    return synth.write_synth_model(synth.preset("tiny-dense", quant="q8_0", n_embd=256, n_ff=768), out / "m.gguf")


def _settings(path: Path, ubatch: int = 8) -> GenerationSettings:
    return GenerationSettings(model=path, ctx=CTX, batch=64, ubatch=ubatch, threads=2, n_predict=4)


def _minimum_budget(path: Path) -> str:
    """The planner's minimum budget for the model (the most it streams), rounded up to a MiB."""
    full = prepare({"model.path": path, "budget.size": "64GiB", "context.ctx": CTX, "context.ubatch": 32})
    return f"{math.ceil(full.plan.minimum_budget_bytes / 2**20)}MiB"


def _streamed(path: Path, ubatch: int = 8):
    """A plan that streams every layer it can (the planner's minimum budget)."""
    return prepare({"model.path": path, "budget.size": _minimum_budget(path), "context.ctx": CTX,
                    "context.ubatch": ubatch}, _settings(path, ubatch))


def _spec_doc(path: Path) -> dict:
    prepared = _streamed(path)
    assert prepared.spec.native and prepared.spec.stream is not None
    return native.spec_document(prepared.spec)


def _written(doc: dict, tmp_path: Path, name: str = "spec.json") -> str:
    return native.write_spec(doc, tmp_path / name)


def test_a_written_spec_passes_the_librarys_checks(specs, model, tmp_path):
    path = _written(_spec_doc(model), tmp_path)
    native.check_spec(path)
    doc = json.loads(Path(path).read_text())
    assert doc["flashflex_spec"] == native.SPEC_VERSION
    assert doc["series_hash"] == native.info()["series_hash"]
    assert doc["model"]["bytes"] == model.stat().st_size
    assert doc["stream"] and doc["digest"].startswith("fnv1a64:")


@pytest.mark.parametrize("edit,says", [
    (lambda d: d["options"].update(window=5), "digest does not match"),
    (lambda d: d.update(flashflex_spec=2), "spec version 2"),
    (lambda d: d.update(series_hash="0" * 64), "patch series 000000000000"),
])
def test_an_edited_or_foreign_spec_is_refused(specs, model, tmp_path, edit, says):
    doc = _spec_doc(model)
    edit(doc)
    path = _written(doc, tmp_path)
    with pytest.raises(FlashflexError, match=says):
        native.check_spec(path)


@pytest.mark.parametrize("edit,says", [
    (lambda d: d["options"].update(window=0), "window = 0 is out of range"),
    (lambda d: d["options"].update(no_such_key=1), 'unknown option "no_such_key"'),
    (lambda d: d["strings"].update(moe_prefetch="psychic"), 'moe_prefetch "psychic" is not none'),
    (lambda d: d["stream"][0].update(file=3), r"stream\[0\] names file 3 of 1"),
    (lambda d: d.update(extra=1), 'unknown key "extra"'),
    (lambda d: d.update(schedule=[0, 5, 1]), "malformed record"),
])
def test_every_refusal_of_a_value_says_why(specs, model, tmp_path, edit, says):
    """Even a well-sealed spec (as a buggy writer would make) is checked value by value."""
    doc = _spec_doc(model)
    edit(doc)
    path = _written(native.seal(doc), tmp_path)
    with pytest.raises(FlashflexError, match=says):
        native.check_spec(path)


def test_a_spec_that_is_not_json_or_missing_is_named(specs, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FlashflexError, match=f"the spec {bad} is not valid JSON"):
        native.check_spec(bad)
    with pytest.raises(FlashflexError, match="cannot read the spec"):
        native.check_spec(tmp_path / "missing.json")


def test_a_spec_of_another_model_is_refused_at_load(specs, model, tmp_path):
    """A spec handed to another file (a model replaced after planning) fails the load before anything is read."""
    other = synth.write_synth_model(synth.preset("tiny-dense", quant="q8_0", n_embd=256, n_ff=1024),
                                    tmp_path / "other.gguf")
    spec = _streamed(model).spec
    path = loader.write_native_spec(spec, dest=tmp_path / "spec.json")
    from llama_cpp import Llama

    with pytest.raises(ValueError):
        Llama(model_path=str(other), n_ctx=CTX, use_mmap=False, verbose=False,
              kv_overrides={native.SPEC_KEY: path})
    assert "was planned for" in native.last_error() and "plan this model" in native.last_error()


def test_a_spec_path_too_long_for_the_override_is_refused(specs, model, tmp_path):
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    with pytest.raises(FlashflexError, match="longer than llama.cpp's 127-byte"):
        native.write_spec(_spec_doc(model), deep / "spec.json")


# -- several sequences decoded together -------------------------------------------------------------------------


@pytest.mark.parametrize("ubatch", [1, 32])
def test_batched_decode_is_bitwise_exact_when_streaming(specs, model, ubatch):
    """4 sequences as a server's slots decode them (their prompts in one batch, then one token each per pass)."""
    seqs = [exact.teacher_tokens(12, 512, seed=s) for s in range(4)]
    prepared = _streamed(model, ubatch)
    stock = exact.batched_logits(prepared_of(prepared.settings), seqs, prompt=6)
    mine = exact.batched_logits(prepared, seqs, prompt=6)
    assert exact.compare(stock.reshape(-1, stock.shape[-1]), mine.reshape(-1, mine.shape[-1])).identical
    # and each sequence's logits are its own (not the same row repeated)
    assert not (stock[0] == stock[1]).all()


@pytest.mark.parametrize("ubatch", [1, 32])
def test_batched_decode_is_bitwise_exact_with_slot_banks(specs, moe_models, ubatch):
    """The union of a pass's experts exceeds a top-k bank: the pass runs in groups, still exact."""
    path, sc = moe_models["qwen3moe"]
    settings = _settings(path, ubatch)
    seqs = [exact.teacher_tokens(10, 512, seed=10 + s) for s in range(4)]
    banked = prepare({"model.path": path, "budget.size": "64GiB", "context.ctx": CTX, "context.ubatch": ubatch,
                      "moe.mode": "slot-bank", "moe.sidecar": sc, "moe.slot_bank": 4}, settings)
    stock = exact.batched_logits(prepared_of(settings), seqs, prompt=5)
    mine = exact.batched_logits(banked, seqs, prompt=5)
    assert exact.compare(stock.reshape(-1, stock.shape[-1]), mine.reshape(-1, mine.shape[-1])).identical


# -- llama.cpp's programs under a plan --------------------------------------------------------------------------


def test_exec_dry_run_names_the_spec_and_the_planned_arguments(specs, model, tmp_path):
    out = tmp_path / "spec.json"
    result = flashflex("exec", "llama-completion", "--model", str(model), "--budget", _minimum_budget(model),
                       "--ctx", str(CTX), "--ubatch", "32", "--spec-out", str(out), "--dry-run", "--json",
                       "--", "-n", "4")
    assert result.returncode == 0, result.stderr
    cmd = json.loads(result.stdout)
    argv = cmd["argv"]
    assert Path(argv[0]).name == "llama-completion"
    assert f"{native.SPEC_KEY}=str:{out}" in argv and argv[argv.index("-lm") + 1] == "none"
    assert argv[argv.index("-c") + 1] == str(CTX) and argv[-2:] == ["-n", "4"]
    native.check_spec(out)
    assert "--no-repack" not in argv  # the spec keeps the streamed weights in the file's layout, the rest repacked
    assert json.loads(out.read_text())["file_layout"]  # ...the ones it streams


def test_exec_turns_off_the_servers_host_state_outside_the_plan(specs, model):
    """llama-server's prompt cache and context checkpoints would hold RAM beside the plan: off, before the program's
    own arguments; llama-completion has neither flag and gets neither."""
    argv = {}
    for tool in ("llama-server", "llama-completion"):
        result = flashflex("exec", tool, "--model", str(model), "--budget", _minimum_budget(model), "--ctx",
                           str(CTX), "--ubatch", "32", "--dry-run", "--json", "--", "--port", "0")
        assert result.returncode == 0, result.stderr
        argv[tool] = json.loads(result.stdout)["argv"]
    server = argv["llama-server"]
    assert server[-7:] == ["-cram", "0", "--no-cache-idle-slots", "-ctxcp", "0", "--port", "0"]
    assert "-cram" not in argv["llama-completion"] and "-ctxcp" not in argv["llama-completion"]
    assert "--swa-full" not in server  # a model without sliding-window layers (see the next test)


def test_exec_keeps_the_sliding_window_cache_the_plan_measured(specs):
    """Gemma 3: the full-size cache of its sliding-window layers, as llama.cpp's C API (and so the plan's
    measurement) allocates it; its programs' default is the window."""
    from orchestrator.modelfile.locate import default_model_path

    gemma = default_model_path(log=lambda m: None)
    if gemma is None or not gemma.exists():
        pytest.skip("the default model is not installed (make demo installs it)")
    for tool in ("llama-server", "llama-completion"):
        result = flashflex("exec", tool, "--model", str(gemma), "--budget", "230MiB", "--ctx", "256", "--ubatch",
                           "32", "--dry-run", "--json")
        assert result.returncode == 0, result.stderr
        assert "--swa-full" in json.loads(result.stdout)["argv"], tool


@pytest.mark.parametrize("arg,says", [("-c", "--ctx"), ("--mmap", "load mode"), ("-ngl", "--gpu-layers"),
                                      ("--ctx-checkpoints", "context checkpoints"), ("--swa-full", "KV cache")])
def test_exec_refuses_arguments_the_plan_sets(specs, model, arg, says):
    result = flashflex("exec", "llama-completion", "--model", str(model), "--", arg, "8")
    assert result.returncode != 0
    assert says in one_error(result, "set by flashflex's plan")


def test_exec_refuses_a_program_it_does_not_ship(specs, model):
    result = flashflex("exec", "llama-quantize", "--model", str(model))
    assert result.returncode != 0
    assert "llama-server" in one_error(result, "not a program flashflex runs")


def test_llama_completion_runs_under_the_plan_and_answers_as_run_does(specs, model):
    """The shipped program greedy-generates, under the plan, the bytes `flashflex run` generates under it."""
    common = ["--model", str(model), "--budget", _minimum_budget(model), "--ctx", str(CTX), "--ubatch", "8",
              "--threads", "2"]
    run = flashflex("run", *common, "--prompt", "Hello", "-n", "6", "--json")
    assert run.returncode == 0, run.stderr
    from llama_cpp import Llama

    vocab = Llama(model_path=str(model), vocab_only=True, verbose=False)
    want = vocab.detokenize(json.loads(run.stdout)["tokens"])
    done = subprocess.run([sys.executable, "-m", "orchestrator", "exec", "llama-completion", *common, "--",
                           "-p", "Hello", "-n", "6", "--temp", "0", "-no-cnv", "--no-warmup", "--no-display-prompt",
                           "-s", "0"], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert want and want in done.stdout, (want, done.stdout[-500:])


def test_a_program_handed_a_spec_of_another_model_refuses_it(specs, model, tmp_path):
    """Proof that the program reads the spec (the stock path would load any file): one of another model fails."""
    from orchestrator import tools

    other = synth.write_synth_model(synth.preset("tiny-dense", quant="q8_0", n_embd=256, n_ff=1024),
                                    tmp_path / "other.gguf")
    path = loader.write_native_spec(_streamed(model).spec, dest=tmp_path / "spec.json")
    base = [str(tools.locate("llama-completion")), "-m", str(other), "-lm", "none", "-n", "2", "-no-cnv", "-p", "x"]
    assert subprocess.run(base, capture_output=True, timeout=120).returncode == 0  # stock loads it

    def with_spec() -> subprocess.CompletedProcess:
        return subprocess.run([*base, "--override-kv", f"{native.SPEC_KEY}=str:{path}"], capture_output=True,
                              timeout=120)

    done = with_spec()
    assert done.returncode != 0
    # llama.cpp's programs log through a background thread that may not flush before a failed load exits: the
    # reason is looked for in up to three runs
    assert any(b"was planned for" in r.stderr for r in (done, with_spec(), with_spec())), done.stderr[-1000:]
