"""Speculative decoding on the patched build: with the same draft settings, a budgeted run (dense streaming; MoE
slot banks) evaluates the same batches as stock llama.cpp and gets bitwise-identical logits for every verified
token; greedy output with drafting equals greedy output without it; a draft model of another vocabulary is
refused; the options reach run, chat and the Python API, and drafting's RAM comes off the plan's budget."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from orchestrator import api, exact, speculative, synth
from orchestrator.config import PrefetchConfig
from orchestrator.errors import FlashflexError
from orchestrator.modelfile.reader import read_model_table
from orchestrator.run.handle import Prepared
from orchestrator.run.settings import GenerationSettings
from tests.helpers import plan_table, prepare, prepared_of, with_settings

from conftest import flashflex

pytestmark = pytest.mark.native

CTX = 256
UBATCH = 8
N_NEW = 32
PROMPTS = ["the cat sat on the mat. the cat sat on the mat. the cat sat on",
           "one two three four five six, one two three four five six, one two"]


@pytest.fixture(scope="module")
def features(patched_llama):
    have = set(patched_llama.info()["features"])
    if not {"dense-stream", "slot-bank"} <= have:
        pytest.skip("the installed build predates dense streaming or slot banks; run flashflex build")
    return have


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The model (tiny llama, Q4_0: a type the CPU backend repacks), a smaller draft with the same vocabulary
    and other weights, and one with another vocabulary."""
    out = tmp_path_factory.mktemp("spec")
    return {
        "target": synth.write_synth_model(synth.preset("tiny-dense", quant="q4_0", n_embd=512, n_ff=1536),
                                          out / "target.gguf"),
        "small": synth.write_synth_model(synth.preset("tiny-dense", quant="q8_0", n_layer=2, seed=7),
                                         out / "small.gguf"),
        "other-vocab": synth.write_synth_model(synth.preset("tiny-dense", quant="q8_0", n_layer=1, n_vocab=600),
                                               out / "other-vocab.gguf"),
    }


def _settings(path: Path) -> GenerationSettings:
    return GenerationSettings(model=path, ctx=CTX, batch=64, ubatch=UBATCH, threads=2, temperature=0.0)


def _stream_execution(path: Path, threads: int = 2) -> Prepared:
    table = read_model_table(path)
    prefetch = PrefetchConfig(threads=threads, window=2)
    minimum = plan_table(table, 1 << 40, ctx=CTX, ubatch=UBATCH, prefetch=prefetch).minimum_budget_bytes
    prepared = prepared_of(_settings(path), plan_table(table, minimum, ctx=CTX, ubatch=UBATCH, prefetch=prefetch))
    assert prepared.spec.stream is not None
    return prepared


def _bank_execution(path: Path, sc: Path, mode: str = "slot-bank") -> Prepared:
    k = read_model_table(path).arch.n_expert_used
    ex = prepare({"model.path": path, "budget.size": "64GiB", "context.ctx": CTX, "context.ubatch": UBATCH,
                  "moe.mode": mode, "moe.sidecar": sc, "moe.slot_bank": k + 1 if mode == "slot-bank" else None},
                 _settings(path))
    assert ex.spec.banks is not None and ex.spec.banks.slots == (k + 1 if mode == "slot-bank" else 0)
    return ex


def _draft(kind: str, models: dict[str, Path], target: Path) -> speculative.DraftSetup:
    """Fixed-length drafts (adaptive off: the same drafts in every run, whatever the timing)."""
    if kind == "prompt-lookup":
        return speculative.DraftSetup(kind="prompt-lookup", ngram=2, max_tokens=4, adaptive=False)
    model = target if kind == "self" else models["small"]
    return speculative.DraftSetup(kind="model", model=model, max_tokens=4, adaptive=False)


class Run:
    """One greedy generation: its tokens, every decode call (tokens, first position, logits of its output rows)
    and the drafter's report."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.calls: list[tuple[list[int], int, np.ndarray]] = []
        self.report: dict | None = None

    def record(self, batch: list[int], n_past: int, logits: np.ndarray) -> None:
        self.calls.append((list(batch), n_past, logits))

    def rows_by_position(self) -> dict[int, np.ndarray]:
        """Logits predicting the token after each position, as last computed there (a position whose drafted
        token was rejected is computed again with the model's own token)."""
        out: dict[int, np.ndarray] = {}
        for batch, n_past, logits in self.calls:
            first = n_past + len(batch) - len(logits)  # one row: the last position only
            for i, row in enumerate(logits):
                out[first + i] = row
        return out


def _drafted(settings, ex: Prepared, draft: speculative.DraftSetup, prompt: str) -> Run:
    run = Run()
    with with_settings(ex, settings).session() as handle:
        llm = handle.llm
        drafter = draft.open(settings)
        try:
            speculative.attach(llm, drafter, max_batch=draft.max_tokens + 1, recorder=run.record)
            tokens = llm.tokenize(prompt.encode(), add_bos=True)
            llm.eval(tokens)
            run.tokens = speculative.decode(llm, tokens, N_NEW, settings, drafter)
            run.report = drafter.report()
        finally:
            drafter.close()
    return run


def _plain(settings, ex: Prepared, prompt: str) -> Run:
    """Greedy without drafting, one token per decode, with the logits of every step."""
    import llama_cpp

    run = Run()
    with with_settings(ex, settings).session() as handle:
        llm = handle.llm
        tokens = llm.tokenize(prompt.encode(), add_bos=True)
        llm.eval(tokens)
        n_vocab, eos = llm.n_vocab(), llm.token_eos()
        pos = len(tokens) - 1
        for _ in range(N_NEW):
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()
            run.calls.append(([int(llm.input_ids[pos])], pos, row[None, :]))
            tok = int(np.argmax(row))
            if tok == eos:
                break
            run.tokens.append(tok)
            llm.eval([tok])
            pos += 1
    return run


def _assert_same_batches_and_logits(stock: Run, mode: Run, what: str) -> None:
    assert len(stock.calls) == len(mode.calls), f"{what}: {len(stock.calls)} decode calls vs {len(mode.calls)}"
    for i, ((sb, sp, sl), (mb, mp, ml)) in enumerate(zip(stock.calls, mode.calls)):
        assert (sb, sp) == (mb, mp), f"{what}: decode call {i} differs: {sp}:{sb} vs {mp}:{mb}"
        result = exact.compare(sl, ml)
        assert result.identical, f"{what}: decode call {i} (position {sp}, {len(sb)} tokens): {result}"
    assert stock.tokens == mode.tokens


def _assert_same_greedy(plain: Run, drafted: Run, what: str) -> None:
    """Greedy output with drafts equals greedy output without; where a verification batch's rounding flips a
    token, the failure shows by how much the model preferred its token."""
    if plain.tokens == drafted.tokens:
        return
    i = next((j for j, (a, b) in enumerate(zip(plain.tokens, drafted.tokens)) if a != b),
             min(len(plain.tokens), len(drafted.tokens)))
    start = plain.calls[0][1]  # the prompt's last position predicts the first new token
    ref = plain.rows_by_position()[start + i]
    top2 = np.sort(ref)[-2:]
    got = drafted.rows_by_position().get(start + i)
    delta = float(np.max(np.abs(got.astype(np.float64) - ref))) if got is not None else float("nan")
    pytest.fail(f"{what}: greedy output differs at new token {i}: without drafting "
                f"{plain.tokens[i] if i < len(plain.tokens) else 'end'} (logit margin over the runner-up "
                f"{top2[1] - top2[0]:.6g}), with drafting {drafted.tokens[i] if i < len(drafted.tokens) else 'end'};"
                f" max |Δlogit| at that position between the single-token step and the verification batch "
                f"{delta:.3g}")


@pytest.mark.parametrize("kind", ["prompt-lookup", "self", "small"])
def test_dense_streaming_with_drafts_is_bitwise_exact(features, models, kind):
    path = models["target"]
    settings, draft = _settings(path), _draft(kind, models, path)
    ex = _stream_execution(path)
    for prompt in PROMPTS:
        stock = _drafted(settings, ex.stock(), draft, prompt)  # stock with the plan's weight layout
        streamed = _drafted(settings, ex, draft, prompt)
        _assert_same_batches_and_logits(stock, streamed, f"dense-stream, draft {kind}, {prompt[:20]!r}")
        assert streamed.report["verifications"] >= 1
        if kind != "prompt-lookup":
            assert streamed.report["drafted_tokens"] > 0
        if kind == "self":  # the model drafting for itself: its drafts are kept
            assert streamed.report["accepted_tokens"] > 0
        assert any(len(batch) > 1 for batch, n_past, _ in streamed.calls[1:]), "no verification batch ran"


class _ScheduledLookup(speculative.PromptLookupDrafter):
    """Prompt lookup that drafts only on the calls a fixed pattern marks, plain steps otherwise: at a plain step
    the rows' memory is lent to streamed weights, and taken back for the next verification, at the same steps in
    every run."""

    PATTERN = (True, True, False, False, False, True, False, False, False, False, False, True, True)

    def __init__(self) -> None:
        super().__init__(speculative.DraftLength(4, adaptive=False), ngram=2)
        self.n_calls = 0

    def draft(self, ids: np.ndarray, k: int) -> np.ndarray:
        on = self.PATTERN[self.n_calls % len(self.PATTERN)]
        self.n_calls += 1
        return super().draft(ids, k) if on else np.zeros(0, dtype=np.intc)


def _lending(settings, ex: Prepared, prompt: str) -> tuple[Run, dict]:
    """_drafted with the scheduled drafter and the plan's lender; also the runtime's counters."""
    from orchestrator import native

    run = Run()
    with with_settings(ex, settings).session() as handle:
        llm = handle.llm
        drafter = _ScheduledLookup()
        speculative.attach(llm, drafter, max_batch=5, recorder=run.record, lend=handle.row_lender())
        tokens = llm.tokenize(prompt.encode(), add_bos=True)
        llm.eval(tokens)
        run.tokens = speculative.decode(llm, tokens, N_NEW, settings, drafter)
        run.report = drafter.report()
        stats = native.model_stats(llm.model) or {}
    return run, stats


@pytest.mark.parametrize("threads", [2, 0])
def test_rows_lent_to_streamed_weights_keep_the_logits_bitwise_exact(features, models, threads):
    """The memory drafting reserves for a verification batch's rows, lent to streamed weights between
    verifications (their reads skipped) and taken back before each: every decode's logits equal stock's with the
    same drafts, with prefetch threads and with synchronous reads."""
    if "lent-rows" not in features:
        pytest.skip("the installed build predates lent rows; run flashflex build")
    path = models["target"]
    settings = _settings(path)
    ex = _stream_execution(path, threads=threads)
    stream = ex.spec.stream.model_copy(update={"lent_bytes": 2 << 20})
    ex = dataclasses.replace(ex, spec=ex.spec.model_copy(update={"stream": stream}))
    stock, _ = _lending(settings, ex.stock(), PROMPTS[0])
    lent, stats = _lending(settings, ex, PROMPTS[0])
    _assert_same_batches_and_logits(stock, lent, f"dense-stream, lent rows, -tp {threads}")
    assert lent.report["verifications"] >= 2
    assert stats["lent_tensors"] > 0 and 0 < stats["lent_bytes"] <= 2 << 20
    assert stats["lends"] >= 2, stats  # lent, taken back for a verification, lent again
    assert stats["lent_bytes_not_read"] > 0, stats


@pytest.mark.parametrize(("mode", "kind"), [("slot-bank", "prompt-lookup"), ("slot-bank", "self"),
                                           ("resident-bank", "prompt-lookup")])
def test_expert_banks_with_drafts_are_bitwise_exact(features, moe_models, mode, kind):
    """A verification batch routes to the union of its tokens' experts: a bank of top-k + 1 slots resolves it in
    passes, as for any ubatch."""
    path, sc = moe_models["qwen3moe"]
    settings = _settings(path)
    draft = _draft(kind, {}, path)
    for prompt in PROMPTS:
        stock = _drafted(settings, prepared_of(settings), draft, prompt)
        banked = _drafted(settings, _bank_execution(path, sc, mode), draft, prompt)
        _assert_same_batches_and_logits(stock, banked, f"{mode}, draft {kind}, {prompt[:20]!r}")
        if kind == "self":
            assert banked.report["accepted_tokens"] > 0


@pytest.mark.parametrize("kind", ["prompt-lookup", "self", "small"])
def test_greedy_output_is_the_same_with_and_without_drafts(features, models, kind):
    path = models["target"]
    settings, draft = _settings(path), _draft(kind, models, path)
    ex = _stream_execution(path)
    for prompt in PROMPTS:
        _assert_same_greedy(_plain(settings, ex, prompt), _drafted(settings, ex, draft, prompt),
                            f"dense-stream, draft {kind}, {prompt[:20]!r}")


def test_greedy_output_is_the_same_with_and_without_drafts_on_slot_banks(features, moe_models):
    path, sc = moe_models["qwen3moe"]
    settings = _settings(path)
    ex = _bank_execution(path, sc)
    for kind in ("prompt-lookup", "self"):
        for prompt in PROMPTS:
            _assert_same_greedy(_plain(settings, ex, prompt), _drafted(settings, ex, _draft(kind, {}, path), prompt),
                                f"slot-bank, draft {kind}, {prompt[:20]!r}")


def test_draft_model_with_another_vocabulary_is_refused(features, models):
    with pytest.raises(FlashflexError) as info:
        api.prepare(model=models["target"], draft_model=models["other-vocab"], ctx=CTX, ubatch=UBATCH)
    line = info.value.one_line()
    assert "\n" not in line
    assert "other-vocab.gguf" in line and "target.gguf" in line and "512 tokens vs 600" in line
    assert "same family and tokenizer" in line


def test_draft_model_ram_comes_off_the_budget(features, models):
    path = models["target"]
    plain = api.prepare(model=path, budget="64MiB", ctx=CTX, ubatch=UBATCH)
    drafted = api.prepare(model=path, budget="64MiB", ctx=CTX, ubatch=UBATCH, draft_model=models["small"])
    d = drafted.draft
    assert d is not None and d.kind == "model" and 1 <= d.max_tokens <= UBATCH - 1
    assert d.weights_bytes == models["small"].stat().st_size and d.kv_cache_bytes > 0 and d.compute_bytes > 0
    assert d.row_bytes == 2 * 4 * 512 and d.logits_bytes == d.max_tokens * d.row_bytes
    # one budget: drafting is a reservation of the plan, and the model's share is what is left
    assert drafted.plan.budget_bytes == plain.plan.budget_bytes == 64 << 20
    assert drafted.plan.reservations.draft_bytes == d.resident_bytes and plain.plan.reservations.draft_bytes == 0
    assert drafted.plan.used_bytes <= 64 << 20 and drafted.plan.resident_bytes <= plain.plan.resident_bytes
    summary = drafted.summary()["draft"]
    assert summary["resident_bytes"] == d.resident_bytes and summary["total_budget_bytes"] == 64 << 20


def test_run_cli_drafts_and_shows_it(features, models):
    path = models["target"]
    common = ["--model", str(path), "--ctx", str(CTX), "--ubatch", str(UBATCH), "-t", "2", "-n", "24",
              "--prompt", PROMPTS[0]]
    dry = flashflex("run", *common, "--budget", "64MiB", "--draft", "prompt-lookup:2", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    summary = json.loads(dry.stdout)
    assert summary["draft"]["kind"] == "prompt-lookup" and summary["draft"]["ngram"] == 2
    assert summary["draft"]["max_tokens"] == UBATCH - 1
    assert summary["plan"]["budget_bytes"] == 64 << 20
    assert summary["plan"]["draft_bytes"] == summary["draft"]["resident_bytes"] > 0
    with_draft = flashflex("run", *common, "--draft", "prompt-lookup:2", "--json")
    without = flashflex("run", *common, "--json")
    assert with_draft.returncode == 0 and without.returncode == 0, with_draft.stderr + without.stderr
    a, b = json.loads(with_draft.stdout), json.loads(without.stdout)
    assert a["stats"]["draft"]["kind"] == "prompt-lookup" and a["stats"]["draft"]["verifications"] >= 1
    assert "draft" not in b["stats"]
    assert a["tokens"] == b["tokens"]  # stock here: no batch-size difference on these prompts
    text = flashflex("run", *common, "--draft", "prompt-lookup:2")
    assert "draft prompt-lookup" in text.stderr


def test_bad_draft_flags_are_one_line(features, models):
    result = flashflex("run", "--model", str(models["target"]), "--draft", "lookahead", "--dry-run")
    assert result.returncode != 0
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "draft.kind" in lines[0], result.stderr
    result = flashflex("run", "--model", str(models["target"]), "--draft", "prompt-lookup", "--ubatch", "1",
                       "--dry-run")
    assert result.returncode != 0 and "--ubatch 2 or more" in result.stderr


def test_python_api_and_chat_draft(features, models):
    path = models["target"]
    import orchestrator as ff

    with ff.llama(path, draft_model=models["small"], ctx=CTX, ubatch=UBATCH, threads=2) as llm:
        out = llm(PROMPTS[1], max_tokens=12, temperature=0)
        assert out["usage"]["completion_tokens"] >= 1
        stats = llm.flashflex.stats()
        assert stats["draft"]["kind"] == "model" and stats["draft_stats"]["verifications"] >= 1
        assert stats["draft_stats"]["drafted_tokens"] > 0
    chat = flashflex("chat", "--model", str(path), "--ctx", str(CTX), "--ubatch", str(UBATCH),
                     "--draft", "prompt-lookup", "--once", "say the cat sat on the mat", "-n", "8", "--json")
    assert chat.returncode == 0, chat.stderr


def test_serve_plans_the_draft_and_says_so(features, models):
    from orchestrator.cli.serve_cmd import load_entries, startup_lines

    entries, server = load_entries(None, {"model": models["target"], "ctx": CTX, "ubatch": UBATCH,
                                          "draft_model": models["small"]}, {}, lambda _msg: None)
    assert entries[0].prepared.draft is not None and entries[0].prepared.draft.kind == "model"
    assert "drafts model small.gguf (up to 7 per verification)" in startup_lines(entries, server)[0]


def test_run_drafts_by_default_where_weights_stream_and_rows_are_cheap(features, models):
    """draft.kind auto: `run` drafts by prompt lookup where the plan streams weights and a drafted token's rows
    fit the share of the reads; stock (nothing streams), `--draft none`, the Python API and a budget with no room
    beside the model's minimum do not; none of them is refused for it."""
    path = models["target"]
    base = {"model": path, "ctx": CTX, "ubatch": UBATCH}
    minimum = api.prepare(budget="1GiB", **base).plan.minimum_budget_bytes
    roomy = f"{minimum + (4 << 20)}B"
    notes: list[str] = []
    drafted = api.prepare(budget=roomy, draft_auto=True, log=notes.append, **base)
    assert drafted.draft is not None and drafted.draft.kind == "prompt-lookup" and drafted.draft.optional
    assert drafted.plan.draft is not None and drafted.plan.reservations.draft_bytes > 0
    assert drafted.plan.minimum_budget_bytes == minimum  # drafting by default does not raise the minimum
    assert api.prepare(budget=roomy, **base).draft is None  # the Python API: asked for, or none
    assert api.prepare(budget=roomy, draft_auto=True, draft="none", **base).draft is None
    assert api.prepare(draft_auto=True, **base).draft is None  # fits: stock stays stock
    tight = api.prepare(budget=f"{minimum}B", draft_auto=True, log=notes.append, **base)
    assert tight.draft is None and any("no room beside the model" in n for n in notes), notes
    common = ["--model", str(path), "--ctx", str(CTX), "--ubatch", str(UBATCH), "-t", "2", "-n", "8",
              "--prompt", PROMPTS[0], "--budget", roomy]
    on = json.loads(flashflex("run", *common, "--dry-run", "--json").stdout)
    off = json.loads(flashflex("run", *common, "--draft", "none", "--dry-run", "--json").stdout)
    assert on["draft"]["kind"] == "prompt-lookup" and "draft" not in off
    ran = flashflex("run", *common, "--json")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["stats"]["draft"]["kind"] == "prompt-lookup"


def test_a_streamed_run_measures_its_decode_and_a_later_plan_prices_rows_by_it(features, models, tmp_path,
                                                                              monkeypatch):
    """`run` (run.execution) times its single-token steps less their waits on reads, and the rate its reads
    arrived at, and records them (computespeed); the next plan of the same model and threads prices drafting's rows
    in time by them."""
    from orchestrator import computespeed
    from orchestrator.run import execution

    where = tmp_path / "decode.json"
    monkeypatch.setattr(computespeed, "cache_file", lambda model, threads: where)
    path = models["target"]
    ex = with_settings(_stream_execution(path), dataclasses.replace(_settings(path), n_predict=12,
                                                                   prompt=PROMPTS[0]))
    result = execution.run(ex)
    step = result.stats["decode"]["step_compute_seconds"]
    assert step is not None and 0 < step < result.decode_s
    profile = computespeed.measured(path, ex.settings.threads)
    assert profile is not None and profile.step_compute_seconds == pytest.approx(step)
    assert profile.read_bytes_per_second == pytest.approx(result.stats["decode"]["bytes_read"] / result.decode_s)
    base = {"model": path, "ctx": CTX, "ubatch": UBATCH, "threads": ex.settings.threads}
    minimum = api.prepare(budget="1GiB", **base).plan.minimum_budget_bytes
    budget = f"{minimum + (4 << 20)}B"
    measured = api.prepare(budget=budget, draft="prompt-lookup", **base).plan.draft
    assert measured is not None and "priced in time" in measured.pricing, measured.pricing
    where.unlink()
    unmeasured = api.prepare(budget=budget, draft="prompt-lookup", **base).plan.draft
    assert unmeasured is not None and "no streamed run of this model" in unmeasured.pricing
