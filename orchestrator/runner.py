"""Open a model through llama_cpp and run it, collecting tokens, timings and memory figures.

This is the stock path: a plain `llama_cpp.Llama`. Execution modes (dense streaming, slot banks) attach
their Plan to the model through orchestrator.native before it is opened.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import FlashflexError
from orchestrator.native import llama_cpp_module


@dataclass
class GenerationSettings:
    """What one run needs; built from a RunConfig or CLI flags."""

    model: Path
    prompt: str = "The quick brown fox"
    n_predict: int = 16  # < 0: until end of text or a full context
    threads: int | None = None
    ctx: int = 512
    batch: int = 512
    ubatch: int = 512
    seed: int = 0
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95


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


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@contextlib.contextmanager
def _quiet_native_stderr(enabled: bool = True):
    """llama.cpp logs to fd 2 from C; keep it off the terminal unless FLASHFLEX_DEBUG is set."""
    if not enabled or os.environ.get("FLASHFLEX_DEBUG"):
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def open_model(settings: GenerationSettings, logits_all: bool = False, **llama_kwargs: Any):
    """A `llama_cpp.Llama` for `settings.model` (stock path)."""
    llama_cpp_module()  # one clear line if llama_cpp is missing
    from llama_cpp import Llama

    try:
        with _quiet_native_stderr():
            return Llama(model_path=str(settings.model), n_ctx=settings.ctx, n_batch=settings.batch,
                         n_ubatch=settings.ubatch, n_threads=settings.threads, n_threads_batch=settings.threads,
                         seed=settings.seed, logits_all=logits_all, verbose=False, **llama_kwargs)
    except ValueError as exc:  # llama_cpp raises ValueError when llama.cpp cannot load the file
        raise FlashflexError(f"llama.cpp could not load {settings.model} ({exc})",
                             "check that the file is a complete GGUF of an architecture this llama.cpp supports "
                             "(FLASHFLEX_DEBUG=1 shows llama.cpp's log)") from exc


def generate(settings: GenerationSettings) -> RunResult:
    t0 = time.perf_counter()
    llm = open_model(settings)
    load_s = time.perf_counter() - t0

    prompt_tokens = llm.tokenize(settings.prompt.encode(), add_bos=True, special=False)
    # n_predict < 0 means "until end of text or a full context".
    n_new = settings.n_predict if settings.n_predict >= 0 else settings.ctx - len(prompt_tokens)
    if len(prompt_tokens) + n_new > settings.ctx:
        raise FlashflexError(f"prompt ({len(prompt_tokens)} tokens) + {n_new} new tokens exceed "
                             f"the context of {settings.ctx}", "raise --ctx or lower -n")
    t1 = time.perf_counter()
    llm.eval(prompt_tokens)
    prompt_s = time.perf_counter() - t1

    out: list[int] = []
    eos = llm.token_eos()
    t2 = time.perf_counter()
    for _ in range(n_new):
        tok = llm.sample(temp=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
        if tok == eos:
            break
        out.append(tok)
        llm.eval([tok])
    decode_s = time.perf_counter() - t2
    text = llm.detokenize(out).decode(errors="replace")
    result = RunResult(
        model=str(settings.model), prompt_tokens=list(prompt_tokens), tokens=out, text=text,
        load_s=load_s, prompt_s=prompt_s, decode_s=decode_s,
        prompt_tok_per_s=len(prompt_tokens) / prompt_s if prompt_s > 0 else 0.0,
        decode_tok_per_s=len(out) / decode_s if decode_s > 0 and out else 0.0,
        peak_rss_bytes=peak_rss_bytes(),
    )
    llm.close()
    return result
