"""Builds per backend (cpu, vulkan, cuda, metal): CMake flags, cache keys, toolchain refusals, system-deps.sh, doctor.

Everything here runs without a GPU except the `gpu` test at the end, which needs a GPU build (flashflex build
--backend vulkan|cuda|metal) installed and a device ggml sees (lavapipe counts, with GGML_VK_VISIBLE_DEVICES=0).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import build, cpufeatures, doctor, vendor
from orchestrator.errors import FlashflexError

from conftest import REPO, flashflex

EPYC = frozenset("sse4_2 avx avx2 fma f16c bmi2".split())


def test_cmake_args_per_backend():
    args = {b: build.cmake_args_for(b, "abc", []) for b in build.Backend}
    assert "-DGGML_VULKAN=ON" in args[build.Backend.vulkan]
    assert "-DGGML_CUDA=ON" in args[build.Backend.cuda]
    assert "-DGGML_METAL=ON" in args[build.Backend.metal]
    # the CPU build is what it was before backends (so its cache key moved only with the series)
    assert build.BACKEND_CMAKE_ARGS[build.Backend.cpu] == ["-DGGML_METAL=OFF", "-DGGML_CUDA=OFF"]
    assert not any(a.startswith("-DGGML_VULKAN") for a in args[build.Backend.cpu])
    # a Vulkan build never also turns on another GPU backend
    assert "-DGGML_METAL=OFF" in args[build.Backend.vulkan] and "-DGGML_CUDA=OFF" in args[build.Backend.vulkan]
    for backend, a in args.items():
        assert "-DGGML_RPC=ON" in a and "-DFLASHFLEX_SERIES_HASH=abc" in a, backend


def test_build_key_differs_per_backend():
    pin = vendor.load_pin(REPO)
    isa = cpufeatures.for_host(flags=EPYC, machine="x86_64")
    keys = {b: build.build_key(pin, "abc", b, build.cmake_args_for(b, "abc", [], isa), isa) for b in build.Backend}
    assert len(set(keys.values())) == len(build.Backend), keys
    # and the backend alone splits the cache, whatever the flags
    assert build.build_key(pin, "abc", build.Backend.cpu, [], isa) != build.build_key(
        pin, "abc", build.Backend.vulkan, [], isa)


def test_default_backend_is_metal_on_apple_and_cpu_elsewhere(monkeypatch):
    monkeypatch.setattr(build.sys, "platform", "darwin")
    assert build.Backend.default() is build.Backend.metal
    monkeypatch.setattr(build.sys, "platform", "linux")
    assert build.Backend.default() is build.Backend.cpu


@pytest.fixture
def no_vulkan(monkeypatch, tmp_path):
    """A machine with cmake and a compiler but none of the Vulkan stack."""
    real_which = shutil.which
    monkeypatch.setattr(build.shutil, "which", lambda name: None if name == "glslc" else real_which(name))
    monkeypatch.setattr(build, "_INCLUDE_DIRS", (str(tmp_path / "include"),))
    monkeypatch.setattr(build, "_VULKAN_ICD_DIRS", (str(tmp_path / "icd.d"),))
    monkeypatch.setattr(build.ctypes.util, "find_library", lambda name: None)
    for var in ("VULKAN_SDK", "VK_ICD_FILENAMES", "VK_DRIVER_FILES"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_vulkan_without_headers_is_one_line_naming_the_packages(no_vulkan):
    if not shutil.which("cmake") or not shutil.which("c++") and not shutil.which("g++"):
        pytest.skip("needs cmake and a C++ compiler (checked first)")
    with pytest.raises(FlashflexError) as err:
        build.check_toolchain(build.Backend.vulkan)
    line = err.value.one_line()
    assert "\n" not in line
    for package in ("libvulkan-dev", "glslc", "spirv-headers"):
        assert package in line
    assert "system-deps.sh vulkan" in line


def test_vulkan_with_headers_but_no_driver_builds_with_a_warning(no_vulkan, monkeypatch):
    if not shutil.which("cmake") or not shutil.which("c++") and not shutil.which("g++"):
        pytest.skip("needs cmake and a C++ compiler (checked first)")
    inc = no_vulkan / "include"
    (inc / "vulkan").mkdir(parents=True)
    (inc / "vulkan" / "vulkan.hpp").write_text("")
    (inc / "spirv").mkdir()
    monkeypatch.setattr(build.ctypes.util, "find_library", lambda name: "libvulkan.so.1")
    monkeypatch.setattr(build.shutil, "which", lambda name: f"/usr/bin/{name}")
    warnings = build.check_toolchain(build.Backend.vulkan)
    assert any("no Vulkan driver" in w and "mesa-vulkan-drivers" in w for w in warnings), warnings
    (no_vulkan / "icd.d").mkdir()
    (no_vulkan / "icd.d" / "lvp_icd.x86_64.json").write_text("{}")
    assert not any("Vulkan" in w for w in build.check_toolchain(build.Backend.vulkan))


def test_cuda_without_nvcc_is_one_line(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(build.shutil, "which", lambda name: None if name == "nvcc" else real_which(name))
    monkeypatch.delenv("CUDACXX", raising=False)
    if not real_which("cmake") or not real_which("c++") and not real_which("g++"):
        pytest.skip("needs cmake and a C++ compiler (checked first)")
    with pytest.raises(FlashflexError, match="nvcc is not on PATH") as err:
        build.check_toolchain(build.Backend.cuda)
    assert "\n" not in err.value.one_line() and "CUDACXX" in err.value.one_line()


def test_a_library_built_for_another_backend_is_one_line():
    line = doctor.backend_mismatch("cpu", "vulkan")
    assert line and "built for the cpu backend, not vulkan" in line and "flashflex build --backend vulkan" in line
    assert doctor.backend_mismatch("vulkan", "vulkan") is None
    assert doctor.backend_mismatch("cpu", None) is None
    assert "does not record" in (doctor.backend_mismatch(None, "cuda") or "")


def test_a_gpu_build_that_sees_no_device_of_its_own_is_a_warning(monkeypatch):
    cpu_only = [{"index": 0, "backend": "CPU", "type": "cpu", "name": "CPU", "free": 1, "total": 1}]
    monkeypatch.setattr(build, "vulkan_drivers", lambda: ["/usr/share/vulkan/icd.d/lvp_icd.x86_64.json"])
    warning = doctor.device_warning("vulkan", cpu_only)
    assert warning and "GGML_VK_VISIBLE_DEVICES=0" in warning and "run on the CPU" in warning
    monkeypatch.setattr(build, "vulkan_drivers", lambda: [])
    assert "mesa-vulkan-drivers" in (doctor.device_warning("vulkan", cpu_only) or "")
    vk = cpu_only + [{"index": 1, "backend": "Vulkan", "type": "igpu", "name": "Vulkan0", "free": 1, "total": 1}]
    assert doctor.device_warning("vulkan", vk) is None
    assert doctor.device_warning("cpu", cpu_only) is None
    assert doctor.device_warning("cuda", vk) is not None


def test_doctor_refuses_a_library_built_for_another_backend_without_importing_it(tmp_path):
    fake = tmp_path / "site" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise SystemExit(99)  # never imported: the record is read as a file\n")
    (fake / cpufeatures.BUILD_RECORD).write_text(json.dumps({"backend": "cpu", "instruction_set": {
        "arch": "x86_64", "mode": "explicit", "options": [], "requires": ["flashflex_test_no_cpu_has_this"]}}))
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "doctor", "--backend", "vulkan"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode not in (0, 99), proc.stdout + proc.stderr
    assert "build backend      cpu" in proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert any("built for the cpu backend, not vulkan" in e for e in errors), proc.stderr


# --- scripts/system-deps.sh ---------------------------------------------------------------------------------------

def _shim_path(tmp_path: Path, tools: tuple[str, ...]) -> str:
    """A PATH holding only stand-ins for `tools` (and the real ls): no apt-get, brew, glslc or nvcc."""
    bin_dir = tmp_path / "bin"
    if bin_dir.is_dir():
        return str(bin_dir)
    bin_dir.mkdir()
    for tool in tools:
        shim = bin_dir / tool
        shim.write_text("#!/bin/sh\nexit 0\n")
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    ls = shutil.which("ls")
    assert ls
    (bin_dir / "ls").symlink_to(ls)
    return str(bin_dir)


def _system_deps(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": _shim_path(tmp_path, ("git", "cmake", "c++", "ccache")),
           "SYSTEM_DEPS_INCLUDE_DIRS": str(tmp_path / "include"), "SYSTEM_DEPS_ICD_DIRS": str(tmp_path / "icd")}
    bash = shutil.which("bash")
    assert bash
    return subprocess.run([bash, str(REPO / "scripts" / "system-deps.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_system_deps_says_which_vulkan_packages_are_missing_when_it_cannot_install(tmp_path):
    result = _system_deps(tmp_path, "vulkan")
    assert result.returncode == 1
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for package in ("libvulkan-dev", "glslc", "spirv-headers", "mesa-vulkan-drivers"):
        assert package in errors[0]


def test_system_deps_cpu_needs_nothing_more_and_refuses_unknown_backends(tmp_path):
    assert _system_deps(tmp_path).returncode == 0  # the default (cpu) never asks for the Vulkan stack
    assert _system_deps(tmp_path, "cpu").returncode == 0
    unknown = _system_deps(tmp_path, "opencl")
    assert unknown.returncode == 2 and "unknown backend 'opencl'" in unknown.stderr


def test_system_deps_cuda_without_nvcc_says_so(tmp_path):
    result = _system_deps(tmp_path, "cuda")
    assert result.returncode == 1 and "nvcc" in result.stderr and "CUDA toolkit" in result.stderr


def test_makefile_passes_backend_to_system_deps():
    make = shutil.which("make")
    if not make:
        pytest.skip("make is not installed")
    dry = subprocess.run([make, "-n", "system-deps", "BACKEND=vulkan"], capture_output=True, text=True, cwd=REPO,
                         timeout=60)
    assert "scripts/system-deps.sh vulkan" in dry.stdout, dry.stdout + dry.stderr
    default = subprocess.run([make, "-n", "system-deps"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert "scripts/system-deps.sh cpu" in default.stdout


# --- a GPU build ---------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_layers_put_the_weights_on_the_device(gpu_build, tmp_path):
    """-ngl 99 on a GPU build: the device's buffer holds the model's weights (not silently the CPU)."""
    from orchestrator import synth

    backend, mine = gpu_build
    model = synth.write_synth_model(synth.preset("tiny-dense", quant="q8_0", n_embd=512, n_ff=1536),
                                    tmp_path / "q8_0.gguf")
    result = flashflex("run", "-m", str(model), "-ngl", "99", "-n", "4", "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    buffers = json.loads(result.stdout)["stats"]["devices"]
    on_device = [b for b in buffers if b["device"] in {d["name"] for d in mine}]
    on_host = sum(int(b["model"]) for b in buffers if b not in on_device)
    assert on_device and sum(int(b["model"]) for b in on_device) > on_host, buffers
