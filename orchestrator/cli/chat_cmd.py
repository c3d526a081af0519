"""`flashflex chat`: an interactive terminal chat through the same plan and runtime as `run`."""

from __future__ import annotations

from typing import Optional

import typer

from orchestrator.cli.common import JsonOpt, err_console
from orchestrator.cli.options import ConfigArg, model_options_command


def register(app: typer.Typer) -> None:
    @app.command("chat")
    @model_options_command(exclude=("moe_shared_only",))
    def chat_cmd(
        config: ConfigArg = None,
        once: Optional[str] = typer.Option(None, "--once", help="Ask this one question, print the answer, exit "
                                           "(for scripts; with --json: one JSON object)."),
        system: Optional[str] = typer.Option(None, "--system", help="A system message for the conversation."),
        max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, help="Longest answer in tokens."),
        temperature: float = typer.Option(0.0, "--temperature", min=0.0, max=10.0, help="0 = greedy."),
        json_out: JsonOpt = False,
        *,
        options: dict,
    ) -> None:
        """Chat with a model in the terminal, answers streamed as they are generated, with the model's chat
        template. /reset, /stats, /help, /exit; Ctrl-C stops an answer and keeps the session."""
        from orchestrator import api, chat
        from orchestrator.errors import FlashflexError

        if json_out and once is None:
            raise FlashflexError("--json needs --once (the interactive chat has no JSON form)",
                                 "add --once \"QUESTION\" or drop --json")
        prepared = api.prepare(config, log=err_console.print, chat=True, draft_auto=True, own_decodes=True,
                               **options)
        for reason in prepared.lossy:
            err_console.print(f"[yellow]LOSSY: {reason}; output differs from stock[/]")
        conv = chat.Conversation(system=system, max_tokens=max_tokens, temperature=temperature)
        llm = prepared.open()
        note = chat.template_note(llm)
        if note:
            err_console.print(note, markup=False)
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

