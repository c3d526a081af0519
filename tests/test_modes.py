"""The mode vocabularies (orchestrator.modes): each group and helper agrees with the vocabulary it belongs to."""

from __future__ import annotations

import typing

from orchestrator import config, modes
from orchestrator.planner.schema import MoEPlan


def test_every_constant_belongs_to_a_vocabulary():
    words = {modes.AUTO, modes.STOCK, modes.RESIDENT, modes.RESIDENT_BANK, modes.SLOT_BANK, modes.ORACLE_ALL_HIT,
             modes.ORACLE_PREFETCH, modes.DENSE_STREAM, modes.STOCK_MMAP, modes.STOCK_RESIDENT, modes.FLASHFLEX}
    assert words == set(modes.MOE_MODES) | set(modes.EXECUTION_MODES) | set(modes.BENCH_MODES)


def test_the_vocabularies_nest():
    assert set(modes.MOE_MODES) == set(modes.PLANNED_MOE_MODES) | {modes.AUTO}
    assert set(modes.EXECUTION_MODES) == set(modes.PLANNED_MOE_MODES) | {modes.DENSE_STREAM}
    assert set(modes.EXECUTION_MODES) == set(modes.PLANNED_MOE_MODES) | {modes.DENSE_STREAM}
    assert modes.ALL_RESIDENT_MODES | modes.BANKED_MODES == set(modes.PLANNED_MOE_MODES)
    assert not modes.ALL_RESIDENT_MODES & modes.BANKED_MODES
    assert modes.SIDECAR_MODES == modes.BANKED_MODES | {modes.RESIDENT_BANK}
    assert modes.TRACE_REPLAY_MODES < modes.BANKED_MODES
    assert modes.STOCK_LOADER_MODES == modes.ALL_RESIDENT_MODES - modes.SIDECAR_MODES
    assert set(modes.STOCK_BASELINES) | set(modes.PLANNED_BENCH_MODES) | {modes.RESIDENT} == set(modes.BENCH_MODES)
    assert modes.BANKED_MODES < set(modes.BENCH_MODES)


def test_config_and_plan_use_the_vocabularies():
    assert config.MOE_MODES == modes.MOE_MODES
    assert typing.get_args(config.MoEConfig.model_fields["mode"].annotation) == modes.MOE_MODES
    assert typing.get_args(MoEPlan.model_fields["requested_mode"].annotation) == modes.MOE_MODES
    assert typing.get_args(MoEPlan.model_fields["mode"].annotation) == modes.PLANNED_MOE_MODES


# Words other vocabularies share with the mode words: a tensor's placement (resident | streamed | bank) and the kind of
# a build (stock | patched). Anywhere else a quoted mode word is a comparison that belongs in orchestrator.modes.
OTHER_VOCABULARIES = {
    "planner/make.py": {"resident"}, "planner/schema.py": {"resident"}, "planner/explain.py": {"resident"},
    "cli/plan_cmd.py": {"resident"}, "build.py": {"stock"}, "cli/build_cmd.py": {"stock"},
}


def test_no_module_spells_out_a_mode_word():
    import ast
    from pathlib import Path

    root = Path(modes.__file__).parent
    words = set(modes.MOE_MODES) | set(modes.EXECUTION_MODES) | set(modes.BENCH_MODES)
    words -= {modes.AUTO, modes.FLASHFLEX}  # also the budget's auto and the project's name
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel == "modes.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in words - OTHER_VOCABULARIES.get(rel, set()):
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert not found, "use orchestrator.modes' constants: " + ", ".join(found)


def test_the_execution_label_is_derived_from_the_axes():
    from orchestrator.run.spec import BankSpec, RuntimeSpec, StreamSpec

    stream = StreamSpec(tensors=[], prefetch_threads=1, window=1, ring_bytes=0)

    def banks(**kw):
        return BankSpec(sidecar="s", tensors=[], io_threads=1, **{"slots": 4, **kw})

    cases = [
        (RuntimeSpec(model="m"), modes.STOCK),
        (RuntimeSpec(model="m", use_mmap=False), modes.RESIDENT),
        (RuntimeSpec(model="m", stream=stream, use_mmap=False), modes.DENSE_STREAM),
        (RuntimeSpec(model="m", banks=banks(slots=0)), modes.RESIDENT_BANK),
        (RuntimeSpec(model="m", banks=banks(), stream=stream), modes.SLOT_BANK),
        (RuntimeSpec(model="m", banks=banks(replay=modes.REPLAY_ALL_HIT)), modes.ORACLE_ALL_HIT),
        (RuntimeSpec(model="m", banks=banks(replay=modes.REPLAY_PREFETCH)), modes.ORACLE_PREFETCH),
    ]
    for spec, label in cases:
        assert spec.mode == label
    assert {label for _, label in cases} == set(modes.EXECUTION_MODES)
