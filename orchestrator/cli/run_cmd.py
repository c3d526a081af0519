"""`flashflex run`: generate text with a model, from flags or a YAML RunConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from orchestrator import runner
from orchestrator.cli.common import JsonOpt, console, emit_json, err_console


def settings_from(config_path: Optional[Path], model: Optional[Path], prompt: Optional[str],
                  n_predict: Optional[int], threads: Optional[int], ctx: Optional[int],
                  ubatch: Optional[int], log) -> runner.GenerationSettings:
    """Flags override the YAML config, which overrides the defaults."""
    from orchestrator import config as cfg
    from orchestrator.models import resolve_model

    run_cfg = cfg.load_run_config(config_path) if config_path else cfg.RunConfig()
    model_path = model if model is not None else run_cfg.model.path
    s = runner.GenerationSettings(
        model=resolve_model(model_path, log=log),
        prompt=prompt if prompt is not None else run_cfg.prompt,
        n_predict=n_predict if n_predict is not None else run_cfg.sampling.n_predict,
        threads=threads if threads is not None else run_cfg.context.threads,
        ctx=ctx if ctx is not None else run_cfg.context.ctx,
        batch=run_cfg.context.batch,
        ubatch=ubatch if ubatch is not None else run_cfg.context.ubatch,
        seed=run_cfg.sampling.seed,
        temperature=run_cfg.sampling.temperature,
        top_k=run_cfg.sampling.top_k,
        top_p=run_cfg.sampling.top_p,
    )
    s.batch = max(s.batch, s.ubatch)
    return s


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
        settings = settings_from(config, model, prompt, n_predict, threads, ctx, ubatch, log)
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
