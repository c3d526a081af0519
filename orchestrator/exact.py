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


def batched_logits(prepared: Prepared, sequences: list[list[int]], prompt: int) -> np.ndarray:
    """Logits of every position of several sequences decoded together, as a server's continuous batching decodes
    them: one batch with the first `prompt` tokens of every sequence, then one batch per step with each sequence's
    next token (teacher-forced). The batch composition is fixed by this harness, not by timing, so the stock path
    and a mode see the same passes. Shape: (len(sequences), len(sequence), n_vocab)."""
    import llama_cpp.llama_cpp as lowlevel

    from orchestrator import native

    n_seq, length = len(sequences), len(sequences[0])
    if any(len(s) != length for s in sequences) or not 0 < prompt <= length:
        raise ValueError("the sequences must have one length, longer than the prompt")
    steps = [[(i, j) for i in range(n_seq) for j in range(prompt)]]
    steps += [[(i, j) for i in range(n_seq)] for j in range(prompt, length)]
    # the prompt step asks for every row: llama.cpp sized for them as for any harness of all logits
    with native.interruptible(), prepared.session(n_seq_max=n_seq, n_outputs=max(len(s) for s in steps)) as handle:
        llm = handle.llm
        n_vocab = llm.n_vocab()
        out = np.empty((n_seq, length, n_vocab), dtype=np.float32)
        batch = lowlevel.llama_batch_init(max(len(s) for s in steps), 0, 1)
        try:
            for step in steps:
                batch.n_tokens = len(step)
                for k, (i, j) in enumerate(step):
                    batch.token[k], batch.pos[k], batch.n_seq_id[k] = sequences[i][j], j, 1
                    batch.seq_id[k][0], batch.logits[k] = i, True
                rc = lowlevel.llama_decode(llm.ctx, batch)
                if rc != 0:
                    raise decode_error(llm, prepared.spec, RuntimeError(f"llama_decode returned {rc}"))
                for k, (i, j) in enumerate(step):
                    row = lowlevel.llama_get_logits_ith(llm.ctx, k)
                    out[i, j] = np.ctypeslib.as_array(row, shape=(n_vocab,))
        finally:
            lowlevel.llama_batch_free(batch)
    return out


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
