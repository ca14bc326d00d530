"""The table of stages is the only one: every record's module exports run() (its docstring shows
the command) and recap(); needs name earlier stages; the CLI offers exactly these stages."""

import importlib
import inspect

import pytest

from tailorlm.stages import NAMES, STAGES


@pytest.mark.parametrize("stage", STAGES, ids=NAMES)
def test_every_stage_module_exports_run_and_recap(stage):
    module = importlib.import_module(stage.module)
    assert callable(module.run) and callable(module.recap)
    assert f"tailorlm {stage.name}" in (module.__doc__ or "") + (module.run.__doc__ or ""), (
        f"{stage.module}: the docstring shows no `tailorlm {stage.name}` command"
    )
    assert list(inspect.signature(module.recap).parameters) == ["s"]


def test_needs_point_backwards():
    from tailorlm.config import PipelineConfig

    order = {s.name: i for i, s in enumerate(STAGES)}
    for s in STAGES:
        assert all(order[n] < order[s.name] for n in s.needs), s.name
        assert set(s.reads) <= set(PipelineConfig.model_fields)  # config sections, from the model itself


def test_the_cli_offers_the_stages_of_the_table():
    from tailorlm.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(NAMES) <= set(sub.choices) and set(sub.choices) - set(NAMES) == {
        "run",
        "report",
        "config",
        "promote",
        "rollback",
    }


def test_a_missing_upstream_stage_is_one_clear_error(tmp_path):
    from tailorlm.config import load_config
    from tailorlm.pipeline import StageUnavailable, run_stage

    cfg = load_config(None, [f"run.storage={tmp_path}"])
    for stage, need in (("train", "data"), ("export", "data"), ("serve", "export")):
        with pytest.raises(StageUnavailable, match=f"no finished {need} stage .* run `tailorlm {need}` first"):
            run_stage(cfg, stage, echo=lambda s: None)
