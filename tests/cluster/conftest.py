"""The multi-node cluster fixture: one cluster for the tests in this folder (torn down when they are
done, not at the end of the whole suite, whose other tests it would slow), torn down however they end."""

from __future__ import annotations

import pytest

from tests.cluster.netns import Cluster, missing_requirements


@pytest.fixture(scope="package")
def ray_cluster(request, tmp_path_factory):
    """Head (0 CPUs) + 2 one-CPU workers in their own namespaces, S3 on the head (see netns.py).
    Leftovers of an earlier crashed run are removed first; on failures the nodes' Ray logs and the
    S3 server's log are copied to a pytest temp folder before teardown."""
    why = missing_requirements()
    if why:
        pytest.skip(why)
    cluster = Cluster()
    failed_before = request.session.testsfailed
    with cluster:
        yield cluster
        if request.session.testsfailed > failed_before:
            dest = tmp_path_factory.mktemp("cluster-logs")
            cluster.save_logs(dest)
            print(f"\ncluster logs: {dest}")


@pytest.fixture(scope="package")
def pipeline_run(ray_cluster):
    """The whole pipeline submitted once as a Ray job (run `spread` in S3): the pipeline test
    checks where its work ran, the training fault test compares its own model with this one."""
    from tests.cluster.jobs import OVERRIDES, submit

    p, seconds = submit(ray_cluster, "tlm-pipeline", "pipeline", [*OVERRIDES, "run.name=spread"])
    assert p.returncode == 0, f"the pipeline job failed:\n{p.stdout[-6000:]}\n{p.stderr[-3000:]}"
    return {"cluster": ray_cluster, "name": "spread", "submission_id": "tlm-pipeline", "seconds": seconds}
