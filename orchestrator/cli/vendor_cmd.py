"""`flashflex vendor sync|status`."""

from __future__ import annotations

import typer

from orchestrator import vendor
from orchestrator.cli.common import JsonOpt, console, emit_json, err_console


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="The pinned upstream llama.cpp (vendor/llama.cpp).", no_args_is_help=True)
    app.add_typer(group, name="vendor")

    @group.command("sync")
    def sync_cmd(
        offline: bool = typer.Option(False, "--offline", help="Skip git's network path; use the pinned sdist."),
        json_out: JsonOpt = False,
    ) -> None:
        """Make vendor/llama.cpp a git working tree at the pin (submodule, else the pinned sdist). Idempotent."""
        log = err_console.print if json_out else console.print
        result = vendor.sync(allow_network_git=not offline, log=log)
        if json_out:
            emit_json({"commit": result.commit, "source": result.source, "path": str(result.path)})
        elif result.source == "already":
            console.print(f"vendor/llama.cpp already at the pin {result.commit[:12]} (nothing to do)")

    @group.command("status")
    def status_cmd(json_out: JsonOpt = False) -> None:
        """Show the pin and whether vendor/llama.cpp is synced."""
        st = vendor.status()
        if json_out:
            emit_json(st)
            return
        for key, value in st.items():
            console.print(f"{key:18} {value}")
