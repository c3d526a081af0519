"""The dense sweep: stock mmap, stock resident and flashflex per budget and -tp (FlexInfer's comparison)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from orchestrator import modes
from orchestrator.bench.isolation import direct_read_bandwidth
from orchestrator.bench.runs import Point, RunSpec, check_isolation, interleaved, machine_info, run_point
from orchestrator.plotting import pyplot as _pyplot
from orchestrator.sizes import format_size

Log = Callable[[str], None]

# --------------------------------------------------------------------------------------------------------
# The dense sweep


@dataclass
class DenseSweep:
    spec: RunSpec
    budgets: list[int]  # cgroup limits; a value >= the model's size gives the "resident" comparison
    prefetch_threads: list[int | str] = field(default_factory=lambda: [0, 1, 2, 4])  # numbers or "auto"
    use_cgroup: bool = True
    drop_caches: bool = True
    repeats: int = 3  # every point this many times, interleaved; the median run is reported


def run_dense_sweep(sweep: DenseSweep, out_dir: Path, log: Log = print) -> list[dict[str, Any]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    check_isolation(sweep, log)
    model_bytes = sweep.spec.model.stat().st_size
    machine = machine_info()
    bandwidth: dict[int, float] = {}

    def bandwidth_at(qd: int) -> float:
        if qd not in bandwidth:
            bandwidth[qd] = direct_read_bandwidth(sweep.spec.model, qd)
            log(f"direct-read bandwidth at queue depth {qd}: {bandwidth[qd] / 1e9:.2f} GB/s")
        return bandwidth[qd]

    for depth in sorted({max(1, tp) for tp in sweep.prefetch_threads if isinstance(tp, int)}):
        bandwidth_at(depth)
    points: list[Point] = []
    for budget in sweep.budgets:
        points.append(Point(modes.STOCK_RESIDENT if budget >= model_bytes else modes.STOCK_MMAP, budget))
        points += [Point(modes.FLASHFLEX, budget, tp) for tp in sweep.prefetch_threads]
    with open(out_dir / "runs.jsonl", "w") as raw:  # every run as it finishes; results.jsonl holds the medians

        def measure(point: Point) -> dict[str, Any]:
            rec = run_point(point, sweep.spec, sweep.use_cgroup, sweep.drop_caches, log)
            raw.write(json.dumps(rec) + "\n")
            raw.flush()
            return rec

        records = interleaved(points, sweep.repeats, measure, log)
    for rec in records:
        rec.update(machine=machine, model=str(sweep.spec.model), model_bytes=model_bytes)
        used = rec.get("prefetch_threads")  # auto: what the plan chose
        if rec["mode"] == modes.FLASHFLEX and isinstance(used, int):
            rec["read_bandwidth_bytes_per_s"] = bandwidth_at(max(1, used))
    _add_ratios(records)
    (out_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out_dir / "results.md").write_text(markdown_table(records, bandwidth))
    plot(records, out_dir / "tok_s_vs_budget.png", log)
    return records


def _add_ratios(records: list[dict[str, Any]]) -> None:
    """Ratios to the stock baseline of the same budget, and to the I/O roofline of the same run: streamed bytes at
    the bandwidth probed at the run's thread count, or at the fastest any run of the sweep read its weights (bytes
    over decode seconds) where that is faster, so the ratio measures the runtime rather than the probe."""
    stock = {r["budget_bytes"]: r for r in records if modes.is_stock_baseline(r["mode"]) and r.get("status") == "ok"}
    # what a run's decode read per second: its streamed bytes per generated token (the worker's counters, reset
    # after the prompt) times its tokens per second
    achieved = max(((r.get("bytes_read_per_token") or 0.0) * (r.get("decode_tok_per_s") or 0.0)
                    for r in records if r.get("status") == "ok"), default=0.0)
    for r in records:
        if r.get("status") != "ok":
            continue
        base = stock.get(r["budget_bytes"])
        if base and r is not base:
            for phase in ("decode", "prompt"):
                ref = base[f"{phase}_tok_per_s"]
                r[f"{phase}_ratio_to_stock"] = r[f"{phase}_tok_per_s"] / ref if ref else None
        streamed = r.get("streamed_bytes_per_token") or 0
        probe = r.get("read_bandwidth_bytes_per_s")
        if streamed and probe:
            bw = max(probe, achieved)
            r["roofline_bandwidth_bytes_per_s"] = bw
            r["roofline_bandwidth_source"] = "probe" if bw == probe else "fastest run"
            roofline_s = streamed / bw
            r["roofline_tok_per_s"] = 1 / roofline_s
            r["per_token_s_over_roofline"] = (1 / r["decode_tok_per_s"]) / roofline_s if r["decode_tok_per_s"] else None


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _tp_label(r: dict[str, Any]) -> str:
    """The prefetch threads of a record: "auto (2)" when the plan chose them."""
    tp = r.get("prefetch_threads")
    if r.get("prefetch_threads_auto"):
        return f"auto ({tp})"
    return "auto" if tp == "auto" else _fmt(tp, "d")


def markdown_table(records: list[dict[str, Any]], bandwidth: dict[int, float]) -> str:
    m = records[0]["machine"] if records else {}
    faster = next((r for r in records if r.get("roofline_bandwidth_source") == "fastest run"), None)
    lines = [
        f"Model: `{Path(records[0]['model']).name}` ({format_size(records[0]['model_bytes'])}) · machine: "
        f"{m.get('cores')} cores, {format_size(m.get('ram_bytes', 0))} RAM · {m.get('when')}" if records else "",
        "",
        "Direct-read bandwidth (same run): "
        + ", ".join(f"QD{qd} {bw / 1e9:.2f} GB/s" for qd, bw in sorted(bandwidth.items()))
        + (f"; the roofline divides by {faster['roofline_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s, the fastest a "
           "run read its weights (never by less than the runtime reached)" if faster else ""),
        "",
        "| run | budget | tp | decode tok/s | prompt tok/s | × stock (decode) | streamed/token | roofline tok/s | "
        "time/token ÷ roofline | peak mem | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        row = "| {mode} | {budget} | {tp} | {dec} | {pro} | {ratio} | {st} | {roof} | {over} | {peak} | {status} |"
        lines.append(row.format(
            mode=r["mode"], budget=format_size(r["budget_bytes"]) if r.get("budget_bytes") else "-",
            tp=_tp_label(r), dec=_fmt(r.get("decode_tok_per_s"), ".3f"),
            pro=_fmt(r.get("prompt_tok_per_s"), ".2f"), ratio=_fmt(r.get("decode_ratio_to_stock"), ".2f"),
            st=format_size(r["streamed_bytes_per_token"]) if r.get("streamed_bytes_per_token") else "-",
            roof=_fmt(r.get("roofline_tok_per_s"), ".3f"), over=_fmt(r.get("per_token_s_over_roofline"), ".2f"),
            peak=format_size(r["cgroup_peak_bytes"]) if r.get("cgroup_peak_bytes") else (
                format_size(r["peak_rss_bytes"]) if r.get("peak_rss_bytes") else "-"),
            status=r.get("status", "?")))
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], out: Path, log: Log) -> None:
    plt = _pyplot(log)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[float, float]]] = {}
    roof: dict[float, float] = {}
    for r in records:
        if r.get("status") != "ok" or not r.get("budget_bytes"):
            continue
        name = r["mode"] if r["mode"] != modes.FLASHFLEX else f"flashflex tp={_tp_label(r)}"
        if modes.is_stock_baseline(r["mode"]):
            name = modes.STOCK
        gib = r["budget_bytes"] / 2**30
        series.setdefault(name, []).append((gib, r["decode_tok_per_s"]))
        if r.get("roofline_tok_per_s") and r.get("prefetch_threads") == max(
                x["prefetch_threads"] if isinstance(x.get("prefetch_threads"), int) else 0 for x in records):
            roof[gib] = r["roofline_tok_per_s"]
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if roof:
        xs = sorted(roof)
        ax.plot(xs, [roof[x] for x in xs], linestyle="--", color="gray", label="I/O roofline (max tp)")
    ax.set_xlabel("memory budget (GiB, cgroup limit)")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(Path(records[0]["model"]).name if records else "")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


