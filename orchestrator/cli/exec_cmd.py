"""`flashflex exec TOOL -- ARGS`: plan a model, write its spec file and run one of llama.cpp's own programs under it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from orchestrator.cli.common import emit_json, err_console
from orchestrator.cli.options import DRAFT_FLAGS, model_options_command


def register(app: typer.Typer) -> None:
    @app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    @model_options_command(exclude=DRAFT_FLAGS + ("moe_trace", "moe_trace_force"))
    def exec_cmd(
        tool: str = typer.Argument(..., help="llama-server, llama-cli, llama-completion or llama-perplexity."),
        click_ctx: typer.Context = typer.Option(None),
        config: Optional[Path] = typer.Option(None, "--config", "-C", help="A YAML RunConfig (see configs/). "
                                              "Flags override it."),
        spec_out: Optional[Path] = typer.Option(None, "--spec-out", help="Keep the spec file here (default: a "
                                                "temp file removed when the program exits)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Plan and write the spec, run nothing: print the "
                                     "command line (JSON with --json)."),
        json_out: bool = typer.Option(False, "--json", help="With --dry-run: the command as JSON."),
        *,
        options: dict,
    ) -> None:
        """Run one of llama.cpp's programs, built from the same patched tree, under flashflex's plan: the model is
        planned as `run` plans it (budget, streaming, expert banks, -ngl, RPC workers), the plan is written as a
        spec file and named to the program with --override-kv flashflex.spec=str:PATH, and the program gets the
        planned context, batches, threads and load mode. Arguments after `--` go to the program; those the plan
        sets (-m, -c, -ub, -ngl, --rpc, load mode) are refused with the flashflex option to use instead.
        Exits with the program's status."""
        from orchestrator import api, native, tools
        from orchestrator.run import loader

        user_args = list(click_ctx.args)
        tools.check_user_args(tool, user_args)
        tools.locate(tool)  # before planning: a build without the program says so first
        prepared = api.prepare(config, log=err_console.print, **options)
        for reason in prepared.lossy:
            err_console.print(f"[yellow]LOSSY: {reason}; output differs from stock[/]")
        spec_path = None
        if prepared.spec.native:
            spec_path = loader.write_native_spec(prepared.spec, dest=spec_out)
            native.check_spec(spec_path)
        command = tools.command_for(prepared, tool, spec_path, user_args)
        if dry_run:
            if json_out:
                emit_json({"argv": command, "spec": spec_path, "mode": prepared.spec.mode})
            else:
                err_console.print(" ".join(command), soft_wrap=True, markup=False, highlight=False)
            if spec_path is not None and spec_out is None:
                os.unlink(spec_path)
            return
        err_console.print(f"[dim]{tool}: {prepared.spec.mode}"
                          + (f", spec {spec_path}" if spec_path else "") + "[/]", soft_wrap=True)
        raise typer.Exit(_run(command, spec_path if spec_out is None else None))


def _run(command: list[str], remove_after: str | None) -> int:
    """Run the program in the foreground (signals reach it: it is in our process group), return its status."""
    import signal
    import subprocess

    proc = subprocess.Popen(command)
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # the program got SIGINT too; wait for it to stop
                continue
    except BaseException:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        if remove_after is not None:
            Path(remove_after).unlink(missing_ok=True)
