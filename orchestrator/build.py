"""Build llama-cpp-python from its pinned sdist with our patched llama.cpp inside, through its own CMake.

The wheel is cached under <cache>/builds/<key>/ where key = (pin, series hash or "stock", backend,
CMake flags, platform, instruction set); an unchanged rebuild just reinstalls the cached wheel. ccache (if
installed) is shared by all builds, with paths made relative so a new key recompiles only what changed.

The instruction set comes from orchestrator.cpufeatures: on x86-64 every extension the host has except
ggml's AMX path (it segfaults at our pin), natively elsewhere. The wheel carries a record of it
(llama_cpp/flashflex_build.json) so doctor and run can refuse it on a CPU that cannot execute it.
"""

from __future__ import annotations

import ctypes.util
import enum
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from orchestrator import cpufeatures, patches, vendor
from orchestrator.errors import FlashflexError
from orchestrator.fsutil import safe_extractall
from orchestrator.paths import cache_root, repo_root

Log = Callable[[str], None]
Progress = Callable[[int, int], None]

CMAKE_MIN = (3, 21)


class Backend(str, enum.Enum):
    cpu = "cpu"
    cuda = "cuda"
    metal = "metal"
    vulkan = "vulkan"

    @classmethod
    def default(cls) -> "Backend":
        """Metal on Apple, the CPU elsewhere (a GPU backend is asked for explicitly)."""
        return cls.metal if sys.platform == "darwin" else cls.cpu


# Every build (stock baseline included) carries ggml's RPC backend: `flashflex rpc-server` starts a worker through
# it and `--rpc HOST:PORT` adds remote devices to llama.cpp's device list. It is a CMake flag like any other, so it
# is part of the build key (cmake_args_for puts it in the args the key hashes).
COMMON_CMAKE_ARGS: list[str] = ["-DGGML_RPC=ON"]

# A patched build also compiles llama.cpp's own programs from the same tree, shipped in the package beside the
# libraries (flashflex.cmake installs them; `flashflex exec` runs them under a plan): llama-server, llama-cli,
# llama-completion, llama-bench, llama-perplexity. The server's web UI is left out: its assets come prebuilt from a
# model hub or from an npm build, and a build must work offline (the API and /metrics are all there). LLAVA_BUILD is
# off because llama.cpp's tools add mtmd themselves (flashflex.cmake still ships it for llama-cpp-python).
TOOLS_CMAKE_ARGS: list[str] = ["-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAVA_BUILD=OFF",
                               "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                               "-DCMAKE_INSTALL_BINDIR=llama_cpp/lib"]

BACKEND_CMAKE_ARGS: dict[Backend, list[str]] = {
    # Metal is on by default on Apple platforms; a CPU build turns it off explicitly.
    Backend.cpu: ["-DGGML_METAL=OFF", "-DGGML_CUDA=OFF"],
    Backend.cuda: ["-DGGML_CUDA=ON"],
    Backend.metal: ["-DGGML_METAL=ON"],
    # The pinned ggml-vulkan needs the Vulkan headers and loader (find_package(Vulkan)) and glslc to compile its
    # shaders at build time; patches/llama.cpp carries the one guard Debian 12's 1.3.239 headers need.
    Backend.vulkan: ["-DGGML_VULKAN=ON", "-DGGML_METAL=OFF", "-DGGML_CUDA=OFF"],
}

# Debian/Ubuntu packages per backend (scripts/system-deps.sh installs them; the refusals name them).
VULKAN_DEBIAN_PACKAGES = ("libvulkan-dev", "glslc", "spirv-headers", "mesa-vulkan-drivers")
_VULKAN_ICD_DIRS = ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d")
_INCLUDE_DIRS = ("/usr/include", "/usr/local/include", "/opt/homebrew/include")


@dataclass
class BuildResult:
    key: str
    wheel: Path
    cached: bool
    seconds: float
    installed: bool
    stock: bool
    series_hash: str | None
    instruction_set: cpufeatures.InstructionSet
    backend: Backend = Backend.cpu


def builds_dir() -> Path:
    return cache_root() / "builds"


def _cmake_version() -> tuple[int, ...] | None:
    exe = shutil.which("cmake")
    if not exe:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _vulkan_sdk_dirs() -> list[Path]:
    sdk = os.environ.get("VULKAN_SDK")
    return [Path(sdk)] if sdk else []


def _vulkan_missing() -> list[str]:
    """The Debian packages whose pieces a Vulkan build lacks here (headers, loader, glslc, SPIR-V headers)."""
    sdk = _vulkan_sdk_dirs()
    incs = [d / "include" for d in sdk] + [Path(d) for d in _INCLUDE_DIRS]
    missing = []
    has_loader = any(any((d / "lib").glob("libvulkan.*")) for d in sdk) or ctypes.util.find_library("vulkan")
    if not any((d / "vulkan" / "vulkan.hpp").is_file() for d in incs) or not has_loader:
        missing.append("libvulkan-dev")
    if not (shutil.which("glslc") or any((d / "bin" / "glslc").is_file() for d in sdk)):
        missing.append("glslc")
    if not any((d / "spirv").is_dir() for d in incs):
        missing.append("spirv-headers")
    return missing


def vulkan_drivers() -> list[str]:
    """Vulkan driver manifests (ICDs) the loader would find: none means no device, not even lavapipe."""
    env = os.environ.get("VK_ICD_FILENAMES") or os.environ.get("VK_DRIVER_FILES")
    if env:
        return [p for p in env.split(os.pathsep) if p and Path(p).is_file()]
    return sorted(str(p) for d in _VULKAN_ICD_DIRS if Path(d).is_dir() for p in Path(d).glob("*.json"))


def check_toolchain(backend: Backend) -> list[str]:
    """Fail with one actionable line when a required tool is missing; return warnings."""
    ver = _cmake_version()
    if ver is None:
        raise FlashflexError("cmake is not installed",
                             "install cmake >= 3.21 (apt-get install cmake, brew install cmake, or pip install cmake)")
    if ver < CMAKE_MIN:
        raise FlashflexError(f"cmake {ver[0]}.{ver[1]} is too old (llama-cpp-python needs >= 3.21)",
                             "upgrade it, e.g. pip install 'cmake>=3.21'")
    cxx = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if not cc or not cxx:
        raise FlashflexError("no C/C++ compiler found",
                             "install one (apt-get install build-essential, or xcode-select --install)")
    if backend is Backend.cuda and not (shutil.which("nvcc") or os.environ.get("CUDACXX")):
        raise FlashflexError("--backend cuda needs the CUDA toolkit, but nvcc is not on PATH",
                             "install the CUDA toolkit or set CUDACXX=/path/to/nvcc")
    if backend is Backend.vulkan:
        missing = _vulkan_missing()
        if missing:
            raise FlashflexError(f"--backend vulkan needs the Vulkan headers, loader and shader compiler; missing "
                                 f"here: {' '.join(missing)} (Debian/Ubuntu package names)",
                                 "run: scripts/system-deps.sh vulkan  (or apt-get install "
                                 f"{' '.join(VULKAN_DEBIAN_PACKAGES)}; elsewhere the LunarG SDK with VULKAN_SDK set)")
    if backend is Backend.metal and sys.platform != "darwin":
        raise FlashflexError("--backend metal needs macOS", "use --backend cpu (or cuda) on this platform")
    warnings = []
    if backend is Backend.vulkan and not vulkan_drivers():
        warnings.append("no Vulkan driver is installed: the build will compile but find no device "
                        "(apt-get install mesa-vulkan-drivers for lavapipe, or your GPU's driver)")
    if not shutil.which("ccache"):
        warnings.append("ccache not found: every new build compiles from scratch (apt-get install ccache)")
    return warnings


def _ensure_build_backend() -> None:
    """llama-cpp-python builds with scikit-build-core; we build without isolation to stay offline-friendly."""
    try:
        import scikit_build_core  # noqa: F401
    except ImportError:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q",
                               "scikit-build-core>=0.9.2"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise FlashflexError("could not install scikit-build-core (llama-cpp-python's build backend)",
                                 "pip install 'scikit-build-core>=0.9.2' and retry")


def build_key(pin: vendor.Pin, series: str | None, backend: Backend, cmake_args: list[str],
              isa: cpufeatures.InstructionSet) -> str:
    ident = {
        "instruction_set": [isa.arch, isa.mode, isa.key()],
        "llama.cpp": pin.commit,
        "llama-cpp-python": pin.lcp_version,
        "series": series or "stock",
        "backend": backend.value,
        "cmake_args": cmake_args,
        "platform": [sys.platform, platform.machine()],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def instruction_set_for(backend: Backend, amx: bool, extra: list[str]) -> cpufeatures.InstructionSet:
    """What the build will be compiled for. `--cmake-arg -DGGML_NATIVE=ON` asks for the old -march=native
    build (every host flag, AMX included where the host has it)."""
    flags = cpufeatures.host_flags()
    if backend is Backend.metal or "-DGGML_NATIVE=ON" in extra:
        return cpufeatures.InstructionSet(arch=platform.machine(), mode="native", requires=tuple(sorted(flags)),
                                          amx=bool(flags & {"amx_int8", "amx_tile", "amx_bf16"}))
    return cpufeatures.for_host(amx=amx, flags=flags)


def cmake_args_for(backend: Backend, series: str | None, extra: list[str],
                   isa: cpufeatures.InstructionSet | None = None) -> list[str]:
    args = list(BACKEND_CMAKE_ARGS[backend]) + COMMON_CMAKE_ARGS
    if isa is not None and isa.mode == "explicit":
        args += isa.cmake_args()
    if series:
        args += TOOLS_CMAKE_ARGS + [f"-DFLASHFLEX_SERIES_HASH={series}"]
    return args + list(extra)


def _export_tree(repo: Path, commit: str, dest: Path) -> None:
    """Write the files of `commit` (no .git) into dest, via git archive."""
    data = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", commit],
                          capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        safe_extractall(tar, dest)


# A slim copy of the pinned llama-cpp-python sdist: the sdist without its vendored llama.cpp and that tree's git
# objects (a build replaces vendor/llama.cpp with our tree anyway), 1 MB instead of 75. It exists for machines that
# reach no package index and can be sent only so much (scripts/gpu_check.py --prepare makes one); its manifest names
# the pinned sdist it came from and the sha256 of every file kept.
SLIM_MANIFEST = "FLASHFLEX_SLIM.json"
_SLIM_DROPPED = ("vendor/llama.cpp/", ".git/")


def slim_sdist_path(version: str) -> Path:
    return cache_root() / "sdist" / f"llama_cpp_python-{version}.slim.tar.gz"


def _slim_keeps(rel: str) -> bool:
    return not any((rel + "/").startswith(d) for d in _SLIM_DROPPED)


def make_slim_sdist(sdist: Path, dest: Path, pin: vendor.Pin) -> Path:
    """Write the slim copy of `sdist` (which must be the pinned one) to `dest`."""
    vendor.verify_sdist(sdist, pin.sdist_sha256)
    files: dict[str, str] = {}
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist, "r:gz") as src, tarfile.open(dest, "w:gz") as out:
        top = ""
        for m in src.getmembers():
            top, _, rel = m.name.partition("/")
            if rel == "vendor/llama.cpp" or (rel and _slim_keeps(rel) and (m.isfile() or m.isdir())):
                if m.isfile():
                    data = src.extractfile(m)
                    assert data is not None
                    blob = data.read()
                    files[rel] = hashlib.sha256(blob).hexdigest()
                    out.addfile(m, io.BytesIO(blob))
                else:
                    out.addfile(m)
        manifest = json.dumps({"version": pin.lcp_version, "from_sdist": pin.sdist_name,
                               "from_sha256": pin.sdist_sha256, "files": files}, indent=1, sort_keys=True).encode()
        info = tarfile.TarInfo(f"{top}/{SLIM_MANIFEST}")
        info.size = len(manifest)
        out.addfile(info, io.BytesIO(manifest))
    return dest


def check_slim_sdist(path: Path, pin: vendor.Pin) -> None:
    """Refuse a slim copy made from another sdist than the pinned one, or with a file changed, added or missing."""
    fix = f"delete {path} and make it again (scripts/gpu_check.py --prepare), or put the pinned sdist beside it"
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            man = next((m for m in members if m.name.partition("/")[2] == SLIM_MANIFEST), None)
            if man is None:
                raise FlashflexError(f"{path.name} has no {SLIM_MANIFEST}: not a slim llama-cpp-python sdist", fix)
            data = tar.extractfile(man)
            assert data is not None
            manifest = json.loads(data.read())
            if manifest.get("from_sha256") != pin.sdist_sha256:
                raise FlashflexError(f"{path.name} was made from another sdist than the pinned {pin.sdist_name}", fix)
            want: dict[str, str] = manifest.get("files", {})
            seen: dict[str, str] = {}
            for m in members:
                rel = m.name.partition("/")[2]
                if m is not man:
                    blob = tar.extractfile(m)
                    assert blob is not None
                    seen[rel] = hashlib.sha256(blob.read()).hexdigest()
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise FlashflexError(f"{path} is not a readable slim sdist ({exc})", fix) from exc
    if seen != want:
        bad = sorted(k for k in set(seen) | set(want) if seen.get(k) != want.get(k))
        raise FlashflexError(f"{path.name} does not match its manifest ({len(bad)} files differ, e.g. {bad[0]})", fix)


def _llama_cpp_python_source(pin: vendor.Pin, log: Log) -> Path:
    """The sdist to unpack: the pinned one (downloaded once); a checked slim copy when only that is in the cache."""
    slim = slim_sdist_path(pin.lcp_version)
    if not vendor.sdist_path(pin.lcp_version).exists() and slim.exists():
        check_slim_sdist(slim, pin)
        log(f"using {slim.name} (the pinned sdist without its vendored llama.cpp, checked against its manifest)")
        return slim
    return vendor.ensure_sdist(pin.lcp_version, pin.sdist_sha256, log)


def _prepare_source(src: Path, pin: vendor.Pin, stock: bool, record: dict, log: Log) -> None:
    sdist = _llama_cpp_python_source(pin, log)
    with tarfile.open(sdist, "r:gz") as tar:
        safe_extractall(tar, src.parent / "unpack")
    top = next((src.parent / "unpack").iterdir())
    top.rename(src)
    shutil.rmtree(src.parent / "unpack")
    # Replace the sdist's vendored llama.cpp with the tree we mean to build (same commit for --stock).
    shutil.rmtree(src / "vendor" / "llama.cpp", ignore_errors=True)  # a slim sdist has none
    shutil.rmtree(src / ".git", ignore_errors=True)
    (src / "vendor" / "llama.cpp").mkdir(parents=True)
    repo = vendor.vendor_dir()
    if stock:
        _export_tree(repo, pin.commit, src / "vendor" / "llama.cpp")
    else:
        with patches.scratch_tree(vendor.BASE_REF) as wt:
            _export_tree(wt, "HEAD", src / "vendor" / "llama.cpp")
        patches.install_overlay(src / "vendor" / "llama.cpp")  # our own sources beside the call sites
    # The wheel carries what it was built for (read by doctor without importing llama_cpp).
    (src / "llama_cpp" / cpufeatures.BUILD_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))


_NINJA_PROGRESS = re.compile(r"^\[(\d+)/(\d+)\]")


def _run_pip_wheel(src: Path, cmake_dir: Path, wheel_dir: Path, env: dict[str, str], logfile: Path,
                   progress: Progress | None) -> None:
    cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps",
           "--disable-pip-version-check", "-w", str(wheel_dir),
           f"--config-settings=build-dir={cmake_dir}", str(src)]
    with open(logfile, "w") as log_fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log_fh.write(line)
            m = _NINJA_PROGRESS.match(line.strip())
            if m and progress:
                progress(int(m.group(1)), int(m.group(2)))
        rc = proc.wait()
    if rc != 0:
        text = logfile.read_text(errors="replace").splitlines()
        first_error = next((ln.strip() for ln in text if re.search(r"\berror\b", ln, re.I)), text[-1] if text else "")
        raise FlashflexError(f"llama-cpp-python build failed: {first_error[:200]}",
                             f"see the full log at {logfile}")


def install_wheel(wheel: Path) -> None:
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    proc = subprocess.run(pip + ["--force-reinstall", "--no-deps", str(wheel)], capture_output=True, text=True)
    if proc.returncode == 0:
        # Second pass installs llama_cpp's own runtime dependencies (numpy, jinja2, ...) if missing.
        proc = subprocess.run(pip + [str(wheel)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise FlashflexError(f"pip could not install {wheel.name}: {proc.stderr.strip().splitlines()[-1:]}",
                             "check the active environment (python -m pip --version)")


def build(backend: Backend | None = None, stock: bool = False, extra_cmake_args: list[str] | None = None,
          install: bool = True, force: bool = False, log: Log = print,
          progress: Progress | None = None, amx: bool = False) -> BuildResult:
    t0 = time.monotonic()
    backend = backend or Backend.default()
    root = repo_root()
    for warning in check_toolchain(backend):
        log(f"warning: {warning}")
    vendor.sync(root, log=log)
    pin = vendor.load_pin(root)
    series = None if stock else patches.series_hash(root)
    extra = list(extra_cmake_args or [])
    isa = instruction_set_for(backend, amx, extra)
    if isa.amx:
        log(f"warning: {cpufeatures.AMX_WARNING}")
    if isa.mode == "native" and not isa.requires:
        log("warning: could not read this CPU's feature flags; building with -march=native")
    args = cmake_args_for(backend, series, extra, isa)
    key = build_key(pin, series, backend, args, isa)
    entry = builds_dir() / key
    wheels = sorted((entry / "wheel").glob("*.whl")) if (entry / "wheel").exists() else []
    cached = bool(wheels) and not force
    if not cached:
        _ensure_build_backend()
        work = entry / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            log(f"preparing {'stock' if stock else 'patched'} llama.cpp source (build {key})")
            record = {"key": key, "pin": pin.commit, "series_hash": series, "backend": backend.value,
                      "instruction_set": isa.to_json()}
            _prepare_source(work / "src", pin, stock, record, log)
            env = dict(os.environ)
            env["CMAKE_ARGS"] = " ".join(args)
            env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
            env.setdefault("CCACHE_DIR", str(cache_root() / "ccache"))
            env["CCACHE_BASEDIR"] = str(builds_dir())  # relative paths: a new key reuses the cache
            env["CCACHE_NOHASHDIR"] = "1"
            env.setdefault("CCACHE_MAXSIZE", "5G")
            log(f"building llama-cpp-python {pin.lcp_version} ({backend.value}, {isa.summary()})")
            log(f"CMAKE_ARGS={env['CMAKE_ARGS']}")
            log(f"log: {entry / 'build.log'} (a cold build takes ~10 minutes on 2 cores)")
            staging = work / "wheel"
            staging.mkdir()
            _run_pip_wheel(work / "src", work / "cmake", staging, env, entry / "build.log", progress)
            final = entry / "wheel"
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)  # the cache entry appears only once the wheel is complete
            (entry / "meta.json").write_text(json.dumps({
                "key": key, "pin": pin.commit, "llama_cpp_python": pin.lcp_version, "series_hash": series,
                "backend": backend.value, "cmake_args": args, "built_at": time.time(),
                "instruction_set": isa.to_json(),
            }, indent=2))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        wheels = sorted((entry / "wheel").glob("*.whl"))
    wheel = wheels[-1]
    if install:
        log(f"installing {wheel.name} into {sys.prefix}")
        install_wheel(wheel)
    return BuildResult(key, wheel, cached, time.monotonic() - t0, install, stock, series, isa, backend)
