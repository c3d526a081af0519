"""`flashflex run`: generate text with a model, from flags or a YAML RunConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from orchestrator import runner
from orchestrator.cli.common import JsonOpt, console, emit_json, err_console


def settings_from(config_path: Optional[Path], overrides: dict, log) -> runner.GenerationSettings:
    """Flags (overrides, by dotted config path) beat the YAML config, which beats the defaults."""
    from orchestrator.config import load_run_config
    from orchestrator.models import resolve_model

    cfg = load_run_config(config_path, overrides)
    return runner.GenerationSettings(
        model=resolve_model(cfg.model.path, log=log),
        prompt=cfg.prompt,
        n_predict=cfg.sampling.n_predict,
        threads=cfg.context.threads,
        ctx=cfg.context.ctx,
        batch=max(cfg.context.batch, cfg.context.ubatch),
        ubatch=cfg.context.ubatch,
        seed=cfg.sampling.seed,
        temperature=cfg.sampling.temperature,
        top_k=cfg.sampling.top_k,
        top_p=cfg.sampling.top_p,
    )


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        config: Optional[Path] = typer.Argument(None, help="A YAML RunConfig (see configs/). Flags override it."),
        model: Optional[Path] = typer.Option(None, "--model", "-m", help="GGUF file (default: Gemma 3 270M Q4_K_M)."),
        prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text."),
        n_predict: Optional[int] = typer.Option(None, "-n", "--n-predict", min=0, help="Tokens to generate."),
        threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help="Compute threads."),
        ctx: Optional[int] = typer.Option(None, "--ctx", "-c", min=16, help="Context size in tokens."),
        ubatch: Optional[int] = typer.Option(None, "--ubatch", "-ub", min=1, help="Micro-batch size."),
        json_out: JsonOpt = False,
    ) -> None:
        """Generate text; --json prints token ids, text, load/prompt/decode timings and peak RSS."""
        log = err_console.print
        overrides = {"model.path": model, "prompt": prompt, "sampling.n_predict": n_predict,
                     "context.threads": threads, "context.ctx": ctx, "context.ubatch": ubatch}
        settings = settings_from(config, overrides, log)
        result = runner.generate(settings)
        if json_out:
            emit_json(result.to_dict())
            return
        console.print(settings.prompt, end="", style="bold")
        console.print(result.text)
        err_console.print(
            f"[dim]load {result.load_s:.2f}s · prompt {len(result.prompt_tokens)} tok @ "
            f"{result.prompt_tok_per_s:.1f} tok/s · decode {len(result.tokens)} tok @ "
            f"{result.decode_tok_per_s:.1f} tok/s · peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB[/]")
