"""API keys stay in the process that reads them: started the way `tailorlm serve` starts Ray
(keys in the environment of the CLI), no Ray process and no task of another job can read them;
Ray's token file is private and its unauthenticated metrics endpoint listens on loopback only."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]
CANARY = "leak-canary-7f3a91"

DRIVER = """
import json, os, subprocess, sys
import psutil
from tailorlm.cluster import init_ray
from tailorlm.serving.keys import read_keys, take_from_env
from tailorlm.config import load_config

take_from_env("TAILORLM_API_KEYS")  # what tailorlm's CLI does before it starts Ray
init_ray(num_cpus=1)
import ray
job = ("import os, ray; ray.init(); "
       "print(repr(ray.get(ray.remote(lambda: os.environ.get('TAILORLM_API_KEYS')).remote())))")
other = subprocess.run([sys.executable, "-c", job], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address})
mine = ray.get(ray.remote(lambda: os.environ.get("TAILORLM_API_KEYS")).remote())
metrics_port = ray.nodes()[0]["MetricsExportPort"]
metrics_bind = sorted({c.laddr.ip for c in psutil.net_connections("inet")
                       if c.status == "LISTEN" and c.laddr.port == metrics_port})
leaks = []
for proc in psutil.process_iter():
    if proc.pid == os.getpid():
        continue  # /proc/self/environ shows the environment this process started with
    try:
        if "CANARY_VALUE".encode() in open(f"/proc/{proc.pid}/environ", "rb").read():
            leaks.append(" ".join(proc.cmdline())[:120])
    except OSError:
        pass
print(json.dumps({"other_job": other.stdout.strip().splitlines()[-1:] , "other_rc": other.returncode,
                  "other_err": other.stderr[-2000:], "own_task": mine, "leaks": leaks, "metrics_bind": metrics_bind,
                  "driver_keys": read_keys(load_config(None).serve.guard)}))
ray.shutdown()
"""


def test_no_ray_process_or_other_job_sees_the_api_keys(tmp_path):
    env = {**os.environ, "TAILORLM_API_KEYS": CANARY}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the CLI's own setting, not the test suite's
    out = subprocess.run(
        [sys.executable, "-c", DRIVER.replace("CANARY_VALUE", CANARY)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["other_rc"] == 0, result["other_err"]
    assert result["other_job"] == ["None"] and result["own_task"] is None  # a task of another job, and of this one
    assert result["leaks"] == []  # no raylet, GCS, dashboard or worker has them in its environment
    assert result["driver_keys"] == [CANARY]  # the driver still has them, in memory
    assert result["metrics_bind"] == ["127.0.0.1"]  # Ray's unauthenticated metrics endpoint: loopback only


def test_rays_token_file_is_private(ray_local):
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        pytest.skip("Ray token authentication is off here")
    token = Path.home() / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) & 0o077 == 0
