"""`flashflex build`."""

from __future__ import annotations

from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator import build
from orchestrator.cli.common import JsonOpt, console, emit_json, err_console


def register(app: typer.Typer) -> None:
    @app.command("build")
    def build_cmd(
        backend: build.Backend = typer.Option(build.Backend.default(), "--backend",
                                              help="ggml backend to build (default: metal on Apple, cpu elsewhere)."),
        stock: bool = typer.Option(False, "--stock",
                                   help="Build the unpatched pin (baseline), in its own cache entry."),
        cmake_arg: Optional[list[str]] = typer.Option(None, "--cmake-arg", help="Extra CMake -D flag (repeatable)."),
        no_install: bool = typer.Option(False, "--no-install", help="Only build and cache the wheel."),
        force: bool = typer.Option(False, "--force", help="Rebuild even if a cached wheel exists."),
        amx: bool = typer.Option(False, "--amx", help="Also compile ggml's AMX matmul path (x86 hosts with AMX). "
                                 "Off by default: it segfaults at this pin (upstream llama.cpp issue 20824)."),
        json_out: JsonOpt = False,
    ) -> None:
        """Build llama-cpp-python with the patched llama.cpp (cached by pin, series, backend, flags and this CPU's
        instruction set) and install it. On x86-64 it compiles for every extension this CPU has except AMX."""
        out = err_console if json_out else console
        with Progress(TextColumn("compiling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=out, transient=True) as bar:
            task = bar.add_task("compile", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            result = build.build(backend=backend, stock=stock, extra_cmake_args=cmake_arg or [],
                                 install=not no_install, force=force, log=out.print, progress=progress,
                                 amx=amx)
        summary = {
            "key": result.key, "wheel": str(result.wheel), "cached": result.cached,
            "seconds": round(result.seconds, 1), "installed": result.installed, "stock": result.stock,
            "series_hash": result.series_hash, "backend": result.backend.value,
            "instruction_set": result.instruction_set.to_json(),
        }
        if json_out:
            emit_json(summary)
        else:
            how = "cached wheel" if result.cached else "fresh build"
            console.print(f"{'stock' if stock else 'patched'} llama-cpp-python ready ({how}, "
                          f"{result.seconds:.0f}s, {result.backend.value}, {result.instruction_set.summary()}): "
                          f"{result.wheel}")
