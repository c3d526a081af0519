"""`flashflex trace analyze`: bank modeling over a recorded MoE routing trace (LRU, LFU, Belady)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from orchestrator.cli.common import JsonOpt, console, emit_json, err_console
from orchestrator.errors import FlashflexError
from orchestrator.sizes import format_size, parse_size


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FlashflexError(f"{flag} {text!r} is not a list of numbers", f"write e.g. {flag} 8,16,32") from None
    if not values:
        raise FlashflexError(f"{flag} is empty", f"write e.g. {flag} 8,16,32")
    return values


def _manifest(path: Path | None):
    if path is None:
        return None
    from orchestrator import sidecar

    return sidecar.load_manifest(path.parent if path.name == sidecar.MANIFEST_NAME else path)


def register(app: typer.Typer) -> None:
    trace_app = typer.Typer(help="MoE routing traces (recorded with `flashflex run --moe-trace FILE`).",
                            no_args_is_help=True)
    app.add_typer(trace_app, name="trace")

    @trace_app.command("analyze")
    def analyze_cmd(
        trace: Annotated[Path, typer.Argument(help="A routing trace (JSONL).")],
        manifest: Annotated[Optional[Path], typer.Option(
            "--manifest", help="The model's sidecar (directory or its manifest.json): adds bytes per token and "
            "lets --budget pick a bank.")] = None,
        banks: Annotated[Optional[str], typer.Option(
            "--banks", help="Bank sizes (slots per layer) to model, e.g. 8,16,32; default: top-k up to every "
            "expert in about ten steps.")] = None,
        topk: Annotated[Optional[str], typer.Option(
            "--topk", help="Experts per token to model (<= the trace's), e.g. 8,4; default: the trace's.")] = None,
        budget: Annotated[Optional[str], typer.Option(
            "--budget", help="RAM for the expert banks (e.g. 1.5GiB): recommend the bank for it (needs "
            "--manifest).")] = None,
        png: Annotated[Optional[Path], typer.Option("--png", help="Plot hit rate vs bank size per policy.")] = None,
        force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --png file.")] = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Simulate LRU (the runtime's policy), LFU and Belady (the optimal offline policy) over bank sizes and
        top-k values; print hit rate, misses and bytes per token, and recommend a bank size."""
        from orchestrator import traces
        from orchestrator.fsutil import check_output_path

        if png is not None:  # every argument is checked before the simulation runs
            check_output_path(png, force=force)
        if budget is not None and manifest is None:
            raise FlashflexError("--budget needs --manifest (the bytes of one expert)", "pass the sidecar's manifest")
        budget_bytes = parse_size(budget, what="--budget") if budget is not None else None
        t = traces.read_trace(trace)
        man = _manifest(manifest)
        result = traces.analyze(t, banks=_int_list(banks, "--banks"), topks=_int_list(topk, "--topk"),
                                manifest=man, budget_bytes=budget_bytes,
                                log=None if json_out else lambda m: err_console.print(f"[dim]{m}[/]"))
        if png is not None:
            traces.plot(result, png, log=err_console.print)
        if json_out:
            emit_json(result.to_dict())
            return
        h = t.header
        console.print(f"[bold]{trace}[/bold]: {h.model.architecture}, {h.model.n_expert} experts, k={h.k}, "
                      f"{len(h.layers)} banked layers; recorded with {h.slots} slots, prefetch {h.prefetch}, "
                      f"ubatch {h.ubatch}")
        console.print(f"{result.records} layer calls, {result.tokens} tokens ({result.decode_tokens} decode); "
                      f"recorded hit rate {result.recorded_hit_rate:.1%}")
        if result.lru_at_recorded_slots is not None:
            note = "" if h.prefetch == "none" else " (the recording prefetched, so they may differ)"
            console.print(f"simulated LRU at {h.slots} slots: {result.lru_at_recorded_slots:.1%}{note}")
        table = Table(show_header=True, header_style="bold")
        for col in ("k", "slots", "policy", "hit rate", "decode hit rate", "decode misses/token",
                    "decode bytes/token"):
            table.add_column(col, justify="right" if col not in ("policy",) else "left")
        for r in result.results:
            per_tok = r.get("decode_bytes_per_token")
            table.add_row(str(r["k"]), str(r["slots"]), r["policy"], f"{r['hit_rate']:.1%}",
                          f"{r['decode_hit_rate']:.1%}", f"{r['decode_misses_per_token']:.2f}",
                          format_size(per_tok) if per_tok is not None else "-")
        console.print(table)
        rec = result.recommendation
        if rec:
            cost = f" ({format_size(rec['bank_bytes'])} of banks)" if "bank_bytes" in rec else ""
            console.print(f"recommended bank: [bold]{rec['slots']} slots[/bold]{cost}, LRU decode hit rate "
                          f"{rec['lru_decode_hit_rate']:.1%} ({rec['rule']})")
        if png is not None and png.exists():
            err_console.print(f"[dim]plot: {png}[/]")
