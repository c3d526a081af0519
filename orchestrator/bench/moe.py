"""The MoE sweeps: slot banks against stock, and expert prefetch policies between slot-bank and its oracles."""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from orchestrator import modes
from orchestrator.bench.dense import _fmt
from orchestrator.bench.isolation import parallel_direct_reads
from orchestrator.bench.runs import (
    Point,
    RunSpec,
    check_isolation,
    interleaved,
    machine_info,
    median_record,
    run_point,
)
from orchestrator.plotting import pyplot as _pyplot
from orchestrator.sizes import format_size

Log = Callable[[str], None]

# --------------------------------------------------------------------------------------------------------
# The MoE sweep (slot banks)


@dataclass
class MoESweep:
    spec: RunSpec  # spec.sidecar must be set
    budget_bytes: int  # the cgroup limit of the stock-mmap and slot-bank runs
    slot_banks: list[int | None]  # None = the planner's pick for the budget
    use_cgroup: bool = True
    drop_caches: bool = True
    repeats: int = 3  # every point this many times, interleaved; the median run is reported


def expert_read_bandwidth(sidecar: Path, manifest: Any, queue_depth: int, seed: int,
                          total_bytes: int = 256 << 20) -> float:
    """Bytes/s of O_DIRECT reads made the way slot-bank misses are: an expert of a random layer, every banked tensor's
    slice of it together (a miss installs the expert in all of the layer's tensors in one batch), request sizes as the
    runtime's (each slice page-rounded), `queue_depth` threads (the I/O threads). Random experts, so ranges this
    disk has served lately and ranges it has not, as a run's misses are (a host-cached virtual disk serves a range
    it read recently faster: measured 1.5-1.8 GB/s against 1.05-1.3 GB/s for the first read of a range)."""
    rng = random.Random(seed)
    by_layer: dict[int, list[Any]] = {}
    for t in manifest.tensors:
        if t.n_expert > 1:
            by_layer.setdefault(t.layer, []).append(t)
    layers = sorted(by_layer)
    reads: list[tuple[Path, int, int]] = []
    read = 0
    while read < total_bytes:
        tensors = by_layer[rng.choice(layers)]
        expert = rng.randrange(tensors[0].n_expert)
        for t in tensors:
            reads.append((sidecar / t.file, t.offset + expert * t.expert_stride, t.expert_stride))
            read += t.expert_stride
    return parallel_direct_reads(reads, queue_depth)


def _moe_sweep_context(sweep: Any, log: Log) -> tuple[Any, dict[str, Any]]:
    """What every record of a MoE sweep carries: the machine, the model, and the sidecar's parallel direct-read
    bandwidth measured now the way misses read (expert_read_bandwidth). Returns (manifest, context)."""
    from orchestrator import sidecar as sidecar_mod

    check_isolation(sweep, log)
    spec = sweep.spec
    assert spec.sidecar is not None
    manifest = sidecar_mod.load_manifest(spec.sidecar)
    bandwidth = expert_read_bandwidth(spec.sidecar, manifest, spec.io_threads, seed=0)
    log(f"parallel direct-read bandwidth of the sidecar ({spec.io_threads} threads, expert reads): "
        f"{bandwidth / 1e9:.2f} GB/s")
    return manifest, {"machine": machine_info(), "model": str(spec.model), "model_bytes": spec.model.stat().st_size,
                      "read_bandwidth_bytes_per_s": bandwidth, "io_threads": spec.io_threads}


def run_moe_sweep(sweep: MoESweep, out_dir: Path, log: Log = print) -> list[dict[str, Any]]:
    """stock mmap (repack off) and slot-bank at each bank size in the same cgroup, cold cache; stock and
    flashflex `resident` without a limit for reference; before every slot-bank run, the sidecar's parallel direct-read
    bandwidth measured the way its misses read (expert_read_bandwidth), so that each point's roofline divides by the
    median of the probes interleaved with its runs, or by the run's own miss bandwidth where that is faster."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = sweep.spec
    manifest, context = _moe_sweep_context(sweep, log)
    sidecar = spec.sidecar
    assert sidecar is not None
    probes: dict[str, list[float]] = {}
    first_seed = random.randrange(1 << 30)  # another sweep draws other experts than this one's
    points = [Point(modes.STOCK_RESIDENT, None), Point(modes.RESIDENT, None),
              Point(modes.STOCK_MMAP, sweep.budget_bytes)]
    points += [Point(modes.SLOT_BANK, sweep.budget_bytes, slot_bank=n) for n in sweep.slot_banks]
    with open(out_dir / "runs.jsonl", "w") as raw:  # every run as it finishes; results.jsonl holds the medians

        def measure(point: Point) -> dict[str, Any]:
            probe = None
            if point.banked:
                # a seed of its own: other random experts than the probes before it drew (some overlap)
                probe = expert_read_bandwidth(sidecar, manifest, spec.io_threads,
                                              seed=first_seed + sum(map(len, probes.values())))
                probes.setdefault(point.label, []).append(probe)
            rec = run_point(point, spec, sweep.use_cgroup, sweep.drop_caches, log)
            raw.write(json.dumps({**rec, **context, "probe_bandwidth_bytes_per_s": probe}) + "\n")
            raw.flush()
            return rec

        records = interleaved(points, sweep.repeats, measure, log)
    for rec in records:
        rec.update(context)
        if rec["label"] in probes:  # this point's probes, interleaved with its runs
            rec["read_bandwidth_bytes_per_s"] = statistics.median(probes[rec["label"]])
            rec["read_bandwidth_probes"] = probes[rec["label"]]
    _add_moe_ratios(records)
    (out_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out_dir / "results.md").write_text(moe_markdown(records))
    plot_moe(records, out_dir / "slot_bank.png", log)
    return records


def _add_moe_ratios(records: list[dict[str, Any]]) -> None:
    """Each run against stock mmap in the same cgroup; slot-bank against its roofline: the stock-resident
    per-token time plus the miss bytes per token (and the dense bytes streamed, where the plan streams any) read at
    the parallel bandwidth, measured the way misses read
    (expert_read_bandwidth, the median of the probes interleaved with the point's runs) and never below what the run
    itself read its misses at (issue 27: a probe slower than the run put the ratio below 1 and measured the probe).
    Per run, not the fastest of the sweep: on a host-cached disk a small bank re-reads the same popular experts and
    gets them faster than a large bank gets the rarer ones it misses, so one run's rate is no roofline for another.
    Beside it, the share of the probe its misses were read at (issue 27 asks for at least 80%)."""
    ok = [r for r in records if r.get("status") == "ok"]
    by_mode = {r["mode"]: r for r in ok if r["mode"] != modes.SLOT_BANK}
    mmap_run, resident = by_mode.get(modes.STOCK_MMAP), by_mode.get(modes.STOCK_RESIDENT)
    for r in ok:
        if mmap_run and r is not mmap_run and r["mode"] not in (modes.STOCK_RESIDENT, modes.RESIDENT):
            r["decode_ratio_to_stock"] = r["decode_tok_per_s"] / mmap_run["decode_tok_per_s"]
        if r["mode"] == modes.RESIDENT and resident:
            r["decode_ratio_to_stock"] = r["decode_tok_per_s"] / resident["decode_tok_per_s"]
        if r["mode"] == modes.SLOT_BANK and resident and r.get("read_bandwidth_bytes_per_s"):
            probe = r["read_bandwidth_bytes_per_s"]
            achieved = r.get("miss_bandwidth_bytes_per_s") or 0.0
            if achieved:
                r["miss_bandwidth_share_of_probe"] = achieved / probe
            bandwidth = max(probe, achieved)
            r["roofline_bandwidth_bytes_per_s"] = bandwidth
            r["roofline_bandwidth_source"] = "probe" if bandwidth == probe else "the run"
            # a bank the budget holds only by streaming dense weights reads those too (the planner picks none such,
            # an explicit bank may: 16 slots of the top-4 shape at 1.5 GiB stream 42 MB a token of attention)
            read = r["miss_bytes_per_token"] + (r.get("bytes_read_per_token") or 0.0)
            roofline_s = 1 / resident["decode_tok_per_s"] + read / bandwidth
            r["roofline_tok_per_s"] = 1 / roofline_s
            r["per_token_s_over_roofline"] = (1 / r["decode_tok_per_s"]) / roofline_s


def moe_markdown(records: list[dict[str, Any]]) -> str:
    if not records:
        return ""
    m, first = records[0]["machine"], records[0]
    lines = [
        f"Model: `{Path(first['model']).name}` ({format_size(first['model_bytes'])}) · machine: {m.get('cores')} "
        f"cores, {format_size(m.get('ram_bytes', 0))} RAM · {m.get('when')}",
        "",
        f"Parallel direct reads of the sidecar as misses read them ({first['io_threads']} threads, a random "
        "expert's slices together), probed before every slot-bank run: \"probe\" is the median of a point's probes; "
        "the roofline divides by the faster of that and the run's own miss bandwidth, so where misses ÷ probe is "
        "100% or more, time ÷ roofline measures the time beyond the run's own reads, and misses ÷ probe the reads.",
        "",
        "| run | cgroup | slots | decode tok/s | × stock mmap | hit rate | misses/token | miss MiB/token | "
        "dense streamed MiB/token | miss bandwidth | probe | misses ÷ probe | roofline tok/s | time/token ÷ roofline "
        "| peak mem | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        ratio = r.get("decode_ratio_to_stock")
        lines.append("| " + " | ".join([
            r["mode"], format_size(r["budget_bytes"]) if r.get("budget_bytes") else "none",
            _fmt(r.get("slot_bank"), "d"), _fmt(r.get("decode_tok_per_s"), ".3f"),
            (_fmt(ratio, ".2f") + (f" (vs {modes.STOCK_RESIDENT})" if r["mode"] == modes.RESIDENT and ratio else "")),
            _fmt(r.get("hit_rate"), ".1%"), _fmt(r.get("misses_per_token"), ".1f"),
            _fmt(r["miss_bytes_per_token"] / 2**20 if r.get("miss_bytes_per_token") is not None else None, ".1f"),
            _fmt(r["bytes_read_per_token"] / 2**20 if r.get("bytes_read_per_token") else
                 (0.0 if r["mode"] == modes.SLOT_BANK else None), ".1f"),
            f"{r['miss_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s" if r.get("miss_bandwidth_bytes_per_s") else "-",
            f"{r['read_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s" if r.get("roofline_bandwidth_bytes_per_s") else "-",
            _fmt(r.get("miss_bandwidth_share_of_probe"), ".0%"),
            _fmt(r.get("roofline_tok_per_s"), ".3f"), _fmt(r.get("per_token_s_over_roofline"), ".2f"),
            format_size(r["cgroup_peak_bytes"]) if r.get("cgroup_peak_bytes") else (
                format_size(r["peak_rss_bytes"]) if r.get("peak_rss_bytes") else "-"),
            r.get("status", "?"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def plot_moe(records: list[dict[str, Any]], out: Path, log: Log) -> None:
    """decode tok/s (with stock mmap and stock resident as lines) and hit rate against the bank size."""
    plt = _pyplot(log)
    if plt is None:
        return
    banks = sorted((r["slot_bank"], r) for r in records if r["mode"] == modes.SLOT_BANK and r.get("status") == "ok")
    if not banks:
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [n for n, _ in banks]
    ax.plot(xs, [r["decode_tok_per_s"] for _, r in banks], marker="o", label=modes.SLOT_BANK)
    roof = [(n, r["roofline_tok_per_s"]) for n, r in banks if r.get("roofline_tok_per_s")]
    if roof:
        ax.plot([p[0] for p in roof], [p[1] for p in roof], linestyle="--", color="gray",
                label="roofline (resident + misses ÷ bandwidth)")
    for mode, style in ((modes.STOCK_MMAP, ":"), (modes.STOCK_RESIDENT, "-.")):
        base = next((r for r in records if r["mode"] == mode and r.get("status") == "ok"), None)
        if base:
            same_cgroup = mode == modes.STOCK_MMAP
            ax.axhline(base["decode_tok_per_s"], linestyle=style, color="black" if same_cgroup else "green",
                       label=f"{mode}" + (" (same cgroup)" if same_cgroup else " (no limit)"))
    ax.set_xlabel("slots per layer")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    bx.plot(xs, [r["hit_rate"] for _, r in banks], marker="o", color="tab:orange")
    bx.set_xlabel("slots per layer")
    bx.set_ylabel("bank hit rate (decode)")
    bx.set_ylim(0, 1)
    bx.grid(True, alpha=0.3)
    fig.suptitle(f"{Path(records[0]['model']).name} · cgroup {format_size(banks[0][1]['budget_bytes'])}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------
# The prefetch sweep: real prefetch policies between slot-bank and its oracles


@dataclass
class PrefetchSweep:
    spec: RunSpec  # spec.sidecar must be set
    budget_bytes: int  # the cgroup limit of every banked run and of stock mmap
    slot_banks: list[int]
    policies: list[str]  # real prefetch policies to A/B against slot-bank
    prefetch_ranks: list[int | None] = field(default_factory=lambda: [None])  # router-lookahead variants
    repeats: int = 1
    use_cgroup: bool = True
    drop_caches: bool = True


def run_prefetch_sweep(sweep: PrefetchSweep, out_dir: Path, log: Log = print) -> list[dict[str, Any]]:
    """Per bank size: slot-bank, slot-bank recording a trace (the writer's cost), slot-bank + each policy,
    oracle-prefetch and oracle-all-hit replaying that trace; stock mmap in the same cgroup and stock resident
    without a limit for reference. Cold cache before every run. oracle-all-hit holds every expert the trace
    uses, so its cgroup grows by those extra slots (it is a ceiling, not a mode that fits the budget)."""
    from orchestrator import traces

    out_dir.mkdir(parents=True, exist_ok=True)
    spec = sweep.spec
    manifest, context = _moe_sweep_context(sweep, log)
    per_expert = traces.layer_expert_bytes(manifest)
    n_layers = len({t.layer for t in manifest.tensors if t.n_expert > 1})
    records: list[dict[str, Any]] = []
    results = out_dir / "results.jsonl"

    def measure(point: Point) -> dict[str, Any]:
        runs = [run_point(point, spec, sweep.use_cgroup, sweep.drop_caches, log) for _ in range(sweep.repeats)]
        rec = median_record(runs)
        rec.update(context)
        records.append(rec)
        with open(results, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        return rec

    results.write_text("")
    measure(Point(modes.STOCK_RESIDENT, None))
    measure(Point(modes.STOCK_MMAP, sweep.budget_bytes))
    for n in sweep.slot_banks:
        trace = out_dir / f"trace-N{n}.jsonl"
        measure(Point(modes.SLOT_BANK, sweep.budget_bytes, slot_bank=n))
        recorded = measure(Point(modes.SLOT_BANK, sweep.budget_bytes, slot_bank=n, trace=str(trace)))
        for policy in sweep.policies:
            for ranks in sweep.prefetch_ranks if policy == "router-lookahead" else [None]:
                measure(Point(modes.SLOT_BANK, sweep.budget_bytes, slot_bank=n, prefetch=policy, prefetch_ranks=ranks))
        if recorded.get("status") != "ok" or not trace.exists():
            log(f"  no trace at N={n}: the oracle runs are skipped")
            continue
        measure(Point(modes.ORACLE_PREFETCH, sweep.budget_bytes, slot_bank=n, trace=str(trace)))
        distinct = traces.read_trace(trace).max_distinct_per_layer()
        extra = max(0, distinct - n) * per_expert * n_layers
        measure(Point(modes.ORACLE_ALL_HIT, sweep.budget_bytes + extra, slot_bank=n, trace=str(trace)))
    _add_prefetch_ratios(records)
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    (out_dir / "results.md").write_text(prefetch_markdown(records))
    plot_prefetch(records, out_dir / "prefetch.png", log)
    return records


def _add_prefetch_ratios(records: list[dict[str, Any]]) -> None:
    """Against stock mmap (same cgroup) and against slot-bank at the same bank size; for each real policy, the
    share of the slot-bank -> oracle-prefetch gap in time per token that it closes."""
    ok = [r for r in records if r.get("status") == "ok"]
    mmap_run = next((r for r in ok if r["mode"] == modes.STOCK_MMAP), None)
    for r in ok:
        if mmap_run and not modes.is_stock_baseline(r["mode"]):
            r["decode_ratio_to_stock"] = r["decode_tok_per_s"] / mmap_run["decode_tok_per_s"]
        if not modes.is_banked(r["mode"]):
            continue
        n = r["slot_bank"]
        base = next((x for x in ok if x["mode"] == modes.SLOT_BANK and x["slot_bank"] == n and not x.get("trace")
                     and x.get("prefetch", "none") == "none"), None)
        oracle = next((x for x in ok if x["mode"] == modes.ORACLE_PREFETCH and x["slot_bank"] == n), None)
        if base is None or r is base:
            continue
        t_base, t_r = 1 / base["decode_tok_per_s"], 1 / r["decode_tok_per_s"]
        r["decode_ratio_to_slot_bank"] = r["decode_tok_per_s"] / base["decode_tok_per_s"]
        r["time_saved_per_token_s"] = t_base - t_r
        if r.get("prefetch", "none") != "none" and oracle is not None:
            gap = t_base - 1 / oracle["decode_tok_per_s"]
            r["oracle_gap_closed"] = (t_base - t_r) / gap if gap > 0 else None


def _records_trace(r: dict[str, Any]) -> bool:
    """A slot-bank run that recorded a routing trace (it measures the writer's cost; the oracles replay it)."""
    return r["mode"] == modes.SLOT_BANK and bool(r.get("trace"))


def _label(r: dict[str, Any]) -> str:
    name = r["mode"]
    if r.get("prefetch", "none") != "none":
        name += f" + {r['prefetch']}"
        name += f" (top {r['moe_prefetch_ranks']})" if r.get("moe_prefetch_ranks") else ""
    if _records_trace(r):
        name += " + trace"
    return name


def prefetch_markdown(records: list[dict[str, Any]]) -> str:
    if not records:
        return ""
    m, first = records[0]["machine"], records[0]
    lines = [
        f"Model: `{Path(first['model']).name}` ({format_size(first['model_bytes'])}) · machine: {m.get('cores')} "
        f"cores, {format_size(m.get('ram_bytes', 0))} RAM · {m.get('when')} · parallel direct-read bandwidth "
        f"{first['read_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s",
        "",
        "| run | slots | cgroup | decode tok/s | × stock mmap | × slot-bank | hit rate | misses/token | "
        "read MiB/token | prefetched: used/issued | wasted MiB/token | prefetch wait/token | oracle gap closed | "
        "trace writer / decode | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        moe = r.get("moe") or {}
        gen = r.get("decode_tok_per_s") and r.get("decode_s") and r["decode_tok_per_s"] * r["decode_s"]
        issued = moe.get("prefetch_issued")
        lines.append("| " + " | ".join([
            _label(r), _fmt(r.get("bank_slots") or r.get("slot_bank"), "d")
            if not modes.is_stock_baseline(r["mode"]) else "-",
            format_size(r["budget_bytes"]) if r.get("budget_bytes") else "none",
            _fmt(r.get("decode_tok_per_s"), ".3f"), _fmt(r.get("decode_ratio_to_stock"), ".2f"),
            _fmt(r.get("decode_ratio_to_slot_bank"), ".2f"), _fmt(r.get("hit_rate"), ".1%"),
            _fmt(r.get("misses_per_token"), ".2f"),
            _fmt(r["miss_bytes_per_token"] / 2**20 if r.get("miss_bytes_per_token") is not None else None, ".1f"),
            f"{moe.get('prefetch_used')}/{issued}" if issued else "-",
            _fmt(moe["prefetch_wasted_bytes"] / gen / 2**20 if issued and gen else None, ".1f"),
            _fmt(f"{moe['prefetch_wait_seconds'] / gen * 1e3:.1f} ms" if issued and gen else None, "s"),
            _fmt(r.get("oracle_gap_closed"), ".0%"),
            _fmt(r.get("trace_share_of_decode"), ".2%") if _records_trace(r) else "-",
            r.get("status", "?"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def plot_prefetch(records: list[dict[str, Any]], out: Path, log: Log) -> None:
    """Decode tok/s per bank size: slot-bank, each policy, oracle-prefetch, oracle-all-hit."""
    plt = _pyplot(log)
    if plt is None:
        return
    ok = [r for r in records if r.get("status") == "ok" and not modes.is_stock_baseline(r["mode"])
          and not _records_trace(r)]
    banks = sorted({r["slot_bank"] for r in ok})
    if not banks:
        return
    names = list(dict.fromkeys(_label(r) for r in ok))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ys = [next((r["decode_tok_per_s"] for r in ok if _label(r) == name and r["slot_bank"] == n), 0) for n in banks]
        ax.bar([b + (i - (len(names) - 1) / 2) * width for b in range(len(banks))], ys, width, label=name)
    base = next((r for r in records if r["mode"] == modes.STOCK_MMAP and r.get("status") == "ok"), None)
    if base:
        ax.axhline(base["decode_tok_per_s"], linestyle=":", color="black", label="stock mmap (same cgroup)")
    ax.set_xticks(range(len(banks)), [f"{n} slots" for n in banks])
    ax.set_ylabel("decode tokens/s")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{Path(records[0]['model']).name}: expert prefetch vs its oracles")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
