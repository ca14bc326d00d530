"""The smoke test's Ray driver. Runs inside the head node (`Cluster.run("head", [python, this, ...])`),
prints one JSON line with what it saw: Ray's node list, a pinned task per worker node, token auth.

Functions defined here travel to the workers by value (this file is `__main__`), so the workers need
nothing of the repository on their path.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=1)
def probe(phase: int, me: str, others: list[str], bucket: str, state: str) -> dict:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    out = {
        "hostname": socket.gethostname(),
        "ip": ray.util.get_node_ip_address(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid_ns_pid": os.getpid(),
    }
    marker = f"/tmp/smoke-marker-{me}"
    if phase == 1:
        with open(marker, "w") as f:
            f.write(out["hostname"])
        fs.pipe(f"{bucket}/smoke/{me}.txt", out["hostname"].encode())
        out["s3_own"] = fs.cat(f"{bucket}/smoke/{me}.txt").decode()
        out["state_nodes"] = sorted(os.listdir(os.path.join(state, "nodes")))  # other nodes' disks: hidden
        out["ray_session_dirs"] = sorted(d for d in os.listdir("/tmp/ray") if d.startswith("session_2"))
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("1.1.1.1", 80))
            out["outside"] = "reachable"
        except OSError as e:
            out["outside"] = f"{type(e).__name__}: {e}"
        finally:
            s.close()
    else:
        out["own_marker"] = os.path.exists(marker)
        out["other_markers"] = {o: os.path.exists(f"/tmp/smoke-marker-{o}") for o in others}
        out["s3_others"] = {o: fs.cat(f"{bucket}/smoke/{o}.txt").decode() for o in others}
        # pyarrow's S3 filesystem too (what Ray Data and Ray Train's storage_path use): endpoint and
        # credentials from the same environment variables
        import pyarrow.fs as pafs

        afs, root = pafs.FileSystem.from_uri(f"s3://{bucket}/smoke")
        out["pyarrow_others"] = {}
        for o in others:
            with afs.open_input_stream(f"{root}/{o}.txt") as f:
                out["pyarrow_others"][o] = f.read().decode()
    return out


def http_status(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def main() -> None:
    address, dashboard, bucket, state = sys.argv[1:5]
    t0 = time.monotonic()
    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    nodes = [
        {"name": n["NodeName"], "ip": n["NodeManagerAddress"], "id": n["NodeID"], "alive": n["Alive"],
         "cpus": n["Resources"].get("CPU", 0)}
        for n in ray.nodes()
    ]  # fmt: skip
    workers = {n["name"].rsplit("-", 1)[1]: n["id"] for n in nodes if n["alive"] and n["cpus"] > 0}
    results: dict = {}
    for phase in (1, 2):
        refs = {
            me: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(
                phase, me, [o for o in workers if o != me], bucket, state
            )
            for me, node_id in workers.items()
        }
        results[f"phase{phase}"] = {me: r for me, r in zip(refs, ray.get(list(refs.values()), timeout=120))}
    token = open(os.environ["RAY_AUTH_TOKEN_PATH"]).read().strip()
    api = f"{dashboard}/api/jobs/"
    auth = {
        "no_token": http_status(api, None),
        "bad_token": http_status(api, "0" * 64),
        "token": http_status(api, token),
    }
    print(json.dumps({"nodes": nodes, "results": results, "auth": auth, "driver_s": time.monotonic() - t0}))


if __name__ == "__main__":
    main()
