"""The tune stage: Ray Tune sweeps over DeepSpeed training runs, with ASHA early stopping.

    tailorlm tune jobs/configs/tiny_cpu.yaml tune.enabled=true tune.num_samples=8

The search space lives in the YAML as dotted keys over the pipeline config
(`train.lr: {loguniform: [1.0e-5, 5.0e-4]}`); a sampled point is applied with the same override
mechanism as the CLI, then validated, so there is one way to change a setting. Outputs:
leaderboard.csv/.json, trials.png and best.yaml, which the train stage applies when tune is enabled.

Two ways to run a trial, both a TorchTrainer (Ray Train V2) running train/loop.py with DeepSpeed:

- fast (the default where it applies, see fast_path_reason): the data is prepared (tokenized with
  Ray Data, cut into rank shards) once per sweep, not once per trial; each trial runs its trainer
  in Ray Train's local mode (ScalingConfig(num_workers=0)) inside the Tune trial's own process,
  which Tune reuses between trials (reuse_actors), so process start, torch/DeepSpeed imports and
  the Train worker group are paid once per sweep slot, not per trial. The one process stands in
  for train.num_workers ranks: it reads every rank's shard and accumulates them into one optimizer
  step (the same global batch and rows per step; eval over every rank's eval shard), so a trial
  computes what the data-parallel run computes, up to float summation order. The loop reports to
  Tune itself (ray.tune.report), so ASHA stops it at a report, and it writes no checkpoints: the
  train stage never resumes a trial, and a sweep restored after an interrupt (Tuner.restore)
  reruns its unfinished trials from step 0 (finished ones are kept).
- plain: a driver per trial that prepares the data and runs a TorchTrainer with num_workers
  workers, whose reports (with checkpoints) reach Tune through TuneReportCallback.
"""

from __future__ import annotations

import math
import os
from typing import Any

import yaml

from tailorlm.config import PipelineConfig, apply_overrides, validate
from tailorlm.runs import RunDir, StageDir
from tailorlm.tune.placement import cleanup_callback

SWEEP = "sweep"

# sampled keys that change what prepare() makes (tokens, rank shards): then every trial prepares its own
DATA_KEYS = ("model.", "data.", "run.seed", "train.format", "train.max_seq_len", "train.packing", "train.num_workers")

# sampled keys that change the model built (prepare's preflight checks it once per config)
MODEL_KEYS = ("model.", "train.method", "train.lora", "train.moe", "train.deepspeed")


def fast_path_reason(cfg: PipelineConfig) -> str | None:
    """Why this sweep's trials cannot take the fast path (see the module docstring), or None:
    checked on the base config and on every value the search space lists (a sampled
    expert_parallel or num_workers must not land in one process)."""
    reason = _fast_path_reason(cfg)
    base = cfg.to_dict()
    for d in cfg.tune.dimensions():
        for value in d.values:
            reason = reason or _fast_path_reason(validate(apply_overrides(base, {d.key: value})))
    return reason


def _fast_path_reason(cfg: PipelineConfig) -> str | None:
    tc = cfg.train
    if tc.moe.expert_parallel > 1:
        return "train.moe.expert_parallel > 1 needs real ranks"
    if tc.use_gpu and tc.num_workers > 1:
        return "one process on one GPU would hold what ZeRO spreads over train.num_workers GPUs"
    return None


def shares_prepare(cfg: PipelineConfig) -> bool:
    """Whether one prepare() serves every trial: no sampled key changes the data."""
    return not any(k.startswith(DATA_KEYS) for k in cfg.tune.search_space)


def trial_cpus(cfg: PipelineConfig, cluster_cpus: int) -> int:
    """CPUs one fast-path trial reserves (and torch threads it runs): its plain trial's workers',
    or a 1/max_concurrent_trials share of the cluster when several trials run at once."""
    cpus = max(1, int(cfg.train.num_workers * cfg.train.cpus_per_worker))
    if cfg.tune.max_concurrent_trials > 1:
        cpus = max(1, min(cpus, cluster_cpus // cfg.tune.max_concurrent_trials))
    return cpus


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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fast_trial(
    sampled: dict[str, Any], base: dict[str, Any], kept_uri: str, trials_uri: str, prep=None, cpus: int = 1
) -> None:
    """One Tune trial (fast path): the trainer in Ray Train's local mode, in this (reused) process,
    on the sweep's prepared shards (prep; None when sampled keys change the data)."""
    import os
    import time

    import torch
    from ray import tune

    from tailorlm.train.ds_config import steps_for
    from tailorlm.train.trainer import make_trainer, prepare

    t0 = time.time()
    try:  # Ray starts workers at niceness 15; this one trains (the plain path's workers get 0 too)
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:
        pass
    torch.set_num_threads(cpus)
    cfg = trial_config(base, sampled)
    world = cfg.train.num_workers
    if prep is None:
        prep = prepare(cfg, kept_uri)
    else:
        preflight_once(cfg, prep["base_path"])  # the sweep's prepare left it to the trials
        prep = {**prep, "total_steps": steps_for(cfg.train, prep["n_train"], world)[1]}
    # one process standing in for `world` ranks: each optimizer step takes every rank's micro-batches
    local = validate(
        apply_overrides(cfg.to_dict(), {"train.num_workers": 1, "train.grad_accum": cfg.train.grad_accum * world})
    )
    world_of_one(cfg.train.use_gpu)
    name = tune.get_context().get_trial_id()
    phases = {"trial_setup_s": time.time() - t0}
    trainer = make_trainer(
        local,
        prep,
        storage_uri=trials_uri,
        name=name,
        local_ranks=world,
        checkpoints=False,
        phases=phases,
        tag=trial_tag(sampled, base),
    )
    trainer.fit()


_checked: set[str] = set()  # model configs this (reused) trial process has preflighted


def preflight_once(cfg: PipelineConfig, base_path: str) -> None:
    """trainer.preflight, once per process for each model config (MODEL_KEYS) a trial asks for: the
    sweep's shared prepare skips it, so the driver never imports torch or transformers' model code
    (~4 s, most of that prepare); a trial process imports them anyway. A model the config does not
    fit then fails the trial with preflight's message, and the stage reports it as every trial's error."""
    import json

    from tailorlm.train.trainer import preflight

    d = cfg.to_dict()
    key = json.dumps(
        [base_path, d["model"], *(d["train"].get(k.split(".", 1)[1]) for k in MODEL_KEYS if k.startswith("train."))],
        sort_keys=True,
        default=str,
    )
    if key not in _checked:
        preflight(cfg, base_path)
        _checked.add(key)


def world_of_one(use_gpu: bool) -> None:
    """A torch.distributed world of one in this process, made once and kept for every trial it runs:
    deepspeed.initialize needs one, and DeepSpeed caches its process groups (deepspeed.utils.groups),
    so a world taken down and made again between two trials fails the second ("Group ... is not
    registered"). Made here, not by TorchTrainer's local mode, which inits (given all six torchrun
    variables) and destroys it around every fit: the fast path runs Ray Train's base
    DataParallelTrainer, which leaves it alone (train/trainer.make_trainer)."""
    import os

    import torch.distributed as dist

    if dist.is_initialized():
        return
    port = _free_port()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if use_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


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
    import time

    import ray
    from ray import tune

    t = cfg.tune
    check_space(cfg)
    reason = fast_path_reason(cfg)
    if fast and reason:
        raise ValueError(f"tune: the fast path does not apply: {reason}")
    fast = not reason if fast is None else fast
    stats = {} if stats is None else stats
    stats.update(fast=fast, prepare_s=0.0)
    base = cfg.to_dict()
    if fast:
        prep = None
        if shares_prepare(cfg):  # once for the sweep; every trial reads the same shards
            from tailorlm.train.trainer import prepare

            t0 = time.time()
            prep = prepare(trial_config(base, {}), kept_uri, build_comm=False, check_model=False)
            stats["prepare_s"] = time.time() - t0
        cpus = trial_cpus(cfg, int(ray.cluster_resources().get("CPU", 1)))
        stats["trial_cpus"] = cpus
        res = {"cpu": cpus, "gpu": 1 if cfg.train.use_gpu else 0}
        trainable = tune.with_resources(
            tune.with_parameters(
                fast_trial, base=base, kept_uri=kept_uri, trials_uri=sdir.sub("trials"), prep=prep, cpus=cpus
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
                scheduler=make_scheduler(cfg),
                search_alg=make_searcher(cfg),
                max_concurrent_trials=t.max_concurrent_trials,
                reuse_actors=fast,  # fast: the next trial runs in the process (imports, gloo) the last one left
            ),
            run_config=tune.RunConfig(name=SWEEP, storage_path=sdir.uri, verbose=1, callbacks=callbacks),
        )
    # On SIGINT Tune saves its state and returns normally, so a sweep stopped that way must not
    # pass for a finished one. Tune's handler, when it fires, puts back the handler it found: we
    # give it a sentinel to find (main thread only; elsewhere Tune installs no handler).
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _sentinel) if main else None
    try:
        results = tuner.fit()
    finally:
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


def error_reason(err: BaseException | None) -> str:
    """The exception line of a trial's error (a Ray task error starts with a header line)."""
    if err is None:
        return ""
    lines = [line.strip() for line in str(getattr(err, "cause", None) or err).splitlines() if line.strip()]
    return (lines[-1] if lines else repr(err))[:300]


def compact(v: Any) -> str:
    """A sampled value, short: 3.2e-04 for small or large floats, else 3 significant digits."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, float) and not v.is_integer() and (abs(v) < 1e-2 or abs(v) >= 1e4):
        return f"{v:.1e}"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def trial_tag(sampled: dict[str, Any], base: dict[str, Any]) -> str:
    """How a trial's progress lines start on the console: '[tune] trial lr=3.2e-04'."""
    return f"[tune] trial {trial_label(sampled, base['tune']['search_space'])}"


def trial_label(config: dict[str, Any], keys) -> str:
    """A trial named by its sampled values: 'lr=3.2e-04 warmup_steps=4' (a key by its last dotted
    component, or in full where two keys share it)."""
    keys = list(keys)
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return " ".join(
        f"{short if last.count(short) == 1 else k}={compact(config.get(k))}" for k, short in zip(keys, last)
    )


def trial_labels(results, keys) -> list[str]:
    """trial_label of each result; a label that repeats (the same point sampled twice) gets #2, #3..."""
    labels = [trial_label(r.config or {}, keys) for r in results]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if labels.count(label) == 1 else f"{label} #{seen[label]}")
    return out


def leaderboard(results, cfg: PipelineConfig):
    import pandas as pd

    t = cfg.tune
    rows = []
    for r, label in zip(results, trial_labels(results, t.search_space)):
        df = r.metrics_dataframe
        has = df is not None and t.metric in df
        best = (df[t.metric].min() if t.mode == "min" else df[t.metric].max()) if has else math.nan
        last_step = int(df["step"].max()) if has and "step" in df else 0
        finished = has and "final" in df and bool(df["final"].fillna(False).astype(bool).any())
        status = "error" if r.error else ("finished" if finished else "stopped early")
        rows.append(
            {
                "trial": os.path.basename(r.path),
                "label": label,
                "status": status,
                t.metric: best,
                "steps": last_step,
                **{k: r.config.get(k) for k in t.search_space},
                "error": error_reason(r.error),
            }
        )
    board = pd.DataFrame(rows).sort_values(t.metric, ascending=t.mode == "min", na_position="last")
    return board.reset_index(drop=True)


def plot_trials(results, metric: str, path: str, keys=()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r, label in zip(results, trial_labels(results, keys)):
        df = r.metrics_dataframe
        if df is not None and metric in df and "step" in df:
            ax.plot(df["step"], df[metric], "o-", ms=3, label=label or os.path.basename(r.path))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if len(results) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
