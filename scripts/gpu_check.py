"""The device check for a lent CUDA GPU (issue 24): in one call of at most 10 minutes, on a machine that reaches no
package index, install the Python dependencies from carried wheels, build the CUDA variant of the patched llama.cpp
for this GPU's architecture only, run the `gpu` tests against it and a short hybrid benchmark
(scripts/bench_hybrid.py), and write logs, JSON and summary.md into OUTDIR.

    python scripts/gpu_check.py --prepare      # here, with the package index: fills .whl/, prints the `run` call
    scripts/gpu_check.sh OUTDIR                # there (the `run` call), or anywhere with an NVIDIA GPU and nvcc
    scripts/gpu_check.sh OUTDIR --dry-run      # every step's command, what is missing; runs nothing

Everything the device machine cannot fetch travels in .whl/ (git-ignored, named in the call's `carry`): wheels of
the Python packages its image lacks (py/), the llama.cpp commit of the pin as one shallow git pack (its objects only:
vendor/llama.cpp becomes a git tree at the pin, as `flashflex vendor sync` leaves it), and a slim copy of the pinned
llama-cpp-python sdist (orchestrator.build.make_slim_sdist: 75 MB would not fit the 64 MiB a call may carry).

This file imports only the standard library: on the device it runs before the dependencies are installed. Steps
that need the orchestrator package run as child processes with the installed packages on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CARRY = ".whl"  # the folder the `run` call carries (git-ignored)
BUDGET_S = 570.0  # of the call's 600 s: the rest is for the tool's own start of the command and a margin
RESERVE_S = 20.0  # kept back at every step for writing the results
BENCH_MIN_S = 150.0  # below this much time left after the tests, the benchmark is skipped
TESTS_MAX_S = 240.0
OUT_FILES = ("gpu_check.log", "build.log", "pytest.log", "result.json", "summary.md", "bench.json", "bench.md")
# What the device image ('cuda', read 2026-11-17, /work/.library/device/KINDS.md) already holds and --prepare leaves
# behind: large binaries, and what its own network stack uses (a carried copy would shadow it on PYTHONPATH).
DEVICE_PROVIDED = frozenset({"numpy", "requests", "urllib3", "certifi", "idna", "charset-normalizer"})
# llama-cpp-python's own runtime requirements (its pyproject), beside flashflex's.
LLAMA_CPP_PYTHON_REQUIRES = ("typing-extensions>=4.5.0", "numpy>=1.20.0", "diskcache>=5.6.1", "jinja2>=2.11.3")
PIP_PLATFORM = ("--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                "--platform", "manylinux2014_x86_64", "--platform", "any")
CUDA_DIRS = ("/usr/local/cuda/bin",)


class Refusal(Exception):
    """What stops the check before it starts: one line, and what to do."""


# --------------------------------------------------------------------------------------------------------
# Paths and the carried folder


@dataclass
class Layout:
    repo: Path
    out: Path
    work: Path  # build cache, installed packages, the benchmark's model

    @property
    def carry(self) -> Path:
        return self.repo / CARRY

    @property
    def home(self) -> Path:  # FLASHFLEX_HOME: the sdist, the build cache
        return self.work / "home"

    @property
    def site(self) -> Path:  # the carried wheels, installed
        return self.work / "site"

    @property
    def gpu_site(self) -> Path:  # the CUDA build's wheel, installed beside them (never over anything)
        return self.work / "site-cuda"


def load_pin(repo: Path) -> dict[str, str]:
    data = json.loads((repo / "vendor" / "PIN.json").read_text())
    return {"commit": data["llama_cpp"]["commit"], "version": data["llama_cpp_python"]["version"]}


def pack_name(commit: str) -> str:
    return f"llama.cpp-{commit[:12]}"


def slim_name(version: str) -> str:
    return f"llama_cpp_python-{version}.slim.tar.gz"


def carried(layout: Layout, pin: dict[str, str]) -> dict[str, Any]:
    """What the carried folder holds of what the check needs."""
    src = layout.carry / "src"
    return {"wheels": sorted(glob.glob(str(layout.carry / "py" / "*.whl"))),
            "pack": sorted(glob.glob(str(src / f"{pack_name(pin['commit'])}.pack"))),
            "slim": (src / slim_name(pin["version"])) if (src / slim_name(pin["version"])).is_file() else None}


# --------------------------------------------------------------------------------------------------------
# What this machine has


@dataclass
class Gpu:
    compute_cap: str  # "9.0"
    name: str
    memory_mib: int

    @property
    def arch(self) -> str:
        """CMake's CUDA architecture for this GPU's own machine code only ("90-real")."""
        return self.compute_cap.replace(".", "") + "-real"


def query_gpu() -> tuple[Gpu | None, str]:
    """GPU 0 as nvidia-smi reports it, or (None, why not)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None, "nvidia-smi is not on PATH (no NVIDIA driver here)"
    try:
        proc = subprocess.run([exe, "--query-gpu=compute_cap,name,memory.total", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"nvidia-smi failed ({exc})"
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        why = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return None, f"nvidia-smi sees no GPU ({why[0]})"
    parts = [p.strip() for p in lines[0].split(",")]
    if len(parts) < 3 or not re.fullmatch(r"\d+\.\d+", parts[0]):
        return None, f"nvidia-smi answered {lines[0]!r}, not compute_cap, name, memory"
    return Gpu(parts[0], parts[1], int(float(parts[2]))), ""


def find_nvcc() -> str | None:
    """nvcc on PATH, else CUDACXX, else the toolkit's usual folders (CUDA images leave them off PATH)."""
    exe = shutil.which("nvcc")
    if exe:
        return exe
    env = os.environ.get("CUDACXX")
    if env and Path(env).is_file():
        return env
    for d in ([os.environ["CUDA_HOME"] + "/bin"] if os.environ.get("CUDA_HOME") else []) + list(CUDA_DIRS):
        if (Path(d) / "nvcc").is_file():
            return str(Path(d) / "nvcc")
    return None


@dataclass
class Checks:
    gpu: Gpu | None = None
    nvcc: str | None = None
    missing: list[str] = field(default_factory=list)  # one line each: what, and what to do
    notes: list[str] = field(default_factory=list)


def check_machine(layout: Layout, pin: dict[str, str], arch: str | None) -> Checks:
    c = Checks()
    c.gpu, why = query_gpu()
    if c.gpu is None and arch is None:
        c.missing.append(f"no NVIDIA GPU: {why} — run this on a machine with one (the device tool's `run`)")
    elif c.gpu is None:
        c.notes.append(f"no GPU here ({why}); building for --arch {arch}, the tests and benchmark will skip")
    c.nvcc = find_nvcc()
    if c.nvcc is None:
        c.missing.append("no CUDA compiler: nvcc is not on PATH, in CUDACXX, $CUDA_HOME/bin or /usr/local/cuda/bin "
                         "— install the CUDA toolkit or set CUDACXX")
    for tool, fix in (("git", "install git (vendor/llama.cpp is made a git tree from the carried pack)"),
                      ("cmake", "install cmake >= 3.21 (pip's cmake does)")):
        if not shutil.which(tool):
            c.missing.append(f"{tool} is not on PATH — {fix}")
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        c.missing.append("no C++ compiler (c++, g++, clang++) on PATH — install one (build-essential)")
    if sys.version_info < (3, 10):
        c.missing.append(f"python {sys.version.split()[0]} is too old — flashflex needs 3.10 or newer")
    have = carried(layout, pin)
    vendored = _vendor_at_pin(layout.repo, pin["commit"])
    if not vendored and not have["pack"]:
        c.missing.append(f"vendor/llama.cpp is not at the pin and {CARRY}/src holds no {pack_name(pin['commit'])}"
                         ".pack — run scripts/gpu_check.py --prepare where PyPI is reachable, and carry "
                         f"{CARRY}")
    if not have["slim"] and not _full_sdist(layout, pin):
        c.missing.append(f"{CARRY}/src holds no {slim_name(pin['version'])} — run scripts/gpu_check.py --prepare "
                         f"where PyPI is reachable, and carry {CARRY}")
    if not have["wheels"]:
        c.notes.append(f"{CARRY}/py holds no wheels: the Python packages must already be installed here")
    return c


def _vendor_at_pin(repo: Path, commit: str) -> bool:
    vdir = repo / "vendor" / "llama.cpp"
    if not (vdir / ".git").exists() or not shutil.which("git"):
        return False
    proc = subprocess.run(["git", "-C", str(vdir), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
    return proc.returncode == 0


def _full_sdist(layout: Layout, pin: dict[str, str]) -> bool:
    return (layout.home / "sdist" / f"llama_cpp_python-{pin['version']}.tar.gz").is_file()


# --------------------------------------------------------------------------------------------------------
# The steps


@dataclass
class Step:
    name: str
    argv: list[str] | None  # None: done in this process (described by `what`)
    what: str


def gpu_test_files(repo: Path) -> list[str]:
    """The test modules with `gpu`-marked tests (naming them keeps pytest from importing modules whose own
    dependencies, e.g. the server's, this machine need not have)."""
    return sorted(str(p.relative_to(repo)) for p in (repo / "tests").glob("test_*.py")
                  if "mark.gpu" in p.read_text(errors="replace"))


def plan_steps(layout: Layout, pin: dict[str, str], arch: str, args: argparse.Namespace) -> list[Step]:
    py = sys.executable
    have = carried(layout, pin)
    steps = [Step("install", [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                              "--no-cache-dir", "--upgrade", "--target", str(layout.site), *have["wheels"]]
                  if have["wheels"] else None,
                  f"the carried wheels into {layout.site}, then every requirement checked against what is installed"),
             Step("source", None,
                  f"vendor/llama.cpp made a git tree at {pin['commit'][:12]} from {CARRY}/src/"
                  f"{pack_name(pin['commit'])}.pack (unless it is one); {slim_name(pin['version'])} copied to "
                  f"{layout.home}/sdist/"),
             Step("build", [py, "-m", "orchestrator", "build", "--backend", "cuda", "--cmake-arg",
                            f"-DCMAKE_CUDA_ARCHITECTURES={arch}", "--no-install", "--json"],
                  f"the patched llama-cpp-python, CUDA for {arch} only, {os.cpu_count()} jobs; its wheel then "
                  f"installed into {layout.gpu_site}"),
             Step("tests", [py, "-m", "pytest", "-m", "gpu", "-rA", "-p", "no:cacheprovider",
                            *gpu_test_files(layout.repo)], "the gpu-marked tests against that build")]
    bench = [py, str(layout.repo / "scripts" / "bench_hybrid.py"), "--out", str(layout.out), "--work",
             str(layout.work / "bench"), "--repeats", str(args.repeats), "--layers", str(args.layers)]
    steps.append(Step("bench", None if args.no_bench else bench,
                      "skipped (--no-bench)" if args.no_bench else
                      f"the hybrid benchmark, if {BENCH_MIN_S:.0f}s are left (a --deadline-s is added)"))
    return steps


def child_env(layout: Layout, nvcc: str | None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(layout.gpu_site), str(layout.site), str(layout.repo)]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["FLASHFLEX_HOME"] = str(layout.home)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    if nvcc:
        env["PATH"] = str(Path(nvcc).parent) + os.pathsep + env.get("PATH", "")
        env.setdefault("CUDACXX", nvcc)
    return env


class Run:
    """The log, the deadline and result.json/summary.md, rewritten after every step (a call stopped at its limit
    still returns what was done)."""

    def __init__(self, layout: Layout, budget_s: float):
        self.layout = layout
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.result: dict[str, Any] = {"steps": [], "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                       "budget_s": budget_s}
        layout.out.mkdir(parents=True, exist_ok=True)
        self.logf = open(layout.out / "gpu_check.log", "a", buffering=1)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.logf.write(line + "\n")

    def step(self, name: str, status: str, seconds: float, **extra: Any) -> None:
        self.result["steps"].append({"step": name, "status": status, "seconds": round(seconds, 1), **extra})
        self.log(f"step {name}: {status} ({seconds:.0f}s)")
        self.save()

    def save(self) -> None:
        self.result["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        (self.layout.out / "result.json").write_text(json.dumps(self.result, indent=1, default=str))
        (self.layout.out / "summary.md").write_text(summary_markdown(self.result, self.layout.out))

    def call(self, argv: list[str], env: dict[str, str], timeout: float, logfile: Path | None = None,
             cwd: Path | None = None) -> tuple[int | None, str]:
        """Run argv, its output into logfile (else this log); (exit status, or None when it was stopped at
        `timeout`, and the last lines of its output)."""
        self.log("$ " + shlex.join(argv))
        tail: list[str] = []
        target = open(logfile, "w", buffering=1) if logfile else self.logf
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                    cwd=cwd or self.layout.repo, start_new_session=True, errors="replace")
            assert proc.stdout is not None
            stdout = proc.stdout

            def pump() -> None:
                for line in stdout:
                    target.write(line)
                    tail.append(line.rstrip("\n"))
                    del tail[:-40]

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                rc: int | None = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: pip, cmake, ninja, nvcc, the workers
                proc.wait()
                rc = None
            reader.join(timeout=10)
            return rc, "\n".join(tail)
        finally:
            if logfile:
                target.close()


# --------------------------------------------------------------------------------------------------------
# Summary


def summary_markdown(result: dict[str, Any], out: Path) -> str:
    lines = ["# flashflex device check", ""]
    m = result.get("machine", {})
    if m:
        lines += [f"GPU: {m.get('gpu')} (compute {m.get('compute_cap')}, {m.get('gpu_memory_mib')} MiB) · built for "
                  f"{m.get('arch')} · nvcc {m.get('nvcc_version', '?')} · {m.get('cores')} cores · python "
                  f"{m.get('python')}", ""]
    lines += ["| step | status | seconds | detail |", "|---|---|---|---|"]
    for s in result.get("steps", []):
        detail = s.get("detail") or ""
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {str(detail).replace('|', '/')[:300]} |")
    lines += ["", f"Elapsed {result.get('elapsed_s')}s of a {result.get('budget_s')}s budget."]
    if result.get("tests"):
        lines += ["", f"Tests: {result['tests']}"]
    bench = out / "bench.md"
    if bench.is_file():
        lines += ["", "## Hybrid benchmark", "", bench.read_text()]
    lines += ["", "Files: " + ", ".join(f for f in OUT_FILES if (out / f).exists())]
    return "\n".join(lines) + "\n"


def pytest_counts(text: str) -> dict[str, int]:
    """The counts of pytest's last summary line ('3 passed, 1 skipped, 1 xfailed in 12.3s')."""
    line = next((ln for ln in reversed(text.splitlines()) if re.search(r"\b(passed|failed|skipped|error)", ln)
                 and " in " in ln), "")
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?|"
                                                     r"deselected|warnings?)", line)}


# --------------------------------------------------------------------------------------------------------
# Doing it


def install_source(layout: Layout, pin: dict[str, str], run: Run) -> None:
    """vendor/llama.cpp as a git tree at the pin (from the carried shallow pack) and the slim sdist in the cache."""
    have = carried(layout, pin)
    vdir = layout.repo / "vendor" / "llama.cpp"
    if not _vendor_at_pin(layout.repo, pin["commit"]):
        if vdir.exists() and any(vdir.iterdir()):
            raise Refusal(f"{vdir} exists and is not a git tree at the pin — move it away and rerun")
        git = ["git", "-C", str(vdir)]
        vdir.mkdir(parents=True, exist_ok=True)
        subprocess.run(git + ["init", "-q"], check=True)
        packdir = vdir / ".git" / "objects" / "pack"
        pack = Path(have["pack"][0])
        for suffix in (".pack", ".idx"):  # git reads any pack-*.pack with its .idx beside it
            shutil.copyfile(pack.with_suffix(suffix), packdir / f"pack-{pin['commit']}{suffix}")
        # the pack holds one commit without its parents: git must be told they are missing on purpose
        (vdir / ".git" / "shallow").write_text(pin["commit"] + "\n")
        subprocess.run(git + ["checkout", "-q", "--detach", pin["commit"]], check=True)
        run.log(f"vendor/llama.cpp checked out at {pin['commit'][:12]} from {pack.name}")
    if have["slim"] and not _full_sdist(layout, pin):
        dest = layout.home / "sdist" / slim_name(pin["version"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(have["slim"], dest)


def pyproject_dependencies(repo: Path) -> list[str]:
    """flashflex's own requirements, from pyproject.toml's [project] dependencies."""
    text = (repo / "pyproject.toml").read_text()
    return re.findall(r'^\s+"([^"]+)",?$', text.split("dependencies = [", 1)[1].split("]", 1)[0], re.M)


def _requirements(repo: Path) -> list[str]:
    return [*pyproject_dependencies(repo), *LLAMA_CPP_PYTHON_REQUIRES, "pytest>=7.4"]


def _installed(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def check_requirements(repo: Path) -> list[str]:
    """Requirements of flashflex (pyproject) and llama-cpp-python that the installed packages do not meet."""
    import importlib.metadata as md

    try:
        from packaging.requirements import Requirement
    except ImportError:  # no `packaging` here: presence only
        print("note: packaging is not installed, so versions are not checked", file=sys.stderr)
        names = [re.split(r"[<>=!~ \[;]", spec, maxsplit=1)[0] for spec in _requirements(repo)]
        return [f"{name} is not installed" for name in names if not _installed(name)]
    problems = []
    for spec in _requirements(repo):
        req = Requirement(spec)
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            problems.append(f"{req.name} is not installed")
            continue
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name} {version} does not meet {req.specifier}")
    return problems


def device_check(args: argparse.Namespace) -> int:
    layout = Layout(REPO, args.outdir.resolve(), args.work.resolve())
    pin = load_pin(REPO)
    checks = check_machine(layout, pin, args.arch)
    arch = args.arch or (checks.gpu.arch if checks.gpu else "<compute_cap of GPU 0, from nvidia-smi>-real")
    steps = plan_steps(layout, pin, arch, args)
    if args.dry_run:
        print(f"device check (dry run): {len(steps)} steps, budget {args.budget_s:.0f}s, results in {layout.out}")
        gpu = checks.gpu
        print(f"GPU: {f'{gpu.name}, compute {gpu.compute_cap}, {gpu.memory_mib} MiB' if gpu else 'none'}; "
              f"nvcc: {checks.nvcc or 'none'}; CUDA architecture: {arch}")
        for s in steps:
            print(f"[{s.name}] {s.what}")
            if s.argv:
                print("  $ " + shlex.join(s.argv))
        if not args.no_bench:
            bench = [sys.executable, str(REPO / "scripts" / "bench_hybrid.py"), "--dry-run", "--repeats",
                     str(args.repeats), "--layers", str(args.layers)]
            proc = subprocess.run(bench, capture_output=True, text=True, env=child_env(layout, checks.nvcc))
            if proc.returncode == 0:
                for ln in proc.stdout.splitlines():
                    print("  " + ln)
            else:  # before the install step, this interpreter may lack the packages that sizing the model needs
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"  (the benchmark's configurations could not be listed here: {last})")
        for note in checks.notes:
            print(f"note: {note}")
        for miss in checks.missing:
            print(f"missing: {miss}")
        print("ready" if not checks.missing else f"not ready here: {len(checks.missing)} missing")
        return 0
    if checks.missing:
        print(f"error: {checks.missing[0]}", file=sys.stderr)
        return 2
    return execute(layout, pin, checks, arch, steps, args)


def execute(layout: Layout, pin: dict[str, str], checks: Checks, arch: str, steps: list[Step],
            args: argparse.Namespace) -> int:
    run = Run(layout, args.budget_s)
    env = child_env(layout, checks.nvcc)
    nvcc_v = subprocess.run([checks.nvcc or "nvcc", "--version"], capture_output=True, text=True).stdout
    gpu = checks.gpu
    run.result["machine"] = {"gpu": gpu.name if gpu else None, "compute_cap": gpu.compute_cap if gpu else None,
                             "gpu_memory_mib": gpu.memory_mib if gpu else None, "arch": arch,
                             "nvcc_version": (re.findall(r"release ([\d.]+)", nvcc_v) or ["?"])[0],
                             "cores": os.cpu_count(), "python": sys.version.split()[0], "pin": pin["commit"]}
    for note in checks.notes:
        run.log(f"note: {note}")
    by = {s.name: s for s in steps}
    ok = True

    # install: the carried wheels, then what is installed checked against every requirement
    t = time.monotonic()
    if by["install"].argv:
        rc, tail = run.call(by["install"].argv, env, run.left() - RESERVE_S)
        if rc != 0:
            run.step("install", "failed", time.monotonic() - t, detail=tail.splitlines()[-1:] or rc)
            return 1
    proc = subprocess.run([sys.executable, __file__, "--check-requirements"], capture_output=True, text=True, env=env)
    problems = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or problems:
        detail = "; ".join(problems) or proc.stderr.strip().splitlines()[-1:]
        run.step("install", "failed", time.monotonic() - t, detail=detail)
        return 1
    run.step("install", "ok", time.monotonic() - t, detail=f"{len(carried(layout, pin)['wheels'])} wheels")

    t = time.monotonic()
    try:
        install_source(layout, pin, run)
    except (Refusal, subprocess.CalledProcessError, OSError) as exc:
        run.step("source", "failed", time.monotonic() - t, detail=str(exc))
        return 1
    run.step("source", "ok", time.monotonic() - t)

    # build: whatever the budget leaves after the reserve; a build stopped there ends the check
    t = time.monotonic()
    build_argv = by["build"].argv
    assert build_argv is not None
    rc, tail = run.call(build_argv, env, run.left() - RESERVE_S, logfile=layout.work / "build-cmd.log")
    _copy_build_log(layout, run)
    record = _last_json(layout.work / "build-cmd.log")
    if rc != 0 or not record.get("wheel"):
        status = "stopped at the deadline" if rc is None else "failed"
        run.step("build", status, time.monotonic() - t, detail=tail.splitlines()[-1:])
        return 1
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--disable-pip-version-check",
           "--target", str(layout.gpu_site), "--upgrade", record["wheel"]]
    rc, tail = run.call(pip, env, max(30.0, run.left() - RESERVE_S))
    if rc != 0:
        run.step("build", "failed", time.monotonic() - t, detail=f"installing the wheel: {tail[-300:]}")
        return 1
    run.step("build", "ok", time.monotonic() - t, detail=f"{'cached' if record.get('cached') else 'built'} "
             f"{Path(record['wheel']).name}, key {record.get('key')}")
    rc, tail = run.call([sys.executable, "-m", "orchestrator", "doctor"], env, 60)
    run.result["doctor"] = tail

    # tests
    t = time.monotonic()
    room = run.left() - RESERVE_S - (0 if args.no_bench else BENCH_MIN_S)
    tests_argv = by["tests"].argv
    assert tests_argv is not None
    rc, tail = run.call(tests_argv, env, max(60.0, min(TESTS_MAX_S, room)), logfile=layout.out / "pytest.log")
    counts = pytest_counts((layout.out / "pytest.log").read_text(errors="replace"))
    run.result["tests"] = counts
    status = "ok" if rc == 0 else "stopped at its time limit" if rc is None else f"failed (exit {rc})"
    ok &= rc == 0
    run.step("tests", status, time.monotonic() - t, detail=", ".join(f"{v} {k}" for k, v in counts.items()))

    # benchmark: only with the time for it
    t = time.monotonic()
    bench_argv = by["bench"].argv
    left = run.left() - RESERVE_S
    if bench_argv is None:
        run.step("bench", "skipped", 0, detail="--no-bench")
    elif left < BENCH_MIN_S:
        run.step("bench", "skipped", 0, detail=f"{left:.0f}s left after the build and tests, under {BENCH_MIN_S:.0f}s")
    else:
        rc, tail = run.call(bench_argv + ["--deadline-s", f"{left - 15:.0f}"], env, left)
        status = "ok" if rc == 0 else "stopped at the deadline" if rc is None else f"failed (exit {rc})"
        ok &= rc == 0
        run.step("bench", status, time.monotonic() - t, detail="" if rc == 0 else tail.splitlines()[-1:])
    run.save()
    print((layout.out / "summary.md").read_text())
    return 0 if ok else 1


def _copy_build_log(layout: Layout, run: Run, limit: int = 8 << 20) -> None:
    """The newest build's log into OUTDIR (its last `limit` bytes: the errors are at the end)."""
    logs = sorted(layout.home.glob("builds/*/build.log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return
    with open(logs[-1], "rb") as src:
        size = src.seek(0, 2)
        src.seek(max(0, size - limit))
        (layout.out / "build.log").write_bytes(src.read())
    run.log(f"build log: {logs[-1]} ({size >> 10} KiB) -> build.log")


def _last_json(path: Path) -> dict[str, Any]:
    """The JSON object `flashflex build --json` prints last (its progress goes to stderr, merged here)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    start = text.rfind("\n{")
    try:
        return json.loads(text[start + 1:] if start >= 0 else text)
    except ValueError:
        return {}


# --------------------------------------------------------------------------------------------------------
# --prepare (here, with the package index)


def prepare(repo: Path) -> int:
    """Fill .whl/ with what the device needs and cannot fetch; print the `run` call."""
    sys.path.insert(0, str(repo))
    from orchestrator import build, vendor

    pin = vendor.load_pin(repo)
    carry = repo / CARRY
    (carry / "src").mkdir(parents=True, exist_ok=True)
    sdist = vendor.ensure_sdist(pin.lcp_version, pin.sdist_sha256)
    slim = carry / "src" / slim_name(pin.lcp_version)
    build.make_slim_sdist(sdist, slim, pin)
    print(f"{slim.relative_to(repo)}: {slim.stat().st_size >> 10} KiB")

    pack = carry / "src" / f"{pack_name(pin.commit)}.pack"
    if not pack.exists():
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            gitdir = vendor.extract_vendored_gitdir(sdist, Path(tmp) / "src.git")
            bare = Path(tmp) / "pin.git"
            subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
            subprocess.run(["git", "-C", str(bare), "fetch", "-q", "--depth=1", str(gitdir),
                            f"{pin.commit}:refs/heads/pin"], check=True)
            subprocess.run(["git", "-C", str(bare), "repack", "-a", "-d", "-q"], check=True)
            packs = list((bare / "objects" / "pack").glob("pack-*.pack"))
            assert len(packs) == 1, packs
            shutil.copyfile(packs[0].with_suffix(".idx"), pack.with_name(f"{pack_name(pin.commit)}.idx"))
            shutil.copyfile(packs[0], pack)
    print(f"{pack.relative_to(repo)}: {pack.stat().st_size >> 20} MiB (the pinned llama.cpp commit, shallow)")

    wheels = carry / "py"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir()
    deps = pyproject_dependencies(repo)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", *PIP_PLATFORM,
               "-d", tmp, *deps, *LLAMA_CPP_PYTHON_REQUIRES]
        subprocess.run(cmd, check=True)
        for whl in sorted(Path(tmp).glob("*.whl")):
            name = re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower()
            if name not in DEVICE_PROVIDED:
                shutil.copyfile(whl, wheels / whl.name)
    names = sorted(p.name for p in wheels.glob("*.whl"))
    print(f"{wheels.relative_to(repo)}: {len(names)} wheels ({', '.join(n.split('-')[0] for n in names)})")
    carried_bytes = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    tracked = subprocess.run(["git", "-C", str(repo), "ls-files", "-z"], capture_output=True).stdout.split(b"\0")
    tree_bytes = sum((repo / f.decode()).stat().st_size for f in tracked if f and (repo / f.decode()).is_file())
    total = carried_bytes + tree_bytes
    print(f"travels: {CARRY}/ {carried_bytes / 2**20:.1f} MiB + tracked files {tree_bytes / 2**20:.1f} MiB = "
          f"{total / 2**20:.1f} MiB of the 64 MiB a call may send")
    if total > 64 << 20:
        print("error: that is more than a call may send — drop wheels the device already has (DEVICE_PROVIDED)",
              file=sys.stderr)
        return 1
    print("\nthe device tool's call (from the repository the session was started in):")
    print(json.dumps({"command": 'bash scripts/gpu_check.sh "$OUT"', "carry": [CARRY], "timeout_s": 600}))
    return 0


# --------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("outdir", nargs="?", type=Path, help="where the logs, result.json and summary.md go")
    ap.add_argument("--prepare", action="store_true", help=f"fill {CARRY}/ for the device (needs PyPI); print the call")
    ap.add_argument("--dry-run", action="store_true", help="print every step and what is missing; run nothing")
    ap.add_argument("--no-bench", action="store_true", help="skip the hybrid benchmark")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S,
                    help=f"seconds for the whole check (default {BUDGET_S:.0f}: one 10-minute call)")
    ap.add_argument("--arch", help="CUDA architecture for CMake (default: GPU 0's compute capability, e.g. 90-real)")
    ap.add_argument("--repeats", type=int, default=3, help="benchmark runs per configuration (default 3)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the benchmark's A3B-shaped model (default 4)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/flashflex-gpu-check"),
                    help="build cache, installed packages, the benchmark's model (default /tmp/flashflex-gpu-check)")
    ap.add_argument("--check-requirements", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not (args.prepare or args.check_requirements) and args.outdir is None:
        ap.error("OUTDIR is required (or --prepare)")
    if args.budget_s <= RESERVE_S:
        ap.error(f"--budget-s must be more than {RESERVE_S:.0f}")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.arch is not None and not re.fullmatch(r"\d{2,3}[af]?(-real|-virtual)?|native", args.arch):
        ap.error(f"--arch {args.arch!r} is not a CUDA architecture (e.g. 90-real, 90a, native)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check_requirements:
        for problem in check_requirements(REPO):
            print(problem)
        return 0
    if args.prepare:
        return prepare(REPO)
    try:
        return device_check(args)
    except Refusal as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
