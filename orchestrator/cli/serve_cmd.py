"""`flashflex serve`: llama-cpp-python's OpenAI-compatible server, on the patched library."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from orchestrator.cli.common import err_console
from orchestrator.errors import FlashflexError


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        model: Optional[Path] = typer.Option(None, "--model", "-m", help="GGUF file (default: Gemma 3 270M Q4_K_M)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
        port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
        ctx: int = typer.Option(2048, "--ctx", "-c", min=16, help="Context size in tokens."),
        threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help="Compute threads."),
    ) -> None:
        """Serve a model over the OpenAI-compatible HTTP API of llama-cpp-python (llama_cpp.server)."""
        from orchestrator.models import resolve_model
        from orchestrator.native import llama_cpp_module

        llama_cpp_module()
        try:
            import uvicorn
            from llama_cpp.server.app import create_app
            from llama_cpp.server.settings import ModelSettings, ServerSettings
        except ImportError as exc:
            raise FlashflexError(f"the server dependencies are missing ({exc.name})",
                                 "pip install -e '.[server]' (uvicorn, fastapi, sse-starlette, ...)") from exc
        path = resolve_model(model, log=err_console.print)
        model_settings = ModelSettings(model=str(path), n_ctx=ctx, verbose=False,
                                       **({"n_threads": threads, "n_threads_batch": threads} if threads else {}))
        server_settings = ServerSettings(host=host, port=port)
        err_console.print(f"serving {path.name} on http://{host}:{port}/v1 (Ctrl-C to stop)")
        uvicorn.run(create_app(server_settings=server_settings, model_settings=[model_settings]),
                    host=host, port=port, log_level="warning")
