"""A real sweep: trials are TorchTrainer runs, metrics reach Tune, a crashing trial is recorded."""

import json

import pandas as pd
import pytest
import yaml

from tailorlm.config import load_config
from tailorlm.pipeline import run_stage

from .test_train_stage import _write_data_stage

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_sweep_leaderboard_best_and_crash(ray_local, tmp_path):
    _write_data_stage(tmp_path)
    cfg = load_config(None, [f"run.storage={tmp_path}", "train.max_seq_len=64", "train.max_steps=4",
                             "train.eval_every=2", "train.warmup_steps=1", "train.lr=3e-3", "train.method=full",
                             "tune.enabled=true", "tune.searcher=grid", "tune.scheduler=asha",
                             # 100000 passes validation but is more than the data holds: that trial crashes
                             "tune.search_space={train.micro_batch_size: {grid: [4, 100000]}}"])
    marker = run_stage(cfg, "tune", echo=lambda s: None)
    t = tmp_path / "demo" / "tune"
    board = pd.read_csv(t / "leaderboard.csv")
    assert len(board) == 2
    crashed = board[board["status"] == "error"]
    assert len(crashed) == 1 and "global batch" in crashed["error"].iloc[0]
    good = board[board["status"] != "error"].iloc[0]
    assert good["train.micro_batch_size"] == 4 and good["steps"] == 4  # reported at steps 2 and 4
    best = yaml.safe_load((t / "best.yaml").read_text())
    assert best["overrides"] == {"train.micro_batch_size": 4}
    assert (t / "trials.png").stat().st_size > 1000
    assert json.loads((t / "leaderboard.json").read_text())[0]["status"] == "finished"
    assert marker["summary"]["errors"] == 1
