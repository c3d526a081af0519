"""`flashflex doctor`."""

from __future__ import annotations

from typing import Any, Optional

import typer

from orchestrator import build, doctor
from orchestrator.cli.common import JsonOpt, console, emit_json, err_console


def _human(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _device_line(d: dict[str, Any]) -> str:
    mem = (f"{_human(int(d['free']))} free of {_human(int(d['total']))}" if d.get("total") else "memory unknown")
    if d.get("type") in ("gpu", "igpu") and d.get("backend") != "RPC" and d.get("total"):
        from orchestrator.rpc import device_budget

        mem += f" (plans use {_human(device_budget(int(d['free']), None))} unless --gpu-budget says)"
    return f"#{d.get('index')} {d.get('backend')} {d.get('type')} {d.get('name')} ({d.get('description')}): {mem}"


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor_cmd(
        backend: Optional[build.Backend] = typer.Option(None, "--backend",
                                                        help="Fail unless the installed library is built for this "
                                                             "backend."),
        json_out: JsonOpt = False,
    ) -> None:
        """Check the install: pin, series hash, whether llama_cpp carries our patches, backend, CPU, RAM, disk.

        Exits non-zero when the installed llama_cpp is stock, stale or missing.
        """
        rep = doctor.diagnose(backend=backend.value if backend else None)
        if json_out:
            emit_json({"ok": rep.ok, **rep.facts, "problems": rep.problems, "warnings": rep.warnings})
        else:
            f = rep.facts
            rows = [
                ("pin", f.get("pin", "?")),
                ("llama-cpp-python", f"{f.get('llama_cpp_version', 'not installed')} "
                                     f"(pin {f.get('llama_cpp_python_pin', '?')})"),
                ("library", f.get("llama_cpp_path", "-")),
                ("patched", {True: "yes", None: "unknown (not loaded)"}.get(f.get("patched"), "NO (stock or missing)")),
                ("series hash", f"{str(f.get('series_hash', '?'))[:16]} (library: "
                                f"{str(f.get('library_series_hash', '-'))[:16]})"),
                ("features", ", ".join(f.get("features", [])) or "-"),
                ("backends", ", ".join(f.get("backends", [])) or "-"),
                ("build backend", f.get("build_backend") or "-"),
                ("built for", f.get("build_instruction_set") or "-"),
                ("this CPU", f.get("host_instruction_set", "-")),
                ("cpu", f.get("cpu_features", "-")),
                ("cores", str(f.get("cpu_count"))),
                ("RAM", f"{_human(f['ram_available'])} available of {_human(f['ram_total'])}"),
                ("disk free", f"{_human(f['disk_free'])} at {f['cache_dir']}"),
            ]
            devices = f.get("devices")
            if devices is not None:
                rows.append(("devices", str(len(devices)) if devices else "none"))
                rows += [("", _device_line(d)) for d in devices]
            for k, v in rows:
                console.print(f"{k:18} {v}", soft_wrap=True, markup=False)
            for w in rep.warnings:
                err_console.print(f"warning: {w}", soft_wrap=True, markup=False)
            for p in rep.problems:
                err_console.print(f"error: {p}", soft_wrap=True, markup=False)
        if not rep.ok:
            raise typer.Exit(1)
