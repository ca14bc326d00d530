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


def loopback_only() -> None:
    """An embedded Ray is one node that no other joins, so it listens on loopback only. Without
    this, Ray's metrics agent serves its Prometheus endpoint (no authentication) on 0.0.0.0, and
    the GCS, raylet and workers listen on every interface: Ray uses the routable address
    whenever it may form a cluster (`ray_constants.ENABLE_RAY_CLUSTER`), and
    `ray.init(_node_ip_address="127.0.0.1")` is rewritten to that address. This Ray 2.60 switch
    (named for Windows/macOS, where Ray is single-node by default) is read when ray is imported,
    so it must be set before that."""
    import sys

    if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        log.warning("ray was imported before tailorlm could keep the embedded Ray on loopback")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def runtime_env(ship_package: bool) -> dict[str, Any]:
    env: dict[str, Any] = {"env_vars": dict(WORKER_ENV)}
    if ship_package:
        env["py_modules"] = [str(PACKAGE_DIR)]
    # RAY_DATA_DISABLE_PROGRESS_BARS: the console's (console.session), for Ray Data in Train workers
    for key in ("TAILORLM_CACHE", "HF_HUB_OFFLINE", "VLLM_CPU_KVCACHE_SPACE", "RAY_DATA_DISABLE_PROGRESS_BARS"):
        if key in os.environ:
            env["env_vars"][key] = os.environ[key]
    return env


def private_auth_token() -> None:
    """Ray 2.60 turns on token authentication for a new local cluster and writes the token to
    ~/.ray/auth_token with the process umask (0644 usually): readable by every user of the
    machine, and the token lets its holder run any code on the cluster. Write it first, 0600 in a
    0700 folder (Ray then reads the existing file); tighten one that is already there."""
    from pathlib import Path

    folder = Path.home() / ".ray"
    path = folder / "auth_token"
    if not path.exists() and os.environ.get("RAY_AUTH_MODE", "token").lower() == "token":
        from ray._private.authentication.authentication_token_setup import generate_and_save_token

        old = os.umask(0o077)
        try:
            generate_and_save_token()
        finally:
            os.umask(old)
    for p, mode in ((folder, 0o700), (path, 0o600)):
        if p.exists() and p.stat().st_uid == os.getuid() and p.stat().st_mode & 0o077:
            p.chmod(mode)


def init_ray(address: str | None = None, num_cpus: int | None = None, ship_package: bool | None = None) -> dict:
    """Start or connect to Ray once; returns the cluster's resources.

    address None and no RAY_ADDRESS: an embedded local Ray sized to this machine. Otherwise
    connect. ship_package defaults to True when connecting to a remote cluster.
    """
    import sys

    address = address or os.environ.get("RAY_ADDRESS")
    if not address and not ("ray" in sys.modules and sys.modules["ray"].is_initialized()):
        loopback_only()
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    if ship_package is None:
        ship_package = bool(address) and address not in ("local",)
    kwargs: dict[str, Any] = {"runtime_env": runtime_env(ship_package), "log_to_driver": True}
    if address:
        # under `ray job submit --runtime-env ...` the job's runtime_env and ours both set env vars;
        # Ray refuses to merge them unless told to (ours adds py_modules and a few variables)
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ctx = ray.init(address=address, **kwargs)
    else:
        # The dashboard is not optional: besides being where users watch runs, it serves the State
        # API that Ray Train's PlacementGroupCleaner needs to free the resources of a trial that Tune
        # stopped early (without it the next trial waits forever for CPUs).
        private_auth_token()
        ctx = ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _system_config=LOCAL_SYSTEM_CONFIG,
            **kwargs,
        )
    res = ray.cluster_resources()
    log.info("ray: %s CPUs, %s GPUs", res.get("CPU", 0), res.get("GPU", 0))
    from tailorlm.console import attach_ray

    attach_ray(getattr(ctx, "dashboard_url", None), res)  # worker output to the log files (no console: as Ray prints)
    return res


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
