"""`flashflex serve`: the OpenAI-compatible server (llama-cpp-python's), every model through flashflex's plan."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from orchestrator import modes
from orchestrator.cli.common import err_console
from orchestrator.cli.options import ConfigArg, model_options_command
from orchestrator.errors import FlashflexError


def _server_deps() -> None:
    try:
        import fastapi  # noqa: F401
        import llama_cpp.server.app  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise FlashflexError(f"the server dependencies are missing ({exc.name})",
                             "pip install -e '.[server]' (uvicorn, fastapi, sse-starlette, ...)") from exc


def load_entries(config: Path | None, options: dict, server_overrides: dict, log):
    """(served entries, server settings) from a serve file, a RunConfig YAML or flags alone; every model is
    planned and checked now, so a combination `run` refuses is refused before the server starts."""
    from orchestrator import api
    from orchestrator.config import RunConfig, ServerConfig, is_serve_file, load_serve_file
    from orchestrator.server import ServedEntry

    if config is not None and is_serve_file(config):
        serve_file = load_serve_file(config, api.overrides_from_options(options), server_overrides)
        entries = []
        for i, model in enumerate(serve_file.models):
            data = model.model_dump(exclude_unset=True)
            alias = data.pop("alias", None) or (model.model.path.name if model.model.path else "default")
            prepared = api.prepare(RunConfig.model_validate(data), log=log, chat=True, own_decodes=True)
            entries.append(ServedEntry(alias, prepared))
        return entries, serve_file.server
    prepared = api.prepare(config, log=log, chat=True, own_decodes=True, **options)
    server = ServerConfig.model_validate({k: v for k, v in server_overrides.items() if v is not None})
    return [ServedEntry(prepared.settings.model.name, prepared)], server


def startup_lines(entries, server) -> list[str]:
    lines = []
    for e in entries:
        s = e.prepared.summary()
        what = f"{e.alias}: {s['mode']}"
        plan = s.get("plan")
        if plan and s["mode"] != modes.STOCK:
            what += (f", budget {plan['budget_bytes'] / 2**20:.0f} MiB, resident weights "
                     f"{plan['resident_bytes'] / 2**20:.0f} MiB")
        if s.get("moe"):
            what += f", {s['moe']['slots']} expert slots per layer"
        draft = s.get("draft")
        if draft:
            what += (f", drafts {draft['kind']}" + (f" {Path(draft['model']).name}" if draft["model"]
                                                    else f":{draft['ngram']}")
                     + f" (up to {draft['max_tokens']} per verification)")
        lines.append(what)
        lines += placement_lines(e.prepared)
        lines += [f"LOSSY ({e.alias}): {reason}; output differs from stock" for reason in e.prepared.lossy]
    return lines


def placement_lines(prepared) -> list[str]:
    """Where the layers go when some are on a GPU or an RPC worker's device (plan --explain's device lines)."""
    from orchestrator.planner.explain import device_lines

    return device_lines(prepared.plan) if prepared.plan is not None else []


def choose_engine(config: Path | None, options: dict, server_overrides: dict) -> tuple[str, str | None]:
    """(the engine that serves, why when it was not asked for): llama-server unless what is served needs the
    python engine (several models, a draft model, a trace recorded) or the build ships no llama-server."""
    from orchestrator import tools
    from orchestrator.config import RunConfig, is_serve_file, load_run_config, load_serve_file

    engine = server_overrides.get("engine")
    configs: list[RunConfig] = []
    if config is not None and is_serve_file(config):
        served = load_serve_file(config, {}, {})
        engine = engine or served.server.engine
        configs = list(served.models)
        if engine == "auto" and len(configs) > 1:
            return "python", f"{len(configs)} models (llama-server serves one)"
    elif config is not None:
        configs = [load_run_config(config, {})]
    if engine not in (None, "auto"):
        return engine, None
    python_only = _python_only(options, configs)
    if python_only:
        return "python", python_only
    try:
        tools.locate("llama-server")
    except FlashflexError:
        return "python", "this build ships no llama-server"
    return "llama-server", None


def _python_only(options: dict, configs: list) -> str | None:
    """What of the options or the served configs only the python engine does, or None: llama-server drafts by
    prompt lookup (flashflex's, through upstream's ngram-simple; each slot's length from the runtime under a plan),
    not with a draft model, and records no routing trace."""
    draft_flag = str(options.get("draft") or "")
    if options.get("draft_model") is not None or draft_flag == "model" or any(c.draft.kind == "model"
                                                                               for c in configs):
        return "a draft model (llama-server drafts by prompt lookup only)"
    if options.get("moe_trace") is not None or any(c.moe.trace is not None for c in configs):
        return "a routing trace (llama-server records none)"
    return None


def _serve_llama_server(config: Path | None, options: dict, server_overrides: dict) -> int:
    """One model under its plan in llama.cpp's server, N slots; returns the server's exit status."""
    from orchestrator import api, llama_server, tools
    from orchestrator.config import RunConfig, ServerConfig, is_serve_file, load_run_config, load_serve_file
    from orchestrator.modelfile.reader import arch_of

    model_config: Path | RunConfig | None = config
    server_settings = {k: v for k, v in server_overrides.items() if v is not None}
    if config is not None and is_serve_file(config):
        served = load_serve_file(config, api.overrides_from_options(options), server_settings)
        if len(served.models) != 1:
            raise FlashflexError(f"the llama-server engine serves one model, and {config} lists "
                                 f"{len(served.models)}", "list one model, or use --engine python for several models")
        model_config = RunConfig.model_validate(served.models[0].model_dump(exclude={"alias"}, exclude_unset=True))
        server_settings = served.server.model_dump(exclude_unset=True)
    python_only = _python_only(options, [model_config] if isinstance(model_config, RunConfig) else
                               ([] if model_config is None else [load_run_config(model_config, {})]))
    if python_only:
        raise FlashflexError(f"the llama-server engine does not serve {python_only}",
                             "drop it, or use --engine python")
    server = ServerConfig.model_validate(server_settings)
    from orchestrator.endpoints import check_can_listen, is_loopback

    tools.locate("llama-server")  # a build without it says so before anything is planned
    check_can_listen(server.host, server.port)
    slots = llama_server.plan_slots(model_config, options, server.parallel, err_console.print)
    if server.gather_ms is not None:
        if slots.prepared.plan is not None and slots.prepared.spec.native:
            slots.prepared.spec.gather_ms = server.gather_ms
        elif server.gather_ms > 0:
            err_console.print(f"[yellow]server.gather_ms {server.gather_ms} has no effect: nothing streams or is "
                              "banked under this plan, so requests have no weight pass to share[/]", soft_wrap=True)
    if slots.lowered_from is not None:
        err_console.print(f"[yellow]--parallel {slots.lowered_from} does not fit the budget: serving "
                          f"{slots.parallel} slot(s) (give --budget more, or --ctx less)[/]", soft_wrap=True)
    s = slots.prepared.summary()
    plan = s.get("plan")
    line = f"llama-server: {s['mode']}, {slots.parallel} slots x {slots.ctx_per_slot} tokens"
    if plan and s["mode"] != modes.STOCK:
        line += (f", budget {plan['budget_bytes'] / 2**20:.0f} MiB, resident weights "
                 f"{plan['resident_bytes'] / 2**20:.0f} MiB")
    draft, spec = slots.prepared.draft, slots.prepared.spec
    if draft is not None:
        # the runtime sizes each pass's drafts only for a model it runs (streamed weights, expert banks)
        adapted = spec.draft_adaptive and (spec.stream is not None or spec.banks is not None)
        line += (f", drafts by prompt lookup:{llama_server.lookup_ngram(slots.prepared)} (up to {draft.max_tokens} "
                 f"per slot and verification{', as many as each pass affords' if adapted else ''})")
    line += "; prompt cache and context checkpoints off (--cache-ram 0 --ctx-checkpoints 0)"
    if arch_of(slots.prepared.settings.model).recurrent:
        # checkpoints are what upstream rolls a recurrent state back with; they would hold memory outside the plan
        line += ("; recurrent layers: a turn whose prompt does not extend the conversation the slot holds is read "
                 "again from its start")
    err_console.print(f"[dim]{line}[/]", soft_wrap=True)
    for placed in placement_lines(slots.prepared):
        err_console.print(f"[dim]{placed}[/]", soft_wrap=True, highlight=False)
    if not is_loopback(server.host):
        err_console.print(f"[bold red]WARNING: listening on {server.host}: reachable from other machines"
                          f"{'' if server.api_key else ' with NO API key (anyone can use it; --api-key)'}[/]",
                          soft_wrap=True)
    def log(msg: str) -> None:
        err_console.print(msg, style="dim", soft_wrap=True, markup=False, highlight=False)

    return llama_server.serve(
        slots, server, log=log,
        on_ready=lambda url: err_console.print(f"serving {slots.prepared.settings.model.name} on {url}/v1 "
                                               f"({slots.parallel} slots; Ctrl-C to stop)", soft_wrap=True))


def register(app: typer.Typer) -> None:
    @app.command("serve")
    @model_options_command(exclude=("moe_shared_only",))
    def serve_cmd(
        config: ConfigArg = None,
        host: Optional[str] = typer.Option(None, "--host", help="Address to listen on (default 127.0.0.1; anything "
                                           "else is reachable from other machines)."),
        port: Optional[int] = typer.Option(None, "--port", min=1, max=65535, help="Port to listen on (default 8000)."),
        api_key: Optional[str] = typer.Option(None, "--api-key", help="Require `Authorization: Bearer KEY`."),
        max_tokens_cap: Optional[int] = typer.Option(None, "--max-tokens-cap", min=1,
                                                     help="Largest max_tokens a request may ask for "
                                                     "(default: the context)."),
        engine: Optional[str] = typer.Option(None, "--engine", help="llama-server (llama.cpp's server under the "
                                             "plan, --parallel slots decoded together, drafting by prompt lookup), "
                                             "python (flashflex's: several models, a draft model, "
                                             "traces; one request at a time), or auto "
                                             "(the default: llama-server unless what is served needs python)."),
        parallel: Optional[int] = typer.Option(None, "--parallel", "-np", min=1, max=256,
                                               help="llama-server engine: sequences decoded together (default 4, "
                                               "lowered to what the budget holds)."),
        queue: Optional[int] = typer.Option(None, "--queue", min=0, max=4096,
                                            help="llama-server engine: requests that may wait beyond the slots "
                                            "(default 16); more get HTTP 503 with Retry-After."),
        *,
        options: dict,
    ) -> None:
        """Serve models over the OpenAI API (/v1/completions, /v1/chat/completions with the model's chat
        template, streaming, /v1/models) through the same plan and runtime as `run`; /health and
        /flashflex/stats in JSON. CONFIG is a RunConfig YAML or a serve file listing several `models:`
        (loaded on demand). Concurrent requests queue. SIGINT/SIGTERM stop in-flight answers and exit."""
        from orchestrator import llama_server
        from orchestrator import server as srv

        server_overrides = {"host": host, "port": port, "api_key": api_key, "max_tokens_cap": max_tokens_cap,
                            "engine": engine, "parallel": parallel, "queue": queue}
        chosen, why = choose_engine(config, options, server_overrides)
        if why is not None:
            err_console.print(f"[dim]engine {chosen}: {why}[/]", soft_wrap=True)
        if chosen == "llama-server":
            raise typer.Exit(_serve_llama_server(config, options, server_overrides))
        for flag, value in (("--parallel", parallel), ("--queue", queue)):
            if value is not None:
                raise FlashflexError(f"{flag} applies to the llama-server engine"
                                     + (f", and the python engine serves here ({why})" if why else ""),
                                     "drop it, or serve what llama-server can (one model, no drafting or trace)"
                                     if why else "drop --engine python (the python engine answers one request at "
                                     "a time)")
        _server_deps()
        entries, settings = load_entries(config, options, server_overrides, err_console.print)
        srv.check_can_listen(settings.host, settings.port)
        for line in startup_lines(entries, settings):
            style = "yellow" if line.startswith("LOSSY") else "dim"
            err_console.print(f"[{style}]{line}[/]", soft_wrap=True)
        if not srv.is_loopback(settings.host):
            err_console.print(f"[bold red]WARNING: listening on {settings.host}: reachable from other machines"
                              f"{'' if settings.api_key else ' with NO API key (anyone can use it; --api-key)'}[/]",
                              soft_wrap=True)

        def ready() -> None:
            err_console.print(f"serving {', '.join(e.alias for e in entries)} on "
                              f"{llama_server.url_of(settings.host, settings.port)}/v1 (one request at a time; "
                              "Ctrl-C to stop)", soft_wrap=True)

        srv.serve(entries, settings, log=lambda msg: err_console.print(f"[dim]{msg}[/]", soft_wrap=True),
                  on_ready=ready)
