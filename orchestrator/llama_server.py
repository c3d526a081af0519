"""`flashflex serve --engine llama-server`: llama.cpp's own server, built from the same patched tree, serving one model
under flashflex's plan with N slots decoded together (continuous batching: a decode pass reads each streamed weight
once for every sequence in it).

The plan pays for serving: the model is planned with a context of N slots x the per-request context (one unified KV
cache, as llama-server allocates it with --kv-unified), the compute buffers at the planned batch sizes, and no host
state outside the plan: no prompt cache (--cache-ram 0: upstream's default takes up to 8 GiB of RAM outside any budget)
and no context checkpoints (--ctx-checkpoints 0: copies of a sliding-window or recurrent model's state per slot, each
also one more pass over the streamed weights; tools.HOST_STATE_OFF); sliding-window layers keep the full-size cache
the plan measured (--swa-full), so a conversation's next turn reuses its slot's cached prompt without them.
A --parallel that cannot fit is refused; the default is lowered to what fits, and said. The logical batch is the
micro-batch unless a config sets it: prompts that arrive together then get their first tokens as their micro-batches
finish.
"""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from orchestrator.errors import BudgetBelowMinimum, FlashflexError

if TYPE_CHECKING:
    from orchestrator.run.handle import Prepared

DEFAULT_PARALLEL = 4
READY_TIMEOUT_S = 600.0  # a streamed model's load and llama-server's warmup decode (Vulkan: shader compiles)


@dataclass
class SlotPlan:
    prepared: Prepared  # planned for `parallel` x `ctx_per_slot`
    parallel: int
    ctx_per_slot: int
    lowered_from: int | None = None  # the default, when it did not fit


def plan_slots(config, options: dict, parallel: int | None, log: Callable[[str], None]) -> SlotPlan:
    """Plan the model of `config` (a RunConfig YAML, None, or a RunConfig with its options applied) with `options`
    for `parallel` slots (None: the default, lowered while it does not fit)."""
    from orchestrator import api
    from orchestrator.config import RunConfig, load_run_config
    from orchestrator.modelfile.reader import read_model_table
    from orchestrator.run.settings import settings_from_config

    cfg = (config.model_copy(deep=True) if isinstance(config, RunConfig)
           else load_run_config(config, api.overrides_from_options(options)))
    per_slot = cfg.context.ctx
    model = settings_from_config(cfg, chat=True).model
    n_train = read_model_table(model).arch.n_ctx_train
    wanted = parallel if parallel is not None else DEFAULT_PARALLEL
    if parallel is not None and n_train and per_slot * parallel > n_train:
        raise FlashflexError(f"--parallel {parallel} x --ctx {per_slot} = {per_slot * parallel} tokens is beyond "
                             f"{model.name}'s training context ({n_train})",
                             f"lower --parallel or --ctx (at most {n_train // per_slot} slots of {per_slot})")
    tries = [wanted] if parallel is not None else list(range(wanted, 0, -1))
    if n_train and parallel is None:
        tries = [n for n in tries if per_slot * n <= n_train] or [1]
    last: BudgetBelowMinimum | None = None
    for n in tries:
        slotted = cfg.model_copy(deep=True)
        slotted.context.ctx = per_slot * n
        if slotted.context.outputs is None:  # llama-server sizes its context for one output row per slot
            slotted.context.outputs = n
        if "batch" not in cfg.context.model_fields_set:
            # one decode call per micro-batch: a slot whose prompt ends in the first micro-batch samples its first
            # token after it, not after every prompt that arrived with it (each micro-batch is a pass over the
            # streamed weights either way); 8 clients at once on the 7B shape: TTFT p50 3.42 s against 4.29 s with
            # -b 512 (docs/benchmarks.md, "Many clients from one budget")
            slotted.context.batch = slotted.context.ubatch
        try:
            # drafting by prompt lookup where weights stream, as run and chat do: under a plan llama-server asks the
            # runtime, once its slots have drafted, how much of the drafts each pass keeps
            # (llama_flashflex_draft_lengths: no slot expecting less than 0.97x its plain rate), so the drafts a lone
            # client gains from stop where they would slow the other slots (docs/benchmarks.md, "Drafting inside
            # llama-server's slots")
            prepared = api.prepare(slotted, log=log, chat=True, draft_auto=True, draft_slots=n)
        except BudgetBelowMinimum as exc:
            last = exc
            continue
        return SlotPlan(prepared, n, per_slot, wanted if n != wanted else None)
    assert last is not None
    if parallel is not None:
        raise FlashflexError(f"--parallel {parallel} does not fit: {last.problem}",
                             f"lower --parallel, or {last.fix}") from last
    raise last


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG; nothing elsewhere)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = READY_TIMEOUT_S) -> None:
    """Until llama-server's /health answers 200 (the model loaded), or the server exits (its status, one line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlashflexError(f"llama-server exited with status {proc.returncode} while loading the model",
                                 "see its log above (the first lines name the problem)")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise FlashflexError(f"llama-server did not become ready within {timeout:.0f} s",
                         "check its log above; a large model may need longer to load")


def _free_loopback_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def url_of(host: str, port: int) -> str:
    """An address a browser or curl takes: an IPv6 host in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def draft_args(prepared: Prepared) -> list[str]:
    """llama-server's arguments for the plan's drafting: prompt lookup through upstream's `ngram-simple` drafter,
    which under the plan (spec option prompt_lookup) drafts by flashflex's lookup, `run`'s (the last N tokens'
    most recent earlier occurrence, else past a changed last token, else shorter n-grams), at most the planned
    length per slot; the runtime cuts each pass's drafts to what the pass affords (llama_flashflex_draft_lengths)."""
    draft = prepared.draft
    if draft is None:
        return []
    if draft.kind != "prompt-lookup":  # serve_cmd sends a draft model to the python engine
        raise FlashflexError(f"llama-server drafts by prompt lookup, not by {draft.kind}",
                             "use --engine python to draft with a model")
    return ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", str(lookup_ngram(prepared)),
            "--spec-ngram-simple-size-m", str(draft.max_tokens)]


def lookup_ngram(prepared: Prepared) -> int:
    """The n-gram llama-server looks up: the plan's where flashflex's lookup drafts (it falls back to shorter ones);
    where no plan runs (upstream's lookup, which drafts nothing shorter than its n-gram), no longer than the draft."""
    draft = prepared.draft
    if draft is None:
        raise ValueError("lookup_ngram needs a plan that drafts")
    return (draft.ngram or 3) if prepared.spec.prompt_lookup else min(draft.ngram or 1, draft.max_tokens)


def serve(slots: SlotPlan, server, log: Callable[[str], None], on_ready: Callable[[str], None] | None = None,
          extra_args: list[str] | None = None) -> int:
    """Run llama-server under the plan on a private loopback port, behind the front door (orchestrator.front_door)
    on the server's address, until SIGINT/SIGTERM (the front drains for server.shutdown_grace_s, then llama-server
    gets one SIGTERM) or llama-server exits. Returns llama-server's exit status (0 after a requested stop)."""
    import asyncio

    import uvicorn

    from orchestrator import front_door, native, tools
    from orchestrator.llamacpp import return_freed_memory
    from orchestrator.modelfile.reader import vocab_size
    from orchestrator.run import loader

    prepared = slots.prepared
    spec_path = None
    if prepared.spec.native:
        spec_path = loader.write_native_spec(prepared.spec)
        native.check_spec(spec_path)
    internal_port, internal_key = _free_loopback_port(), front_door.new_internal_key()
    args = ["--host", "127.0.0.1", "--port", str(internal_port), "--api-key", internal_key, "--metrics",
            "--no-webui", "-a", prepared.settings.model.name, "-n", str(server.max_tokens_cap or -1)]
    command = tools.command_for(prepared, "llama-server", spec_path,
                                [*args, *draft_args(prepared), *(extra_args or [])], parallel=slots.parallel)
    log(" ".join("KEY" if part == internal_key else part for part in command))
    # Its own session: a terminal's Ctrl-C (sent to the whole foreground group) reaches only us, and we send one
    # SIGTERM after draining (llama-server takes a second signal as "terminate immediately", skipping its clean
    # shutdown). It gets SIGTERM too if we die first (Linux), so it never outlives its supervisor.
    # Everything this process needs from the model file is read before llama-server loads: parsing a GGUF's header
    # (a 262k-token vocabulary) takes a few hundred MiB for a moment, which beside a loaded llama-server would
    # exceed a memory limit sized for the plan; what planning freed goes back to the system for the same reason.
    n_vocab = vocab_size(prepared.settings.model)
    return_freed_memory()
    proc = subprocess.Popen(command, start_new_session=True, preexec_fn=_terminate_with_parent)
    stopping = False

    def stop_while_loading(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop_while_loading) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        upstream = f"http://127.0.0.1:{internal_port}"
        try:
            wait_ready(upstream, proc)
        except FlashflexError:
            if stopping:  # stopped while loading: not a failure
                return proc.wait()
            raise
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        if stopping:
            return proc.wait()
        door = front_door.FrontDoor(
            upstream, internal_key, api_key=server.api_key, slots=slots.parallel, queue=server.queue,
            ctx_per_slot=slots.ctx_per_slot, n_vocab=n_vocab,
            grace_s=server.shutdown_grace_s, summary=prepared.summary, model_name=prepared.settings.model.name)
        died: list[int] = []

        class Front(uvicorn.Server):
            def handle_exit(self, sig: int, frame) -> None:
                if sig == signal.SIGINT and door.stopping.is_set():
                    self.force_exit = True  # a second Ctrl-C: now
                if not door.stopping.is_set():
                    loop = asyncio.get_event_loop()
                    loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

            async def _drain(self) -> None:
                await door.drain()
                self.should_exit = True

            async def on_tick(self, counter: int) -> bool:  # every 0.1 s: also ends when llama-server does
                if proc.poll() is not None and not door.stopping.is_set() and not died:
                    died.append(proc.returncode)
                    self.should_exit = True
                return await super().on_tick(counter)

        front = Front(uvicorn.Config(door, host=server.host, port=server.port, log_level="warning",
                                     lifespan="on", timeout_graceful_shutdown=1))
        if on_ready is not None:
            on_ready(url_of(server.host, server.port))
        asyncio.run(front.serve())
        if died:
            raise FlashflexError(f"llama-server exited with status {died[0]} while serving",
                                 "see its log above; the front door stopped with it")
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=max(2.0, server.shutdown_grace_s))
        except subprocess.TimeoutExpired:
            log(f"llama-server did not stop within {max(2.0, server.shutdown_grace_s):.0f} s; killing it")
            proc.kill()
        return 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if spec_path is not None:
            Path(spec_path).unlink(missing_ok=True)
