"""The pinned upstream llama.cpp and `flashflex vendor sync`.

vendor/PIN.json is the single record of the pin: the llama.cpp commit, and its offline source — the
llama-cpp-python sdist on PyPI whose vendor/llama.cpp is that commit, shipped with its git objects.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from orchestrator import gitutil
from orchestrator.errors import FlashflexError
from orchestrator.fsutil import atomic_file, safe_extractall
from orchestrator.paths import cache_root, repo_root

BASE_REF = "refs/flashflex/base"  # the marked base the patch series applies onto
SUBMODULE_PATH = "vendor/llama.cpp"

Log = Callable[[str], None]


@dataclass(frozen=True)
class Pin:
    commit: str
    url: str
    lcp_version: str  # llama-cpp-python release that vendors `commit`
    sdist_name: str
    sdist_sha256: str


def load_pin(root: Path | None = None) -> Pin:
    path = (root or repo_root()) / "vendor" / "PIN.json"
    try:
        data = json.loads(path.read_text())
        return Pin(
            commit=data["llama_cpp"]["commit"],
            url=data["llama_cpp"]["url"],
            lcp_version=data["llama_cpp_python"]["version"],
            sdist_name=data["llama_cpp_python"]["sdist"],
            sdist_sha256=data["llama_cpp_python"]["sdist_sha256"],
        )
    except FileNotFoundError as exc:
        raise FlashflexError(f"{path} is missing", "run flashflex from a flashflex checkout") from exc
    except (KeyError, ValueError) as exc:
        raise FlashflexError(f"{path} is malformed ({exc})", "restore it with git checkout vendor/PIN.json") from exc


def vendor_dir(root: Path | None = None) -> Path:
    return (root or repo_root()) / SUBMODULE_PATH


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sdist_path(version: str) -> Path:
    return cache_root() / "sdist" / f"llama_cpp_python-{version}.tar.gz"


def ensure_sdist(version: str, sha256: str | None, log: Log = print) -> Path:
    """The llama-cpp-python sdist of `version`, downloaded once with pip and checked against `sha256`."""
    dest = sdist_path(version)
    if dest.exists():
        if sha256 is None or sha256_file(dest) == sha256:
            return dest
        dest.unlink()  # a corrupt cache entry is never reused
        log(f"cached {dest.name} had the wrong sha256; downloading it again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"downloading llama-cpp-python {version} sdist from the package index (~75 MB)…")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-d", tmp, f"llama-cpp-python=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not files:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no sdist downloaded"]
            raise FlashflexError(f"could not download llama-cpp-python=={version} ({last[0]})",
                                 "check that the package index is reachable (pip config) and retry")
        got = sha256_file(files[0])
        if sha256 is not None and got != sha256:
            raise FlashflexError(
                f"llama-cpp-python {version} sdist has sha256 {got[:16]}…, expected {sha256[:16]}…",
                "the index served a different file; check your index mirror, or if the release was re-uploaded "
                "update vendor/PIN.json after reviewing it")
        with open(files[0], "rb") as src, atomic_file(dest) as fh:
            shutil.copyfileobj(src, fh)
    return dest


def verify_sdist(path: Path, sha256: str) -> None:
    got = sha256_file(path)
    if got != sha256:
        raise FlashflexError(f"{path} has sha256 {got[:16]}…, expected {sha256[:16]}… (corrupt or wrong file)",
                             "delete it and rerun, or pass the right sdist")


def extract_vendored_gitdir(sdist: Path, into: Path) -> Path:
    """Unpack only the sdist's git directory of vendor/llama.cpp (objects + refs), into `into`."""
    marker = "/.git/modules/vendor/llama.cpp/"
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = [m for m in tar.getmembers() if marker in m.name and (m.isfile() or m.isdir())]
            if not members:
                raise FlashflexError(f"{sdist.name} carries no git objects for vendor/llama.cpp",
                                     "this llama-cpp-python release cannot serve as the offline source")
            for m in members:
                m.name = m.name.split(marker, 1)[1]
            members = [m for m in members if m.name]
            safe_extractall(tar, into, members)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise FlashflexError(f"{sdist} is not a readable sdist ({exc})", "delete it and rerun to re-download") from exc
    # The sdist's submodule git dir points at a work tree that does not exist here; read it as a bare store.
    gitutil.run(None, "config", "--file", str(into / "config"), "--unset-all", "core.worktree", check=False)
    gitutil.run(None, "config", "--file", str(into / "config"), "core.bare", "true")
    return into


def vendored_commit(gitdir: Path) -> str:
    """The llama.cpp commit an unpacked sdist git dir has checked out."""
    return gitutil.out(None, f"--git-dir={gitdir}", "rev-parse", "HEAD^{commit}")


def fetch_commit_from_sdist(repo: Path, sdist: Path, log: Log = print) -> str:
    """Fetch the llama.cpp commit an sdist vendors into `repo`; return it."""
    with tempfile.TemporaryDirectory() as tmp:
        gitdir = extract_vendored_gitdir(sdist, Path(tmp) / "llama.cpp.git")
        commit = vendored_commit(gitdir)
        if gitutil.rev(repo, commit) is None:
            log(f"fetching llama.cpp {commit[:12]} from {sdist.name}")
            gitutil.run(repo, "fetch", "--quiet", "--no-tags", "--depth=1", str(gitdir), "HEAD")
    return commit


@dataclass
class SyncResult:
    commit: str
    source: str  # "already" | "submodule" | "sdist"
    path: Path


def sync(root: Path | None = None, allow_network_git: bool = True, log: Log = print) -> SyncResult:
    """Make vendor/llama.cpp a git working tree at the pin. Idempotent."""
    root = root or repo_root()
    pin = load_pin(root)
    vdir = vendor_dir(root)

    if gitutil.is_repo(vdir) and gitutil.rev(vdir, pin.commit):
        _mark_base(vdir, pin.commit)
        head = gitutil.rev(vdir, "HEAD")
        if head != pin.commit and not _is_ancestor(vdir, pin.commit, "HEAD"):
            raise FlashflexError(
                f"{SUBMODULE_PATH} is checked out at {head[:12] if head else '?'}, which is not the pin "
                f"{pin.commit[:12]} or a patched tree on top of it",
                f"run: git -C {SUBMODULE_PATH} checkout --detach {pin.commit} (or bump the pin: patches/README.md)")
        return SyncResult(pin.commit, "already", vdir)

    if allow_network_git and gitutil.is_repo(root):
        proc = gitutil.run(root, "submodule", "update", "--init", "--depth", "1", SUBMODULE_PATH,
                           check=False, timeout=600)
        if proc.returncode == 0 and gitutil.is_repo(vdir) and gitutil.rev(vdir, "HEAD") == pin.commit:
            _mark_base(vdir, pin.commit)
            log(f"vendor/llama.cpp checked out at {pin.commit[:12]} from {pin.url}")
            return SyncResult(pin.commit, "submodule", vdir)
        log("upstream git remote not reachable; using the pinned llama-cpp-python sdist from the package index")

    sdist = ensure_sdist(pin.lcp_version, pin.sdist_sha256, log)
    _populate_from_sdist(root, vdir, sdist, pin, log)
    return SyncResult(pin.commit, "sdist", vdir)


def _populate_from_sdist(root: Path, vdir: Path, sdist: Path, pin: Pin, log: Log) -> None:
    if vdir.exists() and any(vdir.iterdir()) and not gitutil.is_repo(vdir):
        raise FlashflexError(f"{SUBMODULE_PATH} exists, is not empty and is not a git tree",
                             f"move it away (rm -rf {SUBMODULE_PATH}) and rerun flashflex vendor sync")
    # Build the new tree beside the final path; only a finished checkout is renamed into place.
    vdir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".llama.cpp.", suffix=".partial", dir=vdir.parent))
    try:
        gitutil.run(staging, "init", "--quiet")
        commit = fetch_commit_from_sdist(staging, sdist, log)
        if commit != pin.commit:
            raise FlashflexError(
                f"{sdist.name} vendors llama.cpp {commit[:12]}, but the pin is {pin.commit[:12]}",
                "vendor/PIN.json names the wrong llama-cpp-python release; fix the pin")
        gitutil.run(staging, "checkout", "--quiet", "--detach", pin.commit)
        gitutil.run(staging, "remote", "add", "origin", pin.url)
        _mark_base(staging, pin.commit)
        if vdir.exists():
            vdir.rmdir() if not any(vdir.iterdir()) else shutil.rmtree(vdir)
        staging.rename(vdir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if gitutil.is_repo(root):
        # Register it as the submodule and move its git dir under .git/modules, as `submodule update` would.
        gitutil.run(root, "submodule", "init", SUBMODULE_PATH, check=False)
        gitutil.run(root, "submodule", "absorbgitdirs", SUBMODULE_PATH, check=False)
    head = gitutil.rev(vdir, "HEAD")
    if head != pin.commit:
        raise FlashflexError(f"vendor/llama.cpp HEAD is {head}, expected the pin {pin.commit}",
                             "rm -rf vendor/llama.cpp and rerun flashflex vendor sync")
    log(f"vendor/llama.cpp checked out at {pin.commit[:12]} from {sdist.name} (sha256 verified)")


def _mark_base(repo: Path, commit: str) -> None:
    if gitutil.rev(repo, BASE_REF) != commit:
        gitutil.run(repo, "update-ref", BASE_REF, commit)


def _is_ancestor(repo: Path, a: str, b: str) -> bool:
    return gitutil.run(repo, "merge-base", "--is-ancestor", a, b, check=False).returncode == 0


def status(root: Path | None = None) -> dict:
    root = root or repo_root()
    pin = load_pin(root)
    vdir = vendor_dir(root)
    synced = gitutil.is_repo(vdir) and gitutil.rev(vdir, pin.commit) is not None
    return {
        "pin": pin.commit,
        "llama_cpp_python": pin.lcp_version,
        "sdist_sha256": pin.sdist_sha256,
        "synced": synced,
        "head": gitutil.rev(vdir, "HEAD") if synced else None,
    }


def require_synced(root: Path | None = None) -> Path:
    root = root or repo_root()
    pin = load_pin(root)
    vdir = vendor_dir(root)
    if not (gitutil.is_repo(vdir) and gitutil.rev(vdir, pin.commit)):
        raise FlashflexError(f"{SUBMODULE_PATH} is not synced to the pin", "run: flashflex vendor sync")
    _mark_base(vdir, pin.commit)
    return vdir
