"""The tune stage: Ray Tune sweeps over DeepSpeed training runs, with ASHA early stopping.

    tailorlm tune jobs/configs/tiny_cpu.yaml tune.enabled=true tune.num_samples=8

The search space lives in the YAML as dotted keys over the pipeline config
(`train.lr: {loguniform: [1.0e-5, 5.0e-4]}`); a sampled point is applied with the same override
mechanism as the CLI, then validated, so there is one way to change a setting. Outputs:
leaderboard.csv/.json, trials.png and best.yaml, which the train stage applies when tune is enabled.

Two ways to run a trial, both a TorchTrainer (Ray Train V2) running train/loop.py with DeepSpeed:

- fast (the default where fast_path_reason allows it; tune/fast.py): the data prepared once per
  sweep, each trial in Ray Train's local mode inside a Tune process reused between trials, no
  checkpoints.
- plain: a driver per trial that prepares the data and runs a TorchTrainer with num_workers
  workers, whose reports (with checkpoints) reach Tune through TuneReportCallback.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from tailorlm.config import PipelineConfig, apply_overrides, validate
from tailorlm.runs import RunDir, StageDir
from tailorlm.tune.fast import fast_path_reason, fast_trial, shares_prepare, start_sweep_data, trial_cpus
from tailorlm.tune.placement import cleanup_callback
from tailorlm.tune.results import leaderboard, plot_trials, trial_tag

SWEEP = "sweep"


def search_space(cfg: PipelineConfig) -> dict[str, Any]:
    from ray import tune

    space = {}
    for d in cfg.tune.dimensions():
        values = list(d.values)
        space[d.key] = {
            "loguniform": lambda v: tune.loguniform(*v),
            "uniform": lambda v: tune.uniform(*v),
            "randint": lambda v: tune.randint(v[0], v[1] + 1),
            "choice": tune.choice,
            "grid": tune.grid_search,
        }[d.kind](values)
        if cfg.tune.searcher == "grid" and d.kind == "choice":
            space[d.key] = tune.grid_search(values)
    return space


def check_space(cfg: PipelineConfig) -> None:
    """Apply every listed value (and both range ends) through the override path, so a bad key or
    value fails before any trial starts."""
    base = cfg.to_dict()
    for d in cfg.tune.dimensions():
        for value in d.values:
            validate(apply_overrides(base, {d.key: value}))


def trial_config(base: dict[str, Any], sampled: dict[str, Any]) -> PipelineConfig:
    cfg = validate(apply_overrides(base, sampled))
    if cfg.tune.trial_max_steps:
        cfg = validate(apply_overrides(cfg.to_dict(), {"train.max_steps": cfg.tune.trial_max_steps}))
    return cfg


def trial_driver(sampled: dict[str, Any], base: dict[str, Any], kept_uri: str, trials_uri: str) -> None:
    """One Tune trial (plain path): apply the sampled overrides, then run a whole Ray Train job."""
    import time

    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from tailorlm.train.trainer import make_trainer, prepare

    t0 = time.time()
    cfg = trial_config(base, sampled)
    prep = prepare(cfg, kept_uri)
    name = tune.get_context().get_trial_id()
    phases = {"prepare_s": time.time() - t0}
    trainer = make_trainer(
        cfg,
        prep,
        storage_uri=trials_uri,
        name=name,
        callbacks=[TuneReportCallback()],
        phases=phases,
        tag=trial_tag(sampled, base),
    )
    result = trainer.fit()
    if result.error:
        raise result.error


def make_scheduler(cfg: PipelineConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    t = cfg.tune
    if t.scheduler == "asha":
        # Rungs at grace * 3^k steps. max_t stays unbounded: ASHA stops every trial that reaches
        # max_t, and a stop that lands while Ray Train is finishing leaks its placement group.
        return ASHAScheduler(
            time_attr="step", grace_period=t.grace_period * cfg.train.eval_every, max_t=10**9, reduction_factor=3
        )
    if t.scheduler == "median":
        return MedianStoppingRule(time_attr="step", grace_period=t.grace_period * cfg.train.eval_every)
    return FIFOScheduler()


def make_searcher(cfg: PipelineConfig):
    if cfg.tune.searcher != "optuna":
        # random sampling and grid_search come from the param space; seeded, so a sweep (and the
        # tune benchmark's two schedulers) sees the same sampled points on every run
        from ray.tune.search import BasicVariantGenerator

        # (Tune applies max_concurrent_trials only to the generator it builds itself, so say it here)
        return BasicVariantGenerator(random_state=cfg.run.seed, max_concurrent=cfg.tune.max_concurrent_trials)
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as exc:  # optuna missing
        raise ValueError("tune.searcher: optuna needs the optuna package: pip install 'tailorlm[optuna]'") from exc
    return OptunaSearch(seed=cfg.run.seed)


def run_sweep(cfg: PipelineConfig, kept_uri: str, sdir: StageDir, fast: bool | None = None, stats: dict | None = None):
    """fast: None takes the fast path where fast_path_reason allows it. stats, when given, is
    filled with what the benchmark reports (path, sweep-level prepare seconds, trial CPUs)."""

    import ray
    from ray import tune

    check_space(cfg)
    reason = fast_path_reason(cfg)
    if fast and reason:
        raise ValueError(f"tune: the fast path does not apply: {reason}")
    fast = not reason if fast is None else fast
    stats = {} if stats is None else stats
    stats.update(fast=fast, prepare_s=0.0)
    base = cfg.to_dict()
    scheduler, searcher = make_scheduler(cfg), make_searcher(cfg)  # before the actor: their errors leak nothing
    data = None  # the fast path's SweepData actor
    if fast:
        if shares_prepare(cfg):  # once for the sweep, beside Tune's start; every trial reads the same shards
            data = start_sweep_data(base, kept_uri)
        cpus = trial_cpus(cfg, int(ray.cluster_resources().get("CPU", 1)))
        stats["trial_cpus"] = cpus
        res = {"cpu": cpus, "gpu": 1 if cfg.train.use_gpu else 0}
        trainable = tune.with_resources(
            tune.with_parameters(
                fast_trial, base=base, kept_uri=kept_uri, trials_uri=sdir.sub("trials"), data=data, cpus=cpus
            ),
            res,
        )
        callbacks = []
    else:
        print(f"[tune] plain trials (a TorchTrainer with workers each): {reason or 'asked for'}")
        trainable = tune.with_resources(  # the trial driver only waits on its trainer: it needs no CPU
            tune.with_parameters(trial_driver, base=base, kept_uri=kept_uri, trials_uri=sdir.sub("trials")),
            {"cpu": 0, "memory": 64 * 2**20},
        )  # a zero bundle is rejected; memory makes it non-empty
        callbacks = [cleanup_callback()]
    sweep_uri = sdir.sub(SWEEP)
    try:
        tuner = _tuner(cfg, trainable, sweep_uri, sdir, fast, callbacks, scheduler, searcher)
    except BaseException:  # the actor must not outlive a sweep that never started
        if data is not None:
            ray.kill(data)
        raise
    # On SIGINT Tune saves its state and returns normally, so a sweep stopped that way must not
    # pass for a finished one. Tune's handler, when it fires, puts back the handler it found: we
    # give it a sentinel to find (main thread only; elsewhere Tune installs no handler).
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _sentinel) if main else None
    auto_loggers = os.environ.get(NO_AUTO_LOGGERS)
    os.environ[NO_AUTO_LOGGERS] = "1"  # result_loggers says why
    try:
        results = tuner.fit()
        stopped = main and signal.getsignal(signal.SIGINT) is _sentinel
        if data is not None and not stopped:  # a failed prepare failed every trial; say it by its own error
            try:
                _, stats["prepare_beside_s"], error = ray.get(data.prepared.remote(), timeout=600)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                error = None  # the actor itself died or hung: the trials' errors say what happened
            if error:
                raise error
    finally:
        if data is not None:
            ray.kill(data)
        if auto_loggers is None:
            os.environ.pop(NO_AUTO_LOGGERS, None)
        else:
            os.environ[NO_AUTO_LOGGERS] = auto_loggers
        interrupted = main and signal.getsignal(signal.SIGINT) is _sentinel
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)
    expected = expected_trials(cfg)
    never_ran = [r for r in results if r.error is None and (r.metrics_dataframe is None or r.config is None)]
    if interrupted or never_ran or len(results) < expected:
        raise SweepInterrupted(
            f"tune: the sweep was interrupted before all {expected} trials "
            f"finished; rerun the same command to resume it from {sweep_uri}"
        )
    return results


def _tuner(cfg: PipelineConfig, trainable, sweep_uri: str, sdir: StageDir, fast: bool, callbacks, scheduler, searcher):
    """A new Tuner for the sweep, or the interrupted one at sweep_uri restored."""
    from ray import tune

    t = cfg.tune
    if tune.Tuner.can_restore(sweep_uri):
        print(f"[tune] resuming the interrupted sweep at {sweep_uri}")
        tuner = tune.Tuner.restore(sweep_uri, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg),
            # grid: every point once (Tune would repeat the whole grid num_samples times)
            tune_config=tune.TuneConfig(
                metric=t.metric,
                mode=t.mode,
                num_samples=1 if t.searcher == "grid" else t.num_samples,
                scheduler=scheduler,
                search_alg=searcher,
                max_concurrent_trials=t.max_concurrent_trials,
                reuse_actors=fast,  # fast: the next trial runs in the process (imports, gloo) the last one left
            ),
            run_config=tune.RunConfig(
                name=SWEEP, storage_path=sdir.uri, verbose=1, callbacks=[*callbacks, *result_loggers()]
            ),
        )
    return tuner


NO_AUTO_LOGGERS = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"


def result_loggers() -> list:
    """The result files Tune's results are read from (progress.csv, result.json), without the
    TensorBoard logger Tune adds by default: tensorboardX imports torch in the driver, 1.5 s of a
    sweep's start on the critical path (the first trial waits for it; measured on the demo's
    sweep). The leaderboard and trials.png show what its event files would; a trial's own
    train.tensorboard files are unaffected."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [CSVLoggerCallback(), JsonLoggerCallback()]


def _sentinel(signum, frame):
    raise KeyboardInterrupt


class SweepInterrupted(RuntimeError):
    pass


def expected_trials(cfg: PipelineConfig) -> int:
    """Trials a full sweep runs: num_samples (1 for grid) times the size of every grid axis."""
    t = cfg.tune
    n = 1 if t.searcher == "grid" else t.num_samples
    for d in t.dimensions():
        if d.is_grid or (t.searcher == "grid" and d.kind == "choice"):
            n *= len(d.values)
    return n


def run(cfg: PipelineConfig, run_dir: RunDir, sdir: StageDir) -> dict[str, Any]:
    import tempfile

    data = run_dir.stage("data")  # finished: the pipeline checks a stage's needs (stages.py)
    if not cfg.tune.search_space:
        raise ValueError(
            "tune.search_space is empty: give at least one dotted key, e.g. train.lr: {loguniform: [1.0e-5, 1.0e-3]}"
        )
    results = run_sweep(cfg, data.sub("kept"), sdir)
    board = leaderboard(results, cfg)
    ok = board[board["status"] != "error"].dropna(subset=[cfg.tune.metric])
    if ok.empty:
        raise RuntimeError(f"tune: every trial failed; first error: {board['error'].iloc[0]}")
    best = ok.iloc[0]
    overrides = {k: (v.item() if hasattr(v, "item") else v) for k, v in best.items() if k in cfg.tune.search_space}
    with sdir.open("best.yaml", "w") as fh:
        yaml.safe_dump(
            {"overrides": overrides, cfg.tune.metric: float(best[cfg.tune.metric]), "trial": best["trial"]},
            fh,
            sort_keys=False,
        )
    with sdir.open("leaderboard.csv", "w") as fh:
        board.to_csv(fh, index=False)
    sdir.write_json("leaderboard.json", board.to_dict("records"))
    with tempfile.TemporaryDirectory() as tmp:
        plot_trials(results, cfg.tune.metric, os.path.join(tmp, "trials.png"), cfg.tune.search_space)
        sdir.put(os.path.join(tmp, "trials.png"), "trials.png")
    print(board.drop(columns=["error", "trial"]).to_string(index=False))
    print(f"best: {overrides} ({cfg.tune.metric} {best[cfg.tune.metric]:.4f})")
    print(f"leaderboard: {sdir.sub('leaderboard.csv')}\nbest:        {sdir.sub('best.yaml')}")
    return {
        "best_overrides": overrides,
        "metric": cfg.tune.metric,
        cfg.tune.metric: float(best[cfg.tune.metric]),
        "trials": len(board),
        "stopped_early": int((board["status"] == "stopped early").sum()),
        "errors": int((board["status"] == "error").sum()),
        "trial_steps": int(board["steps"].sum()),
    }


def best_overrides(run_dir: RunDir) -> dict[str, Any] | None:
    """The winning overrides of a finished sweep, or None."""
    sdir = run_dir.stage("tune")
    if not sdir.is_complete():
        return None
    with sdir.open("best.yaml") as fh:
        return yaml.safe_load(fh)["overrides"]


def recap(s: dict[str, Any]) -> str:
    """One line for the end of `tailorlm run`."""
    metric = s.get("metric", "eval_loss")  # markers written before tune summaries named their metric
    return (
        f"best of {s['trials']} trials: {s['best_overrides']} ({metric} {s[metric]:.3f}; "
        f"{s['stopped_early']} stopped early by the scheduler)"
    )
