"""What a finished Ray job did, and where: run inside the head node after `ray job submit`.

    python tests/cluster/placement.py <dashboard url> <submission id>

Prints one JSON line: the job's status, and from Ray's State API every task and actor of the job
with the name of the node it ran on (Ray keeps finished tasks and dead actors there).
"""

from __future__ import annotations

import json
import sys

from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors, list_nodes, list_tasks


def main() -> None:
    dashboard, submission_id = sys.argv[1:3]
    info = JobSubmissionClient(dashboard).get_job_info(submission_id)
    node_names = {n.node_id: n.node_name for n in list_nodes(address=dashboard, limit=1000)}
    tasks, actors = [], []
    if info.job_id:
        flt = [("job_id", "=", info.job_id)]
        for t in list_tasks(address=dashboard, filters=flt, limit=10_000, raise_on_missing_output=False):
            tasks.append({"name": t.name, "node": node_names.get(t.node_id), "state": t.state, "type": t.type})
        for a in list_actors(address=dashboard, filters=flt, limit=10_000, raise_on_missing_output=False):
            actors.append({"class": a.class_name, "node": node_names.get(a.node_id), "state": a.state})
    # Serve's actors belong to the job that started Serve (the controller's job), the replicas too
    serve = [
        {"class": a.class_name, "node": node_names.get(a.node_id), "state": a.state}
        for a in list_actors(address=dashboard, limit=10_000, raise_on_missing_output=False)
        if a.class_name.startswith(("ServeReplica", "ProxyActor", "ServeController"))
    ]
    print(
        json.dumps(
            {"status": str(info.status), "message": info.message, "tasks": tasks, "actors": actors, "serve": serve}
        )
    )


if __name__ == "__main__":
    main()
