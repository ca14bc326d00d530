"""Run folders: markers written last, failures leave nothing complete, skip and rerun logic."""

import json

import pytest

from tailorlm.config import load_config
from tailorlm.pipeline import run_stage
from tailorlm.runs import COMPLETE, FAILED, RunDir, StageDir
from tailorlm.stages import BY_NAME


def test_marker_written_last_and_only_on_success(tmp_path):
    sdir = RunDir(str(tmp_path), "r").stage("data")
    with sdir.running({"k": 1}):
        (tmp_path / "r" / "data" / "out.txt").write_text("x")
        assert not sdir.is_complete()
    assert sdir.is_complete() and sdir.marker()["k"] == 1


def test_failure_removes_outputs_but_keeps_resumable(tmp_path):
    sdir = RunDir(str(tmp_path), "r").stage("train", resumable=("checkpoints",))
    with pytest.raises(RuntimeError):
        with sdir.running():
            (tmp_path / "r" / "train" / "checkpoints").mkdir()
            (tmp_path / "r" / "train" / "checkpoints" / "c1").write_text("ckpt")
            (tmp_path / "r" / "train" / "model").mkdir()
            raise RuntimeError("boom")
    names = sorted(p.name for p in (tmp_path / "r" / "train").iterdir())
    assert names == ["_FAILED.json", "checkpoints"]
    assert "boom" in json.loads((tmp_path / "r" / "train" / FAILED).read_text())["error"]
    assert not sdir.is_complete()


def test_rerun_clears_stale_outputs_and_failed_marker(tmp_path):
    sdir = RunDir(str(tmp_path), "r").stage("data")
    (tmp_path / "r" / "data").mkdir(parents=True)
    (tmp_path / "r" / "data" / FAILED).write_text("{}")
    (tmp_path / "r" / "data" / "stale.parquet").write_text("old")
    with sdir.running():
        pass
    assert sorted(p.name for p in (tmp_path / "r" / "data").iterdir()) == [COMPLETE]


def test_uri_storage_via_fsspec():
    sdir = RunDir("memory://tlm-test", "r").stage("data")
    with sdir.running():
        sdir.write_json("stats.json", {"rows": 3})
    assert sdir.is_complete() and sdir.read_json("stats.json") == {"rows": 3}
    assert sdir.sub("kept") == "memory://tlm-test/r/data/kept"


@pytest.fixture
def counting_stage(monkeypatch):
    calls = []

    def fake_run(cfg, run_dir, sdir):
        calls.append(cfg.data.eval_fraction)
        sdir.write_json("out.json", {"n": len(calls)})
        if cfg.data.eval_fraction == 0.5:
            raise ValueError("planted failure")
        return {"n": len(calls)}

    import sys
    import types

    mod = types.ModuleType("tlm_fake_stage")
    mod.run = fake_run
    monkeypatch.setitem(sys.modules, "tlm_fake_stage", mod)
    import dataclasses

    monkeypatch.setitem(BY_NAME, "data", dataclasses.replace(BY_NAME["data"], module="tlm_fake_stage"))
    return calls


def test_finished_stage_is_skipped_until_config_changes_or_forced(tmp_path, counting_stage):
    cfg = load_config(None, [f"run.storage={tmp_path}"])
    quiet = lambda s: None  # noqa: E731
    run_stage(cfg, "data", echo=quiet)
    run_stage(cfg, "data", echo=quiet)
    assert counting_stage == [cfg.data.eval_fraction]
    run_stage(cfg, "data", force=True, echo=quiet)
    assert len(counting_stage) == 2
    changed = load_config(None, [f"run.storage={tmp_path}", "data.eval_fraction=0.2"])
    marker = run_stage(changed, "data", echo=quiet)
    assert len(counting_stage) == 3 and marker["summary"] == {"n": 3}


def test_failed_stage_leaves_no_marker_and_reruns(tmp_path, counting_stage):
    bad = load_config(None, [f"run.storage={tmp_path}", "data.eval_fraction=0.5"])
    with pytest.raises(ValueError, match="planted"):
        run_stage(bad, "data", echo=lambda s: None)
    d = tmp_path / "demo" / "data"
    assert not (d / COMPLETE).exists() and not (d / "out.json").exists() and (d / FAILED).exists()
    good = load_config(None, [f"run.storage={tmp_path}"])
    run_stage(good, "data", echo=lambda s: None)
    assert (d / COMPLETE).exists() and not (d / FAILED).exists()


def test_adhoc_output_never_empties_a_folder_of_other_files(tmp_path):
    """Found by the hostile pass: `tailorlm data --input d/in.jsonl --output d` emptied d (a run
    clears its folder first), the input with it. A folder holding files but no stage marker is
    refused; a new folder, an empty one, and an earlier run's output folder are not."""
    from tailorlm.cli import main

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "in.jsonl").write_text('{"text": "precious"}\n')
    rc = main(["data", "--input", str(tmp_path / "d" / "in.jsonl"), "--output", str(tmp_path / "d")])
    assert rc == 1
    assert (tmp_path / "d" / "in.jsonl").read_text() == '{"text": "precious"}\n'
    for folder in ("new", "empty", "earlier"):
        sdir = StageDir(str(tmp_path / folder), "data")
        if folder == "empty":
            (tmp_path / folder).mkdir()
        if folder == "earlier":
            with sdir.running():
                (tmp_path / folder / "kept").mkdir()
        assert not sdir.holds_other_files()
    assert sorted(p.name for p in (tmp_path / "earlier").iterdir()) == [COMPLETE, "kept"]
