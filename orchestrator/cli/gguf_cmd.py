"""`flashflex gguf inspect|realign|synth`: look inside model files, page-align them, make test models."""

from __future__ import annotations

import dataclasses
import enum
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import JustifyMethod
from rich.markup import escape
from rich.table import Table

from orchestrator.cli.common import JsonOpt, console, emit_json
from orchestrator.errors import FlashflexError, printable
from orchestrator.fsutil import check_free_space, check_output_path
from orchestrator.modelfile.table import ModelTable, Role

ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite OUT if it exists.")]
AlignmentOpt = Annotated[int, typer.Option("--alignment", "-a", help="Byte boundary for every tensor's data "
                                                                     "(a power of two; 4096 suits O_DIRECT).")]


class QuantChoice(str, enum.Enum):
    q4_0 = "q4_0"
    q8_0 = "q8_0"
    f16 = "f16"


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"


def _compact(n: int) -> str:
    """Short sizes for wide tables: 136K, 1.9M, 3.6G."""
    value = float(n)
    for unit in ("", "K", "M", "G"):
        if value < 1024:
            return f"{value:.0f}{unit}" if value >= 10 or not unit else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}T"


def _show_progress(json_out: bool) -> bool:
    return not json_out and sys.stderr.isatty()


def _refuse_existing(out: Path, force: bool) -> None:
    """Before any work: an output that is a directory, a device or FIFO, or exists without --force."""
    check_output_path(out, force=force)


# --------------------------------------------------------------------------------------------------
# inspect


def inspect_report(table: ModelTable) -> dict[str, Any]:
    """Everything `gguf inspect` shows, as JSON-ready data."""
    by_role: dict[str, int] = defaultdict(int)
    by_layer: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for t in table.tensors:
        by_role[t.role.value] += t.n_bytes
        if t.layer is not None:
            by_layer[t.layer][t.role.value] += t.n_bytes
    alignments = sorted({t.alignment for t in table.tensors})
    return {
        "files": [str(f) for f in table.files],
        "arch": dataclasses.asdict(table.arch),
        "n_tensors": len(table.tensors),
        "total_bytes": table.total_bytes,
        "alignment": alignments[0] if len(alignments) == 1 else alignments,
        "all_page_aligned": all(t.offset % 4096 == 0 for t in table.tensors),
        "bytes_by_role": {r.value: by_role[r.value] for r in Role if by_role.get(r.value)},
        "bytes_by_layer": [
            {"layer": layer, "bytes": sum(roles.values()), "by_role": dict(roles)}
            for layer, roles in sorted(by_layer.items())
        ],
        "tensors": [
            {"name": t.name, "layer": t.layer, "role": t.role.value, "type": t.ggml_type, "shape": list(t.shape),
             "bytes": t.n_bytes, "file": str(t.file), "offset": t.offset, "alignment": t.alignment}
            for t in table.tensors
        ],
        "metadata": table.metadata,
    }


def _shown(text: Any, limit: int = 200) -> str:
    """A string from the model file as the terminal may show it: no control characters or markup, bounded."""
    return escape(printable(str(text), limit))


def _print_inspect(report: dict[str, Any], show_tensors: bool, show_metadata: bool) -> None:
    arch = report["arch"]
    console.print(f"[bold]{_shown(', '.join(Path(f).name for f in report['files']))}[/bold]  "
                  f"{_shown(arch['arch'])}  {report['n_tensors']} tensors  {_human(report['total_bytes'])}  "
                  f"alignment {report['alignment']}"
                  + ("  (page-aligned)" if report["all_page_aligned"] else "  (not page-aligned)"))

    shape = Table(title="architecture", show_header=False, title_justify="left")
    for key, value in arch.items():
        if key != "arch" and (value or key in ("n_layer", "n_embd", "n_head", "n_head_kv")):
            shape.add_row(_shown(key), _shown(value))
    console.print(shape)

    roles = Table(title="bytes by role", title_justify="left")
    roles.add_column("role")
    roles.add_column("bytes", justify="right")
    roles.add_column("share", justify="right")
    total = report["total_bytes"] or 1
    for role, n in report["bytes_by_role"].items():
        roles.add_row(role, _human(n), f"{100 * n / total:.1f}%")
    console.print(roles)

    # Attention roles are summed into one column so the table fits a terminal; --json keeps them apart.
    groups: dict[str, list[str]] = {
        "attn": [Role.ATTN_Q.value, Role.ATTN_K.value, Role.ATTN_V.value, Role.ATTN_QKV.value, Role.ATTN_O.value],
        "ffn": [Role.FFN_DENSE.value], "experts": [Role.EXPERT_ROUTED.value], "shared": [Role.EXPERT_SHARED.value],
        "router": [Role.ROUTER.value], "norm": [Role.NORM.value], "other": [Role.OTHER.value],
    }
    rows = report["bytes_by_layer"]
    used = [g for g, members in groups.items() if any(row["by_role"].get(m) for row in rows for m in members)]
    layers = Table(title="bytes by layer", title_justify="left")
    for col in ["layer", "total", *used]:
        layers.add_column(col, justify="right")
    for row in rows:
        sums = [sum(row["by_role"].get(m, 0) for m in groups[g]) for g in used]
        layers.add_row(str(row["layer"]), _compact(row["bytes"]), *(_compact(n) if n else "-" for n in sums))
    console.print(layers)

    if show_tensors:
        tensors = Table(title="tensors", title_justify="left")
        tensors.add_column("name", overflow="fold")
        columns: tuple[tuple[str, JustifyMethod], ...] = (("role", "left"), ("type", "left"), ("shape", "left"),
                                                          ("bytes", "right"), ("offset", "right"))
        for col, justify in columns:
            tensors.add_column(col, justify=justify, no_wrap=True)
        multi = len(report["files"]) > 1
        if multi:
            tensors.add_column("file")
        for t in report["tensors"]:
            row = [_shown(t["name"]), t["role"], t["type"], "×".join(map(str, t["shape"])), _compact(t["bytes"]),
                   f"{t['offset']:,}"]
            if multi:
                row.append(_shown(Path(t["file"]).name))
            tensors.add_row(*row)
        console.print(tensors)

    if show_metadata:
        meta = Table(title="metadata", title_justify="left")
        meta.add_column("key")
        meta.add_column("value", overflow="fold")
        for key, value in report["metadata"].items():
            meta.add_row(_shown(key), _shown(value, 1000))
        console.print(meta)


# --------------------------------------------------------------------------------------------------
# commands


def register(app: typer.Typer) -> None:
    gguf_app = typer.Typer(help="Inspect GGUF models, page-align them, and generate synthetic test models.",
                           no_args_is_help=True)
    app.add_typer(gguf_app, name="gguf")

    @gguf_app.command("inspect")
    def inspect_cmd(
        model: Annotated[Path, typer.Argument(help="GGUF file (any shard of a split model).")],
        tensors: Annotated[bool, typer.Option("--tensors/--no-tensors", help="List every tensor.")] = True,
        metadata: Annotated[bool, typer.Option("--metadata/--no-metadata", help="List the key/value metadata.")]
        = True,
        json_out: JsonOpt = False,
    ) -> None:
        """Show a model's tensors (role, type, shape, bytes, offset), byte totals per role and per layer,
        and its metadata."""
        from orchestrator.modelfile.reader import read_model_table

        report = inspect_report(read_model_table(model))
        if json_out:
            emit_json(report)
        else:
            _print_inspect(report, tensors, metadata)

    @gguf_app.command("realign")
    def realign_cmd(
        src: Annotated[Path, typer.Argument(help="GGUF file to copy.")],
        out: Annotated[Path, typer.Argument(help="Where to write the realigned copy.")],
        alignment: AlignmentOpt = 4096,
        force: ForceOpt = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Copy a GGUF so every tensor's data starts on an ALIGNMENT boundary (general.alignment is set);
        metadata and tensor bytes are unchanged and verified against the source."""
        from orchestrator.modelfile.realign import byte_progress, realign

        _refuse_existing(out, force)
        started = time.monotonic()
        with byte_progress(f"realign {src.name}", enabled=_show_progress(json_out)) as progress:
            result = realign(src, out, alignment=alignment, progress=progress)
        seconds = time.monotonic() - started
        if json_out:
            emit_json({**dataclasses.asdict(result), "seconds": round(seconds, 3), "verified": True})
            return
        note = " (the source was already aligned)" if result.was_aligned else ""
        console.print(f"wrote {result.dst}: {result.n_tensors} tensors aligned to {alignment} bytes, "
                      f"{_human(result.size_before)} → {_human(result.size_after)}, every tensor verified "
                      f"in {seconds:.1f}s{note}")

    @gguf_app.command("synth")
    def synth_cmd(
        out: Annotated[Path, typer.Argument(help="Where to write the model (.gguf).")],
        preset_name: Annotated[str, typer.Option("--preset", "-p", help="Model shape: " + _preset_names())]
        = "tiny-dense",
        quant: Annotated[Optional[QuantChoice], typer.Option("--type", "-t", help="Type of every matrix.")]
        = None,
        layers: Annotated[Optional[int], typer.Option("--layers", "-l", help="Number of blocks.")] = None,
        seed: Annotated[Optional[int], typer.Option("--seed", "-s", help="Random seed.")] = None,
        alignment: Annotated[Optional[int], typer.Option("--alignment", "-a", help="general.alignment "
                                                         "(power of two; default 4096).")] = None,
        vocab: Annotated[Optional[int], typer.Option("--vocab", help="Vocabulary size.")] = None,
        experts: Annotated[Optional[int], typer.Option("--experts", help="Routed experts per MoE layer.")] = None,
        experts_used: Annotated[Optional[int], typer.Option("--experts-used", help="Experts per token.")] = None,
        ctx: Annotated[Optional[int], typer.Option("--ctx", help="Training context length (metadata).")] = None,
        overrides: Annotated[Optional[list[str]], typer.Option(
            "--set", help="Any SynthSpec field, FIELD=VALUE (repeatable), e.g. --set n_embd=512.")] = None,
        force: ForceOpt = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Write a synthetic random-weight model that llama.cpp loads and runs (deterministic by seed)."""
        from orchestrator.modelfile.realign import byte_progress
        from orchestrator.synth import estimate_bytes, plan_tensors, preset, write_synth_model

        fields: dict[str, object] = dict(
            quant=quant.value if quant else None, n_layer=layers, seed=seed, alignment=alignment, n_vocab=vocab,
            n_expert=experts, n_expert_used=experts_used, n_ctx_train=ctx,
        )
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise FlashflexError(f"--set {item!r} is not FIELD=VALUE", "write it like --set n_embd=512")
            fields[key.strip()] = value.strip()
        spec = preset(preset_name, **fields)
        _refuse_existing(out, force)
        need = estimate_bytes(spec) + len(plan_tensors(spec)) * spec.alignment  # data + worst-case padding
        check_free_space(out.expanduser().parent, need, f"synth {spec.name}")

        started = time.monotonic()
        with byte_progress(f"synth {spec.name}", enabled=_show_progress(json_out)) as progress:
            path = write_synth_model(spec, out, progress=progress)
        seconds = time.monotonic() - started
        size = path.stat().st_size
        if json_out:
            emit_json({"path": str(path), "bytes": size, "tensor_bytes": estimate_bytes(spec),
                       "seconds": round(seconds, 3), "spec": spec.model_dump()})
            return
        console.print(f"wrote {path}: {spec.arch} {spec.n_layer} layers, {spec.quant}, {_human(size)}, "
                      f"alignment {spec.alignment}, seed {spec.seed} in {seconds:.1f}s")


def _preset_names() -> str:
    from orchestrator.synth import PRESETS

    return ", ".join(PRESETS)
