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
    cmd = "run" if stage == "pipeline" else stage
    force = (["--force", "all"] if cmd == "run" else ["--force"]) if args.force else []
    return main([cmd, args.config, *args.overrides, *force])
