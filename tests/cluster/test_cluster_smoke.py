"""Smoke test of the multi-node fixture: 3 Ray nodes in their own namespaces, work pinned to each
worker, S3 shared by all, disks and networks private."""

from __future__ import annotations

import json
import time

import pytest

from tests.cluster.netns import BUCKET, PYTHON, REPO

pytestmark = pytest.mark.cluster


def test_three_nodes_pinned_tasks_shared_s3_private_disks(ray_cluster):
    c = ray_cluster
    t0 = time.monotonic()
    p = c.run(
        "head",
        [PYTHON, str(REPO / "tests/cluster/smoke_driver.py"), c.gcs_address, c.dashboard_url, BUCKET, str(c.state)],
        timeout=180,
    )
    seen = json.loads(p.stdout.strip().splitlines()[-1])

    # the alive ones: a node a fault test killed and rebooted stays listed, dead, beside its successor
    nodes = {n["name"]: n for n in seen["nodes"] if n["alive"]}
    assert sorted(nodes) == ["tlmc-head", "tlmc-w1", "tlmc-w2"], seen["nodes"]
    assert {name: (n["ip"], n["cpus"]) for name, n in nodes.items()} == {
        "tlmc-head": ("10.77.0.1", 0),
        "tlmc-w1": ("10.77.0.2", 1),
        "tlmc-w2": ("10.77.0.3", 1),
    }

    one, two = seen["results"]["phase1"], seen["results"]["phase2"]
    assert sorted(one) == sorted(two) == ["w1", "w2"]
    for me, other in (("w1", "w2"), ("w2", "w1")):
        r = one[me]
        # ran where it was pinned: that node's hostname (UTS namespace), address and Ray node
        assert (r["hostname"], r["ip"], r["node_id"]) == (
            f"tlmc-{me}",
            nodes[f"tlmc-{me}"]["ip"],
            nodes[f"tlmc-{me}"]["id"],
        )
        assert r["s3_own"] == f"tlmc-{me}"  # wrote and read back its object through the head's S3
        assert r["state_nodes"] == []  # no node can look into the host-side folders of node disks
        assert len(r["ray_session_dirs"]) == 1  # its own /tmp/ray: one session, this node's
        assert r["outside"].startswith("OSError") and "unreachable" in r["outside"], r["outside"]  # no route out
        r2 = two[me]
        assert r2["node_id"] == r["node_id"]
        assert r2["own_marker"] is True  # its /tmp persists across tasks on the node...
        assert r2["other_markers"] == {other: False}  # ...and the other worker's /tmp is not visible
        assert r2["s3_others"] == {other: f"tlmc-{other}"}  # storage is shared: it reads the other's object
        assert r2["pyarrow_others"] == {other: f"tlmc-{other}"}  # and so does pyarrow's S3FileSystem

    # host side: each node's disk is its own folder, the marker only in its writer's
    for me, other in (("w1", "w2"), ("w2", "w1")):
        assert (c.state / "nodes" / me / "tmp" / f"smoke-marker-{me}").read_text() == f"tlmc-{me}"
        assert not (c.state / "nodes" / other / "tmp" / f"smoke-marker-{me}").exists()

    # token auth is on: the dashboard's job API refuses a missing or wrong token
    assert seen["auth"]["token"] == 200, seen["auth"]
    assert seen["auth"]["no_token"] in (401, 403) and seen["auth"]["bad_token"] in (401, 403), seen["auth"]
    print(f"driver {seen['driver_s']:.1f} s, test body {time.monotonic() - t0:.1f} s")


_AFTER_LOSS = """
import json, time, ray
ray.init(address="{addr}", log_to_driver=False, logging_level="ERROR")
t0 = time.monotonic()
while any(n["Alive"] for n in ray.nodes() if n["NodeName"] == "tlmc-w2"):
    time.sleep(0.2)
dead_s = time.monotonic() - t0
host = ray.get(ray.remote(num_cpus=1)(lambda: __import__("socket").gethostname()).remote(), timeout=60)
print(json.dumps({{"dead_s": dead_s, "task_ran_on": host}}))
"""


def test_fixture_faults_node_loss_and_s3_restart(ray_cluster):
    """The fault helpers later tests build on: a lost worker node (every process killed at once)
    is seen dead by Ray, work goes on elsewhere, the node reboots with its own disk; the S3 server
    stops (clients get connection errors) and restarts with its data."""
    c = ray_cluster
    c.run("w2", ["sh", "-c", "echo kept > /tmp/survives-reboot"])
    c.python("w1", "import s3fs; s3fs.S3FileSystem().pipe('tailorlm/faults/before.txt', b'before')")

    c.kill_node("w2")
    seen = json.loads(c.python("head", _AFTER_LOSS.format(addr=c.gcs_address)).stdout.strip().splitlines()[-1])
    assert seen["task_ran_on"] == "tlmc-w1", seen
    alive = c.restart_node("w2")
    assert sorted(n["name"] for n in alive) == ["tlmc-head", "tlmc-w1", "tlmc-w2"]
    assert c.run("w2", ["cat", "/tmp/survives-reboot"]).stdout.strip() == "kept"

    c.stop_s3()
    down = c.python(
        "w1",
        "import botocore.exceptions as e, s3fs\n"
        "fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={'retries': {'max_attempts': 1}})\n"
        "try:\n    fs.cat('tailorlm/faults/before.txt')\nexcept (e.EndpointConnectionError, OSError) as x:\n"
        "    print(type(x).__name__)",
    )
    assert down.stdout.strip() in ("EndpointConnectionError", "ConnectionError", "OSError"), down.stdout
    c.start_s3()
    back = c.python("w2", "import s3fs; print(s3fs.S3FileSystem().cat('tailorlm/faults/before.txt').decode())")
    assert back.stdout.strip() == "before"
    print(f"w2 marked dead by Ray {seen['dead_s']:.1f} s after its processes were killed")
