"""`flashflex bench dense|moe`: stock and flashflex side by side under memory budgets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from orchestrator.cli.common import JsonOpt, console, emit_json, err_console
from orchestrator.cli.options import (
    DraftAdaptiveOpt,
    DraftMaxOpt,
    DraftModelOpt,
    DraftOpt,
    MoEModeOpt,
    MoESlotBankOpt,
)
from orchestrator.errors import FlashflexError


def _synth_model(preset: str, log) -> Path:
    """A benchmark model generated once into the cache (deterministic by seed)."""
    from orchestrator import synth

    return synth.cached_preset(preset, log)


MoEModelOpt = Annotated[Optional[Path], typer.Option(
    "--model", "-m", help="MoE GGUF to benchmark, or synth:PRESET (default: synthetic Qwen3-30B-A3B-shaped, 12 layers, "
    "Q4_0, ~4.6 GB).")]
SidecarOpt = Annotated[Optional[Path], typer.Option(
    "--sidecar", help="Its expert sidecar (default: MODEL.sidecar beside it, extracted once when missing).")]
IOThreadsOpt = Annotated[int, typer.Option("--io-threads", min=1, help="Parallel readers for expert misses.")]
RepeatsOpt = Annotated[int, typer.Option("--repeats", min=1, help="Runs per point, interleaved (every point once, "
                                         "then again); the median is reported.")]
PromptTokensOpt = Annotated[int, typer.Option("--prompt-tokens", min=1, help="Prompt length (teacher-forced).")]
BenchRPCOpt = Annotated[Optional[str], typer.Option(
    "--rpc", help="RPC workers, HOST:PORT[,HOST:PORT...] (flashflex rpc-server on each): the flashflex runs put "
    "their last layers there, as the workers' memory holds (stock runs stay on this host). scripts/bench_rpc.py "
    "runs a worker in a cgroup of its own.")]


def _rpc_endpoints(value: str | None) -> str | None:
    """--rpc checked (one line for a malformed address), normalised for RunSpec.rpc."""
    if not value:
        return None
    from orchestrator import rpc

    return ",".join(rpc.parse_endpoints(value))


def _prefetch_threads(value: str) -> list[int | str]:
    """--tp: numbers of prefetch threads and/or auto, one line for anything else."""
    out: list[int | str] = []
    for item in (x.strip() for x in value.split(",")):
        if not item:
            continue
        if item == "auto":
            out.append(item)
        elif item.isdigit() and int(item) <= 64:
            out.append(int(item))
        else:
            raise FlashflexError(f"--tp: {item!r} is not a number of prefetch threads (0-64) or auto",
                                 "give a comma-separated list such as auto,0,1,2,4")
    if not out:
        raise FlashflexError("--tp is empty", "give a comma-separated list such as auto,0,1,2,4")
    return out


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Benchmarks against stock, measured in the same run (results in --out-dir).",
                        no_args_is_help=True)
    app.add_typer(group, name="bench")

    @group.command("dense")
    def dense_cmd(
        model: Optional[Path] = typer.Option(None, "--model", "-m",
                                             help="GGUF to benchmark (default: synthetic 7B-shaped Q4_0, ~3.8 GB)."),
        budgets: str = typer.Option("1GiB,2GiB,3GiB,full", "--budgets",
                                    help="Comma-separated cgroup limits; 'full' = model size + 1 GiB."),
        tp: str = typer.Option("0,1,2,4", "--tp", help="Comma-separated prefetch thread counts for flashflex, "
                               "or auto (the plan's choice, as `run -tp auto`)."),
        threads: int = typer.Option(2, "--threads", "-t", min=1, help="Compute threads."),
        ctx: int = typer.Option(512, "--ctx", min=32, help="Context size."),
        ubatch: int = typer.Option(32, "--ubatch", min=1, help="Micro-batch size."),
        prompt_tokens: int = typer.Option(16, "--prompt-tokens", min=1, help="Prompt length (teacher-forced)."),
        gen_tokens: int = typer.Option(16, "--gen-tokens", min=1, help="Decoded tokens (teacher-forced)."),
        window: str = typer.Option("auto", "--prefetch-window", help="Read-ahead: auto or a number of layers."),
        out_dir: Path = typer.Option(Path("bench-results/dense"), "--out-dir", help="Where results go."),
        no_cgroup: bool = typer.Option(False, "--no-cgroup", help="Do not confine runs to a memory cgroup."),
        no_drop_caches: bool = typer.Option(False, "--no-drop-caches", help="Do not drop the page cache between runs."),
        timeout: float = typer.Option(1800, "--timeout", help="Seconds before one run is abandoned."),
        rpc: BenchRPCOpt = None,
        repeats: RepeatsOpt = 3,
        json_out: JsonOpt = False,
    ) -> None:
        """Dense streaming vs stock mmap (repack off) under each budget, and vs stock resident at full size."""
        endpoints = _rpc_endpoints(rpc)  # a malformed address is one line before anything runs
        tps = _prefetch_threads(tp)
        from orchestrator import bench
        from orchestrator.modelfile.locate import check_gguf_file
        from orchestrator.sizes import parse_size

        log = err_console.print if json_out else console.print
        path = check_gguf_file(model) if model else _synth_model("dense-7b-q4_0", log)
        size = path.stat().st_size
        limits = [size + (1 << 30) if b.strip() == "full" else parse_size(b.strip(), what="--budgets")
                  for b in budgets.split(",") if b.strip()]
        spec = bench.RunSpec(model=path, threads=threads, ctx=ctx, ubatch=ubatch, prompt_tokens=prompt_tokens,
                             gen_tokens=gen_tokens, window=window, timeout_s=timeout, rpc=endpoints)
        sweep = bench.DenseSweep(spec=spec, budgets=limits, prefetch_threads=tps, use_cgroup=not no_cgroup,
                                 drop_caches=not no_drop_caches, repeats=repeats)
        records = bench.run_dense_sweep(sweep, out_dir, log=log)
        if json_out:
            emit_json(records)
        else:
            console.print((out_dir / "results.md").read_text())
            console.print(f"results: {out_dir}/results.jsonl, results.md, tok_s_vs_budget.png")

    @group.command("moe")
    def moe_cmd(
        model: MoEModelOpt = None,
        sidecar: SidecarOpt = None,
        budget: str = typer.Option("2GiB", "--budget", help="cgroup limit of the stock-mmap and slot-bank runs."),
        banks: str = typer.Option("8,16,24,32,auto", "--banks",
                                  help="Comma-separated slots per layer; 'auto' = the planner's pick for the budget."),
        threads: int = typer.Option(2, "--threads", "-t", min=1, help="Compute threads."),
        io_threads: IOThreadsOpt = 4,
        ctx: int = typer.Option(256, "--ctx", min=32, help="Context size."),
        ubatch: int = typer.Option(32, "--ubatch", min=1, help="Micro-batch size."),
        prompt_tokens: PromptTokensOpt = 8,
        gen_tokens: int = typer.Option(24, "--gen-tokens", min=1,
                                       help="Decoded tokens (teacher-forced pseudo-random, so routing varies)."),
        out_dir: Path = typer.Option(Path("bench-results/moe"), "--out-dir", help="Where results go."),
        no_cgroup: bool = typer.Option(False, "--no-cgroup", help="Do not confine runs to a memory cgroup."),
        no_drop_caches: bool = typer.Option(False, "--no-drop-caches", help="Do not drop the page cache between runs."),
        timeout: float = typer.Option(1800, "--timeout", help="Seconds before one run is abandoned."),
        rpc: BenchRPCOpt = None,
        repeats: RepeatsOpt = 3,
        json_out: JsonOpt = False,
    ) -> None:
        """MoE slot banks vs stock mmap (repack off) in one memory cgroup, at several bank sizes, with stock and
        flashflex resident (no limit) for reference."""
        endpoints = _rpc_endpoints(rpc)  # a malformed address is one line before anything runs
        from orchestrator import bench
        from orchestrator.sizes import parse_size

        log = err_console.print if json_out else console.print
        path, sc = _moe_model_and_sidecar(model, sidecar, log)
        slot_banks = [None if b.strip() == "auto" else int(b) for b in banks.split(",") if b.strip()]
        spec = bench.RunSpec(model=path, threads=threads, ctx=ctx, ubatch=ubatch, prompt_tokens=prompt_tokens,
                             gen_tokens=gen_tokens, timeout_s=timeout, sidecar=sc, io_threads=io_threads,
                             rpc=endpoints)
        sweep = bench.MoESweep(spec=spec, budget_bytes=parse_size(budget, what="--budget"), slot_banks=slot_banks,
                               use_cgroup=not no_cgroup, drop_caches=not no_drop_caches, repeats=repeats)
        records = bench.run_moe_sweep(sweep, out_dir, log=log)
        if json_out:
            emit_json(records)
        else:
            console.print((out_dir / "results.md").read_text())
            console.print(f"results: {out_dir}/results.jsonl, results.md, slot_bank.png")

    @group.command("all")
    def all_cmd(
        only: Optional[str] = typer.Option(None, "--only", help="Comma-separated benchmark names (default: all; "
                                           "--list names them)."),
        list_them: bool = typer.Option(False, "--list", help="Name each benchmark, its command and its duration."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the commands, run nothing."),
        out_dir: Path = typer.Option(Path("bench-results/all"), "--out-dir", help="One directory per benchmark, "
                                     "and summary.json."),
        docs: Optional[Path] = typer.Option(None, "--docs", help="The page whose tables are regenerated (default: "
                                            "docs/benchmarks.md of this checkout)."),
        no_docs: bool = typer.Option(False, "--no-docs", help="Leave the page as it is."),
        regenerate_only: bool = typer.Option(False, "--regenerate-only", help="Run nothing: regenerate the page "
                                             "from --out-dir's summary.json."),
        json_out: JsonOpt = False,
    ) -> None:
        """Every benchmark on the benchmarks page, one after the other (each interleaves stock and flashflex,
        medians of 3), then the page's tables and plots regenerated from their results, with machine and hour.
        The whole set takes hours on 2 cores: --only picks some."""
        from orchestrator.bench import suite
        from orchestrator.paths import repo_root

        log = err_console.print if json_out else console.print
        chosen = suite.by_name([n.strip() for n in only.split(",") if n.strip()] if only else None)
        page = docs or repo_root() / "docs" / "benchmarks.md"
        if list_them or dry_run:
            rows = [{"name": b.name, "what": b.what, "minutes": b.minutes, "needs": b.needs,
                     "command": suite.shown(b, out_dir / b.name)} for b in chosen]
            if json_out:
                emit_json(rows)
            else:
                for r in rows:
                    console.print(f"{r['name']}: {r['what']} (about {r['minutes']} min"
                                  + (f"; needs a {r['needs']} build" if r["needs"] else "") + ")", markup=False)
                    console.print(f"  {r['command']}", markup=False)
                console.print(f"about {sum(b.minutes for b in chosen) / 60:.1f} h in all", markup=False)
            return
        if regenerate_only:
            where = out_dir / "summary.json"
            if not where.is_file():
                raise FlashflexError(f"{where} does not exist", "run flashflex bench all first (or give --out-dir)")
            summary = json.loads(where.read_text())
        else:
            summary = suite.run_all(chosen, out_dir, log=log)
        if not no_docs:  # with --only, those benchmarks' tables alone (the summary may hold more)
            suite.regenerate(page, summary, chosen, log=log)
        if json_out:
            emit_json(summary)
        failed = [o["name"] for o in summary["benchmarks"] if o["status"].startswith("failed")]
        if failed:
            raise FlashflexError(f"{len(failed)} benchmark(s) failed: {', '.join(failed)}",
                                 f"read their logs under {out_dir} (the others' results are on the page)")

    @group.command("speculative")
    def speculative_cmd(
        model: Optional[Path] = typer.Option(None, "--model", "-m", help="GGUF or synth:PRESET to benchmark "
                                             "(default: Gemma 3 270M realigned to 4096 bytes, so streamed reads "
                                             "bypass the page cache)."),
        draft: DraftOpt = None,
        draft_model: DraftModelOpt = None,
        draft_max: DraftMaxOpt = None,
        draft_adaptive: DraftAdaptiveOpt = None,
        moe_mode: MoEModeOpt = None,
        moe_slot_bank: MoESlotBankOpt = None,
        budget: str = typer.Option("min", "--budget", help="Total budget of both runs; min = the smallest the "
                                   "planner accepts with drafting."),
        tasks: str = typer.Option("all", "--tasks", help="Comma-separated written-down tasks: rewrite, "
                                  "edit-function, document-qa, free-chat, extract, story-sampled, "
                                  "letter-sampled; all = every one."),
        n_predict: int = typer.Option(128, "-n", "--n-predict", min=1, help="Tokens to generate per run."),
        repeats: int = typer.Option(3, "--repeats", min=1, help="Runs per task and mode (medians reported)."),
        threads: int = typer.Option(2, "--threads", "-t", min=1, help="Compute threads."),
        ctx: int = typer.Option(1024, "--ctx", min=64, help="Context size."),
        ubatch: int = typer.Option(8, "--ubatch", min=2, help="Micro-batch (a verification is at most one)."),
        out_dir: Path = typer.Option(Path("bench-results/speculative"), "--out-dir", help="Where results go."),
        json_out: JsonOpt = False,
    ) -> None:
        """Speculative decoding vs none under the same budget, on written-down text tasks (rewrite a paragraph,
        edit a function, answer from a long document, free chat): decode tok/s, acceptance, tokens per
        verification, bytes read per token; medians of --repeats interleaved runs."""
        from orchestrator.bench import speculative as spec_bench

        log = err_console.print if json_out else console.print
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        bench = spec_bench.SpeculativeBench(
            model=spec_bench.resolve_model(model, log) if model else spec_bench.default_model(log),
            draft=draft or "prompt-lookup",
            draft_model=spec_bench.resolve_model(draft_model, log) if draft_model else None,
            draft_max=draft_max, draft_adaptive=draft_adaptive, budget=budget,
            tasks=list(spec_bench.TASKS) if names == ["all"] else names,
            n_predict=n_predict, repeats=repeats, threads=threads, ctx=ctx, ubatch=ubatch, moe_mode=moe_mode,
            moe_slot_bank=moe_slot_bank)
        results = spec_bench.run(bench, out_dir, log=log)
        if json_out:
            emit_json(results)
        else:
            console.print(spec_bench.markdown(results))
            console.print(f"results: {out_dir}/results.json, results.md")

    @group.command("prefetch")
    def prefetch_cmd(
        model: MoEModelOpt = None,
        sidecar: SidecarOpt = None,
        budget: str = typer.Option("2GiB", "--budget", help="cgroup limit of every run (oracle-all-hit gets the "
                                   "extra slots it needs on top)."),
        banks: str = typer.Option("16,32", "--banks", help="Comma-separated slots per layer."),
        policies: str = typer.Option("router-lookahead", "--policies",
                                     help="Comma-separated real prefetch policies to A/B against slot-bank."),
        ranks: str = typer.Option("auto", "--ranks", help="router-lookahead variants: comma-separated top ranks "
                                  "read ahead per token; auto = the default (a quarter of top-k)."),
        repeats: int = typer.Option(1, "--repeats", min=1, help="Runs per point (the median is reported)."),
        threads: int = typer.Option(2, "--threads", "-t", min=1, help="Compute threads."),
        io_threads: IOThreadsOpt = 4,
        ctx: int = typer.Option(256, "--ctx", min=32, help="Context size."),
        ubatch: int = typer.Option(32, "--ubatch", min=1, help="Micro-batch size."),
        prompt_tokens: PromptTokensOpt = 8,
        gen_tokens: int = typer.Option(32, "--gen-tokens", min=1, help="Decoded tokens (teacher-forced)."),
        out_dir: Path = typer.Option(Path("bench-results/prefetch"), "--out-dir", help="Where results go."),
        no_cgroup: bool = typer.Option(False, "--no-cgroup", help="Do not confine runs to a memory cgroup."),
        no_drop_caches: bool = typer.Option(False, "--no-drop-caches", help="Do not drop the page cache between runs."),
        timeout: float = typer.Option(1800, "--timeout", help="Seconds before one run is abandoned."),
        json_out: JsonOpt = False,
    ) -> None:
        """Expert prefetch A/B: slot-bank vs slot-bank + each policy vs oracle-prefetch vs oracle-all-hit (both
        replaying the trace slot-bank recorded in the same sweep), with stock mmap in the same cgroup; reports
        the share of the slot-bank -> oracle-prefetch gap each policy closes and the trace writer's cost."""
        from orchestrator import bench
        from orchestrator.config import MOE_PREFETCH_POLICIES
        from orchestrator.sizes import parse_size

        log = err_console.print if json_out else console.print
        chosen = [p.strip() for p in policies.split(",") if p.strip()]
        unknown = [p for p in chosen if p not in MOE_PREFETCH_POLICIES or p == "none"]
        if unknown:
            raise FlashflexError(f"unknown prefetch policy {unknown[0]!r}",
                                 f"use one of: {', '.join(p for p in MOE_PREFETCH_POLICIES if p != 'none')}")
        try:
            slot_banks = [int(b) for b in banks.split(",") if b.strip()]
        except ValueError:
            raise FlashflexError(f"--banks {banks!r} is not a list of numbers", "write e.g. --banks 16,32") from None
        try:
            rank_list = [None if r.strip() == "auto" else int(r) for r in ranks.split(",") if r.strip()]
        except ValueError:
            raise FlashflexError(f"--ranks {ranks!r} is not a list of numbers", "write e.g. --ranks 2,4,auto") from None
        path, sc = _moe_model_and_sidecar(model, sidecar, log)
        spec = bench.RunSpec(model=path, threads=threads, ctx=ctx, ubatch=ubatch, prompt_tokens=prompt_tokens,
                             gen_tokens=gen_tokens, timeout_s=timeout, sidecar=sc, io_threads=io_threads)
        sweep = bench.PrefetchSweep(spec=spec, budget_bytes=parse_size(budget, what="--budget"),
                                    slot_banks=slot_banks, policies=chosen, repeats=repeats, prefetch_ranks=rank_list,
                                    use_cgroup=not no_cgroup, drop_caches=not no_drop_caches)
        records = bench.run_prefetch_sweep(sweep, out_dir, log=log)
        if json_out:
            emit_json(records)
        else:
            console.print((out_dir / "results.md").read_text())
            console.print(f"results: {out_dir}/results.jsonl, results.md, prefetch.png")


def _moe_model_and_sidecar(model: Path | None, sidecar: Path | None, log) -> tuple[Path, Path]:
    """The MoE model to benchmark (default: the synthetic A3B-shaped one) and its checked sidecar."""
    from orchestrator import sidecar as sidecar_mod
    from orchestrator.modelfile.locate import check_gguf_file

    if model is not None and str(model).startswith("synth:"):
        path = _synth_model(str(model).removeprefix("synth:"), log)
    else:
        path = check_gguf_file(model) if model else _synth_model("moe-a3b-12l-q4_0", log)
    if sidecar is None:
        return path, sidecar_mod.beside(path, log)
    sidecar_mod.check_sidecar(sidecar, path)
    return path, sidecar
