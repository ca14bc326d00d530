"""What the `jobs/*.py` entrypoints run under `ray job submit`.

    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/tiny_cpu.yaml [KEY=VALUE ...]

`ray job submit` sets RAY_ADDRESS, so the CLI connects to that cluster and ships
`platform/tailorlm` to the workers in its runtime_env (cluster.init_ray).
"""

from __future__ import annotations

import argparse


def entry(stage: str, argv: list[str] | None = None) -> int:
    from tailorlm.cli import main

    ap = argparse.ArgumentParser(prog=f"jobs/{stage}.py", description=f"tailorlm {stage} as a Ray job")
    ap.add_argument("--config", required=True, help="pipeline YAML")
    ap.add_argument("--force", action="store_true", help="rerun finished stages")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    warn_local_storage(args.config, args.overrides)
    cmd = "run" if stage == "pipeline" else stage
    force = (["--force", "all"] if cmd == "run" else ["--force"]) if args.force else []
    return main([cmd, args.config, *args.overrides, *force])


def warn_local_storage(config: str, overrides: list[str]) -> None:
    """Under `ray job submit` a relative run.storage lands in the job's working dir: a temp folder
    on the head that Ray deletes later and that no other node sees. Said before anything runs;
    a bad config is left for the CLI to report."""
    import os

    from tailorlm.config import load_config
    from tailorlm.runs import is_remote

    try:
        storage = load_config(config, overrides).run.storage
    except Exception:  # noqa: BLE001 - the CLI names what is wrong
        return
    if is_remote(storage) or not (os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID")):
        return
    temp = "" if os.path.isabs(os.path.expanduser(storage)) else " (inside the job's temporary working dir)"
    print(
        f"[warning] run.storage {storage} is a path on this node's disk{temp}: on a cluster of several "
        "nodes, stages that run tasks elsewhere need storage every node reaches: set "
        "run.storage=s3://bucket/prefix (or gs://..., or a mount shared by all nodes)"
    )
