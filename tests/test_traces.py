"""MoE routing traces, oracle replay and expert prefetch: recorded traces follow the schema; the simulated LRU
equals the runtime's hit counts on the same trace; oracle-all-hit, oracle-prefetch and router-lookahead keep
logits bitwise identical to stock; traces of another model or settings, malformed or truncated traces and
unknown policies are refused with one line; a failed run leaves no trace behind. The bank simulator is also
checked on hand-made traces (no native build needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from orchestrator import exact, native, traces
from orchestrator.errors import FlashflexError
from orchestrator.run import execution
from orchestrator.run.handle import Prepared
from orchestrator.run.settings import GenerationSettings
from tests.helpers import prepare, prepared_of, with_settings

from conftest import flashflex

CTX = 128


# ---------------------------------------------------------------------------------------------------------------
# The simulator on hand-made traces


def _header(n_expert: int = 8, k: int = 1, layers=(0,), slots: int = 2) -> traces.TraceHeader:
    return traces.TraceHeader(
        format=traces.FORMAT, version=traces.VERSION,
        model=traces.TraceModel(architecture="test", n_expert=n_expert, n_expert_used=k, n_layer=len(layers),
                                fingerprint="f" * 64),
        layers=list(layers), k=k, ubatch=1, slots=slots, prefetch="none", mode="slot-bank")


def _records(calls: list[list[int]], layer: int = 0, k: int = 1) -> list[traces.TraceRecord]:
    out = []
    for i, ids in enumerate(calls):
        out.append(traces.TraceRecord(seq=i, ubatch=i + 1, layer=layer, tokens=len(ids) // k, k=k, ids=ids,
                                      slots=[0] * len(ids), hit=[0] * len(ids)))
    return out


def test_lru_lfu_and_belady_on_a_known_sequence():
    # 2 slots, one expert per token: a b c a b c ... LRU always misses; Belady keeps one of them each time.
    seq = [[e] for e in [0, 1, 2] * 4]
    recs = _records(seq)
    lru = traces.simulate(recs, "lru", 2)
    belady = traces.simulate(recs, "belady", 2)
    assert (lru.hits, lru.misses) == (0, 12)
    assert belady.hits == 5 and belady.misses == 7
    # LFU keeps the most used: 0 0 0 1 0 ... hits every 0 after the first
    lfu = traces.simulate(_records([[0], [0], [1], [0], [2], [0], [1]]), "lfu", 2)
    assert lfu.hits == 3  # the 0s after the first; 1 is evicted by 2, so the last 1 misses


def test_belady_is_never_worse_than_lru_or_lfu_and_grows_with_the_bank():
    import random

    rng = random.Random(3)
    calls = [[rng.choice([0, 0, 1, 2, 3, 4, 5, 6, 7]) for _ in range(2)] for _ in range(200)]
    calls = [c if c[0] != c[1] else [c[0], (c[0] + 1) % 8] for c in calls]
    recs = _records(calls, k=2)
    previous = -1.0
    for slots in range(2, 9):
        b = traces.simulate(recs, "belady", slots)
        assert b.hits >= traces.simulate(recs, "lru", slots).hits
        assert b.hits >= traces.simulate(recs, "lfu", slots).hits
        assert b.hit_rate >= previous
        previous = b.hit_rate
    assert traces.simulate(recs, "lru", 8).misses == 8  # every expert resident: only cold misses


def test_fewer_experts_per_token_keep_each_tokens_first_ids():
    recs = _records([[0, 5], [1, 6], [0, 7]], k=2)
    one = traces.simulate(recs, "lru", 2, k=1)
    assert (one.hits, one.misses) == (1, 2)  # 0, 1, 0 with two slots
    assert one.tokens == 3


def test_recommendation_respects_the_budget():
    recs = _records([[e] for e in [0, 1, 2, 3] * 10])
    results = [traces.simulate(recs, "lru", s).to_dict() for s in (1, 2, 3, 4)]
    rec = traces.recommend(results, k=1, bytes_per_expert=100, n_layers=1, budget_bytes=None, n_expert=8)
    assert rec["slots"] == 4  # the only bank that hits
    rec = traces.recommend(results, k=1, bytes_per_expert=100, n_layers=1, budget_bytes=350, n_expert=8)
    assert rec["slots"] == 1 and rec["bank_bytes"] <= 350  # (s + 1 zero slot) * 100 bytes
    with pytest.raises(FlashflexError, match="no modeled bank fits"):
        traces.recommend(results, k=1, bytes_per_expert=100, n_layers=1, budget_bytes=100, n_expert=8)


def _write_trace(path: Path, header: traces.TraceHeader, recs: list[traces.TraceRecord]) -> Path:
    path.write_text(header.model_dump_json() + "\n" + "".join(r.model_dump_json() + "\n" for r in recs)
                    + json.dumps({"end": True, "records": len(recs)}) + "\n")
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[: len(text) - 7], "truncated"),
    (lambda text: text.replace('{"end"', '{oops\n{"end"'), "not JSON"),
    (lambda text: text + '{"seq": 9}\n', "follows the end record"),
    (lambda text: "hello\n", "not a flashflex routing trace"),
    (lambda text: "", "empty"),
    (lambda text: text.replace(f'"version":{traces.VERSION}', '"version":99', 1), "version 99"),
    (lambda text: text[: text.rindex('{"end"')], "no end record"),
    (lambda text: text.replace('"records": 3', '"records": 2', 1), "counts 2 records, the file holds 3"),
    (lambda text: text.replace('"seq":1,', '"seq":5,', 1), "seq 5, expected 1"),
    (lambda text: text.replace('"ids":[1]', '"ids":[1,2]', 1), "tokens x k"),
    (lambda text: text.replace('"ids":[1]', '"ids":[42]', 1), "outside 0..7"),
])
def test_malformed_traces_are_one_line_errors(tmp_path, damage, message):
    path = _write_trace(tmp_path / "t.jsonl", _header(), _records([[0], [1], [2]]))
    path.write_text(damage(path.read_text()))
    with pytest.raises(FlashflexError) as info:
        traces.read_trace(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_trace_analyze_cli_on_a_hand_made_trace(tmp_path):
    path = _write_trace(tmp_path / "t.jsonl", _header(), _records([[e] for e in [0, 1, 2, 0, 1, 2, 3]]))
    r = flashflex("trace", "analyze", str(path), "--banks", "1,2,3,8", "--json", "--png", str(tmp_path / "p.png"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    rows = {(x["policy"], x["slots"]): x for x in out["results"]}
    assert rows[("lru", 3)]["hits"] == 3 and rows[("lru", 8)]["misses"] == 4
    assert out["recommendation"]["slots"] in (3, 8)
    if (tmp_path / "p.png").exists():  # matplotlib is optional
        assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    r = flashflex("trace", "analyze", str(tmp_path / "missing.jsonl"))
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = flashflex("trace", "analyze", str(path), "--topk", "3")
    assert r.returncode != 0 and "--topk" in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# Recording and replay through the runtime


@pytest.fixture(scope="module")
def traced(patched_llama):
    if "moe-trace" not in patched_llama.info()["features"]:
        pytest.skip("the installed build predates MoE traces; run flashflex build")
    return patched_llama


def _execution(path: Path, sc: Path, mode: str, slots: int | None, ubatch: int, **moe) -> Prepared:
    return prepare({"model.path": path, "budget.size": "64GiB", "context.ctx": CTX, "context.ubatch": ubatch,
                    "moe.mode": mode, "moe.sidecar": sc, "moe.slot_bank": slots,
                    **{f"moe.{k}": v for k, v in moe.items()}}, _settings(path, ubatch))


def _settings(path: Path, ubatch: int) -> GenerationSettings:
    return GenerationSettings(model=path, ctx=CTX, batch=64, ubatch=ubatch, threads=2)


def _stats(ex: Prepared, settings: GenerationSettings, tokens: list[int]) -> tuple:
    """Logits and the run's expert-bank stats for teacher-forced tokens."""
    with with_settings(ex, settings).session(logits_all=True) as handle:
        llm = handle.llm
        native.moe_stats_reset(llm.model)
        llm.eval(tokens)
        logits = np.array(llm.scores[: len(tokens)], dtype=np.float32, copy=True)
        return logits, native.moe_stats(llm.model)


@pytest.mark.native
@pytest.mark.parametrize("family, ubatch, slots", [("qwen3moe", 1, 6), ("qwen3moe", 32, 6),
                                                   ("qwen3moe-q4_0", 1, 5), ("qwen2moe", 4, 3)])
def test_record_and_replay_are_bitwise_exact(traced, moe_models, tmp_path, family, ubatch, slots):
    path, sc = moe_models[family]
    settings = _settings(path, ubatch)
    tokens = exact.teacher_tokens(40, 512, seed=2)
    stock = exact.logits(prepared_of(settings), tokens)
    trace = tmp_path / "run.trace.jsonl"

    logits, rec_stats = _stats(_execution(path, sc, "slot-bank", slots, ubatch, trace=trace), settings, tokens)
    assert exact.compare(stock, logits).identical
    assert trace.exists() and not traces.partials_of(trace)
    t = traces.read_trace(trace)
    assert t.header.slots == slots and t.header.ubatch == ubatch and t.header.prefetch == "none"
    assert t.tokens == len(tokens)
    if ubatch == 1:
        assert len(t.records) == rec_stats["calls"]  # one call per layer and token

    # the simulator's LRU is the runtime's policy: same hits and misses on the same trace
    assert t.recorded_hits() == (rec_stats["hits"], rec_stats["misses"])
    sim = traces.simulate(t.records, "lru", slots)
    assert (sim.hits, sim.misses) == (rec_stats["hits"], rec_stats["misses"])

    for mode in ("oracle-all-hit", "oracle-prefetch"):
        ex = _execution(path, sc, mode, slots, ubatch, trace=trace)
        logits, st = _stats(ex, settings, tokens)
        assert exact.compare(stock, logits).identical, mode
        assert st["replay_position"] == st["replay_records"] == len(t.records)
        if mode == "oracle-all-hit":
            assert st["misses"] == 0 and st["bytes_read"] == 0
            assert ex.spec.banks.slots == max(t.header.k, t.max_distinct_per_layer())
        else:
            assert st["prefetch"] == "oracle" and st["prefetch_issued"] > 0
            assert st["misses"] <= rec_stats["misses"]

    logits, st = _stats(_execution(path, sc, "slot-bank", slots, ubatch, prefetch="router-lookahead"), settings,
                        tokens)
    assert exact.compare(stock, logits).identical
    assert st["prefetch"] == "router-lookahead"
    if ubatch * t.header.k <= slots:
        assert st["prefetch_issued"] > 0


@pytest.mark.native
def test_oracle_prefetch_in_decode_turns_misses_into_prefetch_hits(traced, moe_models, tmp_path):
    path, sc = moe_models["qwen3moe"]
    trace = tmp_path / "t.jsonl"
    settings = GenerationSettings(model=path, ctx=CTX, batch=64, ubatch=8, threads=2, n_predict=16,
                                         prompt="hello world")
    recorded = execution.run(with_settings(_execution(path, sc, "slot-bank", 5, 8, trace=trace), settings))
    replay = execution.run(with_settings(_execution(path, sc, "oracle-prefetch", 5, 8, trace=trace), settings))
    assert replay.tokens == recorded.tokens
    dec = replay.stats["moe"]["decode"]
    assert recorded.stats["moe"]["decode"]["misses"] > 0
    # perfect one-step look-ahead: every expert a decode call needs was read ahead (or stayed resident)
    assert dec["misses"] == 0 and dec["prefetch_used"] > 0 and dec["prefetch_wasted_bytes"] == 0


@pytest.mark.native
def test_replay_refuses_other_models_settings_and_prompts(traced, moe_models, tmp_path):
    path, sc = moe_models["qwen3moe"]
    other, other_sc = moe_models["qwen2moe"]
    trace = tmp_path / "t.jsonl"
    settings = GenerationSettings(model=path, ctx=CTX, batch=64, ubatch=8, threads=2, n_predict=4,
                                         prompt="hello world")
    execution.run(with_settings(_execution(path, sc, "slot-bank", 6, 8, trace=trace), settings))
    with pytest.raises(FlashflexError, match="recorded on another model"):
        _execution(other, other_sc, "oracle-prefetch", 3, 8, trace=trace)
    with pytest.raises(FlashflexError, match="ubatch 8, this run uses 1"):
        _execution(path, sc, "oracle-prefetch", 6, 1, trace=trace)
    # another prompt routes differently: the run stops with one line instead of replaying something else
    r = flashflex("run", "-m", str(path), "--moe-mode", "oracle-prefetch", "--moe-sidecar", str(sc),
                  "--moe-slot-bank", "6", "--moe-trace", str(trace), "-ub", "8", "--ctx", str(CTX), "-n", "4",
                  "-p", "another prompt entirely")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1 and "differs from the replayed trace" in errors[0]
    assert "Traceback" not in r.stderr
    # the same prompt replays
    r = flashflex("run", "-m", str(path), "--moe-mode", "oracle-all-hit", "--moe-sidecar", str(sc),
                  "--moe-trace", str(trace), "-ub", "8", "--ctx", str(CTX), "-n", "4", "-p", "hello world",
                  "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["moe"]["decode"]["misses"] == 0


@pytest.mark.native
def test_bad_flags_are_one_line_errors(traced, moe_models, tmp_path):
    path, sc = moe_models["qwen3moe"]
    base = ["run", "-m", str(path), "--moe-sidecar", str(sc), "--ctx", str(CTX), "-n", "2"]
    cases = [
        (["--moe-mode", "slot-bank", "--moe-prefetch", "psychic"], "moe.prefetch"),
        (["--moe-mode", "resident-bank", "--moe-prefetch", "router-lookahead"], "applies to slot-bank"),
        (["--moe-mode", "oracle-prefetch"], "moe.trace"),
        (["--moe-mode", "oracle-prefetch", "--moe-trace", str(tmp_path / "none.jsonl")], "does not exist"),
        (["--moe-mode", "resident-bank", "--moe-trace", str(tmp_path / "t.jsonl")], "records slot-bank runs"),
    ]
    for extra, message in cases:
        r = flashflex(*base, *extra)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode != 0 and len(errors) == 1 and message in errors[0], (extra, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "t.jsonl").exists() and not traces.partials_of(tmp_path / "t.jsonl")


@pytest.mark.native
def test_a_failed_run_leaves_no_trace(traced, moe_models, tmp_path):
    path, sc = moe_models["qwen3moe"]
    trace = tmp_path / "t.jsonl"
    ex = _execution(path, sc, "slot-bank", 6, 1, trace=trace)
    with pytest.raises(RuntimeError, match="interrupted"):
        with ex.session() as handle:
            handle.llm.eval([5, 6, 7])
            assert len(traces.partials_of(trace)) == 1  # being written, to this recording's own temp file
            raise RuntimeError("interrupted")
    assert not trace.exists() and not traces.partials_of(trace)


@pytest.mark.native
def test_recorded_trace_analyzes_and_cross_checks(traced, moe_models, tmp_path):
    path, sc = moe_models["qwen3moe"]
    trace = tmp_path / "t.jsonl"
    r = flashflex("run", "-m", str(path), "--moe-mode", "slot-bank", "--moe-sidecar", str(sc), "--moe-slot-bank",
                  "6", "--moe-trace", str(trace), "-ub", "8", "--ctx", str(CTX), "-n", "12", "--json")
    assert r.returncode == 0, r.stderr
    moe = json.loads(r.stdout)["stats"]["moe"]
    runtime_hits = moe["prompt"]["hits"] + moe["decode"]["hits"]
    runtime_misses = moe["prompt"]["misses"] + moe["decode"]["misses"]
    r = flashflex("trace", "analyze", str(trace), "--manifest", str(sc), "--budget", "64MiB", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["recorded_hit_rate"] == pytest.approx(runtime_hits / (runtime_hits + runtime_misses))
    assert out["lru_at_recorded_slots"] == pytest.approx(out["recorded_hit_rate"])
    lru6 = next(x for x in out["results"] if x["policy"] == "lru" and x["slots"] == 6)
    assert (lru6["hits"], lru6["misses"]) == (runtime_hits, runtime_misses)
    assert all(x["bytes_per_token"] > 0 for x in out["results"] if x["misses"])
    assert out["recommendation"]["bank_bytes"] <= 64 << 20
    # a manifest of another model is refused
    r = flashflex("trace", "analyze", str(trace), "--manifest", str(moe_models["qwen2moe"][1]))
    assert r.returncode != 0 and "another model" in r.stderr


@pytest.mark.native
def test_verify_exact_records_and_replays(traced, moe_models, tmp_path):
    path, sc = moe_models["qwen3moe-q4_0"]
    trace = tmp_path / "t.jsonl"
    common = ["verify-exact", "-m", str(path), "--moe-sidecar", str(sc), "--moe-slot-bank", "5", "--ctx", str(CTX),
              "--tokens", "24", "-ub", "1", "--moe-trace", str(trace), "--json"]
    for mode in ("slot-bank", "oracle-prefetch", "oracle-all-hit"):
        r = flashflex(*common, "--moe-mode", mode)
        assert r.returncode == 0, (mode, r.stderr)
        assert json.loads(r.stdout)["identical"], mode
    r = flashflex(*[a for a in common if a != str(trace) and a != "--moe-trace"], "--moe-mode", "slot-bank",
                  "--moe-prefetch", "router-lookahead")
    assert r.returncode == 0 and json.loads(r.stdout)["identical"]
    assert "router-lookahead" in json.loads(r.stdout)["mode"]


def test_two_recordings_into_one_trace_never_share_a_file(tmp_path):
    """Each recording appends to a temp file of its own, created exclusively; each publishes a whole trace, and the
    last one published stays (review S5: two writers used to interleave one TRACE.partial)."""
    trace = tmp_path / "t.jsonl"
    header = traces.TraceHeader(format=traces.FORMAT, version=traces.VERSION,
                                model=traces.TraceModel(architecture="qwen3moe", n_expert=4, n_expert_used=2, n_layer=1,
                                                        fingerprint="f" * 16),
                                layers=[0], k=2, ubatch=1, slots=2, prefetch="none", mode="slot-bank")
    first, second = traces.begin_recording(trace, header), traces.begin_recording(trace, header)
    assert first != second and set(traces.partials_of(trace)) == {first, second}
    record = {"seq": 0, "ubatch": 0, "layer": 0, "tokens": 1, "k": 2, "ids": [0, 1], "slots": [0, 1], "hit": [0, 0]}
    for partial, n in ((first, 1), (second, 2)):
        with open(partial, "a") as f:
            for i in range(n):
                f.write(json.dumps({**record, "seq": i, "ubatch": i}) + "\n")
    traces.finish_recording(trace, first, True)
    traces.finish_recording(trace, second, True)
    assert traces.read_trace(trace).tokens == 2 and not traces.partials_of(trace)
