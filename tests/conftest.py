"""Shared fixtures: a private model cache, a tiny factory model, and one local Ray per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded here; fail fast if tried
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the test Ray on loopback (cluster.loopback_only)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Factory models go to a per-session cache, so tests never depend on a user's ~/.cache."""
    path = tmp_path_factory.mktemp("tailorlm-cache")
    os.environ["TAILORLM_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_path(model_cache) -> str:
    from tailorlm.config import load_config
    from tailorlm.models import resolve_base

    return resolve_base(load_config(None).model)


@pytest.fixture(scope="session")
def ray_local():
    """A session-scoped local Ray with 2 CPUs, started by the tests and shut down after them."""
    import ray

    from tailorlm.cluster import LOCAL_SYSTEM_CONFIG, private_auth_token, runtime_env

    private_auth_token()
    # with the dashboard: Ray Train needs its State API to clean up after trials Tune stops
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=True,
        runtime_env=runtime_env(False),
        _system_config=LOCAL_SYSTEM_CONFIG,
    )
    yield ray
    ray.shutdown()
