"""`flashflex sidecar extract|inspect|verify`: the page-aligned copy of a MoE model's experts (Flash-MoE)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from orchestrator.cli.common import JsonOpt, console, emit_json
from orchestrator.errors import FlashflexError
from orchestrator.sizes import format_size

_RANGE_RE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_layers(text: str) -> set[int]:
    """`0-3,7` -> {0, 1, 2, 3, 7}."""
    layers: set[int] = set()
    for part in text.split(","):
        match = _RANGE_RE.match(part.strip())
        if not match or (match.group(2) is not None and int(match.group(2)) < int(match.group(1))):
            raise FlashflexError(f"--layers {text!r} is not a list of layers",
                                 "write layer numbers and ranges like --layers 0-3,7")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        layers.update(range(first, last + 1))
    return layers


def parse_families(text: str) -> set[str]:
    """`gate,up` -> {"gate", "up"}; unknown names are refused by extract, which knows the list."""
    return {name.strip().lower() for name in text.split(",") if name.strip()}


def _show_progress(json_out: bool) -> bool:
    return not json_out and sys.stderr.isatty()


class SidecarVerifyFailed(FlashflexError):
    """verify found problems; `report` (one problem a line) is printed above the error line."""

    def __init__(self, n_problems: int, sidecar: Path, report: str | None):
        super().__init__(f"sidecar {sidecar} failed verification ({n_problems} problem"
                         f"{'s' if n_problems != 1 else ''})",
                         "re-extract it with `flashflex sidecar extract MODEL OUT --force`")
        self.report = report


def _print_inspect(summary: dict[str, Any]) -> None:
    model = summary["model"]
    console.print(f"[bold]{escape(summary['sidecar'])}[/bold]  extraction {summary['extraction_id']}")
    console.print(f"model    {escape(', '.join(model['files']))}: {model['architecture']}, {model['n_layer']} layers, "
                  f"{model['n_expert']} experts ({model['n_expert_used']} used), "
                  f"fingerprint {model['fingerprint'][:16]}…")
    console.print(f"sidecar  {summary['n_layers']} layers, {summary['n_tensors']} tensors, "
                  f"{format_size(summary['total_bytes'])}; families {', '.join(summary['families'])}")
    # Per expert: the bytes of one expert across the layer's routed families, and the page-rounded slots the
    # runtime reads for it. Tensor lists and sha256 are in --json.
    table = Table(title="layers", title_justify="left")
    for col in ("layer", "file", "size", "experts", "per expert", "read", "shared"):
        table.add_column(col, justify="left" if col == "file" else "right", no_wrap=True)
    for row in summary["layers"]:
        table.add_row(
            str(row["layer"]), row["file"] if row["present"] else f"[red]{row['file']}[/red]",
            format_size(row["size"]), str(row["n_expert"] or "-"),
            format_size(row["bytes_per_expert"]) if row["bytes_per_expert"] else "-",
            format_size(row["stride_per_expert"]) if row["stride_per_expert"] else "-",
            format_size(row["shared_bytes"]) if row["shared_bytes"] else "-",
        )
    console.print(table)
    missing = [row["file"] for row in summary["layers"] if not row["present"]]
    if missing:
        console.print(f"[red]missing:[/red] {', '.join(missing)} (re-extract the sidecar)")


def register(app: typer.Typer) -> None:
    sidecar_app = typer.Typer(
        help="Flash-MoE expert sidecars: a MoE model's expert weights copied into page-aligned per-layer files "
        "that the slot-bank runtime reads one expert at a time.",
        no_args_is_help=True,
    )
    app.add_typer(sidecar_app, name="sidecar")

    @sidecar_app.command("extract")
    def extract_cmd(
        model_arg: Annotated[Optional[Path], typer.Argument(
            metavar="[MODEL]", help="MoE GGUF model (the first or any shard of a split model); or --model.")] = None,
        out_arg: Annotated[Optional[Path], typer.Argument(
            metavar="[OUT]", help="Directory to create for the sidecar; or --out-dir.")] = None,
        model_opt: Annotated[Optional[Path], typer.Option("--model", "-m", help="The MoE GGUF model.")] = None,
        out_opt: Annotated[Optional[Path], typer.Option("--out-dir", "-o", help="The sidecar directory to create "
                                                        "(default: MODEL.sidecar beside the model).")] = None,
        include_shared: Annotated[bool, typer.Option("--include-shared", help="Also extract the shared experts "
                                                     "(ffn_*_shexp).")] = False,
        layers: Annotated[Optional[str], typer.Option("--layers", "-l", help="Only these layers, e.g. 0-3,7.")]
        = None,
        families: Annotated[Optional[str], typer.Option(
            "--families", help="Only these expert families, e.g. gate,up,down (of gate, up, down, gate_up, "
            "gate_shexp, up_shexp, down_shexp). Default: every routed family the model has.")] = None,
        force: Annotated[bool, typer.Option("--force", "-f", help="Replace OUT if it is an existing sidecar.")]
        = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Copy a MoE model's routed experts (each padded to a 4096-byte slot) into a new sidecar directory:
        manifest.json plus one layer-NNN.bin per layer. Written atomically; an interrupted run leaves nothing."""
        from orchestrator.errors import FlashflexError
        from orchestrator.modelfile.realign import byte_progress
        from orchestrator.sidecar import default_path, extract

        model = model_opt or model_arg
        if model is None:
            raise FlashflexError("no model given", "pass the GGUF: flashflex sidecar extract --model M [--out-dir D]")
        out = out_opt or out_arg or default_path(model)
        started = time.monotonic()
        with byte_progress(f"sidecar {model.name}", enabled=_show_progress(json_out)) as progress:
            manifest = extract(model, out, include_shared=include_shared,
                               layers=parse_layers(layers) if layers is not None else None,
                               families=parse_families(families) if families is not None else None,
                               force=force, progress=progress)
        seconds = time.monotonic() - started
        total = sum(entry.size for entry in manifest.layers)
        if json_out:
            emit_json({
                "path": str(out), "extraction_id": manifest.extraction_id, "families": manifest.families,
                "layers": [entry.layer for entry in manifest.layers], "n_tensors": len(manifest.tensors),
                "bytes": total, "data_bytes": sum(t.n_bytes for t in manifest.tensors),
                "seconds": round(seconds, 3),
            })
            return
        console.print(f"wrote {escape(str(out))}: {len(manifest.layers)} layers, {len(manifest.tensors)} tensors "
                      f"({', '.join(manifest.families)}), {format_size(total)} in {seconds:.1f}s")

    @sidecar_app.command("inspect")
    def inspect_cmd(
        sidecar: Annotated[Path, typer.Argument(help="Sidecar directory.")],
        json_out: JsonOpt = False,
    ) -> None:
        """Show a sidecar's model identity, families and, per layer, its file, tensors and bytes per expert
        (from the manifest; nothing is verified)."""
        from orchestrator.sidecar import inspect

        summary = inspect(sidecar)
        if json_out:
            emit_json(summary)
        else:
            _print_inspect(summary)

    @sidecar_app.command("verify")
    def verify_cmd(
        sidecar: Annotated[Path, typer.Argument(help="Sidecar directory.")],
        model: Annotated[Path, typer.Option("--model", "-m", help="The GGUF model it was extracted from "
                                            "(required: the manifest records only file names).")],
        json_out: JsonOpt = False,
    ) -> None:
        """Check a sidecar against its model completely: identity, every layer file re-hashed, every expert
        slice compared byte for byte with the GGUF. Exits 0 with "ok", else lists the problems and exits 1.
        Intact files whose mtime changed get their recorded mtime back."""
        from orchestrator.modelfile.realign import byte_progress
        from orchestrator.sidecar import verify

        with byte_progress(f"verify {sidecar.name}", enabled=_show_progress(json_out)) as progress:
            report = verify(sidecar, model, progress=progress)
        if json_out:
            emit_json(report.to_dict())
            if not report.ok:
                raise SidecarVerifyFailed(len(report.problems), sidecar, None)
            return
        if not report.ok:
            raise SidecarVerifyFailed(len(report.problems), sidecar,
                                      "\n".join(f"  {p.message}" for p in report.problems))
        restamped = f"; restored the recorded mtime of {', '.join(report.restamped)}" if report.restamped else ""
        console.print(f"ok: {escape(str(sidecar))} matches {escape(model.name)}: {report.layers_checked} layer "
                      f"files, {format_size(report.bytes_checked)} compared in {report.seconds:.1f}s{restamped}")
