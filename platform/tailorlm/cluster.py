"""Embedded local Ray, or a connection to a cluster (`RAY_ADDRESS`, as `ray job submit` sets).

Code reaches Ray workers as the installed package. When connecting to a cluster whose nodes
may not have it installed, the runtime_env ships `platform/tailorlm` (the package folder itself,
never `platform/`, which would shadow Python's own `platform` module).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent

# Environment every worker gets. Tokenizers' own thread pool fights Ray's workers for cores.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1"}

# Settings for an embedded Ray. Ray Data runs shuffle map and reduce tasks in worker pools of
# their own (separate runtime envs), so one shuffle needs more idle workers than the node has
# CPUs; Ray then kills the surplus after 1 s idle and the next operator or shuffle starts fresh
# Python processes (1-2 s each on 2 cores). Keeping idle workers for a minute cut a 100k-document
# near-dedup from ~32 s to ~24 s here (bench/dedup.py); the cost is the RSS of a few idle workers.
LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000}


def runtime_env(ship_package: bool) -> dict[str, Any]:
    env: dict[str, Any] = {"env_vars": dict(WORKER_ENV)}
    if ship_package:
        env["py_modules"] = [str(PACKAGE_DIR)]
    for key in ("TAILORLM_CACHE", "HF_HUB_OFFLINE", "VLLM_CPU_KVCACHE_SPACE"):
        if key in os.environ:
            env["env_vars"][key] = os.environ[key]
    return env


def init_ray(address: str | None = None, num_cpus: int | None = None, ship_package: bool | None = None) -> dict:
    """Start or connect to Ray once; returns the cluster's resources.

    address None and no RAY_ADDRESS: an embedded local Ray sized to this machine. Otherwise
    connect. ship_package defaults to True when connecting to a remote cluster.
    """
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    address = address or os.environ.get("RAY_ADDRESS")
    if ship_package is None:
        ship_package = bool(address) and address not in ("local",)
    kwargs: dict[str, Any] = {"runtime_env": runtime_env(ship_package), "log_to_driver": True}
    if address:
        # under `ray job submit --runtime-env ...` the job's runtime_env and ours both set env vars;
        # Ray refuses to merge them unless told to (ours adds py_modules and a few variables)
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(address=address, **kwargs)
    else:
        # The dashboard is not optional: besides being where users watch runs, it serves the State
        # API that Ray Train's PlacementGroupCleaner needs to free the resources of a trial that Tune
        # stopped early (without it the next trial waits forever for CPUs).
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
                 dashboard_host="127.0.0.1", _system_config=LOCAL_SYSTEM_CONFIG, **kwargs)
    res = ray.cluster_resources()
    log.info("ray: %s CPUs, %s GPUs", res.get("CPU", 0), res.get("GPU", 0))
    return res


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
