"""`flashflex patches apply|export|check|status|try-release`."""

from __future__ import annotations

import typer

from orchestrator import patches
from orchestrator.cli.common import JsonOpt, console, emit_json, err_console


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Our llama.cpp patch series (patches/llama.cpp).", no_args_is_help=True)
    app.add_typer(group, name="patches")

    @group.command("apply")
    def apply_cmd(
        force: bool = typer.Option(False, "--force",
                                   help="Discard vendor/llama.cpp commits/changes not in the series."),
        json_out: JsonOpt = False,
    ) -> None:
        """Apply the series onto the pinned base with `git am -3`, one commit per patch. Idempotent."""
        log = err_console.print if json_out else console.print
        result = patches.apply(force=force, log=log)
        if json_out:
            emit_json({"applied": result.applied, "already": result.already, "head": result.head})
        elif result.already:
            console.print(f"series already applied ({len(result.applied)} patch(es), HEAD {result.head[:12]})")

    @group.command("export")
    def export_cmd(json_out: JsonOpt = False) -> None:
        """Regenerate patches/llama.cpp from the vendor tree's commits above the base (deterministic)."""
        log = err_console.print if json_out else console.print
        names = patches.export(log=log)
        if json_out:
            emit_json({"series": names, "series_hash": patches.series_hash()})

    @group.command("check")
    def check_cmd(json_out: JsonOpt = False) -> None:
        """Round-trip proof: apply + export in a scratch tree leaves patches/ byte-identical."""
        result = patches.check()
        if json_out:
            emit_json({"ok": result.ok, "differences": result.differences})
        elif result.ok:
            console.print("patch series round-trips: apply + export leaves no diff")
        for d in result.differences:
            err_console.print(f"  {d}")
        if not result.ok:
            err_console.print("error: patches check failed (see above) — for a round-trip difference run "
                              "flashflex patches apply --force && flashflex patches export, review git diff "
                              "patches/, and commit")
            raise typer.Exit(1)

    @group.command("status")
    def status_cmd(json_out: JsonOpt = False) -> None:
        """Show the series, its hash, and which patches the vendor tree carries."""
        st = patches.status()
        if json_out:
            emit_json(st)
            return
        console.print(f"series hash  {st['series_hash'][:16]}")
        console.print(f"state        {st['state']}")
        for p in st.get("patches", [{"name": n, "applied": None} for n in st["series"]]):
            mark = {True: "[green]applied[/]", False: "[yellow]missing[/]", None: "-"}[p["applied"]]
            console.print(f"  {mark:24} {p['name']}")

    @group.command("try-release")
    def try_release_cmd(
        version: str = typer.Argument(...,
                                      help="llama-cpp-python release whose vendored llama.cpp to try, e.g. 0.3.35"),
        compile_tree: bool = typer.Option(True, "--compile/--no-compile",
                                          help="Also compile the llama target with our owned sources (minutes)."),
        json_out: JsonOpt = False,
    ) -> None:
        """Rebase rehearsal: does the series apply onto the llama.cpp another llama-cpp-python release vendors,
        and does the result compile with our owned sources (patches/llama.cpp/overlay)?"""
        log = err_console.print if json_out else console.print
        trial = patches.try_onto_release(version, log=log, compile=compile_tree)
        if json_out:
            emit_json(trial.__dict__)
        else:
            console.print(f"llama-cpp-python {trial.lcp_version} → llama.cpp {trial.commit[:12]}: "
                          + ("series APPLIES" if trial.applies else "series does NOT apply"))
            console.print(trial.report)
        if not trial.applies or trial.compiled is False:
            raise typer.Exit(1)
