"""The instruction set a build targets: read off the host, turned into ggml's CMake options, and recorded.

Why not simply `GGML_NATIVE=ON` (`-march=native`) on x86? Because on a host with AMX it also compiles ggml's
AMX matmul path, which segfaults in `ggml_backend_amx_mul_mat` at our pin (upstream llama.cpp issue 20824,
closed unfixed). On x86-64 we therefore build with `GGML_NATIVE=OFF` and switch on, one by one, every ggml
instruction-set option whose CPU flags this host reports — everything but AMX, which only an explicit
request enables. Elsewhere (Apple Silicon, ARM Linux) the build stays native.

Either way the build records what it was compiled for (`InstructionSet`): the build cache key includes it,
the wheel carries it (`llama_cpp/flashflex_build.json`), and `flashflex doctor` / `run` refuse a library that
needs an extension this CPU lacks instead of dying with SIGILL.

Stdlib only, so CI can compute the cache key before anything is installed:
    python3 orchestrator/cpufeatures.py --key
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from functools import lru_cache

# ggml's x86 CMake options (ggml/CMakeLists.txt at the pin) and the host CPU flags (Linux /proc/cpuinfo
# names) each one compiles for. An option is switched on when the host has every flag it needs.
GGML_X86_OPTIONS: tuple[tuple[str, frozenset[str]], ...] = (
    ("GGML_SSE42", frozenset({"sse4_2"})),
    ("GGML_AVX", frozenset({"avx"})),
    ("GGML_AVX2", frozenset({"avx2"})),
    ("GGML_AVX_VNNI", frozenset({"avx_vnni"})),
    ("GGML_FMA", frozenset({"fma"})),
    ("GGML_F16C", frozenset({"f16c"})),
    ("GGML_BMI2", frozenset({"bmi2"})),
    # -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw
    ("GGML_AVX512", frozenset({"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"})),
    ("GGML_AVX512_VBMI", frozenset({"avx512vbmi"})),
    ("GGML_AVX512_VNNI", frozenset({"avx512_vnni"})),
    ("GGML_AVX512_BF16", frozenset({"avx512_bf16"})),
)
# Only with an explicit request (see AMX_WARNING).
GGML_AMX_OPTIONS: tuple[tuple[str, frozenset[str]], ...] = (
    ("GGML_AMX_TILE", frozenset({"amx_tile"})),
    ("GGML_AMX_INT8", frozenset({"amx_int8"})),
    ("GGML_AMX_BF16", frozenset({"amx_bf16"})),
)
AMX_WARNING = ("building ggml's AMX matmul path on request: at this pin it is known to segfault in "
               "ggml_backend_amx_mul_mat (upstream llama.cpp issue 20824, closed without a fix); "
               "rebuild without --amx if runs crash")

# macOS x86 sysctl names → the Linux names used above.
_DARWIN_X86_NAMES = {
    "sse4.2": "sse4_2", "avx1.0": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi2": "bmi2",
    "avx512f": "avx512f", "avx512cd": "avx512cd", "avx512vl": "avx512vl", "avx512dq": "avx512dq",
    "avx512bw": "avx512bw", "avx512vbmi": "avx512vbmi", "avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni",
}


def _is_x86(machine: str) -> bool:
    return machine.lower() in ("x86_64", "amd64", "i386", "i686")


def _linux_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                # x86: "flags"; ARM: "Features"
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def _darwin_flags(machine: str) -> frozenset[str]:
    def sysctl(*names: str) -> str:
        proc = subprocess.run(["sysctl", "-n", *names], capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 else ""

    if _is_x86(machine):
        raw = sysctl("machdep.cpu.features", "machdep.cpu.leaf7_features").lower().split()
        return frozenset(_DARWIN_X86_NAMES.get(f, f) for f in raw)
    proc = subprocess.run(["sysctl", "hw.optional"], capture_output=True, text=True)
    flags = set()
    for line in proc.stdout.splitlines():
        name, _, value = line.partition(":")
        if value.strip() == "1":
            flags.add(name.strip().removeprefix("hw.optional."))
    return frozenset(flags)


@lru_cache(maxsize=1)
def host_flags() -> frozenset[str]:
    """The CPU feature flags this host reports (empty when they cannot be read)."""
    if sys.platform.startswith("linux"):
        return _linux_flags()
    if sys.platform == "darwin":
        return _darwin_flags(platform.machine())
    return frozenset()


@dataclass(frozen=True)
class InstructionSet:
    """What a build is compiled for.

    mode "explicit": GGML_NATIVE=OFF with `options` on (x86-64); "native": -march=native (ARM, Apple, or an
    x86 host whose flags cannot be read). `requires` are the CPU flags the compiled code may use: the union of
    the options' flags, or every host flag for a native build (the compiler may use any of them).
    """

    arch: str
    mode: str
    options: tuple[str, ...] = ()
    requires: tuple[str, ...] = field(default=())
    amx: bool = False

    def cmake_args(self) -> list[str]:
        if self.mode == "native":
            return ["-DGGML_NATIVE=ON"]
        on = set(self.options)
        every = [name for name, _ in GGML_X86_OPTIONS + GGML_AMX_OPTIONS]
        return ["-DGGML_NATIVE=OFF"] + [f"-D{name}={'ON' if name in on else 'OFF'}" for name in every]

    def key(self) -> str:
        """Short, stable digest of what the code requires (part of the build cache key)."""
        blob = json.dumps({"arch": self.arch, "mode": self.mode, "requires": list(self.requires)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def summary(self) -> str:
        if self.mode == "native":
            return f"{self.arch} native ({len(self.requires)} host flags)"
        names = [o.removeprefix("GGML_") for o in self.options]
        return f"{self.arch}: " + (" ".join(names) if names else "baseline")

    def missing_on(self, flags: frozenset[str]) -> list[str]:
        """The required flags a CPU with `flags` lacks (empty: this build runs there)."""
        return sorted(set(self.requires) - flags)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "InstructionSet":
        return cls(arch=str(data["arch"]), mode=str(data["mode"]), options=tuple(data.get("options", ())),
                   requires=tuple(data.get("requires", ())), amx=bool(data.get("amx", False)))


def for_host(amx: bool = False, flags: frozenset[str] | None = None, machine: str | None = None) -> InstructionSet:
    """The instruction set a build on this host targets (AMX only when asked)."""
    machine = machine or platform.machine()
    flags = host_flags() if flags is None else flags
    if _is_x86(machine) and flags:
        table = GGML_X86_OPTIONS + (GGML_AMX_OPTIONS if amx else ())
        options = tuple(name for name, need in table if need <= flags)
        requires = tuple(sorted(set().union(*(need for name, need in table if name in options))))
        return InstructionSet(arch="x86_64", mode="explicit", options=options, requires=requires,
                              amx=any(o.startswith("GGML_AMX") for o in options))
    return InstructionSet(arch=machine, mode="native", requires=tuple(sorted(flags)), amx=False)


# The record a patched wheel carries, beside llama_cpp's own files (written into the source before the build).
BUILD_RECORD = "flashflex_build.json"


def installed_build_record() -> dict | None:
    """The build record of the installed llama_cpp, read WITHOUT importing it (a library compiled for
    another CPU could die with SIGILL on import). None when llama_cpp is missing or carries no record."""
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / BUILD_RECORD
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return None


def incompatibility(record: dict | None, flags: frozenset[str] | None = None) -> str | None:
    """One line naming what the recorded build needs and this CPU lacks, or None when it runs here (or
    when there is no record to check)."""
    if not record or "instruction_set" not in record:
        return None
    isa = InstructionSet.from_json(record["instruction_set"])
    flags = host_flags() if flags is None else flags
    if not flags:
        return None  # cannot tell; do not block
    missing = isa.missing_on(flags)
    if not missing:
        return None
    return (f"the installed llama_cpp was compiled for CPU extensions this CPU lacks ({', '.join(missing)}; "
            f"built for {isa.summary()})")


if __name__ == "__main__":  # used by CI before anything is installed
    isa = for_host(amx="--amx" in sys.argv)
    print(isa.key() if "--key" in sys.argv else json.dumps(isa.to_json(), indent=2))
