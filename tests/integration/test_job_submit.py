"""`ray job submit` for real: a local head started with `ray start --head`, the data job submitted
with the ray CLI, its outputs checked, and that head stopped (only its own processes: `ray stop`
would also stop the test session's local Ray)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_head(temp_dir: str) -> None:
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir in " ".join(p.info["cmdline"] or []):
                os.kill(p.pid, signal.SIGKILL)
        except (ProcessLookupError, psutil.Error):
            pass


def test_data_job_via_ray_job_submit(tmp_path):
    ray_bin = str(Path(sys.executable).parent / "ray")
    # short: Ray's Unix socket paths under the temp dir must stay below ~107 characters
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    port, dash = _free_port(), _free_port()
    # Ray 2.60 enables token auth on new clusters; both the head and the CLI must agree on it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    # as on a cluster node with the environment activated: the job's `python` is this venv's
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # every port of its own: the agents' defaults (52365, ...) are taken by the test session's Ray
    subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={port}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--node-manager-port={_free_port()}",
            f"--object-manager-port={_free_port()}",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=180,
    )
    try:
        corpus = tmp_path / "in.jsonl"
        corpus.write_text(
            "\n".join(
                json.dumps(
                    {
                        "id": f"r{i}",
                        "text": f"The harbor town number {i} keeps its "
                        "boats beside the old stone bridge, and the market opens early.",
                    }
                )
                for i in range(6)
            )
            + "\n{broken\n"
        )
        storage = tmp_path / "runs"
        cmd = [
            ray_bin,
            "job",
            "submit",
            f"--address=http://127.0.0.1:{dash}",
            "--working-dir",
            str(ROOT),
            "--runtime-env",
            str(ROOT / "jobs" / "runtime_env.yaml"),
            "--",
            "python",
            "jobs/data.py",
            "--config",
            "jobs/configs/tiny_cpu.yaml",
            f"run.storage={storage}",
            "run.name=jobtest",
            f"data.sources=[{{path: '{corpus}'}}]",
            "data.filters.min_tokens=1",
            "data.dedup.near.enabled=false",
        ]
        for _ in range(12):  # the head's job agent needs a while after `ray start` on a busy machine
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in out.stdout + out.stderr:
                break
            time.sleep(5)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "succeeded" in (out.stdout + out.stderr).lower()
        stage = storage / "jobtest" / "data"
        assert (stage / "_COMPLETE.json").exists()
        stats = json.loads((stage / "stats.json").read_text())
        assert stats["input_rows"] == 7 and stats["dropped_by_reason"]["malformed_json"] == 1
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
