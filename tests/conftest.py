"""Shared fixtures. Expensive shared state (the pinned sdist, the build cache, the default model) stays in the
user cache so the suite reuses what `make install` prepared; anything a test writes goes to tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# What every test shares from the user's state dir: downloads, builds and compiled GPU pipelines that take minutes
# to remake.
SHARED_STATE = ("sdist", "builds", "ccache", "models", "mesa-shader-cache")


def _real_state_dir() -> Path:
    from orchestrator.paths import cache_root

    return cache_root()


_REAL_STATE = _real_state_dir()


@pytest.fixture(autouse=True)
def own_state_dir(tmp_path_factory, monkeypatch) -> Path:
    """Each test gets its own FLASHFLEX_HOME (also seen by the commands it runs): anything it writes there stays
    its own. The expensive shared state (the pinned sdist, builds, ccache, the default model) is linked in."""
    home = tmp_path_factory.mktemp("flashflex-home")
    for name in SHARED_STATE:
        real = _REAL_STATE / name
        real.mkdir(parents=True, exist_ok=True)
        (home / name).symlink_to(real, target_is_directory=True)
    monkeypatch.setenv("FLASHFLEX_HOME", str(home))
    return home


def flashflex(*args: str, check: bool = False, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run the `flashflex` command as a user would, capturing its output."""
    env = dict(os.environ)
    env.pop("FLASHFLEX_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout, check=check)


def one_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The single `error:` line of a failed command, which must contain every needle."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert " — " in errors[0], f"no fix given: {errors[0]}"
    return errors[0]


@pytest.fixture(scope="session")
def synced_vendor() -> Path:
    from orchestrator import vendor

    vendor.sync(REPO, log=lambda _msg: None)
    return vendor.vendor_dir(REPO)


@pytest.fixture(scope="session")
def patched_llama():
    """Skip unless the installed llama_cpp is our patched build (make install / flashflex build)."""
    from orchestrator import native

    pytest.importorskip("llama_cpp")
    if not native.is_patched():
        pytest.skip("installed llama_cpp is stock; run flashflex build")
    return native


@pytest.fixture(scope="session")
def gpu_build() -> tuple[str, list[dict]]:
    """(backend, its devices) of the installed GPU build; skips with the reason on a CPU build, a stock one, or one
    that sees no device of its own (`make test-gpu` builds the Vulkan variant and runs lavapipe, Mesa's software
    Vulkan, as one: GGML_VK_VISIBLE_DEVICES=0)."""
    from orchestrator import cpufeatures

    record = cpufeatures.installed_build_record() or {}
    backend = record.get("backend") or "cpu"
    if backend == "cpu":
        pytest.skip("the installed library is a CPU build (make test-gpu, or flashflex build --backend "
                    "vulkan|cuda|metal, for this test)")
    from orchestrator import native

    if not native.is_patched():
        pytest.skip("installed llama_cpp is stock; run flashflex build")
    mine = [d for d in native.devices() if str(d["backend"]).lower().startswith(backend[:3])]
    if not mine:
        pytest.skip(f"the {backend} build sees no {backend} device here "
                    "(lavapipe needs GGML_VK_VISIBLE_DEVICES=0)")
    return backend, mine


@pytest.fixture(scope="session")
def moe_models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(model, sidecar) for each family: qwen3moe (16 experts, top-4; Q8_0), qwen2moe with shared experts
    (8 experts, top-2; Q8_0) and qwen3moe in Q4_0, a type the CPU backend repacks (slots are then installed
    through the repacked layout)."""
    from orchestrator import sidecar, synth

    out = tmp_path_factory.mktemp("moe")
    models = {}
    for key, spec in {"qwen3moe": synth.preset("tiny-qwen3moe"), "qwen2moe": synth.preset("tiny-qwen2moe"),
                      "qwen3moe-q4_0": synth.preset("tiny-qwen3moe", quant="q4_0")}.items():
        path = synth.write_synth_model(spec, out / f"{key}.gguf")
        sidecar.extract(path, out / f"{key}.sidecar")
        models[key] = (path, out / f"{key}.sidecar")
    return models


@pytest.fixture(scope="module")
def tools_build(patched_llama):
    """The patched build, with llama.cpp's programs (llama-server, ...) shipped beside the library."""
    if "tools" not in patched_llama.info()["features"]:
        pytest.skip("the installed build ships no llama.cpp programs; run flashflex build")
    return patched_llama
