"""`flashflex run` and `flashflex verify-exact`: generate with a model, or prove a mode exact against stock."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from orchestrator import runner
from orchestrator.cli.common import JsonOpt, console, emit_json, err_console

# Options shared by every command that opens a model, mapped to RunConfig keys (flags beat the YAML).
ConfigArg = Annotated[Optional[Path], typer.Argument(help="A YAML RunConfig (see configs/). Flags override it.")]
ModelOpt = Annotated[Optional[Path], typer.Option("--model", "-m", help="GGUF file (default: Gemma 3 270M Q4_K_M).")]
BudgetOpt = Annotated[Optional[str], typer.Option(
    "--budget", "-am", help="RAM budget (2GiB, 1.5G, 512MiB, a bare number of GiB, or auto). Below the model's "
    "size, weights stream from disk.")]
PrefetchThreadsOpt = Annotated[Optional[int], typer.Option(
    "--prefetch-threads", "-tp", min=0, help="Prefetch I/O threads for streamed weights; 0 = synchronous reads.")]
PrefetchWindowOpt = Annotated[Optional[int], typer.Option(
    "--prefetch-window", min=1, help="Layers read ahead of compute.")]
DirectIOOpt = Annotated[Optional[str], typer.Option(
    "--direct-io", help="O_DIRECT reads: auto, on, off or strict (fail when the file is not 4096-aligned).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help="Compute threads.")]
CtxOpt = Annotated[Optional[int], typer.Option("--ctx", "-c", min=16, help="Context size in tokens.")]
UbatchOpt = Annotated[Optional[int], typer.Option("--ubatch", "-ub", min=1, help="Micro-batch size.")]


def _overrides(model, budget, prefetch_threads, prefetch_window, direct_io, threads, ctx, ubatch, **more) -> dict:
    return {"model.path": model, "budget.size": budget, "prefetch.threads": prefetch_threads,
            "prefetch.window": prefetch_window, "prefetch.direct_io": direct_io, "context.threads": threads,
            "context.ctx": ctx, "context.ubatch": ubatch, **more}


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        config: ConfigArg = None,
        model: ModelOpt = None,
        prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text."),
        n_predict: Optional[int] = typer.Option(None, "-n", "--n-predict", min=-1,
                                                help="Tokens to generate (-1: until end of text)."),
        budget: BudgetOpt = None,
        prefetch_threads: PrefetchThreadsOpt = None,
        prefetch_window: PrefetchWindowOpt = None,
        direct_io: DirectIOOpt = None,
        threads: ThreadsOpt = None,
        ctx: CtxOpt = None,
        ubatch: UbatchOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Generate text; --json prints token ids, text, timings, peak RSS and streaming statistics."""
        from orchestrator.config import load_run_config

        cfg = load_run_config(config, _overrides(model, budget, prefetch_threads, prefetch_window, direct_io,
                                                 threads, ctx, ubatch, prompt=prompt,
                                                 **{"sampling.n_predict": n_predict}))
        settings = runner.settings_from_config(cfg, log=err_console.print)
        plan = runner.plan_for_config(cfg, settings.model)
        result = runner.generate(settings, plan)
        if json_out:
            emit_json(result.to_dict())
            return
        console.print(settings.prompt, end="", style="bold")
        console.print(result.text)
        line = (f"load {result.load_s:.2f}s · prompt {len(result.prompt_tokens)} tok @ "
                f"{result.prompt_tok_per_s:.1f} tok/s · decode {len(result.tokens)} tok @ "
                f"{result.decode_tok_per_s:.1f} tok/s · peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB")
        decode = result.stats.get("decode")
        if decode:
            line += (f" · streamed {decode['bytes_read_per_token'] / 2**20:.1f} MiB/token, "
                     f"waited {decode['wait_seconds']:.2f}s on reads")
        err_console.print(f"[dim]{line}[/]")

    @app.command("verify-exact")
    def verify_exact_cmd(
        config: ConfigArg = None,
        model: ModelOpt = None,
        tokens: int = typer.Option(64, "--tokens", min=1, help="Teacher-forced tokens to compare."),
        seed: int = typer.Option(0, "--seed", help="Seed of the pseudo-random token sequence."),
        budget: BudgetOpt = None,
        prefetch_threads: PrefetchThreadsOpt = None,
        prefetch_window: PrefetchWindowOpt = None,
        direct_io: DirectIOOpt = None,
        threads: ThreadsOpt = None,
        ctx: CtxOpt = None,
        ubatch: UbatchOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Feed the same teacher-forced tokens through stock and through the configured mode; exit 0 only when
        every logit is bitwise identical."""
        from orchestrator import exact
        from orchestrator.config import load_run_config
        from orchestrator.errors import FlashflexError

        cfg = load_run_config(config, _overrides(model, budget, prefetch_threads, prefetch_window, direct_io,
                                                 threads, ctx, ubatch))
        settings = runner.settings_from_config(cfg, log=err_console.print)
        if tokens > settings.ctx:
            raise FlashflexError(f"--tokens {tokens} exceeds the context of {settings.ctx}", "raise --ctx")
        plan = runner.plan_for_config(cfg, settings.model)
        result = exact.verify(settings, plan, tokens, seed)
        mode = "stock (nothing to compare: the budget needs no plan)" if plan is None else "dense-stream"
        if json_out:
            emit_json({"mode": mode, **result.to_dict()})
        else:
            verdict = "IDENTICAL" if result.identical else "DIFFERENT"
            console.print(f"{verdict}: {result.tokens} tokens × {result.n_vocab} logits, mode {mode}, "
                          f"max |Δ| = {result.max_abs_diff:g}, mismatched positions {result.mismatched_positions}")
        if not result.identical:
            raise typer.Exit(1)
