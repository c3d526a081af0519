"""Every command answers --help; bad input gets one clear line and a non-zero exit."""

from __future__ import annotations

import json
import subprocess

import pytest
import typer.main

from orchestrator.cli.main import app

from conftest import REPO, flashflex


def _command_paths(cmd, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    if getattr(cmd, "commands", None):
        for name, sub in cmd.commands.items():
            paths += _command_paths(sub, prefix + (name,))
    return paths


ALL_COMMANDS = _command_paths(typer.main.get_command(app))


def test_the_command_contract_is_present():
    names = {" ".join(p) for p in ALL_COMMANDS}
    for required in ["doctor", "vendor sync", "patches apply", "patches export", "patches check",
                     "patches status", "build", "run"]:
        assert required in names


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "flashflex")
def test_help(path):
    result = flashflex(*path, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode != 0
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    return lines[0]


def test_missing_model_file(tmp_path):
    line = _one_error_line(flashflex("run", "--model", str(tmp_path / "nope.gguf")))
    assert "does not exist" in line


def test_non_gguf_model_file(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 definitely a zip")
    line = _one_error_line(flashflex("run", "--model", str(bogus)))
    assert "not a GGUF" in line


def test_unknown_backend():
    result = flashflex("build", "--backend", "opencl")  # not a backend flashflex builds (vulkan now is one)
    assert result.returncode != 0
    assert "opencl" in result.stderr and "vulkan" in result.stderr and "Traceback" not in result.stderr


def test_gitlink_matches_the_recorded_pin():
    from orchestrator import gitutil, vendor

    line = gitutil.out(REPO, "ls-tree", "HEAD", "vendor/llama.cpp").split()
    assert line[:3] == ["160000", "commit", vendor.load_pin(REPO).commit]
    assert gitutil.out(REPO, "ls-files", "vendor").split() == ["vendor/PIN.json", "vendor/llama.cpp"]


@pytest.mark.native
def test_run_dry_run_prints_the_runtime_spec_and_loads_nothing(moe_models, patched_llama, tmp_path):
    """`run --dry-run --json`: the mode, the plan summary and what the native runtime would be told."""
    model, sc = moe_models["qwen3moe"]
    trace = tmp_path / "t.jsonl"
    result = flashflex("run", "-m", str(model), "--moe-sidecar", str(sc), "--moe-mode", "slot-bank", "--budget",
                       "8MiB", "--ctx", "128", "--ubatch", "8", "--moe-trace", str(trace), "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    spec = out["runtime_spec"]
    banks = spec["banks"]
    assert out["mode"] == "slot-bank" and banks["slots"] == out["moe"]["slots"] >= 4 and spec["version"] == 1
    assert banks["trace"] == str(trace) and banks["trace_header"]["slots"] == banks["slots"]
    assert spec["direct_io"] == "on" and spec["stream"] is None
    assert spec["files"] == [str(sc / f"layer-{i:03d}.bin") for i in range(3)]
    assert {b["name"] for b in banks["tensors"]} >= {"blk.0.ffn_up_exps.weight", "blk.2.ffn_down_exps.weight"}
    assert not trace.exists() and not list(tmp_path.iterdir())  # nothing recorded, nothing loaded
    # the spec is the whole contract: it reads back into the model it came from
    from orchestrator.run.spec import RuntimeSpec

    assert RuntimeSpec.model_validate(spec).model_dump(mode="json") == spec
    stock = json.loads(flashflex("run", "-m", str(model), "--dry-run", "--json").stdout)
    assert stock["mode"] == "stock" and stock["runtime_spec"]["stream"] is None
    assert stock["runtime_spec"]["banks"] is None
