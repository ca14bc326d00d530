"""The fast trial path of a sweep (the default where fast_path_reason allows it).

The data is prepared (tokenized, cut into rank shards) once per sweep, not once per trial, by a
SweepData actor that starts beside Tune: the driver does not wait for it, so its tokenizer
imports and tokenizing overlap Tune's start and the first trial's imports. Each trial runs its
trainer in Ray Train's local mode inside the Tune trial's own process, which Tune reuses between
trials (reuse_actors), so process start, torch/DeepSpeed imports and the Train worker group are
paid once per sweep slot, not per trial. The one process stands in for train.num_workers ranks:
it reads every rank's shard and accumulates them into one optimizer step (the same global batch
and rows per step; eval over every rank's eval shard), so a trial computes what the
data-parallel run computes, up to float summation order (and, with dropout, one random stream for
all stood-in ranks). The loop reports to Tune itself (ray.tune.report), so ASHA stops it at a
report, and it writes no checkpoints: the train stage never resumes a trial, and a sweep restored
after an interrupt (Tuner.restore) reruns its unfinished trials from step 0.
"""

from __future__ import annotations

from typing import Any

from tailorlm.config import PipelineConfig, apply_overrides, validate

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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fast_trial(
    sampled: dict[str, Any], base: dict[str, Any], kept_uri: str, trials_uri: str, data=None, cpus: int = 1
) -> None:
    """One Tune trial (fast path): the trainer in Ray Train's local mode, in this (reused) process,
    on the sweep's prepared shards (data: the sweep's SweepData actor; None when sampled keys
    change the data, and the trial prepares its own)."""
    import os
    import time

    import ray
    import torch
    from ray import tune

    from tailorlm.models import skip_sklearn_import

    skip_sklearn_import()

    from tailorlm.train.ds_config import steps_for
    from tailorlm.train.trainer import make_trainer, prepare
    from tailorlm.tune.results import trial_tag
    from tailorlm.tune.stage import trial_config

    t0 = time.time()
    try:  # Ray starts workers at niceness 15; this one trains (the plain path's workers get 0 too)
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:
        pass
    torch.set_num_threads(cpus)
    cfg = trial_config(base, sampled)
    world = cfg.train.num_workers
    if data is None:
        prep = prepare(cfg, kept_uri)
    else:
        prep, _, error = ray.get(data.prepared.remote(), timeout=900)
        if error:
            raise error
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


class SweepData:
    """Holds the sweep's one prepare (train/trainer.prepare, without preflight and DeepSpeed's comm
    build, which the trial processes do) for its trials. An actor, so the driver need not wait
    for it: Tune starts while it tokenizes. Pinned to the driver's node with no CPU, as the
    driver's own prepare was (trainer.held_by_driver: blocks made on a worker node die with it);
    the blocks it puts live as long as it does, and run_sweep kills it when the sweep ends."""

    def __init__(self, base: dict[str, Any], kept_uri: str):
        import time

        from tailorlm.train.trainer import prepare
        from tailorlm.tune.stage import trial_config

        t0 = time.time()
        self.prep, self.error = None, None
        try:
            self.prep = prepare(trial_config(base, {}), kept_uri, build_comm=False, check_model=False)
        except Exception as e:  # kept, not raised: an actor's failed start reaches callers as ActorDiedError
            self.error = e
        self.seconds = time.time() - t0

    def prepared(self) -> tuple[dict[str, Any] | None, float, Exception | None]:
        """(prepare's result, its seconds, its error): a trial and run_sweep raise the error itself,
        so a sweep whose data cannot be prepared fails with prepare's message."""
        return self.prep, self.seconds, self.error


def start_sweep_data(base: dict[str, Any], kept_uri: str):
    """A SweepData actor on this (the driver's) node, preparing as soon as it starts."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(SweepData).options(num_cpus=0, scheduling_strategy=here).remote(base, kept_uri)
