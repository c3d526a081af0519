"""`flashflex chat`: an interactive terminal chat through the same plan and runtime as `run`."""

from __future__ import annotations

from typing import Optional

import typer

from orchestrator.cli.common import JsonOpt, err_console
from orchestrator.cli.options import (
    BudgetOpt,
    ConfigArg,
    CtxOpt,
    DirectIOOpt,
    ModelOpt,
    MoEIOThreadsOpt,
    MoEModeOpt,
    MoEPrefetchOpt,
    MoESidecarOpt,
    MoESlotBankOpt,
    MoETopkOpt,
    MoETraceOpt,
    MoEVerifyOpt,
    PrefetchThreadsOpt,
    PrefetchWindowOpt,
    ThreadsOpt,
    TraceForceOpt,
    UbatchOpt,
    model_options,
)


def register(app: typer.Typer) -> None:
    @app.command("chat")
    def chat_cmd(
        config: ConfigArg = None,
        model: ModelOpt = None,
        once: Optional[str] = typer.Option(None, "--once", help="Ask this one question, print the answer, exit "
                                           "(for scripts; with --json: one JSON object)."),
        system: Optional[str] = typer.Option(None, "--system", help="A system message for the conversation."),
        max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, help="Longest answer in tokens."),
        temperature: float = typer.Option(0.0, "--temperature", min=0.0, max=10.0, help="0 = greedy."),
        budget: BudgetOpt = None,
        prefetch_threads: PrefetchThreadsOpt = None,
        prefetch_window: PrefetchWindowOpt = None,
        direct_io: DirectIOOpt = None,
        threads: ThreadsOpt = None,
        ctx: CtxOpt = None,
        ubatch: UbatchOpt = None,
        moe_mode: MoEModeOpt = None,
        moe_sidecar: MoESidecarOpt = None,
        moe_slot_bank: MoESlotBankOpt = None,
        moe_topk: MoETopkOpt = None,
        moe_io_threads: MoEIOThreadsOpt = None,
        moe_trace: MoETraceOpt = None,
        moe_prefetch: MoEPrefetchOpt = None,
        force: TraceForceOpt = None,
        moe_verify: MoEVerifyOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Chat with a model in the terminal, answers streamed as they are generated, with the model's chat
        template. /reset, /stats, /help, /exit; Ctrl-C stops an answer and keeps the session."""
        from orchestrator import api, chat
        from orchestrator.errors import FlashflexError

        if json_out and once is None:
            raise FlashflexError("--json needs --once (the interactive chat has no JSON form)",
                                 "add --once \"QUESTION\" or drop --json")
        options = model_options(model, budget, prefetch_threads, prefetch_window, direct_io, threads, ctx, ubatch,
                                    moe_mode=moe_mode, moe_sidecar=moe_sidecar, moe_slot_bank=moe_slot_bank,
                                    moe_topk=moe_topk, moe_io_threads=moe_io_threads, moe_trace=moe_trace,
                                    moe_prefetch=moe_prefetch, moe_trace_force=force, moe_verify=moe_verify)
        prepared = api.prepare(config, log=err_console.print, **options)
        for reason in prepared.lossy:
            err_console.print(f"[yellow]LOSSY: {reason}; output differs from stock[/]")
        conv = chat.Conversation(system=system, max_tokens=max_tokens, temperature=temperature)
        llm = prepared.open()
        try:
            if once is not None:
                chat.once(llm, conv, once, as_json=json_out)
            else:
                chat.repl(llm, conv)
        except BaseException:
            llm.flashflex.failed = True
            raise
        finally:
            llm.close()

