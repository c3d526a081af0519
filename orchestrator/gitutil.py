"""Thin wrapper over the git command line, with errors turned into FlashflexError."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from orchestrator.errors import FlashflexError

# Our commits in the vendor tree get a fixed identity, and signing is off, so `git am` works on any machine.
_IDENTITY = [
    "-c", "user.name=flashflex",
    "-c", "user.email=flashflex@localhost",
    "-c", "commit.gpgsign=false",
    "-c", "core.autocrlf=false",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["GIT_TERMINAL_PROMPT"] = "0"  # never hang on a credential prompt
    env.setdefault("LC_ALL", "C")  # parseable messages
    return env


def require_git() -> None:
    if shutil.which("git") is None:
        raise FlashflexError("git is not installed", "install git (e.g. apt-get install git) and retry")


def run(repo: Path | None, *args: str, check: bool = True, timeout: float | None = None,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `git -C repo args...` and capture text output."""
    require_git()
    cmd = ["git"]
    if repo is not None:
        cmd += ["-C", str(repo)]
    cmd += _IDENTITY + list(args)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, input=input)
    except subprocess.TimeoutExpired as exc:
        raise FlashflexError(f"git {' '.join(args[:2])} timed out after {timeout:.0f}s",
                             "check the network or use the offline path") from exc
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        first = msg[-1] if msg else f"exit {proc.returncode}"
        raise GitError(f"git {' '.join(args)} failed: {first}", proc)
    return proc


def out(repo: Path | None, *args: str) -> str:
    return run(repo, *args).stdout.strip()


def is_repo(path: Path) -> bool:
    if not (path / ".git").exists():
        return False
    proc = run(path, "rev-parse", "--git-dir", check=False)
    return proc.returncode == 0


def rev(repo: Path, ref: str) -> str | None:
    proc = run(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


class GitError(FlashflexError):
    def __init__(self, problem: str, proc: subprocess.CompletedProcess[str]):
        super().__init__(problem)
        self.proc = proc
