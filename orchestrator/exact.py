"""Exactness, flashflex's correctness oracle: the same teacher-forced tokens through the stock path and
through a configured mode must give bitwise-identical logits."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from orchestrator.run import loader
from orchestrator.run.execution import decode_error
from orchestrator.run.handle import Prepared
from orchestrator.run.settings import GenerationSettings


def teacher_tokens(n: int, n_vocab: int, seed: int = 0) -> list[int]:
    """A pseudo-random token sequence (not one repeated token), so every position sees different input."""
    rng = np.random.default_rng(seed)
    low = min(4, n_vocab - 1)  # skip the first ids, usually control tokens
    return [int(x) for x in rng.integers(low, n_vocab, size=n)]


def logits(prepared: Prepared, tokens: list[int]) -> np.ndarray:
    """Logits of every position for `tokens`, teacher-forced (one eval of the whole sequence), through the run
    `prepared` describes (`prepared.stock()`: stock llama.cpp with the same placement)."""
    from orchestrator import native

    with native.interruptible(), prepared.session(logits_all=True) as handle:
        try:
            handle.llm.eval(tokens)
        except RuntimeError as exc:  # an aborted graph: the runtime's reason in one line
            raise decode_error(handle.llm, prepared.spec, exc) from exc
        return np.array(handle.llm.scores[: len(tokens)], dtype=np.float32, copy=True)


@dataclass
class ExactResult:
    tokens: int
    n_vocab: int
    identical: bool
    max_abs_diff: float
    mismatched_positions: int

    def to_dict(self) -> dict:
        return asdict(self)


def compare(stock: np.ndarray, mode: np.ndarray) -> ExactResult:
    same = stock.view(np.uint32) == mode.view(np.uint32)  # bitwise, so NaN and -0.0 count too
    with np.errstate(invalid="ignore"):
        diff = np.abs(stock.astype(np.float64) - mode.astype(np.float64))
    max_diff = float(np.nanmax(diff)) if diff.size else 0.0
    return ExactResult(tokens=stock.shape[0], n_vocab=stock.shape[1], identical=bool(same.all()),
                       max_abs_diff=max_diff, mismatched_positions=int((~same.all(axis=1)).sum()))


def vocab_size(model) -> int:
    """The model's vocabulary size, from a vocab-only load (no weights read)."""
    vocab = loader.open_model(GenerationSettings(model=model, ctx=64), None, vocab_only=True)
    try:
        return vocab.n_vocab()
    finally:
        vocab.close()


def verify(prepared: Prepared, n_tokens: int, seed: int = 0) -> ExactResult:
    """The same pseudo-random tokens through stock (with the same placement) and through `prepared`."""
    tokens = teacher_tokens(n_tokens, vocab_size(prepared.settings.model), seed)
    return compare(logits(prepared.stock(), tokens), logits(prepared, tokens))
