"""`flashflex run` and `flashflex verify-exact`: generate with a model, or prove a mode exact against stock."""

from __future__ import annotations

from typing import Optional

import typer

from orchestrator import modes
from orchestrator.api import overrides_from_options
from orchestrator.cli.common import JsonOpt, console, emit_json, err_console
from orchestrator.cli.options import DRAFT_FLAGS, ConfigArg, model_options_command
from orchestrator.planner.explain import device_lines
from orchestrator.sizes import format_size


def register(app: typer.Typer) -> None:
    @app.command("run")
    @model_options_command()
    def run_cmd(
        config: ConfigArg = None,
        prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text."),
        n_predict: Optional[int] = typer.Option(None, "-n", "--n-predict", min=-1,
                                                help="Tokens to generate (-1: until end of text)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Check and plan everything, load nothing: print the "
                                     "mode, the plan summary and what the native runtime would be told (the "
                                     "RuntimeSpec; all of it with --json)."),
        json_out: JsonOpt = False,
        *,
        options: dict,
    ) -> None:
        """Generate text; --json prints token ids, text, timings, peak RSS and streaming and expert-bank
        statistics (hits, misses, hit rate, bytes read, read and install time, total and per layer)."""
        from orchestrator import api
        from orchestrator.config import load_run_config

        cfg = load_run_config(config, {**overrides_from_options(options), "prompt": prompt,
                                       "sampling.n_predict": n_predict})
        from orchestrator.run import execution

        prepared = api.prepare(cfg, log=err_console.print, draft_auto=True, own_decodes=True)
        settings = prepared.settings
        for reason in prepared.lossy:
            err_console.print(f"[yellow]LOSSY: {reason}; output differs from stock[/]")
        if dry_run:
            _dry_run(prepared, json_out)
            return
        result = execution.run(prepared)
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
        moe = (result.stats.get("moe") or {}).get("decode")
        if moe:
            line += (f" · {moe['mode']} {moe['slots']} slots: hit rate {moe['hit_rate']:.1%}, "
                     f"{moe['bytes_read_per_token'] / 2**20:.1f} MiB/token read")
            if moe["prefetch"] != "none":
                line += (f", prefetch {moe['prefetch']}: {moe['prefetch_used']}/{moe['prefetch_issued']} used, "
                         f"{moe['prefetch_wasted_bytes'] / 2**20:.1f} MiB wasted")
        draft = result.stats.get("draft")
        if draft:
            rate = draft["acceptance_rate"]
            line += (f" · draft {draft['kind']}: {draft['accepted_tokens']}/{draft['judged_tokens']} drafted tokens "
                     f"kept ({rate:.0%})" if rate is not None else f" · draft {draft['kind']}: nothing drafted")
            line += f", {len(result.tokens) / max(1, draft['verifications']):.2f} tokens per verification"
        err_console.print(f"[dim]mode {result.stats['mode']} · {line}[/]")
        trace = options["moe_trace"]
        if trace is not None and result.stats["mode"] == modes.SLOT_BANK:
            err_console.print(f"[dim]routing trace: {trace} (flashflex trace analyze {trace})[/]")

    @app.command("verify-exact")
    @model_options_command(exclude=("moe_topk", "moe_shared_only", *DRAFT_FLAGS))
    def verify_exact_cmd(
        config: ConfigArg = None,
        tokens: int = typer.Option(64, "--tokens", min=1, help="Teacher-forced tokens to compare."),
        seed: int = typer.Option(0, "--seed", help="Seed of the pseudo-random token sequence."),
        json_out: JsonOpt = False,
        *,
        options: dict,
    ) -> None:
        """Feed the same teacher-forced tokens through stock and through the configured mode; exit 0 only when
        every logit is bitwise identical."""
        from orchestrator import api, exact
        from orchestrator.config import load_run_config
        from orchestrator.errors import FlashflexError

        cfg = load_run_config(config, overrides_from_options(options))
        if tokens > cfg.context.ctx:
            raise FlashflexError(f"--tokens {tokens} exceeds the context of {cfg.context.ctx}", "raise --ctx")
        # the plan run makes (its teacher-forced harness holds every position's logits beside it), without drafts
        prepared = api.prepare(cfg, log=err_console.print, own_decodes=True)
        result = exact.verify(prepared, tokens, seed)
        spec = prepared.spec
        compared = spec.native or spec.use_mmap is False  # resident: stock's path without mmap
        mode = spec.mode if compared else f"{spec.mode} (nothing to compare: the budget needs no plan)"
        if spec.banks is not None and spec.banks.slots:
            mode += f" ({spec.banks.slots} slots)"
        if spec.banks is not None and spec.banks.prefetch != "none":
            mode += f", prefetch {spec.banks.prefetch}"
        if json_out:
            emit_json({"mode": mode, **result.to_dict()})
        else:
            verdict = "IDENTICAL" if result.identical else "DIFFERENT"
            console.print(f"{verdict}: {result.tokens} tokens × {result.n_vocab} logits, mode {mode}, "
                          f"max |Δ| = {result.max_abs_diff:g}, mismatched positions {result.mismatched_positions}")
        if not result.identical:
            raise typer.Exit(1)


def _dry_run(prepared, json_out: bool) -> None:
    """`run --dry-run`: what the run would do, from the same objects the run would use."""
    spec = prepared.spec
    summary = prepared.summary()
    if json_out:
        emit_json({**summary, "runtime_spec": spec.model_dump(mode="json")})
        return
    console.print(f"mode {summary['mode']} · model {summary['model']} · ctx {summary['ctx']} · "
                  f"ubatch {summary['ubatch']}", soft_wrap=True)
    plan = summary.get("plan")
    if plan:
        streamed = plan["streamed_bytes_per_token"] / 2**20
        console.print(f"budget {plan['budget_bytes'] / 2**20:.0f} MiB · resident weights "
                      f"{plan['resident_bytes'] / 2**20:.0f} MiB · streamed {streamed:.1f} MiB/token (planned)",
                      soft_wrap=True)
    if prepared.plan is not None:
        for line in device_lines(prepared.plan):
            console.print(line, soft_wrap=True, highlight=False)
    draft = summary.get("draft")
    if draft:
        what = draft["kind"] + (f" {draft['model']}" if draft["model"] else f":{draft['ngram']}")
        console.print(f"draft {what} · up to {draft['max_tokens']} tokens per verification"
                      f"{' (adaptive)' if draft['adaptive'] else ''} · {draft['resident_bytes'] / 2**20:.1f} MiB "
                      f"resident, reserved in the {draft['total_budget_bytes'] / 2**20:.0f} MiB budget", soft_wrap=True)
    if not spec.native:
        console.print("runtime: none (the stock path loads the model)")
    else:
        what = [f"{len(spec.files)} file(s)", f"direct I/O {spec.direct_io}"]
        if spec.stream is not None:
            what.append(f"{len(spec.stream.tensors)} streamed tensor(s), {spec.stream.prefetch_threads} prefetch "
                        f"thread(s), ring {format_size(spec.stream.ring_bytes)}")
        if spec.banks is not None:
            what.append(f"{len(spec.banks.tensors)} banked tensor(s), {spec.banks.slots} slots per layer, prefetch "
                        f"{spec.banks.prefetch}" + (f", trace {spec.banks.trace}" if spec.banks.trace else ""))
        console.print("runtime: " + " · ".join(what), soft_wrap=True)
