"""Plans for a large grid of inputs, hashed, to show a planner refactor changes no decision.

    python scripts/plan_sample.py record BASELINE.json     # before the change
    python scripts/plan_sample.py compare BASELINE.json    # after: exit 1 on any difference

Each input is a synthetic model table (dense, MoE, shared experts, leading dense layers, unaligned files) with a
budget, ctx, ubatch, prefetch and MoE settings and optional measured overheads and read probe; its result is the
Plan's JSON (or the refusal's text). `record` also stores the Plan schema's field names, and `compare` projects
newer Plans onto them, so fields a refactor adds do not count as differences while every field that existed must
keep its value byte for byte.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "tests"), str(Path(__file__).resolve().parent.parent)]

from test_planner import dense_table, moe_table  # noqa: E402

from orchestrator.errors import FlashflexError  # noqa: E402
from orchestrator.sizes import MiB  # noqa: E402


def tables() -> dict[str, Any]:
    return {
        "dense": dense_table(),
        "dense-2l": dense_table(n_layer=2, n_embd=256, n_ff=768),
        "dense-unaligned": dense_table(n_layer=4, alignment=32),
        "moe": moe_table(),
        "moe-8x2": moe_table(n_expert=8, n_expert_used=2),
        "moe-shared-lead": moe_table(n_leading_dense=1, shexp_ffn=512),
        "moe-unaligned": moe_table(n_layer=3, alignment=32),
    }


class _Measured:
    kv_bytes = 3 * MiB
    compute_bytes = 5 * MiB


def inputs():
    """(key, table name, budget, planning options) for every point of the grid."""
    ts = tables()
    for name, table in ts.items():
        is_moe = table.arch.is_moe
        total = table.total_bytes
        budgets = sorted({int(total * f) for f in (0.05, 0.12, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0, 1.3, 3.0)})
        modes = ["auto", "stock", "resident-bank", "slot-bank", "oracle-prefetch"] if is_moe else ["auto"]
        slot_banks = [None, 4, 9, 64] if is_moe else [None]
        topks = [None, 1] if is_moe else [None]
        grid = itertools.product(budgets, (64, 512), (1, 32), (0, 2, "auto"), ("auto", 2), ("auto", "off", "strict"),
                                 modes, slot_banks, topks, (False, True), (False, True))
        for budget, ctx, ubatch, threads, window, direct_io, mode, slot_bank, topk, measured, probe in grid:
            if threads != "auto" and probe:
                continue
            options = {"ctx": ctx, "ubatch": ubatch, "threads": threads, "window": window, "direct_io": direct_io,
                       "mode": mode, "slot_bank": slot_bank, "topk": topk, "measured": measured, "probe": probe}
            key = json.dumps([name, budget, options], sort_keys=True)
            yield key, table, budget, options


PROBE = {1: 900e6, 2: 1500e6, 4: 1600e6}


def plan_of(table, budget: int, o: dict[str, Any]):
    """The Plan for one input, through the planner's public entry."""
    from orchestrator.planner import PlanInputs, PlanRequest, make_plan

    request = PlanRequest(budget_bytes=budget, ctx=o["ctx"], ubatch=o["ubatch"],
                          threads=None if o["threads"] == "auto" else o["threads"],
                          window=None if o["window"] == "auto" else o["window"], direct_io=o["direct_io"],
                          mode=o["mode"], slot_bank=o["slot_bank"], topk=o["topk"])
    return make_plan(request, PlanInputs(table=table, overheads=_Measured() if o["measured"] else None,
                                         read_probe=PROBE if o["probe"] else None))


def _fields(schema: dict[str, Any]) -> dict[str, list[str]]:
    """Model name → its field names, from a JSON schema (the Plan and every model it nests)."""
    out = {"Plan": sorted(schema.get("properties", {}))}
    for name, sub in schema.get("$defs", {}).items():
        out[name] = sorted(sub.get("properties", {}))
    return out


def _project(value: Any, schema: dict[str, Any], fields: dict[str, list[str]], model: str = "Plan") -> Any:
    """`value` (a Plan dump) keeping only the fields `fields` knew, recursively through nested models."""
    if not isinstance(value, dict):
        return value
    props = schema["properties"] if model == "Plan" else schema["$defs"][model]["properties"]
    out = {}
    for key in fields.get(model, []):
        if key not in value:
            out[key] = "<missing>"
            continue
        out[key] = _project_any(value[key], props.get(key, {}), schema, fields)
    return out


def _project_any(value: Any, prop: dict[str, Any], schema: dict[str, Any], fields: dict[str, list[str]]) -> Any:
    refs = [p["$ref"] for p in [prop, *prop.get("anyOf", []), prop.get("items", {})] if isinstance(p, dict)
            and "$ref" in p]
    if isinstance(value, list) and "items" in prop and "$ref" in prop["items"]:
        name = prop["items"]["$ref"].rsplit("/", 1)[1]
        return [_project(v, schema, fields, name) for v in value]
    if isinstance(value, dict) and refs:
        return _project(value, schema, fields, refs[0].rsplit("/", 1)[1])
    return value


def results(fields: dict[str, list[str]] | None):
    from orchestrator.planner import Plan

    schema = Plan.model_json_schema()
    fields = fields or _fields(schema)
    for key, table, budget, options in inputs():
        try:
            dump = plan_of(table, budget, options).model_dump(mode="json")
            text = json.dumps(_project(dump, schema, fields), sort_keys=True)
        except FlashflexError as exc:
            text = "refused: " + exc.problem
        yield key, hashlib.sha256(text.encode()).hexdigest()[:20], fields


def main() -> int:
    what, path = sys.argv[1], Path(sys.argv[2])
    if what == "record":
        out: dict[str, str] = {}
        fields = None
        for key, digest, fields in results(None):
            out[key] = digest
        path.write_text(json.dumps({"fields": fields, "plans": out}))
        print(f"recorded {len(out)} plans to {path}")
        return 0
    base = json.loads(path.read_text())
    n = bad = 0
    for key, digest, _ in results(base["fields"]):
        n += 1
        if base["plans"].get(key) != digest:
            bad += 1
            if bad <= 5:
                print(f"DIFFERENT: {key}")
    missing = len(base["plans"]) - n
    print(f"{n} plans compared, {bad} different, {missing} of the baseline's inputs not produced")
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
