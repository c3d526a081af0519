"""Wires every command group into one typer app and maps errors to one actionable line.

Each command module exposes `register(app)`; add new groups to COMMAND_MODULES.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from orchestrator.errors import FlashflexError

COMMAND_MODULES = [
    "orchestrator.cli.vendor_cmd",
    "orchestrator.cli.patches_cmd",
    "orchestrator.cli.build_cmd",
    "orchestrator.cli.doctor_cmd",
    "orchestrator.cli.run_cmd",
    "orchestrator.cli.serve_cmd",
    "orchestrator.cli.chat_cmd",
    "orchestrator.cli.bench_cmd",
    "orchestrator.cli.gguf_cmd",
    "orchestrator.cli.plan_cmd",
    "orchestrator.cli.sidecar_cmd",
    "orchestrator.cli.trace_cmd",
]

app = typer.Typer(
    name="flashflex",
    help="Run LLMs that do not fit in RAM: dense streaming under a budget and MoE expert slot banks, "
    "through a patched llama.cpp.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main() -> None:
    # Standalone mode lets typer report usage errors itself (exit 2); our own errors come through here.
    try:
        app()
    except FlashflexError as exc:
        if os.environ.get("FLASHFLEX_DEBUG"):
            raise
        report = getattr(exc, "report", None)
        if report:
            print(report, file=sys.stderr)
        print(f"error: {exc.one_line()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # anything unexpected: still one line unless debugging
        if os.environ.get("FLASHFLEX_DEBUG"):
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} — rerun with FLASHFLEX_DEBUG=1 for a traceback "
              "and report it", file=sys.stderr)
        sys.exit(1)
