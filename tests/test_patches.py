"""The patch-series workflow: round trip, idempotent apply, conflict reports, rebase rehearsal."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import gitutil, patches, vendor
from orchestrator.errors import FlashflexError

from conftest import REPO, flashflex


@pytest.fixture
def sandbox(tmp_path, synced_vendor) -> Path:
    """A throwaway flashflex root: copies of PIN.json and patches/, and a cheap clone of the vendor repo."""
    root = tmp_path / "repo"
    (root / "vendor").mkdir(parents=True)
    shutil.copy(REPO / "vendor" / "PIN.json", root / "vendor" / "PIN.json")
    shutil.copytree(REPO / "patches", root / "patches")
    pin = vendor.load_pin(root)
    clone = root / "vendor" / "llama.cpp"
    subprocess.run(["git", "clone", "-q", "--shared", "--no-checkout", str(synced_vendor), str(clone)], check=True)
    gitutil.run(clone, "checkout", "-q", "--detach", pin.commit)
    gitutil.run(clone, "update-ref", vendor.BASE_REF, pin.commit)
    return root


def _bump_pin(root: Path, commit: str) -> None:
    pin_file = root / "vendor" / "PIN.json"
    data = json.loads(pin_file.read_text())
    data["llama_cpp"]["commit"] = commit
    pin_file.write_text(json.dumps(data))


def test_series_holds_only_call_sites_in_upstream_files(synced_vendor):
    """Owned C/C++ lives in patches/llama.cpp/overlay/; the series only touches files the pin already has, and
    stays small (DESIGN: at most 300 changed lines in upstream files)."""
    assert patches.series_new_files(REPO) == []
    pin = vendor.load_pin(REPO).commit
    changed = 0
    for name in patches.read_series(REPO):
        text = (patches.patches_dir(REPO) / name).read_text()
        for path in re.findall(r"^diff --git a/(\S+) ", text, re.M):
            assert gitutil.run(synced_vendor, "cat-file", "-e", f"{pin}:{path}", check=False).returncode == 0, path
        changed += sum(1 for ln in text.splitlines() if ln[:1] in "+-" and not ln.startswith(("+++", "---")))
    assert 0 < changed <= 300
    owned = patches.overlay_files(REPO)
    assert Path("include/llama-flashflex.h") in owned and Path("src/flashflex.cmake") in owned


def test_every_patch_says_why_and_its_upstream_status():
    """patches/README.md: a patch's commit message says why it exists and its upstream status (DEP-3 style
    trailers), so a rebase knows what to keep, drop or forward."""
    names = patches.read_series(REPO)
    assert len(names) >= 4
    for name in names:
        text = (patches.patches_dir(REPO) / name).read_text()
        message = text.split("\ndiff --git ", 1)[0]
        assert re.search(r"^Why: \S", message, re.M), f"{name}: no 'Why:' paragraph in its commit message"
        status = re.search(r"^Upstream-Status: (.+)$", message, re.M)
        assert status, f"{name}: no 'Upstream-Status:' trailer in its commit message"
        assert status.group(1).startswith(("deliberately ours", "submitted", "backport")), status.group(1)


def test_owned_sources_follow_the_pinned_clang_format(synced_vendor):
    """Our C++ reads like the tree it is compiled into: formatted with the pinned llama.cpp's .clang-format
    (fix: make format-cpp)."""
    exe = shutil.which("clang-format", path=str(Path(sys.executable).parent)) or shutil.which("clang-format")
    if exe is None:
        pytest.skip("clang-format is not installed (pip install -e '.[test]')")
    sources = [patches.overlay_dir(REPO) / p for p in patches.overlay_files(REPO) if p.suffix in (".cpp", ".h")]
    assert len(sources) >= 10
    style = f"--style=file:{synced_vendor / '.clang-format'}"
    out = subprocess.run([exe, style, "--dry-run", "--Werror", *map(str, sources)], capture_output=True, text=True)
    assert out.returncode == 0, f"not in llama.cpp's style (run make format-cpp):\n{out.stderr[:3000]}"


def test_series_hash_covers_the_owned_sources(sandbox):
    before = patches.series_hash(sandbox)
    source = patches.overlay_dir(sandbox) / "src" / "llama-flashflex.cpp"
    source.write_text(source.read_text() + "\n// an edit\n")
    assert patches.series_hash(sandbox) != before


def test_export_keeps_the_overlay_and_refuses_new_files(sandbox):
    patches.apply(sandbox, log=lambda m: None)
    patches.export(sandbox, log=lambda m: None)
    assert patches.overlay_files(sandbox) == patches.overlay_files(REPO)
    clone = sandbox / "vendor" / "llama.cpp"
    (clone / "src" / "llama-flashflex-new.cpp").write_text("// new\n")
    gitutil.run(clone, "add", "src/llama-flashflex-new.cpp")
    gitutil.run(clone, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "flashflex: a new file")
    with pytest.raises(FlashflexError, match="add files .*llama-flashflex-new.cpp.*overlay"):
        patches.export(sandbox, log=lambda m: None)
    assert patches.overlay_files(sandbox) == patches.overlay_files(REPO)  # nothing half-exported


def test_check_round_trips_the_committed_series():
    result = flashflex("patches", "check")
    assert result.returncode == 0, result.stderr
    assert "no diff" in result.stdout


def test_apply_makes_one_commit_per_patch_and_is_idempotent(sandbox):
    names = patches.read_series(sandbox)
    first = patches.apply(sandbox, log=lambda m: None)
    repo = sandbox / "vendor" / "llama.cpp"
    assert not first.already
    assert len(patches.commits_above_base(repo)) == len(names)
    second = patches.apply(sandbox, log=lambda m: None)
    assert second.already and second.head == first.head
    # Same inputs, same commit ids: apply is reproducible.
    third = patches.apply(sandbox, force=True, log=lambda m: None)
    assert third.head == first.head or third.already


def test_export_after_apply_reproduces_the_files(sandbox):
    before = {p.name: p.read_bytes() for p in patches.patches_dir(sandbox).iterdir() if p.is_file()}
    patches.apply(sandbox, log=lambda m: None)
    patches.export(sandbox, log=lambda m: None)
    after = {p.name: p.read_bytes() for p in patches.patches_dir(sandbox).iterdir() if p.is_file()}
    assert after == before
    assert patches.check(sandbox).ok


def test_export_picks_up_a_new_commit_and_series_hash_changes(sandbox):
    patches.apply(sandbox, log=lambda m: None)
    repo = sandbox / "vendor" / "llama.cpp"
    old_hash = patches.series_hash(sandbox)
    source = repo / "src" / "llama-context.cpp"
    source.write_text(source.read_text() + "// flashflex: a note\n")  # a call-site change in an upstream file
    gitutil.run(repo, "commit", "-q", "-a", "-m", "flashflex: add a note\n\nWhy: test.\n\nUpstream-Status: ours")
    names = patches.export(sandbox, log=lambda m: None)
    assert names[-1] == "flashflex-add-a-note.patch"
    assert patches.read_series(sandbox) == names
    assert patches.series_hash(sandbox) != old_hash
    assert patches.status(sandbox)["state"] == "applied"


def test_diverged_tree_is_not_overwritten_without_force(sandbox):
    patches.apply(sandbox, log=lambda m: None)
    repo = sandbox / "vendor" / "llama.cpp"
    (repo / "README.md").write_text("local edit\n")
    gitutil.run(repo, "commit", "-q", "-am", "local edit")
    with pytest.raises(FlashflexError, match="differ from patches"):
        patches.apply(sandbox, log=lambda m: None)
    assert patches.apply(sandbox, force=True, log=lambda m: None).applied


def test_conflicting_patch_is_reported_with_files_hunks_and_commands(sandbox):
    repo = sandbox / "vendor" / "llama.cpp"
    patches.apply(sandbox, log=lambda m: None)
    # Write a patch against README.md, then make the base disagree with it.
    gitutil.run(repo, "checkout", "-q", "--detach", vendor.BASE_REF)
    readme = (repo / "README.md").read_text().splitlines(keepends=True)
    readme[0] = "# a line our patch changes\n"
    (repo / "README.md").write_text("".join(readme))
    gitutil.run(repo, "commit", "-q", "-am", "flashflex: change the readme title")
    patch_text = gitutil.out(repo, "format-patch", "--stdout", "-1", "HEAD") + "\n"
    sdir = patches.patches_dir(sandbox)
    (sdir / "flashflex-change-the-readme-title.patch").write_text(patch_text)
    with open(sdir / "series", "a") as fh:
        fh.write("flashflex-change-the-readme-title.patch\n")
    # A different base edit to the same line forces a real 3-way conflict.
    gitutil.run(repo, "checkout", "-q", "--detach", vendor.BASE_REF)
    readme[0] = "# upstream moved on\n"
    (repo / "README.md").write_text("".join(readme))
    gitutil.run(repo, "commit", "-q", "-am", "upstream change")
    _bump_pin(sandbox, gitutil.out(repo, "rev-parse", "HEAD"))
    with pytest.raises(patches.PatchConflict) as info:
        patches.apply(sandbox, force=True, log=lambda m: None)
    report = info.value.report
    assert "flashflex-change-the-readme-title.patch" in report
    assert "CONFLICT" in report and "README.md" in report and "@@ -1" in report
    assert "git am --continue" in report and "flashflex patches export" in report
    assert "am --abort" in report


def test_status_reports_applied_patches(sandbox):
    assert patches.status(sandbox)["state"] == "not applied"
    patches.apply(sandbox, log=lambda m: None)
    st = patches.status(sandbox)
    assert st["state"] == "applied"
    assert all(p["applied"] for p in st["patches"])


@pytest.mark.network
@pytest.mark.slow
def test_rebase_rehearsal_against_another_release_reports_cleanly(synced_vendor):
    """The rehearsal runs for real against the llama.cpp commit llama-cpp-python 0.3.30 vendors (fetched from
    PyPI): either the whole series applies, or the report names the patch, its conflicting files and hunks,
    and the commands to resolve — never a traceback or a half-applied tree."""
    trial = patches.try_onto_release("0.3.30", REPO, log=lambda m: None, compile=False)  # compiling: minutes
    assert trial.commit != vendor.load_pin(REPO).commit
    names = patches.read_series(REPO)
    if trial.applies:
        assert f"all {len(names)} patch(es) apply" in trial.report
    else:
        assert any(f"'{n}'" in trial.report for n in names)
        assert "CONFLICT" in trial.report and "@@" in trial.report and "git am --continue" in trial.report
    # The rehearsal leaves the vendor tree as it was.
    assert patches.status(REPO)["state"].startswith("applied")
