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
    temp_dir = str(tmp_path / "rayhead")
    port, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
                    "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp_dir}",
                    "--include-dashboard=true"], check=True, env=env, capture_output=True, timeout=180)
    try:
        corpus = tmp_path / "in.jsonl"
        corpus.write_text("\n".join(json.dumps({"id": f"r{i}", "text": f"The harbor town number {i} keeps its "
                                                "boats beside the old stone bridge, and the market opens early."})
                                    for i in range(6)) + "\n{broken\n")
        storage = tmp_path / "runs"
        cmd = [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
               "--runtime-env", str(ROOT / "jobs" / "runtime_env.yaml"), "--",
               "python", "jobs/data.py", "--config", "jobs/configs/tiny_cpu.yaml", f"run.storage={storage}",
               "run.name=jobtest", f"data.sources=[{{path: '{corpus}'}}]", "data.filters.min_tokens=1",
               "data.dedup.near.enabled=false"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "SUCCEEDED" in out.stdout + out.stderr
        stage = storage / "jobtest" / "data"
        assert (stage / "_COMPLETE.json").exists()
        stats = json.loads((stage / "stats.json").read_text())
        assert stats["input_rows"] == 7 and stats["dropped_by_reason"]["malformed_json"] == 1
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
