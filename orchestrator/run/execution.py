"""Run an open model: the prompt, then the decode loop (drafted and verified in batches when a drafter is
attached), with tokens, timings, memory and the runtime's statistics per phase."""

from __future__ import annotations

import time
from collections.abc import Callable, MutableSequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator import computespeed, native
from orchestrator.errors import FlashflexError
from orchestrator.llamacpp import peak_rss_bytes
from orchestrator.run.spec import RuntimeSpec

if TYPE_CHECKING:
    from orchestrator.run.handle import Handle, Prepared
    from orchestrator.run.settings import GenerationSettings


# A prompt longer than this many bytes per context token cannot fit: refused before it is tokenized (a 50 MB prompt
# takes over a minute to tokenize). Generous: the longest tokens of common vocabularies are a few dozen bytes.
MAX_PROMPT_BYTES_PER_TOKEN = 128


@dataclass
class RunResult:
    model: str
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    load_s: float
    prompt_s: float
    decode_s: float
    prompt_tok_per_s: float
    decode_tok_per_s: float
    peak_rss_bytes: int
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(prepared: "Prepared") -> RunResult:
    """Open the prepared model, generate, close it: `flashflex run` (Ctrl-C stops a decode within a node)."""
    t0 = time.perf_counter()
    with native.interruptible(), prepared.session() as handle:
        return generate(handle, load_s=time.perf_counter() - t0)


def generate(handle: "Handle", load_s: float = 0.0) -> RunResult:
    """The prompt of the handle's settings, then up to n_predict tokens (drafted when a drafter is attached)."""
    try:
        return _generate(handle, load_s)
    except RuntimeError as exc:  # llama_decode failed: an aborted graph after a streaming or expert-read error
        raise decode_error(handle.llm, handle.prepared.spec, exc) from exc


def decode_error(llm: Any, spec: RuntimeSpec, exc: Exception) -> BaseException:
    """One line for a failed llama_decode: the runtime's own reason (I/O error, diverged replay) when it has one;
    KeyboardInterrupt when Ctrl-C aborted it (native.interruptible)."""
    if native.interrupt_requested():
        return KeyboardInterrupt()
    reason = native.model_error(llm.model) if spec.native else None
    if reason:
        fix = ("replay the trace with the model, prompt and settings it was recorded with"
               if "replayed trace" in reason else "check the model file, the sidecar and the disk")
        return FlashflexError(f"the run stopped: {reason}", fix)
    return FlashflexError(f"llama.cpp failed during the run ({exc})",
                          "rerun with FLASHFLEX_DEBUG=1 to see llama.cpp's log")


def reset_stats(llm: Any, spec: RuntimeSpec) -> None:
    """Zero the runtime's counters (the load's initial reads are not the prompt's)."""
    if spec.stream is not None:
        native.model_stats_reset(llm.model)
    if spec.banks is not None:
        native.moe_stats_reset(llm.model)


def runtime_stats(llm: Any, spec: RuntimeSpec) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(dense streaming, expert banks) counters since the last reset; None for a path the spec does not use."""
    return (native.model_stats(llm.model) if spec.stream is not None else None,
            native.moe_stats(llm.model) if spec.banks is not None else None)


def runtime_summary(raw: dict[str, Any]) -> dict[str, Any]:
    """The runtime counters a server's user reads first, beside the full ones under `runtime` (both engines'
    /flashflex/stats)."""
    out: dict[str, Any] = {"runtime": raw}
    memory = raw.get("memory")
    if memory and memory.get("buffers") is not None:
        out["devices"] = memory["buffers"]  # bytes of weights and KV cache per buffer type (device), as `run` reports
    stream = raw.get("stream")
    if stream:
        out["streamed_bytes_read"] = stream.get("bytes_read")
    moe = raw.get("moe")
    if moe:
        out["bank_hit_rate"] = moe.get("hit_rate")
        out["bank_bytes_read"] = moe.get("bytes_read")
        passes = moe.get("calls") or 0
        out["bank_experts_resolved_per_pass"] = (moe.get("hits", 0) + moe.get("misses", 0)) / passes if passes \
            else None
    return out


def _phase_stats(raw: dict[str, Any] | None, n_tokens: int, seconds: float) -> dict[str, Any] | None:
    if raw is None:
        return None
    per_token = raw["bytes_read"] / n_tokens if n_tokens else 0.0
    return {
        **raw,
        "tokens": n_tokens,
        "bytes_read_per_token": per_token,
        "compute_seconds": max(0.0, seconds - raw["wait_seconds"]),
        "achieved_read_bandwidth": raw["bytes_read"] / raw["read_seconds"] if raw["read_seconds"] > 0 else 0.0,
        "effective_read_bandwidth": raw["bytes_read"] / seconds if seconds > 0 else 0.0,
    }


def _moe_phase_stats(raw: dict[str, Any] | None, n_tokens: int, seconds: float) -> dict[str, Any] | None:
    if raw is None:
        return None
    return {
        **raw,
        "tokens": n_tokens,
        "misses_per_token": raw["misses"] / n_tokens if n_tokens else 0.0,
        # a pass resolves the union of its tokens' experts in one banked layer (several passes when the union
        # exceeds the bank): under batching the experts per pass grow and the passes per generated token fall
        "passes": raw["calls"],
        "experts_resolved_per_pass": (raw["hits"] + raw["misses"]) / raw["calls"] if raw["calls"] else 0.0,
        "experts_resolved_per_token": (raw["hits"] + raw["misses"]) / n_tokens if n_tokens else 0.0,
        "bytes_read_per_token": raw["bytes_read"] / n_tokens if n_tokens else 0.0,
        # read_seconds adds up the I/O threads' time; install_seconds is what compute waited for
        "achieved_read_bandwidth": raw["bytes_read"] / raw["install_seconds"] if raw["install_seconds"] > 0 else 0.0,
        "seconds": seconds,
        **_prefetch_stats(raw),
    }


def _prefetch_stats(raw: dict[str, Any]) -> dict[str, Any]:
    """Prefetch hit rate (read-ahead experts the next call needed), and an estimate of the time it saved: each
    used prefetch spared compute one demand read, costed at this phase's compute-thread time per demand miss,
    minus the time compute waited for reads still in flight. The A/B in `flashflex bench prefetch` measures it."""
    issued = raw.get("prefetch_issued", 0)
    if not issued:
        return {}
    per_miss = raw["install_seconds"] / raw["misses"] if raw["misses"] else 0.0
    return {"prefetch_hit_rate": min(1.0, raw["prefetch_used"] / issued),
            "prefetch_time_saved_estimate_seconds": raw["prefetch_used"] * per_miss - raw["prefetch_wait_seconds"]}


class RPCTraffic:
    """Bytes on the connections to the RPC workers per phase of a run, as the kernel counted them (rpc.traffic):
    measured, not computed. Nothing without workers, or where the counters are not available."""

    def __init__(self, spec: RuntimeSpec):
        from orchestrator import rpc

        self.endpoints = sorted({d.endpoint for d in spec.placement.devices if d.endpoint != rpc.LOCAL}
                                ) if spec.placement is not None else []
        self.phases: dict[str, dict[str, Any]] = {}
        self.last = self._now()

    def _now(self) -> tuple[int, int] | None:
        if not self.endpoints:
            return None
        from orchestrator import rpc

        return rpc.traffic(self.endpoints)

    def phase(self, name: str, n_tokens: int) -> None:
        now = self._now()
        if now is not None and self.last is not None:
            sent, received = now[0] - self.last[0], now[1] - self.last[1]
            self.phases[name] = {"bytes_sent": sent, "bytes_received": received, "tokens": n_tokens,
                                 "bytes_per_token": (sent + received) / n_tokens if n_tokens else None}
        self.last = now


def _plain_decode(llm: Any, n_new: int, settings: "GenerationSettings", out: list[int],
                  steps: MutableSequence[tuple[float, float]], waited: Callable[[], float] | None) -> None:
    """Up to n_new tokens, one decode each, appended to `out` (each step's seconds and seconds waited on reads to
    `steps` where `waited` is given). One sampler chain for the whole run, as llama-cpp-python's generate keeps:
    `Llama.sample` without one builds a chain per token whose vocabulary-sized buffer (3 MiB with Gemma's 262k
    tokens) lives until Python's cycle collector runs, which let the heap grow by up to 183 MiB outside the plan;
    and its random draws then go on from one token to the next instead of restarting from the seed."""
    sampler = llm._init_sampler(temp=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    eos = llm.token_eos()
    try:
        for _ in range(n_new):
            tok = sampler.sample(llm._ctx, -1)
            if tok == eos:
                break
            out.append(tok)
            w0 = waited() if waited is not None else 0.0
            t_step = time.perf_counter()
            llm.eval([tok])
            if waited is not None:
                steps.append((time.perf_counter() - t_step, waited() - w0))
    finally:
        sampler.close()


def _generate(handle: "Handle", load_s: float) -> RunResult:
    llm, settings, spec, drafter = handle.llm, handle.prepared.settings, handle.prepared.spec, handle.drafter
    plan = handle.prepared.plan
    # surrogateescape: a prompt from the command line that is not valid UTF-8 goes to the tokenizer as its bytes
    prompt = settings.prompt.encode("utf-8", "surrogateescape")
    if len(prompt) > MAX_PROMPT_BYTES_PER_TOKEN * settings.ctx:  # refused before a long tokenization
        raise FlashflexError(f"the prompt is {len(prompt)} bytes, far more than a context of {settings.ctx} tokens "
                             "holds", "shorten the prompt or raise --ctx")
    prompt_tokens = llm.tokenize(prompt, add_bos=True, special=False)
    # n_predict < 0 means "until end of text or a full context".
    n_new = settings.n_predict if settings.n_predict >= 0 else settings.ctx - len(prompt_tokens)
    if len(prompt_tokens) + n_new > settings.ctx:
        raise FlashflexError(f"prompt ({len(prompt_tokens)} tokens) + {n_new} new tokens exceed "
                             f"the context of {settings.ctx}", "raise --ctx or lower -n")
    reset_stats(llm, spec)
    wire = RPCTraffic(spec)
    t1 = time.perf_counter()
    llm.eval(prompt_tokens)
    prompt_s = time.perf_counter() - t1
    prompt_stream, prompt_moe = runtime_stats(llm, spec)
    wire.phase("prompt", len(prompt_tokens))
    reset_stats(llm, spec)

    out: list[int] = []
    t2 = time.perf_counter()
    waited = handle.waited_on_reads()
    steps: MutableSequence[tuple[float, float]] = []  # single-token steps: (seconds, seconds waited on reads)
    if drafter is not None:
        from orchestrator import speculative

        out = speculative.decode(llm, prompt_tokens, n_new, settings, drafter)
        steps = drafter.steps
    else:
        _plain_decode(llm, n_new, settings, out, steps, waited)
    decode_s = time.perf_counter() - t2
    decode_stream, decode_moe = runtime_stats(llm, spec)
    profile = computespeed.profile_of(list(steps), decode_stream["bytes_read"], decode_s) \
        if decode_stream is not None else None
    if profile is not None:  # what a later plan prices drafting's logits rows by
        computespeed.record(settings.model, settings.threads, profile)
    wire.phase("decode", len(out))
    text = llm.detokenize(out).decode(errors="replace")
    stats: dict[str, Any] = {"mode": spec.mode, "lossy": list(spec.lossy)}
    devices = native.memory_breakdown(llm.ctx)
    if devices is not None:
        stats["devices"] = devices  # bytes per buffer type (device), as llama.cpp allocated them
    if spec.placement is not None:
        stats["rpc"] = {**spec.placement.model_dump(mode="json"), "traffic": wire.phases or None}
    if drafter is not None:
        stats["draft"] = drafter.report()
    if spec.stream is not None and plan is not None:
        stats.update({
            "budget_bytes": plan.budget_bytes,
            "resident_bytes": plan.resident_bytes,
            "planned_streamed_bytes_per_token": plan.estimates.dense_streamed_bytes_per_token,
            "prompt": _phase_stats(prompt_stream, len(prompt_tokens), prompt_s),
            "decode": {**(_phase_stats(decode_stream, len(out), decode_s) or {}),
                       "step_compute_seconds": profile.step_compute_seconds if profile is not None else None},
        })
    if spec.banks is not None:
        stats["moe"] = {
            "sidecar": spec.banks.sidecar,
            "prompt": _moe_phase_stats(prompt_moe, len(prompt_tokens), prompt_s),
            "decode": _moe_phase_stats(decode_moe, len(out), decode_s),
        }
    return RunResult(
        model=str(settings.model), prompt_tokens=list(prompt_tokens), tokens=out, text=text,
        load_s=load_s, prompt_s=prompt_s, decode_s=decode_s,
        prompt_tok_per_s=len(prompt_tokens) / prompt_s if prompt_s > 0 else 0.0,
        decode_tok_per_s=len(out) / decode_s if decode_s > 0 and out else 0.0,
        peak_rss_bytes=peak_rss_bytes(), stats=stats,
    )
