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
