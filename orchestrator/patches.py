"""Our llama.cpp changes as a patch series (Electron-style `patches/`), applied onto the pinned base.

patches/llama.cpp/series lists the patch files in order (no number prefixes: inserting a patch does not
rename the others). Each file is `git format-patch` output whose message says why it exists and its
upstream status. The vendor tree's commits above refs/flashflex/base are the editable form of the series:
`apply` turns files into commits, `export` turns commits back into files, `check` proves the round trip.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from orchestrator import gitutil, vendor
from orchestrator.errors import FlashflexError
from orchestrator.paths import repo_root

Log = Callable[[str], None]

# Flags that make `git format-patch` output depend only on the commits' content:
FORMAT_PATCH_FLAGS = [
    "--zero-commit",  # "From 000…" instead of the commit id, which changes on every rebase
    "--full-index",  # full blob ids in `index` lines: stable, and what `git am -3` needs to merge
    "--no-signature",  # no trailing git version, which differs between machines
    "--no-numbered",  # "[PATCH]" not "[PATCH n/m]": adding a patch does not touch the others
    "--no-stat",  # the diffstat's widths depend on the terminal/config; the diff says it all
    "--no-renames",  # the same diff whatever rename detection the local git defaults to
    "--encoding=UTF-8",
]
# Configuration that would otherwise leak a user's settings into exported files.
FORMAT_PATCH_CONFIG = [
    "-c", "diff.noprefix=false",
    "-c", "diff.mnemonicPrefix=false",
    "-c", "diff.algorithm=myers",
    "-c", "diff.relative=false",
    "-c", "format.headers=",
    "-c", "format.signOff=false",
    "-c", "format.coverLetter=false",
    "-c", "core.abbrev=12",
]
AM_FLAGS = ["am", "-3", "--keep-cr", "--committer-date-is-author-date", "--quiet"]


def patches_dir(root: Path | None = None) -> Path:
    return (root or repo_root()) / "patches" / "llama.cpp"


def read_series(root: Path | None = None) -> list[str]:
    sdir = patches_dir(root)
    series = sdir / "series"
    if not series.exists():
        raise FlashflexError(f"{series} is missing", "restore it with git checkout patches/")
    names = [ln.strip() for ln in series.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    missing = [n for n in names if not (sdir / n).exists()]
    if missing:
        raise FlashflexError(f"series lists {', '.join(missing)} but the file is missing in {sdir}",
                             "restore it from git or remove it from the series")
    return names


def overlay_dir(root: Path | None = None) -> Path:
    """Our own C/C++ sources, laid out as in the llama.cpp tree (include/, src/); `flashflex build` copies them
    into the patched tree. The series holds only the call sites and build wiring in upstream files."""
    return patches_dir(root) / "overlay"


def overlay_files(root: Path | None = None) -> list[Path]:
    """Every owned source file, relative to the overlay, sorted (what the series hash covers)."""
    odir = overlay_dir(root)
    if not odir.is_dir():
        raise FlashflexError(f"{odir} is missing", "restore it with git checkout patches/")
    return sorted(p.relative_to(odir) for p in odir.rglob("*") if p.is_file())


def install_overlay(tree: Path, root: Path | None = None) -> list[Path]:
    """Copy the owned sources into a llama.cpp tree (a build's source, a rehearsal's scratch tree)."""
    odir = overlay_dir(root)
    files = overlay_files(root)
    for rel in files:
        dest = tree / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(odir / rel, dest)
    return files


def series_hash(root: Path | None = None) -> str:
    """sha256 over the series file, every patch in order and every owned source file: identifies the source a
    build carries."""
    sdir = patches_dir(root)
    h = hashlib.sha256()
    h.update((sdir / "series").read_bytes())
    for name in read_series(root):
        h.update(b"\0" + name.encode() + b"\0")
        h.update((sdir / name).read_bytes())
    odir = overlay_dir(root)
    for rel in overlay_files(root):
        h.update(b"\0overlay/" + rel.as_posix().encode() + b"\0")
        h.update((odir / rel).read_bytes())
    return h.hexdigest()


def _patch_id(repo: Path, diff_text: str) -> str:
    out = gitutil.run(repo, "patch-id", "--stable", input=diff_text).stdout.split()
    return out[0] if out else ""


def series_patch_ids(repo: Path, root: Path | None = None) -> list[str]:
    sdir = patches_dir(root)
    return [_patch_id(repo, (sdir / n).read_text(encoding="utf-8", errors="surrogateescape"))
            for n in read_series(root)]


def commits_above_base(repo: Path, head: str = "HEAD") -> list[str]:
    out = gitutil.out(repo, "rev-list", "--reverse", f"{vendor.BASE_REF}..{head}")
    return out.split() if out else []


def commit_patch_ids(repo: Path, head: str = "HEAD") -> list[str]:
    return [_patch_id(repo, gitutil.out(repo, "show", "--no-renames", "--format=", c) + "\n")
            for c in commits_above_base(repo, head)]


def _am_in_progress(repo: Path) -> bool:
    gitdir = Path(gitutil.out(repo, "rev-parse", "--absolute-git-dir"))
    return (gitdir / "rebase-apply").exists()


def _is_dirty(repo: Path) -> bool:
    return bool(gitutil.out(repo, "status", "--porcelain", "--untracked-files=no"))


class PatchConflict(FlashflexError):
    """A patch of the series did not apply; carries a report with files, hunks and next steps."""

    def __init__(self, name: str, report: str):
        super().__init__(f"patch {name} does not apply to the vendor tree",
                         "resolve it as shown above, then run flashflex patches export")
        self.name = name
        self.report = report


def _hunks_by_file(patch_text: str) -> dict[str, list[str]]:
    files: dict[str, list[str]] = {}
    current = None
    for line in patch_text.splitlines():
        m = re.match(r"^diff --git a/(\S+) b/(\S+)", line)
        if m:
            current = m.group(2)
            files[current] = []
        elif line.startswith("@@") and current is not None:
            files[current].append(line.split("@@")[1].strip())
    return files


def _conflict_report(repo: Path, names: list[str], sdir: Path, workdir_hint: str) -> PatchConflict:
    gitdir = Path(gitutil.out(repo, "rev-parse", "--absolute-git-dir"))
    nxt = (gitdir / "rebase-apply" / "next").read_text().strip() if (gitdir / "rebase-apply" / "next").exists() else "1"
    name = names[int(nxt) - 1] if 0 < int(nxt) <= len(names) else names[0]
    unmerged = gitutil.out(repo, "diff", "--name-only", "--diff-filter=U").split()
    hunks = _hunks_by_file((sdir / name).read_text(encoding="utf-8", errors="surrogateescape"))
    failing = unmerged or list(hunks)
    lines = [f"patch {nxt}/{len(names)} '{name}' failed to apply (3-way merge).", "files and hunks:"]
    for f in failing:
        state = "CONFLICT" if f in unmerged else "in patch"
        lines.append(f"  {state:8} {f}: " + ", ".join(f"@@ {h} @@" for h in hunks.get(f, [])))
    lines += [
        "to resolve:",
        f"  cd {workdir_hint}",
        "  # edit the files above and remove the conflict markers, then:",
        "  git add " + " ".join(failing),
        "  git am --continue        # repeat for any later patch that stops",
        "  cd - && flashflex patches export   # write the resolved series back to patches/",
        "to give up instead:",
        f"  git -C {workdir_hint} am --abort",
    ]
    return PatchConflict(name, "\n".join(lines))


def _am(repo: Path, names: list[str], sdir: Path, workdir_hint: str) -> None:
    if not names:
        return
    proc = gitutil.run(repo, *AM_FLAGS, *[str(sdir / n) for n in names], check=False)
    if proc.returncode != 0:
        if _am_in_progress(repo):
            raise _conflict_report(repo, names, sdir, workdir_hint)
        raise FlashflexError(f"git am failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}",
                             "check the patch files in patches/llama.cpp")


@dataclass
class ApplyResult:
    applied: list[str]
    already: bool
    head: str


def apply(root: Path | None = None, force: bool = False, log: Log = print) -> ApplyResult:
    """Apply the series onto the base in vendor/llama.cpp, one commit per patch. Idempotent."""
    root = root or repo_root()
    repo = vendor.require_synced(root)
    names = read_series(root)
    if _am_in_progress(repo):
        raise FlashflexError("a previous `git am` is still in progress in vendor/llama.cpp",
                             "finish it (git -C vendor/llama.cpp am --continue) or abort it (am --abort)")
    if commit_patch_ids(repo) == series_patch_ids(repo, root) and not _is_dirty(repo):
        return ApplyResult(names, True, gitutil.out(repo, "rev-parse", "HEAD"))
    if commits_above_base(repo) or _is_dirty(repo):
        if not force:
            raise FlashflexError(
                "vendor/llama.cpp has commits or changes that differ from patches/llama.cpp/series",
                "run flashflex patches export to keep them, or flashflex patches apply --force to discard them")
        log("discarding vendor/llama.cpp changes (--force)")
    gitutil.run(repo, "checkout", "--quiet", "--force", "-B", "flashflex", vendor.BASE_REF)
    _am(repo, names, patches_dir(root), "vendor/llama.cpp")
    head = gitutil.out(repo, "rev-parse", "HEAD")
    log(f"applied {len(names)} patch(es) onto {gitutil.out(repo, 'rev-parse', '--short=12', vendor.BASE_REF)}")
    return ApplyResult(names, False, head)


def _format_patches(repo: Path, base: str, head: str, out_dir: Path) -> list[str]:
    """Write base..head as patch files named from their subjects (no number prefix); return the names."""
    with tempfile.TemporaryDirectory() as tmp:
        gitutil.run(repo, *FORMAT_PATCH_CONFIG, "format-patch", *FORMAT_PATCH_FLAGS,
                    "-o", tmp, f"{base}..{head}")
        names = []
        for path in sorted(Path(tmp).glob("*.patch")):
            name = re.sub(r"^\d{4}-", "", path.name)
            if name in names:
                raise FlashflexError(f"two commits would export to {name}", "give the commits distinct subjects")
            names.append(name)
            shutil.copyfile(path, out_dir / name)
    (out_dir / "series").write_text(
        "# Patch order for vendor/llama.cpp (flashflex patches apply). See patches/README.md.\n"
        + "".join(n + "\n" for n in names))
    return names


def _new_files(sdir: Path, names: list[str]) -> list[str]:
    """Paths the given patches create (`new file mode`): owned files belong in the overlay instead."""
    added = []
    for name in names:
        text = (sdir / name).read_text(encoding="utf-8", errors="surrogateescape")
        for m in re.finditer(r"^diff --git a/(\S+) b/\S+\nnew file mode", text, re.M):
            added.append(m.group(1))
    return added


def series_new_files(root: Path | None = None) -> list[str]:
    """Files the committed series creates; must be empty (checked by `patches check` and the tests)."""
    return _new_files(patches_dir(root), read_series(root))


def export(root: Path | None = None, log: Log = print) -> list[str]:
    """Regenerate patches/llama.cpp from the commits above the base, deterministically."""
    root = root or repo_root()
    repo = vendor.require_synced(root)
    if _am_in_progress(repo):
        raise FlashflexError("a `git am` is in progress in vendor/llama.cpp",
                             "finish it with git -C vendor/llama.cpp am --continue before exporting")
    if _is_dirty(repo):
        raise FlashflexError("vendor/llama.cpp has uncommitted changes",
                             "commit them (git -C vendor/llama.cpp commit --amend or a new commit) first")
    sdir = patches_dir(root)
    staging = Path(tempfile.mkdtemp(prefix=".llama.cpp.", suffix=".partial", dir=sdir.parent))
    try:
        names = _format_patches(repo, vendor.BASE_REF, "HEAD", staging)
        added = _new_files(staging, names)
        if added:
            raise FlashflexError(f"the commits above the base add files ({', '.join(added)}); the series holds only "
                                 "changes to upstream files",
                                 "move new files to patches/llama.cpp/overlay/ (same path) and drop them from the "
                                 "commits")
        if overlay_dir(root).is_dir():  # the owned sources are not exported from commits: keep them
            shutil.copytree(overlay_dir(root), staging / "overlay")
        old = Path(tempfile.mkdtemp(prefix=".llama.cpp.", suffix=".old", dir=sdir.parent))
        old.rmdir()
        if sdir.exists():
            sdir.rename(old)
        staging.rename(sdir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"exported {len(names)} patch(es) to {sdir}")
    return names


@contextlib.contextmanager
def scratch_tree(onto: str, root: Path | None = None, apply_series: bool = True) -> Iterator[Path]:
    """A throwaway worktree of vendor/llama.cpp at `onto` with the series applied; removed afterwards."""
    root = root or repo_root()
    repo = vendor.require_synced(root)
    tmp = Path(tempfile.mkdtemp(prefix="flashflex-scratch-"))
    wt = tmp / "llama.cpp"
    gitutil.run(repo, "worktree", "add", "--quiet", "--detach", str(wt), onto)
    try:
        if apply_series:
            _am(wt, read_series(root), patches_dir(root), str(wt))
        yield wt
    finally:
        gitutil.run(repo, "worktree", "remove", "--force", str(wt), check=False)
        gitutil.run(repo, "worktree", "prune", check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def _gitlink_problems(root: Path) -> list[str]:
    """The superproject must record the pin itself in the gitlink, never a patched vendor commit (which
    exists only on this machine): `git commit -a` in the superproject would record it."""
    if not gitutil.is_repo(root):
        return []
    pin = vendor.load_pin(root).commit
    fields = gitutil.out(root, "ls-files", "--stage", vendor.SUBMODULE_PATH).split()
    if len(fields) >= 2 and fields[0] == "160000" and fields[1] != pin:
        return [f"the gitlink of {vendor.SUBMODULE_PATH} records {fields[1][:12]}, not the pin {pin[:12]}: run "
                f"git update-index --cacheinfo 160000,{pin},{vendor.SUBMODULE_PATH}"]
    return []


@dataclass
class CheckResult:
    ok: bool
    differences: list[str] = field(default_factory=list)


def check(root: Path | None = None) -> CheckResult:
    """Apply the series in a scratch tree, export it again, and compare byte for byte with patches/."""
    root = root or repo_root()
    sdir = patches_dir(root)
    read_series(root)
    with scratch_tree(vendor.BASE_REF, root) as wt, tempfile.TemporaryDirectory() as out:
        _format_patches(wt, vendor.BASE_REF, "HEAD", Path(out))
        exported = {p.name: p.read_bytes() for p in Path(out).iterdir()}
    current = {p.name: p.read_bytes() for p in sdir.iterdir() if p.is_file()}
    diffs = _gitlink_problems(root)
    for name in sorted(set(exported) | set(current)):
        if name not in current:
            diffs.append(f"{name}: missing from patches/llama.cpp")
        elif name not in exported:
            diffs.append(f"{name}: in patches/llama.cpp but not produced by export (stale file?)")
        elif exported[name] != current[name]:
            diffs.append(f"{name}: differs after apply + export")
    diffs += [f"{path}: created by the series; owned files belong in patches/llama.cpp/overlay/"
              for path in series_new_files(root)]
    overlay_files(root)  # present and non-empty
    return CheckResult(not diffs, diffs)


def status(root: Path | None = None) -> dict:
    root = root or repo_root()
    names = read_series(root)
    out: dict = {"series": names, "series_hash": series_hash(root)}
    vst = vendor.status(root)
    out["vendor_synced"] = vst["synced"]
    if not vst["synced"]:
        out["state"] = "vendor not synced"
        return out
    repo = vendor.vendor_dir(root)
    want = series_patch_ids(repo, root)
    have = commit_patch_ids(repo)
    out["base"] = gitutil.rev(repo, vendor.BASE_REF)
    out["head"] = gitutil.rev(repo, "HEAD")
    out["am_in_progress"] = _am_in_progress(repo)
    out["dirty"] = _is_dirty(repo)
    out["patches"] = [{"name": n, "applied": i < len(have) and have[i] == pid}
                      for i, (n, pid) in enumerate(zip(names, want))]
    out["extra_commits"] = max(0, len(have) - len(want))
    if have == want:
        out["state"] = "applied" + (" (uncommitted changes)" if out["dirty"] else "")
    elif not have:
        out["state"] = "not applied"
    else:
        out["state"] = "diverged (run flashflex patches export to save, or apply --force to reset)"
    return out


@dataclass
class RebaseTrial:
    lcp_version: str
    commit: str
    applies: bool
    report: str
    compiled: bool | None = None  # None: not tried (the series did not apply, or compile=False)


def compile_llama(tree: Path, log: Log = print) -> tuple[bool, str]:
    """Configure and build the `llama` library target of a llama.cpp tree (series and overlay in place):
    (ok, one-line report). Our owned code reads loader internals, so a pin bump can break it while every patch
    still applies."""
    import os
    import subprocess

    build = tree / "build-flashflex-rehearsal"
    logfile = tree.parent / "compile.log"
    jobs = str(os.cpu_count() or 2)
    configure = ["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF",
                 "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DBUILD_SHARED_LIBS=ON"]
    if shutil.which("ccache"):
        configure += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
    log(f"compiling the llama target of the patched tree ({jobs} jobs; minutes on a small machine)")
    with open(logfile, "w") as fh:
        for cmd in (configure, ["cmake", "--build", str(build), "--target", "llama", "-j", jobs]):
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                break
    text = logfile.read_text(errors="replace").splitlines()
    if rc != 0:
        first = next((ln.strip() for ln in text if " error" in ln or ln.startswith("CMake Error")), text[-1:] or [""])
        return False, f"the patched tree does not compile: {str(first)[:300]}"
    return True, "the llama target compiles with our sources"


def try_onto_release(lcp_version: str, root: Path | None = None, log: Log = print,
                     compile: bool = True) -> RebaseTrial:
    """Rebase rehearsal: does the series apply (3-way) onto the llama.cpp another llama-cpp-python release
    vendors, and (compile=True) does the result, with our owned sources, compile?"""
    root = root or repo_root()
    repo = vendor.require_synced(root)
    sdist = vendor.ensure_sdist(lcp_version, None, log)
    commit = vendor.fetch_commit_from_sdist(repo, sdist, log)
    compiled: bool | None = None
    compile_report = ""
    try:
        with scratch_tree(commit, root) as wt:
            if compile:
                install_overlay(wt, root)
                compiled, compile_report = compile_llama(wt, log)
    except PatchConflict as exc:
        return RebaseTrial(lcp_version, commit, False, exc.report)
    report = f"all {len(read_series(root))} patch(es) apply onto {commit[:12]}"
    if compile_report:
        report += f"; {compile_report}"
    return RebaseTrial(lcp_version, commit, True, report, compiled)
