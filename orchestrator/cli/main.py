"""Wires every command group into one typer app and maps errors to one actionable line.

Each command module exposes `register(app)`; add new groups to COMMAND_MODULES.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from typing import Protocol, cast

import typer

from orchestrator.errors import FlashflexError, printable

COMMAND_MODULES = [
    "orchestrator.cli.vendor_cmd",
    "orchestrator.cli.patches_cmd",
    "orchestrator.cli.build_cmd",
    "orchestrator.cli.doctor_cmd",
    "orchestrator.cli.run_cmd",
    "orchestrator.cli.serve_cmd",
    "orchestrator.cli.exec_cmd",
    "orchestrator.cli.chat_cmd",
    "orchestrator.cli.bench_cmd",
    "orchestrator.cli.gguf_cmd",
    "orchestrator.cli.plan_cmd",
    "orchestrator.cli.sidecar_cmd",
    "orchestrator.cli.trace_cmd",
    "orchestrator.cli.rpc_cmd",
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


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so every writer's cleanup (temp files, traces) runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_terminate(signum, _frame) -> None:
    raise Terminated(signum)


def _usage_line(exc) -> str:
    """A click usage/parameter error as one line: what is wrong and where to look."""
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "flashflex"
    message = " ".join(exc.format_message().split())
    return f"error: {message} — see {command} --help"


class _ClickError(Protocol):
    """What main uses of a ClickException (from either copy of click)."""

    exit_code: int

    def show(self) -> None: ...


def _click_exception() -> type[Exception]:
    """The base of click's usage errors, from typer's vendored click (typer >= 0.2x) or the click package."""
    try:
        from typer._click.exceptions import ClickException  # type: ignore[import-not-found, unused-ignore]
    except ImportError:  # typer without a vendored click
        # the same class in the click package (mypy sees two distinct classes)
        from click import ClickException  # type: ignore[assignment, unused-ignore]
    return ClickException


def main() -> None:
    click_exception = _click_exception()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_terminate)
    try:
        rc = app(standalone_mode=False)  # click errors come back here and become one line
        if rc == 130:  # typer turns Ctrl-C into a silent exit code 130
            print("error: interrupted", file=sys.stderr)
        sys.exit(rc if isinstance(rc, int) else 0)
    except typer.Exit as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # typer turns Ctrl-C into a silent Exit(130)
            print("error: interrupted", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click_exception as exc:  # usage and parameter errors (range, type, unknown option)
        if type(exc).__name__ == "NoArgsIsHelpError":  # `flashflex` or `flashflex gguf` alone: the help
            cast(_ClickError, exc).show()
            sys.exit(0)
        print(_usage_line(exc), file=sys.stderr)
        sys.exit(cast(_ClickError, exc).exit_code)
    except FlashflexError as exc:
        if os.environ.get("FLASHFLEX_DEBUG"):
            raise
        report = getattr(exc, "report", None)
        if report:
            print(report, file=sys.stderr)
        print(f"error: {exc.one_line()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated as exc:
        print(f"error: stopped by {signal.Signals(exc.signum).name}", file=sys.stderr)
        sys.exit(128 + exc.signum)
    except MemoryError as exc:  # not a bug to report: this process met a memory limit
        if os.environ.get("FLASHFLEX_DEBUG"):
            raise
        detail = f" ({printable(str(exc), 200)})" if str(exc) else ""
        print(f"error: out of memory{detail} — give a smaller --ctx or --budget, or free memory (a memory limit such "
              "as a cgroup or ulimit -v must hold the plan's budget and the process itself)", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:  # anything unexpected: still one line unless debugging
        if os.environ.get("FLASHFLEX_DEBUG"):
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} — rerun with FLASHFLEX_DEBUG=1 for a traceback "
              "and report it", file=sys.stderr)
        sys.exit(1)
