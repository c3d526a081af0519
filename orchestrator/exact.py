"""Exactness, flashflex's correctness oracle: the same teacher-forced tokens through the stock path and
through a configured mode must give bitwise-identical logits."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from orchestrator.planner import Plan
from orchestrator.runner import Execution, GenerationSettings, decode_error, open_model, session


def teacher_tokens(n: int, n_vocab: int, seed: int = 0) -> list[int]:
    """A pseudo-random token sequence (not one repeated token), so every position sees different input."""
    rng = np.random.default_rng(seed)
    low = min(4, n_vocab - 1)  # skip the first ids, usually control tokens
    return [int(x) for x in rng.integers(low, n_vocab, size=n)]


def logits(settings: GenerationSettings, plan: Plan | None, tokens: list[int],
           ex: Execution | None = None) -> np.ndarray:
    """Logits of every position for `tokens`, teacher-forced (one eval of the whole sequence), through the
    stock path (plan None, no ex; or ex.stock()) or a configured one."""
    from orchestrator import native

    ex = ex or Execution(plan=plan)
    with native.interruptible(), session(settings, ex, logits_all=True) as llm:
        try:
            llm.eval(tokens)
        except RuntimeError as exc:  # an aborted graph: the runtime's reason in one line
            raise decode_error(llm, ex, exc) from exc
        return np.array(llm.scores[: len(tokens)], dtype=np.float32, copy=True)


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


def verify(settings: GenerationSettings, plan: Plan | None, n_tokens: int, seed: int = 0,
           ex: Execution | None = None) -> ExactResult:
    # The vocabulary size picks the token range; a vocab-only load reads no weights.
    vocab = open_model(GenerationSettings(model=settings.model, ctx=settings.ctx), None, vocab_only=True)
    n_vocab = vocab.n_vocab()
    vocab.close()
    tokens = teacher_tokens(n_tokens, n_vocab, seed)
    # stock with the same placement: the same RPC workers and layer split, when the run has them
    stock = ex.stock() if ex is not None else None
    return compare(logits(settings, None, tokens, stock), logits(settings, plan, tokens, ex))
