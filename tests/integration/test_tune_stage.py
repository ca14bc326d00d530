"""A real sweep: trials are TorchTrainer runs, metrics reach Tune, a crashing trial is recorded."""

import json

import pandas as pd
import pytest
import yaml

from tailorlm.config import load_config
from tailorlm.pipeline import run_stage
from tailorlm.runs import COMPLETE

from .test_train_stage import _write_data_stage

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_sweep_leaderboard_best_and_crash(ray_local, tmp_path):
    _write_data_stage(tmp_path)
    cfg = load_config(
        None,
        [
            f"run.storage={tmp_path}",
            "train.max_seq_len=64",
            "train.max_steps=4",
            "train.eval_every=2",
            "train.warmup_steps=1",
            "train.lr=3e-3",
            "train.method=full",
            "tune.enabled=true",
            "tune.searcher=grid",
            "tune.scheduler=asha",
            # 100000 passes validation but is more than the data holds: that trial crashes
            "tune.search_space={train.micro_batch_size: {grid: [4, 100000]}}",
        ],
    )
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


def _finished_trials(sweep) -> list:
    return [p for p in sweep.glob("*/result.json") if '"final": true' in p.read_text()]


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_local, tmp_path, capsys):
    """Ctrl+C (SIGINT) a `tailorlm tune` driver after its first trial: the stage is marked failed, not
    complete; the same command again restores the sweep (Tuner.restore) and runs only what is left.
    (The second trial is the long one: fast-path trials of 4 steps take about a second, so a second
    short one would finish before the interrupt lands.)"""
    import signal
    import subprocess
    import sys
    import time

    _write_data_stage(tmp_path)
    overrides = [
        f"run.storage={tmp_path}",
        "train.max_seq_len=64",
        "train.eval_every=2",
        "train.warmup_steps=1",
        "train.method=full",
        "train.micro_batch_size=4",
        "tune.enabled=true",
        "tune.searcher=grid",
        "tune.scheduler=none",
        "tune.search_space={train.max_steps: {grid: [4, 300]}}",
    ]
    (tmp_path / "cfg.yaml").write_text("run: {name: demo}\n")
    address = ray_local.get_runtime_context().gcs_address
    log = tmp_path / "tune.log"  # a file, not a pipe: nobody reads a pipe while the sweep runs
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tailorlm.cli",
                "tune",
                str(tmp_path / "cfg.yaml"),
                *overrides,
                "--address",
                address,
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    sweep = tmp_path / "demo" / "tune" / "sweep"
    deadline = time.time() + 300
    while time.time() < deadline and not _finished_trials(sweep) and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, log.read_text()[-3000:]
    first = _finished_trials(sweep)
    assert len(first) == 1
    first_reports = first[0].read_text()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=180)
    out = log.read_text()
    assert proc.returncode != 0, out[-3000:]
    assert "interrupted" in out and "rerun the same command" in out, out[-3000:]
    tune_dir = tmp_path / "demo" / "tune"
    assert (tune_dir / "_FAILED.json").exists() and not (tune_dir / COMPLETE).exists()
    assert not (tune_dir / "leaderboard.csv").exists()  # no partial leaderboard passed off as final

    cfg = load_config(str(tmp_path / "cfg.yaml"), overrides)
    run_stage(cfg, "tune", echo=lambda s: None)
    assert "resuming the interrupted sweep" in capsys.readouterr().out
    board = pd.read_csv(tune_dir / "leaderboard.csv")
    assert sorted(board["train.max_steps"]) == [4, 300]
    assert (board["status"] == "finished").all() and (board["steps"] == board["train.max_steps"]).all()
    assert first[0].read_text() == first_reports  # the finished trial was not run again
    assert (tune_dir / COMPLETE).exists()


def test_leaked_placement_group_is_released_and_used_ones_kept(ray_local):
    """The sweep's safety net: a CPU placement group no actor uses (what a trial Tune stopped
    mid-shutdown leaves) is removed; one with a live actor, and Tune's CPU-less ones, are kept."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from tailorlm.tune.placement import release_leaked_placement_groups

    @ray.remote(num_cpus=1)
    class Worker:
        def ping(self):
            return 1

    used, idle, tune_own = (
        placement_group([{"CPU": 1}]),
        placement_group([{"CPU": 1}]),
        placement_group([{"memory": 2**26}]),
    )
    ray.get([used.ready(), idle.ready(), tune_own.ready()])
    w = Worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(used)).remote()
    ray.get(w.ping.remote())
    freed = release_leaked_placement_groups(wait_s=0.5)  # (earlier tests may have left others)
    assert idle.id.hex() in freed and used.id.hex() not in freed and tune_own.id.hex() not in freed
    assert placement_group_table(idle)["state"] == "REMOVED"
    assert placement_group_table(used)["state"] == "CREATED"
    assert placement_group_table(tune_own)["state"] == "CREATED"
    ray.kill(w)
    ray.util.remove_placement_group(used)
    ray.util.remove_placement_group(tune_own)


def _sweep(tmp_path, name: str, fast: bool, *extra):
    from tailorlm.runs import StageDir
    from tailorlm.tune.stage import run_sweep

    cfg = load_config(
        None,
        [
            f"run.storage={tmp_path}",
            "train.max_seq_len=64",
            "train.max_steps=4",
            "train.eval_every=2",
            "train.warmup_steps=1",
            "train.method=full",
            "train.micro_batch_size=4",
            "tune.enabled=true",
            "tune.searcher=grid",
            *extra,
        ],
    )
    stats: dict = {}
    results = run_sweep(
        cfg, str(tmp_path / "demo" / "data" / "kept"), StageDir(str(tmp_path / name), "tune"), fast, stats
    )
    assert stats["fast"] is fast
    return results


def test_fast_path_trains_what_the_plain_path_trains(ray_local, tmp_path):
    """One local-mode process standing in for 2 Train workers (their rank shards interleaved into one
    optimizer step) gives the data-parallel run's eval losses, up to float summation order."""
    _write_data_stage(tmp_path)
    space = ["tune.scheduler=none", "tune.search_space={train.lr: {grid: [0.003]}}"]
    losses = {}
    for fast in (False, True):
        (r,) = _sweep(tmp_path, f"tune-{fast}", fast, *space)
        df = r.metrics_dataframe.sort_values("step")
        assert list(df["step"]) == [2, 4] and bool(df["final"].iloc[-1])
        assert df["loop_s"].iloc[-1] > 0 and "phase_ds_init_s" in df
        losses[fast] = list(df["eval_loss"])
    plain, fast = losses[False], losses[True]
    assert plain[1] < plain[0]  # it learned something, so equal losses say something
    for p, f in zip(plain, fast):
        assert abs(p - f) <= 0.02 * p, (plain, fast)


def test_fast_path_with_one_worker(ray_local, tmp_path):
    """train.num_workers=1: the local-mode loop finds its one rank's shards (review: it asked for
    Train's unnamed shard, which local mode does not have, and every trial failed)."""
    _write_data_stage(tmp_path)
    space = ["train.num_workers=1", "tune.scheduler=none", "tune.search_space={train.lr: {grid: [0.003]}}"]
    (r,) = _sweep(tmp_path, "tune-one", True, *space)
    assert r.error is None, r.error
    assert list(r.metrics_dataframe.sort_values("step")["step"]) == [2, 4]


def test_fast_path_asha_stops_trials_and_the_reused_process_runs_the_next(ray_local, tmp_path):
    """ASHA stops the fast path's trials at a report (Tune's own session, not Ray Train's), and the trial
    after a stopped one runs in the same reused process (its world of one kept for the next)."""
    _write_data_stage(tmp_path)
    results = _sweep(
        tmp_path,
        "tune-asha",
        True,
        "train.max_steps=6",
        "tune.scheduler=asha",
        "tune.search_space={train.lr: {grid: [0.003, 0.000001, 0.002]}}",
    )
    assert all(r.error is None for r in results), [r.error for r in results]
    steps = {r.config["train.lr"]: int(r.metrics_dataframe["step"].max()) for r in results}
    assert steps[0.003] == 6 and steps[0.000001] < 6, steps  # the hopeless lr stopped at the first rung
    assert 0.002 in steps and steps[0.002] >= 2
    pids = {int(r.metrics_dataframe["pid"].iloc[0]) for r in results}
    assert len(pids) == 1, pids  # one Tune process ran all three trials (reuse_actors)


def _alive_sweep_data() -> list:
    from ray.util.state import list_actors

    return list_actors(filters=[("class_name", "=", "SweepData"), ("state", "=", "ALIVE")])


def test_fast_path_data_prepared_beside_tune_fails_the_sweep_by_its_message(ray_local, tmp_path):
    """The sweep's one prepare runs in a SweepData actor while Tune starts: a prepare that fails
    (a global batch larger than the data, not a sampled key) fails run_sweep with prepare's own
    ValueError, not an ActorDiedError, and the actor is gone after the sweep either way."""
    _write_data_stage(tmp_path)
    space = ["tune.scheduler=none", "tune.search_space={train.lr: {grid: [0.003]}}"]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _sweep(tmp_path, "tune-bad", True, "train.micro_batch_size=100000", *space)
    assert not _alive_sweep_data()
    (r,) = _sweep(tmp_path, "tune-good", True, *space)
    assert r.error is None, r.error
    assert not _alive_sweep_data()
    trial_dir = tmp_path / "tune-good" / "sweep"
    # Tune's result files are written; its TensorBoard logger (torch in the driver) is not
    assert list(trial_dir.glob("*/progress.csv")) and list(trial_dir.glob("*/result.json"))
    assert not list(trial_dir.glob("*/events.out.tfevents*"))
