"""The whole pipeline through the user's door on a real multi-node cluster: `ray job submit` on the
head, run storage in S3, work spread over the two 1-CPU worker nodes (the head has no CPU)."""

from __future__ import annotations

import pytest

from tests.cluster.jobs import BUCKET, STORAGE, placement, s3, s3_json

pytestmark = pytest.mark.cluster


def test_pipeline_job_runs_across_nodes_on_s3(pipeline_run):
    c, run = pipeline_run["cluster"], pipeline_run["name"]
    seen = placement(c, pipeline_run["submission_id"])
    assert seen["status"] == "SUCCEEDED", seen["message"]

    # data: filter and dedup work ran on both workers
    # (an actor's creation task has no node in the State API)
    data_nodes = {t["node"] for t in seen["tasks"] if "Annotate" in t["name"] or "Write" in t["name"]} - {None}
    assert data_nodes == {"tlmc-w1", "tlmc-w2"}, sorted({(t["name"], t["node"]) for t in seen["tasks"]})
    # train: the two Ray Train workers on different nodes
    train = [a["node"] for a in seen["actors"] if a["class"] == "RayTrainWorker"]
    assert sorted(train) == ["tlmc-w1", "tlmc-w2"], seen["actors"]
    # serve: the engine replica on a worker node; the sample answer came through the head's proxy
    replicas = [a["node"] for a in seen["serve"] if a["class"] == "ServeReplica:tailorlm:engine"]
    assert len(replicas) == 1 and replicas[0] in {"tlmc-w1", "tlmc-w2"}, seen["serve"]
    endpoint = s3_json(c, f"{BUCKET}/runs/{run}/serve/endpoint.json")
    assert endpoint["url"] == "http://127.0.0.1:8000/v1" and endpoint["sample"]["answer"], endpoint
    assert all(u.startswith(f"{STORAGE}/{run}/export/") for u in endpoint["models"].values()), endpoint
    for stage in ("data", "train", "export", "serve"):
        assert s3_json(c, f"{BUCKET}/runs/{run}/{stage}/_COMPLETE.json")["stage"] == stage
    # the factory model was built once and published beside the runs, not assumed on every node
    assert any("/llama-" in p for p in s3(c, f"fs.ls('{BUCKET}/runs/_models')"))
    # nothing of the run on the head's disk: no runs/ folder in the job's working dir
    local = c.run("head", ["sh", "-c", "find /tmp/ray -maxdepth 7 -type d -name runs"]).stdout
    assert local.strip() == "", local
    # each worker that loaded a model copied it from S3 into its own cache
    for w in ("w1", "w2"):
        copies = c.run(w, ["sh", "-c", "ls /tmp/home/.cache/tailorlm/remote"], check=False).stdout.split()
        assert any(name.startswith("llama-") for name in copies), (w, copies)
    print(f"pipeline job on 3 nodes: {pipeline_run['seconds']:.0f} s")
