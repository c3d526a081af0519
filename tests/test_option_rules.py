"""Every rule about which options go together, in one table: the options, the one line that refuses them, and
the one place the rule lives. Rules that need only the settings are RunConfig validators; rules that need the model
or a resolved `auto` are planner stages (planner.make: _analyse_model, _experts, _check_options, _fit_draft,
_direct_io). The loader refuses nothing but what loading finds."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import rpc
from orchestrator.config import load_run_config
from orchestrator.errors import FlashflexError
from orchestrator.planner import DraftRequest, PlanInputs, PlanRequest, make_plan
from tests.test_planner import dense_table, moe_table

SOURCE = Path(__file__).resolve().parent.parent / "orchestrator"
WORKER = rpc.Worker("10.0.0.1:50052", rpc.RPC_PROTOCOL, [rpc.WorkerDevice(0, 1 << 30, 1 << 30)])
SIDECAR = {"moe.sidecar": "/tmp/flashflex-rules.sidecar"}


# (rule, options, model: None = refused by the config alone, else the table it is planned on; what the line says;
#  the text of the rule's one home in orchestrator/)
CONFIG_RULES = [
    ("an oracle mode replays a trace", {"moe.mode": "oracle-prefetch"}, "required by mode oracle-prefetch",
     "required by mode {self.mode}"),
    ("rpc.layers needs workers", {"rpc.layers": 2}, "rpc.servers lists none", "rpc.servers lists none"),
    ("one layer count", {"rpc.servers": "10.0.0.1:50052", "rpc.layers": 1, "gpu.layers": 1},
     "both say how many layers", "both say how many layers"),
    ("ubatch within batch", {"context.batch": 8, "context.ubatch": 16}, "exceeds batch", "exceeds batch"),
    ("a draft model for kind model only", {"draft.kind": "prompt-lookup", "draft.model": "/tmp/x.gguf"},
     "a draft model is used by kind model", "a draft model is used by kind model"),
    ("kind model needs a model", {"draft.kind": "model"}, "required by kind model", "required by kind model"),
    (":N for prompt lookup only", {"draft.kind": "model:3"}, "only prompt-lookup takes :N",
     "only prompt-lookup takes :N"),
    ("drafting needs a batch", {"draft.kind": "prompt-lookup", "context.ubatch": 1}, "--ubatch 2 or more",
     "drafting needs --ubatch 2 or more"),
]

PLAN_RULES = [
    ("MoE options on a dense model", {"moe.slot_bank": 4, "moe.io_threads": 2}, "dense",
     "--moe-slot-bank 4, --moe-io-threads applies to MoE models only", "applies to MoE models only"),
    ("top-k reduces only", {"moe.topk": 9}, "moe", "--moe-topk 9 is outside 1..4", "is outside 1.."),
    ("a slot bank needs banks", {"moe.mode": "resident-bank", "moe.slot_bank": 8}, "moe",
     "--moe-slot-bank applies to slot-bank and oracle modes", "--moe-slot-bank applies to slot-bank and oracle"),
    ("a slot bank holds top-k", {"moe.mode": "slot-bank", "moe.slot_bank": 2}, "moe", "is below top-k 4",
     "is below top-k"),
    ("bank options need banks", {"moe.mode": "stock", "moe.io_threads": 2, **SIDECAR}, "moe",
     "--moe-sidecar, --moe-io-threads apply to runs with expert banks", "oracle modes), and this run is"),
    ("auto resolved to stock has no banks", {"moe.io_threads": 2}, "moe",
     "--moe-io-threads applies to runs with expert banks", "oracle modes), and this run is"),
    ("shared-only is a slot-bank diagnostic", {"moe.mode": "resident-bank", "moe.shared_only": True}, "moe",
     "--moe-shared-only is a slot-bank diagnostic", "is a slot-bank diagnostic"),
    ("prefetch is for slot-bank", {"moe.mode": "resident-bank", "moe.prefetch": "router-lookahead"}, "moe",
     "--moe-prefetch router-lookahead applies to slot-bank runs", "applies to slot-bank runs, not"),
    ("traces record slot-bank runs", {"moe.mode": "resident-bank", "moe.trace": "/tmp/t.jsonl"}, "moe",
     "--moe-trace records slot-bank runs", "records slot-bank runs"),
    ("a split keeps banks only when asked", {"rpc.servers": "10.0.0.1:50052", "rpc.layers": 1,
                                             "budget.size": "2MiB"}, "moe-rpc",
     "the layers left here need --moe-mode slot-bank", "the layers left here need"),
    ("strict direct I/O needs aligned tensors", {"prefetch.direct_io": "strict", "budget.size": "9MiB"},
     "unaligned", "are not 4096-byte aligned, and direct I/O is strict", "and direct I/O is strict"),
    ("drafting inside the budget", {"budget.size": "1MiB"}, "draft", "drafting needs", "drafting needs {"),
]


def _table(kind: str):
    return {"dense": dense_table(), "moe": moe_table(), "moe-rpc": moe_table(n_layer=3),
            "unaligned": dense_table(n_layer=4, alignment=32), "draft": dense_table()}[kind]


def _one_home(text: str) -> list[Path]:
    return [p for p in SOURCE.rglob("*.py") if text in p.read_text()]


@pytest.mark.parametrize("rule, options, says, home", CONFIG_RULES, ids=[r[0] for r in CONFIG_RULES])
def test_config_rules(rule, options, says, home):
    with pytest.raises(FlashflexError) as info:
        load_run_config(None, options)
    line = info.value.one_line()
    assert says in line and "\n" not in line, line
    assert [p.name for p in _one_home(home)] == ["config.py"], rule


@pytest.mark.parametrize("rule, options, kind, says, home", PLAN_RULES, ids=[r[0] for r in PLAN_RULES])
def test_plan_rules(rule, options, kind, says, home):
    cfg = load_run_config(None, {"budget.size": "64GiB", "context.ctx": 256, "context.ubatch": 16,
                                 "prefetch.threads": 1, **options})
    draft = DraftRequest(kind="model", max_tokens=4, row_bytes=4096, model_bytes=2 << 20) if kind == "draft" else None
    request = PlanRequest.from_config(cfg, cfg.budget.resolve_bytes(), draft=draft)
    with pytest.raises(FlashflexError) as info:
        make_plan(request, PlanInputs(table=_table(kind), workers=[WORKER] if "rpc.servers" in options else []))
    line = info.value.one_line()
    assert says in line and "\n" not in line, line
    assert [p.name for p in _one_home(home)] == ["make.py"], rule


def test_the_loader_refuses_no_option():
    """The run layer raises only what loading finds: no option names in its refusals."""
    for path in (SOURCE / "run").glob("*.py"):
        text = path.read_text()
        for flag in ("--moe-prefetch", "--moe-shared-only", "--moe-slot-bank", "--moe-trace records"):
            assert f'FlashflexError(f"{flag}' not in text and f'FlashflexError("{flag}' not in text, (path, flag)
