"""Run settings: pydantic models per concern, YAML loading with every error at once, recipes in configs/."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from orchestrator import config as cfg
from orchestrator.config import (
    BenchmarkConfig,
    BudgetConfig,
    ContextConfig,
    DraftConfig,
    ModelConfig,
    MoEConfig,
    PrefetchConfig,
    RunConfig,
    SamplingConfig,
    load_run_config,
)
from orchestrator.errors import FlashflexError
from orchestrator.sizes import GiB, MiB

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SECTIONS = [ModelConfig, BudgetConfig, PrefetchConfig, MoEConfig, ContextConfig, SamplingConfig, BenchmarkConfig,
            DraftConfig, RunConfig]


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path | None, overrides=None) -> str:
    with pytest.raises(FlashflexError) as info:
        load_run_config(path, overrides)
    line = info.value.one_line()
    assert "\n" not in line
    return line


@pytest.mark.parametrize("model", SECTIONS, ids=lambda m: m.__name__)
def test_every_field_is_documented_and_unknown_keys_forbidden(model: type[BaseModel]):
    assert model.model_config.get("extra") == "forbid"
    for name, field in model.model_fields.items():
        assert field.description and len(field.description) > 8, f"{model.__name__}.{name} has no description"


def test_defaults_validate_and_round_trip():
    run = RunConfig()
    assert RunConfig.model_validate(run.model_dump()) == run
    assert run.prefetch.window == "auto" and run.prefetch.threads == "auto" and run.prefetch.direct_io == "auto"
    assert run.moe.mode == "auto" and run.moe.prefetch == "none"
    assert run.model.path is None


def test_no_file_means_defaults():
    assert load_run_config(None) == RunConfig()


def test_every_invalid_field_reported_at_once_with_paths_and_lines(tmp_path):
    path = write(tmp_path, """\
model:
  path: m.gguf
moe:
  slot_bank: 0
  slotbank: 3
budget:
  size: 2XB
prefetch:
  threads: -1
  direct_io: sometimes
context: {ubatch: 1024, batch: 8}
benchmark:
  budgets: [1, 2QB]
""")
    line = error_of(path)
    assert str(path) in line
    assert "moe.slot_bank (line 4): must be >= 1" in line
    assert "moe.slotbank (line 5): unknown key, did you mean slot_bank?" in line
    assert "budget.size (line 7): unknown unit 'XB'" in line
    assert "prefetch.threads (line 9): must be >= 0" in line
    assert "prefetch.direct_io (line 10): must be one of" in line
    assert "context.ubatch" in line and "exceeds batch 8" in line
    assert "benchmark.budgets[1]" in line
    assert "7 invalid settings" in line


def test_unknown_top_level_section(tmp_path):
    line = error_of(write(tmp_path, "modle:\n  path: x.gguf\n"))
    assert "modle (line 1): unknown key, did you mean model?" in line


def test_unknown_key_lists_allowed_keys(tmp_path):
    line = error_of(write(tmp_path, "prefetch:\n  depth: 4\n"))
    assert "allowed: threads, window, mirror, repack, direct_io, read_bandwidth" in line


def test_missing_file_is_one_line(tmp_path):
    line = error_of(tmp_path / "nope.yaml")
    assert "not found" in line and "nope.yaml" in line


def test_bad_yaml_syntax_is_one_line_with_position(tmp_path):
    line = error_of(write(tmp_path, "budget:\n  size: 2GiB\n   headroom: [1\n"))
    assert "invalid YAML at line" in line


def test_top_level_must_be_a_mapping(tmp_path):
    line = error_of(write(tmp_path, "- 1\n- 2\n"))
    assert "must be a mapping" in line


def test_empty_file_is_refused(tmp_path):
    """An empty config is almost always the wrong file; running the defaults silently would hide that."""
    assert "is empty" in error_of(write(tmp_path, ""))
    assert "is empty" in error_of(write(tmp_path, "# only a comment\n"))


def test_section_of_wrong_type(tmp_path):
    line = error_of(write(tmp_path, "moe: 3\n"))
    assert "moe (line 1): must be a mapping of keys" in line


def test_wrong_scalar_types(tmp_path):
    line = error_of(write(tmp_path, "context:\n  ctx: lots\nsampling:\n  top_p: 0\n"))
    assert "context.ctx (line 2): must be a whole number" in line
    assert "sampling.top_p (line 4): must be > 0" in line


def test_sizes_accept_numbers_and_auto(tmp_path):
    run = load_run_config(write(tmp_path, "budget:\n  size: 0.5\n"))
    assert run.budget.resolve_bytes() == 512 * MiB
    run = load_run_config(write(tmp_path, "budget:\n  size: auto\n  headroom: 2GiB\n"))
    assert run.budget.resolve_bytes(available=10 * GiB) == 8 * GiB


def test_headroom_cannot_be_auto(tmp_path):
    line = error_of(write(tmp_path, "budget:\n  headroom: auto\n"))
    assert "budget.headroom" in line


def test_yaml_on_off_words_for_direct_io(tmp_path):
    # YAML 1.1 reads `on` and `off` as booleans
    assert load_run_config(write(tmp_path, "prefetch:\n  direct_io: on\n")).prefetch.direct_io == "on"
    assert load_run_config(write(tmp_path, "prefetch:\n  direct_io: off\n")).prefetch.direct_io == "off"


def test_bad_bandwidth(tmp_path):
    line = error_of(write(tmp_path, "prefetch:\n  read_bandwidth: fast\n"))
    assert "prefetch.read_bandwidth (line 2)" in line


def test_oracle_modes_need_a_trace(tmp_path):
    line = error_of(write(tmp_path, "moe:\n  mode: oracle-all-hit\n"))
    assert "moe.trace (line 1): required by mode oracle-all-hit" in line


def test_relative_paths_resolve_against_the_yaml_file(tmp_path):
    sub = tmp_path / "recipes"
    sub.mkdir()
    path = write(sub, "model:\n  path: ../models/m.gguf\nmoe:\n  sidecar: side\n  trace: /abs/t.jsonl\n"
                      "benchmark:\n  out_dir: results\n")
    run = load_run_config(path)
    assert run.model.path == tmp_path / "models" / "m.gguf"
    assert run.moe.sidecar == sub / "side"
    assert run.moe.trace == Path("/abs/t.jsonl")
    assert run.benchmark.out_dir == sub / "results"


def test_home_is_expanded(tmp_path):
    run = load_run_config(write(tmp_path, "model:\n  path: ~/Models/x.gguf\n"))
    assert run.model.path == Path.home() / "Models" / "x.gguf"


def test_overrides_dotted_and_nested_win_over_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "moe:\n  slot_bank: 8\n  topk: 4\ncontext:\n  ctx: 512\n")
    run = load_run_config(path, {"moe.slot_bank": 16, "moe.topk": None, "context": {"ctx": 1024},
                                 "model.path": "cli.gguf"})
    assert run.moe.slot_bank == 16
    assert run.moe.topk == 4  # None = flag not given: the YAML value stays
    assert run.context.ctx == 1024
    assert run.model.path == tmp_path / "cli.gguf"  # overrides resolve against the current directory


def test_override_errors_name_the_key():
    line = error_of(None, {"moe.slot_bank": 0})
    assert line.startswith("options: 1 invalid setting: moe.slot_bank: must be >= 1")


def test_module_constants_match_models():
    assert set(cfg.MOE_MODES) >= {"stock", "resident", "resident-bank", "slot-bank", "oracle-all-hit",
                                  "oracle-prefetch"}
    assert cfg.BANKED_MODES <= set(cfg.MOE_MODES)


# --------------------------------------------------------------------------------------------------
# configs/


def recipes() -> list[Path]:
    return sorted(CONFIGS.glob("*.yaml"))


def test_configs_has_the_required_recipes():
    names = {p.name for p in recipes()}
    assert {"default.yaml", "dense-budget.yaml", "moe-budget.yaml"} <= names
    assert {"qwen3.5-35b-a3b.yaml", "qwen3.5-397b-a17b.yaml", "gemma4-26b-a4b.yaml", "kimi-k2.5.yaml",
            "glm-5.1.yaml"} <= names


@pytest.mark.parametrize("path", recipes(), ids=lambda p: p.name)
def test_every_recipe_validates(path):
    if cfg.is_serve_file(path):
        served = cfg.load_serve_file(path)
        assert served.server.host == "127.0.0.1" and len(served.models) >= 1
        return
    run = load_run_config(path)
    assert isinstance(run, RunConfig)
    if run.moe.mode in cfg.BANKED_MODES:
        assert run.moe.sidecar is not None


def test_serve_file_errors_name_the_model_and_key(tmp_path):
    bad = tmp_path / "serve.yaml"
    bad.write_text("models:\n  - alias: a\n    moe: {slot_bank: 0}\n")
    with pytest.raises(FlashflexError, match=r"models\[0\]\.moe\.slot_bank \(line 3\): must be >= 1"):
        cfg.load_serve_file(bad)
    bad.write_text("models:\n  - alias: a\n  - alias: a\n")
    with pytest.raises(FlashflexError, match="two models are named 'a'"):
        cfg.load_serve_file(bad)


@pytest.mark.parametrize("path", [p for p in recipes() if p.name not in
                                  ("default.yaml", "dense-budget.yaml", "moe-budget.yaml", "serve.yaml")],
                         ids=lambda p: p.name)
def test_seed_recipes_are_marked_untested(path):
    assert path.read_text().startswith("# UNTESTED HERE")


def test_default_recipe_lists_the_defaults():
    run = load_run_config(CONFIGS / "default.yaml")
    assert run.model_dump(exclude={"benchmark": {"out_dir"}}) == RunConfig().model_dump(
        exclude={"benchmark": {"out_dir"}})
    assert run.benchmark.out_dir == CONFIGS.parent / "bench-results"


def test_budget_recipes():
    dense = load_run_config(CONFIGS / "dense-budget.yaml")
    assert dense.budget.resolve_bytes() == 2 * GiB
    moe = load_run_config(CONFIGS / "moe-budget.yaml")
    assert moe.moe.mode == "slot-bank" and moe.moe.slot_bank is None


@pytest.mark.parametrize(("name", "bank", "topk"), [
    ("qwen3.5-35b-a3b.yaml", 16, 4), ("qwen3.5-397b-a17b.yaml", 128, 4), ("gemma4-26b-a4b.yaml", 16, None),
    ("kimi-k2.5.yaml", 64, 4), ("glm-5.1.yaml", 64, 4),
])
def test_seed_recipes_carry_flash_moe_settings(name, bank, topk):
    run = load_run_config(CONFIGS / name)
    assert (run.moe.mode, run.moe.slot_bank, run.moe.topk) == ("slot-bank", bank, topk)


def test_draft_flag_forms():
    cfg = load_run_config(None, {"draft.kind": "prompt-lookup:4"})
    assert (cfg.draft.kind, cfg.draft.ngram) == ("prompt-lookup", 4)
    cfg = load_run_config(None, {"draft.model": "small.gguf"})
    assert cfg.draft.kind == "model" and cfg.draft.model.name == "small.gguf"
    assert load_run_config(None).draft.kind == "auto"  # run and chat: prompt lookup where the plan affords it


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"draft.kind": "lookup"}, "draft.kind: must be one of"),
    ({"draft.kind": "prompt-lookup:x"}, "needs a whole number"),
    ({"draft.kind": "prompt-lookup:0"}, "draft.ngram: must be >= 1"),
    ({"draft.kind": "model"}, "draft.model: required by kind model"),
    ({"draft.kind": "prompt-lookup", "draft.model": "a.gguf"}, "draft.model: a draft model is used by kind model"),
    ({"draft.kind": "prompt-lookup:3", "draft.ngram": 2}, "contradicts ngram 2"),
    ({"draft.max_tokens": 0}, "draft.max_tokens: must be >= 1"),
])
def test_bad_draft_settings_are_one_line(overrides, expected):
    with pytest.raises(FlashflexError) as info:
        load_run_config(None, overrides)
    line = info.value.one_line()
    assert expected in line and "\n" not in line


def test_a_value_assigned_into_a_section_the_config_did_not_set_survives_a_reread():
    """api.run_config re-reads a RunConfig keeping only what was set (defaults stay "not given"): a value assigned
    later into a section the config never set (llama_server.plan_slots' slots x ctx) is set too."""
    from orchestrator import api

    config = load_run_config(None, {})
    config.context.ctx = 4096
    config.draft.max_tokens = 3
    again = api.run_config(config)
    assert (again.context.ctx, again.draft.max_tokens) == (4096, 3)
    assert "ctx" in again.context.model_fields_set and "ubatch" not in again.context.model_fields_set
    assert api.run_config(RunConfig()).context.model_fields_set == set()
