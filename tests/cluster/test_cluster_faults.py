"""Faults on the multi-node cluster: a worker node lost during the data stage and during training,
and the S3 server stopped during a stage. Figures printed here go to the README's cluster section."""

from __future__ import annotations

import json
import time

import pytest

from tests.cluster.jobs import (
    BUCKET,
    OVERRIDES,
    job_logs,
    parquet_rows,
    s3,
    s3_exists,
    s3_json,
    submit,
    wait_for_key,
    wait_job,
    wait_until,
)

pytestmark = pytest.mark.cluster


def test_lost_worker_during_data_stage_accounts_for_every_row(ray_cluster):
    """(b) Every process of worker w2 killed at once while the data stage's tasks run; the node
    comes back. Ray Data retries the lost tasks elsewhere: the stage completes with every input
    row kept or dropped once; if it cannot, it fails with no _COMPLETE.json."""
    c, run = ray_cluster, "lost-node-data"
    submit(c, run, "data", [*OVERRIDES, f"run.name={run}"], wait=False)
    wait_for_key(c, f"{BUCKET}/runs/{run}/data/_STARTED.json")
    time.sleep(4)  # the filter actors are starting or running on both workers
    c.kill_node("w2")
    killed = time.monotonic()
    c.restart_node("w2")
    status = wait_job(c, run)
    took = time.monotonic() - killed
    base = f"{BUCKET}/runs/{run}/data"
    if status == "SUCCEEDED":
        stats = s3_json(c, f"{base}/stats.json")
        kept, dropped = parquet_rows(c, f"{base}/kept"), parquet_rows(c, f"{base}/dropped")
        assert stats["input_rows"] == stats["accounted_rows"] == kept + dropped, stats
        assert (stats["kept"], stats["dropped"]) == (kept, dropped)
        ids = s3(c, f"pq.ParquetDataset('{base}/kept', filesystem=fs).read(columns=['id']).column('id').to_pylist()")
        assert len(ids) == len(set(ids))  # nothing doubled by the retried tasks
        print(f"data stage with w2 lost: completed {took:.0f} s after the loss, {kept + dropped} rows accounted for")
    else:
        assert status == "FAILED", status
        assert not s3_exists(c, f"{base}/_COMPLETE.json")
        print(f"data stage with w2 lost: failed {took:.0f} s after the loss, nothing marked complete")


def test_lost_worker_during_training_resumes_from_checkpoint(pipeline_run):
    """(a) Worker node w2 lost (every process killed) after the first checkpoint; a replacement
    node (w2 rebooted: empty object store, its own disk kept) joins. Ray Train restarts the worker
    group from the last checkpoint in S3 and the final model matches the uninterrupted run's
    (`spread`, same config) within the single-node resume test's tolerance."""
    c, run = pipeline_run["cluster"], "lost-node-train"
    s3(c, f"fs.copy('{BUCKET}/runs/spread/data', '{BUCKET}/runs/{run}/data', recursive=True) or 0")
    submit(c, run, "train", [*OVERRIDES, f"run.name={run}"], wait=False)
    # A checkpoint is safe once Ray Train registers it in its snapshot, not when its files are up:
    # a node lost between the two (the report not yet collected from rank 0) restarts from the one
    # before; seen here, from scratch
    snapshot = f"{BUCKET}/runs/{run}/train/ray/checkpoint_manager_snapshot.json"
    wait_until(c, f"json.loads(fs.cat({snapshot!r}))['checkpoint_results']", timeout=400)
    c.kill_node("w2")
    killed = time.monotonic()
    c.restart_node("w2")
    status = wait_job(c, run)
    took = time.monotonic() - killed
    logs = job_logs(c, run)
    assert status == "SUCCEEDED", logs[-5000:]
    assert "[train] resumed at step" in logs, logs[-5000:]  # the loss hit training, not a later step
    ref = s3_json(c, f"{BUCKET}/runs/spread/train/eval.json")
    got = s3_json(c, f"{BUCKET}/runs/{run}/train/eval.json")
    assert got["best_checkpoint_step"] == ref["best_checkpoint_step"]
    history = [
        json.loads(line) for line in s3(c, f"fs.cat('{BUCKET}/runs/{run}/train/metrics.jsonl').decode()").splitlines()
    ]
    reference = [
        json.loads(line) for line in s3(c, f"fs.cat('{BUCKET}/runs/spread/train/metrics.jsonl').decode()").splitlines()
    ]
    losses = {h["step"]: h["train_loss"] for h in history if "train_loss" in h}
    diverged = [h["step"] for h in reference if abs(h.get("train_loss", 0) - losses.get(h["step"], 0)) > 1e-3]
    gap = abs(got["best_eval_loss"] - ref["best_eval_loss"]) / ref["best_eval_loss"]
    assert gap < 0.01, (got, ref, f"train loss differs from step {diverged[:1]}")
    assert [h["step"] for h in history if "eval_loss" in h] == [h["step"] for h in reference if "eval_loss" in h]
    print(
        f"training with w2 lost: finished {took:.0f} s after the loss; best eval loss "
        f"{got['best_eval_loss']:.4f} vs {ref['best_eval_loss']:.4f} uninterrupted"
    )


def test_storage_outage_fails_the_stage_naming_it_and_a_rerun_completes(ray_cluster):
    """(c) The S3 server stopped while the data stage runs: the stage fails within
    run.storage_timeout_s (and a little), the error names the storage, nothing is marked
    complete; with the server back, the same command completes."""
    c, run = ray_cluster, "storage-outage"
    args = [*OVERRIDES, f"run.name={run}", "run.storage_timeout_s=20"]
    submit(c, f"{run}-1", "data", args, wait=False)
    wait_for_key(c, f"{BUCKET}/runs/{run}/data/_STARTED.json")
    time.sleep(3)
    c.stop_s3()
    stopped = time.monotonic()
    try:
        status = wait_job(c, f"{run}-1", timeout=300)
        failed_after = time.monotonic() - stopped
    finally:
        c.start_s3()
    logs = job_logs(c, f"{run}-1")
    assert status == "FAILED", logs[-3000:]
    assert f"StorageUnavailable: run.storage s3://{BUCKET}/runs/{run}/data has not answered" in logs, logs[-3000:]
    assert not s3_exists(c, f"{BUCKET}/runs/{run}/data/_COMPLETE.json")
    p, rerun_s = submit(c, f"{run}-2", "data", args)
    assert p.returncode == 0, p.stdout[-4000:]
    stats = s3_json(c, f"{BUCKET}/runs/{run}/data/stats.json")
    assert stats["input_rows"] == stats["accounted_rows"] == stats["kept"] + stats["dropped"]
    assert parquet_rows(c, f"{BUCKET}/runs/{run}/data/kept") == stats["kept"]
    print(
        f"storage outage: the stage failed {failed_after:.0f} s after S3 stopped; "
        f"the rerun completed in {rerun_s:.0f} s"
    )
