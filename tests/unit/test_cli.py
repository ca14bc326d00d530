"""The CLI: help for every stage, clear config errors with exit code 2."""

import subprocess
import sys

import pytest

from tailorlm.cli import main
from tailorlm.stages import NAMES


def tailorlm(*args):
    return subprocess.run([sys.executable, "-m", "tailorlm.cli", *args], capture_output=True, text=True)


def test_top_level_help_lists_every_stage():
    out = tailorlm("--help")
    assert out.returncode == 0
    for cmd in ["run", *NAMES, "config"]:
        assert cmd in out.stdout
    assert "dotted.key=value" in out.stdout


@pytest.mark.parametrize("stage", NAMES)
def test_stage_help(stage, capsys):
    with pytest.raises(SystemExit) as exc:
        main([stage, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "KEY=VALUE" in text and "--address" in text


def test_bad_config_key_is_one_clear_error(tmp_path):
    out = tailorlm("config", "jobs/configs/tiny_cpu.yaml", "train.lrr=1")
    assert out.returncode == 2
    assert "unknown key 'train.lrr'" in out.stderr and "Traceback" not in out.stderr


def test_config_prints_resolved_yaml():
    out = tailorlm("config", "jobs/configs/tiny_cpu.yaml", "train.lr=0.5")
    assert out.returncode == 0 and "lr: 0.5" in out.stdout


def test_recap_names_the_metric_the_sweep_ranked_by():
    """tune.metric=eval_ppl crashed the final recap, which read the summary under eval_loss."""
    from tailorlm.pipeline import recap

    marker = {
        "summary": {
            "best_overrides": {"train.lr": 1e-3},
            "metric": "eval_ppl",
            "eval_ppl": 12.5,
            "trials": 3,
            "stopped_early": 1,
        }
    }
    assert "eval_ppl 12.500" in recap({"tune": marker})


def test_tune_metric_is_a_closed_set():
    import pytest

    from tailorlm.config import ConfigError, load_config

    assert load_config(None, ["tune.metric=eval_ppl"]).tune.metric == "eval_ppl"
    with pytest.raises(ConfigError, match="tune.metric"):
        load_config(None, ["tune.metric=eval_los"])  # a typo fails here, not after every trial ran


def test_dead_keys_are_refused():
    import pytest

    from tailorlm.config import ConfigError, load_config

    for key in ("train.checkpoint_every=5", "export.merge_lora=true"):
        with pytest.raises(ConfigError, match="unknown key"):
            load_config(None, [key])
