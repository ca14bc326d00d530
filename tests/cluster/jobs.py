"""Driving Ray jobs on the test cluster from the host, the way a user does from a laptop: `ray job
submit` against the head's dashboard, State API queries, objects in the cluster's S3. Every call
runs inside the head node's namespaces (the host has no route to the cluster)."""

from __future__ import annotations

import json
import time

from tests.cluster.netns import BUCKET, PYTHON, REPO

STORAGE = f"s3://{BUCKET}/runs"
# Small and quick, and every stage on Ray: the data stage's in-process executor is off so that its
# filter and dedup work runs as Ray Data tasks; no sweep (tune has its own tests). 100 steps (about
# 30 s of training) so that a node lost after the first checkpoint (step 10) lands in training;
# unpacked rows, whose rank shards are fixed across a restart (trainer.rank_shards).
OVERRIDES = [
    f"run.storage={STORAGE}",
    "data.in_process_max_mb=0",
    "tune.enabled=false",
    "train.max_steps=100",
    "train.packing=false",
    "train.eval_every=10",
    "export.quantize=[w8a8]",
    "export.method=rtn",
]


def submit(c, submission_id: str, job: str, overrides: list[str], wait: bool = True, timeout: float = 900):
    """`ray job submit` from the head with the checkout as working dir; job: pipeline, data, train...
    wait: follow the job to its end (the command's output is its log). Returns (process, seconds)."""
    t0 = time.monotonic()
    argv = ["ray", "job", "submit", *([] if wait else ["--no-wait"]), "--address", c.dashboard_url]
    argv += ["--working-dir", str(REPO), "--submission-id", submission_id, "--", "python", f"jobs/{job}.py"]
    argv += ["--config", "jobs/configs/tiny_cpu.yaml", *overrides]
    p = c.run("head", argv, timeout=timeout, check=False, cwd=REPO)
    return p, time.monotonic() - t0


_WAIT = """
import time
from ray.job_submission import JobSubmissionClient, JobStatus
c = JobSubmissionClient({url!r})
deadline = time.monotonic() + {timeout}
while time.monotonic() < deadline:
    s = c.get_job_status({sid!r})
    if s.is_terminal():
        break
    time.sleep(1)
print("STATUS", s.value)
"""


def wait_job(c, submission_id: str, timeout: float = 600) -> str:
    """The job's final status (SUCCEEDED, FAILED, STOPPED), or RUNNING after timeout."""
    code = _WAIT.format(url=c.dashboard_url, sid=submission_id, timeout=timeout)
    out = c.python("head", code, timeout=timeout + 60).stdout
    return [line.split()[1] for line in out.splitlines() if line.startswith("STATUS ")][-1]


def job_logs(c, submission_id: str) -> str:
    return c.run("head", ["ray", "job", "logs", "--address", c.dashboard_url, submission_id], timeout=120).stdout


def placement(c, submission_id: str) -> dict:
    p = c.run("head", [PYTHON, str(REPO / "tests/cluster/placement.py"), c.dashboard_url, submission_id], timeout=120)
    return json.loads(p.stdout.strip().splitlines()[-1])


def s3(c, expr: str, timeout: float = 120):
    """Evaluate expr with `fs` an s3fs filesystem of the cluster's S3, inside the head; returns
    the value (JSON)."""
    code = (
        "import json, s3fs, pyarrow.parquet as pq\n"
        "fs = s3fs.S3FileSystem(skip_instance_cache=True)\n"
        f"print('RESULT', json.dumps({expr}))"
    )
    # check=False: pyarrow's S3 threads can abort the interpreter at exit ("terminate called
    # without an active exception") after the result is out
    p = c.python("head", code, timeout=timeout, check=False)
    results = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert results, f"{expr}: {p.stderr[-2000:]}"
    return json.loads(results[-1][7:])


def s3_json(c, key: str):
    return s3(c, f"json.loads(fs.cat({key!r}))")


def s3_exists(c, key: str) -> bool:
    return s3(c, f"fs.exists({key!r})")


def parquet_rows(c, key: str) -> int:
    return s3(c, f"pq.ParquetDataset({key!r}, filesystem=fs).read(columns=['id']).num_rows")


def wait_until(c, expr: str, timeout: float = 300) -> float:
    """Block until expr (Python, with `fs` the cluster's S3) is true; seconds waited."""
    code = (
        "import json, s3fs, time\nfs = s3fs.S3FileSystem(skip_instance_cache=True)\nt0 = time.monotonic()\n"
        "def ok():\n    try:\n"
        f"        return bool({expr})\n"
        "    except (OSError, ValueError):\n        return False\n"
        f"while not ok() and time.monotonic() - t0 < {timeout}:\n"
        "    time.sleep(0.3); fs.invalidate_cache()\n"
        "print('RESULT', time.monotonic() - t0)"
    )
    out = c.python("head", code, timeout=timeout + 60).stdout
    waited = float([line for line in out.splitlines() if line.startswith("RESULT ")][-1][7:])
    assert waited < timeout, f"not true within {timeout} s: {expr}"
    return waited


def wait_for_key(c, key: str, timeout: float = 300) -> float:
    """Block until the object (or any object a glob matches) exists; seconds waited."""
    return wait_until(c, f"fs.glob({key!r})", timeout)
