"""The device check (scripts/gpu_check.sh, scripts/gpu_check.py, scripts/bench_hybrid.py) as far as it runs without a
GPU: its dry run, its argument handling, its refusals, the benchmark's sizing, medians and summary on made-up runs,
and the slim sdist the device builds from (orchestrator.build)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from orchestrator import build, vendor
from orchestrator.errors import FlashflexError

from conftest import REPO


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gc = _load("gpu_check")
bh = _load("bench_hybrid")


def _fake_tools(tmp_path: Path, gpu: bool = True, nvcc: bool = True) -> Path:
    """A bin folder with a fake nvidia-smi (an H200: compute capability 9.0) and a fake nvcc."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if gpu:
        (bindir / "nvidia-smi").write_text("#!/bin/sh\necho '9.0, NVIDIA H200, 143771'\n")
    if nvcc:
        (bindir / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    return bindir


def _check(tmp_path: Path, bindir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", PYTHON=sys.executable)
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path / "out"), "--work",
                           str(tmp_path / "work"), *args], capture_output=True, text=True, env=env, timeout=120)


def test_dry_run_prints_every_step_and_runs_nothing(tmp_path):
    result = _check(tmp_path, _fake_tools(tmp_path), "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "GPU: NVIDIA H200, compute 9.0, 143771 MiB" in out
    build_line = next(ln for ln in out.splitlines() if "orchestrator build" in ln)
    assert "--backend cuda" in build_line and "-DCMAKE_CUDA_ARCHITECTURES=90-real" in build_line
    assert "--no-install" in build_line
    test_line = next(ln for ln in out.splitlines() if "-m pytest" in ln)
    assert "-m gpu" in test_line and "tests/test_gpu.py" in test_line and "tests/test_backends.py" in test_line
    # the benchmark's five configurations, with the -ngl of each (4 layers: partial is the last 2)
    for name, ngl in (("stock-gpu", 99), ("stock-cpumoe-mmap", 99), ("ff-slotbank", 99),
                      ("stock-partial-mmap", 2), ("ff-partial-stream", 2)):
        assert f"  {name}: -ngl {ngl}," in out, name
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()  # nothing written, nothing run


def test_dry_run_without_the_bench_and_with_an_architecture(tmp_path):
    result = _check(tmp_path, _fake_tools(tmp_path), "--dry-run", "--no-bench", "--arch", "90a")
    assert result.returncode == 0, result.stderr
    assert "-DCMAKE_CUDA_ARCHITECTURES=90a" in result.stdout
    assert "[bench] skipped (--no-bench)" in result.stdout and "stock-gpu" not in result.stdout


def test_dry_run_names_what_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gc, "query_gpu", lambda: (None, "nvidia-smi is not on PATH (no NVIDIA driver here)"))
    monkeypatch.setattr(gc, "find_nvcc", lambda: None)
    assert gc.main([str(tmp_path / "out"), "--dry-run", "--no-bench", "--work", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "missing: no NVIDIA GPU: nvidia-smi is not on PATH" in out
    assert "missing: no CUDA compiler" in out and "not ready here" in out


def _refusal(tmp_path: Path, monkeypatch, capsys, gpu: bool, nvcc: bool) -> str:
    if not gpu:
        monkeypatch.setattr(gc, "query_gpu", lambda: (None, "nvidia-smi is not on PATH (no NVIDIA driver here)"))
    else:
        monkeypatch.setattr(gc, "query_gpu", lambda: (gc.Gpu("9.0", "NVIDIA H100", 81559), ""))
    real_which = gc.shutil.which
    monkeypatch.setattr(gc.shutil, "which", lambda name: None if name == "nvcc" and not nvcc else real_which(name))
    monkeypatch.setattr(gc, "CUDA_DIRS", () if not nvcc else gc.CUDA_DIRS)
    monkeypatch.delenv("CUDACXX", raising=False)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    rc = gc.main([str(tmp_path / "out"), "--work", str(tmp_path / "w")])
    captured = capsys.readouterr()
    assert rc == 2
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and " — " in lines[0], captured.err
    assert not (tmp_path / "out").exists() and not (tmp_path / "w").exists()  # refused before doing anything
    return lines[0]


def test_refuses_without_a_gpu(tmp_path, monkeypatch, capsys):
    line = _refusal(tmp_path, monkeypatch, capsys, gpu=False, nvcc=True)
    assert "no NVIDIA GPU" in line and "nvidia-smi" in line


def test_refuses_without_nvcc(tmp_path, monkeypatch, capsys):
    line = _refusal(tmp_path, monkeypatch, capsys, gpu=True, nvcc=False)
    assert "nvcc" in line and "CUDA toolkit" in line


@pytest.mark.skipif(not Path("/usr/bin/env").exists(), reason="needs a POSIX shell")
def test_the_script_refuses_on_this_machine_when_it_has_no_gpu(tmp_path):
    """End to end through the shell wrapper, where nvidia-smi answers that there is no GPU."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver' "
                   ">&2\nexit 9\n")
    smi.chmod(0o755)
    result = _check(tmp_path, bindir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: no NVIDIA GPU: nvidia-smi sees no GPU (NVIDIA-SMI has failed because it could not communicate with "
        "the NVIDIA driver) — run this on a machine with one (the device tool's `run`)"]


def test_argument_handling(capsys):
    with pytest.raises(SystemExit) as exc:
        gc.parse_args([])
    assert exc.value.code == 2 and "OUTDIR is required" in capsys.readouterr().err
    for bad, needle in ((["o", "--arch", "sm_90"], "not a CUDA architecture"),
                        (["o", "--budget-s", "10"], "--budget-s"), (["o", "--repeats", "0"], "--repeats")):
        with pytest.raises(SystemExit):
            gc.parse_args(bad)
        assert needle in capsys.readouterr().err
    args = gc.parse_args(["o", "--no-bench", "--arch", "90-real", "--budget-s", "300"])
    assert args.no_bench and args.arch == "90-real" and args.budget_s == 300.0 and args.outdir == Path("o")
    assert gc.parse_args(["--prepare"]).prepare
    assert gc.Gpu("8.6", "x", 1).arch == "86-real" and gc.Gpu("9.0", "x", 1).arch == "90-real"


def test_the_gpu_test_modules_are_found():
    files = gc.gpu_test_files(REPO)
    assert "tests/test_gpu.py" in files and "tests/test_backends.py" in files
    assert "tests/test_gpu_check.py" not in files  # it has no gpu-marked test (this line names none either)


def test_pytest_counts_and_the_summary(tmp_path):
    text = "....\n=== 9 passed, 2 skipped, 1 xfailed, 3 warnings in 81.20s (0:01:21) ===\n"
    assert gc.pytest_counts(text) == {"passed": 9, "skipped": 2, "xfailed": 1, "warnings": 3}
    assert gc.pytest_counts("=== 1 failed, 4 passed in 2.0s ===") == {"failed": 1, "passed": 4}
    (tmp_path / "bench.md").write_text("| run | decode tok/s |\n")
    result = {"machine": {"gpu": "NVIDIA H200", "compute_cap": "9.0", "gpu_memory_mib": 143771, "arch": "90-real",
                          "nvcc_version": "13.0", "cores": 16, "python": "3.12.3"},
              "steps": [{"step": "build", "status": "ok", "seconds": 301.0, "detail": "built a|b"},
                        {"step": "bench", "status": "skipped", "seconds": 0, "detail": "--no-bench"}],
              "elapsed_s": 420.0, "budget_s": 570.0, "tests": {"passed": 9}}
    md = gc.summary_markdown(result, tmp_path)
    assert "GPU: NVIDIA H200 (compute 9.0, 143771 MiB) · built for 90-real · nvcc 13.0" in md
    assert "| build | ok | 301.0 | built a/b |" in md and "| bench | skipped | 0 | --no-bench |" in md
    assert "## Hybrid benchmark" in md and "| run | decode tok/s |" in md
    assert "Files: bench.md" in md
    assert all(len(gc.OUT_FILES) <= 8 and all(c.isalnum() or c in "._-" for c in f) for f in gc.OUT_FILES)


# --------------------------------------------------------------------------------------------------------
# The benchmark's sizing, medians and ratios


TENSORS = [("token_embd.weight", 100), ("output.weight", 100), ("output_norm.weight", 1)] + [
    (f"blk.{i}.{name}", n) for i in range(4)
    for name, n in (("attn_q.weight", 10), ("ffn_gate_inp.weight", 2), ("ffn_up_exps.weight", 50),
                    ("ffn_down_exps.weight", 50))]


def test_host_bytes_follow_the_placement():
    # every layer on the GPU: the token embedding stays on the host, the output layer goes; every expert stays
    assert bh.host_bytes(TENSORS, 4, 99) == (100, 400)
    # the last 2 layers on the GPU: layers 0 and 1 stay (12 dense bytes each), and the output layer with its norm
    assert bh.host_bytes(TENSORS, 4, 2) == (100 + 100 + 1 + 2 * 12, 400)


def test_plan_points_size_the_cgroups_and_skip_what_does_not_fit():
    points = bh.plan_points(list(bh.CONFIGS), TENSORS, 4, model_bytes=10 << 30, process_bytes=1000,
                            gpu_free_bytes=11 << 30)
    by = {p["config"]: p for p in points}
    assert by["stock-gpu"]["cgroup_bytes"] is None and "do not fit" in by["stock-gpu"]["skip"]
    assert by["stock-cpumoe-mmap"]["cgroup_bytes"] == by["ff-slotbank"]["cgroup_bytes"] == \
        1000 + bh.HOST_MARGIN + 100 + 200
    assert by["ff-partial-stream"]["cgroup_bytes"] == 1000 + bh.HOST_MARGIN + 225 // 2 + 200
    assert by["ff-partial-stream"]["gpu_layers"] == 2 and by["ff-slotbank"]["gpu_layers"] == 99
    fits = bh.plan_points(list(bh.CONFIGS), TENSORS, 4, model_bytes=1 << 30, process_bytes=0, gpu_free_bytes=80 << 30)
    assert all(p["skip"] is None for p in fits)


def _rec(config: str, tps: float | None, **extra):
    status = "ok" if tps is not None else "killed (out of memory in the cgroup)"
    return {"config": config, "status": status, "decode_tok_per_s": tps, **extra}


def test_medians_ratios_and_markdown():
    records = [_rec("stock-gpu", t) for t in (100.0, 90.0, 110.0)]
    records += [_rec("stock-cpumoe-mmap", t, cgroup_bytes=2 << 30, gpu_layers=99) for t in (3.0, 2.0, 4.0)]
    records += [_rec("ff-slotbank", t, miss_bytes_per_token=m, bank_slots=64, hit_rate=0.5)
                for t, m in ((12.0, 100e6), (11.0, 120e6), (13.0, 80e6))]
    records += [_rec("stock-partial-mmap", 5.0), _rec("stock-partial-mmap", None), _rec("ff-partial-stream", 10.0)]
    rows = bh.median_rows(records, list(bh.CONFIG_NAMES))
    by = {r["config"]: r for r in rows}
    assert by["stock-gpu"]["decode_tok_per_s"] == 100.0 and by["stock-gpu"]["ok"] == 3
    assert by["stock-partial-mmap"]["runs"] == 2 and by["stock-partial-mmap"]["ok"] == 1
    assert by["stock-partial-mmap"]["statuses"] == ["killed (out of memory in the cgroup)"]
    assert by["ff-slotbank"]["miss_bytes_per_token"] == 100e6 and by["ff-slotbank"]["bank_slots"] == 64
    targets = bh.add_ratios(rows, read_bandwidth=1e9)
    assert targets["slotbank_over_stock_mmap"] == pytest.approx(4.0)
    roofline_s = 1 / 100.0 + 100e6 / 1e9  # GPU-resident time + miss bytes at the measured bandwidth: 0.11 s
    assert targets["slotbank_over_roofline"] == pytest.approx((1 / 12.0) / roofline_s)
    assert targets["partial_over_stock_partial"] == pytest.approx(2.0)
    md = bh.markdown(rows, targets, {"model_name": "m.gguf", "repeats": 3, "gen_tokens": 16, "notes": ["n1"]})
    assert "| ff-slotbank | - | none |" in md  # no record of these made-up runs says its -ngl or cgroup
    assert "| stock-cpumoe-mmap | 99 | 2.00 GiB | 3.00 |" in md
    assert "| ff-slotbank |" in md and "| 12.00 | 4.00 |" in md and "| 64 | 50.0% | 95.4 |" in md
    assert "4.00× (target ≥ 3×)" in md and f"{(1 / 12.0) / roofline_s:.2f}× (target ≤ 1.3×)" in md
    assert "| 1/2 (killed (out of memory in the cgroup)) |" in md and "- note: n1" in md


def test_ratios_are_absent_without_their_runs():
    rows = bh.median_rows([_rec("ff-slotbank", 12.0), _rec("stock-cpumoe-mmap", None)], list(bh.CONFIG_NAMES))
    targets = bh.add_ratios(rows, read_bandwidth=None)
    assert targets["slotbank_over_stock_mmap"] is None and targets["slotbank_over_roofline"] is None
    md = bh.markdown(rows, targets, {})
    assert "-× (target ≥ 3×)" in md and "-× (target ≤ 1.3×)" in md


def test_bench_refuses_unknown_configurations(capsys):
    assert bh.main(["--out", "x", "--configs", "ff-slotbank,nope"]) == 2
    assert "unknown configuration nope" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------
# The slim sdist (orchestrator.build)


def _fake_sdist(path: Path) -> vendor.Pin:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("pyproject.toml", b"[project]\n"), ("llama_cpp/__init__.py", b"x = 1\n"),
                           ("vendor/llama.cpp/CMakeLists.txt", b"big\n"), (".git/modules/x/HEAD", b"ref\n"),
                           ("vendor/llama.cpp/.git", b"gitdir: x\n")):
            info = tarfile.TarInfo(f"llama_cpp_python-9.9.9/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return vendor.Pin(commit="c" * 40, url="u", lcp_version="9.9.9", sdist_name=path.name, sdist_sha256=sha)


def test_slim_sdist_keeps_the_package_and_checks_its_origin(tmp_path):
    pin = _fake_sdist(tmp_path / "full.tar.gz")
    slim = build.make_slim_sdist(tmp_path / "full.tar.gz", tmp_path / "slim.tar.gz", pin)
    with tarfile.open(slim) as tar:
        names = sorted(m.name.partition("/")[2] for m in tar.getmembers())
        manifest = json.loads(tar.extractfile(f"llama_cpp_python-9.9.9/{build.SLIM_MANIFEST}").read())  # type: ignore
    assert names == sorted([build.SLIM_MANIFEST, "llama_cpp/__init__.py", "pyproject.toml"])
    assert manifest["from_sha256"] == pin.sdist_sha256 and set(manifest["files"]) == {"llama_cpp/__init__.py",
                                                                                       "pyproject.toml"}
    build.check_slim_sdist(slim, pin)
    other = vendor.Pin(**{**pin.__dict__, "sdist_sha256": "0" * 64})
    with pytest.raises(FlashflexError, match="another sdist"):
        build.check_slim_sdist(slim, other)


def test_slim_sdist_with_a_changed_file_is_refused(tmp_path):
    pin = _fake_sdist(tmp_path / "full.tar.gz")
    slim = build.make_slim_sdist(tmp_path / "full.tar.gz", tmp_path / "slim.tar.gz", pin)
    tampered = tmp_path / "tampered.tar.gz"
    with tarfile.open(slim) as src, tarfile.open(tampered, "w:gz") as out:
        for m in src.getmembers():
            data = src.extractfile(m).read()  # type: ignore[union-attr]
            if m.name.endswith("__init__.py"):
                data = b"x = 2\n"
                m.size = len(data)
            out.addfile(m, io.BytesIO(data))
    with pytest.raises(FlashflexError, match="does not match its manifest.*llama_cpp/__init__.py"):
        build.check_slim_sdist(tampered, pin)


def test_a_build_uses_the_slim_sdist_only_without_the_full_one(tmp_path, monkeypatch):
    pin = _fake_sdist(tmp_path / "full.tar.gz")
    monkeypatch.setenv("FLASHFLEX_HOME", str(tmp_path / "home"))
    slim = build.make_slim_sdist(tmp_path / "full.tar.gz", build.slim_sdist_path(pin.lcp_version), pin)
    assert build._llama_cpp_python_source(pin, lambda _m: None) == slim
    full = vendor.sdist_path(pin.lcp_version)
    full.write_bytes((tmp_path / "full.tar.gz").read_bytes())
    assert build._llama_cpp_python_source(pin, lambda _m: None) == full
