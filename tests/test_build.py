"""The build cache key and toolchain checks (the build itself runs in `make install`)."""

from __future__ import annotations

import pytest

from orchestrator import build, cpufeatures, vendor
from orchestrator.errors import FlashflexError

from conftest import REPO, flashflex

# Two x86 hosts of the kinds CI has met: an AMD EPYC with AVX2 and an Intel Xeon with AVX-512 and AMX.
EPYC = frozenset("sse4_2 avx avx2 fma f16c bmi2".split())
XEON = EPYC | frozenset("avx_vnni avx512f avx512cd avx512vl avx512dq avx512bw avx512vbmi avx512_vnni avx512_bf16 "
                        "amx_tile amx_int8 amx_bf16".split())


def _isa(flags, amx=False):
    return cpufeatures.for_host(amx=amx, flags=flags, machine="x86_64")


def test_key_depends_on_series_backend_and_flags():
    pin = vendor.load_pin(REPO)
    isa = _isa(EPYC)
    base = build.build_key(pin, "abc", build.Backend.cpu, ["-DX=1"], isa)
    assert base == build.build_key(pin, "abc", build.Backend.cpu, ["-DX=1"], isa)
    assert base != build.build_key(pin, None, build.Backend.cpu, ["-DX=1"], isa)  # --stock is its own entry
    assert base != build.build_key(pin, "abd", build.Backend.cpu, ["-DX=1"], isa)
    assert base != build.build_key(pin, "abc", build.Backend.cuda, ["-DX=1"], isa)
    assert base != build.build_key(pin, "abc", build.Backend.cpu, ["-DX=2"], isa)


def test_key_differs_between_instruction_sets_and_is_stable_for_one():
    pin = vendor.load_pin(REPO)

    def key(flags):
        return build.build_key(pin, "abc", build.Backend.cpu, [], _isa(flags))

    assert key(EPYC) == key(frozenset(EPYC))
    assert key(EPYC) != key(XEON)
    # flags the build does not compile for do not split the cache (a feature ggml has no option for)
    assert key(EPYC) == key(EPYC | {"sha_ni"})
    assert _isa(EPYC).key() == _isa(EPYC).key() != _isa(XEON).key()


def test_x86_build_keeps_every_host_extension_but_never_amx_unless_asked():
    xeon = _isa(XEON)
    args = xeon.cmake_args()
    assert "-DGGML_NATIVE=OFF" in args  # -march=native would compile ggml's AMX path on this host
    for option in ("AVX", "AVX2", "FMA", "F16C", "BMI2", "AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI",
                   "AVX512_BF16"):
        assert f"-DGGML_{option}=ON" in args
    for option in ("AMX_TILE", "AMX_INT8", "AMX_BF16"):
        assert f"-DGGML_{option}=OFF" in args
    assert not xeon.amx and not any(r.startswith("amx") for r in xeon.requires)
    asked = _isa(XEON, amx=True)
    assert asked.amx and "-DGGML_AMX_INT8=ON" in asked.cmake_args()
    epyc = _isa(EPYC).cmake_args()
    assert "-DGGML_AVX2=ON" in epyc and "-DGGML_AVX512=OFF" in epyc and "-DGGML_AMX_INT8=OFF" in epyc
    # AVX-512 needs all five of ggml's -mavx512* flags
    assert "-DGGML_AVX512=OFF" in _isa(EPYC | {"avx512f"}).cmake_args()


def test_arm_and_apple_stay_native():
    arm = cpufeatures.for_host(flags=frozenset({"fp", "asimd", "sve"}), machine="aarch64")
    assert arm.mode == "native" and arm.cmake_args() == ["-DGGML_NATIVE=ON"]
    assert arm.requires == ("asimd", "fp", "sve")
    assert cpufeatures.for_host(flags=frozenset({"arm.FEAT_BF16"}), machine="arm64").mode == "native"


def test_a_build_for_one_cpu_is_refused_on_a_cpu_without_its_extensions():
    record = {"instruction_set": _isa(XEON).to_json()}
    problem = cpufeatures.incompatibility(record, EPYC)
    assert problem and "avx512f" in problem and "amx" not in problem
    assert cpufeatures.incompatibility(record, XEON) is None
    assert cpufeatures.incompatibility({"instruction_set": _isa(EPYC).to_json()}, XEON) is None
    assert cpufeatures.incompatibility(None, EPYC) is None  # no record: nothing to check


def test_doctor_refuses_a_library_built_for_another_cpu_without_importing_it(tmp_path):
    """A llama_cpp whose record needs an extension no CPU has: doctor names it and the fix, exits 1, and never
    imports the package (importing could die with SIGILL)."""
    import json
    import os
    import subprocess
    import sys

    fake = tmp_path / "site" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise SystemExit(99)  # must never be imported\n")
    isa = cpufeatures.InstructionSet(arch="x86_64", mode="explicit", options=("GGML_AVX2",),
                                     requires=("avx2", "flashflex_test_no_cpu_has_this"))
    (fake / cpufeatures.BUILD_RECORD).write_text(json.dumps({"instruction_set": isa.to_json()}))
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    env.pop("FLASHFLEX_DEBUG", None)
    for args in (["doctor"], ["run", "-n", "1"]):
        proc = subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                              cwd=REPO, env=env, timeout=120)
        assert proc.returncode not in (0, 99), proc.stdout + proc.stderr
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, proc.stderr
        assert "flashflex_test_no_cpu_has_this" in errors[0] and "flashflex build --force" in errors[0]


def test_series_hash_reaches_cmake_only_for_patched_builds():
    assert any(a.startswith("-DFLASHFLEX_SERIES_HASH=abc") for a in build.cmake_args_for(build.Backend.cpu, "abc", []))
    assert not any("FLASHFLEX" in a for a in build.cmake_args_for(build.Backend.cpu, None, []))
    assert "-DGGML_CUDA=ON" in build.cmake_args_for(build.Backend.cuda, "abc", [])
    # the RPC backend is in every build, and so in every build key
    for backend in build.Backend:
        assert "-DGGML_RPC=ON" in build.cmake_args_for(backend, "abc", [])
    assert "-DGGML_RPC=ON" in build.cmake_args_for(build.Backend.cpu, None, [])


def test_missing_cmake_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(FlashflexError, match="cmake is not installed"):
        build.check_toolchain(build.Backend.cpu)


def test_missing_compiler_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(build.shutil, "which", lambda name: "/usr/bin/cmake" if name == "cmake" else None)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(FlashflexError, match="compiler"):
        build.check_toolchain(build.Backend.cpu)


@pytest.mark.native
def test_unchanged_rebuild_reuses_the_cached_wheel(patched_llama):
    result = flashflex("build", "--no-install", "--json")
    assert result.returncode == 0, result.stderr
    import json

    summary = json.loads(result.stdout)
    assert summary["cached"] is True
    assert summary["instruction_set"]["amx"] is False


@pytest.mark.native
def test_installed_library_is_compiled_for_this_cpu_without_amx(patched_llama):
    """System info lists the compiled-in CPU features: every ggml extension this host has is on (no silent
    fallback to a baseline), AMX is not (unless the build was asked for it)."""
    system = patched_llama.system_info()
    record = cpufeatures.installed_build_record()
    assert record is not None, "the installed wheel carries no build record"
    built = cpufeatures.InstructionSet.from_json(record["instruction_set"])
    if not built.amx:
        assert "AMX_INT8 = 1" not in system, system
    host = cpufeatures.for_host()
    if host.mode == "explicit":
        for option in host.options:
            feature = option.removeprefix("GGML_")
            if feature == "SSE42":
                continue  # system info does not list SSE 4.2
            assert f"{feature} = 1" in system, (feature, system)
