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
